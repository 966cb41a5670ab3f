"""GlimpsePrune on tiny random-weight LLaVA-1.5 and LLaVA-NeXT models, checked against the unpatched
HF model.

The pruning oracle is ``reference_model.masked_generate``: the *unpatched* model with per-layer
attention masks that hide the pruned tokens from the layers after K (prefill) and from every layer
(decode). The CLIP-feature checks compare against what the model itself feeds its language model.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import token_prune as tp
from token_prune import hf
from reference_model import llama_decode_position, masked_generate
from token_prune.models.llava import LlavaAdapter, LlavaNextAdapter
from token_prune.tiny import (
    SampleSpec,
    best_resolution,
    llava_inputs,
    llava_next_inputs,
    llava_next_num_image_tokens,
    llava_next_tile_count,
    tiny_llava,
    tiny_llava_next,
)
from token_prune.vip import GlimpseConfig, GlimpseModules

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

K = 2


def llava_samples():
    return [SampleSpec(images=((56, 56), (56, 56)), prefix_len=3, suffix_len=6),
            SampleSpec(images=((56, 56),), prefix_len=5, suffix_len=4)]


def next_samples():
    # (60, 100): 2x2 tiles = 8x8 high-res tokens, padding rows removed (4 kept); (100, 60): 2x2 tiles,
    # padding columns removed (4 kept); (40, 100): 1x2 tiles = 4x8, nothing to remove.
    return [SampleSpec(images=((60, 100),), prefix_len=3, suffix_len=6),
            SampleSpec(images=((100, 60), (40, 100)), prefix_len=5, suffix_len=4)]


MODELS = {
    "llava": dict(build=tiny_llava, inputs=llava_inputs, samples=llava_samples),
    "llava_next": dict(build=tiny_llava_next, inputs=llava_next_inputs, samples=next_samples),
}
KINDS = sorted(MODELS)


@pytest.fixture(scope="module", params=KINDS)
def fam64(request):
    """(kind, spec, float64 model) for each family."""
    spec = MODELS[request.param]
    return request.param, spec, spec["build"](dtype=torch.float64, seed=1)


def make_inputs(spec, model, seed, samples=None):
    return spec["inputs"](model, samples if samples is not None else spec["samples"](), seed=seed)


def with_positions(inputs):
    """``inputs`` plus the position ids ``generate`` would build (mask cumsum; padding at 0)."""
    mask = inputs["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return dict(inputs, position_ids=pos)


def slice_sample(inputs, b, samples):
    """Sample ``b`` of a left-padded batch, as it would be built alone."""
    mask = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b:b + 1, mask] for k in ("input_ids", "attention_mask")}
    counts = [len(s.images) for s in samples]
    first, n = sum(counts[:b]), counts[b]
    if n:
        out["pixel_values"] = inputs["pixel_values"][first:first + n]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][first:first + n]
    return out


def lm_inputs_embeds(model, inputs):
    """The inputs_embeds the *unpatched* model hands its language model (image features scattered in)."""
    seen = {}

    def pre(module, args, kwargs):
        seen["emb"] = kwargs["inputs_embeds"].clone()

    hook = model.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["emb"]


def spy_prefill(handle):
    """Record the vision features and layout the runtime hands to the method at each prefill."""
    seen = {}
    orig = handle.method.prefill

    def spy(rt, *a, **k):
        seen["feats"] = [f.clone() for f in rt.ctx.vision_features]
        seen["layout"] = rt.ctx.image_grids
        return orig(rt, *a, **k)

    handle.method.prefill = spy
    return seen


# -- keep everything == unpatched -------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_matches_unpatched(kind, attn):
    spec = MODELS[kind]
    model = spec["build"](attn_implementation=attn, dtype=torch.float32, seed=3)
    inputs = make_inputs(spec, model, seed=1)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with tp.patch(model, method="glimpse", keep_ratio=1.0, layer=K) as handle:
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            assert all(s["kept_tokens"] == s["visual_tokens"] > 0 for s in handle.stats)
    torch.testing.assert_close(logits[valid], ref_logits[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_low_precision(kind, dtype):
    spec = MODELS[kind]
    model = spec["build"](dtype=dtype, seed=4)
    inputs = make_inputs(spec, model, seed=2)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits.float()
        with tp.patch(model, method="glimpse", keep_ratio=1.0, layer=K):
            out = model(**inputs).logits.float()
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    err = (out[valid] - ref[valid]).abs().max().item()
    assert err < 0.1 * ref[valid].abs().max().item()


@pytest.mark.parametrize("layer", [0, 2, 5])
def test_keep_all_any_layer_float64_exact(fam64, layer):
    kind, spec, model = fam64
    inputs = make_inputs(spec, model, seed=3)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_pos = model(**with_positions(inputs)).logits
        with tp.patch(model, method="glimpse", keep_ratio=1.0, layer=layer):
            out = model(**inputs).logits  # no position_ids: HF's arange(S), padding ignored
            out_pos = model(**with_positions(inputs)).logits
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_pos[valid], ref_pos[valid], rtol=1e-12, atol=1e-12)


# -- pruning against the masked reference -----------------------------------------------------

@pytest.mark.parametrize("layer", [0, K, 5])
def test_pruned_generation_matches_masked_reference(fam64, layer):
    kind, spec, model = fam64
    inputs = make_inputs(spec, model, seed=4)
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method="glimpse", keep_ratio=0.25, layer=layer) as handle:
        out = model(**with_positions(inputs))
        keep = handle.keep_mask.clone()
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    visual = inputs["input_ids"] == model.config.image_token_id
    assert bool((visual & ~keep & inputs["attention_mask"].bool()).any())  # something was pruned
    valid = inputs["attention_mask"].bool()
    ref_tokens, ref_first = masked_generate(
        model, with_positions(inputs), 5,
        prefill_keys=[valid if li <= layer else (valid & keep) for li in range(L)],
        decode_keys=[valid & keep] * L,
        decode_position=llama_decode_position,
    )
    torch.testing.assert_close(out.logits[:, -1], ref_first, rtol=1e-9, atol=1e-9)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_holds_text_and_kept_tokens_only(kind):
    spec = MODELS[kind]
    model = spec["build"](dtype=torch.float32, seed=2)
    inputs = make_inputs(spec, model, seed=5)
    valid = inputs["attention_mask"].bool()
    visual = inputs["input_ids"] == model.config.image_token_id
    with torch.no_grad(), tp.patch(model, method="glimpse", keep_ratio=0.25, layer=K) as handle:
        out = model(**inputs)
        keep = handle.keep_mask
        stats = handle.stats
    n_text = (valid & ~visual).sum(1)
    for b, s in enumerate(stats):
        expect_kept = sum(-(-img["tokens"] // 4) for img in s["images"])  # ceil(0.25 n) per image
        assert s["visual_tokens"] == int(visual[b].sum()) == sum(img["tokens"] for img in s["images"])
        assert s["kept_tokens"] == expect_kept
        assert int(keep[b].sum()) == int(n_text[b]) + expect_kept
        assert s["kv_len"] == [int(n_text[b]) + expect_kept] * model.config.text_config.num_hidden_layers
        assert not bool((keep[b] & ~valid[b]).any())
        assert bool(keep[b][valid[b] & ~visual[b]].all())  # every text token stays
    longest = int(keep.sum(1).max())
    cache = hf.output_cache(out)
    for i in range(hf.cache_layers(cache)):
        keys, values = hf.layer_kv(cache, i)
        assert keys.shape[2] == longest and values.shape[2] == longest


def test_batch_matches_each_sample_alone(fam64):
    kind, spec, model = fam64
    samples = spec["samples"]()
    inputs = make_inputs(spec, model, seed=7, samples=samples)
    with torch.no_grad(), tp.patch(model, method="glimpse", keep_ratio=0.3, layer=K) as handle:
        batch_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        batch_stats = handle.stats
        for b in range(len(samples)):
            single = slice_sample(inputs, b, samples)
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)[:, single["input_ids"].shape[1]:]
            assert torch.equal(alone[0], batch_tokens[b]), f"sample {b}"
            assert handle.stats[0]["images"] == batch_stats[b]["images"]


def test_sample_without_image_keeps_everything(fam64):
    kind, spec, model = fam64
    first = spec["samples"]()[0]
    samples = [first, SampleSpec(images=(), prefix_len=6, suffix_len=6)]
    inputs = make_inputs(spec, model, seed=8, samples=samples)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad(), tp.patch(model, method="glimpse", keep_ratio=0.25, layer=K) as handle:
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        keep = handle.keep_mask
        stats = handle.stats
    assert stats[1]["visual_tokens"] == 0 and stats[1]["kept_tokens"] == 0
    assert torch.equal(keep[1], valid[1])
    assert stats[0]["kept_tokens"] == -(-stats[0]["visual_tokens"] // 4) < stats[0]["visual_tokens"]
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("with_mask", [False, True])
def test_decode_without_positions_continues_unpruned_numbering(fam64, with_mask):
    """A manual decode loop that passes no positions (with or without a mask) still gets the
    unpruned numbering, although HF's Llama would count the (pruned) cache."""
    kind, spec, model = fam64
    inputs = make_inputs(spec, model, seed=10, samples=spec["samples"]()[:1])
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method="glimpse", keep_ratio=0.25, layer=K) as handle:
        out = model(**inputs)
        keep = handle.keep_mask.clone()
        manual = [out.logits[:, -1].argmax(-1, keepdim=True)]
        cache, mask = hf.output_cache(out), inputs["attention_mask"]
        for _ in range(2):
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            extra = dict(attention_mask=mask) if with_mask else {}
            step = model(input_ids=manual[-1], **hf.cache_kwargs(model, cache), **extra)
            manual.append(step.logits[:, -1].argmax(-1, keepdim=True))
    valid = inputs["attention_mask"].bool()
    ref_tokens, _ = masked_generate(model, inputs, 3, prefill_keys=[valid if li <= K else keep for li in range(L)],
                                    decode_keys=[keep] * L, decode_position=llama_decode_position)
    assert torch.cat(manual, 1).tolist() == ref_tokens.tolist()


