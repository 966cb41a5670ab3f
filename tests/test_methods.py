"""What is particular to FastV and ALVTS, on every family of tests/families.py: FastV's score is
the last token's attention; ALVTS's selection, its two readings of "skip", its fused and low-rank
scores, against the masked unpatched-model oracle of ``reference_model``. The contract every method
keeps is tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch

import token_prune as tp
from token_prune import hf, tiny
from families import FAMILIES, pruning_layer
from reference_model import masked_generate

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")


class _Spec(dict):
    """A family row in the shape these tests were written against."""


MODELS = {
    name: _Spec(build=lambda dtype, seed, attn="sdpa", row=row: row.build(dtype, seed=seed, attn=attn),
                inputs=tiny.make_inputs, samples=row.samples, decode_position=row.decode_position,
                prefill_position=row.prefill_position)
    for name, row in FAMILIES.items()
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=[(m, d) for m in sorted(MODELS) for d in DEVICES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def family(request):
    """(name, spec, float64 model) on every available device: on a GPU the methods use the
    CUDA kernels, and the same oracle checks them."""
    name, device = request.param
    spec = MODELS[name]
    model = spec["build"](torch.float64, 21).to(device)
    return name, spec, model


def _inputs(spec, model, seed):
    return spec["inputs"](model, spec["samples"](), seed=seed)


def test_fastv_scores_are_last_token_attention(family):
    """FastV keeps the visual tokens the last prompt token attends to most at layer K
    (read from the unpatched model's eager attention probabilities, head-averaged)."""
    name, spec, _ = family
    model = spec["build"](torch.float64, 22, attn="eager").to(family[2].device)
    inputs = spec["inputs"](model, spec["samples"]()[:1], seed=3)
    K = pruning_layer(model, "fastv", 2)  # an attention layer (hybrid decoders report only those)
    which = hf.attention_layers(model.config.text_config).index(K)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[which][0].mean(0)[-1]  # [S]
        with tp.patch(model, method="fastv", layer=K, keep_ratio=0.25) as h:
            model(**inputs)
            keep = h.keep_mask[0]
    visual = inputs["input_ids"][0] == model.config.image_token_id
    n = int(visual.sum())
    k = -(-n // 4)
    top = torch.topk(att[visual], k).indices
    assert set(top.tolist()) == set(torch.nonzero(keep[visual]).flatten().tolist())


@pytest.mark.parametrize("start_layer, skipped, form", [
    (0, "drop", "group_rope"), (0, "context", "group_rope"), (3, "drop", "group_rope"), (3, "context", "group_rope"),
    (0, "context", "full_width"), (3, "drop", "full_width")])
def test_alvts_matches_masked_reference(family, start_layer, skipped, form):
    """ALVTS == the unpatched model whose skipped rows pass each layer unchanged and whose
    layers see only the processed tokens ("drop") or every token ("context"), for the
    per-group selector (default) and the full-width one."""
    _, spec, model = family
    inputs = _inputs(spec, model, 4)
    L = model.config.text_config.num_hidden_layers
    valid = inputs["attention_mask"].bool()
    extra = {}
    if spec.get("prefill_position"):
        extra["position_ids"] = spec["prefill_position"](model, inputs["attention_mask"])
    if form == "group_rope" and _head_norms(model):
        with pytest.raises(ValueError, match="normalises them per head"):
            tp.patch(model, method="alvts", selector_form=form)
        form = None  # the family's default form (full_width there) must still match the oracle
    with torch.no_grad(), tp.patch(model, method="alvts", keep_ratio=0.25, start_layer=start_layer,
                                   skipped=skipped, selector_form=form) as h:
        assert h.options["selector_form"] == (form or "full_width")
        out = model(**inputs, **extra)
        processed = [p.clone() for p in h.method.last_processed]
        stats = h.stats
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    skip = [valid & ~p for p in processed]
    keys = processed if skipped == "drop" else [valid] * L
    ref, first = masked_generate(model, inputs, 5, keys, keys, skip_rows=skip,
                                 decode_position=spec["decode_position"],
                                 prefill_position=spec.get("prefill_position"))
    torch.testing.assert_close(out.logits[:, -1], first, rtol=1e-9, atol=1e-9)
    assert torch.equal(tokens, ref)
    visual = inputs["input_ids"] == model.config.image_token_id
    for li in range(L):
        # every real text token goes through every layer; visual tokens only when selected
        assert bool(processed[li][valid & ~visual].all())
        n_sel = (processed[li] & visual).sum(1)
        if li < start_layer:
            assert torch.equal(n_sel, visual.sum(1))
        else:
            for b, s in enumerate(stats):
                assert int(n_sel[b]) == sum(-(-img // 4) for img in _image_sizes(inputs, model, b))
    linear = set(range(L)) - set(hf.attention_layers(model.config.text_config))
    for b, s in enumerate(stats):
        assert s["kv_len"] == [0 if li in linear else int(keys[li][b].sum()) for li in range(L)]
        if linear:  # a linear layer's state scanned what the layer saw
            assert s["recurrent_tokens"] == [int(keys[li][b].sum()) if li in linear else 0 for li in range(L)]
    # selections differ between layers somewhere: it is layer-wise, not a fixed subset. (Not asked of
    # the tiny hybrid decoder from layer 3: its layers 3-5 are scored by two attention layers' q/k
    # with a 3-token budget per image and happen to agree; from layer 0 they differ.)
    if not (linear and start_layer > 0):
        assert any(not torch.equal(processed[start_layer], p) for p in processed[start_layer + 1:])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_alvts_context_mode_matches_reference_with_each_attention(attn):
    """The context reading runs its own attention call (a row subset against all keys): check it
    under eager (additive float mask) and SDPA (boolean mask), single sample, no padding."""
    spec = MODELS["qwen2_5_vl"]
    model = spec["build"](torch.float64, 5, attn=attn)
    inputs = spec["inputs"](model, spec["samples"]()[:1], seed=9)
    valid = inputs["attention_mask"].bool()
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method="alvts", keep_ratio=0.2, skipped="context") as h:
        out = model(**inputs)
        processed = [p.clone() for p in h.method.last_processed]
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    ref, first = masked_generate(model, inputs, 4, [valid] * L, [valid] * L,
                                 skip_rows=[valid & ~p for p in processed], decode_position=spec["decode_position"])
    torch.testing.assert_close(out.logits[:, -1], first, rtol=1e-9, atol=1e-9)
    assert torch.equal(tokens, ref)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_selection_scores_match_the_chunked_softmax(dtype, tol):
    """The SDPA value-gradient score equals the explicit chunked softmax (float64/float32 to
    rounding; bf16 within its P rounding), with GQA, left padding and inference mode."""
    from token_prune.methods.alvts import selection_scores

    g = torch.Generator().manual_seed(4)
    B, h, kvh, S, d = 3, 6, 2, 41, 16
    q = (torch.randn(B, h, S, d, generator=g) * 1.5).to(dtype)
    k = (torch.randn(B, kvh, S, d, generator=g) * 1.5).to(dtype)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :6] = False
    valid[2, :1] = False
    visual = torch.zeros(B, S, dtype=torch.bool)
    visual[:, 9:33] = True
    want = selection_scores(q.double(), k.double(), valid, visual, impl="chunked", chunk=8)
    with torch.inference_mode():
        got = selection_scores(q, k, valid, visual, impl="sdpa")
    m = visual & valid
    torch.testing.assert_close(got[m].double(), want[m], rtol=tol, atol=0)
    no_pad = torch.ones_like(valid)
    for impl in ("sdpa", "chunked"):  # valid=None: no padding, same scores as an all-True mask
        torch.testing.assert_close(selection_scores(q, k, None, visual, impl=impl),
                                   selection_scores(q, k, no_pad, visual, impl=impl), rtol=tol, atol=0)
    torch.testing.assert_close(selection_scores(q, k, no_pad, visual, impl="sdpa")[visual].double(),
                               selection_scores(q.double(), k.double(), no_pad, visual, impl="chunked")[visual],
                               rtol=tol, atol=0)


@pytest.mark.parametrize("form", ["group_rope", "full_width"])
def test_alvts_scores_with_the_op_and_the_reference_select_the_same(form):
    """The whole patched model with the score from the fused op (the default) and from the plain
    PyTorch reference (kernels off) processes the same tokens and equals the masked oracle."""
    from token_prune import _ops

    spec = MODELS["llava"]
    model = spec["build"](torch.float64, 8)
    inputs = spec["inputs"](model, spec["samples"](), seed=2)
    valid = inputs["attention_mask"].bool()
    L = model.config.text_config.num_hidden_layers
    pos = spec["prefill_position"](model, inputs["attention_mask"])
    with torch.no_grad(), tp.patch(model, method="alvts", keep_ratio=0.3, selector_form=form) as h:
        out = model(**inputs, position_ids=pos)
        processed = [p.clone() for p in h.method.last_processed]
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    with torch.no_grad(), _ops.use_kernels(False), tp.patch(model, method="alvts", keep_ratio=0.3,
                                                            selector_form=form) as h:
        model(**inputs, position_ids=pos)
        assert all(torch.equal(a, b) for a, b in zip(processed, h.method.last_processed))
    ref, first = masked_generate(model, inputs, 4, [valid] * L, [valid] * L,
                                 skip_rows=[valid & ~p for p in processed], decode_position=spec["decode_position"],
                                 prefill_position=spec["prefill_position"])
    torch.testing.assert_close(out.logits[:, -1], first, rtol=1e-9, atol=1e-9)
    assert torch.equal(tokens, ref)


def _head_norms(model) -> bool:
    from token_prune.methods.alvts_selector import has_head_norms
    from token_prune.models import adapter_for

    return has_head_norms(adapter_for(model))


def _image_sizes(inputs, model, b):
    ids = inputs["input_ids"][b].tolist()
    sizes, run = [], 0
    for t in ids + [-1]:
        if t == model.config.image_token_id:
            run += 1
        elif run:
            sizes.append(run)
            run = 0
    return sizes


def test_full_width_score_matches_full_rank_oracle_at_full_rank(family):
    """With rank = hidden size the SVD factors are exact, so the full-width selector reproduces
    the oracle score computed from the unpatched model's eager attention probabilities."""
    from token_prune.alvts_calibration import layer_inputs as _layer_inputs
    from token_prune.methods.alvts import FullWidthSelector, selection_scores
    from token_prune.models import adapter_for

    name, spec, _ = family
    model = spec["build"](torch.float64, 23, attn="eager").to(family[2].device)
    inputs = spec["inputs"](model, spec["samples"]()[:1], seed=5)
    H = model.config.text_config.hidden_size
    layer = 1
    adapter = adapter_for(model)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        x, (cos, sin) = _layer_inputs(model, adapter, inputs, layer)
        selector = FullWidthSelector.from_weights(adapter, H, [layer])
        q, k = selector.qk(adapter, layer, x, cos, sin)
        visual = inputs["input_ids"] == model.config.image_token_id
        valid = inputs["attention_mask"].bool()
        got = selection_scores(q, k, valid, visual, chunk=7)
    # HF reports attention probabilities for the attention layers only (hybrid decoders)
    A = out.attentions[hf.attention_layers(model.config.text_config).index(layer)][0].mean(0)  # [S, S]
    vis, txt = visual[0], ~visual[0]
    oracle = A[vis].mean(0) * A[txt].mean(0)
    torch.testing.assert_close(got[0][vis], oracle[vis], rtol=1e-5, atol=1e-9)


def _group_summed_score(q, k, valid, visual, d):
    """ALVTS's score with one softmax per KV group over the mean of its heads' logits, as an
    explicit float64 [S, S] softmax per sample (q [B, heads, S, d], k [B, kv_heads, S, d])."""
    B, h, S, _ = q.shape
    g = k.shape[1]
    logits = torch.einsum("bgrqd,bgkd->bgqk", q.double().view(B, g, h // g, S, d), k.double()) / (h // g) / d ** 0.5
    pos = torch.arange(S)
    allowed = valid[:, None, None, :] & (pos[None, :] <= pos[:, None])[None, None]
    probs = torch.nan_to_num(logits.masked_fill(~allowed, float("-inf")).softmax(-1)).mean(1)  # [B, S, S]
    vis_q, txt_q = (visual & valid).double(), (~visual & valid).double()
    from_vis = (probs * vis_q[:, :, None]).sum(1) / vis_q.sum(1, keepdim=True)
    from_txt = (probs * txt_q[:, :, None]).sum(1) / txt_q.sum(1, keepdim=True)
    return from_vis * from_txt


def test_group_rope_score_at_full_rank_is_the_exact_group_summed_score(family):
    """At rank kv_heads * head_dim the per-group rotary-aware map is exact: its score (rank-space
    projections, rotary at each component's frequency, the fused op) equals the score of the
    layer's own q/k summed over each group's heads (explicit float64 softmax), on every layer,
    with padding, M-RoPE or 1D rotary. Below full rank it is not exact but still close."""
    from token_prune.alvts_calibration import layer_inputs as _layer_inputs
    from token_prune.methods.alvts_selector import GroupRopeSelector
    from token_prune.models import adapter_for

    name, spec, model = family
    inputs = _inputs(spec, model, 6)
    adapter = adapter_for(model)
    full = adapter.num_kv_heads * adapter.head_dim
    if _head_norms(model):  # q/k normalised per head: no bilinear map to factor, the form refuses
        with pytest.raises(ValueError, match="normalises them per head"):
            GroupRopeSelector.from_weights(adapter, full, [0])
        return
    visual = inputs["input_ids"] == model.config.image_token_id
    valid = inputs["attention_mask"].bool()
    m = visual & valid
    for layer in range(adapter.num_layers):
        with torch.no_grad():
            x, (cos, sin) = _layer_inputs(model, adapter, inputs, layer)
            q, k = adapter.project_qk(layer, x, cos, sin)
            want = _group_summed_score(q.cpu(), k.cpu(), valid.cpu(), visual.cpu(), adapter.head_dim)
            exact = GroupRopeSelector.from_weights(adapter, full, [layer])
            got = exact.scores(adapter, layer, x, cos, sin, valid, visual).cpu()
            half = GroupRopeSelector.from_weights(adapter, full // 2, [layer])
            approx = half.scores(adapter, layer, x, cos, sin, valid, visual).cpu()
        torch.testing.assert_close(got[m.cpu()], want[m.cpu()], rtol=1e-10, atol=0)
        assert not torch.allclose(approx[m.cpu()], want[m.cpu()], rtol=1e-6, atol=0)
        rel = ((approx - want)[m.cpu()] ** 2).mean() / (want[m.cpu()] ** 2).mean()
        assert rel < 1.0


@pytest.mark.parametrize("method, kwargs, exc, match", [
    ("fastv", dict(keep_ratio=0), ValueError, r"keep_ratio must be in \(0, 1\]"),
    ("fastv", dict(layer=99), ValueError, r"layer must be in \[0, 5\]"),
    ("fastv", dict(threshold=0.5), TypeError, "threshold"),
    ("alvts", dict(keep_ratio=2.0), ValueError, r"keep_ratio must be in \(0, 1\]"),
    ("alvts", dict(start_layer=6), ValueError, r"start_layer must be in \[0, 5\]"),
    ("alvts", dict(rank=0), ValueError, "rank must be a positive int"),
    ("alvts", dict(selector=3.5), TypeError, "selector must be a path"),
    ("alvts", dict(selector="/nonexistent/dir"), FileNotFoundError, "selector.json"),
    ("alvts", dict(skipped="nothing"), ValueError, "skipped must be one of"),
    ("alvts", dict(selector_form="shared"), ValueError, "selector_form must be one of"),
    ("alvts", dict(selector_form=1), TypeError, "selector_form must be a string"),
    ("alvts", dict(rank=3, selector_form="group_rope"), ValueError,
     r"multiple of 2 \* kv_heads = \d+|normalises them per head"),
    ("alvts", dict(rank=10_000, selector_form="group_rope"), ValueError,
     r"up to kv_heads \* head_dim = \d+ \(the exact group score\)|normalises them per head"),
])
def test_bad_options(family, method, kwargs, exc, match):
    _, _, model = family
    with pytest.raises(exc, match=match):
        tp.patch(model, method=method, **kwargs)
    assert tp.get_handle(model) is None
