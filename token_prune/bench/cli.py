"""``token-prune bench``: presets, options and the entry points."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

from .. import costmodel as cm
from ..models import adapter_class
from ..provenance import environment
from .archs import build_model, hf_config, list_archs, load_arch
from .report import _fmt, _params, with_ratios, write_reports
from .runner import Bench
from .presets import PRESETS
from .settings import AgreementError, BenchError, SCHEMA, Setting, expand_settings


# ======================================================================================
# Presets and options
# ======================================================================================

DEFAULTS = dict(
    model="qwen2_5_vl_7b",
    dtype="bfloat16",
    attn="sdpa",
    batch=1,
    decode_tokens=32,
    warmup=2,
    repeats=5,
    decode_warmup=1,
    decode_repeats=3,
    settings=["none", "glimpse", "fastv", "alvts"],  # fastv: K=2, or the next attention layer of a hybrid decoder
    keep_ratios=[0.11, 0.25, 0.5, 1.0],
    sweep=False,
    sweep_batches=[1, 2, 4, 8, 16, 32, 64],
    sweep_settings=None,
    sweep_max_batch=None,
    sweep_decode_tokens=16,
    sweep_warm_steps=4,
    mem_cap_gb=None,
    check_tokens=8,
    check_batch=1,
    check_rtol=None,
    seed=0,
    alvts_selector="random",
    video_frames=None,
    out_dir=os.path.join("bench", "results"),
    device=None,
    threads=None,
    interleave=False,
    skip_check=False,
    cpu_clock="thread",
)

TINY_DEFAULTS = dict(
    dtype="float32",
    decode_tokens=4,
    warmup=1,
    repeats=3,
    decode_warmup=1,
    decode_repeats=2,
    keep_ratios=[0.25, 0.5, 1.0],
    sweep=True,
    sweep_batches=[1, 2],
    sweep_decode_tokens=4,
    sweep_warm_steps=1,
    check_tokens=6,
    check_batch=2,
)

def _csv(conv):
    def parse(text):
        try:
            return [conv(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _hw(text):
    a, sep, b = text.lower().partition("x")
    try:
        return (int(a), int(b if sep else a))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` options (shared by ``token-prune bench`` and ``python -m token_prune.bench``).
    Options left unset take the preset's value, then the defaults (``--tiny`` has its own)."""
    g = p.add_argument_group("what to run")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), help="a named configuration (qwen2_5_vl_7b_4k: Qwen2.5-VL-7B with 4096 "
        "visual tokens, every method, GPU; qwen2_5_vl_7b_video: the same model on a 32-frame 448x448 video; "
        "<arch>_cpu[_batch4|_bf16]: the mid-size CPU architectures on one pinned thread, see token_prune/bench/presets.py)"
    )
    g.add_argument(
        "--model",
        help=f"architecture config: one of {', '.join(list_archs())}, or a JSON path (default {DEFAULTS['model']})",
    )
    g.add_argument("--tiny", action="store_true", help="use the tiny random models of token_prune.tiny (CPU, seconds)")
    g.add_argument("--device", help="cuda, cpu or auto (default: the preset's, else cuda when available)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    g.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument(
        "--image", type=_hw, help="image size HxW in pixels (Qwen2.5-VL: multiples of 28; LLaVA-NeXT: anyres)"
    )
    g.add_argument("--video-frames", type=int,
                   help="the prompt holds one video of this many frames of --image size instead of an image "
                        "(families that take videos)")
    g.add_argument("--text-before", type=int, help="text tokens before the image")
    g.add_argument("--text-after", type=int, help="text tokens after the image (question + assistant prefix)")
    g.add_argument(
        "--setting",
        action="append",
        dest="settings_cli",
        metavar="METHOD[:k=v,...]",
        help="a setting to measure, repeatable: none | glimpse[:layer=K,keep_ratio=f] | fastv[:layer=K,...] | "
        "alvts[:keep_ratio=f,start_layer=s,rank=R,selector_form=group_rope|full_width]; without keep_ratio it "
        "is run at every --keep-ratios",
    )
    g.add_argument(
        "--keep-ratios", type=_csv(float), help="keep fractions for settings that give none (default 0.11,0.25,0.5,1.0)"
    )
    g.add_argument(
        "--only", type=_csv(str), help="phases to run, comma separated: check, latency, sweep (default: all enabled)"
    )
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--alvts-selector",
        choices=["random", "svd"],
        help="ALVTS low-rank factors: random (default; timing does not depend on their values) or svd "
        "(the method's own SVD start; minutes for a 7B model)",
    )
    t = p.add_argument_group("timing")
    t.add_argument("--batch", type=int, help="batch size of the latency runs")
    t.add_argument("--decode-tokens", type=int, help="decode steps timed per generate run")
    t.add_argument("--warmup", type=int, help="untimed prefill runs first")
    t.add_argument("--repeats", type=int, help="timed prefill runs (median reported)")
    t.add_argument("--decode-warmup", type=int)
    t.add_argument("--decode-repeats", type=int, help="timed generate runs (median reported); 0 skips decode timing")
    t.add_argument("--interleave", action="store_true", default=None,
                   help="every setting once per repeat (A B C A B C ...), one generate per run, ratios paired "
                   "within a repeat, CPU stage breakdown (the CPU presets' mode)")
    t.add_argument("--no-interleave", action="store_false", dest="interleave")
    t.add_argument("--cpu-clock", choices=["thread", "wall"],
                   help="CPU timer: this thread's CPU time (default; needs --threads 1) or wall time")
    s = p.add_argument_group("decode batch sweep")
    s.add_argument("--sweep", action="store_true", default=None, help="run the decode batch sweep")
    s.add_argument("--no-sweep", action="store_false", dest="sweep")
    s.add_argument(
        "--sweep-batches", type=_csv(int), help="batch sizes in order (default 1,2,4,...,64); stops at the first OOM"
    )
    s.add_argument(
        "--sweep-max-batch", type=int, help="after the list, keep doubling up to this size (or the first OOM)"
    )
    s.add_argument(
        "--sweep-setting",
        action="append",
        dest="sweep_settings_cli",
        metavar="SPEC",
        help="a setting for the sweep (repeatable; default: unpatched + each method at its smallest keep ratio)",
    )
    s.add_argument("--sweep-decode-tokens", type=int)
    s.add_argument("--sweep-warm-steps", type=int, help="untimed decode steps before the timed ones")
    s.add_argument("--mem-cap-gb", type=float, help="cap the CUDA caching allocator (GB); OOM is raised above it")
    c = p.add_argument_group("agreement check")
    c.add_argument("--skip-check", action="store_true", help="do not run the keep-everything agreement check")
    c.add_argument(
        "--no-baseline",
        action="store_true",
        help="do not add the unpatched model to the settings (profiling runs; no ratios then)",
    )
    c.add_argument("--check-tokens", type=int)
    c.add_argument("--check-batch", type=int)
    c.add_argument(
        "--check-rtol",
        type=float,
        help="logit tolerance, relative to the largest |logit| (default 1e-3 in float32, 5e-2 in bf16/fp16)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", help="directory for the JSON / Markdown / PNG (default bench/results)")
    o.add_argument("--tag", help="file name tag (default: a timestamp)")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument(
        "--cost-only", action="store_true", help="print and save the cost model for the settings; build no model"
    )
    o.add_argument(
        "--report-from",
        nargs="+",
        metavar="JSON",
        help="re-render Markdown + PNG from result JSON files (several: merged) and exit",
    )
    o.add_argument("--threads", type=int, help="torch CPU threads (--tiny and the CPU presets: 1)")
    o.add_argument("--quiet", action="store_true")


