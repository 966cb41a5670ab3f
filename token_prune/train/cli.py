"""``token-prune train-vip`` / ``eval-vip`` and the model loader they share with calibration."""

from __future__ import annotations

import json
import os

import torch

from ..data import HFChatProcessor, TinyProcessor
from ..models import DEFAULT_MODEL, supported_models
from .evaluate import evaluate_vip
from .loop import OBJECTIVES, train_vip


# --------------------------------------------------------------------------------------------
# Command line: token-prune train-vip / eval-vip
# --------------------------------------------------------------------------------------------

def load_model(model_dir: str | None = None, tiny: str | None = None, device: str | None = None,
               dtype: str | None = None, model_seed: int = 0):
    """(model, processor) for the CLI: a local HF checkpoint directory (``AutoModelForImageTextToText``
    + ``AutoProcessor``, sdpa attention) or a tiny random-weight model (``tiny``) with a
    :class:`TinyProcessor`. Defaults: CUDA if available; bf16 on CUDA, fp32 on CPU."""
    if (model_dir is None) == (tiny is None):
        raise ValueError("give exactly one of --model DIR and --tiny")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is not None and dtype not in names:
        raise ValueError(f"--dtype must be one of {sorted(names)}, got {dtype!r}")
    torch_dtype = names[dtype] if dtype else (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if tiny is not None:
        from ..tiny import tiny_model

        model = tiny_model(tiny, seed=model_seed, dtype=torch_dtype, device=device)  # ValueError if unknown
        return model, TinyProcessor(model)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    return model, HFChatProcessor(AutoProcessor.from_pretrained(model_dir), model=model)


def _model_args(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (model + processor)")
    g.add_argument("--tiny", nargs="?", const=DEFAULT_MODEL, choices=supported_models(),
                   help=f"use a built-in tiny random-weight model (default {DEFAULT_MODEL}) and synthetic data "
                        "(offline)")
    p.add_argument("--model-seed", type=int, default=0, help="--tiny: seed of the tiny model's weights")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--synthetic-rows", type=int, default=None,
                   help="--tiny without --data: rows of synthetic data to write (train 64, eval 16)")


def _train_cli(args) -> int:
    model, proc = load_model(args.model, args.tiny, args.device, args.dtype, args.model_seed)
    data = args.data
    if data is None:
        if args.tiny is None:
            raise ValueError("--data FILE.jsonl is required with --model")
        from ..data import make_synthetic_dataset

        data = make_synthetic_dataset(os.path.join(args.out, "synthetic_train"), args.synthetic_rows or 64,
                                      seed=args.seed)
        print(f"wrote synthetic training data: {data}")
    res = train_vip(
        model, data, layer=args.layer, out_dir=args.out, processor=proc, objective=args.objective,
        kl_weight=args.kl_weight, sparsity_weight=args.sparsity_weight, ce_weight=args.ce_weight,
        dice_weight=args.dice_weight, bce_weight=args.bce_weight, target_keep=args.target_keep,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=None if args.max_grad_norm <= 0 else args.max_grad_norm,
        gradient_checkpointing=args.grad_ckpt, bf16=not args.no_bf16, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, init_vip=args.init_vip, seed=args.seed,
        num_workers=args.num_workers, progress=not args.no_progress)
    h = res.history
    first = h[0]["loss"] if h else float("nan")
    last = h[-1] if h else {}
    where = f"resumed from {res.resumed_from}, " if res.resumed_from else ""
    print(f"trained {res.step} steps ({where}{res.elapsed_s:.1f}s): loss {first:.4f} -> {last.get('loss', float('nan')):.4f}, "
          f"mean keep prob {last.get('keep_soft', float('nan')):.3f} (hard {last.get('keep_hard', float('nan')):.3f}), "
          f"K={res.modules.config.layer}")
    print(f"saved to {args.out}: token_prune.patch(model, method='glimpse', vip={args.out!r})")
    return 0


def _eval_cli(args) -> int:
    model, proc = load_model(args.model, args.tiny, args.device, args.dtype, args.model_seed)
    data = args.data
    tmp = None
    if data is None:
        if args.tiny is None:
            raise ValueError("--data FILE.jsonl is required with --model")
        import tempfile

        from ..data import make_synthetic_dataset

        tmp = tempfile.TemporaryDirectory()
        data = make_synthetic_dataset(tmp.name, args.synthetic_rows or 16, seed=args.seed + 1_000)
        print(f"evaluating on {args.synthetic_rows or 16} held-out synthetic rows (seed {args.seed + 1_000})")
    try:
        rep = evaluate_vip(model, args.vip, data, processor=proc, threshold=args.threshold, keep_ratio=args.keep_ratio,
                           max_keep_ratio=args.max_keep_ratio, min_keep=args.min_keep, layer=args.layer,
                           max_new_tokens=args.max_new_tokens, generate=not args.no_generate, limit=args.limit,
                           progress=not args.no_progress)
    finally:
        if tmp is not None:
            tmp.cleanup()
    rule = f"keep_ratio={args.keep_ratio}" if args.keep_ratio else f"threshold={args.threshold}"
    print(f"{rep['samples']} samples, K={rep['layer']}, {rule}")
    print(f"  mean keep ratio        {rep['keep_ratio']:.4f}")
    print(f"  KL(full || pruned)     {rep['kl']:.5f}  (first answer token {rep['kl_first']:.5f})")
    if "greedy_match" in rep:
        print(f"  greedy answers equal   {rep['greedy_match']:.3f}")
        print(f"  greedy token agreement {rep['token_agreement']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def add_subcommands(sub) -> None:
    """Register ``train-vip`` and ``eval-vip`` on an argparse subparsers object."""
    tr = sub.add_parser("train-vip", help="train the glimpse token + VIP of a frozen LVLM (GlimpsePrune stage 1)",
                        description="Train only the glimpse embeddings, their projection/norm and the VIP of a "
                                    "frozen LVLM at decoder layer K. Rows: JSONL {image, question, answer, boxes?}.")
    _model_args(tr)
    tr.add_argument("--data", metavar="FILE.jsonl", help="training rows (required with --model)")
    tr.add_argument("--out", required=True, metavar="DIR", help="checkpoints and the final VIP go here")
    tr.add_argument("--layer", type=int, default=None, help="K (default: the public setting, else ~64%% depth)")
    tr.add_argument("--objective", default="kl", choices=sorted(OBJECTIVES))
    for name in ("kl", "sparsity", "ce", "dice", "bce"):
        tr.add_argument(f"--{name}-weight", type=float, default=None, help=f"override the {name} loss weight")
    tr.add_argument("--target-keep", type=float, default=0.1)
    tr.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs passes)")
    tr.add_argument("--epochs", type=int, default=1)
    tr.add_argument("--batch-size", type=int, default=4)
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--warmup-ratio", type=float, default=0.1)
    tr.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0 turns clipping off")
    tr.add_argument("--grad-ckpt", action="store_true", help="checkpoint every decoder-layer call")
    tr.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    tr.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    tr.add_argument("--keep-checkpoints", type=int, default=None, help="keep only the newest N checkpoints")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tr.add_argument("--init-vip", default=None, metavar="DIR", help="start from this VIP instead of a random one")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--num-workers", type=int, default=0)
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_train_cli)

    ev = sub.add_parser("eval-vip", help="evaluate a trained VIP through the real pruned inference path",
                        description="Mean keep ratio, KL of the pruned model's answer distribution to the full "
                                    "model's, and greedy-answer agreement, on held-out JSONL rows.")
    _model_args(ev)
    ev.add_argument("--vip", required=True, metavar="DIR", help="a VIP directory (train-vip --out, or public format)")
    ev.add_argument("--data", metavar="FILE.jsonl", help="held-out rows (required with --model)")
    ev.add_argument("--threshold", type=float, default=0.5)
    ev.add_argument("--keep-ratio", type=float, default=None, help="keep exactly this fraction instead")
    ev.add_argument("--max-keep-ratio", type=float, default=None)
    ev.add_argument("--min-keep", type=int, default=1)
    ev.add_argument("--layer", type=int, default=None, help="prune after this layer (default: the VIP's)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="greedy tokens (default: the answer's length)")
    ev.add_argument("--no-generate", action="store_true", help="skip the greedy-answer comparison")
    ev.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    ev.add_argument("--seed", type=int, default=0, help="--tiny without --data: synthetic data seed (+1000)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval_cli)
