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

from .. import hf
from .base import LayerKView, PruneAfterLayer, attention_layer_at_or_after

#: FastV's usual K
DEFAULT_LAYER = 2


class FastV(PruneAfterLayer):
    """Options: ``layer`` (2; on a hybrid decoder the first attention layer at or after 2),
    ``keep_ratio`` (0.5). K must be an attention layer: the score is its attention."""

    name = "fastv"
    needs_attention_layer = True

    def __init__(self, adapter, *, layer: int | None = None, keep_ratio: float = 0.5):
        if layer is None:
            layer = attention_layer_at_or_after(adapter, min(DEFAULT_LAYER, adapter.num_layers - 1))
        super().__init__(adapter, layer=layer, keep_ratio=keep_ratio)

    @classmethod
    def layer_defaults(cls, family, num_layers):
        return {"layer": family.fastv_layer_for(num_layers, DEFAULT_LAYER)}

    def options(self) -> dict:
        return dict(layer=self.layer, keep_ratio=self.keep_ratio)

    def score(self, rt, view: LayerKView) -> torch.Tensor:
        """Head-averaged attention of the last prompt token (it sees every real token) at layer K."""
        seq, (cos, sin) = view.seq, view.rope
        h_in = seq.hidden
        q, _ = self.adapter.project_qk(self.layer, h_in[:, -1:], cos[:, -1:], sin[:, -1:], want_k=False)
        if view.cache is not None:
            keys = hf.layer_kv(view.cache, self.layer)[0]
        else:
            _, keys = self.adapter.project_qk(self.layer, h_in, cos, sin)
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        acc = torch.promote_types(q.dtype, torch.float32)
        logits = (q.to(acc) @ keys.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        logits = logits.masked_fill(~seq.valid[:, None, None, :], float("-inf"))
        probs = logits.softmax(-1).mean(1)[:, 0]  # [B, S]
        return probs[view.prompt.visual]
