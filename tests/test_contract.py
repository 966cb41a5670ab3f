"""The contract every method keeps on every model family, from one table of each.

Rows come from tests/families.py (families) and the method registry (``METHODS`` below); the oracle is the *unpatched*
HF model with per-layer attention masks and skip-row hooks (tests/reference_model.py), which
shares none of the package's compaction, cache or position code. What each method must reproduce
is read off the patch handle after the prefill: which prompt tokens survived layer K (methods
that prune once) or which tokens each layer processed (ALVTS).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import token_prune as tp
from families import FAMILIES
from reference_model import masked_generate
from token_prune import hf
from token_prune.methods import METHODS as REGISTERED
from token_prune.methods.base import PruneAfterLayer
from token_prune.models import adapter_for, supported_models
from token_prune.tiny import SampleSpec, make_inputs, select_sample

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

def _pruned_options(cls) -> dict:
    """A pruned run of any registered method: a quarter of each image, pruning from layer 2."""
    params = inspect.signature(cls.__init__).parameters
    opts = {"keep_ratio": 0.25}
    if "layer" in params:
        opts["layer"] = 2
    if "start_layer" in params:
        opts["start_layer"] = 0
    return opts


#: id -> (method, options of a pruned run): every registered method (a new one is covered by
#: registering it), plus the variants that change the contract ("layer" is where pruning starts;
#: ALVTS: start_layer)
METHODS = {name: (name, _pruned_options(cls)) for name, cls in REGISTERED.items()}
METHODS["alvts-drop"] = ("alvts", dict(METHODS["alvts"][1], skipped="drop"))
METHODS["random"] = ("random", dict(METHODS["random"][1], seed=5))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEPS = 5


def test_every_supported_family_has_a_row():
    assert sorted(FAMILIES) == supported_models()


#: (family, prompts, device): every family on its image prompts, and the families that take
#: videos once more on prompts with videos (mixed with images)
ROWS = [(f, m, d) for f in sorted(FAMILIES) for m in ("image", "video")
        if m == "image" or FAMILIES[f].video_samples is not None for d in DEVICES]


@pytest.fixture(scope="module", params=ROWS, ids=lambda p: f"{p[0]}-{p[1]}-{p[2]}")
def fam(request):
    """(family row, float64 model): on a GPU the methods run their CUDA kernels, same oracle."""
    name, mode, device = request.param
    row = FAMILIES[name] if mode == "image" else FAMILIES[name].with_videos()
    return row, row.build(torch.float64, seed=11).to(device)


def _method(mid, **override):
    method, opts = METHODS[mid]
    opts = dict(opts, **override)
    return method, opts


def _with_start(method, opts, layer):
    key = "start_layer" if method == "alvts" else "layer"
    return dict(opts, **{key: layer})


def oracle_rules(handle, inputs, num_layers):
    """(prefill_keys, decode_keys, skip_rows) per layer for :func:`masked_generate`, from what the
    patched prefill reports it kept or processed."""
    valid = inputs["attention_mask"].bool()
    method = handle.method
    if isinstance(method, PruneAfterLayer):
        keep = handle.keep_mask & valid
        K = method.layer
        prefill = [valid if li <= K else keep for li in range(num_layers)]
        # A method that compacts the caches of layers 0..K decodes against kept tokens everywhere.
        decode = [keep] * num_layers if method.prunes_cache else prefill
        return prefill, decode, None
    processed = [p & valid for p in method.last_processed]
    keys = processed if method.skipped == "drop" else [valid] * num_layers
    return keys, keys, [valid & ~p for p in processed]


def _generate(model, inputs, steps=STEPS):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def _generate_with_logits(model, inputs, steps=STEPS):
    """(new tokens [B, steps], raw logits of the first new token [B, V])."""
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], out.logits[0]


def _oracle(row, model, inputs, handle_rules, steps=STEPS):
    prefill, decode, skip = handle_rules
    return masked_generate(model, inputs, steps, prefill, decode, skip_rows=skip,
                           decode_position=row.decode_position, prefill_position=row.prefill_position)


# -- keep everything: the unpatched model -----------------------------------------------------------

@pytest.mark.parametrize("mid", sorted(METHODS))
def test_keep_all_equals_unpatched(fam, mid):
    row, model = fam
    method, opts = _method(mid, keep_ratio=1.0)
    inputs = row.inputs(model, seed=1)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens = _generate(model, inputs)
        with tp.patch(model, method=method, **opts) as handle:
            out = model(**inputs).logits
            tokens = _generate(model, inputs)
            assert all(s["visual_tokens"] > 0 for s in handle.stats)
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-12, atol=1e-12)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("mid", ["glimpse", "fastv", "alvts"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_all_equals_unpatched_in_float32(mid, attn, family_name="qwen2_5_vl"):
    """Every attention implementation of the CPU, float32 (the common inference dtype)."""
    for name in sorted(FAMILIES):
        row = FAMILIES[name]
        model = row.build(torch.float32, seed=3, attn=attn)
        method, opts = _method(mid, keep_ratio=1.0)
        inputs = row.inputs(model, seed=2)
        valid = inputs["attention_mask"].bool()
        with torch.no_grad():
            ref = model(**inputs).logits
            ref_tokens = _generate(model, inputs)
            with tp.patch(model, method=method, **opts):
                out = model(**inputs).logits
                tokens = _generate(model, inputs)
        torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens, ref_tokens), name


@pytest.mark.parametrize("mid", ["glimpse", "fastv", "alvts"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_keep_all_low_precision(mid, dtype):
    """bf16/fp16: the patched computation is the same up to rounding (reductions over a different
    number of rows, e.g. the glimpse token's extra column) and generation runs."""
    for name in sorted(FAMILIES):
        row = FAMILIES[name]
        model = row.build(dtype, seed=4)
        method, opts = _method(mid, keep_ratio=1.0)
        inputs = row.inputs(model, seed=3)
        valid = inputs["attention_mask"].bool()
        with torch.no_grad():
            ref = model(**inputs).logits.float()
            with tp.patch(model, method=method, **opts):
                out = model(**inputs).logits.float()
                gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert gen.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 3)
        err = (out[valid] - ref[valid]).abs().max().item()
        assert err < 0.1 * ref[valid].abs().max().item(), name


