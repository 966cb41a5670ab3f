"""GlimpsePrune: a learned glimpse token and a visual-token importance predictor (VIP) decide,
per input, which visual tokens survive after decoder layer K.

Prefill, for a batch with images:

1. The layer-0 glimpse vector is appended as one extra token at the end of every prompt, at
   rotary position ``last + 1`` on every axis; before each layer ``1..K`` the projected glimpse
   vector of that layer is added to its hidden state.
2. Layers ``0..K`` run on the full sequence. The glimpse attention map at layer K is the glimpse
   token's query (rotary applied) against every image key of that layer (GQA keys shared),
   scaled by ``1/sqrt(head_dim)``; raw logits for Qwen, log-softmax for LLaVA. It is computed
   from the layer's own projections, so SDPA / flash-attention stay on.
3. The VIP turns the map and four intermediate ViT features into one logit per visual token;
   the keep rule picks the survivors per image (per video over all its frames; the VIP attends
   within each image and each temporal group of a video).
4. Hidden states, the KV cache of layers ``0..K``, positions and mask are compacted to text +
   kept visual tokens (the glimpse token goes too); layers ``K+1..`` run on the short sequence.
   Every layer's cache then holds only kept tokens, so decoding is cheaper as well.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from .. import _ops, hf, nvtx
from ..models.base import head_norm
from ..runtime import TokenBatch, keep_mask_from_scores
from ..vip import GlimpseConfig, GlimpseModules
from .base import LayerKView, PruneAfterLayer, check_fraction, check_int, check_layer


def _fused_glimpse_map(adapter, K, h_in_k, cos, sin, cache, ext, vis_idx, log_softmax):
    """The glimpse attention map [N, heads] through the fused ``glimpse_attention_map`` kernel:
    the glimpse query of layer K before rotary (the kernel rotates it) against the layer's
    rotated keys, GQA heads shared, visual tokens given as ``vis_idx`` [N, 2] (sample, position)."""
    layer = adapter.lm.layers[K]
    B = h_in_k.shape[0]
    q = layer.self_attn.q_proj(layer.input_layernorm(h_in_k[:, -1:])).view(B, 1, -1, adapter.head_dim)
    q = head_norm(layer.self_attn, "q", q)[:, 0]
    if cache is not None:
        keys = hf.layer_kv(cache, K)[0]
    else:
        _, keys = adapter.project_qk(K, h_in_k, cos, sin)
    counts = torch.bincount(vis_idx[:, 0], minlength=B)
    cu = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return _ops.glimpse_attention_map(q, cos[:, -1], sin[:, -1], keys, cu, vis_idx[:, 1],
                                      ext.valid if log_softmax else None, log_softmax=log_softmax)


class GlimpsePrune(PruneAfterLayer):
    """Options (all keyword):

    * ``threshold`` (0.5): keep a visual token when ``sigmoid(logit) > threshold``.
    * ``max_keep_ratio`` (None): cap on the kept fraction per image or video (top-k beyond it).
    * ``min_keep`` (1): floor on the kept count per image or video (top-k below it).
    * ``layer`` (None): K, the decoder layer after which tokens are pruned; defaults to the
      VIP's training layer, else the public per-model setting.
    * ``keep_ratio`` (None): keep exactly ``ceil(keep_ratio * N)`` top-scored tokens per image or video,
      ignoring the threshold (for benchmarks and tests).
    * ``vip`` (None): a directory written by :meth:`GlimpseModules.save`, a public GlimpsePrune
      checkpoint directory (``config.json`` + ``new_modules_gp.pt``), or a
      :class:`GlimpseModules`. Without one a randomly initialised VIP is used, with a warning.
    * ``seed`` (0): seed of that random VIP.
    """

    name = "glimpse"
    prunes_cache = True  # the caches of layers 0..K are compacted too: decoding sees only kept tokens

    def __init__(self, adapter, *, threshold=0.5, max_keep_ratio=None, min_keep=1, layer=None, keep_ratio=None,
                 vip=None, seed=0):
        threshold = check_fraction("threshold", threshold, low_open=False, allow_none=False)
        max_keep_ratio = check_fraction("max_keep_ratio", max_keep_ratio)
        check_fraction("keep_ratio", keep_ratio)
        min_keep = check_int("min_keep", min_keep, 0)
        n_layers = adapter.num_layers
        if layer is not None:
            layer = check_layer("layer", layer, n_layers)
        modules = self._resolve_vip(adapter, vip, layer, seed)
        trained_on = modules.config.model_type
        if trained_on and trained_on != adapter.model_type:
            raise ValueError(f"the VIP was trained for {trained_on!r} models, this is a {adapter.model_type!r} model "
                             "(its attention map and vision features differ); train one for this family")
        modules.check_compatible(
            llm_hidden_size=adapter.hidden_size,
            llm_num_layers=n_layers,
            llm_num_heads=adapter.num_heads,
            vision_width=adapter.vision_width(),
            num_vision_blocks=adapter.vision_depth(),
        )
        super().__init__(adapter, layer=layer if layer is not None else modules.config.layer, keep_ratio=keep_ratio,
                         keep_ratio_required=False)
        self.threshold = threshold
        self.max_keep_ratio = max_keep_ratio
        self.min_keep = min_keep
        if self.layer != modules.config.layer and vip is not None:
            warnings.warn(
                f"token_prune: the VIP was trained at layer {modules.config.layer} but pruning at layer "
                f"{self.layer}; its scores may be poor there",
                stacklevel=3,
            )
        param = next(adapter.model.parameters())
        self.modules = modules.to(device=param.device, dtype=param.dtype).eval()

    @classmethod
    def layer_defaults(cls, family, num_layers):
        return {"layer": family.glimpse_layer_for(num_layers)}

    @staticmethod
    def _resolve_vip(adapter, vip, layer, seed) -> GlimpseModules:
        if isinstance(vip, GlimpseModules):
            return vip
        if isinstance(vip, (str, os.PathLike)):
            path = os.fspath(vip)
            if os.path.isfile(os.path.join(path, "new_modules_gp.pt")):
                return GlimpseModules.from_public_checkpoint(path)
            return GlimpseModules.load(path)
        if vip is not None:
            raise TypeError(f"vip must be a path, a GlimpseModules or None, got {type(vip).__name__}")
        config = GlimpseConfig(
            llm_hidden_size=adapter.hidden_size,
            llm_num_layers=adapter.num_layers,
            llm_num_heads=adapter.num_heads,
            llm_rms_norm_eps=adapter.lm_config.rms_norm_eps,
            vision_width=adapter.vision_width(),
            vision_layers=adapter.default_vision_layers(),
            layer=layer if layer is not None else adapter.default_glimpse_layer(),
            glimpse_score=adapter.glimpse_score,
            model_type=adapter.model_type,
        )
        warnings.warn(
            "token_prune: no trained VIP given (vip=...): using a randomly initialised one, so the kept "
            "tokens are arbitrary. Train one with token_prune.train_vip or load a checkpoint.",
            stacklevel=4,
        )
        return GlimpseModules.random(config, seed=seed)

    def vision_layers(self) -> list[int]:
        return list(self.modules.config.vision_layers)

    def options(self) -> dict:
        return dict(threshold=self.threshold, max_keep_ratio=self.max_keep_ratio, min_keep=self.min_keep,
                    layer=self.layer, keep_ratio=self.keep_ratio)

    # -- the method on the shared skeleton -------------------------------------------------------
    def extend(self, rt, batch: TokenBatch) -> TokenBatch:
        """The prompt plus the glimpse token (layer-0 vector) at rotary position ``last + 1``."""
        B, S, H = batch.hidden.shape
        self._gvec = self.modules.glimpse.all_layers(self.layer).to(batch.hidden.dtype)  # [K+1, H]
        hidden = torch.cat([batch.hidden, self._gvec[0].view(1, 1, H).expand(B, 1, H)], 1)
        gpos = batch.pos[:, :, -1:].amax(0, keepdim=True) + 1
        pos = torch.cat([batch.pos, gpos.expand(batch.pos.shape[0], -1, -1)], 2)
        text_pos = None
        if batch.text_pos is not None:
            text_pos = torch.cat([batch.text_pos, batch.text_pos[:, -1:] + 1], 1)
        mask2d = batch.mask2d
        if mask2d is not None:
            mask2d = torch.cat([mask2d, mask2d.new_ones(B, 1)], 1)
        return TokenBatch(hidden, pos, text_pos, mask2d,
                          torch.cat([batch.index, batch.index.new_full((B, 1), -1)], 1),
                          torch.cat([batch.visual, batch.visual.new_zeros(B, 1)], 1), batch.deepstack)

    def before_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # Each layer's own projected glimpse vector is added to the glimpse token's state.
        if layer > 0:
            hidden[:, -1] += self._gvec[layer]
        return hidden

    def select(self, rt, view: LayerKView) -> torch.Tensor:
        """The VIP's logits from the glimpse map at layer K and the vision features, then the
        keep rule (threshold, cap, floor, or an exact ``keep_ratio``) per image."""
        logits = self.score(rt, view)
        with nvtx.range("glimpse.keep_rule"):
            return keep_mask_from_scores(logits, view.sizes, threshold=self.threshold,
                                         max_keep_ratio=self.max_keep_ratio, min_keep=self.min_keep,
                                         keep_ratio=self.keep_ratio)

    def score(self, rt, view: LayerKView) -> torch.Tensor:
        """[N] VIP logits of the visual tokens."""
        adapter, K, mods = self.adapter, self.layer, self.modules
        seq, prompt, (cos, sin) = view.seq, view.prompt, view.rope
        h_in_k, cache = seq.hidden, view.cache
        S = prompt.hidden.shape[1]
        dev = h_in_k.device
        log_softmax = mods.config.glimpse_score == "log_softmax"
        with nvtx.range("glimpse.map"):
            if _ops.kernels_active(dev, h_in_k):
                vis_idx = prompt.visual.nonzero()  # [N, 2] (sample, position)
                attn_map = _fused_glimpse_map(adapter, K, h_in_k, cos, sin, cache, seq, vis_idx, log_softmax)
            else:
                q, _ = adapter.project_qk(K, h_in_k[:, -1:], cos[:, -1:], sin[:, -1:], want_k=False)
                if cache is not None:
                    keys = hf.layer_kv(cache, K)[0]
                else:
                    _, keys = adapter.project_qk(K, h_in_k, cos, sin)
                keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
                acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32 for the dot products
                scores = (q.to(acc) @ keys.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, heads, 1, S+1]
                if log_softmax:
                    scores = scores.masked_fill(~seq.valid[:, None, None, :], float("-inf")).log_softmax(-1)
                attn_map = scores[:, :, 0, :S].transpose(1, 2)[prompt.visual]  # [N, heads]

        layout = rt.ctx.image_grids  # VIP segments: grids [n, 2], or (positions [N, 2], tokens per segment)
        if isinstance(layout, torch.Tensor):
            where = dict(grid_hw=layout.to(dev))
        else:
            where = dict(positions=layout[0].to(dev), lengths=[int(n) for n in layout[1]])
        if sum(view.sizes) != attn_map.shape[0]:
            raise RuntimeError(f"token_prune: {attn_map.shape[0]} image tokens in the prompt but the image layout "
                               f"gives {sum(view.sizes)}")
        wdtype = next(mods.parameters()).dtype
        conds = [c.to(wdtype) for c in rt.ctx.vision_features]
        with nvtx.range("glimpse.vip"):
            return mods.vip(attn_map.to(wdtype), conds, **where)
