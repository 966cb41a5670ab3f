"""Plain PyTorch references of token_prune's compiled operators.

Each function here is the test oracle for the op of the same name (without the
``_ref`` suffix) and the fallback used when the compiled extension is missing.
They favour obviousness over speed: loops over the batch, boolean indexing.
They are written independently of the C++/CUDA code on purpose, so keep them
that way (do not call ``torch.ops.token_prune`` from here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["compact_tokens_ref"]


def _fail(message: str) -> None:
    raise RuntimeError(f"compact_tokens_ref: {message}")


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