@pytest.mark.parametrize("mid", ["glimpse", "fastv", "random", "alvts"])
@pytest.mark.parametrize("layer", [0, 3, 5])
def test_keep_all_at_any_layer(fam, mid, layer):
    row, model = fam
    method, opts = _method(mid, keep_ratio=1.0)
    if layer == model.config.text_config.num_hidden_layers - 1 and not getattr(REGISTERED[method], "prunes_cache", True):
        layer -= 1  # pruning after the last layer is refused where it would prune nothing
    inputs = row.inputs(model, seed=4)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        with tp.patch(model, method=method, **_with_start(method, opts, layer)):
            out = model(**inputs).logits
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-12, atol=1e-12)


# -- pruning: the masked oracle ---------------------------------------------------------------------

@pytest.mark.parametrize("mid", sorted(METHODS))
@pytest.mark.parametrize("layer", [0, 2, 4])
def test_pruned_generate_equals_masked_oracle(fam, mid, layer):
    row, model = fam
    method, opts = _method(mid)
    inputs = row.inputs(model, seed=5)
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method=method, **_with_start(method, opts, layer)) as handle:
        tokens, first = _generate_with_logits(model, inputs)
        rules = oracle_rules(handle, inputs, L)  # of generate's prefill (random draws anew each call)
        stats = handle.stats
    ref_tokens, ref_first = _oracle(row, model, inputs, rules)
    # generate hands its logits back in float32
    torch.testing.assert_close(first, ref_first.to(first.dtype), rtol=1e-6, atol=1e-6)
    assert torch.equal(tokens, ref_tokens)
    for b, s in enumerate(stats):  # the handle reports what was really kept
        assert s["kv_len"] == [int(rules[1][li][b].sum()) for li in range(L)]


