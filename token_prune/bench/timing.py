"""Timing machinery (device-aware clocks, L2 flush, stage hooks, per-step decode marks) and the
agreement check of a patched generation against the unpatched one."""

from __future__ import annotations

import os
import re
import statistics
import time

import torch

from .. import nvtx


# ======================================================================================
# Timing machinery
# ======================================================================================


class Clock:
    """CUDA events on a GPU (stream-ordered, no host sync when marking). On the CPU a mark is
    ``(thread_time_ns, perf_counter_ns)``: :meth:`ms` is the calling thread's CPU time, which
    other processes on a shared machine do not inflate (valid when torch computes on this thread
    alone: ``torch.set_num_threads(1)``; ``thread=False`` makes :meth:`ms` wall time), and
    :meth:`wall_ms` the wall time beside it."""

    def __init__(self, device: torch.device, thread: bool = True):
        self.cuda = device.type == "cuda"
        self.thread = thread and not self.cuda
        self.name = "CUDA events" if self.cuda else ("thread CPU time" if self.thread else "wall time")

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return (time.thread_time_ns(), time.perf_counter_ns())

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))
        i = 0 if self.thread else 1
        return (b[i] - a[i]) / 1e6

    def wall_ms(self, a, b) -> float:
        return float(a.elapsed_time(b)) if self.cuda else (b[1] - a[1]) / 1e6


