"""Benchmark reports: ratios against the unpatched row, Markdown tables and plots."""

from __future__ import annotations

import json
import math
import os

import torch

from .. import costmodel as cm


# ======================================================================================
# Reports
# ======================================================================================


def _fmt(x, spec=".1f", none="–"):
    if x is None:
        return none
    if isinstance(x, dict):
        x = x.get("median")
        if x is None:
            return none
    return format(x, spec)


def _ratio(a, b):
    a = a.get("median") if isinstance(a, dict) else a
    b = b.get("median") if isinstance(b, dict) else b
    if a is None or b is None or b == 0:
        return None
    return a / b


def with_ratios(results: dict) -> dict:
    """Add measured and modelled ratios against the unpatched row to every latency row."""
    rows = results.get("latency", [])
    base = next((r for r in rows if r["method"] == "none"), None)
    if base is None:
        return results
    for r in rows:
        est, best = r.get("cost"), base.get("cost")
        model = cm.ratios(est, best) if est and best else {}
        roof, broof = (est or {}).get("roofline_ms") or {}, (best or {}).get("roofline_ms") or {}
        paired = r.get("paired_ratios")  # interleaved runs: the median of per-repeat ratios

        def measured(key, ms_key):
            if paired is not None:
                return _median_of(paired.get(key))
            return _ratio(r.get(ms_key), base.get(ms_key))

        r["ratios"] = {
            "lm_prefill": measured("lm_prefill", "lm_prefill_ms"),
            "ttft": measured("ttft", "ttft_ms"),
            "decode_step": measured("decode_step", "decode_step_ms"),
            "peak_memory": _ratio((r.get("memory") or {}).get("peak_gb"), (base.get("memory") or {}).get("peak_gb")),
            "rss_above_start": _median_of((paired or {}).get("rss_above_start")),
            "model_lm_prefill_flops": model.get("lm_prefill_flops"),
            "model_ttft_flops": model.get("ttft_flops"),
            "model_decode_step_bytes": model.get("decode_step_bytes"),
            "model_kv_cache_bytes": model.get("kv_cache_bytes"),
            "model_lm_prefill_roofline": _ratio(roof.get("lm_prefill"), broof.get("lm_prefill")),
            "model_ttft_roofline": _ratio(_add(roof.get("vision"), roof.get("lm_prefill")),
                                          _add(broof.get("vision"), broof.get("lm_prefill"))),
            "model_decode_step_roofline": _ratio(roof.get("decode_step"), broof.get("decode_step")),
            "floor": model.get("floor"),
        }
    return results


def _add(a, b):
    return None if a is None or b is None else a + b


