"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): M-RoPE positions, a windowed ViT."""

from __future__ import annotations

import torch

from .. import hf
from ..instance_patch import forward_hook, forward_pre_hook
from .base import ModelAdapter, pil_to_tensor


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


# Token ids of the tiny Qwen2.5-VL vocabulary. Real checkpoints use 151643.. for these; the tiny
# vocabulary keeps them small so the embedding table stays tiny too.
TINY_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, vision_start_token_id=3, vision_end_token_id=4,
                image_token_id=5, video_token_id=6)


class Qwen2_5_VLAdapter(ModelAdapter):
    model_type = "qwen2_5_vl"
    hf_model_class = "Qwen2_5_VLForConditionalGeneration"
    display_name = "Qwen2.5-VL"
    tiny_image = (128, 128)
    # Public GlimpsePrune settings: 3B 23/36, 7B 18/28, 32B 42/64, 72B 53/80 (0-indexed).
    glimpse_layers = {36: 23, 28: 18, 64: 42, 80: 53}
    # ALVTS paper: rank 128 for Qwen2.5-VL-3B (hidden 2048).
    alvts_ranks = {2048: 128}

    @property
    def outer(self):
        return self.model.model

    @property
    def lm(self):
        return self.model.model.language_model

    @property
    def visual(self):
        return self.model.model.visual

    def rotary(self, hidden, pos):
        return hf.rotary(self.lm, hidden, pos)

    def split_positions(self, position_ids, batch, seq, device):
        if position_ids is None:
            pos = torch.arange(seq, device=device).view(1, 1, -1).expand(3, batch, -1)
            return pos, None
        if position_ids.ndim == 2:
            return position_ids[None].expand(3, -1, -1), None
        if position_ids.shape[0] == 4:
            return position_ids[1:], position_ids[0]
        return position_ids, None

    def text_positions(self, position_ids, batch, seq, device):
        # Without the text row, generate continuing from a cache passes [1, B, S] M-RoPE positions of
        # text tokens: the text position shifted by the cached rope delta.
        pos, text = self.split_positions(position_ids, batch, seq, device)
        if text is not None:
            return text
        deltas = hf.rope_deltas(self.outer)
        if deltas is None or position_ids is None or position_ids.ndim != 3:
            return pos[0]
        return pos[0] - deltas.to(pos.device)

    def vision_width(self):
        return self.model.config.vision_config.hidden_size

    def vision_depth(self):
        return self.model.config.vision_config.depth

    def vit_token_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """[merged tokens] the natural index of the merged token at each slot of the ViT blocks'
        output (window attention reorders them), or None when they come in natural order."""
        vc = self.model.config.vision_config
        merge = vc.spatial_merge_size
        return vit_window_order(grid_thw.cpu(), vc.window_size // merge // vc.patch_size, merge).to(grid_thw.device)

    def install_vision_hooks(self, runtime, layers):
        vc = self.model.config.vision_config
        merge = vc.spatial_merge_size
        unit = merge * merge
        captured: dict[int, torch.Tensor] = {}
        grid: list = [None]
        wanted = {blk: i for i, blk in enumerate(layers)}
        blocks = self.visual.blocks
        for blk in layers:
            if not 0 <= blk < len(blocks):
                raise ValueError(f"vision layer {blk} outside the ViT (0..{len(blocks) - 1})")

        def pre(module, args, kwargs):
            grid[0] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            captured.clear()

        def make_block_hook(idx):
            def hook(module, args, output):
                captured[idx] = output[0] if isinstance(output, tuple) else output
            return hook

        def post(module, args, kwargs, output):
            # Runs for every pass of the vision tower, inside a model forward or not: since
            # transformers 5.2x, generate() encodes the images before its first forward call.
            if grid[0] is None or len(captured) != len(layers):
                return
            order = self.vit_token_order(grid[0])
            inverse = None if order is None else torch.argsort(order)
            feats = []
            for blk in layers:
                h = captured[blk]
                pooled = h.reshape(h.shape[0] // unit, unit, -1).mean(1)
                feats.append(pooled if inverse is None else pooled[inverse])
            g = grid[0]
            runtime.add_vision_capture(feats, torch.stack([g[:, 0] * (g[:, 1] // merge), g[:, 2] // merge], 1))
            captured.clear()

        hooks = [forward_pre_hook(self.visual, pre, with_kwargs=True)]
        for blk in wanted:
            hooks.append(forward_hook(blocks[blk], make_block_hook(blk)))
        hooks.append(forward_hook(self.visual, post, with_kwargs=True))
        return hooks

    def decode_positions(self, runtime, kwargs):
        # With a mask, HF derives decode positions from the full-length mask, which is right.
        # Without one it counts cache entries, which pruning shrank: continue the unpruned count.
        if kwargs.get("attention_mask") is not None:
            return None
        cache = hf.get_cache(kwargs)
        ids = kwargs.get("input_ids")
        emb = kwargs.get("inputs_embeds")
        q = (ids if ids is not None else emb).shape[1]
        b = (ids if ids is not None else emb).shape[0]
        start = runtime.pruned.next_position(cache)
        dev = (ids if ids is not None else emb).device
        text = torch.arange(start, start + q, device=dev).view(1, -1).expand(b, -1)
        deltas = hf.rope_deltas(self.outer)
        pos = text if deltas is None else text + deltas.to(dev)
        return torch.cat([text[None], pos[None].expand(3, -1, -1)], 0)

    # -- the family without a model ---------------------------------------------------------
    @classmethod
    def _unit(cls, config) -> int:
        vc = config.vision_config
        return vc.patch_size * vc.spatial_merge_size

    @classmethod
    def _check_size(cls, config, height: int, width: int) -> None:
        unit = cls._unit(config)
        if height % unit or width % unit:
            raise ValueError(f"image size {height}x{width} must be a multiple of {unit} px")

    @classmethod
    def image_tokens(cls, config, height, width):
        cls._check_size(config, height, width)
        unit = cls._unit(config)
        return (height // unit) * (width // unit)

    @classmethod
    def prompt_tokens(cls, config, parts):
        ids, types = [], []
        for kind, value in parts:
            if kind == "text":
                ids += list(value)
                types += [0] * len(value)
            else:  # <vision_start> <image>*n <vision_end>
                ids += [config.vision_start_token_id] + [config.image_token_id] * value + [config.vision_end_token_id]
                types += [0] + [1] * value + [0]
        return ids, types

    @classmethod
    def uses_token_types(cls):
        return True

    @classmethod
    def random_pixels(cls, config, images, generator, device, dtype):
        # Patches [sum over images of h*w / patch^2, C*T*P*P], as the image processor flattens them.
        vc = config.vision_config
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        grids = []
        for h, w in images:
            cls._check_size(config, h, w)
            grids.append([1, h // vc.patch_size, w // vc.patch_size])
        n = sum(gh * gw for _, gh, gw in grids)
        pixels = torch.randn(n, patch_dim, generator=generator, device=generator.device).to(device=device, dtype=dtype)
        return dict(pixel_values=pixels, image_grid_thw=torch.tensor(grids, dtype=torch.long, device=device))

    @classmethod
    def encode_image(cls, config, image, max_side):
        vc = config.vision_config
        P, m, T = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        unit = P * m
        w, h = image.size
        scale = min(1.0, max_side / max(w, h))
        W = max(unit, int(round(w * scale / unit)) * unit)
        H = max(unit, int(round(h * scale / unit)) * unit)
        x = pil_to_tensor(image.resize((W, H)))  # [C, H, W]
        C = x.shape[0]
        gh, gw = H // P, W // P
        frames = x[None].expand(T, C, H, W)  # one image = the frame repeated over the temporal patch
        p = frames.reshape(1, T, C, gh // m, m, P, gw // m, m, P)
        p = p.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, C * T * P * P)
        return dict(pixel_values=p, image_grid_thw=torch.tensor([[1, gh, gw]])), gh * gw // (m * m)

    @classmethod
    def pixel_rows(cls, inputs, first, count):
        grid = inputs["image_grid_thw"]
        patches = grid.prod(-1).tolist()
        p0 = sum(patches[:first])
        return dict(pixel_values=inputs["pixel_values"][p0:p0 + sum(patches[first:first + count])],
                    image_grid_thw=grid[first:first + count])

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

        head_dim = hidden_size // num_heads
        half = head_dim // 2  # rotary frequencies, split between the t, h and w axes
        hw = half * 3 // 8
        text_config = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=init_std,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * hw, hw, hw]},
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
    def vision_units(cls, config, height, width):
        vc = config.vision_config
        cls._check_size(config, height, width)
        return {"vision_patches": (height // vc.patch_size) * (width // vc.patch_size)}

    @classmethod
    def cost_vision_spec(cls, config):
        from ..costmodel import VisionSpec

        vc = config.vision_config
        return VisionSpec(kind="qwen_vit", depth=vc.depth, width=vc.hidden_size, heads=vc.num_heads,
                          intermediate=vc.intermediate_size, patch=vc.patch_size, in_channels=vc.in_channels,
                          out=vc.out_hidden_size, temporal_patch=vc.temporal_patch_size,
                          merge=vc.spatial_merge_size, window=vc.window_size, fullatt=tuple(vc.fullatt_block_indexes))

    @classmethod
    def qkv_bias(cls, config):
        return True
