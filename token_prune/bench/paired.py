"""Interleaved, paired measurement: every setting once per repeat (A B C A B C ...), each run one
``generate`` that yields time to first token, LM prefill, vision, per-token decode, the CPU stage
breakdown, peak resident memory and the KV cache bytes; ratios to the unpatched model are taken
within each repeat, so slow drift of a shared machine cancels out of them.

This is how the benchmark measures on the CPU (``--interleave``, the CPU presets' default). Clock:
:class:`token_prune.bench.timing.Clock` (thread CPU time on the CPU, wall time recorded beside it).
"""

from __future__ import annotations

import copy
import statistics

import torch

from .. import hf, nvtx
from .settings import BenchError, Setting
from .timing import RSSPeak, _step_marker_class, _summary


def cache_bytes(cache) -> int | None:
    """Bytes of every key and value tensor a (dynamic) cache holds."""
    if cache is None:
        return None
    total = 0
    for i in range(hf.cache_layers(cache)):
        for t in hf.layer_kv(cache, i):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def run_once(bench, setting: Setting, inputs: dict, decode_steps: int, rss: RSSPeak) -> dict:
    """One timed ``generate`` of ``1 + decode_steps`` tokens for ``setting`` (patched around it).

    Returns the run's numbers: ``ttft_ms`` (the call up to the first token: input preparation,
    vision, LM prefill, LM head), ``lm_prefill_ms``, ``vision_ms``, ``decode_step_ms`` (median
    step), their wall-clock twins, ``stages`` (the prefill's :class:`token_prune.nvtx.StageTimer`
    totals), RSS before / at the first token / peak, the cache's bytes at the end, the tokens.
    """
    from transformers import LogitsProcessorList

    clock = bench.clock
    P = inputs["input_ids"].shape[1]
    total = 1 + decode_steps
    with bench.patched(setting) as handle:
        rss0 = rss.reset()
        timer = nvtx.StageTimer()
        at_first: dict = {}

        def first():
            at_first["stages"] = timer.snapshot()
            at_first["rss_peak"] = rss.peak()

        marker = _step_marker_class()(clock, total, on_first=first)
        bench.hooks.begin()
        with timer:
            t0 = clock.mark()
            try:
                out = bench.generate(inputs, total, logits_processor=LogitsProcessorList([marker]),
                                     return_dict_in_generate=True)
            finally:
                marker.close()
                bench.hooks.close_open_ranges()
            t1 = clock.mark()
        clock.sync()
        peak = rss.peak()
        stats = copy.deepcopy(handle.stats) if handle is not None else None
        kv_end = cache_bytes(hf.output_cache(out))
        tokens = out.sequences[:, P:].tolist()
        del out
    marks = marker.marks
    if len(marks) != total:
        raise BenchError(f"generate made {len(marks)} steps, expected {total}")
    steps = [clock.ms(marks[i - 1], marks[i]) for i in range(1, total)]
    wsteps = [clock.wall_ms(marks[i - 1], marks[i]) for i in range(1, total)]
    return {
        "ttft_ms": clock.ms(t0, marks[0]),
        "ttft_wall_ms": clock.wall_ms(t0, marks[0]),
        "lm_prefill_ms": bench.hooks.prefill_ms(),
        "lm_prefill_wall_ms": bench.hooks.prefill_ms(wall=True),
        "vision_ms": bench.hooks.vision_ms(),
        "decode_step_ms": statistics.median(steps) if steps else None,
        "decode_step_wall_ms": statistics.median(wsteps) if wsteps else None,
        "total_ms": clock.ms(t0, t1),
        "stages": at_first.get("stages", {}),
        "rss_start": rss0,
        "rss_peak_prefill": at_first.get("rss_peak"),
        "rss_peak": peak,
        "kv_bytes_end": kv_end,
        "stats": stats,
        "tokens": tokens,
    }


def _paired(xs, base) -> dict | None:
    """Summary of the per-repeat ratios ``xs[r] / base[r]``."""
    return _summary([a / b for a, b in zip(xs, base, strict=True) if a is not None and b])


def _stage_summary(runs: list[dict]) -> dict:
    """Per stage: inclusive and exclusive CPU ms (summaries over repeats), calls, parent."""
    names = list(dict.fromkeys(k for r in runs for k in r["stages"]))  # first-entry order
    out = {}
    for name in names:
        have = [r["stages"][name] for r in runs if name in r["stages"]]
        excl = [nvtx.StageTimer.exclusive(r["stages"])[name] for r in runs if name in r["stages"]]
        out[name] = {
            "cpu_ms": _summary([h["cpu_ms"] for h in have]),
            "exclusive_ms": _summary(excl),
            "wall_ms": _summary([h["wall_ms"] for h in have]),
            "calls": have[0]["calls"],
            "parent": have[0]["parent"],
        }
    return out