def resolve_options(args) -> dict:
    """Merge CLI values over the preset over the defaults into one plain dict."""
    o = dict(DEFAULTS)
    if args.tiny:
        o.update(TINY_DEFAULTS)
    if args.preset:
        preset = dict(PRESETS[args.preset])
        if args.tiny:  # keep the preset's settings, but the tiny model's sizes and budgets
            for key in (
                "image",
                "dtype",
                "batch",
                "decode_tokens",
                "warmup",
                "repeats",
                "decode_warmup",
                "decode_repeats",
                "sweep_batches",
                "sweep_max_batch",
                "sweep_decode_tokens",
                "sweep_warm_steps",
                "mem_cap_gb",
                "check_tokens",
                "check_batch",
            ):
                preset.pop(key, None)
            for key in ("settings", "sweep_settings"):
                if preset.get(key):
                    preset[key] = [s.replace("layer=18", "layer=4") for s in preset[key]]
        o.update(preset)
    cli = {
        "model": args.model,
        "dtype": args.dtype,
        "attn": args.attn,
        "image": args.image,
        "video_frames": args.video_frames,
        "text_before": args.text_before,
        "text_after": args.text_after,
        "settings": args.settings_cli,
        "keep_ratios": args.keep_ratios,
        "seed": args.seed,
        "alvts_selector": args.alvts_selector,
        "batch": args.batch,
        "decode_tokens": args.decode_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "decode_warmup": args.decode_warmup,
        "decode_repeats": args.decode_repeats,
        "sweep": args.sweep,
        "sweep_batches": args.sweep_batches,
        "sweep_max_batch": args.sweep_max_batch,
        "sweep_settings": args.sweep_settings_cli,
        "sweep_decode_tokens": args.sweep_decode_tokens,
        "sweep_warm_steps": args.sweep_warm_steps,
        "mem_cap_gb": args.mem_cap_gb,
        "check_tokens": args.check_tokens,
        "check_batch": args.check_batch,
        "check_rtol": args.check_rtol,
        "out_dir": args.out_dir,
        "device": args.device,
        "threads": args.threads,
        "interleave": args.interleave,
        "cpu_clock": args.cpu_clock,
    }
    if args.skip_check:
        o["skip_check"] = True
    o.update({k: v for k, v in cli.items() if v is not None})
    if args.sweep_batches is not None and args.sweep is None:
        o["sweep"] = True
    phases = args.only or ["check", "latency", "sweep"]
    bad = set(phases) - {"check", "latency", "sweep"}
    if bad:
        raise BenchError(f"--only: unknown phase(s) {', '.join(sorted(bad))}; use check, latency, sweep")
    if "sweep" in (args.only or []):
        o["sweep"] = True
    o["phases"] = [
        p
        for p in ("check", "latency", "sweep")
        if p in phases and not (p == "check" and o["skip_check"] and "check" not in (args.only or []))
        and not (p == "sweep" and not o["sweep"])
    ]
    o["tiny"] = bool(args.tiny)
    o["no_baseline"] = bool(getattr(args, "no_baseline", False))
    o["preset"] = args.preset
    o["tag"] = args.tag
    for key in ("batch", "decode_tokens", "repeats", "check_tokens", "check_batch"):
        if o[key] < 1:
            raise BenchError(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("warmup", "decode_warmup", "decode_repeats", "sweep_warm_steps"):
        if o[key] < 0:
            raise BenchError(f"--{key.replace('_', '-')} must be at least 0")
    return o


def _log(quiet):
    def log(*a):
        if not quiet:
            print(*a, flush=True)

    return log


def _stem(o: dict, name: str) -> str:
    tag = o.get("tag") or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"bench_{name}{'_tiny' if o['tiny'] else ''}_{tag}"


# ======================================================================================
# Entry points
# ======================================================================================


def run(args) -> int:
    """Run the benchmark for parsed ``args``; returns the process exit status."""
    log = _log(args.quiet)
    if args.report_from:
        return _report_from(args, log)
    o = resolve_options(args)
    arch = load_arch(o["model"])
    name = arch["name"]
    config = hf_config(arch)
    family = arch["family"]
    if o.get("image") is None:
        o["image"] = tuple(adapter_class(family).tiny_image) if o["tiny"] else tuple(arch["defaults"]["image"])
    for key in ("text_before", "text_after"):
        if o.get(key) is None:
            o[key] = (3 if key == "text_before" else 5) if o["tiny"] else int(arch["defaults"][key])
    if o.get("check_rtol") is None:
        o["check_rtol"] = 1e-3 if o["dtype"] == "float32" else 5e-2

    if args.cost_only:
        return _cost_only(o, arch, config, log)

    dev_name = o.get("device") or "auto"
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
        if dev_name == "cpu" and not o["tiny"]:
            raise BenchError(
                f"{name} is a full-size model and no GPU is available: use --tiny on a CPU, --cost-only "
                "for the cost model alone, or --device cpu to build it on the CPU anyway"
            )
    device = torch.device(dev_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but CUDA is not available")
    if o.get("threads"):
        torch.set_num_threads(o["threads"])
    elif o["tiny"] and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads
    if device.type == "cuda" and o.get("mem_cap_gb"):
        total = torch.cuda.get_device_properties(device).total_memory
        frac = min(1.0, o["mem_cap_gb"] * 1e9 / total)
        torch.cuda.set_per_process_memory_fraction(frac, device)
        o["mem_cap_fraction"] = frac
    dtype = getattr(torch, o["dtype"])

    t0 = time.perf_counter()
    log(f"building {name}{' (tiny)' if o['tiny'] else ''} on {device} in {o['dtype']} ...")
    model = build_model(arch, tiny=o["tiny"], device=device, dtype=dtype, attn=o["attn"], seed=o["seed"])
    build_s = time.perf_counter() - t0
    num_layers = model.config.text_config.num_hidden_layers
    settings = expand_settings(o["settings"], o["keep_ratios"], family, num_layers, baseline=not o["no_baseline"])
    sweep_specs = o.get("sweep_settings")
    if sweep_specs:
        sweep_settings = expand_settings(sweep_specs, o["keep_ratios"], family, num_layers)
    else:
        sweep_settings = [s for s in settings if s.method == "none"]
        sweep_settings += _smallest_per_series([s for s in settings if s.method != "none"])

    bench = Bench(model, arch, o, log)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"  built in {build_s:.1f}s: {_params(n_params)} params, weights {bench.weights_bytes / (1 << 30):.2f} GiB"
        + (f", allocated {torch.cuda.memory_allocated(device) / (1 << 30):.2f} GiB" if device.type == "cuda" else "")
    )
    log(
        f"  prompt: {bench.layout['text']} text + {bench.layout['visual']} visual tokens, "
        f"image {o['image'][0]}x{o['image'][1]}"
    )
    settings_out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.items()}
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "tag": o.get("tag"),
        "env": environment(device),
        "settings": settings_out,
        "setting_list": [s.to_dict() for s in settings],
        "sweep_setting_list": [s.to_dict() for s in sweep_settings],
        "model": {
            "name": name,
            "title": arch.get("title", name) + (" (tiny twin)" if o["tiny"] else ""),
            "family": family,
            "params": n_params,
            "weights_bytes": bench.weights_bytes,
            "build_s": build_s,
            "text_tokens": bench.layout["text"],
            "visual_tokens": bench.layout["visual"],
            "prompt_tokens": bench.layout["prompt"],
            "layers": num_layers,
            "arch": bench.cost_arch.to_dict(),
        },
        "check": [],
        "latency": [],
        "sweep": [],
        "largest_batch": {},
        "notes": [],
        "clock": bench.clock.name,
        "threads": torch.get_num_threads(),
        "machine_peak": bench.machine_peak,
    }
    if device.type == "cpu":
        results["notes"].append(
            f"CPU run: {torch.get_num_threads()} torch thread(s), times are {bench.clock.name} "
            "(wall time recorded beside it); other processes shared the machine"
            + (", settings interleaved within each repeat and ratios paired per repeat" if o["interleave"] else "")
        )
    if o["tiny"]:
        results["notes"].append(
            "tiny model on the CPU: checks that the tool works end to end; the numbers mean nothing"
        )
    results["notes"].append(
        "random weights: GlimpsePrune uses a random VIP and ALVTS a "
        f"{o['alvts_selector']} selector, so which tokens are kept is arbitrary; how many is fixed by "
        "keep_ratio, which is all the timing depends on"
    )
    stem = _stem(o, name)
    out_dir = o["out_dir"]

    def save(final=False):
        return write_reports(results, out_dir, stem, want_plot=final and not args.no_plot)

    status = 0
    try:
        if "check" in o["phases"]:
            log("agreement check (keep_ratio=1.0 vs unpatched):")
            results["check"] = bench.check(settings)
            bad = [c for c in results["check"] if c["status"] == "mismatch"]
            if bad:
                save(final=False)
                lines = "; ".join(
                    f"{c['setting']}: logit rel err {c['logit_rel_err']:.3g}, first differing step "
                    f"{c['first_diff_step']}"
                    for c in bad
                )
                raise AgreementError(
                    f"the patched model with keep_ratio=1.0 does not reproduce the unpatched model "
                    f"({lines}). Timing a model that computes something else is meaningless: aborted. "
                    f"Details in {os.path.join(out_dir, stem + '.json')}"
                )
        if "latency" in o["phases"]:
            log(
                f"latency (batch {o['batch']}, {o['warmup']} warm-up + {o['repeats']} runs, "
                f"{o['decode_tokens']} decode steps):"
            )
            if o["interleave"]:
                from .paired import measure_interleaved

                def partial(rows):
                    results["latency"] = rows
                    save()

                results["latency"] = measure_interleaved(bench, settings, log, on_round=partial)
                with_ratios(results)
            for s in settings:
                if o["interleave"]:
                    r = next(x for x in results["latency"] if x["setting"] == s.label)
                else:
                    r = bench.measure(s)
                    results["latency"].append(r)
                    with_ratios(results)
                q = r.get("ratios", {})
                log(
                    f"  {s.label:<28} LM {_fmt(r['lm_prefill_ms'], '9.2f')} ms (x{_fmt(q.get('lm_prefill'), '.3f')}, "
                    f"model x{_fmt(q.get('model_lm_prefill_flops'), '.3f')}, floor {_fmt(q.get('floor'), '.3f')})  "
                    f"TTFT {_fmt(r['ttft_ms'], '9.2f')} ms  decode {_fmt(r['decode_tok_s'], '8.1f')} tok/s"
                    + (f"  peak {r['memory']['peak_gb']:.2f} GiB" if r["memory"].get("peak_gb") is not None else "")
                )
                save()
        if "sweep" in o["phases"]:
            log(
                f"decode batch sweep {o['sweep_batches']}"
                + (f" (up to {o['sweep_max_batch']})" if o.get("sweep_max_batch") else "")
                + (f", memory cap {o['mem_cap_gb']} GB" if o.get("mem_cap_gb") else "")
                + ":"
            )
            for s in sweep_settings:
                rows = bench.sweep(s, o["sweep_batches"], o.get("sweep_max_batch"))
                results["sweep"].extend(rows)
                ok = [r["batch"] for r in rows if r["status"] == "ok"]
                results["largest_batch"][s.label] = max(ok) if ok else 0
                save()
    except AgreementError as e:
        print(f"token-prune bench: AGREEMENT CHECK FAILED: {e}", file=sys.stderr)
        status = 3
    finally:
        bench.close()
    paths = save(final=True)
    log("wrote " + ", ".join(paths.values()))
    return status


