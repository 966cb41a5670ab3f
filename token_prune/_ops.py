"""token_prune's custom operators: loading, fake kernels and Python wrappers.

The operators live in the ``token_prune`` torch library
(``torch.ops.token_prune.*``). Their schemas and CPU/CUDA kernels come from the
compiled extension ``token_prune._C`` (csrc/). When that extension cannot be
loaded (not built, or built against another torch), this module warns once and
defines the same schemas here with the plain PyTorch references of
:mod:`token_prune.reference` as kernels for every device, so everything still
works, only slower.

Either way the wrappers below call ``torch.ops.token_prune.<op>``, so the
dispatcher picks the kernel for the inputs' device, and the fake kernels
registered here let ``torch.compile`` / ``torch.export`` trace through the ops.

This module must import nothing from the package except :mod:`.reference`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence

import torch

from .reference import (
    causal_attention_received_ref,
    compact_tokens_ref,
    glimpse_attention_map_ref,
    keep_mask_ref,
    scatter_rows_ref,
    vip_attention_ref,
)

__all__ = [
    "EXTENSION_ERROR",
    "EXTENSION_LOADED",
    "EXTENSION_WITH_CUDA",
    "SCHEMAS",
    "alvts_score",
    "causal_attention_received",
    "compact_tokens",
    "cu_seqlens_from_sizes",
    "gather_rows",
    "glimpse_attention_map",
    "kernels_enabled",
    "keep_mask",
    "scatter_rows",
    "use_kernels",
    "vip_attention",
]

# Must match csrc/ops.cpp exactly; used only by the pure-Python fallback.
SCHEMAS: dict[str, str] = {
    "compact_tokens": (
        "compact_tokens(Tensor keep, SymInt out_len, Tensor hidden, "
        "Tensor[] caches, Tensor position_ids, Tensor attention_mask) "
        "-> (Tensor, Tensor[], Tensor, Tensor)"
    ),
    "glimpse_attention_map": (
        "glimpse_attention_map(Tensor q, Tensor cos, Tensor sin, Tensor keys, "
        "Tensor cu_seqlens, Tensor positions, Tensor? key_mask, float scale, "
        "bool log_softmax) -> Tensor"
    ),
    "vip_attention": (
        "vip_attention(Tensor q, Tensor k, Tensor v, Tensor positions, "
        "Tensor cu_seqlens, SymInt max_seqlen, float scale, float theta) -> Tensor"
    ),
    "keep_mask": (
        "keep_mask(Tensor scores, Tensor cu_seqlens, float threshold, "
        "float? max_keep_ratio, int min_keep, float? keep_ratio, "
        "bool scores_are_logits) -> Tensor"
    ),
    "scatter_rows": (
        "scatter_rows(Tensor full, Tensor packed, Tensor index, Tensor? residual) -> Tensor"
    ),
    "scatter_rows_": (
        "scatter_rows_(Tensor(a!) full, Tensor packed, Tensor index, "
        "Tensor? residual) -> ()"
    ),
    "causal_attention_received": (
        "causal_attention_received(Tensor q, Tensor k, Tensor visual, Tensor? valid, "
        "float scale) -> Tensor"
    ),
}

EXTENSION_LOADED: bool = False
"""True when the compiled kernels of ``token_prune._C`` are in use."""
EXTENSION_WITH_CUDA: bool = False
"""True when the loaded extension was built with CUDA kernels."""
EXTENSION_ERROR: str | None = None
"""Why the compiled extension could not be loaded (None when it was)."""

try:
    from . import _C  # noqa: F401  (importing runs the op registrations)
except (ImportError, OSError) as exc:  # OSError: a shared library is missing
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
else:
    EXTENSION_LOADED = True
    EXTENSION_WITH_CUDA = bool(getattr(_C, "WITH_CUDA", 0))


# -- pure-PyTorch kernels for the fallback -----------------------------------------------


def _compact_tokens_fallback(keep, out_len, hidden, caches, position_ids, attention_mask):
    return compact_tokens_ref(keep, hidden, caches, position_ids, attention_mask, out_len)


def _glimpse_attention_map_fallback(q, cos, sin, keys, cu_seqlens, positions, key_mask, scale, log_softmax):
    return glimpse_attention_map_ref(q, cos, sin, keys, cu_seqlens, positions, key_mask, scale, log_softmax)


def _vip_attention_fallback(q, k, v, positions, cu_seqlens, max_seqlen, scale, theta):
    return vip_attention_ref(q, k, v, positions, cu_seqlens, max_seqlen, scale, theta)


def _keep_mask_fallback(scores, cu_seqlens, threshold, max_keep_ratio, min_keep, keep_ratio, scores_are_logits):
    return keep_mask_ref(scores, cu_seqlens, threshold, max_keep_ratio, min_keep, keep_ratio, scores_are_logits)


def _scatter_rows_fallback(full, packed, index, residual):
    return scatter_rows_ref(full, packed, index, residual)


def _scatter_rows_inplace_fallback(full, packed, index, residual):
    full.copy_(scatter_rows_ref(full, packed, index, residual))


_FALLBACKS = {
    "compact_tokens": _compact_tokens_fallback,
    "glimpse_attention_map": _glimpse_attention_map_fallback,
    "vip_attention": _vip_attention_fallback,
    "keep_mask": _keep_mask_fallback,
    "scatter_rows": _scatter_rows_fallback,
    "scatter_rows_": _scatter_rows_inplace_fallback,
    "causal_attention_received": causal_attention_received_ref,
}


def _op_defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"token_prune::{name}", "")
    except RuntimeError:
        return False
    return True


# Ops the loaded extension does not define (none when it is current; all when it
# is missing) are defined here with the references as kernels for every device.
_MISSING_OPS = [name for name in SCHEMAS if not _op_defined(name)]
_FALLBACK_LIB = None
if _MISSING_OPS:
    if not EXTENSION_LOADED:
        warnings.warn(
            "token_prune: the compiled extension token_prune._C could not be loaded "
            f"({EXTENSION_ERROR}); falling back to slow pure-PyTorch kernels. Build it "
            "with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
    else:
        warnings.warn(
            f"token_prune: the compiled extension token_prune._C is out of date (it lacks "
            f"{', '.join(_MISSING_OPS)}); those ops fall back to slow pure-PyTorch kernels. "
            "Rebuild it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
    # Kept at module level: the registrations live as long as the Library does.
    _FALLBACK_LIB = torch.library.Library("token_prune", "DEF" if not EXTENSION_LOADED else "FRAGMENT")
    for _name in _MISSING_OPS:
        _FALLBACK_LIB.define(SCHEMAS[_name])
        _FALLBACK_LIB.impl(_name, _FALLBACKS[_name], "CompositeExplicitAutograd")


# -- fake kernels -------------------------------------------------------------------------


@torch.library.register_fake("token_prune::compact_tokens")
def _compact_tokens_fake(keep, out_len, hidden, caches, position_ids, attention_mask):
    # Shapes depend only on out_len, never on keep's values, so tracing needs
    # no data-dependent sizes.
    torch._check(keep.dim() == 2, lambda: f"keep must be [B, S], got {keep.shape}")
    torch._check(keep.dtype == torch.bool, lambda: f"keep must be bool, got {keep.dtype}")
    torch._check(out_len >= 0, lambda: f"out_len must be >= 0, got {out_len}")
    batch, seq = keep.shape
    torch._check(hidden.dim() == 3, lambda: f"hidden must be [B, S, D], got {hidden.shape}")
    torch._check(hidden.shape[0] == batch and hidden.shape[1] == seq,
                 lambda: f"hidden {hidden.shape} does not match keep {keep.shape}")
    for i, cache in enumerate(caches):
        torch._check(cache.dim() == 4,
                     lambda: f"caches[{i}] must be [B, H, S, d], got {cache.shape}")
        torch._check(cache.shape[0] == batch and cache.shape[2] == seq,
                     lambda: f"caches[{i}] {cache.shape} does not match keep {keep.shape}")
    torch._check(position_ids.dim() == 3,
                 lambda: f"position_ids must be [P, B, S], got {position_ids.shape}")
    torch._check(position_ids.dtype == torch.int64,
                 lambda: f"position_ids must be int64, got {position_ids.dtype}")
    torch._check(position_ids.shape[1] == batch and position_ids.shape[2] == seq,
                 lambda: f"position_ids {position_ids.shape} does not match keep {keep.shape}")
    torch._check(attention_mask.dim() == 2,
                 lambda: f"attention_mask must be [B, S], got {attention_mask.shape}")
    return (
        hidden.new_empty((batch, out_len, hidden.shape[2])),
        [c.new_empty((batch, c.shape[1], out_len, c.shape[3])) for c in caches],
        position_ids.new_empty((position_ids.shape[0], batch, out_len)),
        attention_mask.new_empty((batch, out_len)),
    )


@torch.library.register_fake("token_prune::glimpse_attention_map")
def _glimpse_attention_map_fake(q, cos, sin, keys, cu_seqlens, positions, key_mask, scale, log_softmax):
    torch._check(q.dim() == 3, lambda: f"q must be [B, Hq, d], got {q.shape}")
    torch._check(keys.dim() == 4, lambda: f"keys must be [B, Hkv, S, d], got {keys.shape}")
    torch._check(positions.dim() == 1, lambda: f"positions must be [N_v], got {positions.shape}")
    torch._check(cu_seqlens.dtype == torch.int32, lambda: f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((positions.shape[0], q.shape[1]), dtype=out_dtype)


@torch.library.register_fake("token_prune::vip_attention")
def _vip_attention_fake(q, k, v, positions, cu_seqlens, max_seqlen, scale, theta):
    torch._check(q.dim() == 3 and v.dim() == 3, lambda: f"q, v must be [N, H, D], got {q.shape}, {v.shape}")
    torch._check(q.shape[2] % 4 == 0, lambda: f"q/k head dim must be divisible by 4, got {q.shape[2]}")
    torch._check(cu_seqlens.dtype == torch.int32, lambda: f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    return v.new_empty((q.shape[0], q.shape[1], v.shape[2]))


@torch.library.register_fake("token_prune::keep_mask")
def _keep_mask_fake(scores, cu_seqlens, threshold, max_keep_ratio, min_keep, keep_ratio, scores_are_logits):
    torch._check(scores.dim() == 1, lambda: f"scores must be [N], got {scores.shape}")
    torch._check(cu_seqlens.dtype == torch.int32, lambda: f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.register_fake("token_prune::scatter_rows")
def _scatter_rows_fake(full, packed, index, residual):
    torch._check(full.dim() == 3 and packed.dim() == 3 and index.dim() == 2,
                 lambda: "expected full [B, S, H], packed [B, S', H], index [B, S']")
    return full.new_empty(full.shape)


@torch.library.register_fake("token_prune::scatter_rows_")
def _scatter_rows_inplace_fake(full, packed, index, residual):
    torch._check(full.dim() == 3 and packed.dim() == 3 and index.dim() == 2,
                 lambda: "expected full [B, S, H], packed [B, S', H], index [B, S']")
    return None


@torch.library.register_fake("token_prune::causal_attention_received")
def _causal_attention_received_fake(q, k, visual, valid, scale):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: f"q, k must be [B, H, S, D], got {q.shape}, {k.shape}")
    torch._check(k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:],
                 lambda: f"k {k.shape} does not match q {q.shape}")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: f"{q.shape[1]} query heads over {k.shape[1]} key heads")
    torch._check(visual.dtype == torch.bool, lambda: f"visual must be bool, got {visual.dtype}")
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((q.shape[0], 2, q.shape[2]), dtype=out_dtype)


# -- when the methods use the kernels ------------------------------------------------------

_KERNELS_ENABLED = os.environ.get("TOKEN_PRUNE_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")
# Tests set this to route the methods' CPU tensors through the ops' CPU kernels, which
# exercises the GPU code paths' wiring on a machine without a GPU.
_KERNELS_ON_CPU = False


def kernels_enabled() -> bool:
    """Whether the methods may use the compiled kernels (``TOKEN_PRUNE_KERNELS=0`` turns them off)."""
    return _KERNELS_ENABLED


@contextlib.contextmanager
def use_kernels(enabled: bool = True, *, on_cpu: bool = False):
    """Context manager: turn the methods' use of the compiled kernels on or off.

    ``use_kernels(False)`` runs the plain PyTorch paths everywhere (the reference
    behaviour); ``on_cpu=True`` also routes CPU tensors through the ops' CPU kernels
    (for tests of the GPU code paths without a GPU).
    """
    global _KERNELS_ENABLED, _KERNELS_ON_CPU
    saved = _KERNELS_ENABLED, _KERNELS_ON_CPU
    _KERNELS_ENABLED, _KERNELS_ON_CPU = bool(enabled), bool(on_cpu)
    try:
        yield
    finally:
        _KERNELS_ENABLED, _KERNELS_ON_CPU = saved


def kernels_active(device: torch.device | str, *grad_inputs: torch.Tensor | None) -> bool:
    """True when the methods should call the compiled kernels for tensors on ``device``:
    a CUDA device with the CUDA extension loaded (or the CPU, inside
    ``use_kernels(on_cpu=True)``), kernels not turned off, and no gradient wanted
    through ``grad_inputs`` (the kernels have no backward; training takes the plain
    PyTorch paths)."""
    if not _KERNELS_ENABLED or not EXTENSION_LOADED or _MISSING_OPS:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return EXTENSION_WITH_CUDA
    return device.type == "cpu" and _KERNELS_ON_CPU


def cu_seqlens_from_sizes(sizes: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """int32 ``[len(sizes) + 1]`` cumulative offsets ``0, n_0, n_0 + n_1, ...`` on ``device``."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + int(n))
    return torch.tensor(offsets, dtype=torch.int32, device=device)


