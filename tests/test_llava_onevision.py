"""What is particular to LLaVA-OneVision: SigLIP features lined up with what the model feeds its
language model (anyres_max shrinking included), newline tokens and their zero condition, the
positions of shrunk grids, base-only images in multi-image samples, token counts against the
model's own packing, the default K and score form. The contract every family keeps is
tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch

import token_prune as tp
from token_prune.models.llava_onevision import LlavaOnevisionAdapter as OV
from token_prune.tiny import SampleSpec, make_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")


def lm_inputs_embeds(model, inputs):
    """The inputs_embeds the *unpatched* model hands its language model."""
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
    seen = {}
    orig = handle.method.prefill

    def spy(rt, *a, **k):
        seen["feats"] = [f.clone() for f in rt.ctx.vision_features]
        seen["layout"] = rt.ctx.image_grids
        return orig(rt, *a, **k)

    handle.method.prefill = spy
    return seen


def test_features_line_up_with_image_tokens():
    """With a linear projector (so that projecting and the model's bilinear shrinking commute),
    the captured deepest condition, projected, is exactly the embedding the model puts at every
    image token, shrunk grids included; newlines get a zero condition exactly where the model
    puts ``image_newline``."""
    model = tiny_model("llava_onevision", dtype=torch.float64, seed=1, projector_hidden_act="linear")
    # (112, 112): 8x8 high-res tokens shrunk to 5x5; (60, 150): unpadded 4x12 shrunk to 3x9; (112, 56): 8x4 as is
    images = [(112, 112), (60, 150), (112, 56)]
    inputs = make_inputs(model, [SampleSpec(images=images[:1]), SampleSpec(images=images[1:])], seed=2)
    visual = inputs["input_ids"] == model.config.image_token_id
    emb = lm_inputs_embeds(model, inputs)[visual]
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=2)
    assert handle.method.vision_layers()[0] == model.config.vision_config.num_hidden_layers  # hidden_states[-1]
    seen = spy_prefill(handle)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    feat = seen["feats"][0]
    newline = (emb == model.model.image_newline).all(-1)
    assert int(newline.sum()) == 5 + 3 + 8
    assert bool((feat[newline] == 0).all()) and bool((feat[~newline] != 0).any(-1).all())
    with torch.no_grad():
        projected = model.model.multi_modal_projector(feat)
    torch.testing.assert_close(projected[~newline], emb[~newline], rtol=1e-10, atol=1e-10)
    positions, lengths = seen["layout"]
    assert lengths == [OV.image_tokens(model.config, h, w) for h, w in images] == [16 + 5 * 6, 16 + 3 * 10, 16 + 8 * 5]
    base = [[r, c] for r in range(4) for c in range(4)]
    grid = lambda h, w: [[r, c] for r in range(h) for c in range(w + 1)]  # noqa: E731
    assert positions.tolist() == base + grid(5, 5) + base + grid(3, 9) + base + grid(8, 4)
    assert torch.equal(newline, positions[:, 1] == torch.tensor([5] * 46 + [9] * 46 + [4] * 56))


def test_token_counts_match_the_model():
    """Our processor-style count = what the model's packing produces, over many sizes."""
    model = tiny_model("llava_onevision", dtype=torch.float32, seed=3)
    cfg = model.config
    sizes = [(h, w) for h in (17, 56, 60, 100, 150, 201) for w in (23, 56, 100, 177, 260)]
    feats = [torch.zeros(OV.tile_count(cfg, h, w), 16, 1) for h, w in sizes]
    _, lens = model.model.pack_image_features(feats, torch.tensor(sizes), image_newline=torch.zeros(1),
                                              vision_aspect_ratio=cfg.vision_aspect_ratio)
    assert [OV.image_tokens(cfg, h, w) for h, w in sizes] == lens.tolist()
    positions, lengths = OV(model).layout(None, {"image_sizes": torch.tensor(sizes)})
    assert lengths == lens.tolist() and positions.shape == (sum(lengths), 2)


def test_several_images_in_a_sample_are_base_tiles():
    """With ``batch_num_images`` (as the processor passes it), each image of a multi-image sample is
    its base tile plus one newline: pruning at keep 1 equals the unpatched model, the layout says
    so, and a pruned run keeps a quarter of each image."""
    model = tiny_model("llava_onevision", dtype=torch.float64, seed=4)
    cfg = model.config
    img = cfg.image_token_id
    ids = torch.tensor([[1, 9, 10] + [img] * 17 + [11] + [img] * 17 + [12, 13]])
    gen = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(2, 1, 3, 56, 56, generator=gen, dtype=torch.float64),
                  image_sizes=torch.tensor([[112, 112], [60, 150]]), batch_num_images=torch.tensor([2]))
    with torch.no_grad():
        ref = model(**inputs).logits
        handle = tp.patch(model, method="fastv", keep_ratio=1.0, layer=2)
        seen = spy_prefill(handle)
        out = model(**inputs).logits
        handle.remove()
        assert seen["layout"][1] == [17, 17]
        assert seen["layout"][0][16::17].tolist() == [[3, 4], [3, 4]]  # the newline, one past the last column
        with tp.patch(model, method="fastv", keep_ratio=0.25, layer=2) as handle:
            model(**inputs)
            assert [i["kept"] for i in handle.stats[0]["images"]] == [5, 5]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_defaults():
    """No published GlimpsePrune setting: the relative K (18 of 28 for the 7B), raw logits, ALVTS
    rank hidden/16; four conditions spread over the tower, deepest the projected one."""
    assert OV.glimpse_layer_for(28) == round(OV.glimpse_relative_depth * 28)
    assert OV.glimpse_score == "logits"
    assert OV.alvts_rank_for(3584) == 3584 // 16
    model = tiny_model("llava_onevision")
    with tp.patch(model, method="glimpse") as handle:
        d = model.config.vision_config.num_hidden_layers
        assert handle.method.vision_layers() == [(d + 1) * (4 - i) // 4 - 1 for i in range(4)]
        assert handle.method.modules.config.glimpse_score == "logits"
    model.config.vision_aspect_ratio = "anyres"
    with pytest.raises(NotImplementedError, match="anyres_max"):
        tp.patch(model, method="fastv")
    assert tp.get_handle(model) is None


def test_video_features_segments_and_items():
    """A video: with a linear projector (pooling and projecting commute), the captured condition,
    projected, is the embedding the model puts at every video token but the closing newline (a
    zero condition); one VIP segment per frame on its pooled grid, the newline one past the last
    frame's last column; the video is one keep-rule item, next to the image after it."""
    model = tiny_model("llava_onevision", dtype=torch.float64, seed=5, projector_hidden_act="linear")
    frames, p = 3, OV.pooled_side(model.config)
    samples = [SampleSpec(images=((56, 56),), videos=((frames, 56, 56),), order=("video", "image"))]
    inputs = make_inputs(model, samples, seed=6)
    video = inputs["input_ids"] == model.config.video_token_id
    assert int(video.sum()) == frames * p * p + 1 == sum(OV.video_tokens(model.config, frames, 56, 56))
    emb = lm_inputs_embeds(model, inputs)
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=2)
    seen = spy_prefill(handle)
    got = {}
    hook = handle.method.modules.vip.register_forward_pre_hook(lambda m, a, k: got.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        stats = handle.stats
    hook.remove()
    handle.remove()
    n_video = frames * p * p + 1
    feat = seen["feats"][0][:n_video]  # the video comes first in the prompt
    assert bool((feat[-1] == 0).all()) and bool((feat[:-1] != 0).any(-1).all())
    with torch.no_grad():
        projected = model.model.multi_modal_projector(feat[:-1])
    torch.testing.assert_close(projected, emb[video][:-1], rtol=1e-10, atol=1e-10)
    assert bool((emb[video][-1] == model.model.image_newline).all())
    positions, lengths = seen["layout"]
    frame = [[r, c] for r in range(p) for c in range(p)]
    assert lengths[:frames] == [p * p] * (frames - 1) + [p * p + 1]
    assert positions[:n_video].tolist() == frame * frames + [[p - 1, p]]
    assert got["lengths"] == lengths
    assert [v["tokens"] for v in stats[0]["videos"]] == [n_video]
    assert [i["tokens"] for i in stats[0]["images"]] == [OV.image_tokens(model.config, 56, 56)]
    assert stats[0]["videos"][0]["kept"] == -(-n_video // 2)
