"""Random pruning: the floor every informed method should beat.

The structure of FastV with random scores: layers ``0..layer`` run on the whole prompt (their KV
caches stay full), then ``ceil(keep_ratio * N)`` visual tokens of each image, drawn uniformly at
random, survive; the rest leave the hidden states, and layers ``layer+1..`` run on the short
sequence. The draws come from a generator seeded once at patch time (``seed``), so a sequence of
calls is reproducible while every image gets its own draw.
"""

from __future__ import annotations

import torch

from .base import LayerKView, PruneAfterLayer, check_int


class RandomPrune(PruneAfterLayer):
    """Options: ``keep_ratio`` (0.5), ``layer`` (0), ``seed`` (0)."""

    name = "random"

    def __init__(self, adapter, *, keep_ratio: float = 0.5, layer: int = 0, seed: int = 0):
        super().__init__(adapter, layer=layer, keep_ratio=keep_ratio)
        self.seed = check_int("seed", seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def options(self) -> dict:
        return dict(keep_ratio=self.keep_ratio, layer=self.layer, seed=self.seed)

    def score(self, rt, view: LayerKView) -> torch.Tensor:
        # Uniform in [0, 1) from the method's own CPU generator; ties are impossible in practice.
        n_vis = sum(view.sizes)
        return torch.rand(n_vis, generator=self.generator).to(view.seq.hidden.device)