# -- wrappers -------------------------------------------------------------------------------


def compact_tokens(
    keep: torch.Tensor,
    hidden: torch.Tensor,
    caches: Sequence[torch.Tensor],
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    out_len: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Drop the tokens not in ``keep`` from a left-padded batch, in one pass.

    For every sample ``b`` the kept positions (``keep[b, s]`` true), in their
    original order, move to the last ``n_b = keep[b].sum()`` of ``out_len``
    output slots, i.e. the result is again left padded. All other slots are
    zero in every output: hidden states, caches, position ids and mask, so the
    mask marks them as padding.

    Args:
        keep: bool ``[B, S]``; which tokens survive.
        hidden: ``[B, S, D]`` hidden states, any dtype.
        caches: a list (possibly empty) of ``[B, H_i, S, d_i]`` tensors, e.g.
            every layer's keys and values (sequence dim 2). Heads, head dims
            and dtypes may differ between entries; ``B`` and ``S`` may not.
        position_ids: int64 ``[P, B, S]`` (``P`` = 1 for plain RoPE, 3 or 4
            for Qwen2.5-VL's M-RoPE); ``[B, S]`` is accepted too and gives a
            ``[B, out_len]`` result.
        attention_mask: integer or bool ``[B, S]``.
        out_len: the output length ``L``; must be at least ``max_b n_b``.
            ``None`` computes exactly that, which copies one number from the
            device to the host (a sync on CUDA); pass it when known (e.g. a
            fixed keep budget) to keep the call asynchronous and traceable.
            On CUDA a too small ``out_len`` is not detected (that would need
            the same sync): each such sample then keeps only its last
            ``out_len`` kept tokens. On the CPU it raises.

    Returns:
        ``(hidden [B, L, D], caches [[B, H_i, L, d_i], ...],
        position_ids [P, B, L] (or [B, L]), attention_mask [B, L])``, new
        contiguous tensors with the input dtypes on the input device.

    Raises:
        RuntimeError: shapes, dtypes or devices that do not fit together.
    """
    flat_positions = position_ids.dim() == 2
    if flat_positions:
        position_ids = position_ids.unsqueeze(0)
    if out_len is None:
        # The one device-to-host copy of this op.
        out_len = int(keep.sum(1).max()) if keep.dim() == 2 and keep.shape[0] > 0 else 0
    hidden_out, caches_out, positions_out, mask_out = torch.ops.token_prune.compact_tokens(
        keep, out_len, hidden, list(caches), position_ids, attention_mask
    )
    if flat_positions:
        positions_out = positions_out.squeeze(0)
    return hidden_out, list(caches_out), positions_out, mask_out



def glimpse_attention_map(
    q: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    cu_seqlens: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    log_softmax: bool = False,
) -> torch.Tensor:
    """GlimpsePrune's glimpse attention map, fused: rotary on the query, GQA, scale,
    optional log-softmax, for the visual tokens of a ragged batch.

    Args:
        q: ``[B, Hq, d]`` the glimpse token's query at layer K *before* rotary
            (float32/float16/bfloat16/float64).
        cos, sin: ``[B, d]`` the rotary tables at the glimpse token's position (any float
            dtype); the query is rotated in float32 and not rounded.
        keys: ``[B, Hkv, S, d]`` layer K's rotated keys (the KV cache), q's dtype, any
            strides; query head ``h`` reads key head ``h // (Hq // Hkv)``.
        cu_seqlens: int32 ``[B + 1]``; sample ``b``'s visual tokens are
            ``positions[cu[b]:cu[b+1]]``. Must run from 0 to ``N_v`` without
            decreasing: the CPU kernel raises otherwise; the CUDA kernel does not
            check (that would need a host sync) and writes NaN rows for visual
            tokens outside every sample (entries out of ``[0, N_v]`` are undefined).
        positions: int32/int64 ``[N_v]``, each visual token's index into ``S``
            (in ``[0, S)``; not checked on CUDA).
        key_mask: ``[B, S]`` nonzero for real keys; only read with ``log_softmax``
            (None: all keys are real).
        scale: defaults to ``1/sqrt(d)``.
        log_softmax: False: scaled logits (Qwen). True: log-softmax over all real keys
            of the sample (LLaVA); ``-inf`` for visual tokens the mask marks as padding.

    Returns:
        float32 ``[N_v, Hq]`` (float64 for float64 inputs). No host synchronization.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.token_prune.glimpse_attention_map(
        q, cos, sin, keys, cu_seqlens, positions, key_mask, float(scale), bool(log_softmax))


def vip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    theta: float = 10000.0,
) -> torch.Tensor:
    """The VIP's conditional self-attention with 2D RoPE, fused (varlen, per image).

    Args:
        q, k: ``[N, H, D]`` before rotary (``D`` divisible by 4; the VIP's is 192).
        v: ``[N, H, Dv]`` (the VIP's ``Dv`` is 64); one dtype for q, k, v.
        positions: int ``[N, 2]``, each token's (row, col) on its image's grid.
        cu_seqlens: int32 ``[n_images + 1]``; image ``i`` owns tokens ``cu[i]:cu[i+1]``
            and attends within them, bidirectionally. Must run from 0 to ``N`` without
            decreasing: the CPU kernel raises otherwise; the CUDA kernel does not check
            (a host sync) and writes NaN rows for tokens outside every image (entries
            out of ``[0, N]`` are undefined).
        max_seqlen: the longest image, a host int that sizes the CUDA grid (query rows
            per image covered by one wave of blocks). Any value is correct: the kernels
            loop over the rest of a longer image, so a smaller one only costs time, a
            larger one only idle blocks. Ignored on the CPU.
        scale: defaults to ``1/sqrt(D)``; theta: the RoPE base.

    Returns:
        ``[N, H, Dv]`` in q's dtype. q and k are rotated by the 2D RoPE of the Qwen ViT
        convention in float32 (float64 for float64 inputs) and rounded to their dtype,
        like :class:`token_prune.vip.VIP`; softmax and sums accumulate in float32.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.token_prune.vip_attention(
        q, k, v, positions, cu_seqlens, int(max_seqlen), float(scale), float(theta))


def keep_mask(
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    threshold: float = 0.5,
    max_keep_ratio: float | None = None,
    min_keep: int = 1,
    keep_ratio: float | None = None,
    scores_are_logits: bool = True,
) -> torch.Tensor:
    """GlimpsePrune's keep rule for every image at once, decided on the device.

    Exactly :func:`token_prune.reference.keep_mask_ref`, which
    :func:`token_prune.runtime.keep_mask_from_scores` runs on the CPU (same options,
    same ties: the earlier token wins; NaN ranks first, as in ``torch.sort``), with the
    images given as int32 ``cu_seqlens`` over the ``[N]`` scores instead of a host list.
    Whenever the cap or the floor decides, an image keeps exactly the top ``k``, never
    the threshold's survivors plus extras, so its count is always
    ``max(min(n, min_keep), min(above, cap))``. On CUDA nothing is copied to the host.

    ``cu_seqlens`` must be non-decreasing with entries in ``[0, N]`` (the CPU kernel
    raises otherwise; not checked on CUDA); it need not start at 0 or end at ``N``.

    Returns:
        bool ``[N]``; tokens outside every image are False.
    """
    return torch.ops.token_prune.keep_mask(
        scores, cu_seqlens, float(threshold),
        None if max_keep_ratio is None else float(max_keep_ratio), int(min_keep),
        None if keep_ratio is None else float(keep_ratio), bool(scores_are_logits))


def scatter_rows(
    full: torch.Tensor,
    packed: torch.Tensor,
    index: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Write processed rows back into the full hidden state (skip-and-merge).

    ``out = full``; for every ``index[b, j] >= 0``: ``out[b, index[b, j]] = packed[b, j]``
    (``+ residual[b, j]`` when given, one rounding as in torch's add).

    Args:
        full: ``[B, S, H]``.
        packed: ``[B, S', H]``, full's dtype; residual: the same shape or None.
        index: int32/int64 ``[B, S']``, target rows (-1: skip), unique per sample, < S (the CPU
            kernel raises on a row out of range; CUDA does not check: that would need a sync).
        inplace: write into ``full`` (only the packed rows move) instead of a copy.

    Returns:
        The result: a new contiguous tensor, or ``full`` itself with ``inplace``.
    """
    if inplace:
        torch.ops.token_prune.scatter_rows_(full, packed, index, residual)
        return full
    return torch.ops.token_prune.scatter_rows(full, packed, index, residual)


