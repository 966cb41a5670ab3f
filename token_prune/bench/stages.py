"""Report parts of the interleaved (CPU) measurement: measured ratios beside the cost model's, the
per-stage breakdown of each method's prefill, and the ratio-vs-keep plot."""

from __future__ import annotations

from .. import costmodel as cm

# A method's stage range (token_prune.nvtx) -> the cost model's stage of the same work.
_COST_STAGE = {
    "layers_0_K": "layers_0_K",
    "vip": "vip",
    "score": "score",
    "compact": "compact",
    "layers_K1_L": "layers_K1_L",
    "select": "select",
    "layer": "layers",
    "merge": "merge",
}


def _med(x):
    return x.get("median") if isinstance(x, dict) else x


def _f(x, spec=".3f"):
    x = _med(x)
    return "–" if x is None else format(x, spec)


def _span(x, spec=".3f"):
    """``median [min, max]`` of a summary."""
    if not isinstance(x, dict) or x.get("median") is None:
        return "–"
    return f"{x['median']:{spec}} [{x['min']:{spec}}, {x['max']:{spec}}]"


def _dev(measured, model):
    if measured is None or not model:
        return "–"
    return f"{(measured / model - 1) * 100:+.1f}%"


def stage_rows(row: dict) -> list[dict]:
    """The prefill's stages of one latency row, in execution order of their first entry, with
    inclusive / exclusive CPU ms (medians), their share of the LM prefill, and the cost model's
    roofline ms for the same work where it has a stage of that name. The last rows are the time of
    the LM prefill outside every method stage."""
    stages = row.get("stages") or {}
    lm = _med(row.get("lm_prefill_ms"))
    cost = (row.get("cost") or {}).get("lm_prefill") or {}
    peak = row.get("_peak")
    out = []
    top = 0.0
    for name, st in stages.items():
        incl, excl = _med(st["cpu_ms"]), _med(st["exclusive_ms"])
        suffix = name.rpartition(".")[2]
        c = cost.get(_COST_STAGE.get(suffix, ""))
        roof = cm.roofline_ms([cm.Cost(**{k: v for k, v in c.items() if k != "flops"})], peak) if c and peak else None
        out.append({"stage": name, "parent": st["parent"], "calls": st["calls"], "cpu_ms": incl,
                    "exclusive_ms": excl, "share": incl / lm if lm else None, "roofline_ms": roof})
        if st["parent"] is None:
            top += incl
    if lm is not None and stages:
        out.append({"stage": "(LM prefill outside the stages)", "parent": None, "calls": None,
                    "cpu_ms": lm - top, "exclusive_ms": lm - top, "share": (lm - top) / lm if lm else None,
                    "roofline_ms": None})
    return out


def _by_rows_note(peak: dict | None) -> str:
    """How the roofline's matrix-product rate varies with the rows a stage runs, if measured."""
    table = {int(k): v for k, v in ((peak or {}).get("flops_by_rows") or {}).items()}
    if len(table) < 2:
        return ""
    pts = ", ".join(f"{r} rows {table[r] / 1e9:.1f}" for r in sorted(table))
    return (f"; a decoder stage's products run at the rate measured at its row count ({pts} GFLOP/s; "
            "`Cost.rows`), other stages at the peak")


