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
   the keep rule picks the survivors per image.
4. Hidden states, the KV cache of layers ``0..K``, positions and mask are compacted to text +
   kept visual tokens (the glimpse token goes too); layers ``K+1..`` run on the short sequence.
   Every layer's cache then holds only kept tokens, so decoding is cheaper as well.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from .. import hf, nvtx
from ..runtime import (PrefillResult, TokenBatch, causal_mask, compact_batch, keep_mask_from_scores, run_layers,
                       sample_stats)
from .. import _ops
from ..vip import GlimpseConfig, GlimpseModules


def _check_fraction(name, value, low_open=True):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def _fused_glimpse_map(adapter, K, h_in_k, cos, sin, cache, ext, vis_idx, log_softmax):
    """The glimpse attention map [N, heads] through the fused ``glimpse_attention_map`` kernel:
    the glimpse query of layer K before rotary (the kernel rotates it) against the layer's
    rotated keys, GQA heads shared, visual tokens given as ``vis_idx`` [N, 2] (sample, position)."""
    layer = adapter.lm.layers[K]
    B = h_in_k.shape[0]
    q = layer.self_attn.q_proj(layer.input_layernorm(h_in_k[:, -1:])).view(B, -1, adapter.head_dim)
    if cache is not None:
        keys = hf.layer_kv(cache, K)[0]
    else:
        _, keys = adapter.project_qk(K, h_in_k, cos, sin)
    counts = torch.bincount(vis_idx[:, 0], minlength=B)
    cu = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return _ops.glimpse_attention_map(q, cos[:, -1], sin[:, -1], keys, cu, vis_idx[:, 1],
                                      ext.valid if log_softmax else None, log_softmax=log_softmax)


