"""FastV: the fixed-ratio, training-free baseline.

At decoder layer K (default 2) every visual token is scored by the attention the last prompt
token pays to it, averaged over heads. The score comes from layer K's own query/key projections
(rotary applied, causal softmax over the real tokens), so no eager attention weights are needed
and SDPA / flash-attention stay on. The top ``ceil(keep_ratio * N)`` tokens of each image survive;
the others are dropped from the hidden states after layer K, so layers K+1.. run on the short
sequence and their KV caches hold only the kept tokens. Layers 0..K keep their full caches, as in
the original method; decoding therefore uses one mask per layer.
"""

from __future__ import annotations

import math

import torch

from .. import hf, nvtx
from ..runtime import PrefillResult, causal_mask, compact_batch, keep_mask_from_scores, run_layers, sample_stats
from .glimpse import _check_fraction


def image_sizes_from_runs(visual: torch.Tensor, sizes: list[int] | None) -> list[int]:
    """Per-image token counts in batch order: the adapter's image sizes when known, else one
    "image" per contiguous run of visual tokens."""
    if sizes is not None:
        return sizes
    out = []
    for row in visual.tolist():
        run = 0
        for v in row + [False]:
            if v:
                run += 1
            elif run:
                out.append(run)
                run = 0
    return out


class FastV:
    """Options: ``layer`` (2), ``keep_ratio`` (0.5)."""

    name = "fastv"

    def __init__(self, adapter, *, layer: int = 2, keep_ratio: float = 0.5):
        _check_fraction("keep_ratio", keep_ratio)
        if keep_ratio is None:
            raise ValueError("keep_ratio must be in (0, 1], got None")
        n = adapter.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < n:
            raise ValueError(f"layer must be in [0, {n - 1}] for this {n}-layer model, got {layer}")
        self.adapter = adapter
        self.layer = layer
        self.keep_ratio = float(keep_ratio)

    def vision_layers(self) -> list[int]:
        return []

    def options(self) -> dict:
        return dict(layer=self.layer, keep_ratio=self.keep_ratio)

    def prefill(self, rt, lm, batch, cache, use_cache, kwargs) -> PrefillResult:
        adapter = rt.adapter
        K = self.layer
        layers = lm.layers
        hidden = batch.hidden
        mask = causal_mask(lm.config, hidden, batch.mask2d)
        cos, sin = adapter.rotary(hidden, batch.pos)
        h_in = None
        with nvtx.range("fastv.layers_0_K"):
            for i in range(K + 1):
                if i == K:
                    h_in = hidden
                hidden = hf.call_layer(layers[i], hidden, mask=mask, rope=(cos, sin), text_pos=batch.text_pos,
                                       cache=cache, use_cache=use_cache, **kwargs)

        # Attention of the last prompt token (it sees every real token) at layer K.
        with nvtx.range("fastv.score"):
            q, _ = adapter.project_qk(K, h_in[:, -1:], cos[:, -1:], sin[:, -1:], want_k=False)
            if cache is not None:
                keys = hf.layer_kv(cache, K)[0]
            else:
                _, keys = adapter.project_qk(K, h_in, cos, sin)
            keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
            acc = torch.promote_types(q.dtype, torch.float32)
            logits = (q.to(acc) @ keys.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
            logits = logits.masked_fill(~batch.valid[:, None, None, :], float("-inf"))
            probs = logits.softmax(-1).mean(1)[:, 0]  # [B, S], head-averaged
            scores = probs[batch.visual]
            sizes = image_sizes_from_runs(batch.visual, getattr(rt.ctx, "image_sizes", None))
            keep_vis = keep_mask_from_scores(scores, sizes, keep_ratio=self.keep_ratio, scores_are_logits=False)
        keep = batch.valid & ~batch.visual
        keep[batch.visual] = keep_vis

        batch.hidden = hidden
        with nvtx.range("fastv.compact"):
            short, _ = compact_batch(batch, keep, [])
            if short.mask2d is not None and bool(short.mask2d.bool().all()):
                short.mask2d = None
        with nvtx.range("fastv.layers_K1_L"):
            hidden = run_layers(rt, lm, short, range(K + 1, len(layers)), cache, use_cache, kwargs)
        short.hidden = hidden
        full_mask, short_mask = batch.valid.long(), short.valid.long()
        layer_masks = [full_mask] * (K + 1) + [short_mask] * (len(layers) - K - 1)
        if K + 1 == len(layers):
            layer_masks = [full_mask] * len(layers)
        return PrefillResult(hidden, short, sample_stats(batch, keep_vis, sizes), layer_masks)