@pytest.mark.parametrize("mid", sorted(METHODS))
def test_kept_counts_and_cache_contents(fam, mid):
    """Each image keeps (or each layer processes) exactly ceil(r * n) of its tokens, every text
    token stays, and every layer's KV cache is exactly as long as what that layer kept."""
    row, model = fam
    method, opts = _method(mid)
    inputs = row.inputs(model, seed=6)
    valid = inputs["attention_mask"].bool()
    kinds = adapter_for(model).visual_kinds(input_ids=inputs["input_ids"])
    visual = kinds > 0
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        out = model(**inputs)
        stats = handle.stats
        _, decode, _ = oracle_rules(handle, inputs, L)
        keep = handle.keep_mask
    cache = hf.output_cache(out)
    for b, s in enumerate(stats):
        # Each image and each video (over all its frames) keeps its own quarter.
        items = s["images"] + s["videos"]
        assert [i["tokens"] for i in s["images"]] == _run_lengths(kinds[b], 1)
        assert sum(i["tokens"] for i in s["videos"]) == int((kinds[b] == 2).sum())
        want = sum(math.ceil(0.25 * item["tokens"]) for item in items)
        assert s["visual_tokens"] == int(visual[b].sum())
        if "visual_processed" in s:  # ALVTS: per layer, from start_layer on
            assert all(p == want for p in s["visual_processed"][opts["start_layer"]:])
        else:
            assert s["kept_tokens"] == want
            assert int((keep[b] & visual[b]).sum()) == want
        assert bool(keep[b][valid[b] & ~visual[b]].all())  # every text token stays
        assert not bool((keep[b] & ~valid[b]).any())
    for li in range(L):
        assert hf.layer_length(cache, li) == int(decode[li].sum(1).max()), li
        assert [s["kv_len"][li] for s in stats] == decode[li].sum(1).tolist()


def _run_lengths(kinds_row: torch.Tensor, kind: int) -> list[int]:
    """Lengths of the runs of ``kind`` in one row (each image is one run)."""
    out, run = [], 0
    for k in kinds_row.tolist() + [0]:
        if k == kind:
            run += 1
        elif run:
            out.append(run)
            run = 0
    return out


@pytest.mark.parametrize("mid", sorted(METHODS))
def test_batch_equals_each_sample_alone(fam, mid):
    if mid == "random":
        pytest.skip("random pruning draws anew on every call, by design: a batch and its samples differ")
    row, model = fam
    method, opts = _method(mid)
    samples = row.samples()
    inputs = row.inputs(model, samples, seed=7)
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        batch = _generate(model, inputs)
        batch_stats = handle.stats
        for b in range(len(samples)):
            alone = select_sample(model, inputs, b)
            assert torch.equal(_generate(model, alone)[0], batch[b]), b
            assert handle.stats[0]["visual_tokens"] == batch_stats[b]["visual_tokens"]


@pytest.mark.parametrize("mid", sorted(METHODS))
def test_sample_without_an_image(fam, mid):
    """A text-only sample next to one with an image: nothing of it is pruned, and the batch still
    equals the oracle."""
    row, model = fam
    method, opts = _method(mid)
    samples = [SampleSpec(images=(row.image,)), SampleSpec(images=(), prefix_len=6, suffix_len=6)]
    inputs = make_inputs(model, samples, seed=8)
    valid = inputs["attention_mask"].bool()
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        tokens = _generate(model, inputs)
        stats = handle.stats
        rules = oracle_rules(handle, inputs, L)  # of generate's own prefill
        assert stats[1]["visual_tokens"] == 0
        assert torch.equal(handle.keep_mask[1], valid[1])
    assert torch.equal(tokens, _oracle(row, model, inputs, rules)[0])


