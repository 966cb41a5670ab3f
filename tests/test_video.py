"""Video inputs on the families that take them: video tokens are visual tokens for every method.

The contract suite (tests/test_contract.py) runs every row on prompts that mix images and videos;
these tests check what is particular to videos: a prompt of a video alone, the keep rules per
video (not per frame), the VIP's segments (one per temporal group, in prompt order), the per-item
stats, rotary positions of kept video tokens never renumbered, and beam search.
"""

from __future__ import annotations

import math

import pytest
import torch
from families import FAMILIES
from reference_model import masked_generate, qwen_decode_position
from test_contract import oracle_rules

import token_prune as tp
from token_prune.models import adapter_class
from token_prune.tiny import SampleSpec, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")
VIDEO_FAMILIES = sorted(name for name, row in FAMILIES.items() if row.video_samples is not None)
# Families whose videos are M-RoPE temporal groups (Qwen's layout: frames of different counts in
# one batch, the VIP's per-group grid_hw, per-sample (t, row, col) rotary tables). LLaVA-OneVision's
# pooled frames have their own tests in tests/test_llava_onevision.py.
MROPE_VIDEO_FAMILIES = [n for n in VIDEO_FAMILIES if FAMILIES[n].decode_position is qwen_decode_position]
STEPS = 4


def _build(name):
    row = FAMILIES[name]
    return row, row.build(torch.float64, seed=31)


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def fam(request):
    return _build(request.param)


@pytest.fixture(scope="module", params=MROPE_VIDEO_FAMILIES)
def mrope_fam(request):
    return _build(request.param)


def test_every_family_that_takes_videos_has_video_prompts():
    assert VIDEO_FAMILIES == sorted(n for n in FAMILIES if adapter_class(n).supports_video)


def _video_alone(model, seed=0, frames=6, size=(64, 32)):
    return make_inputs(model, [SampleSpec(images=(), videos=((frames, *size),))], seed=seed)


@pytest.mark.parametrize("method", ["glimpse", "fastv", "alvts", "random"])
def test_a_video_alone_keep_all_and_pruned(fam, method):
    """A prompt of one video (3 temporal groups): keep-all equals the unpatched model; pruned
    equals the masked oracle; a quarter of the video's tokens is kept over all its frames."""
    row, model = fam
    inputs = _video_alone(model)
    n = int((inputs["input_ids"] == model.config.video_token_id).sum())
    layer = {"start_layer": 0} if method == "alvts" else {"layer": 1}
    with torch.no_grad():
        ref = model(**inputs).logits
        with tp.patch(model, method=method, keep_ratio=1.0, **layer):
            torch.testing.assert_close(model(**inputs).logits, ref, rtol=1e-12, atol=1e-12)
        with tp.patch(model, method=method, keep_ratio=0.25, **layer) as handle:
            out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
            rules = oracle_rules(handle, inputs, model.config.text_config.num_hidden_layers)
            stats = handle.stats[0]
    ref_tokens, _ = masked_generate(model, inputs, STEPS, *rules[:2], skip_rows=rules[2],
                                    decode_position=row.decode_position)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], ref_tokens)
    assert stats["images"] == [] and [v["tokens"] for v in stats["videos"]] == [n]
    want = math.ceil(0.25 * n)
    if method == "alvts":
        assert all(p == want for p in stats["visual_processed"])
    else:
        assert stats["videos"][0]["kept"] == want == stats["kept_tokens"]