class L2Flush:
    """Zeroes a buffer twice the size of the GPU's L2 cache before each timed run."""

    def __init__(self, device: torch.device):
        self.buf = None
        if device.type == "cuda":
            l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
            n = max(2 * l2, 64 << 20)
            self.buf = torch.empty(n // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


class StageHooks:
    """Forward hooks that timestamp the vision tower and the language model on every call and
    open NVTX ranges around them (``bench.vision_encoder``, ``bench.language_model``)."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        inner = model.model
        if hasattr(inner, "visual"):
            first = last = inner.visual
        else:
            first, last = inner.vision_tower, inner.multi_modal_projector
        self.lm = inner.language_model
        self.vision: list = []
        self.lm_calls: list = []  # (tokens in the call, start, end)
        self._open: list = []
        self._handles = [
            first.register_forward_pre_hook(self._vision_pre),
            last.register_forward_hook(self._vision_post),
            self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
            self.lm.register_forward_hook(self._lm_post),
        ]

    def begin(self) -> None:
        self.vision.clear()
        self.lm_calls.clear()

    def _vision_pre(self, module, args):
        self._open.append(nvtx.push("bench.vision_encoder"))
        self.vision.append([self.clock.mark(), None])

    def _vision_post(self, module, args, output):
        if self.vision and self.vision[-1][1] is None:
            self.vision[-1][1] = self.clock.mark()
        if self._open:
            nvtx.pop(self._open.pop())

    def _lm_pre(self, module, args, kwargs):
        ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = kwargs.get("input_ids", args[0] if args else None)
        q = int(ref.shape[1]) if ref is not None else 0
        self._open.append(nvtx.push("bench.language_model"))
        self.lm_calls.append([q, self.clock.mark(), None])

    def _lm_post(self, module, args, output):
        if self.lm_calls and self.lm_calls[-1][2] is None:
            self.lm_calls[-1][2] = self.clock.mark()
        if self._open:
            nvtx.pop(self._open.pop())

    def close_open_ranges(self) -> None:
        """After an exception between a pre and a post hook: pop what is still open."""
        while self._open:
            nvtx.pop(self._open.pop())

    def vision_ms(self) -> float | None:
        done = [(a, b) for a, b in self.vision if b is not None]
        return sum(self.clock.ms(a, b) for a, b in done) if done else None

    def prefill_ms(self, wall: bool = False) -> float | None:
        """The first language-model call with more than one token (the prefill)."""
        for q, a, b in self.lm_calls:
            if q > 1 and b is not None:
                return self.clock.wall_ms(a, b) if wall else self.clock.ms(a, b)
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _step_marker_class():
    from transformers import LogitsProcessor

    class StepMarker(LogitsProcessor):
        """Timestamps every generation step (called once per step, after its forward) and keeps
        an NVTX range open over each step: ``bench.prefill`` then ``bench.decode_step``."""

        def __init__(self, clock: Clock, steps: int, on_first=None):
            self.clock = clock
            self.steps = steps
            self.marks: list = []
            self.on_first = on_first  # called once, right after the prefill step
            self.opened = nvtx.push("bench.prefill")

        def __call__(self, input_ids, scores):
            self.marks.append(self.clock.mark())
            if len(self.marks) == 1 and self.on_first is not None:
                self.on_first()
            nvtx.pop(self.opened)
            self.opened = nvtx.push("bench.decode_step") if len(self.marks) < self.steps else False
            return scores

        def close(self) -> None:
            nvtx.pop(self.opened)
            self.opened = False

    return StepMarker


def _nvtx_name(label: str) -> str:
    """A setting label as an NVTX range name: no spaces, '=', brackets, '/' or '@' (Nsight Compute's
    NVTX filter expressions give those a meaning)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label.replace("=", ""))


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _summary(xs) -> dict | None:
    """Median, min, max and the relative spread ``(max - min) / median`` of the runs."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    med = float(statistics.median(xs))
    return {
        "median": med,
        "min": float(min(xs)),
        "max": float(max(xs)),
        "spread": (max(xs) - min(xs)) / med if med else None,
        "runs": [round(float(x), 4) for x in xs],
    }


# ======================================================================================
# CPU memory and machine peaks
# ======================================================================================


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RSSPeak:
    """Peak resident memory of this process (Linux ``VmHWM``) over a stretch of code.

    :meth:`reset` returns freed heap pages to the system (``malloc_trim``) and resets the
    high-water mark (``/proc/self/clear_refs``), so a setting's peak is not a previous
    setting's. ``available`` is False where either is missing (then every value is None)."""

    def __init__(self):
        self.available = _status_kib("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK)
        self._trim = None
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            pass

    def reset(self) -> int | None:
        """Reset the peak; returns the resident bytes now."""
        if not self.available:
            return None
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self.rss()

    def rss(self) -> int | None:
        kib = _status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def peak(self) -> int | None:
        kib = _status_kib("VmHWM") if self.available else None
        return None if kib is None else kib * 1024


def linear_flops(dtype: torch.dtype, rows: int, width: int, inner: int, repeats: int = 3) -> float:
    """FLOP/s this CPU sustains on the calling thread for ``F.linear`` at a decoder MLP's shape
    (``[rows, width] x [inner, width]^T`` in ``dtype``), best of ``repeats`` (thread CPU time)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g).to(dtype)
    w = torch.randn(inner, width, generator=g).to(dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time_ns()
        torch.nn.functional.linear(x, w)
        best = min(best, time.thread_time_ns() - t)
    return 2.0 * rows * width * inner / (max(best, 1) / 1e9)


def linear_rate_ratios(dtype: torch.dtype, base: int, rows: list[int], width: int, inner: int,
                       rounds: int = 5) -> dict[int, float]:
    """How fast this CPU runs the decoder-MLP product (see :func:`linear_flops`) on each of ``rows``
    rows relative to ``base`` rows, in FLOP/s: the median over ``rounds`` rounds of the per-round
    ratio, each round timing every shape once (thread CPU time). Paired rounds, like the benchmark's
    settings, so that the ratio survives a shared machine whose speed drifts between calls."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(inner, width, generator=g).to(dtype)
    xs = {r: torch.randn(r, width, generator=g).to(dtype) for r in {base, *rows}}
    for x in xs.values():
        torch.nn.functional.linear(x, w)
    per: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(rounds):
        rate = {}
        for r, x in xs.items():
            t = time.thread_time_ns()
            torch.nn.functional.linear(x, w)
            rate[r] = r / max(time.thread_time_ns() - t, 1)
        for r in rows:
            per[r].append(rate[r] / rate[base])
    return {r: sorted(v)[len(v) // 2] for r, v in per.items()}


def cpu_peaks(dtype: torch.dtype, rows: int, width: int, inner: int, repeats: int = 3) -> dict:
    """What this CPU sustains on the calling thread, for a roofline: FLOP/s of ``F.linear`` at a
    decoder MLP's shape on ``rows`` rows (:func:`linear_flops`) and the bandwidth of copying a
    256 MiB buffer (bytes read + written per second), best of ``repeats`` (thread CPU time).
    Returns ``{"name", "flops", "bandwidth", "flops_by_rows"}`` as
    :func:`token_prune.costmodel.roofline_ms` takes it (``flops_by_rows`` starts with ``rows``;
    the benchmark adds the row counts its settings run)."""
    flops = linear_flops(dtype, rows, width, inner, repeats)
    src = torch.ones(64 << 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time_ns()
        dst.copy_(src)
        best = min(best, time.thread_time_ns() - t)
    bw = 2.0 * src.numel() * 4 / (best / 1e9)
    return {"name": f"cpu ({dtype}, measured)", "flops": flops, "bandwidth": bw, "flops_by_rows": {str(rows): flops}}


# ======================================================================================
# Agreement check
# ======================================================================================


def compare_generations(ref_tokens, ref_scores, out_tokens, out_scores, rtol: float) -> dict:
    """Compare a patched greedy generation with the unpatched one.

    Args:
        ref_tokens, out_tokens: [B, T] generated ids; ref_scores, out_scores: [B, T, V] logits.
        rtol: relative tolerance: on the first step's logits (max abs difference over the max
            abs reference logit) and for calling a token difference a near-tie.

    Returns ``{"status", "logit_rel_err", "first_diff_step", ...}``. ``status`` is ``exact``
    (same tokens, logits within rtol), ``near_tie`` (same logits within rtol and same tokens up
    to a step where the patched token's reference logit is within ``rtol * max|logit|`` of the
    reference maximum: both models agree that the two tokens tie, only rounding picked
    differently; later steps continue from different prefixes and are not compared) or
    ``mismatch``.
    """
    ref_scores = ref_scores.float()
    out_scores = out_scores.float()
    B, T = ref_tokens.shape
    first = (out_scores[:, 0] - ref_scores[:, 0]).abs().amax() / ref_scores[:, 0].abs().amax().clamp(min=1e-30)
    info = {"logit_rel_err": float(first), "rtol": rtol, "first_diff_step": None, "near_tie_margin": None}
    status = "exact"
    for b in range(B):
        diff = (ref_tokens[b] != out_tokens[b]).nonzero()
        if diff.numel() == 0:
            continue
        t = int(diff[0])
        row = ref_scores[b, t]
        margin = float(row.max() - row[out_tokens[b, t]])
        tol = rtol * float(row.abs().max())
        info["first_diff_step"] = t if info["first_diff_step"] is None else min(info["first_diff_step"], t)
        info["near_tie_margin"] = margin
        if margin <= tol:
            status = "near_tie" if status == "exact" else status
        else:
            status = "mismatch"
    if float(first) > rtol:
        status = "mismatch"
    info["status"] = status
    return info