def markdown_measured(results: dict) -> list[str]:
    """Markdown lines: the measured-vs-model table and the stage breakdown."""
    rows = results.get("latency") or []
    st = results.get("settings") or {}
    peak = results.get("machine_peak")
    L = ["## Measured against the cost model (ratios to the unpatched model, paired per repeat)", ""]
    L.append(
        f"Clock: {results.get('clock')}, {results.get('threads')} torch thread(s); every setting once per repeat, "
        f"settings interleaved (A B C A B C ...), {st.get('warmup')} warm-up round(s), {st.get('repeats')} repeats. "
        "Each cell: median [min, max] of the per-repeat ratio. *FLOPs* / *bytes*: the cost model's ratio; "
        "*roofline*: the cost model's `max(FLOPs / peak, bytes / bandwidth)` per stage with this machine's "
        "measured peak"
        + (f" ({peak['flops'] / 1e9:.1f} GFLOP/s, {peak['bandwidth'] / 1e9:.1f} GB/s)" if peak else "")
        + _by_rows_note(peak)
        + "; *dev*: measured / FLOPs (prefill) or bytes (decode) ratio - 1; *dev roofline*: measured / roofline "
        "ratio - 1."
    )
    L.append("")
    L.append("| setting | kept / visual | LM prefill ms | LM ratio | FLOPs | roofline | dev | dev roofline | TTFT ratio "
             "| FLOPs | decode ms/token | decode ratio | bytes | roofline | dev | KV MiB (model / at end, measured) "
             "| peak RSS above start MiB | RSS ratio | tokens = unpatched |")
    L.append("|" + "---|" * 19)
    for r in rows:
        q, p = r.get("ratios") or {}, r.get("paired_ratios") or {}
        kvm = _med(r.get("kv_cache_bytes_end_measured"))
        rss = _med((r.get("rss") or {}).get("above_start_gb"))
        L.append(
            f"| {r['setting']} | {r.get('kept_tokens')} / {r.get('visual_tokens')} | {_span(r.get('lm_prefill_ms'), '.0f')} "
            f"| {_span(p.get('lm_prefill'))} | {_f(q.get('model_lm_prefill_flops'))} "
            f"| {_f(q.get('model_lm_prefill_roofline'))} | {_dev(q.get('lm_prefill'), q.get('model_lm_prefill_flops'))} "
            f"| {_dev(q.get('lm_prefill'), q.get('model_lm_prefill_roofline'))} | {_span(p.get('ttft'))} | {_f(q.get('model_ttft_flops'))} "
            f"| {_span(r.get('decode_step_ms'), '.1f')} | {_span(p.get('decode_step'))} "
            f"| {_f(q.get('model_decode_step_bytes'))} | {_f(q.get('model_decode_step_roofline'))} "
            f"| {_dev(q.get('decode_step'), q.get('model_decode_step_bytes'))} "
            f"| {_f((r.get('kv_cache_bytes') or 0) / (1 << 20), '.1f')} / {_f(kvm / (1 << 20) if kvm else None, '.1f')} "
            f"| {_f(rss * 1024 if rss is not None else None, '.0f')} | {_span(p.get('rss_above_start'))} "
            f"| {'yes' if r.get('tokens_match_unpatched') else 'no'} |"
        )
    L.append("")
    L.append("Wall-clock ratios (same runs): "
             + "; ".join(f"{r['setting']} LM x{_f((r.get('paired_ratios') or {}).get('lm_prefill_wall'))}, "
                         f"decode x{_f((r.get('paired_ratios') or {}).get('decode_step_wall'))}"
                         for r in rows if r["method"] != "none"))
    L.append("")
    L.append("## Stage breakdown of the LM prefill (CPU ms, median over repeats)")
    L.append("")
    L.append("From the stage ranges of `token_prune.nvtx` timed by its `StageTimer` (thread CPU time); "
             "*exclusive* subtracts nested ranges; *roofline* is the cost model's time for the same work on this "
             "machine's measured peak. The last row of each setting is LM prefill time spent outside every stage "
             "(embedding lookups, masks, rotary tables, hooks).")
    L.append("")
    L.append("| setting | stage | calls | CPU ms | exclusive ms | share of LM prefill | roofline ms |")
    L.append("|" + "---|" * 7)
    for r in rows:
        if r["method"] == "none":
            continue
        for s in stage_rows({**r, "_peak": peak}):
            L.append(f"| {r['setting']} | {s['stage']} | {s['calls'] if s['calls'] is not None else ''} "
                     f"| {_f(s['cpu_ms'], '.1f')} | {_f(s['exclusive_ms'], '.1f')} "
                     f"| {_f(s['share'] * 100 if s['share'] is not None else None, '.1f')}% "
                     f"| {_f(s['roofline_ms'], '.1f')} |")
    L.append("")
    return L


def plot_ratios(fig, axes, series: dict, rows: list[dict]) -> None:
    """Measured ratio (median, min-max bars) and the cost model's ratio (dotted) against the keep
    fraction: LM prefill, TTFT, decode per token, peak RSS above start."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [
        (axes[0][0], "LM prefill", "lm_prefill", "model_lm_prefill_flops"),
        (axes[0][1], "time to first token", "ttft", "model_ttft_flops"),
        (axes[1][0], "decode per token", "decode_step", "model_decode_step_bytes"),
        (axes[1][1], "peak RSS above start", "rss_above_start", "model_kv_cache_bytes"),
    ]
    for ax, title, key, model_key in panels:
        for i, (name, rs) in enumerate(sorted(series.items())):
            rs = sorted(rs, key=lambda r: r["keep_ratio"])
            xs = [r["keep_ratio"] for r in rs]
            summ = [(r.get("paired_ratios") or {}).get(key) or {} for r in rs]
            ys = [s.get("median") for s in summ]
            if all(y is None for y in ys):
                continue
            lo = [(y - s["min"]) if y is not None else 0 for y, s in zip(ys, summ, strict=True)]
            hi = [(s["max"] - y) if y is not None else 0 for y, s in zip(ys, summ, strict=True)]
            col = colors[i % len(colors)]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=col, label=name, capsize=3)
            model = [(r.get("ratios") or {}).get(model_key) for r in rs]
            if any(m is not None for m in model):
                ax.plot(xs, [m if m is not None else float("nan") for m in model], ":", color=col, alpha=0.8)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xlabel("keep fraction f")
        ax.set_ylabel("ratio to unpatched")
        ax.set_title(f"{title} (dotted: cost model{', KV bytes' if key == 'rss_above_start' else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
