"""What is particular to the Qwen2.5-VL family: the glimpse map read from its attention, and the
vision features (window-ordered ViT blocks) lined up with the image tokens. The contract every
family keeps is tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch

import token_prune as tp
from token_prune.tiny import SampleSpec, make_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

K = 2


def test_glimpse_attention_map_matches_eager_attention_weights():
    """The map fed to the VIP equals (up to a per-head constant) the log of the eager attention
    weights of an appended glimpse token at layer K in the unpatched model."""
    model = tiny_model("qwen2_5_vl", attn_implementation="eager", dtype=torch.float64, seed=5)
    inputs = make_inputs(model, [SampleSpec(images=((64, 96),))], seed=11)
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=K)
    mods = handle.method.modules
    seen = {}
    hook = mods.vip.register_forward_pre_hook(lambda m, args: seen.update(map=args[0].clone()))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    handle.remove()

    # Reference: append the glimpse vector by hand, add each layer's vector with pre-hooks,
    # read layer K's eager attention probabilities.
    with torch.no_grad():
        gvec = mods.glimpse.all_layers(K)
        pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"])
        S = inputs["input_ids"].shape[1]
        emb = model.model.get_input_embeddings()(inputs["input_ids"])
        img = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        visual = inputs["input_ids"] == model.config.image_token_id
        emb[visual] = img
        emb = torch.cat([emb, gvec[0].view(1, 1, -1)], 1)
        gpos = pos[:, :, -1:].amax(0, keepdim=True) + 1
        pos = torch.cat([pos, gpos.expand(3, 1, 1)], 2)
        text = torch.arange(S + 1).view(1, 1, -1)
        hooks = []
        for li in range(1, K + 1):
            def add(module, args, kwargs, li=li):
                h = args[0].clone()
                h[:, -1] += gvec[li]
                return (h,) + args[1:], kwargs
            hooks.append(model.model.language_model.layers[li].register_forward_pre_hook(add, with_kwargs=True))
        out = model.model.language_model(inputs_embeds=emb, position_ids=torch.cat([text, pos], 0),
                                         output_attentions=True, use_cache=False)
        for h in hooks:
            h.remove()
    probs = out.attentions[K][0, :, -1, :S]  # [heads, S]
    ref = probs.log().T[visual[0]]  # [N, heads]
    diff = seen["map"] - ref
    # HF's eager softmax runs in float32, which bounds the reference's precision.
    torch.testing.assert_close(diff - diff[:1], torch.zeros_like(diff), rtol=0, atol=1e-5)
    assert seen["map"].std() > 0.1  # a real map, not a constant


def test_vision_features_follow_token_order():
    """Captured ViT features are in natural token order: pooling the last block's capture and
    applying the merger reproduces the model's own image embeddings."""
    model = tiny_model("qwen2_5_vl", dtype=torch.float64, seed=6)
    depth = model.config.vision_config.depth
    inputs = make_inputs(model, [SampleSpec(images=((96, 160), (64, 64)))], seed=12)
    handle = tp.patch(model, method="glimpse", keep_ratio=0.5, layer=K)
    captured = {}
    orig = handle.method.prefill

    def spy(rt, *a, **k):
        captured["feats"] = rt.ctx.vision_features
        return orig(rt, *a, **k)

    handle.method.prefill = spy
    with torch.no_grad():
        model(**inputs)
        handle.remove()
        img = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    assert handle.method.vision_layers()[0] == depth - 1
    last = captured["feats"][0]  # mean of each 2x2 group of the last block
    # The merger is linear in its input only after the norm; compare the pooled mean instead:
    merger_in = model.model.visual
    # Recompute the last block output in natural order independently and pool it.
    feats = {}
    hook = merger_in.blocks[depth - 1].register_forward_hook(lambda m, a, o: feats.update(h=o))
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    hook.remove()
    h = feats["h"]
    merged = merger_in.merger(h)  # window order, one row per merged token
    # Each captured row must pair with the merged row of the same token: match them by merging
    # the captured-order groups: the merger output in natural order is `img`.
    from token_prune.models.qwen2_5_vl import vit_window_order
    vc = model.config.vision_config
    order = vit_window_order(inputs["image_grid_thw"], vc.window_size // vc.spatial_merge_size // vc.patch_size,
                             vc.spatial_merge_size)
    torch.testing.assert_close(merged[torch.argsort(order)], img)
    torch.testing.assert_close(h.view(-1, 4, h.shape[-1]).mean(1)[torch.argsort(order)], last)
