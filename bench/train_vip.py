"""Timed GlimpsePrune stage-1 training (``token_prune.train_vip``): steps/s and peak GPU memory.

    python bench/train_vip.py                                   # Qwen2.5-VL-7B architecture, GPU
    python bench/train_vip.py --layers 9,18 --grad-ckpt both --batch-size 4 --image 672 672
    python bench/train_vip.py --model llava_1_5_7b --steps 30
    python bench/train_vip.py --tiny --steps 3                  # tiny model on the CPU, seconds

The model is a full-size architecture from ``token_prune/configs`` built with random weights
directly on the GPU in bf16 (``token_prune.bench.build_model``; no checkpoint is read, nothing is
downloaded), so timings and memory are those of the real shapes. Training data are synthetic
(``token_prune.data.make_synthetic_dataset``: a flat background with coloured squares, at
``--image`` pixels) encoded by ``token_prune.data.TinyProcessor``, so nothing needs a tokenizer.

For every (K, gradient-checkpointing) setting it trains fresh glimpse modules for ``--steps``
optimizer steps (KL objective, bf16 autocast on CUDA), discards the first ``--warmup`` steps, and
reports steps/s, rows/s, ms/step (median), peak GPU memory (``max_memory_allocated`` over the
run, and above the model weights), the trainable parameter count and the loss trajectory.
Results: ``bench/results/train_vip_<model>_<tag>.json`` (with GPU name, torch / CUDA /
transformers versions and git sha) and a Markdown table ``.md`` beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from token_prune.bench import build_model, load_arch  # noqa: E402
from token_prune.provenance import environment  # noqa: E402
from token_prune.data import TinyProcessor, load_jsonl, make_synthetic_dataset  # noqa: E402
from token_prune.models import adapter_for  # noqa: E402
from token_prune.train import train_vip  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setting(model, data, proc, *, layer, grad_ckpt, args, device) -> dict:
    stamps = []

    def tick(record):
        _sync(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    _sync(device)
    t0 = time.perf_counter()
    status, error = "ok", None
    try:
        res = train_vip(model, data, layer=layer, processor=proc, objective=args.objective, target_keep=args.target_keep,
                        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        gradient_checkpointing=grad_ckpt, seed=args.seed, progress=not args.no_progress,
                        callback=tick)
        history = res.history
        n_params = sum(p.numel() for p in res.modules.parameters())
    except torch.cuda.OutOfMemoryError as e:  # a setting that does not fit is a result too
        status, error, history, n_params = "oom", str(e).splitlines()[0], [], None
        torch.cuda.empty_cache()
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    timed = times[args.warmup:] if len(times) > args.warmup else times
    total = sum(timed)
    rows_per_step = args.batch_size * args.grad_accum
    out = dict(layer=layer, grad_ckpt=grad_ckpt, status=status, error=error, steps=len(times),
               timed_steps=len(timed), steps_per_s=len(timed) / total if total else None,
               rows_per_s=len(timed) * rows_per_step / total if total else None,
               ms_per_step_median=1000 * statistics.median(timed) if timed else None,
               peak_mem_mb=peak_mb, weights_mb=weights_mb,
               peak_above_weights_mb=(peak_mb - weights_mb) if peak_mb is not None else None,
               trainable_params=n_params,
               loss_first=history[0]["loss"] if history else None,
               loss_last=history[-1]["loss"] if history else None,
               keep_last=history[-1]["keep_hard"] if history else None)
    return out


def markdown(rep: dict) -> str:
    env, a = rep["environment"], rep["args"]
    L = [f"# train_vip benchmark: {rep['model']}", "",
         f"{env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
         f"git {env['git_sha'][:12]}{' (dirty)' if env.get('git_dirty') else ''}, {rep['date']}", "",
         f"{rep['visual_tokens']} visual tokens per row ({a['image'][0]}x{a['image'][1]} px), "
         f"{rep['sequence_tokens']} tokens per row, batch {a['batch_size']} x accumulation {a['grad_accum']}, "
         f"objective {a['objective']}, {a['steps']} steps ({a['warmup']} warm-up steps not timed), "
         f"{rep['dtype']}, autocast bf16 on CUDA.", "",
         "| K | grad ckpt | status | steps/s | rows/s | ms/step (median) | peak mem (MiB) | above weights (MiB) "
         "| loss first -> last |",
         "|---|---|---|---|---|---|---|---|---|"]

    def f(x, spec):
        return "–" if x is None else format(x, spec)

    for r in rep["results"]:
        L.append(f"| {r['layer']} | {'on' if r['grad_ckpt'] else 'off'} | {r['status']} | {f(r['steps_per_s'], '.3f')} "
                 f"| {f(r['rows_per_s'], '.2f')} | {f(r['ms_per_step_median'], '.0f')} | {f(r['peak_mem_mb'], '.0f')} "
                 f"| {f(r['peak_above_weights_mb'], '.0f')} | {f(r['loss_first'], '.4f')} -> {f(r['loss_last'], '.4f')} |")
    L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2_5_vl_7b", help="architecture config (token_prune/configs) or JSON path")
    p.add_argument("--tiny", action="store_true", help="the tiny twin of --model's family, float32 (CPU check)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--image", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image size in px (default 672x672; --tiny 64x96)")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows (default: enough for every step)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3, --tiny 1)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--layers", default=None, help="comma-separated K values (default: the public K)")
    p.add_argument("--grad-ckpt", choices=["off", "on", "both"], default="both")
    p.add_argument("--objective", default="kl")
    p.add_argument("--target-keep", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--tag", default=None, help="file name tag (default: a timestamp)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    arch = load_arch(args.model)
    dtype = torch.float32 if (args.tiny or device.type == "cpu") else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.image = args.image or ([64, 96] if args.tiny else [672, 672])
    print(f"building {arch['name']}{' (tiny)' if args.tiny else ''} on {device} ({dtype}), random weights")
    t0 = time.perf_counter()
    model = build_model(arch, tiny=args.tiny, device=device, dtype=dtype)
    print(f"  built in {time.perf_counter() - t0:.1f}s")
    adapter = adapter_for(model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [adapter.default_glimpse_layer()]
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    proc = TinyProcessor(model, max_side=max(args.image))
    vc = model.config.vision_config
    unit = vc.patch_size * getattr(vc, "spatial_merge_size", 1) if arch["family"] == "qwen2_5_vl" else 16
    rows = args.rows or args.steps * args.batch_size * args.grad_accum
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(tmp, rows, seed=args.seed, sizes=[tuple(args.image)], unit=unit)
        first = proc.encode(load_jsonl(data)[0])
        seq = int(first.inputs["input_ids"].shape[1])
        n_vis = int((first.inputs["input_ids"] == adapter.image_token_id).sum())
        results = []
        for k in layers:
            for ck in ckpts:
                print(f"K={k} grad_ckpt={'on' if ck else 'off'}: {args.steps} steps x {args.batch_size} rows, "
                      f"{n_vis} visual / {seq} tokens per row")
                r = run_setting(model, data, proc, layer=k, grad_ckpt=ck, args=args, device=device)
                results.append(r)
                print(f"  {r['status']}: {r['steps_per_s'] or 0:.3f} steps/s, {r['rows_per_s'] or 0:.2f} rows/s, "
                      + (f"peak {r['peak_mem_mb']:.0f} MiB, " if r["peak_mem_mb"] is not None else "")
                      + f"loss {r['loss_first']} -> {r['loss_last']}")
    env = environment(device)
    rep = dict(model=arch["name"] + (" (tiny)" if args.tiny else ""), date=datetime.datetime.now().isoformat(timespec="seconds"),
               dtype=str(dtype).replace("torch.", ""), visual_tokens=n_vis, sequence_tokens=seq,
               args=vars(args), environment=env, results=results)
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"train_vip_{arch['name']}{'_tiny' if args.tiny else ''}_{tag}")
    with open(base + ".json", "w") as f:
        json.dump(rep, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(rep))
    print(markdown(rep))
    print(f"wrote {base}.json and {base}.md")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
