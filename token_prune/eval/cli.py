"""``token-prune demo --trained``, ``train-small-lvlm`` and ``eval-accuracy``."""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

from .synthetic import make_sample
from .accuracy import _with_current_eval, eval_accuracy, vip_layer_of
from .pictures import _compose, _token_weights, draw_token_picture
from .small_lvlm import PRESETS, KEEP_RATIOS, load_small_lvlm
from .train_small import train_small_lvlm


# --------------------------------------------------------------------------------------------
# Demo with the trained model, and the command line
# --------------------------------------------------------------------------------------------


def trained_demo(args) -> int:
    """``token-prune demo --trained DIR``: prune the small trained model on held-out samples, print
    the answers and what was kept, and save a picture of the kept tokens."""
    import token_prune as tp

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok, proc, preset, info = load_small_lvlm(args.trained)
    preset = _with_current_eval(preset)
    seed = int(info.get("seed", 0))
    samples = [make_sample(preset.task, seed, args.seed * 1000 + i, "test") for i in range(args.samples)]
    options = {k: v for k, v in dict(threshold=args.threshold, keep_ratio=args.keep_ratio, layer=args.layer,
                                      max_keep_ratio=args.max_keep_ratio).items() if v is not None}
    note = ""
    if args.method == "glimpse":
        k = args.layer if args.layer is not None else vip_layer_of(model, preset)
        vip = args.vip or os.path.join(args.trained, f"vip_K{k}")
        if os.path.isdir(vip):
            options["vip"] = vip
            note = f"(VIP {vip})"
        else:
            note = "(no trained VIP found: a random one; run eval-accuracy first to train it)"
    elif args.method == "alvts":
        sel = os.path.join(args.trained, "alvts_selector")
        if os.path.isfile(os.path.join(sel, "selector.json")):
            options["selector"] = sel
            note = f"(selector {sel})"
    if args.method in ("fastv", "alvts", "random") and "keep_ratio" not in options:
        options["keep_ratio"] = 0.111
    inputs = proc.batch(samples, with_answer=False)
    plen = inputs["input_ids"].shape[1]
    print(f"small Qwen2.5-VL from {args.trained} ({preset.name} preset, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    with torch.no_grad():
        full = [tok.decode(g) for g in model.generate(**inputs, max_new_tokens=3)[:, plen:].tolist()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = tp.patch(model, method=args.method, **options)
        with handle:
            out = model.generate(**inputs, max_new_tokens=3)
            pruned = [tok.decode(g) for g in out[:, plen:].tolist()]
            stats = handle.stats
            weights = [_token_weights(handle, inputs, b) for b in range(len(samples))]
            opts = {k: v for k, v in handle.options.items() if k != "selector"}
    print(f"method={args.method} options={opts} {note}")
    grids = [proc.token_grid(s.image) for s in samples]
    panels = []
    for b, s in enumerate(samples):
        st = stats[b]
        frac = (sum(st["processed_ratio"]) / len(st["processed_ratio"]) if "processed_ratio" in st
                else st["keep_ratio"])
        print(f"[{b}] {s.question}  truth: {s.answer} | unpatched: {full[b]} | pruned: {pruned[b]} | "
              f"visual tokens {st['visual_tokens']}, kept {100 * frac:.1f}%")
        panels.append(draw_token_picture(s.image, grids[b], torch.ones(len(weights[b])), box=s.box,
                                         title=f"{s.question}\nunpatched: {full[b]}"))
        panels.append(draw_token_picture(s.image, grids[b], weights[b], box=s.box,
                                         title=f"{args.method}: {pruned[b]}\nkept {100 * frac:.0f}%"))
    path = args.picture or os.path.join(args.trained, f"demo_{args.method}.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _compose(panels, columns=2 * min(2, len(samples))).save(path, optimize=True)
    print(f"picture: {path} (kept token cells bright with a yellow outline, pruned ones dimmed; "
          "ALVTS: brightness = share of layers that processed the token; green: the answer's box)")
    return 0


def _train_cli(args) -> int:
    if args.out is None:
        args.out = os.path.join("checkpoints", f"small_lvlm_{args.preset}")
    summary = train_small_lvlm(args.out, args.preset, seed=args.seed, steps=args.steps, device=args.device,
                               threads=args.threads, num_workers=args.workers, max_minutes=args.max_minutes,
                               progress=not args.quiet,
                               command=" ".join(["token-prune"] + sys.argv[1:]))
    print(json.dumps({k: summary[k] for k in ("steps", "params", "train_seconds", "val_acc", "final_loss")}))
    return 0


def _eval_cli(args) -> int:
    ratios = tuple(float(x) for x in args.keep_ratios.split(",")) if args.keep_ratios else KEEP_RATIOS
    eval_accuracy(args.checkpoint, out_dir=args.out, name=args.name, samples=args.samples, keep_ratios=ratios,
                  methods=args.methods.split(",") if args.methods else None, pictures=args.pictures,
                  device=args.device, threads=args.threads, retrain=args.retrain, progress=not args.quiet,
                  command=" ".join(["token-prune"] + sys.argv[1:]) if sys.argv else None)
    return 0


def add_subcommands(sub) -> None:
    """Register ``train-small-lvlm`` and ``eval-accuracy`` on the ``token-prune`` sub-parser."""
    t = sub.add_parser("train-small-lvlm", help="train a small Qwen2.5-VL from scratch on synthetic grounded VQA")
    t.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    t.add_argument("--out", default=None, help="checkpoint directory (default: checkpoints/small_lvlm_<preset>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="override the preset's optimizer steps")
    t.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    t.add_argument("--workers", type=int, default=None, help="data workers (default: the preset's)")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget: shorten the run (and its LR schedule) to what fits")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train_cli)

    e = sub.add_parser("eval-accuracy", help="held-out exact-match accuracy, unpatched and per pruning method")
    e.add_argument("checkpoint", help="directory written by train-small-lvlm")
    e.add_argument("--out", default=os.path.join("bench", "results"))
    e.add_argument("--name", default=None, help="file stem (default: accuracy_<preset>)")
    e.add_argument("--samples", type=int, default=None, help="held-out samples (default: the preset's)")
    e.add_argument("--keep-ratios", default=None, help="comma separated (default: 0.111,0.222,0.333)")
    e.add_argument("--methods", default=None, help="comma separated subset of glimpse,alvts,fastv,random")
    e.add_argument("--pictures", type=int, default=0, metavar="N", help="write pictures of the first N samples")
    e.add_argument("--retrain", action="store_true", help="retrain the VIP / recalibrate ALVTS even if cached")
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_eval_cli)
