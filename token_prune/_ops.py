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

import warnings
from collections.abc import Sequence

import torch

from .reference import compact_tokens_ref

__all__ = [
    "EXTENSION_ERROR",
    "EXTENSION_LOADED",
    "EXTENSION_WITH_CUDA",
    "SCHEMAS",
    "compact_tokens",
]

# Must match csrc/ops.cpp exactly; used only by the pure-Python fallback.
SCHEMAS: dict[str, str] = {
    "compact_tokens": (
        "compact_tokens(Tensor keep, SymInt out_len, Tensor hidden, "
        "Tensor[] caches, Tensor position_ids, Tensor attention_mask) "
        "-> (Tensor, Tensor[], Tensor, Tensor)"
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


def _compact_tokens_fallback(keep, out_len, hidden, caches, position_ids, attention_mask):
    return compact_tokens_ref(keep, hidden, caches, position_ids, attention_mask, out_len)


_FALLBACK_LIB = None
if not EXTENSION_LOADED:
    warnings.warn(
        "token_prune: the compiled extension token_prune._C could not be loaded "
        f"({EXTENSION_ERROR}); falling back to slow pure-PyTorch kernels. Build it "
        "with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
    # Kept at module level: the registrations live as long as the Library does.
    _FALLBACK_LIB = torch.library.Library("token_prune", "DEF")
    _FALLBACK_LIB.define(SCHEMAS["compact_tokens"])
    _FALLBACK_LIB.impl(
        "compact_tokens", _compact_tokens_fallback, "CompositeExplicitAutograd"
    )


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
