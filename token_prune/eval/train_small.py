"""Training the small vision-language model from scratch on the synthetic grounded VQA task\n(``token-prune train-small-lvlm``), and its exact-match accuracy."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from .synthetic import Sample, WordTokenizer, make_sample
from .pictures import _box_cells, _token_weights
from .small_lvlm import PRESETS, CONFIG_FILE, Preset, SmallVLMProcessor, TrainSpec, _to, build_small_lvlm


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _answer_loss(model, batch: dict, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the answer tokens, and per-row "every answer token argmax-correct"."""
    answer_mask = batch.pop("answer_mask")
    A = int(answer_mask.sum(1).max())
    with autocast:
        out = model(**batch, use_cache=False, logits_to_keep=A + 1)
    logits = out.logits[:, :-1].float()  # position t predicts token t + 1
    target = batch["input_ids"][:, -A:]
    m = answer_mask[:, -A:]
    loss = F.cross_entropy(logits[m], target[m])
    correct = ((logits.argmax(-1) == target) | ~m).all(1)
    return loss, correct


@torch.no_grad()
def answer_accuracy(model, proc: SmallVLMProcessor, samples: list[Sample], batch_size: int = 64,
                    max_new_tokens: int | None = None, handle=None, on_batch=None) -> dict:
    """Exact-match accuracy of greedy ``generate`` answers (words up to EOS) on ``samples``.

    ``handle``: the active patch, if any; its per-sample keep ratios are averaged into
    ``keep_ratio`` (ALVTS: the fraction of visual tokens each layer processed, averaged over
    layers). ``on_batch(batch_samples, inputs, handle)`` runs after each batch (for pictures).
    """
    tok = proc.tokenizer
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if max_new_tokens is None:
        max_new_tokens = max(len(tok.encode(s.answer)) for s in samples) + 1
    correct, keep, per_task, hits = 0, [], {}, []
    answers = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        inputs = _to(proc.batch(chunk, with_answer=False), device, dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        gen = out[:, inputs["input_ids"].shape[1]:].tolist()
        if handle is not None:
            for s in handle.stats:
                if "processed_ratio" in s:
                    keep.append(sum(s["processed_ratio"]) / len(s["processed_ratio"]))
                else:
                    keep.append(s["keep_ratio"])
            grids = [proc.token_grid(smp.image) for smp in chunk]
            for b, smp in enumerate(chunk):
                w = _token_weights(handle, inputs, b)
                cells = _box_cells(smp.box, *grids[b])
                hits.append(bool((w[cells] >= 0.5).any()))
            if on_batch is not None:
                on_batch(chunk, inputs, handle)
        for s, g in zip(chunk, gen):
            pred = tok.decode(g)
            ok = pred == tok.normalize(s.answer)
            correct += ok
            t = per_task.setdefault(s.task, [0, 0])
            t[0] += ok
            t[1] += 1
            answers.append(pred)
    return dict(accuracy=correct / len(samples), n=len(samples), keep_ratio=(sum(keep) / len(keep)) if keep else 1.0,
                box_hit=(sum(hits) / len(hits)) if hits else 1.0,
                per_task={k: v[0] / v[1] for k, v in sorted(per_task.items())}, answers=answers)


def _train_batch(p: Preset, spec: TrainSpec, seed: int, step: int) -> list[Sample]:
    """Training samples of ``step``: indices ``step * batch_size + i`` of the train split.

    Curriculum (``easy_steps`` > 0): a share of the images (``easy_start`` falling linearly to
    ``easy_end``) has fewer objects than the task's minimum; with ``easy_image_sizes`` every image's
    side range also grows linearly from it to the task's own (progressive resizing). Which samples
    are easy is a seeded draw, so a step's batch is a pure function of ``(preset, seed, step)``.
    """
    import random

    task = p.task
    easy_cfg = None
    if spec.easy_steps:
        frac = min(1.0, step / spec.easy_steps)
        if spec.easy_image_sizes:
            (e_lo, e_hi), (t_lo, t_hi) = spec.easy_image_sizes, task.image_sizes
            lo = int(e_lo + (t_lo - e_lo) * frac) // task.unit * task.unit
            hi = max(lo, int(e_hi + (t_hi - e_hi) * frac) // task.unit * task.unit)
            task = dataclasses.replace(task, image_sizes=(max(task.unit, lo), max(task.unit, hi)))
        p_easy = spec.easy_start + (spec.easy_end - spec.easy_start) * frac
        hi_obj = task.objects[0] - 1
        tasks = tuple(t for t in task.tasks if hi_obj >= 2 or t[0] != "count")
        if hi_obj >= 1 and tasks:
            easy_cfg = dataclasses.replace(task, objects=(1, hi_obj), tasks=tasks,
                                           max_count=max(2, min(task.max_count, hi_obj)))
        rng = random.Random(seed * 1_000_003 + step)
    out = []
    for i in range(spec.batch_size):
        cfg = easy_cfg if easy_cfg is not None and rng.random() < p_easy else task
        out.append(make_sample(cfg, seed, step * spec.batch_size + i, "train"))
    return out


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step``: the encoded, left-padded training batch of that step (a pure function of it)."""

    def __init__(self, preset: Preset, spec: TrainSpec, seed: int, proc: "SmallVLMProcessor"):
        self.preset, self.spec, self.seed, self.proc = preset, spec, seed, proc

    def __len__(self) -> int:
        return self.spec.steps

    def __getitem__(self, step: int) -> dict:
        return self.proc.batch(_train_batch(self.preset, self.spec, self.seed, step), with_answer=True)


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    p = min(1.0, (step - spec.warmup) / max(1, spec.steps - spec.warmup))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def train_small_lvlm(out_dir, preset: str | Preset = "cpu", *, seed: int = 0, steps: int | None = None,
                     device: str | None = None, threads: int | None = None, num_workers: int | None = None,
                     max_minutes: float | None = None, progress: bool = True, log=print,
                     command: str | None = None) -> dict:
    """Train the small Qwen2.5-VL of ``preset`` from scratch; save it to ``out_dir``.

    Data: sample ``step * batch_size + i`` of the ``train`` split (generated on the fly, never
    repeated); the running accuracy is measured on the ``val`` split. Returns the run summary
    (also written to ``out_dir/small_lvlm.json``).

    ``max_minutes``: a wall-clock budget for the whole loop (evaluations included). After 25
    steps, and again at every evaluation, the measured rate decides how many steps fit; when
    fewer than planned, the run is shortened *and* its learning-rate schedule with it (the cosine
    still ends at zero), and the summary records the steps actually run (``--steps`` with that
    number reproduces the run without the budget).
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if steps is not None:
        p = dataclasses.replace(p, train=dataclasses.replace(p.train, steps=int(steps)))
    spec = p.train
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = WordTokenizer.for_config(p.task)
    torch.manual_seed(seed)
    model = build_small_lvlm(tokenizer, p.model, seed=seed).to(dev)
    proc = SmallVLMProcessor(tokenizer, model.config)
    n_params = sum(x.numel() for x in model.parameters())
    decay = [x for n, x in model.named_parameters() if x.ndim >= 2 and "embed" not in n]
    no_decay = [x for n, x in model.named_parameters() if not (x.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))
    use_bf16 = spec.bf16 and dev.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    val = [make_sample(p.task, seed, i, "val") for i in range(spec.eval_samples)]
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "train_log.jsonl")
    log(f"train-small-lvlm: preset={p.name} seed={seed} steps={spec.steps} batch={spec.batch_size} "
        f"params={n_params / 1e6:.2f}M device={dev}" + (" bf16" if use_bf16 else ""))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.steps, desc="train-small-lvlm", dynamic_ncols=True)
    history, evals = [], []
    t0 = time.perf_counter()
    data_s = 0.0
    ema = None
    workers = spec.num_workers if num_workers is None else int(num_workers)
    loader = torch.utils.data.DataLoader(_StepBatches(p, spec, seed, proc), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=4 if workers else None,
                                         pin_memory=dev.type == "cuda")
    batches = iter(loader)
    planned = spec.steps
    budget_s = None if max_minutes is None else float(max_minutes) * 60.0
    if budget_s is not None and budget_s <= 0:
        raise ValueError(f"max_minutes must be > 0, got {max_minutes}")
    with open(log_path, "w") as logf:
        step = 0
        while step < spec.steps:
            model.train()
            td = time.perf_counter()
            batch = _to(next(batches), dev)
            data_s += time.perf_counter() - td
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, spec)
            loss, correct = _answer_loss(model, batch, autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            lv = float(loss.detach())
            acc = float(correct.float().mean())
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
            rec = dict(step=step + 1, loss=lv, train_acc=acc, lr=opt.param_groups[0]["lr"], grad_norm=float(gn),
                       elapsed_s=round(time.perf_counter() - t0, 2))
            if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
                model.eval()
                res = _quick_accuracy(model, proc, val, dev, autocast)
                rec["val_acc"] = res
                evals.append((step + 1, res))
                log(f"step {step + 1}: loss {ema:.4f} val_acc {res:.3f} ({time.perf_counter() - t0:.0f}s)")
            history.append(rec)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", acc=f"{acc:.2f}")
            step += 1
            if budget_s is not None and (step == 25 or "val_acc" in rec) and step < spec.steps:
                fit = int(budget_s / ((time.perf_counter() - t0) / step))
                if fit < spec.steps:
                    # The shortened schedule must still warm up and reach one evaluation at its end.
                    new = max(step + 1, fit, spec.warmup + 1)
                    if new < spec.steps:
                        log(f"time budget {max_minutes:.3g} min: {new} of {planned} planned steps fit; "
                            "shortening the run and its schedule")
                        spec = dataclasses.replace(spec, steps=new)
                        if bar is not None:
                            bar.total = new
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save(out_dir)
    summary = dict(preset=p.to_dict(), seed=seed, steps=spec.steps, planned_steps=planned, max_minutes=max_minutes,
                   params=n_params, device=str(dev),
                   torch=torch.__version__, train_seconds=round(elapsed, 1), data_seconds=round(data_s, 1),
                   final_loss=history[-1]["loss"], loss_first=history[0]["loss"],
                   val_acc=evals[-1][1] if evals else None,
                   val_curve=evals, command=command)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"saved {out_dir} ({elapsed:.0f}s, val accuracy {summary['val_acc']:.3f})")
    return summary


@torch.no_grad()
def _quick_accuracy(model, proc, samples, dev, autocast, batch_size: int = 64) -> float:
    """Teacher-forced exact match (every answer token, EOS included, is the argmax)."""
    hits = 0
    for i in range(0, len(samples), batch_size):
        batch = _to(proc.batch(samples[i:i + batch_size], with_answer=True), dev)
        _, correct = _answer_loss(model, batch, autocast)
        hits += int(correct.sum())
    return hits / len(samples)
