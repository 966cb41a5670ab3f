"""ALVTS: adaptive layer-wise visual token selection (training-free skip-and-merge).

Before every decoder layer from ``start_layer`` on, a cheap selector derived from the layer's own
query/key projections scores all visual tokens; the top ``ceil(keep_ratio * N)`` of each image go
through the layer with all text tokens, the others skip it (attention and MLP), their hidden state
passing through unchanged, and both streams are merged back in the original order. All tokens
stay in the residual stream, so a token skipped at one layer can be selected at the next.

Score of visual token i (per sample, real tokens only, causal like the layer itself):
``S(i) = mean_j∈visual A[j, i] * mean_j∈text A[j, i]``, with ``A`` the layer's attention averaged
over heads in the full-rank score S* (:func:`selection_scores` on the layer's exact q/k). The
selector approximates it in a rank-R space (:mod:`~token_prune.methods.alvts_selector`: one
rotary-aware map per KV group by default, or the full-width low-rank q/k), calibrated to S* by
:func:`~token_prune.alvts_calibration.calibrate_alvts`; its score runs as the fused two-pass op
``causal_attention_received``.

What a skipped token contributes at a layer it skips is left open by the paper; the ``skipped``
option picks one of two readings:

* ``"context"`` (default): the skipped token is not updated by the layer (no query, output
  projection or MLP for it), but its unchanged hidden state still provides a key and a value,
  so the text and the selected tokens attend to every visual token at every layer. Skipped rows
  cost only their K/V projections (about 1.6% of a token-layer for Qwen2.5-VL-7B with GQA), and
  every layer's KV cache holds the whole prompt, so decoding is as fast as unpatched. At a
  linear-attention layer (hybrid decoders such as Qwen3.5) the same reading means: every token
  enters the recurrence (its key and value update the state, so the state summarises the whole
  prompt), only the selected tokens take the layer's output and MLP.

On a hybrid decoder a linear-attention layer has no softmax attention of its own to score with;
its tokens are scored with the low-rank q/k of the next attention layer (from the linear layer's
own input), the closest thing to "the attention this token would receive" the model has.
* ``"drop"``: the skipped token is invisible at that layer (at a linear-attention layer of a
  hybrid decoder: it does not enter the recurrence), so that layer's KV cache holds only
  the tokens it processed; decoding keeps exactly that (at layer l a new token attends to the
  text tokens and the visual tokens layer l selected), with one mask per layer (see
  ``handle.stats[i]["kv_len"]``). Smaller caches and faster decoding, but every layer only sees
  ``keep_ratio`` of the image.

On the package's accuracy benchmark (``bench/results/accuracy_*.md``) the two differ sharply at
``keep_ratio=0.111``: see the ALVTS rows there.
"""

from __future__ import annotations

import math
import os

import torch

from .. import _ops, hf, nvtx
from ..runtime import PrefillResult, causal_mask, compact_batch, keep_mask_from_scores, sample_stats
from .alvts_selector import (FullWidthSelector, GroupRopeSelector, LowRankSelector, check_form, default_form,
                             default_rank, selector_class, svd_factors)
from .base import PruningMethod, check_fraction, check_int, check_layer, image_sizes

SKIPPED_MODES = ("context", "drop")