def markdown(results: dict) -> str:
    env, st, m = results["env"], results["settings"], results.get("model", {})
    L = []
    title = m.get("title", st.get("model"))
    L.append(f"# token_prune benchmark: {title}")
    L.append("")
    L.append(f"- created {results.get('created')}, tag `{results.get('tag')}`")
    L.append(
        f"- device: **{env.get('gpu')}**"
        + (f" ({env.get('gpu_memory_gb', 0):.0f} GiB)" if env.get("gpu_memory_gb") else "")
        + f"; torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers {env.get('transformers')}, "
        f"python {env.get('python')}; token_prune {env.get('token_prune')} @ `{str(env.get('git_sha'))[:12]}`"
        + (" (dirty)" if env.get("git_dirty") else "")
        + f"; compiled extension: {env.get('extension_loaded')}"
    )
    if m:
        L.append(
            f"- model: {m.get('name')} ({_params(m.get('params'))} params, random weights, {st.get('dtype')}, "
            f"attention `{st.get('attn')}`); prompt: {m.get('text_tokens')} text + {m.get('visual_tokens')} visual "
            f"= {m.get('prompt_tokens')} tokens, image {st.get('image')[0]}x{st.get('image')[1]}"
        )
    L.append(
        f"- timing: {'CUDA events' if env.get('device') == 'cuda' else 'time.perf_counter (CPU)'}, "
        f"{st.get('warmup')} warm-up + median of {st.get('repeats')} runs (decode: {st.get('decode_warmup')} + "
        f"{st.get('decode_repeats')} generate runs of {st.get('decode_tokens')} steps), L2 flushed before each run; "
        f"batch {st.get('batch')}"
    )
    L.append("")
    checks = results.get("check") or []
    if checks:
        L.append("## Agreement check (keep_ratio = 1.0 vs unpatched, greedy)")
        L.append("")
        L.append("| setting | status | first-step logit rel. err | first differing step | steps x batch |")
        L.append("|---|---|---|---|---|")
        for c in checks:
            L.append(
                f"| {c['setting']} | {c['status']} | {c['logit_rel_err']:.2e} | {_fmt(c.get('first_diff_step'), 'd')} "
                f"| {len(c['ref_tokens'][0])} x {len(c['ref_tokens'])} |"
            )
        L.append("")
    rows = results.get("latency") or []
    if rows:
        L.append(f"## Latency and memory (batch {st.get('batch')})")
        L.append("")
        L.append(
            "Ratios are against the unpatched row; *model* is the cost model's FLOPs (prefill) or bytes "
            "(decode) ratio, *floor* is `(K+1 + (L-K-1) f) / L` (ALVTS: f)."
        )
        L.append("")
        L.append(
            "| setting | kept / visual | KV len (layer 0 / last) | vision ms | LM prefill ms | LM ratio | model "
            "| floor | TTFT ms | TTFT ratio | model | decode ms/step | tok/s | decode ratio | model | peak GiB "
            "| above weights GiB |"
        )
        L.append("|" + "---|" * 17)
        for r in rows:
            q = r.get("ratios", {})
            kv = r.get("kv_len") or []
            mem = r.get("memory") or {}
            L.append(
                f"| {r['setting']} | {r.get('kept_tokens')} / {r.get('visual_tokens')} | "
                f"{kv[0] if kv else '–'} / {kv[-1] if kv else '–'} | {_fmt(r.get('vision_ms'), '.2f')} | "
                f"{_fmt(r.get('lm_prefill_ms'), '.2f')} | {_fmt(q.get('lm_prefill'), '.3f')} | "
                f"{_fmt(q.get('model_lm_prefill_flops'), '.3f')} | {_fmt(q.get('floor'), '.3f')} | "
                f"{_fmt(r.get('ttft_ms'), '.2f')} | {_fmt(q.get('ttft'), '.3f')} | "
                f"{_fmt(q.get('model_ttft_flops'), '.3f')} | "
                f"{_fmt(r.get('decode_step_ms'), '.2f')} | {_fmt(r.get('decode_tok_s'), '.1f')} | "
                f"{_fmt(q.get('decode_step'), '.3f')} | {_fmt(q.get('model_decode_step_bytes'), '.3f')} | "
                f"{_fmt(mem.get('peak_gb'), '.2f')} | {_fmt(mem.get('above_weights_gb'), '.2f')} |"
            )
        L.append("")
        L.append("### Cost model per setting")
        L.append("")
        L.append(
            "| setting | vision GFLOP | LM prefill GFLOP | of which attention | method's own GFLOP "
            "| LM prefill GB moved | decode step GB read | KV cache MiB | roofline LM ms | roofline decode ms |"
        )
        L.append("|" + "---|" * 10)
        for r in rows:
            c = r.get("cost") or {}
            t = c.get("totals", {})
            own = sum(v["flops"] for k, v in c.get("lm_prefill", {}).items() if k in ("vip", "score", "select"))
            roof = c.get("roofline_ms") or {}
            L.append(
                f"| {r['setting']} | {t.get('vision_flops', 0) / 1e9:.1f} | {t.get('lm_prefill_flops', 0) / 1e9:.1f} | "
                f"{t.get('lm_prefill_attn_flops', 0) / 1e9:.1f} | {own / 1e9:.2f} | "
                f"{t.get('lm_prefill_bytes', 0) / 1e9:.2f} | "
                f"{t.get('decode_step_bytes', 0) / 1e9:.3f} | {c.get('kv_cache_bytes', 0) / (1 << 20):.1f} | "
                f"{_fmt(roof.get('lm_prefill'), '.2f')} | {_fmt(roof.get('decode_step'), '.3f')} |"
            )
        L.append("")
    if any(r.get("paired_ratios") for r in rows):
        from .stages import markdown_measured

        L.extend(markdown_measured(results))
    sweep = results.get("sweep") or []
    if sweep:
        L.append("## Decode batch sweep")
        L.append("")
        cap = f"memory capped at {st['mem_cap_gb']} GB" if st.get("mem_cap_gb") else "no memory cap"
        L.append(
            f"Each row: one `generate` of 1 + {st.get('sweep_warm_steps')} warm-up + "
            f"{st.get('sweep_decode_tokens')} timed "
            f"steps; batch sizes doubled until the first out-of-memory error; {cap}."
        )
        L.append("")
        L.append(
            "| setting | batch | status | tok/s | ms/step | prefill ms | peak GiB | KV cache MiB "
            "| model decode GB/step | roofline ms/step |"
        )
        L.append("|" + "---|" * 10)
        for r in sweep:
            c = r.get("cost") or {}
            L.append(
                f"| {r['setting']} | {r['batch']} | {r['status']} | {_fmt(r.get('decode_tok_s'), '.1f')} | "
                f"{_fmt(r.get('decode_step_ms'), '.2f')} | {_fmt(r.get('prefill_ms'), '.1f')} | "
                f"{_fmt(r.get('peak_gb'), '.2f')} | "
                f"{_fmt(_mib(r.get('kv_cache_bytes')), '.1f')} | "
                f"{_fmt(c.get('decode_step_bytes', 0) / 1e9 if c.get('decode_step_bytes') else None, '.3f')} | "
                f"{_fmt((c.get('roofline_ms') or {}).get('decode_step'), '.3f')} |"
            )
        L.append("")
        largest = results.get("largest_batch") or {}
        if largest:
            L.append("Largest batch that ran: " + ", ".join(f"{k}: {v}" for k, v in largest.items()))
            L.append("")
    notes = results.get("notes") or []
    if notes:
        L.append("## Notes")
        L.append("")
        L.extend(f"- {n}" for n in notes)
        L.append("")
    return "\n".join(L)