def measure_interleaved(bench, settings: list[Setting], log=print, on_round=None) -> list[dict]:
    """Warm-up rounds, then ``repeats`` rounds of every setting in order, paired to the unpatched
    setting (which must be among ``settings``). Returns one latency row per setting; ``on_round``
    gets the rows so far after every round (so a run cut short still leaves its results)."""
    o = bench.o
    base_i = next((i for i, s in enumerate(settings) if s.method == "none"), None)
    if base_i is None:
        raise BenchError("the interleaved measurement needs the unpatched setting (drop --no-baseline)")
    inputs = bench.inputs(o["batch"])
    rss = RSSPeak()
    # Warm-up: each code path once (the unpatched model, each method variant at its smallest keep),
    # one decode step; a full round of every setting would cost as much as a measured one.
    warm: dict[str, Setting] = {}
    for s in settings:
        if s.family_key not in warm or s.keep_ratio < warm[s.family_key].keep_ratio:
            warm[s.family_key] = s
    for w in range(o["warmup"]):
        for s in warm.values():
            run_once(bench, s, inputs, 1, rss)
        log(f"  warm-up round {w + 1}/{o['warmup']} done ({len(warm)} settings)")
    runs: list[list[dict]] = [[] for _ in settings]
    for r in range(o["repeats"]):
        for i, s in enumerate(settings):
            runs[i].append(run_once(bench, s, inputs, o["decode_tokens"], rss))
        b = runs[base_i][-1]
        log(f"  round {r + 1}/{o['repeats']}: unpatched LM {b['lm_prefill_ms']:.0f} ms, "
            + ", ".join(f"{s.label} x{x[-1]['lm_prefill_ms'] / b['lm_prefill_ms']:.3f}"
                        for s, x in zip(settings, runs, strict=True) if s.method != "none"))
        if on_round is not None and r + 1 < o["repeats"]:
            on_round([_row(bench, s, runs[i], runs[base_i]) for i, s in enumerate(settings)])
    return [_row(bench, s, runs[i], runs[base_i]) for i, s in enumerate(settings)]


def _row(bench, setting: Setting, runs: list[dict], base: list[dict]) -> dict:
    o = bench.o
    batch = o["batch"]
    col = lambda rs, k: [r[k] for r in rs]
    stats = runs[-1]["stats"]
    est, tokens = bench.token_fields(setting, stats, batch)
    kv = tokens["kv_len"]
    kvb = bench.cost_arch.lm.kv_bytes_per_token(bench.cost_arch.dtype_bytes)
    above = [r["rss_peak"] - r["rss_start"] if r["rss_peak"] is not None else None for r in runs]
    above_base = [r["rss_peak"] - r["rss_start"] if r["rss_peak"] is not None else None for r in base]
    gb = 1 << 30
    same = [r["tokens"] == b["tokens"] for r, b in zip(runs, base, strict=True)]
    decode_tok_s = [batch / (d / 1e3) if d else None for d in col(runs, "decode_step_ms")]
    return {
        **setting.record(batch),
        "ttft_ms": _summary(col(runs, "ttft_ms")),
        "lm_prefill_ms": _summary(col(runs, "lm_prefill_ms")),
        "vision_ms": _summary(col(runs, "vision_ms")),
        "other_ms": _summary([t - (l or 0) - (v or 0) for t, l, v in
                              zip(col(runs, "ttft_ms"), col(runs, "lm_prefill_ms"), col(runs, "vision_ms"),
                                  strict=True)]),
        "decode_step_ms": _summary(col(runs, "decode_step_ms")),
        "decode_tok_s": _summary(decode_tok_s),
        "wall": {k: _summary(col(runs, k + "_wall_ms")) for k in ("ttft", "lm_prefill", "decode_step")},
        "paired_ratios": {
            "lm_prefill": _paired(col(runs, "lm_prefill_ms"), col(base, "lm_prefill_ms")),
            "ttft": _paired(col(runs, "ttft_ms"), col(base, "ttft_ms")),
            "decode_step": _paired(col(runs, "decode_step_ms"), col(base, "decode_step_ms")),
            "lm_prefill_wall": _paired(col(runs, "lm_prefill_wall_ms"), col(base, "lm_prefill_wall_ms")),
            "decode_step_wall": _paired(col(runs, "decode_step_wall_ms"), col(base, "decode_step_wall_ms")),
            "rss_above_start": _paired(above, above_base),
        },
        "stages": _stage_summary(runs),
        **tokens,
        "kv_cache_bytes_end_measured": _summary(col(runs, "kv_bytes_end")),
        "kv_cache_bytes_end_expected": batch * (sum(kv) + len(kv) * o["decode_tokens"]) * kvb if kv else None,
        "tokens_match_unpatched": all(same),
        "rss": {
            "start_gb": _summary([x / gb for x in col(runs, "rss_start") if x is not None]),
            "peak_gb": _summary([x / gb for x in col(runs, "rss_peak") if x is not None]),
            "peak_prefill_gb": _summary([x / gb for x in col(runs, "rss_peak_prefill") if x is not None]),
            "above_start_gb": _summary([x / gb for x in above if x is not None]),
        },
        "memory": bench._memory(None, None, None) if not bench.cuda else {},
        "stats": stats,
        "cost": est,
    }
