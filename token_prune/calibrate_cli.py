"""``token-prune calibrate-alvts``: fit the ALVTS selector of a local model on a JSONL of images
and questions (or, with ``--tiny``, of a built-in tiny model on synthetic data)."""

from __future__ import annotations

import json
import os


def add_subcommands(sub) -> None:
    p = sub.add_parser("calibrate-alvts", help="fit ALVTS's low-rank selector to the full-rank score (model frozen)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (model + processor)")
    g.add_argument("--tiny", nargs="?", const="qwen2_5_vl", choices=("qwen2_5_vl", "llava", "llava_next"),
                   help="a built-in tiny random-weight model with synthetic data (offline)")
    p.add_argument("--data", metavar="FILE.jsonl", help='rows {"image": path, "question": str, ...}')
    p.add_argument("--out", required=True, metavar="DIR", help="where selector.safetensors + selector.json go")
    p.add_argument("--samples", type=int, default=256, help="rows to calibrate on (the paper uses 256)")
    p.add_argument("--rank", type=int, default=None, help="default: the per-model rank")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="rows per calibration batch")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_calibrate)


def _calibrate(args) -> int:
    from .data import collate, load_jsonl, make_synthetic_dataset, prompt_inputs
    from .methods.alvts import LowRankSelector, calibrate_alvts, score_error
    from .train import load_model

    model, proc = load_model(args.model, args.tiny, args.device, args.dtype)
    data = args.data
    if data is None:
        if args.tiny is None:
            raise ValueError("--data FILE.jsonl is required with --model")
        data = make_synthetic_dataset(os.path.join(args.out, "synthetic_calibration"), args.samples, seed=args.seed)
    rows = list(load_jsonl(data))[: args.samples]
    if not rows:
        raise ValueError(f"{data}: no rows")
    pad = getattr(model.generation_config, "pad_token_id", None) or 0
    encoded = [proc.encode(r) for r in rows]
    batches = []
    for i in range(0, len(encoded), args.batch_size):
        chunk = encoded[i:i + args.batch_size]
        # prompt only: the selector scores the prompt the way prefill does
        prompts = [type(e)(inputs=prompt_inputs(e), prompt_len=e.prompt_len, boxes=None, ref=e.ref) for e in chunk]
        batch = collate(prompts, pad)["inputs"]
        batches.append({k: v.to(model.device) for k, v in batch.items()})
    selector = calibrate_alvts(model, batches, rank=args.rank, steps=args.steps, lr=args.lr,
                               start_layer=args.start_layer, out=args.out, progress=not args.no_progress,
                               seed=args.seed)
    n_eval = min(len(batches), 8)
    from .models import adapter_for

    svd = LowRankSelector.from_svd(adapter_for(model), selector.rank, sorted(int(k) for k in selector.layers))
    report = {"calibrated": score_error(selector, model, batches[:n_eval]),
              "svd": score_error(svd, model, batches[:n_eval])}
    with open(os.path.join(args.out, "calibration_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"wrote {args.out}: rank {selector.rank}, {len(rows)} rows; on {n_eval} calibration batches "
          f"rel. score error SVD {mean(report['svd']['rel_mse']):.3f} -> {mean(report['calibrated']['rel_mse']):.3f}, "
          f"top-11% overlap {mean(report['svd']['topk_overlap']):.3f} -> {mean(report['calibrated']['topk_overlap']):.3f}")
    return 0
