"""What is particular to InternVL: the tile canvas (checked against transformers' own InternVL
image processor), the VIP's geometric positions (checked against pixels that encode their own
coordinates), conditions lined up with what the model feeds its projector, the published K and
score form, and InternVL3.5's Qwen3 decoder (per-head q/k norms). The contract every family keeps
is tests/test_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import token_prune as tp
from token_prune.models.internvl import (InternVLAdapter, canvas_from_colours, image_positions, optimal_canvas,
                                         tile_count)
from token_prune.tiny import SampleSpec, make_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

#: (height, width) of images with canvases of every shape the tiny tiles allow
SIZES = [(32, 32), (64, 64), (64, 96), (96, 64), (32, 96), (96, 32), (40, 200), (200, 40), (100, 70), (30, 130)]


def hf_tiling(tile: int, max_tiles: int = 12):
    """(transformers' InternVL image processor without normalisation, its canvas rule): the
    GotOcr2 processor that needs no torchvision (``...Pil`` from 5.2x on, the plain class before)."""
    import importlib

    for module, name in (("image_processing_pil_got_ocr2", "GotOcr2ImageProcessorPil"),
                         ("image_processing_got_ocr2", "GotOcr2ImageProcessor")):
        try:
            mod = importlib.import_module(f"transformers.models.got_ocr2.{module}")
            cls = getattr(mod, name)
        except (ImportError, AttributeError):
            continue
        proc = cls(crop_to_patches=True, size={"height": tile, "width": tile}, max_patches=max_tiles,
                   do_normalize=False)
        return proc, mod.get_optimal_tiled_canvas
    pytest.skip("no GotOcr2 image processor that runs without torchvision")


def smooth_image(h, w, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = (rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype("uint8")
    return Image.fromarray(low).resize((w, h), Image.BICUBIC)


def test_canvas_matches_the_hf_processor():
    """For every image size: the processor's tile count is ours, its canvas is ours, and the canvas
    is recovered from its pixels alone (tiles against thumbnail)."""
    config = InternVLAdapter.tiny_config()
    tile, g = InternVLAdapter.tile_side(config)
    proc, get_optimal_tiled_canvas = hf_tiling(tile)
    for i, (h, w) in enumerate(SIZES):
        cols, rows = get_optimal_tiled_canvas((h, w), (tile, tile), 1, 12)
        assert optimal_canvas(h, w, tile) == (rows, cols), (h, w)
        pixels = proc(images=[smooth_image(h, w, i)], return_tensors="pt")["pixel_values"]
        assert pixels.shape[0] == tile_count(rows, cols)
        assert InternVLAdapter.image_tokens(config, h, w) == pixels.shape[0] * g * g
        if rows * cols > 1:
            colours = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), g).permute(0, 2, 3, 1)
            assert canvas_from_colours(colours[:-1], colours[-1]) == (rows, cols), (h, w)


def coordinate_pixels(config, images):
    """Pixels laid out as the processor lays them out, each canvas pixel's colour its token's
    global (row, col) on the canvas (channel 2: noise), so a tile token's mean colour *is* its
    geometric position."""
    tile, g = InternVLAdapter.tile_side(config)
    block = tile // g
    gen = torch.Generator().manual_seed(0)
    out = []
    for h, w in images:
        rows, cols = optimal_canvas(h, w, tile)
        y = torch.arange(rows * tile)[:, None].expand(-1, cols * tile) // block
        x = torch.arange(cols * tile)[None, :].expand(rows * tile, -1) // block
        canvas = torch.stack([y.double(), x.double(), torch.rand(rows * tile, cols * tile, generator=gen).double()])
        out.append(InternVLAdapter._tiles(config, canvas, rows, cols))
    return torch.cat(out)


def spy_layout(handle):
    seen = {}
    orig = handle.method.prefill

    def spy(rt, *a, **k):
        seen["layout"] = rt.ctx.image_grids
        seen["feats"] = [f.clone() for f in rt.ctx.vision_features]
        return orig(rt, *a, **k)

    handle.method.prefill = spy
    return seen


def test_vip_positions_are_geometric():
    """Each tile token's VIP position is its (row, col) on the image's canvas token grid, read back
    from pixels that encode it; the thumbnail sits on its own g x g grid; one segment per image."""
    model = tiny_model("internvl", dtype=torch.float64, seed=2)
    tile, g = InternVLAdapter.tile_side(model.config)
    images = [(64, 96), (32, 32), (96, 32), (200, 40)]
    inputs = make_inputs(model, [SampleSpec(images=images[:1]), SampleSpec(images=images[1:], prefix_len=4)], seed=3)
    inputs["pixel_values"] = coordinate_pixels(model.config, images)
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=2)
    seen = spy_layout(handle)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    positions, lengths = seen["layout"]
    assert lengths == [InternVLAdapter.image_tokens(model.config, h, w) for h, w in images]
    colours = torch.nn.functional.adaptive_avg_pool2d(inputs["pixel_values"], g).permute(0, 2, 3, 1).reshape(-1, 3)
    start = 0
    for (h, w), n in zip(images, lengths):
        rows, cols = optimal_canvas(h, w, tile)
        canvas_tokens = rows * cols * g * g
        pos = positions[start:start + n]
        assert torch.equal(pos[:canvas_tokens].double(), colours[start:start + canvas_tokens, :2]), (h, w)
        assert pos[:canvas_tokens, 0].max() == rows * g - 1 and pos[:canvas_tokens, 1].max() == cols * g - 1
        if rows * cols > 1:  # thumbnail: its own grid, row-major
            thumb = pos[canvas_tokens:]
            assert thumb.tolist() == [[i, j] for i in range(g) for j in range(g)]
        start += n


def test_conditions_line_up_with_the_projector_input():
    """The deepest default condition (the tower's last hidden state, the one the model projects)
    is, token by token in prompt order, the mean of the 2x2 patch features that the pixel shuffle
    concatenates into the projector's input for that token."""
    model = tiny_model("internvl", dtype=torch.float64, seed=4)
    inputs = make_inputs(model, [SampleSpec(images=((64, 96),)), SampleSpec(images=((32, 32), (96, 32)))], seed=5)
    seen_in = {}

    def pre(module, args):
        seen_in["x"] = args[0]

    hook = model.model.multi_modal_projector.register_forward_pre_hook(pre)
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=2)
    assert handle.method.vision_layers()[0] == model.config.vision_config.num_hidden_layers
    seen = spy_layout(handle)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    hook.remove()
    C = model.config.vision_config.hidden_size
    x = seen_in["x"]  # [tiles, g*g, 4C]
    want = x.reshape(x.shape[0] * x.shape[1], 4, C).mean(1)
    torch.testing.assert_close(seen["feats"][0], want, rtol=1e-12, atol=1e-12)
    assert all(f.shape == want.shape for f in seen["feats"])


def test_published_defaults():
    # GlimpsePrune's public InternVL2.5-8B setup: K=21 of the 32 layers of its InternLM2.5-7B decoder,
    # raw attention logits; other depths take the relative default.
    assert InternVLAdapter.glimpse_layer_for(32) == 21
    assert InternVLAdapter.glimpse_layer_for(28) == round(InternVLAdapter.glimpse_relative_depth * 28)
    assert InternVLAdapter.glimpse_score == "logits"
    assert InternVLAdapter.alvts_rank_for(3584) == 3584 // 16
    model = tiny_model("internvl")
    handle = tp.patch(model, method="glimpse")
    assert handle.method.modules.config.glimpse_score == "logits"
    d = model.config.vision_config.num_hidden_layers
    assert handle.method.vision_layers() == [(d + 1) * (4 - i) // 4 - 1 for i in range(4)]
    handle.remove()


@pytest.mark.parametrize("mid", ["glimpse", "fastv", "alvts", "random"])
def test_qwen3_decoder_with_qk_norms(mid):
    """InternVL3.5's layout: a Qwen3 decoder, whose q/k are normalised per head before rotary. Keep
    everything: the unpatched model; prune: the masked oracle (the contract's rules)."""
    import test_contract as contract
    from families import FAMILIES

    row = FAMILIES["internvl"]
    model = tiny_model("internvl", dtype=torch.float64, seed=7, decoder="qwen3")
    assert hasattr(model.model.language_model.layers[0].self_attn, "q_norm")
    inputs = row.inputs(model, seed=8)
    valid = inputs["attention_mask"].bool()
    method, opts = contract.METHODS[mid]
    with torch.no_grad():
        ref = model(**inputs).logits
        with tp.patch(model, method=method, **dict(opts, keep_ratio=1.0)):
            out = model(**inputs).logits
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-12, atol=1e-12)
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        tokens, first = contract._generate_with_logits(model, inputs)
        rules = contract.oracle_rules(handle, inputs, L)
    ref_tokens, ref_first = contract._oracle(row, model, inputs, rules)
    torch.testing.assert_close(first, ref_first.to(first.dtype), rtol=1e-6, atol=1e-6)
    assert torch.equal(tokens, ref_tokens)


def test_image_positions_by_hand():
    """A 1x2 canvas of 2x2-token tiles, then the thumbnail (hand-written)."""
    assert image_positions(1, 2, 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1],
                                                 [0, 2], [0, 3], [1, 2], [1, 3],
                                                 [0, 0], [0, 1], [1, 0], [1, 1]]
    assert image_positions(1, 1, 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
