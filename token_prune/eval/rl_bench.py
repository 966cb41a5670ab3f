"""GlimpsePrune+ on the synthetic grounded-VQA benchmark, and the ``train-rl`` / ``bench-rl`` commands.

``bench_rl(checkpoint)`` takes a small LVLM written by ``train-small-lvlm`` (train it with fewer
steps than its preset so that it is clearly below saturation) and reports greedy exact-match
accuracy on held-out ``test`` samples for:

* ``unpatched``: the model as trained;
* ``glimpse``: GlimpsePrune with the VIP ``eval-accuracy`` trains (cached in the checkpoint);
* ``glimpse_plus``: GlimpsePrune+, the same VIP and threshold after GRPO with the model pruned;
* ``rl_unpruned``: the control, the same GRPO run on the unpruned model, evaluated unpruned
  (separates the effect of RL from that of pruning), and ``rl_unpruned_glimpse``: that model
  pruned by the same VIP;
* ``glimpse_plus_unpruned``: the GlimpsePrune+ model run without pruning (diagnostic).

Each stage is cached in the checkpoint directory (``vip_K<k>/``, ``rl_pruned/``, ``rl_unpruned/``),
so ``--stages`` can split the work into commands that each fit a time limit (bench/gpu/rl.sh).
Results: ``<out>/<name>.json``, ``.md`` and ``.png`` (accuracy per row, reward curves).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch

STAGES = ("vip", "rl_pruned", "rl_unpruned", "eval")
RL_ROWS_START = 60_000_000  # train-split indices past what the LVLM and the VIP were trained on
#: rollout length: the task's answers are one word plus EOS; the rest is room for wrong, longer ones
ROLLOUT_TOKENS = 4


def _rl_stage(ckpt, sub, model_loader, rows, vip, proc, prune, opts, rl_args, log, progress):
    """Train (or reuse) one GRPO run in ``ckpt/sub``; returns its directory."""
    from ..train.rl import train_rl

    out = os.path.join(ckpt, sub)
    want = dict(rows=len(rows), prune=prune, options=opts, **rl_args)
    stamp = os.path.join(out, "bench_rl.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f).get("args") == want:
                log(f"using the GRPO run in {out}")
                return out
    log(f"GRPO {'with' if prune else 'without'} pruning: {rl_args['steps']} steps x "
        f"{rl_args['prompts_per_step']} prompts x {rl_args['num_generations']} rollouts -> {out}")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        res = train_rl(model_loader(), rows, vip=vip, processor=proc, out_dir=out, prune=prune, prune_options=opts,
                       progress=progress, **rl_args)
    with open(stamp, "w") as f:
        json.dump(dict(args=want, seconds=round(time.perf_counter() - t0, 1), steps_done=res.step), f, indent=2)
    return out


def bench_rl(checkpoint, *, out_dir="bench/results", name="rl_cpu", samples=500, stages=STAGES, rl_rows=2000,
             steps=300, prompts_per_step=8, num_generations=4, lr=1e-4, beta=0.04, lora_rank=32, temperature=1.0,
             threshold=0.5, max_keep_ratio=None, max_minutes=None, device=None, threads=None, progress=True,
             log=print, command=None) -> dict | None:
    """Run the requested ``stages`` (see the module docstring); with ``eval`` return the report."""
    from .. import api
    from .accuracy import _prepare_vip, _with_current_eval, vip_layer_of
    from .small_lvlm import load_small_lvlm
    from .synthetic import make_sample
    from .train_small import answer_accuracy
    from ..provenance import git_info
    from ..train.rl import read_log, small_lvlm_processor

    if threads:
        torch.set_num_threads(int(threads))
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = os.fspath(checkpoint)
    load = lambda: load_small_lvlm(ckpt, device=dev)[0]  # noqa: E731 - a fresh copy per run
    model, tok, proc, preset, info = load_small_lvlm(ckpt, device=dev)
    preset = _with_current_eval(preset)
    seed = int(info.get("seed", 0))
    K = vip_layer_of(model, preset)
    vip, vip_note = _prepare_vip(model, proc, preset, seed, ckpt, K, log, progress, retrain=False)
    if vip is None:
        raise RuntimeError(vip_note)
    opts = dict(threshold=threshold, max_keep_ratio=max_keep_ratio)
    rl_args = dict(steps=steps, prompts_per_step=prompts_per_step, num_generations=num_generations, lr=lr, beta=beta,
                   lora_rank=lora_rank, temperature=temperature, seed=seed, max_minutes=max_minutes,
                   max_new_tokens=ROLLOUT_TOKENS)
    rows = [make_sample(preset.task, seed, RL_ROWS_START + i, "train") for i in range(rl_rows)]
    hf_proc = small_lvlm_processor(tok, model.config)
    runs = {}
    for sub, prune in (("rl_pruned", True), ("rl_unpruned", False)):
        if sub in stages or ("eval" in stages and os.path.isfile(os.path.join(ckpt, sub, "bench_rl.json"))):
            runs[sub] = _rl_stage(ckpt, sub, load, rows, vip, hf_proc, prune, opts, rl_args, log, progress)
    if "eval" not in stages:
        return None
    missing = [s for s in ("rl_pruned", "rl_unpruned") if s not in runs]
    if missing:
        raise RuntimeError(f"eval needs the stages {missing} first")

    from ..train.rl import load_rl_adapters

    test = [make_sample(preset.task, seed, i, "test") for i in range(samples)]
    bs = preset.eval.batch_size
    rows_out = []

    def measure(key, label, m, pruned):
        t0 = time.perf_counter()
        if pruned:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle = api.patch(m, method="glimpse", vip=vip, **opts)
            with handle:
                r = answer_accuracy(m, proc, test, batch_size=bs, handle=handle)
        else:
            r = answer_accuracy(m, proc, test, batch_size=bs)
        correct = "".join("1" if a == tok.normalize(s.answer) else "0" for a, s in zip(r.pop("answers"), test))
        rows_out.append(dict(key=key, label=label, pruned=pruned, accuracy=r["accuracy"], keep_ratio=r["keep_ratio"],
                             box_hit=r["box_hit"], per_task=r["per_task"], seconds=round(time.perf_counter() - t0, 1),
                             correct=correct))
        log(f"{key:<24} accuracy {r['accuracy']:.3f}  kept {r['keep_ratio']:.3f}")

    with torch.no_grad():
        measure("unpatched", "unpatched", model, False)
        measure("glimpse", "GlimpsePrune", model, True)
        plus = load_rl_adapters(load(), runs["rl_pruned"]).eval()
        measure("glimpse_plus", "GlimpsePrune+ (GRPO while pruned)", plus, True)
        measure("glimpse_plus_unpruned", "GlimpsePrune+ model, run unpruned", plus, False)
        ctrl = load_rl_adapters(load(), runs["rl_unpruned"]).eval()
        measure("rl_unpruned", "unpatched + the same GRPO without pruning", ctrl, False)
        measure("rl_unpruned_glimpse", "GRPO without pruning, then GlimpsePrune", ctrl, True)
    acc = {r["key"]: r["accuracy"] for r in rows_out}
    correct = {r["key"]: r["correct"] for r in rows_out}
    paired = [paired_difference(correct, a, b) for a, b in PAIRS]
    stamps = {}
    for sub, d in runs.items():
        with open(os.path.join(d, "bench_rl.json")) as f:
            stamps[sub] = json.load(f)
    report = dict(
        checkpoint=ckpt, preset=preset.name, train_steps=info.get("steps"), samples=samples, eval_split="test",
        vip_layer=K, vip=vip_note, prune_options=opts, rl=dict(rows=rl_rows, **rl_args),
        rl_runs={k: dict(seconds=v["seconds"], steps_done=v.get("steps_done")) for k, v in stamps.items()},
        targets=dict(plus_vs_unpatched=acc["glimpse_plus"] - acc["unpatched"],
                     plus_vs_glimpse=acc["glimpse_plus"] - acc["glimpse"],
                     met=bool(acc["glimpse_plus"] >= acc["unpatched"] and acc["glimpse_plus"] >= acc["glimpse"] + 0.03
                              and rows_out[2]["keep_ratio"] < 0.10)),
        device=str(dev), gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        paired=paired, torch=torch.__version__, **git_info(), command=command, results=rows_out,
        curves={k: [{m: r.get(m) for m in ("step", "reward", "kl", "keep_ratio")} for r in read_log(d)]
                for k, d in runs.items()},
    )
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(_markdown(report))
    _plot(report, paths["png"])
    for p in paths.values():
        log(f"wrote {p}")
    return report


#: (a, b): accuracy differences reported with a paired confidence interval (same samples)
PAIRS = (("glimpse_plus", "unpatched"), ("glimpse_plus", "glimpse"), ("glimpse_plus", "rl_unpruned_glimpse"),
         ("rl_unpruned", "unpatched"))


def paired_difference(correct: dict, a: str, b: str) -> dict:
    """Accuracy of row ``a`` minus row ``b`` on the same samples, with a normal-approximation 95%
    interval of the per-sample differences, and the counts of samples only ``a`` / only ``b`` got."""
    x = [int(c) - int(d) for c, d in zip(correct[a], correct[b])]
    n = len(x)
    mean = sum(x) / n
    sd = (sum((v - mean) ** 2 for v in x) / max(1, n - 1)) ** 0.5
    half = 1.96 * sd / n ** 0.5
    return dict(a=a, b=b, diff=mean, ci95=[mean - half, mean + half], only_a=x.count(1), only_b=x.count(-1), n=n)


def _markdown(rep: dict) -> str:
    rl = rep["rl"]
    lines = [
        f"# GlimpsePrune+ on the synthetic grounded VQA task (preset `{rep['preset']}`)",
        "",
        f"Small LVLM trained {rep['train_steps']} steps (`{rep['checkpoint']}`); {rep['samples']} held-out "
        f"`{rep['eval_split']}` samples, greedy exact match. GlimpsePrune: K={rep['vip_layer']}, "
        f"{rep['prune_options']}; {rep['vip']}.",
        f"GRPO (TRL) with LoRA r={rl['lora_rank']} on the LLM linears: {rl['steps']} steps x "
        f"{rl['prompts_per_step']} prompts x {rl['num_generations']} rollouts, lr {rl['lr']}, KL beta {rl['beta']} "
        f"(k3), reward = normalised exact match, {rl['rows']} training prompts.",
        "Runs: " + ", ".join(f"{k} {v['steps_done']} steps in {v['seconds']:.0f}s" for k, v in rep["rl_runs"].items())
        + f"; {rep['device']}{' ' + rep['gpu'] if rep.get('gpu') else ''}, torch {rep['torch']}, "
        f"git {rep.get('git_sha', '?')}{' (dirty)' if rep.get('git_dirty') else ''}.",
        "",
        "| row | pruned | kept | answer box kept | accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rep["results"]:
        lines.append(f"| {r['label']} | {'yes' if r['pruned'] else 'no'} | {r['keep_ratio']:.3f} | "
                     f"{100 * r['box_hit']:.1f}% | {100 * r['accuracy']:.1f}% |")
    t = rep["targets"]
    lines += ["", f"GlimpsePrune+ minus unpatched: {100 * t['plus_vs_unpatched']:+.1f} points; minus GlimpsePrune: "
              f"{100 * t['plus_vs_glimpse']:+.1f} points. Target (>= unpatched, >= GlimpsePrune + 3, < 10% kept): "
              f"{'met' if t['met'] else 'not met'}.", ""]
    labels = {r["key"]: r["label"] for r in rep["results"]}
    lines += ["| difference (same samples) | points | 95% interval | only first right | only second right |",
              "|---|---:|---:|---:|---:|"]
    for p in rep["paired"]:
        lo, hi = p["ci95"]
        lines.append(f"| {labels[p['a']]} - {labels[p['b']]} | {100 * p['diff']:+.1f} | "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {p['only_a']} | {p['only_b']} |")
    lines.append("")
    if rep.get("command"):
        lines += [f"Command: `{rep['command']}`", ""]
    return "\n".join(lines)


def _plot(rep: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    rows = rep["results"]
    a.barh([r["label"] for r in rows][::-1], [100 * r["accuracy"] for r in rows][::-1],
           color=["tab:orange" if r["pruned"] else "tab:blue" for r in rows][::-1])
    a.set_xlabel("accuracy (%)  (orange: pruned)")
    for k, pts in rep["curves"].items():
        pts = [p for p in pts if p.get("reward") is not None]
        if pts:
            ys = [p["reward"] for p in pts]
            w = 10
            run = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            b.plot([p["step"] for p in pts], run, label=k)
    b.set_xlabel("GRPO step")
    b.set_ylabel("reward (running mean of 10)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _train_cli(args) -> int:
    from ..train.rl import train_rl

    if args.trained:
        from .accuracy import vip_layer_of
        from .small_lvlm import load_small_lvlm
        from .synthetic import make_sample
        from ..train.rl import small_lvlm_processor

        model, tok, _, preset, info = load_small_lvlm(args.trained)
        proc = small_lvlm_processor(tok, model.config)
        data = args.data or [make_sample(preset.task, int(info.get("seed", 0)), RL_ROWS_START + i, "train")
                             for i in range(args.rows)]
        vip = args.vip or os.path.join(args.trained, f"vip_K{vip_layer_of(model, preset)}")
    else:
        from transformers import AutoProcessor

        from ..train import load_model

        if not args.data or not args.vip:
            raise ValueError("--data and --vip are required with --model")
        model, _ = load_model(args.model, None, args.device, args.dtype)
        proc, data, vip = AutoProcessor.from_pretrained(args.model), args.data, args.vip
    opts = {k: v for k, v in dict(threshold=args.threshold, max_keep_ratio=args.max_keep_ratio,
                                  layer=args.layer).items() if v is not None}
    res = train_rl(model, data, vip=vip, processor=proc, out_dir=args.out, steps=args.steps,
                   prompts_per_step=args.prompts_per_step, num_generations=args.num_generations, lr=args.lr,
                   beta=args.beta, lora_rank=args.lora_rank, temperature=args.temperature,
                   max_new_tokens=args.max_new_tokens, keep_ratio_weight=args.keep_ratio_weight,
                   prune=not args.no_prune, prune_options=opts, save_every=args.save_every, resume=args.resume,
                   seed=args.seed, max_minutes=args.max_minutes, progress=not args.no_progress)
    last = res.log[-1] if res.log else {}
    print(f"trained {res.step} steps in {res.elapsed_s:.0f}s: reward {last.get('reward', float('nan')):.3f}, "
          f"kl {last.get('kl', float('nan')):.4f}, keep ratio {last.get('keep_ratio', float('nan')):.3f}; "
          f"adapters, log and plot in {args.out}")
    return 0


def _bench_cli(args) -> int:
    bench_rl(args.checkpoint, out_dir=args.out, name=args.name, samples=args.samples,
             stages=tuple(args.stages.split(",")), rl_rows=args.rows, steps=args.steps,
             prompts_per_step=args.prompts_per_step, lr=args.lr, threshold=args.threshold,
             max_keep_ratio=args.max_keep_ratio, max_minutes=args.max_minutes, threads=args.threads,
             progress=not args.no_progress, command="token-prune " + " ".join(sys.argv[1:]))
    return 0


def add_subcommands(sub) -> None:
    """Register ``train-rl`` and ``bench-rl`` (both need the rl extra: pip install token_prune[rl])."""
    tr = sub.add_parser("train-rl", help="GlimpsePrune+: GRPO + LoRA on the language model while it runs pruned",
                        description="TRL's GRPO with LoRA adapters on the language model; the model is patched "
                                    "with GlimpsePrune (frozen VIP) for rollouts and updates. Needs the rl extra.")
    g = tr.add_mutually_exclusive_group(required=True)
    g.add_argument("--trained", metavar="DIR", help="a small LVLM from train-small-lvlm (synthetic rows by default)")
    g.add_argument("--model", metavar="DIR", help="a local Hugging Face checkpoint directory (model + processor)")
    tr.add_argument("--data", default=None, metavar="FILE.jsonl", help="rows {image, question, answer}")
    tr.add_argument("--rows", type=int, default=2000, help="--trained without --data: synthetic training rows")
    tr.add_argument("--vip", default=None, metavar="DIR", help="trained VIP (--trained: DIR/vip_K<k> by default)")
    tr.add_argument("--out", required=True, metavar="DIR")
    tr.add_argument("--no-prune", action="store_true", help="the control: the same training on the unpruned model")
    tr.add_argument("--layer", type=int, default=None)
    tr.add_argument("--threshold", type=float, default=None)
    tr.add_argument("--max-keep-ratio", type=float, default=None)
    tr.add_argument("--keep-ratio-weight", type=float, default=0.0, help="reward term -w * kept share")
    tr.add_argument("--device", default=None)
    tr.add_argument("--dtype", default=None)
    _common(tr, steps=200, prompts=4)
    tr.add_argument("--num-generations", type=int, default=4)
    tr.add_argument("--beta", type=float, default=0.04)
    tr.add_argument("--lora-rank", type=int, default=32)
    tr.add_argument("--temperature", type=float, default=1.0)
    tr.add_argument("--max-new-tokens", type=int, default=8)
    tr.add_argument("--save-every", type=int, default=None)
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=_train_cli)

    be = sub.add_parser("bench-rl", help="GlimpsePrune+ vs GlimpsePrune vs unpatched (and RL without pruning) on "
                                         "a small LVLM from train-small-lvlm",
                        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    be.add_argument("checkpoint", metavar="DIR")
    be.add_argument("--out", default="bench/results")
    be.add_argument("--name", default="rl_cpu")
    be.add_argument("--samples", type=int, default=500)
    be.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    be.add_argument("--rows", type=int, default=2000, help="GRPO training prompts")
    be.add_argument("--threshold", type=float, default=0.5)
    be.add_argument("--max-keep-ratio", type=float, default=None)
    be.add_argument("--threads", type=int, default=None)
    _common(be, steps=300, prompts=8)
    be.set_defaults(func=_bench_cli)


def _common(p, steps, prompts):
    p.add_argument("--steps", type=int, default=steps, help="GRPO optimizer steps")
    p.add_argument("--prompts-per-step", type=int, default=prompts)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-minutes", type=float, default=None, help="stop each GRPO run after this wall time")
    p.add_argument("--no-progress", action="store_true")