def selection_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor,
                     chunk: int = 1024, impl: str = "auto") -> torch.Tensor:
    """ALVTS importance of every token: mean attention received from visual queries times mean
    attention received from text queries (causal, real tokens only, head-averaged).

    Two implementations of the same number:

    * ``"chunked"``: explicit softmax over query blocks of ``chunk`` rows in float32 (float64 for
      float64 inputs), so no [S, S] matrix per head is held at once. Differentiable in q and k
      (calibration uses it); the reference for the other.
    * ``"sdpa"``: the value-gradient of one ``scaled_dot_product_attention`` call. For
      ``out = softmax(q k^T / sqrt(d)) v``, ``d<out, g>/dv = P^T g``: with ``g`` holding the
      per-query weights (1 for visual queries in one channel, 1 for text queries in another),
      ``dv`` is the attention each key receives from each group, and the fused (flash /
      memory-efficient) attention kernels compute it without any [S, S] matrix in memory, in the
      input dtype with float32 accumulation. Not differentiable.

    ``"auto"`` picks ``"sdpa"`` on a GPU unless q or k needs gradients, else ``"chunked"``.

    Args:
        q: [B, heads, S, d]; k: [B, kv_heads, S, d] (rotary applied).
        valid: [B, S] bool real tokens, or None when there is no padding (lets the fused path
            use the plain causal kernel without looking at the mask on the host).
        visual: [B, S] bool visual tokens.

    Returns:
        [B, S] float scores (meaningful at visual positions).
    """
    if impl == "auto":
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        impl = "sdpa" if q.is_cuda and not needs_grad else "chunked"
    if impl == "sdpa":
        return _selection_scores_sdpa(q, k, valid, visual)
    if impl != "chunked":
        raise ValueError(f"impl must be 'auto', 'chunked' or 'sdpa', got {impl!r}")
    B, h, S, d = q.shape
    if valid is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=q.device)
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(acc), k.to(acc)
    vis_q = (visual & valid).to(acc)
    txt_q = (~visual & valid).to(acc)
    recv_vis = q.new_zeros(B, S)
    recv_txt = q.new_zeros(B, S)
    kpos = torch.arange(S, device=q.device)
    scale = 1.0 / math.sqrt(d)
    for start in range(0, S, chunk):
        stop = min(S, start + chunk)
        logits = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scale  # [B, h, c, S]
        allowed = valid[:, None, None, :] & (kpos[None, None, None, :] <= torch.arange(start, stop, device=q.device)[None, None, :, None])
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(logits.softmax(-1)).mean(1)  # [B, c, S]; padded rows are all -inf
        recv_vis += (probs * vis_q[:, start:stop, None]).sum(1)
        recv_txt += (probs * txt_q[:, start:stop, None]).sum(1)
    n_vis = vis_q.sum(1, keepdim=True).clamp(min=1)
    n_txt = txt_q.sum(1, keepdim=True).clamp(min=1)
    return (recv_vis / n_vis) * (recv_txt / n_txt)