@pytest.mark.parametrize("mid", sorted(METHODS))
def test_text_only_batch_is_untouched(fam, mid):
    row, model = fam
    method, opts = _method(mid)
    inputs = make_inputs(model, [SampleSpec(images=(), prefix_len=7, suffix_len=3)], seed=9)
    with torch.no_grad():
        ref = _generate(model, inputs)
        with tp.patch(model, method=method, **opts) as handle:
            out = _generate(model, inputs)
            assert handle.stats == []
    assert torch.equal(out, ref)


def _unpatched_decodes_with_a_mask(model, inputs) -> bool:
    # Qwen2.5-VL derives positions for every column of a 2D mask outside generate (HF's own limit).
    with torch.no_grad():
        out = model(**inputs)
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(1, 1)], 1)
        try:
            model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask,
                  **hf.cache_kwargs(model, hf.output_cache(out)))
        except RuntimeError:
            return False
    return True


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("mid", sorted(METHODS))
def test_manual_decode_continues_the_unpruned_numbering(fam, mid, with_mask):
    """A decode loop by hand that passes no positions (and, optionally, no mask) numbers the new
    tokens after the unpruned prompt, although the cache is shorter."""
    row, model = fam
    method, opts = _method(mid)
    inputs = make_inputs(model, [SampleSpec(images=(row.image,))], seed=10)  # one sample: no padding
    L = model.config.text_config.num_hidden_layers
    if with_mask and not _unpatched_decodes_with_a_mask(model, inputs):
        pytest.skip("the unpatched model cannot decode by hand with a 2D mask and no positions either")
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        out = model(**inputs)
        rules = oracle_rules(handle, inputs, L)
        cache, mask = hf.output_cache(out), inputs["attention_mask"]
        manual = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(2):
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            extra = dict(attention_mask=mask) if with_mask else {}
            step = model(input_ids=manual[-1], **hf.cache_kwargs(model, cache), **extra)
            manual.append(step.logits[:, -1].argmax(-1, keepdim=True))
    ref, _ = _oracle(row, model, inputs, rules, steps=3)
    assert torch.cat(manual, 1)[0].tolist() == ref[0].tolist()


@pytest.mark.parametrize("mid", sorted(METHODS))
def test_remove_restores_bit_for_bit(fam, mid):
    row, model = fam
    method, opts = _method(mid)
    inputs = row.inputs(model, seed=12)
    # transformers registers output-capturing hooks of its own on some towers: compare with those.
    hooks = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]  # noqa: E731
    with torch.no_grad():
        before = model(**inputs).logits
        hooks_before = hooks()
        handle = tp.patch(model, method=method, **opts)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        handle.remove()
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all("get_image_features" not in m.__dict__ for m in model.modules())
    assert hooks() == hooks_before
    assert tp.get_handle(model) is None


@pytest.mark.parametrize("mid", sorted(METHODS))
@pytest.mark.parametrize("bad, exc, match", [
    (dict(keep_ratio=0), ValueError, r"keep_ratio must be in \(0, 1\]"),
    (dict(keep_ratio=1.5), ValueError, r"keep_ratio must be in \(0, 1\]"),
    (dict(keep_ratio="half"), TypeError, "keep_ratio must be a number"),
    (dict(layer=99), ValueError, r"must be in \[0, 5\]"),
    (dict(no_such_option=1), TypeError, "no_such_option"),
])
def test_bad_options_raise_and_leave_the_model_unpatched(fam, mid, bad, exc, match):
    row, model = fam
    method, opts = _method(mid)
    if "layer" in bad:
        bad = _with_start(method, {}, bad["layer"])
    with pytest.raises(exc, match=match):
        tp.patch(model, method=method, **dict(opts, **bad))
    assert tp.get_handle(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_double_patch_raises(fam):
    _, model = fam
    with tp.patch(model, method="fastv"):
        with pytest.raises(ValueError, match="already patched with method 'fastv'"):
            tp.patch(model, method="alvts")
    tp.patch(model, method="alvts").remove()  # fine once removed
