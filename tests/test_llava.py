"""What is particular to the LLaVA-1.5 and LLaVA-NeXT families: CLIP features lined up with the
image tokens (checked against what the model itself feeds its language model), the anyres layout
and token counts of LLaVA-NeXT, the log-softmax glimpse map, the published K. The contract every
family keeps is tests/test_contract.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import token_prune as tp
from token_prune import hf
from token_prune.models.llava import LlavaAdapter, LlavaNextAdapter
from token_prune.tiny import SampleSpec, tiny_model
from token_prune.tiny import make_inputs as build_inputs
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


def tiny_llava(**kw):
    return tiny_model("llava", **kw)


def tiny_llava_next(**kw):
    return tiny_model("llava_next", **kw)


MODELS = {
    "llava": dict(build=tiny_llava, inputs=build_inputs, samples=llava_samples),
    "llava_next": dict(build=tiny_llava_next, inputs=build_inputs, samples=next_samples),
}
KINDS = sorted(MODELS)


@pytest.fixture(scope="module", params=KINDS)
def fam64(request):
    """(kind, spec, float64 model) for each family."""
    spec = MODELS[request.param]
    return request.param, spec, spec["build"](dtype=torch.float64, seed=1)


def make_inputs(spec, model, seed, samples=None):
    return spec["inputs"](model, samples if samples is not None else spec["samples"](), seed=seed)


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
    inputs = build_inputs(model, llava_samples(), seed=13)
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
    inputs = build_inputs(model, samples, seed=14)
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
    assert lengths == [LlavaNextAdapter.image_tokens(model.config, 60, 100),
                       LlavaNextAdapter.image_tokens(model.config, 100, 60)]
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
        n = LlavaNextAdapter.tile_count(cfg, h, w)
        assert n == image_size_to_num_patches([h, w], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        feats.append(torch.zeros(n, 16, 1))
    _, lens = model.model.pack_image_features(feats, torch.tensor(sizes), "default", image_newline=torch.zeros(1))
    ours = [LlavaNextAdapter.image_tokens(cfg, h, w) for h, w in sizes]
    assert ours == lens.tolist()
    positions, lengths = adapter.layout(None, {"image_sizes": torch.tensor(sizes)})
    assert lengths == ours and positions.shape == (sum(ours), 2)
    assert hf.select_best_resolution((60, 100), cfg.image_grid_pinpoints) == (112, 112)


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
