"""``token-prune`` command line.

    token-prune demo                 # prune a tiny built-in model, print what was kept
    token-prune demo --method glimpse --keep-ratio 0.1 --layer 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from token_prune.methods import supported_methods
from token_prune.models import DEFAULT_MODEL, supported_models


def _demo(args) -> int:
    if getattr(args, "trained", None):
        from token_prune.eval.cli import trained_demo

        return trained_demo(args)
    import torch

    import token_prune as tp
    from token_prune import tiny

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = tiny.tiny_model(args.model, attn_implementation=args.attn, seed=args.seed)
    inputs = tiny.make_inputs(model, tiny.default_samples(args.model), seed=args.seed)
    print(f"tiny {args.model}: {model.config.text_config.num_hidden_layers} decoder layers, "
          f"built in {time.perf_counter() - t0:.1f}s (random weights, no download)")

    options = {k: v for k, v in dict(threshold=args.threshold, keep_ratio=args.keep_ratio, layer=args.layer,
                                      max_keep_ratio=args.max_keep_ratio, vip=args.vip).items() if v is not None}
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = model(**inputs)
        full_kv = [int(x) for x in inputs["attention_mask"].sum(1)]
        ref = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)[:, prompt_len:]
        with warnings.catch_warnings():
            if args.vip is None:
                warnings.simplefilter("ignore")  # the demo says below that its VIP is untrained
            handle = tp.patch(model, method=args.method, **options)
        with handle:
            t1 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)[:, prompt_len:]
            dt = time.perf_counter() - t1
            stats = handle.stats
            opts = handle.options
    del full

    print(f"method={args.method} options={opts}" + ("  (untrained random VIP)" if args.vip is None and args.method == "glimpse" else ""))
    # ALVTS drops nothing from the residual stream: report what each layer processed instead.
    kept_label = "processed" if args.method == "alvts" else "kept"
    header = (f"{'sample':>6} {'visual':>7} {kept_label:>9} {'%':>6} {'KV full':>8} {'KV pruned (min-max/layer)':>26}"
              "  generated (full | pruned)")
    print(header)
    print("-" * len(header))
    for b, s in enumerate(stats):
        kv = s.get("kv_len") or [0]
        n = s["visual_tokens"]
        kept = sum(s["visual_processed"]) / len(s["visual_processed"]) if "visual_processed" in s else s["kept_tokens"]
        pct = 100 * kept / n if n else 100.0
        print(f"{b:>6} {n:>7} {kept:>9.4g} {pct:>5.1f}% {full_kv[b]:>8} {f'{min(kv)}-{max(kv)}':>26}"
              f"  {ref[b].tolist()} | {out[b].tolist()}")
    per_layer = stats[0].get("kv_len", []) if stats else []
    if per_layer:
        print(f"sample 0 KV length per layer after prefill: {per_layer}")
    print(f"pruned generate: {dt * 1000:.0f} ms for {args.max_new_tokens} tokens")
    return 0


def _bench(args) -> int:
    from token_prune import bench

    try:
        return bench.run(args)
    except bench.BenchError as e:
        print(f"token-prune bench: error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="token-prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="prune a tiny random-weight model built from a config (no download)")
    demo.add_argument("--model", default=DEFAULT_MODEL, choices=supported_models())
    demo.add_argument("--method", default="glimpse", choices=supported_methods())
    demo.add_argument("--keep-ratio", type=float, default=None,
                      help="keep exactly this fraction of each image's tokens (default: threshold rule)")
    demo.add_argument("--threshold", type=float, default=None)
    demo.add_argument("--max-keep-ratio", type=float, default=None)
    demo.add_argument("--layer", type=int, default=None)
    demo.add_argument("--vip", default=None, help="trained VIP directory (glimpse)")
    demo.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--trained", default=None, metavar="DIR",
                      help="use the small model trained by train-small-lvlm in DIR on held-out samples of its "
                           "task, and save a picture of the kept tokens")
    demo.add_argument("--samples", type=int, default=2, help="--trained: held-out samples to show")
    demo.add_argument("--picture", default=None, help="--trained: picture path (default: DIR/demo_<method>.png)")
    demo.set_defaults(func=_demo)

    from token_prune.eval.cli import add_subcommands as _accuracy_subcommands

    _accuracy_subcommands(sub)  # train-small-lvlm, eval-accuracy

    from token_prune.alvts_calibration import add_subcommands as _calibrate_subcommands

    _calibrate_subcommands(sub)  # calibrate-alvts

    from token_prune.train import add_subcommands as _train_subcommands

    _train_subcommands(sub)  # train-vip, eval-vip (GlimpsePrune stage 1)

    from token_prune.eval.rl_bench import add_subcommands as _rl_subcommands

    _rl_subcommands(sub)  # train-rl, bench-rl (GlimpsePrune+; the rl extra)

    from token_prune.bench import add_arguments as _bench_arguments

    bench = sub.add_parser("bench", help="end-to-end latency / memory benchmark on full-size architectures "
                                         "(random weights; --tiny for a CPU run); see bench/PROFILING.md",
                           description="Benchmark token_prune's methods end to end. "
                                       "Same options as `python -m token_prune.bench`.")
    _bench_arguments(bench)
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"token-prune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
