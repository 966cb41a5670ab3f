"""Random pruning: the floor every informed method should beat.

The structure of FastV with random scores: layers ``0..layer`` run on the whole prompt (their KV
caches stay full), then ``ceil(keep_ratio * N)`` visual tokens of each image, drawn uniformly at
random, survive; the rest leave the hidden states, and layers ``layer+1..`` run on the short
sequence. The draws come from a generator seeded once at patch time (``seed``), so a sequence of
calls is reproducible while every image gets its own draw.
"""

from __future__ import annotations

import torch

from ..runtime import PrefillResult, compact_batch, keep_mask_from_scores, run_layers, sample_stats
from .fastv import image_sizes_from_runs
from .glimpse import _check_fraction


class RandomPrune:
    """Options: ``keep_ratio`` (0.5), ``layer`` (0), ``seed`` (0)."""

    name = "random"

    def __init__(self, adapter, *, keep_ratio: float = 0.5, layer: int = 0, seed: int = 0):
        _check_fraction("keep_ratio", keep_ratio)
        if keep_ratio is None:
            raise ValueError("keep_ratio must be in (0, 1], got None")
        n = adapter.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < n:
            raise ValueError(f"layer must be in [0, {n - 1}] for this {n}-layer model, got {layer}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.adapter = adapter
        self.layer = layer
        self.keep_ratio = float(keep_ratio)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def vision_layers(self) -> list[int]:
        return []

    def options(self) -> dict:
        return dict(keep_ratio=self.keep_ratio, layer=self.layer, seed=self.seed)

    def prefill(self, rt, lm, batch, cache, use_cache, kwargs) -> PrefillResult:
        K = self.layer
        layers = lm.layers
        batch.hidden = run_layers(rt, lm, batch, range(K + 1), cache, use_cache, kwargs)
        sizes = image_sizes_from_runs(batch.visual, getattr(rt.ctx, "image_sizes", None))
        n_vis = int(batch.visual.sum())
        # Uniform scores in [0, 1) from the method's own CPU generator; ties are impossible in practice.
        scores = torch.rand(n_vis, generator=self.generator).to(batch.hidden.device)
        keep_vis = keep_mask_from_scores(scores, sizes, keep_ratio=self.keep_ratio, scores_are_logits=False)
        keep = batch.valid & ~batch.visual
        keep[batch.visual] = keep_vis

        short, _ = compact_batch(batch, keep, [])
        if short.mask2d is not None and bool(short.mask2d.bool().all()):
            short.mask2d = None
        short.hidden = run_layers(rt, lm, short, range(K + 1, len(layers)), cache, use_cache, kwargs)
        full_mask, short_mask = batch.valid.long(), short.valid.long()
        layer_masks = [full_mask] * (K + 1) + [short_mask] * (len(layers) - K - 1)
        if K + 1 == len(layers):
            layer_masks = [full_mask] * len(layers)
        return PrefillResult(short.hidden, short, sample_stats(batch, keep_vis, sizes), layer_masks)