def gather_rows(
    full: torch.Tensor,
    keep: torch.Tensor,
    out_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``full`` ``[B, S, H]`` where ``keep`` ``[B, S]`` is true, packed to the
    right end of ``out_len`` slots (left padding, order kept), and their source rows.

    The inverse of :func:`scatter_rows`: ``scatter_rows(full, *gather_rows(full, keep))``
    is ``full``. Runs on :func:`compact_tokens` (one launch on CUDA).

    Returns:
        ``(packed [B, L, H], index [B, L])``, index int64 with -1 at padding slots.
    """
    batch, seq = keep.shape
    rows = torch.arange(seq, device=keep.device).expand(1, batch, seq)
    packed, _, index, mask = compact_tokens(keep, full, [], rows, keep, out_len)
    index = torch.where(mask, index[0], torch.full_like(index[0], -1))
    return packed, index


# -- autograd -------------------------------------------------------------------------------
# Training through a pruned forward (GlimpsePrune+, token_prune.train.rl) needs gradients across the
# compaction: without these formulas every layer before the pruning layer would get none. Both
# backwards are plain indexing, so they run on any device and are themselves differentiable.
# (scatter_rows_ mutates its input and stays without a formula; the methods only call it when no
# gradient is wanted.)


def _compact_slots(keep: torch.Tensor, out_len: int):
    """(sample, source position, output slot) of every kept token, as 1-D int64 tensors.

    Sample ``b``'s kept tokens fill slots ``out_len - n_b .. out_len - 1`` in order; a token whose
    slot would be negative (an ``out_len`` too small, which only CUDA tolerates) was dropped."""
    rank = keep.long().cumsum(1) - 1
    slot = out_len - keep.sum(1, keepdim=True) + rank
    b, s = keep.nonzero(as_tuple=True)
    slot = slot[b, s]
    ok = slot >= 0
    return b[ok], s[ok], slot[ok]


def _compact_tokens_setup(ctx, inputs, output):
    keep, out_len, hidden, caches, _positions, _mask = inputs
    ctx.save_for_backward(keep)
    ctx.out_len = int(out_len)
    ctx.hidden_shape = hidden.shape
    ctx.cache_shapes = [c.shape for c in caches]


def _compact_tokens_backward(ctx, grad_hidden, grad_caches, _grad_positions, _grad_mask):
    (keep,) = ctx.saved_tensors
    b, s, slot = _compact_slots(keep, ctx.out_len)
    grad_in = None
    if grad_hidden is not None:
        grad_in = grad_hidden.new_zeros(ctx.hidden_shape)
        grad_in[b, s] = grad_hidden[b, slot]
    grads_in = []
    for g, shape in zip(grad_caches, ctx.cache_shapes):
        if g is None:
            grads_in.append(None)
            continue
        gi = g.new_zeros(shape)
        gi[b, :, s] = g[b, :, slot]
        grads_in.append(gi)
    return None, None, grad_in, grads_in, None, None


def _scatter_rows_setup(ctx, inputs, output):
    _full, packed, index, residual = inputs
    ctx.save_for_backward(index)
    ctx.packed_shape = packed.shape
    ctx.has_residual = residual is not None


def _scatter_rows_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    ok = index >= 0
    rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
    b, j, target = rows[ok], ok.nonzero(as_tuple=True)[1], index[ok].long()
    # The written rows replaced full's rows: those get no gradient in full.
    grad_full = grad.clone()
    grad_full[b, target] = 0
    grad_packed = grad.new_zeros(ctx.packed_shape)
    grad_packed[b, j] = grad[b, target]
    return grad_full, grad_packed, None, (grad_packed if ctx.has_residual else None)


torch.library.register_autograd("token_prune::compact_tokens", _compact_tokens_backward,
                                setup_context=_compact_tokens_setup)
torch.library.register_autograd("token_prune::scatter_rows", _scatter_rows_backward,
                                setup_context=_scatter_rows_setup)


def causal_attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    visual: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention every key receives from the visual and from the text queries of its sample,
    under the causal softmax, without an ``S x S`` matrix (CUDA: two passes over key blocks;
    CPU: one pass over L2-sized strips of query rows against all their keys).

    ``P_h = softmax(q_h k_h^T * scale)`` over the real keys at or before each query;
    ``out[b, 0, i]`` sums ``mean_h P_h[j, i]`` over the real visual queries ``j`` of sample ``b``,
    ``out[b, 1, i]`` over its real text queries. The same op serves the full-width selector
    (``D`` = head dim, every head) and a low-rank one (``D`` = rank, one shared "head" or one
    per KV group): only the widths differ.

    Args:
        q: ``[B, Hq, S, D]`` queries (rotary applied), any strides, float32/float64/float16/bfloat16.
        k: ``[B, Hk, S, D]`` keys, q's dtype; query head ``h`` reads key head ``h // (Hq / Hk)``.
        visual: bool ``[B, S]`` visual tokens.
        valid: bool ``[B, S]`` real tokens (left padding or any other pattern), or None for none.
        scale: logit scale, default ``1/sqrt(D)``.

    Returns:
        float32 ``[B, 2, S]`` (float64 for float64 inputs); padding columns are 0. Logits and
        sums accumulate in that dtype. No host synchronization on CUDA.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.token_prune.causal_attention_received(q, k, visual, valid, float(scale))


def alvts_score(
    q: torch.Tensor,
    k: torch.Tensor,
    visual: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """ALVTS's importance of every token: mean attention received from the real visual queries
    times mean attention received from the real text queries (:func:`causal_attention_received`).

    Returns:
        ``[B, S]`` in the op's output dtype (meaningful at visual positions). Equals
        ``methods.alvts.selection_scores(q, k, valid, visual)`` when ``scale`` is ``1/sqrt(D)``.
    """
    received = causal_attention_received(q, k, visual, valid, scale=scale)
    real = torch.ones_like(visual) if valid is None else valid
    n_vis = (visual & real).sum(1, keepdim=True).clamp(min=1).to(received.dtype)
    n_txt = (~visual & real).sum(1, keepdim=True).clamp(min=1).to(received.dtype)
    return (received[:, 0] / n_vis) * (received[:, 1] / n_txt)