def _smallest_per_series(settings: list[Setting]) -> list[Setting]:
    best: dict[str, Setting] = {}
    for s in settings:
        if s.family_key not in best or s.keep_ratio < best[s.family_key].keep_ratio:
            best[s.family_key] = s
    # One GlimpsePrune entry is enough for decode: every K leaves the same caches.
    out, glimpse_seen = [], False
    for s in best.values():
        if s.method == "glimpse":
            if glimpse_seen:
                continue
            glimpse_seen = True
        out.append(s)
    return out


def _cost_only(o: dict, arch: dict, config, log) -> int:
    family = arch["family"]
    L = config.text_config.num_hidden_layers
    settings = expand_settings(o["settings"], o["keep_ratios"], family, L)
    a = cm.arch_from_config(config, dtype_bytes=torch.tensor([], dtype=getattr(torch, o["dtype"])).element_size())
    lay = cm.prompt_layout(config, tuple(o["image"]), o["text_before"], o["text_after"], o.get("video_frames"))
    gpu = os.environ.get("TOKEN_PRUNE_COST_GPU", "H100")
    rows = []
    for s in settings:
        est = cm.estimate(
            a,
            lay,
            tuple(o["image"]),
            s.method,
            keep_ratio=s.keep_ratio,
            K=s.options.get("layer"),
            start_layer=s.options.get("start_layer", 0),
            skipped=s.options.get("skipped", "context"),
            selector_form=s.options.get("selector_form"),
            alvts_rank=s.options.get("rank"),
            batch=o["batch"],
            decode_tokens=o["decode_tokens"],
            gpu=gpu,
        )
        rows.append(
            {
                "setting": s.label,
                "method": s.method,
                "options": s.options,
                "series": s.family_key,
                "keep_ratio": s.keep_ratio,
                "batch": o["batch"],
                "visual_tokens": lay["visual"],
                "kept_tokens": est["kept_tokens"],
                "kv_len": est["kv_len"],
                "kv_cache_bytes": est["kv_cache_bytes"],
                "recurrent_state_bytes": est["recurrent_state_bytes"],
                "memory": {},
                "cost": est,
            }
        )
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "tag": o.get("tag"),
        "env": environment(None),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.items()},
        "model": {
            "name": arch["name"],
            "title": arch.get("title"),
            "family": family,
            "params": arch.get("params"),
            "text_tokens": lay["text"],
            "visual_tokens": lay["visual"],
            "prompt_tokens": lay["prompt"],
            "layers": L,
            "arch": a.to_dict(),
        },
        "check": [],
        "latency": rows,
        "sweep": [],
        "largest_batch": {},
        "notes": [f"cost model only (--cost-only): no model was built or timed; roofline times for {gpu}"],
    }
    with_ratios(results)
    log(
        f"{arch['title']}: {lay['text']} text + {lay['visual']} visual tokens, image {o['image'][0]}x{o['image'][1]}, "
        f"batch {o['batch']} (cost model; roofline on {gpu})"
    )
    log(
        f"  {'setting':<28} {'LM GFLOP':>10} {'ratio':>7} {'floor':>7} {'TTFT ratio':>10} {'decode GB':>10} "
        f"{'KV MiB':>8} {'state MiB':>9} "
        f"{'LM ms*':>8} {'dec ms*':>8}"
    )
    for r in rows:
        c, q = r["cost"], r["ratios"]
        roof = c.get("roofline_ms") or {}
        log(
            f"  {r['setting']:<28} {c['totals']['lm_prefill_flops'] / 1e9:10.1f} {q['model_lm_prefill_flops']:7.3f} "
            f"{q['floor']:7.3f} {q['model_ttft_flops']:10.3f} {c['totals']['decode_step_bytes'] / 1e9:10.3f} "
            f"{c['kv_cache_bytes'] / (1 << 20):8.1f} {c['recurrent_state_bytes'] / (1 << 20):9.1f} "
            f"{_fmt(roof.get('lm_prefill'), '8.2f')} "
            f"{_fmt(roof.get('decode_step'), '8.3f')}"
        )
    log("  (* roofline lower bounds)")
    stem = _stem(o, arch["name"]) + "_cost"
    paths = write_reports(results, o["out_dir"], stem, want_plot=False)
    log("wrote " + ", ".join(paths.values()))
    return 0


def _report_from(args, log) -> int:
    merged = None
    for path in args.report_from:
        with open(path) as f:
            r = json.load(f)
        if r.get("schema") != SCHEMA:
            raise BenchError(f"{path}: not a {SCHEMA} file")
        if merged is None:
            merged = r
            merged.setdefault("notes", [])
            continue
        for key in ("check", "latency", "sweep"):
            merged[key] = (merged.get(key) or []) + (r.get(key) or [])
        merged["largest_batch"] = {**(merged.get("largest_batch") or {}), **(r.get("largest_batch") or {})}
        merged["notes"].append(f"merged from {os.path.basename(path)}")
    merged["notes"] = [n for n in merged["notes"] if not n.startswith("no plot:")]
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.report_from[0]))
    stem = (
        f"{os.path.splitext(os.path.basename(args.report_from[0]))[0]}"
        + ("_merged" if len(args.report_from) > 1 else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    paths = write_reports(merged, out_dir, stem, want_plot=not args.no_plot)
    log("wrote " + ", ".join(paths.values()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m token_prune.bench", description=sys.modules[__package__].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (BenchError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"token-prune bench: error: {e}", file=sys.stderr)
        return 2