class GlimpsePrune:
    """Options (all keyword):

    * ``threshold`` (0.5): keep a visual token when ``sigmoid(logit) > threshold``.
    * ``max_keep_ratio`` (None): cap on the kept fraction per image (top-k beyond it).
    * ``min_keep`` (1): floor on the kept count per image (top-k below it).
    * ``layer`` (None): K, the decoder layer after which tokens are pruned; defaults to the
      VIP's training layer, else the public per-model setting.
    * ``keep_ratio`` (None): keep exactly ``ceil(keep_ratio * N)`` top-scored tokens per image,
      ignoring the threshold (for benchmarks and tests).
    * ``vip`` (None): a directory written by :meth:`GlimpseModules.save`, a public GlimpsePrune
      checkpoint directory (``config.json`` + ``new_modules_gp.pt``), or a
      :class:`GlimpseModules`. Without one a randomly initialised VIP is used, with a warning.
    * ``seed`` (0): seed of that random VIP.
    """

    name = "glimpse"

    def __init__(self, adapter, *, threshold=0.5, max_keep_ratio=None, min_keep=1, layer=None, keep_ratio=None,
                 vip=None, seed=0):
        _check_fraction("threshold", threshold, low_open=False)
        _check_fraction("max_keep_ratio", max_keep_ratio)
        _check_fraction("keep_ratio", keep_ratio)
        if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
            raise ValueError(f"min_keep must be a non-negative int, got {min_keep!r}")
        n_layers = adapter.num_layers
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layer must be an int, got {type(layer).__name__}")
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer must be in [0, {n_layers - 1}] for this {n_layers}-layer model, got {layer}")
        self.adapter = adapter
        self.threshold = float(threshold)
        self.max_keep_ratio = max_keep_ratio
        self.min_keep = min_keep
        self.keep_ratio = keep_ratio

        modules = self._resolve_vip(adapter, vip, layer, seed)
        modules.check_compatible(
            llm_hidden_size=adapter.hidden_size,
            llm_num_layers=n_layers,
            llm_num_heads=adapter.num_heads,
            vision_width=adapter.vision_width(),
            num_vision_blocks=adapter.vision_depth(),
        )
        self.layer = layer if layer is not None else modules.config.layer
        if self.layer != modules.config.layer and vip is not None:
            warnings.warn(
                f"token_prune: the VIP was trained at layer {modules.config.layer} but pruning at layer "
                f"{self.layer}; its scores may be poor there",
                stacklevel=3,
            )
        param = next(adapter.model.parameters())
        self.modules = modules.to(device=param.device, dtype=param.dtype).eval()

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

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, rt, lm, batch: TokenBatch, cache, use_cache, kwargs):
        """Run all decoder layers on ``batch``, pruning after layer K.

        Returns (hidden [B, S', H] before the final norm, the compacted batch, per-sample stats).
        """
        adapter = rt.adapter
        ctx = rt.ctx
        K = self.layer
        mods = self.modules
        B, S, H = batch.hidden.shape
        dev = batch.hidden.device
        gvec = mods.glimpse.all_layers(K).to(batch.hidden.dtype)  # [K+1, H]

        # 1. Append the glimpse token after the last prompt token.
        hidden = torch.cat([batch.hidden, gvec[0].view(1, 1, H).expand(B, 1, H)], 1)
        gpos = batch.pos[:, :, -1:].amax(0, keepdim=True) + 1
        pos = torch.cat([batch.pos, gpos.expand(batch.pos.shape[0], -1, -1)], 2)
        text_pos = None
        if batch.text_pos is not None:
            text_pos = torch.cat([batch.text_pos, batch.text_pos[:, -1:] + 1], 1)
        mask2d = batch.mask2d
        if mask2d is not None:
            mask2d = torch.cat([mask2d, mask2d.new_ones(B, 1)], 1)
        ext = TokenBatch(hidden, pos, text_pos, mask2d,
                         torch.cat([batch.index, batch.index.new_full((B, 1), -1)], 1),
                         torch.cat([batch.visual, batch.visual.new_zeros(B, 1)], 1))

        mask = causal_mask(lm.config, hidden, mask2d)
        cos, sin = adapter.rotary(hidden, pos)
        layers = lm.layers
        h_in_k = None
        with nvtx.range("glimpse.layers_0_K"):
            for i in range(K + 1):
                if i > 0:
                    hidden[:, -1] += gvec[i]
                if i == K:
                    h_in_k = hidden
                hidden = hf.call_layer(layers[i], hidden, mask=mask, rope=(cos, sin), text_pos=text_pos, cache=cache,
                                       use_cache=use_cache, **kwargs)

        # 2. Glimpse attention map at layer K.
        # On a GPU: the fused kernel, with the visual tokens as (sample, position) pairs.
        vis_idx = batch.visual.nonzero() if _ops.kernels_active(dev, h_in_k) else None  # [N, 2]
        with nvtx.range("glimpse.map"):
            if vis_idx is not None:
                attn_map = _fused_glimpse_map(adapter, K, h_in_k, cos, sin, cache, ext, vis_idx,
                                              mods.config.glimpse_score == "log_softmax")
            else:
                q, _ = adapter.project_qk(K, h_in_k[:, -1:], cos[:, -1:], sin[:, -1:], want_k=False)
                if cache is not None:
                    keys = hf.layer_kv(cache, K)[0]
                else:
                    _, keys = adapter.project_qk(K, h_in_k, cos, sin)
                groups = q.shape[1] // keys.shape[1]
                keys = keys.repeat_interleave(groups, dim=1)
                acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32 for the dot products
                scores = (q.to(acc) @ keys.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, heads, 1, S+1]
                if mods.config.glimpse_score == "log_softmax":
                    scores = scores.masked_fill(~ext.valid[:, None, None, :], float("-inf")).log_softmax(-1)
                attn_map = scores[:, :, 0, :S].transpose(1, 2)[batch.visual]  # [N, heads]

        # 3. VIP logits and the keep rule, per image.
        layout = ctx.image_grids  # grids [n_images, 2], or (positions [N, 2], tokens per image)
        if isinstance(layout, torch.Tensor):
            sizes, where = (layout[:, 0] * layout[:, 1]).tolist(), dict(grid_hw=layout.to(dev))
        else:
            sizes = [int(n) for n in layout[1]]
            where = dict(positions=layout[0].to(dev), lengths=sizes)
        n_vis = int(batch.visual.sum())
        if sum(sizes) != n_vis:
            raise RuntimeError(f"token_prune: {n_vis} image tokens in the prompt but the image grids give {sum(sizes)}")
        wdtype = next(mods.parameters()).dtype
        conds = [c.to(wdtype) for c in ctx.vision_features]
        with nvtx.range("glimpse.vip"):
            logits = mods.vip(attn_map.to(wdtype), conds, **where)
            keep_vis = keep_mask_from_scores(
                logits, sizes, threshold=self.threshold, max_keep_ratio=self.max_keep_ratio,
                min_keep=self.min_keep, keep_ratio=self.keep_ratio,
            )
        keep = ext.valid & ~ext.visual
        if vis_idx is not None:
            keep[vis_idx[:, 0], vis_idx[:, 1]] = keep_vis  # no host sync
        else:
            keep[:, :S][batch.visual] = keep_vis
        keep[:, -1] = False

        # 4. Compact hidden states and the cache of layers 0..K; run the rest on the short sequence.
        ext.hidden = hidden
        with nvtx.range("glimpse.compact"):
            caches = []
            if cache is not None:
                for i in range(K + 1):
                    caches += list(hf.layer_kv(cache, i))
            short, caches = compact_batch(ext, keep, caches)
            if cache is not None:
                for i in range(K + 1):
                    hf.set_layer_kv(cache, i, caches[2 * i], caches[2 * i + 1])
            if short.mask2d is not None and bool(short.mask2d.bool().all()):
                short.mask2d = None
        with nvtx.range("glimpse.layers_K1_L"):
            hidden = run_layers(rt, lm, short, range(K + 1, len(layers)), cache, use_cache, kwargs)
        short.hidden = hidden
        return PrefillResult(hidden, short, sample_stats(batch, keep_vis, sizes))