def plot(results: dict, path: str) -> str | None:
    """Latency and memory against the keep ratio per method, decode throughput against batch.
    Returns None when matplotlib is missing (re-render later with ``--report-from``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    rows = results.get("latency") or []
    sweep = results.get("sweep") or []
    base = next((r for r in rows if r["method"] == "none"), None)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    series: dict[str, list] = {}
    for r in rows:
        if r["method"] != "none":
            series.setdefault(r["series"], []).append(r)
    if base is not None and any(r.get("paired_ratios") for r in rows):
        from .stages import plot_ratios

        plot_ratios(fig, axes, series, rows)
        _finish(fig, results, path)
        return None
    panels = [
        (axes[0][0], "LM prefill (ms)", lambda r: _median_of(r.get("lm_prefill_ms")), True),
        (axes[0][1], "time to first token (ms)", lambda r: _median_of(r.get("ttft_ms")), False),
        (
            axes[1][0],
            "peak GPU memory above weights (GiB)",
            lambda r: (r.get("memory") or {}).get("above_weights_gb"),
            False,
        ),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name, get, with_model in panels:
        any_data = False
        for i, (key, rs) in enumerate(sorted(series.items())):
            rs = sorted(rs, key=lambda r: r["keep_ratio"])
            xs = [r["keep_ratio"] for r in rs]
            ys = [get(r) for r in rs]
            if all(y is None for y in ys):
                continue
            any_data = True
            col = colors[i % len(colors)]
            ax.plot(xs, ys, "o-", color=col, label=key)
            if with_model and base is not None and get(base):
                model = [
                    get(base) * ((r.get("ratios") or {}).get("model_lm_prefill_flops") or float("nan")) for r in rs
                ]
                ax.plot(xs, model, ":", color=col, alpha=0.7)
        if base is not None and get(base) is not None:
            ax.axhline(get(base), color="k", ls="--", lw=1, label="unpatched")
            any_data = True
        ax.set_xlabel("keep ratio f")
        ax.set_title(name + (" (dotted: cost model)" if with_model else ""))
        ax.grid(alpha=0.3)
        if any_data:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data (CPU run: no GPU memory)", ha="center", va="center", transform=ax.transAxes)
    ax = axes[1][1]
    by: dict[str, list] = {}
    for r in sweep:
        if r.get("status") == "ok":
            by.setdefault(r["setting"], []).append(r)
    for i, (key, rs) in enumerate(sorted(by.items())):
        rs = sorted(rs, key=lambda r: r["batch"])
        ax.plot(
            [r["batch"] for r in rs], [r["decode_tok_s"] for r in rs], "o-", label=key, color=colors[i % len(colors)]
        )
    if by:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no batch sweep in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("batch")
    ax.set_title("decode throughput (tokens/s)")
    ax.grid(alpha=0.3)
    _finish(fig, results, path)
    return None


def _finish(fig, results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    env, st = results["env"], results["settings"]
    fig.suptitle(
        f"{(results.get('model') or {}).get('title', st.get('model'))} on {env.get('gpu')}, batch {st.get('batch')}"
        f", {st.get('dtype')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _params(n) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _mib(n):
    return None if n is None else n / (1 << 20)


def _median_of(x):
    return x.get("median") if isinstance(x, dict) else x


def write_reports(results: dict, out_dir: str, stem: str, want_plot: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    with_ratios(results)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    if want_plot:
        png = os.path.join(out_dir, stem + ".png")
        why = plot(results, png)
        if why is None:
            paths["png"] = png
        else:
            results.setdefault("notes", []).append(
                f"no plot: {why} (re-render with `token-prune bench --report-from {paths['json']}` where it is)"
            )
    results["files"] = {k: os.path.basename(v) for k, v in paths.items()}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    return paths


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
