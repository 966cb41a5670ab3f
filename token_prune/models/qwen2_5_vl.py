"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout (images and videos, M-RoPE,
2x2 merging) with a windowed ViT (SwiGLU blocks, RMSNorm).

VIP vision conditions: blocks 31, 23, 15, 7 of the 32-block ViT (1280 wide), the public
GlimpsePrune setting, mean-pooled over each 2x2 merge group after undoing the window order.
Videos as in Qwen2-VL: one VIP segment per temporal group, the keep rule per video.
"""

from __future__ import annotations

import torch

from .qwen2_vl import TINY_IDS, Qwen2VLAdapter


def vit_window_order(grid_thw: torch.Tensor, window_merged: int, merge: int) -> torch.Tensor:
    """Order in which the Qwen2.5-VL ViT arranges merged tokens for its window attention.

    The ViT groups the merged tokens of each image into square windows of ``window_merged`` x
    ``window_merged`` tokens, windows in row-major order, tokens row-major inside each window,
    images one after another. Block outputs come in that order, at 2x2-patch granularity.

    Args:
        grid_thw: [n_images, 3] (t, h, w) in patches.
        window_merged: window side in merged tokens (``window_size // merge // patch_size``).
        merge: spatial merge size (2).

    Returns:
        [total merged tokens] int64: entry j is the natural (row-major) index of the merged
        token at window-order slot j.
    """
    out, offset = [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        tt, rr, cc = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        nwh = -(-gh // window_merged)
        nww = -(-gw // window_merged)
        wr, wc = rr // window_merged, cc // window_merged
        key = ((tt * nwh + wr) * nww + wc) * window_merged**2 + (rr % window_merged) * window_merged + cc % window_merged
        out.append(torch.argsort(key.flatten(), stable=True) + offset)
        offset += t * gh * gw
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_type = "qwen2_5_vl"
    hf_model_class = "Qwen2_5_VLForConditionalGeneration"
    display_name = "Qwen2.5-VL"
    tiny_image = (128, 128)
    # Public GlimpsePrune settings: 3B 23/36, 7B 18/28, 32B 42/64, 72B 53/80 (0-indexed).
    glimpse_layers = {36: 23, 28: 18, 64: 42, 80: 53}
    # ALVTS paper: rank 128 for Qwen2.5-VL-3B (hidden 2048).
    alvts_ranks = {2048: 128}

    def vision_width(self):
        return self.model.config.vision_config.hidden_size

    def vit_order(self, grid_thw):
        vc = self.model.config.vision_config
        merge = vc.spatial_merge_size
        order = vit_window_order(grid_thw.cpu(), vc.window_size // merge // vc.patch_size, merge)
        return order.to(grid_thw.device)

    @classmethod
    def random_video_pixels(cls, config, videos, generator, device, dtype):
        out = super().random_video_pixels(config, videos, generator, device, dtype)
        # One second per temporal group (two frames at 2 fps), as the processor reports it.
        out["second_per_grid_ts"] = torch.ones(len(videos), device=device)
        return out

    @classmethod
    def config_of_size(cls, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                       intermediate_size: int, vocab_size: int, vision_hidden_size: int, vision_depth: int,
                       vision_heads: int, vision_intermediate_size: int, patch_size: int, window_tokens: int,
                       init_std: float, vision_init_std: float | None = None, ids: dict,
                       tie_embeddings: bool | None = None):
        """A ``Qwen2_5_VLConfig`` of the given size (2x2 merging, window attention over
        ``window_tokens`` x ``window_tokens`` merged tokens with full-attention blocks in the middle
        and at the end, M-RoPE split 2:3:3 over t/h/w) with the special ids in ``ids``."""
        from transformers import Qwen2_5_VLConfig

        text_config = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=init_std,
            rope_parameters=cls.rope_config(hidden_size, num_heads),
            **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids},
        )
        vision_config = dict(
            depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=vision_intermediate_size,
            num_heads=vision_heads, in_channels=3, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
            window_size=window_tokens * patch_size * 2, out_hidden_size=hidden_size,
            fullatt_block_indexes=sorted({max(0, vision_depth // 2 - 1), vision_depth - 1}),
        )
        if vision_init_std is not None:
            vision_config["initializer_range"] = vision_init_std
        rest = {k: v for k, v in ids.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if tie_embeddings is not None:
            text_config["tie_word_embeddings"] = rest["tie_word_embeddings"] = tie_embeddings
        return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **rest)

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_depth: int = 4, vocab_size: int = 128):
        """A tiny Qwen2.5-VL: 6 decoder layers, 4 ViT blocks, 8x8-pixel patches.

        The ViT keeps the real structure (2x2 patch merging, window attention with full-attention
        blocks in between); the window (4x4 merged tokens) is small enough that an image of more
        than 64 px spans several windows.
        """
        # initializer_range 0.2: larger than the real 0.02, so a random tiny model has peaked,
        # tie-free logits.
        return cls.config_of_size(
            hidden_size=hidden_size, num_layers=num_hidden_layers, num_heads=num_attention_heads,
            num_kv_heads=num_key_value_heads, intermediate_size=2 * hidden_size, vocab_size=vocab_size,
            vision_hidden_size=32, vision_depth=vision_depth, vision_heads=2, vision_intermediate_size=64,
            patch_size=8, window_tokens=4, init_std=0.2, ids=TINY_IDS)

    @classmethod
    def cost_vision_spec(cls, config):
        from ..costmodel import VisionSpec

        vc = config.vision_config
        return VisionSpec(kind="qwen_vit", depth=vc.depth, width=vc.hidden_size, heads=vc.num_heads,
                          intermediate=vc.intermediate_size, patch=vc.patch_size, in_channels=vc.in_channels,
                          out=vc.out_hidden_size, temporal_patch=vc.temporal_patch_size,
                          merge=vc.spatial_merge_size, window=vc.window_size, fullatt=tuple(vc.fullatt_block_indexes))
