"""Plain PyTorch references of token_prune's compiled operators.

Each function here is the test oracle for the op of the same name (without the
``_ref`` suffix) and the fallback used when the compiled extension is missing.
They favour obviousness over speed: loops over the batch, boolean indexing.
They are written independently of the C++/CUDA code on purpose, so keep them
that way (do not call ``torch.ops.token_prune`` from here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "causal_attention_received_ref",
    "compact_tokens_ref",
    "glimpse_attention_map_ref",
    "keep_mask_ref",
    "rope_2d_tables_ref",
    "scatter_rows_ref",
    "vip_attention_ref",
]


def _fail(message: str) -> None:
    raise RuntimeError(f"compact_tokens_ref: {message}")


def _covering_offsets(op: str, cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """``cu_seqlens`` as ints, checked to run from 0 to ``total`` without decreasing."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    if not cu or cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
        raise RuntimeError(f"{op}: cu_seqlens must run from 0 to the token count {total} without decreasing, "
                           f"got {cu}")
    return cu


def compact_tokens_ref(
    keep: torch.Tensor,
    hidden: torch.Tensor,
    caches: Sequence[torch.Tensor],
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    out_len: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Reference for :func:`token_prune._ops.compact_tokens`.

    Shapes (B batch, S sequence, L = ``out_len``):

    * ``keep``: bool ``[B, S]``.
    * ``hidden``: ``[B, S, D]`` -> ``[B, L, D]``.
    * ``caches``: each ``[B, H_i, S, d_i]`` -> ``[B, H_i, L, d_i]``.
    * ``position_ids``: int64 ``[P, B, S]`` -> ``[P, B, L]`` (``[B, S]`` ->
      ``[B, L]`` is accepted too).
    * ``attention_mask``: integer or bool ``[B, S]`` -> ``[B, L]``.

    The kept positions of sample ``b`` (in increasing order) land in slots
    ``L - n_b .. L - 1``; every other slot is zero. ``out_len`` defaults to
    the largest ``n_b``.
    """
    if keep.dim() != 2 or keep.dtype != torch.bool:
        _fail(f"keep must be a 2-D bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    batch, seq = keep.shape
    counts = [int(keep[b].sum()) for b in range(batch)]
    if out_len is None:
        out_len = max(counts, default=0)
    out_len = int(out_len)
    for b, n in enumerate(counts):
        if n > out_len:
            _fail(f"out_len ({out_len}) is smaller than the {n} kept tokens of sample {b}")

    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (batch, seq):
        _fail(f"hidden must be [{batch}, {seq}, D], got {tuple(hidden.shape)}")
    for i, cache in enumerate(caches):
        if cache.dim() != 4 or cache.shape[0] != batch or cache.shape[2] != seq:
            _fail(f"caches[{i}] must be [{batch}, H, {seq}, d], got {tuple(cache.shape)}")
    flat_positions = position_ids.dim() == 2
    positions = position_ids.unsqueeze(0) if flat_positions else position_ids
    if positions.dim() != 3 or tuple(positions.shape[1:]) != (batch, seq):
        _fail(f"position_ids must be [P, {batch}, {seq}], got {tuple(position_ids.shape)}")
    if positions.dtype != torch.int64:
        _fail(f"position_ids must be int64, got {positions.dtype}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seq):
        _fail(f"attention_mask must be [{batch}, {seq}], got {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        _fail(f"attention_mask must be an integer or bool tensor, got {attention_mask.dtype}")

    hidden_out = hidden.new_zeros((batch, out_len, hidden.shape[2]))
    caches_out = [c.new_zeros((batch, c.shape[1], out_len, c.shape[3])) for c in caches]
    positions_out = positions.new_zeros((positions.shape[0], batch, out_len))
    mask_out = attention_mask.new_zeros((batch, out_len))

    for b in range(batch):
        rows = keep[b]
        start = out_len - counts[b]
        hidden_out[b, start:] = hidden[b][rows]
        for cache, cache_out in zip(caches, caches_out):
            cache_out[b, :, start:] = cache[b][:, rows]
        positions_out[:, b, start:] = positions[:, b][:, rows]
        mask_out[b, start:] = attention_mask[b][rows]

    if flat_positions:
        positions_out = positions_out.squeeze(0)
    return hidden_out, caches_out, positions_out, mask_out


# ---------------------------------------------------------------------------
# glimpse attention map
# ---------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def glimpse_attention_map_ref(
    q: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    cu_seqlens: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    log_softmax: bool = False,
) -> torch.Tensor:
    """Reference for :func:`token_prune._ops.glimpse_attention_map`.

    One query per sample and head against the keys of that sample's visual
    tokens (GQA: query head ``h`` reads key head ``h // (Hq / Hkv)``).

    * ``q``: ``[B, Hq, d]``, the glimpse token's query *before* rotary.
    * ``cos``, ``sin``: ``[B, d]``, the rotary tables at the glimpse token's
      position; the query is rotated as ``q*cos + rotate_half(q)*sin`` in
      float32 (float64 for float64 inputs), not rounded.
    * ``keys``: ``[B, Hkv, S, d]``, rotated keys (a layer's KV cache).
    * ``cu_seqlens``: int ``[B + 1]``; sample ``b``'s visual tokens are
      entries ``cu[b]:cu[b+1]`` of ``positions``; must run from 0 to
      ``N_v`` without decreasing (raises otherwise).
    * ``positions``: int ``[N_v]``, each visual token's index into ``S``.
    * ``key_mask``: ``[B, S]`` (nonzero = real key) or None (all real); only
      read in log-softmax mode.
    * ``scale``: defaults to ``1/sqrt(d)``.
    * ``log_softmax``: False: scaled logits ``q.k * scale``. True: their
      log-softmax over all real keys of the sample (``-inf`` at keys the mask
      marks as not real).

    Returns float32 ``[N_v, Hq]`` (float64 for float64 ``q``).
    """
    if q.dim() != 3 or cos.dim() != 2 or sin.dim() != 2 or keys.dim() != 4:
        raise RuntimeError("glimpse_attention_map_ref: expected q [B, Hq, d], cos/sin [B, d], keys [B, Hkv, S, d]")
    batch, heads, dim = q.shape
    kv_heads, seq = keys.shape[1], keys.shape[2]
    if heads % kv_heads:
        raise RuntimeError(f"glimpse_attention_map_ref: {heads} query heads do not split over {kv_heads} key heads")
    acc = torch.promote_types(q.dtype, torch.float32)
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    qf = q.to(acc)
    c, s = cos.to(acc)[:, None, :], sin.to(acc)[:, None, :]
    q_rot = qf * c + _rotate_half(qf) * s  # [B, Hq, d]
    k = keys.to(acc).repeat_interleave(heads // kv_heads, dim=1)  # [B, Hq, S, d]
    logits = (q_rot[:, :, None, :] @ k.transpose(-1, -2))[:, :, 0, :] * scale  # [B, Hq, S]
    if log_softmax:
        real = torch.ones(batch, seq, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
        logits = logits.masked_fill(~real[:, None, :], float("-inf")).log_softmax(-1)
        # A sample with no real key at all gives NaN rows; its (padding) keys are -inf.
        logits = logits.masked_fill(~real[:, None, :], float("-inf"))
    if cu_seqlens.numel() != batch + 1:
        raise RuntimeError(f"glimpse_attention_map_ref: cu_seqlens must have B + 1 = {batch + 1} entries, "
                           f"got {cu_seqlens.numel()}")
    cu = _covering_offsets("glimpse_attention_map_ref", cu_seqlens, positions.shape[0])
    out = logits.new_empty((positions.shape[0], heads))
    for b in range(batch):
        pos = positions[cu[b]:cu[b + 1]].long()
        out[cu[b]:cu[b + 1]] = logits[b][:, pos].transpose(0, 1)
    return out


# ---------------------------------------------------------------------------
# VIP conditional attention
# ---------------------------------------------------------------------------


def rope_2d_tables_ref(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin ``[N, head_dim]`` of the VIP's 2D RoPE (the Qwen ViT convention).

    ``half = head_dim / 2``; ``inv_freq = 1 / theta^(arange(0, half, 2) / half)``;
    angles ``[row * inv_freq, col * inv_freq]``; tables cos/sin of
    ``[angles, angles]``.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=dtype, device=positions.device) / half))
    row = positions[:, 0].to(dtype)
    col = positions[:, 1].to(dtype)
    angles = torch.cat([row[:, None] * inv_freq, col[:, None] * inv_freq], dim=-1)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def vip_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
    theta: float = 10000.0,
) -> torch.Tensor:
    """Reference for :func:`token_prune._ops.vip_attention`.

    * ``q``, ``k``: ``[N, H, D]`` before rotary (``D`` divisible by 4);
      ``v``: ``[N, H, Dv]``; one dtype.
    * ``positions``: int ``[N, 2]``, each token's (row, col) on its image.
    * ``cu_seqlens``: int ``[n_images + 1]``; image ``i`` owns tokens
      ``cu[i]:cu[i+1]`` and attends only within them, bidirectionally; must
      run from 0 to ``N`` without decreasing (raises otherwise).
    * ``max_seqlen``: unused here (the kernels size their grid with it).
    * ``scale``: defaults to ``1/sqrt(D)``.

    q and k are rotated by the 2D RoPE of :func:`rope_2d_tables_ref` in
    float32 (float64 for float64 inputs) and rounded back to their dtype, as
    the VIP module does; attention then runs per image through
    ``scaled_dot_product_attention`` in the input dtype. Returns
    ``[N, H, Dv]`` in ``q``'s dtype.
    """
    del max_seqlen
    n, heads, dim = q.shape
    if dim % 4:
        raise RuntimeError(f"vip_attention_ref: q/k head dim must be divisible by 4, got {dim}")
    acc = torch.promote_types(q.dtype, torch.float32)
    cos, sin = rope_2d_tables_ref(positions, dim, theta, acc)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rope(x):
        xf = x.to(acc)
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    qr, kr = rope(q), rope(k)
    out = v.new_empty((n, heads, v.shape[2]))
    cu = _covering_offsets("vip_attention_ref", cu_seqlens, n)
    for i in range(len(cu) - 1):
        sl = slice(cu[i], cu[i + 1])
        if cu[i + 1] == cu[i]:
            continue
        o = torch.nn.functional.scaled_dot_product_attention(
            qr[sl].transpose(0, 1), kr[sl].transpose(0, 1), v[sl].transpose(0, 1), scale=scale)
        out[sl] = o.transpose(0, 1)
    return out


# ---------------------------------------------------------------------------
# keep rule
# ---------------------------------------------------------------------------


def keep_mask_ref(
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: float = 0.5,
    max_keep_ratio: float | None = None,
    min_keep: int = 1,
    keep_ratio: float | None = None,
    scores_are_logits: bool = True,
) -> torch.Tensor:
    """Reference for :func:`token_prune._ops.keep_mask`: GlimpsePrune's keep
    rule, image by image (image ``i`` = entries ``cu[i]:cu[i+1]``).

    ``p = sigmoid(scores.float())`` (or ``scores.float()``). Threshold mode:
    with ``count`` tokens at ``p > threshold``, ``cap = int(max_keep_ratio * n)``
    and ``floor = min(n, min_keep)``:

    * ``count > cap`` (cap set): exactly the top ``max(cap, floor)``;
    * else ``count < floor``: exactly the top ``floor``;
    * else the ``count`` tokens above the threshold.

    So an image always keeps ``max(floor, min(count, cap))`` tokens. Ratio
    mode (``keep_ratio`` set): exactly the top ``min(n, ceil(keep_ratio*n -
    1e-9))``. "Top" is a stable descending sort: ties go to the earlier token,
    NaN ranks above everything (as in ``torch.sort``) but is never above the
    threshold, so with NaN scores the top ``floor`` may leave out a token
    above the threshold: ``p = [nan, nan, 0.9]``, threshold 0.5,
    ``min_keep=2`` keeps the two NaN. Returns bool ``[N]``.
    """
    probs = torch.sigmoid(scores.float()) if scores_are_logits else scores.float()
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    cu = [int(x) for x in cu_seqlens.tolist()]
    for i in range(len(cu) - 1):
        start, n = cu[i], cu[i + 1] - cu[i]
        if n <= 0:
            continue
        p = probs[start:start + n]
        order = torch.sort(p, descending=True, stable=True).indices
        if keep_ratio is not None:
            k = min(n, math.ceil(keep_ratio * n - 1e-9))
            sel = torch.zeros(n, dtype=torch.bool, device=p.device)
            sel[order[:k]] = True
        else:
            sel = p > threshold
            count = int(sel.sum())
            floor = min(n, min_keep)
            k = None
            if max_keep_ratio is not None and count > int(max_keep_ratio * n):
                k = max(int(max_keep_ratio * n), floor)
            elif count < floor:
                k = floor
            if k is not None:
                # Exactly the top k, not the survivors plus the top k: the count must not depend
                # on where NaN scores sit.
                sel = torch.zeros_like(sel)
                sel[order[:k]] = True
        keep[start:start + n] = sel
    return keep


# ---------------------------------------------------------------------------
# skip-and-merge scatter
# ---------------------------------------------------------------------------


def scatter_rows_ref(
    full: torch.Tensor,
    packed: torch.Tensor,
    index: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for :func:`token_prune._ops.scatter_rows`.

    ``out = full`` (a new contiguous tensor), then for every ``index[b, j] >= 0``:
    ``out[b, index[b, j]] = packed[b, j]`` (``+ residual[b, j]``, added in the
    tensors' dtype). Shapes: ``full`` ``[B, S, H]``, ``packed`` and
    ``residual`` ``[B, S', H]``, ``index`` int ``[B, S']``; the non-negative
    entries of one sample must be distinct and below ``S``.
    """
    if full.dim() != 3 or packed.dim() != 3 or index.dim() != 2:
        raise RuntimeError("scatter_rows_ref: expected full [B, S, H], packed [B, S', H], index [B, S']")
    out = full.clone(memory_format=torch.contiguous_format)
    rows = packed if residual is None else packed + residual
    ok = index >= 0
    b = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(index)
    out[b[ok], index[ok].long()] = rows[ok]
    return out


# ---------------------------------------------------------------------------
# attention received under a causal softmax (the ALVTS score)
# ---------------------------------------------------------------------------


def causal_attention_received_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    visual: torch.Tensor,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Reference for :func:`token_prune._ops.causal_attention_received`.

    With ``P_h = softmax(q_h k_g(h)^T * scale)`` over the keys each query may see (keys at or
    before it, real ones only), averaged over the query heads, and ``j`` the queries:

    * ``out[b, 0, i] = sum over real visual queries j of mean_h P_h[j, i]``
    * ``out[b, 1, i] = sum over real text queries j of mean_h P_h[j, i]``

    Shapes: ``q`` ``[B, Hq, S, D]``, ``k`` ``[B, Hk, S, D]`` (query head ``h`` reads key head
    ``h // (Hq / Hk)``), ``visual`` and ``valid`` bool ``[B, S]`` (``valid`` None: no padding).
    ``scale`` defaults to ``1/sqrt(D)``. The softmax is explicit, over query blocks of ``chunk``
    rows, in float32 (float64 for float64 inputs), which is also the output dtype. Columns of
    padding keys are 0.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise RuntimeError("causal_attention_received_ref: expected q [B, Hq, S, D] and k [B, Hk, S, D]")
    batch, heads, seq, dim = q.shape
    if heads % k.shape[1]:
        raise RuntimeError(f"causal_attention_received_ref: {heads} query heads do not split over {k.shape[1]} key heads")
    acc = torch.promote_types(q.dtype, torch.float32)
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    if valid is None:
        valid = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
    qf = q.to(acc)
    kf = k.to(acc).repeat_interleave(heads // k.shape[1], dim=1)
    weights = torch.stack([visual & valid, ~visual & valid], 1).to(acc)  # [B, 2, S] per query
    out = torch.zeros(batch, 2, seq, dtype=acc, device=q.device)
    key = torch.arange(seq, device=q.device)
    for start in range(0, seq, chunk):
        stop = min(seq, start + chunk)
        rows = torch.arange(start, stop, device=q.device)
        logits = (qf[:, :, start:stop] @ kf.transpose(-1, -2)) * scale  # [B, Hq, c, S]
        seen = valid[:, None, None, :] & (key[None, None, None, :] <= rows[None, None, :, None])
        probs = logits.masked_fill(~seen, float("-inf")).softmax(-1)
        # A padding query sees no key: its row is NaN, and its weight is zero anyway.
        probs = torch.nan_to_num(probs).mean(1)  # [B, c, S]
        out += weights[:, :, start:stop] @ probs
    return out
