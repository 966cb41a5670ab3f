"""NVTX ranges around token_prune's stages, for Nsight Systems / Nsight Compute.

    from . import nvtx
    with nvtx.range("glimpse/vip"):
        ...

A range is pushed with ``torch.cuda.nvtx`` when CUDA is available and ranges are enabled, and
is a shared do-nothing context manager otherwise (one attribute lookup and one call: no
allocation, no CUDA call, no host synchronisation). Ranges never touch tensors, so they do not
change what runs on the GPU.

Switches: the environment variable ``TOKEN_PRUNE_NVTX=0`` disables the ranges, ``=1`` forces
them on wherever CUDA is available (the default); :func:`set_enabled` does the same from code.
Range names are ``<component>/<stage>``; see bench/PROFILING.md for the list.
"""

from __future__ import annotations

import os

import torch

__all__ = ["range", "push", "pop", "enabled", "set_enabled"]

_ENABLED: bool | None = None  # resolved lazily: torch.cuda.is_available() may initialise CUDA


def enabled() -> bool:
    """True when ranges are emitted (CUDA available and not switched off)."""
    global _ENABLED
    if _ENABLED is None:
        flag = os.environ.get("TOKEN_PRUNE_NVTX", "1").strip().lower()
        _ENABLED = flag not in ("0", "false", "no", "off") and torch.cuda.is_available()
    return _ENABLED


def set_enabled(value: bool | None) -> None:
    """Force ranges on (only effective with CUDA) or off; None re-reads the environment."""
    global _ENABLED
    _ENABLED = None if value is None else (bool(value) and torch.cuda.is_available())


class _NullRange:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _NullRange()


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        torch.cuda.nvtx.range_pop()
        return False


def range(name: str):  # noqa: A001 - mirrors torch.cuda.nvtx.range
    """Context manager: an NVTX range called ``name`` when enabled, else a no-op."""
    return _Range(name) if (_ENABLED if _ENABLED is not None else enabled()) else _NULL


def push(name: str) -> bool:
    """Open a range (for code that cannot use ``with``, such as module hooks). Returns whether
    one was opened, so the caller can pop exactly what it pushed."""
    if _ENABLED if _ENABLED is not None else enabled():
        torch.cuda.nvtx.range_push(name)
        return True
    return False


def pop(opened: bool = True) -> None:
    """Close the range a :func:`push` that returned True opened."""
    if opened:
        torch.cuda.nvtx.range_pop()