# -- the vision side --------------------------------------------------------------------------

def test_vision_features_line_up_with_image_tokens(fam64):
    """The captured feature of CLIP's ``vision_feature_layer``, put through the model's projector,
    is exactly the image embedding the model places at each image token (for LLaVA-NeXT: base tile,
    tiled + unpadded high-res grid, and a zero condition where the model puts ``image_newline``)."""
    kind, spec, model = fam64
    inputs = make_inputs(spec, model, seed=12)
    visual = inputs["input_ids"] == model.config.image_token_id
    emb = lm_inputs_embeds(model, inputs)[visual]  # [N, H], prompt order
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=K)
    n_hidden = model.config.vision_config.num_hidden_layers + 1
    assert handle.method.vision_layers()[0] == n_hidden + model.config.vision_feature_layer  # hidden_states index
    seen = spy_prefill(handle)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    feat = seen["feats"][0]
    assert all(f.shape == (visual.sum(), model.config.vision_config.hidden_size) for f in seen["feats"])
    with torch.no_grad():
        projected = model.model.multi_modal_projector(feat)
    if kind == "llava":
        newline = torch.zeros(len(emb), dtype=torch.bool)
        assert isinstance(seen["layout"], torch.Tensor) and seen["layout"].tolist() == [[4, 4]] * 3
    else:
        newline = (emb == model.model.image_newline).all(-1)
        assert int(newline.sum()) == 4 + 8 + 4  # one per high-res row (unpadded grids of 4, 8 and 4 rows)
        assert bool((feat[newline] == 0).all()) and bool((feat[~newline] != 0).any(-1).all())
    torch.testing.assert_close(projected[~newline], emb[~newline], rtol=1e-12, atol=1e-12)