def _selection_scores_sdpa(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """:func:`selection_scores` as the value-gradient of one fused attention call (see there)."""
    import torch.nn.functional as F

    B, h, S, d = q.shape
    mask = None
    if valid is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=q.device)
    else:
        pos = torch.arange(S, device=q.device)
        mask = valid[:, None, None, :] & (pos[None, :] <= pos[:, None])[None, None]
        # A padding row sees itself only: no all-masked row (NaN), and its weight is zero anyway.
        mask = mask | (~valid[:, None, :, None] & torch.eye(S, dtype=torch.bool, device=q.device)[None, None])
    vis_q = visual & valid
    txt_q = ~visual & valid
    # Under torch.inference_mode the inputs are inference tensors, which autograd may not save.
    with torch.inference_mode(False), torch.enable_grad():
        qq = q.detach().clone()
        kk = k.detach().repeat_interleave(h // k.shape[1], dim=1)
        v = torch.zeros_like(qq, requires_grad=True)
        out = F.scaled_dot_product_attention(qq, kk, v, attn_mask=mask, is_causal=mask is None)
        g = torch.zeros_like(out)
        g[..., 0] = vis_q[:, None, :].to(g.dtype)
        g[..., 1] = txt_q[:, None, :].to(g.dtype)
        (dv,) = torch.autograd.grad(out, v, g)
    acc = torch.promote_types(q.dtype, torch.float32)
    recv = dv[..., :2].to(acc).sum(1)  # [B, S, 2], summed over heads
    n_vis = vis_q.sum(1, keepdim=True).clamp(min=1).to(acc) * h
    n_txt = txt_q.sum(1, keepdim=True).clamp(min=1).to(acc) * h
    return (recv[..., 0] / n_vis) * (recv[..., 1] / n_txt)


def topk_per_image(scores: torch.Tensor, visual: torch.Tensor, sizes: list[int], keep_ratio: float) -> torch.Tensor:
    """[B, S] bool: the top ``ceil(keep_ratio * n)`` visual tokens of each image (ties to the earlier token)."""
    sel = torch.zeros_like(visual)
    sel[visual] = keep_mask_from_scores(scores[visual], sizes, keep_ratio=keep_ratio, scores_are_logits=False)
    return sel


def scatter_rows(full: torch.Tensor, packed: torch.Tensor, index: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Write rows of ``packed`` [B, S', H] into a copy of ``full`` [B, S, H] at ``index`` [B, S']
    (original positions, -1 for padding slots, which are skipped).

    On a GPU this is the ``scatter_rows`` kernel; with ``inplace`` it may write into ``full``
    itself (then only the packed rows move; the caller must own ``full``)."""
    if _ops.kernels_active(full.device, full, packed):
        return _ops.scatter_rows(full, packed, index, inplace=inplace)
    out = full.clone()
    ok = index >= 0
    rows = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(index)
    out[rows[ok], index[ok]] = packed[ok]
    return out


class ALVTS(PruningMethod):
    """Options: ``keep_ratio`` (0.11), ``rank`` (None: the form's per-model default),
    ``start_layer`` (0), ``selector`` (None: the SVD start of each layer's q/k; or a directory from
    :func:`~token_prune.alvts_calibration.calibrate_alvts`, or a selector module),
    ``selector_form`` (``"group_rope"``, the default, or ``"full_width"``, the default on decoders
    with per-head q/k norms; see
    :mod:`~token_prune.methods.alvts_selector`; a given selector brings its own form),
    ``skipped`` (``"context"`` or ``"drop"``: what a skipped token is at a layer it skips; see the
    module docstring)."""

    name = "alvts"

    def __init__(self, adapter, *, keep_ratio: float = 0.11, rank: int | None = None, start_layer: int = 0,
                 selector=None, selector_form: str | None = None, skipped: str = "context"):
        super().__init__(adapter)
        self.keep_ratio = check_fraction("keep_ratio", keep_ratio, allow_none=False)
        if skipped not in SKIPPED_MODES:
            raise ValueError(f"skipped must be one of {SKIPPED_MODES}, got {skipped!r}")
        self.skipped = skipped
        n = adapter.num_layers
        self.start_layer = start_layer = check_layer("start_layer", start_layer, n)
        if rank is not None:
            rank = check_int("rank", rank, 1)
        if selector_form is not None:
            check_form(selector_form)
        # A linear-attention layer (hybrid decoders) has no softmax attention to score with: it is
        # scored with the q/k of the next attention layer, from its own input.
        attention = hf.attention_layers(adapter.lm_config)
        self.score_layer = {i: next((j for j in attention if j >= i), attention[-1]) for i in range(start_layer, n)}
        self.linear = set(range(n)) - set(attention)
        layers = sorted(set(self.score_layer.values()))
        if selector is None:
            form = selector_form or default_form(adapter)
            self.rank = rank or default_rank(adapter, form)
            cls = selector_class(form)
            cls.check_rank(adapter, self.rank)
            self.selector = cls.from_weights(adapter, self.rank, layers)
            self.selector_source = "svd"
        else:
            if isinstance(selector, LowRankSelector):
                sel = selector
            elif isinstance(selector, (str, os.PathLike)):
                sel, _ = LowRankSelector.load(selector)
            else:
                raise TypeError(f"selector must be a path, a LowRankSelector or None, got {type(selector).__name__}")
            if selector_form is not None and selector_form != sel.form:
                raise ValueError(f"selector_form={selector_form!r} but the selector given is a {sel.form!r} selector")
            sel.check_compatible(adapter)
            if rank is not None and rank != sel.rank:
                raise ValueError(f"rank={rank} but the selector was calibrated at rank {sel.rank}")
            missing = [l for l in layers if not sel.has(l)]
            if missing:
                raise ValueError(f"the ALVTS selector has no factors for layers {missing}")
            self.selector, self.rank = sel, sel.rank
            self.selector_source = os.fspath(selector) if not isinstance(selector, LowRankSelector) else "module"
        self.selector_form = self.selector.form
        param = next(adapter.model.parameters())
        self.selector.to(device=param.device, dtype=param.dtype)  # floating tensors only: freq stays int64
        self.last_processed: list[torch.Tensor] = []

    def options(self) -> dict:
        return dict(keep_ratio=self.keep_ratio, rank=self.rank, start_layer=self.start_layer,
                    selector=self.selector_source, selector_form=self.selector_form, skipped=self.skipped)

    def prefill(self, rt, lm, batch, cache, use_cache, kwargs) -> PrefillResult:
        adapter = rt.adapter
        sizes = image_sizes(batch.visual, rt.ctx.image_sizes)
        layers = lm.layers
        full_valid = batch.valid
        hidden = batch.hidden
        cos, sin = adapter.rotary(hidden, batch.pos)
        full_mask = causal_mask(lm.config, hidden, batch.mask2d)
        layer_masks, processed = [], []
        # [layers] of [B, S] bool: the prompt tokens each layer processed (for stats, plots, tests).
        self.last_processed = []
        owned = False  # whether `hidden` is a tensor of this prefill (not the caller's), so it may be updated in place
        context = self.skipped == "context"  # skipped rows stay keys/values; caches hold every token
        for i, layer in enumerate(layers):
            if i < self.start_layer:
                self.last_processed.append(full_valid.clone())
                hidden = hf.call_layer(layer, hidden, mask=full_mask, rope=(cos, sin), text_pos=batch.text_pos,
                                       cache=cache, use_cache=use_cache, **kwargs)
                hidden = batch.add_deepstack(i, hidden)
                owned = True
                layer_masks.append(full_valid.long())
                processed.append(batch.visual.sum(1))
                continue
            with nvtx.range("alvts.select"):
                # The selector and the context reading's keys/values both start from this layer's
                # input norm of every token: computed once.
                normed = layer.input_layernorm(hidden) if context and self.score_layer[i] == i else None
                scores = self.selector.scores(adapter, self.score_layer[i], hidden, cos, sin,
                                              None if batch.mask2d is None else full_valid, batch.visual,
                                              normed=normed)
                sel = topk_per_image(scores, batch.visual, sizes, self.keep_ratio)
                keep = full_valid & (~batch.visual | sel)
            self.last_processed.append(keep)
            batch.hidden = hidden
            with nvtx.range("alvts.compact"):
                sub, _ = compact_batch(batch, keep, [])
                scos, ssin = adapter.rotary(sub.hidden, sub.pos)
                if not context:
                    mask2d = sub.mask2d if not bool(sub.mask2d.bool().all()) else None
                    mask = causal_mask(lm.config, sub.hidden, mask2d)
            with nvtx.range("alvts.layer"):
                if context and i in self.linear:
                    out = adapter.linear_rows_with_context(i, hidden, batch.mask2d, sub.index, sub.hidden, cache=cache)
                elif context:
                    out = adapter.layer_rows_with_context(i, hidden, cos, sin, full_valid, sub.index, sub.hidden,
                                                          scos, ssin, cache=cache, normed=normed)
                else:
                    out = hf.call_layer(layer, sub.hidden, mask=mask, rope=(scos, ssin), text_pos=sub.text_pos,
                                        cache=cache, use_cache=use_cache, **kwargs)
            with nvtx.range("alvts.merge"):
                hidden = scatter_rows(hidden, out, sub.index, inplace=owned)
                owned = True
                # The deepstack row belongs to the token: a token that skipped the layer gets it too.
                hidden = batch.add_deepstack(i, hidden)
            if not context:
                layer_masks.append(sub.valid.long())
            processed.append(sel.sum(1))
        batch.hidden = hidden
        per_layer = torch.stack(processed, 1).tolist()  # [B, layers]
        # Nothing leaves the sequence: every item keeps all its tokens; what varies is per layer.
        every = torch.ones(int(batch.visual.sum()), dtype=torch.bool)
        stats = sample_stats(batch, every, sizes, rt.ctx.item_kinds)
        for b, s in enumerate(stats):
            n = s["visual_tokens"]
            s.update(visual_processed=per_layer[b], processed_ratio=[p / n if n else 1.0 for p in per_layer[b]])
        if context:
            layer_masks = None  # every layer's cache holds the whole prompt: one shared decode mask
        return PrefillResult(hidden, batch, stats, layer_masks)
