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

The same ranges feed a CPU stage timer: inside ``with nvtx.StageTimer() as t:`` every range also
adds its calling thread's CPU time (``time.thread_time_ns``) and wall time to ``t`` (with its
parent range, so exclusive times follow), whether or not NVTX is on. The benchmark uses it on the
CPU, where there is no Nsight; the stage names are defined once, here in the ranges.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["StageTimer", "enabled", "pop", "push", "range", "set_enabled"]

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


_TIMER: StageTimer | None = None  # the active stage timer (at most one; the benchmark's)


class StageTimer:
    """Per-range CPU time of the calling thread and wall time, while active (a context manager).

    ``totals[name] = {"cpu_ms", "wall_ms", "calls", "parent"}``: inclusive times summed over every
    entry of the range; ``parent`` is the range it was first entered inside (None at top level).
    :meth:`exclusive` subtracts the children. Ranges entered on other threads are not counted.
    """

    def __init__(self):
        self.totals: dict[str, dict] = {}
        self._stack: list[str] = []
        self._prev: StageTimer | None = None

    def __enter__(self):
        global _TIMER
        self._prev, _TIMER = _TIMER, self
        return self

    def __exit__(self, *exc):
        global _TIMER
        _TIMER = self._prev
        return False

    def clear(self) -> None:
        self.totals.clear()
        self._stack.clear()

    def snapshot(self) -> dict[str, dict]:
        """A copy of the totals so far."""
        return {k: dict(v) for k, v in self.totals.items()}

    @staticmethod
    def exclusive(totals: dict[str, dict]) -> dict[str, float]:
        """CPU ms of each range minus the CPU ms of the ranges entered inside it."""
        own = {k: v["cpu_ms"] for k, v in totals.items()}
        for v in totals.values():
            if v["parent"] in own:
                own[v["parent"]] -= v["cpu_ms"]
        return own

    def _touch(self, name: str, parent: str | None) -> dict:
        # Created on entry, so ``totals`` lists the ranges in the order they were first entered.
        t = self.totals.get(name)
        if t is None:
            t = self.totals[name] = {"cpu_ms": 0.0, "wall_ms": 0.0, "calls": 0, "parent": parent}
        return t

    def _add(self, name: str, cpu_ns: int, wall_ns: int, parent: str | None) -> None:
        t = self._touch(name, parent)
        t["cpu_ms"] += cpu_ns / 1e6
        t["wall_ms"] += wall_ns / 1e6
        t["calls"] += 1


class _TimedRange:
    __slots__ = ("name", "nvtx", "parent", "t0", "timer", "w0")

    def __init__(self, name: str, timer: StageTimer):
        self.name, self.timer = name, timer
        self.nvtx = _ENABLED if _ENABLED is not None else enabled()

    def __enter__(self):
        stack = self.timer._stack
        self.parent = stack[-1] if stack else None
        self.timer._touch(self.name, self.parent)
        stack.append(self.name)
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        self.w0 = time.perf_counter_ns()
        self.t0 = time.thread_time_ns()
        return self

    def __exit__(self, *exc):
        cpu = time.thread_time_ns() - self.t0
        wall = time.perf_counter_ns() - self.w0
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        stack = self.timer._stack
        if stack and stack[-1] == self.name:
            stack.pop()
        self.timer._add(self.name, cpu, wall, self.parent)
        return False


def range(name: str):
    """Context manager: an NVTX range called ``name`` when enabled (and a stage of the active
    :class:`StageTimer`, if any), else a no-op."""
    if _TIMER is not None:
        return _TimedRange(name, _TIMER)
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
