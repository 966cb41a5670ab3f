"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): M-RoPE positions, a windowed ViT."""

from __future__ import annotations

import torch

from .. import hf
from .base import ModelAdapter


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


class Qwen2_5_VLAdapter(ModelAdapter):
    model_type = "qwen2_5_vl"
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

    def vision_width(self):
        return self.model.config.vision_config.hidden_size

    def vision_depth(self):
        return self.model.config.vision_config.depth

    def install_vision_hooks(self, runtime, layers):
        vc = self.model.config.vision_config
        merge = vc.spatial_merge_size
        unit = merge * merge
        window = vc.window_size // merge // vc.patch_size
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
            order = vit_window_order(grid[0].cpu(), window, merge).to(grid[0].device)
            inverse = torch.argsort(order)
            feats = []
            for blk in layers:
                h = captured[blk]
                feats.append(h.reshape(h.shape[0] // unit, unit, -1).mean(1)[inverse])
            g = grid[0]
            runtime.add_vision_capture(feats, torch.stack([g[:, 0] * (g[:, 1] // merge), g[:, 2] // merge], 1))
            captured.clear()

        hooks = [self.visual.register_forward_pre_hook(pre, with_kwargs=True)]
        for blk in wanted:
            hooks.append(blocks[blk].register_forward_hook(make_block_hook(blk)))
        hooks.append(self.visual.register_forward_hook(post, with_kwargs=True))
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