def test_stats_report_every_image_and_video_in_prompt_order(mrope_fam):
    """Images and videos in any order: each item reported separately, with its own quarter."""
    _, model = mrope_fam
    spec = SampleSpec(images=((32, 32), (64, 64)), videos=((2, 32, 64), (4, 32, 32)),
                      order=("video", "image", "video", "image"))
    inputs = make_inputs(model, [spec], seed=1)
    family = adapter_class(model.config.model_type)
    unit = family.image_tokens(model.config, 32, 32)  # tokens of a 32x32 frame group
    with torch.no_grad(), tp.patch(model, method="fastv", keep_ratio=0.25) as handle:
        model(**inputs)
        s = handle.stats[0]
    assert s["images"] == [{"tokens": unit, "kept": math.ceil(unit / 4)},
                           {"tokens": 4 * unit, "kept": unit}]
    assert s["videos"] == [{"tokens": 2 * unit, "kept": math.ceil(2 * unit / 4)},
                           {"tokens": 2 * unit, "kept": math.ceil(2 * unit / 4)}]
    assert s["kept_tokens"] == sum(i["kept"] for i in s["images"] + s["videos"])


def test_vip_segments_are_the_temporal_groups_in_prompt_order(mrope_fam):
    """GlimpsePrune's VIP sees one attention segment per temporal group of a video (its own 2D
    grid) and one per image, in prompt order, with the vision features lined up."""
    _, model = mrope_fam
    spec = SampleSpec(images=((32, 64),), videos=((4, 64, 32),), order=("video", "image"))
    inputs = make_inputs(model, [spec], seed=2)
    seen = {}
    with torch.no_grad(), tp.patch(model, method="glimpse", keep_ratio=0.5) as handle:
        vip = handle.method.modules.vip
        hook = vip.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k), with_kwargs=True)
        model(**inputs)
        hook.remove()
    grid = seen["k"]["grid_hw"].tolist()
    assert grid == [[4, 2], [4, 2], [2, 4]]  # two 64x32 frame groups, then the 32x64 image
    assert seen["a"][0].shape[0] == 4 * 2 * 2 + 2 * 4


def test_keep_rule_applies_per_video_not_per_frame(fam):
    """A floor of one token with nothing above the threshold keeps one token per video (a rule
    per temporal group would keep one per group)."""
    _, model = fam
    inputs = _video_alone(model, frames=8)
    with torch.no_grad(), tp.patch(model, method="glimpse", threshold=1.0, min_keep=1) as handle:
        model(**inputs)
        assert handle.stats[0]["videos"][0]["kept"] == 1


def test_kept_video_tokens_keep_their_rotary_positions(mrope_fam):
    """The rotary tables a layer after K sees for the kept tokens are those of the same tokens in
    the unpatched model: M-RoPE positions (time, row, column) are never renumbered."""
    row, model = mrope_fam
    inputs = row.with_videos().inputs(model, seed=4)
    lm_layers = model.model.language_model.layers

    def capture(store):
        def pre(module, args, kwargs):
            store.setdefault("rope", kwargs["position_embeddings"])
        return lm_layers[2].register_forward_pre_hook(pre, with_kwargs=True)

    full, pruned = {}, {}
    with torch.no_grad():
        h = capture(full)
        model(**inputs)
        h.remove()
        with tp.patch(model, method="fastv", layer=1, keep_ratio=0.25) as handle:
            h = capture(pruned)
            model(**inputs)
            h.remove()
            keep = handle.keep_mask
    video = inputs["input_ids"] == model.config.video_token_id
    assert int((keep & video).sum()) > 0 and int((~keep & video).sum()) > 0
    for t_full, t_pruned in zip(full["rope"], pruned["rope"]):
        for b in range(keep.shape[0]):
            kept = keep[b].nonzero()[:, 0]
            got = t_pruned[b, -len(kept):]  # the kept tokens, re-padded to the right end
            torch.testing.assert_close(got, t_full[b, kept], rtol=0, atol=0)


def test_beam_search_on_a_video_prompt(fam):
    """generate's expansion of the prompts (beams) reuses each prompt's video features."""
    row, model = fam
    inputs = row.with_videos().inputs(model, seed=5)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
        with tp.patch(model, method="glimpse", keep_ratio=1.0) as handle:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
            assert len(handle.stats) == 2 * inputs["input_ids"].shape[0]
    assert torch.equal(out, ref)