def test_vision_layers_index_clip_hidden_states():
    """``vision_layers`` index CLIP's ``hidden_states`` (0 = embeddings), CLS dropped, as the public
    LLaVA GlimpsePrune code reads them."""
    model = tiny_llava(dtype=torch.float64, seed=4)
    inputs = llava_inputs(model, llava_samples(), seed=13)
    depth = model.config.vision_config.num_hidden_layers
    layers = [depth, depth - 1, 1, 0]
    cfg = GlimpseConfig(llm_hidden_size=64, llm_num_layers=6, llm_num_heads=4, vision_width=32,
                        vision_layers=layers, layer=K, glimpse_score="log_softmax")
    handle = tp.patch(model, method="glimpse", vip=GlimpseModules.random(cfg, seed=0), keep_ratio=0.5)
    seen = spy_prefill(handle)
    with torch.no_grad():
        model(**inputs)
        handle.remove()
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    assert len(hs) == depth + 1
    for f, i in zip(seen["feats"], layers):
        torch.testing.assert_close(f, hs[i][:, 1:].reshape(-1, hs[i].shape[-1]), rtol=0, atol=0)


def test_next_vip_positions_and_segments():
    """LLaVA-NeXT layout: base 4x4 grid, then the unpadded high-res grid row by row with a newline
    token at column ``cols`` after each row; one VIP segment per image; the VIP gets these positions."""
    model = tiny_llava_next(dtype=torch.float32, seed=5)
    samples = [SampleSpec(images=((60, 100), (100, 60)), prefix_len=2, suffix_len=2)]
    inputs = llava_next_inputs(model, samples, seed=14)
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=K)
    seen = spy_prefill(handle)
    got = {}
    hook = handle.method.modules.vip.register_forward_pre_hook(
        lambda m, args, kwargs: got.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    handle.remove()
    positions, lengths = seen["layout"]

    def expected(rows, cols):
        base = [(r, c) for r in range(4) for c in range(4)]
        return base + [(r, c) for r in range(rows) for c in range(cols + 1)]

    # (60, 100) -> 2x2 tiles = 8x8 tokens, rows 2..5 kept; (100, 60) -> 8x8, columns 2..5 kept.
    exp = [expected(4, 8), expected(8, 4)]
    assert lengths == [len(e) for e in exp] == [16 + 4 * 9, 16 + 8 * 5]
    assert positions.tolist() == [list(p) for e in exp for p in e]
    assert lengths == [llava_next_num_image_tokens(model.config, 60, 100),
                       llava_next_num_image_tokens(model.config, 100, 60)]
    assert torch.equal(got["positions"], positions) and got["lengths"] == lengths and got.get("grid_hw") is None
    # The newline tokens are exactly where the model puts image_newline.
    visual = inputs["input_ids"] == model.config.image_token_id
    emb = lm_inputs_embeds(model, inputs)[visual]
    is_newline = (emb == model.model.image_newline).all(-1)
    in_hires = torch.cat([torch.arange(n) >= 16 for n in lengths])
    last_col = torch.cat([torch.full((16,), -1), torch.full((4 * 9,), 8), torch.full((16,), -1),
                          torch.full((8 * 5,), 4)])
    assert torch.equal(is_newline, in_hires & (positions[:, 1] == last_col))


def test_next_token_counts_match_the_model():
    """Our processor-style token count = what the model's packing produces = the adapter's layout,
    over many image sizes (tile counts too)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model = tiny_llava_next(dtype=torch.float32, seed=6)
    cfg = model.config
    adapter = LlavaNextAdapter(model)
    sizes = [(h, w) for h in (17, 40, 56, 60, 83, 100, 130, 150, 201, 333) for w in (23, 56, 61, 100, 112, 177, 260)]
    feats = []
    for h, w in sizes:
        n = llava_next_tile_count(cfg, h, w)
        assert n == image_size_to_num_patches([h, w], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        feats.append(torch.zeros(n, 16, 1))
    _, lens = model.model.pack_image_features(feats, torch.tensor(sizes), "default", image_newline=torch.zeros(1))
    ours = [llava_next_num_image_tokens(cfg, h, w) for h, w in sizes]
    assert ours == lens.tolist()
    positions, lengths = adapter.layout(None, {"image_sizes": torch.tensor(sizes)})
    assert lengths == ours and positions.shape == (sum(ours), 2)
    assert best_resolution(60, 100, cfg.image_grid_pinpoints) == (112, 112)


# -- the glimpse attention map ----------------------------------------------------------------

def test_glimpse_attention_map_is_log_of_eager_attention(fam64):
    """LLaVA's map is log-softmax over the keys: it equals the log of the eager attention
    probabilities of an appended glimpse token at layer K of the unpatched model."""
    kind, spec, _ = fam64
    model = spec["build"](attn_implementation="eager", dtype=torch.float64, seed=5)
    inputs = make_inputs(spec, model, seed=11, samples=spec["samples"]()[1:])
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=K)
    assert handle.method.modules.config.glimpse_score == "log_softmax"
    mods = handle.method.modules
    seen = {}
    hook = mods.vip.register_forward_pre_hook(lambda m, args: seen.update(map=args[0].clone()))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    handle.remove()

    lm = model.model.language_model
    visual = inputs["input_ids"] == model.config.image_token_id
    S = inputs["input_ids"].shape[1]
    with torch.no_grad():
        gvec = mods.glimpse.all_layers(K)
        emb = torch.cat([lm_inputs_embeds(model, inputs), gvec[0].view(1, 1, -1)], 1)
        hooks = []
        for li in range(1, K + 1):
            def add(module, args, kwargs, li=li):
                h = args[0].clone()
                h[:, -1] += gvec[li]
                return (h,) + args[1:], kwargs
            hooks.append(lm.layers[li].register_forward_pre_hook(add, with_kwargs=True))
        try:
            out = lm(inputs_embeds=emb, position_ids=torch.arange(S + 1)[None], output_attentions=True,
                     use_cache=False)
        finally:
            for h in hooks:
                h.remove()
    probs = out.attentions[K][0, :, -1, :S]  # [heads, S]
    ref = probs.log().T[visual[0]]  # [N, heads]
    # HF's eager softmax runs in float32, which bounds the reference's precision.
    torch.testing.assert_close(seen["map"], ref, rtol=0, atol=1e-5)
    assert seen["map"].std() > 0.1


# -- patch / remove ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_bit_for_bit(kind):
    spec = MODELS[kind]
    model = spec["build"](dtype=torch.float32, seed=7)
    other = spec["build"](dtype=torch.float32, seed=7)
    inputs = make_inputs(spec, model, seed=13)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(**inputs).logits
        gen_before = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    # transformers installs its own output-capturing hooks (CLIP hidden states) on first use.
    hooks_before = {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()}
    with torch.no_grad():
        handle = tp.patch(model, method="glimpse", keep_ratio=0.2, layer=K)
        assert "get_image_features" in model.model.__dict__
        pruned = model(**inputs).logits
        assert torch.equal(other(**inputs).logits, before)  # only this instance is patched
        handle.remove()
        after = model(**inputs).logits
        gen_after = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert pruned.shape != before.shape
    assert torch.equal(before, after) and torch.equal(gen_before, gen_after)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    for module in model.modules():
        assert "forward" not in module.__dict__ and "get_image_features" not in module.__dict__
        assert (set(module._forward_hooks), set(module._forward_pre_hooks)) == hooks_before[id(module)]
    assert tp.get_handle(model) is None


# -- adapter settings -------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [LlavaAdapter, LlavaNextAdapter])
@pytest.mark.parametrize("n_layers, k", [(32, 21), (40, 26)])
def test_public_settings(cls, n_layers, k):
    """LLaVA-1.5-7B / 13B: K = 21 / 26, log-softmax map, CLIP-L/336 conditions from hidden_states
    23, 17, 11, 5 (1024 wide); image tokens found through config.image_token_id."""
    vision = SimpleNamespace(num_hidden_layers=24, hidden_size=1024, image_size=336, patch_size=14)
    config = SimpleNamespace(vision_config=vision, vision_feature_select_strategy="default", image_token_id=32000)
    lm = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=n_layers))
    tower = SimpleNamespace(encoder=SimpleNamespace(layers=[]))
    adapter = cls(SimpleNamespace(config=config, model=SimpleNamespace(language_model=lm, vision_tower=tower)))
    assert adapter.default_glimpse_layer() == k
    assert adapter.glimpse_score == "log_softmax"
    assert adapter.default_vision_layers() == [23, 17, 11, 5]
    assert adapter.vision_width() == 1024 and adapter.vision_depth() == 25
    assert adapter.tokens_per_side == 24 and adapter.image_token_id == 32000


@pytest.mark.parametrize("kind", KINDS)
def test_config_names_and_unsupported_strategy(kind):
    model = MODELS[kind]["build"](dtype=torch.float32, seed=8)
    assert model.config.image_token_id == model.config.image_token_index == 3
    handle = tp.patch(model, method="glimpse", layer=K)
    assert handle.method.modules.config.vision_layers == [7, 5, 3, 1]
    assert handle.method.modules.config.vision_width == 32
    handle.remove()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy"):
        tp.patch(model, method="glimpse", layer=K)
    assert tp.get_handle(model) is None
