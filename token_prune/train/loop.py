"""``train_vip``: the training loop (objectives, optimiser and schedule, checkpoints and resume)."""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import hf
from ..data import HFChatProcessor, TinyProcessor, as_dataset, box_targets, collate
from ..vip import GlimpseConfig, GlimpseModules
from .student import SoftGlimpseStudent, _global_shift, _split


OBJECTIVES = {
    "kl": dict(kl=1.0, sparsity=1.0, ce=0.0, dice=0.0, bce=0.0),
    "mask": dict(kl=0.0, sparsity=0.0, ce=1.0, dice=1.0, bce=0.1),
    "kl+mask": dict(kl=1.0, sparsity=1.0, ce=0.0, dice=1.0, bce=0.1),
}

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def default_processor(model, processor=None):
    """The processor train/eval use: ``processor`` itself (wrapped in :class:`HFChatProcessor` if it
    is an HF processor or a path), else a :class:`TinyProcessor` for a tiny model, else an HF
    processor loaded from the model's local directory."""
    if processor is not None:
        if isinstance(processor, (TinyProcessor, HFChatProcessor)) or getattr(processor, "is_vip_processor", False):
            return processor
        return HFChatProcessor(processor, model=model)
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if path and os.path.isdir(path):
        return HFChatProcessor(path, model=model)
    if getattr(model.config, "text_config", None) is not None and model.config.text_config.vocab_size <= 1024:
        return TinyProcessor(model)
    raise ValueError("no processor given and the model has no local directory to load one from; pass "
                     "processor=AutoProcessor.from_pretrained(model_dir) (or a TinyProcessor for tiny models)")


def _answer_rows(logits: torch.Tensor, answer_lens: torch.Tensor) -> torch.Tensor:
    """Logits computed with ``logits_to_keep = max(A) + 1`` on left-padded prompt + answer rows ->
    [T, V]: the predictions of every answer token, row by row, in order."""
    amax = int(answer_lens.max())
    cols = torch.arange(amax, device=logits.device)
    sel = cols[None, :] >= (amax - answer_lens.to(logits.device))[:, None]
    return logits[:, :amax][sel]


def _dice(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + target.sum() + eps)


def _resolve_weights(objective, overrides) -> dict:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    w = dict(OBJECTIVES[objective])
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{k}_weight must be a non-negative number, got {v!r}")
        w[k] = float(v)
    if not any(w.values()):
        raise ValueError("every loss weight is 0: nothing to train")
    return w


def _check_positive_int(name, v, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _latest_checkpoint(out_dir: str) -> str | None:
    best, best_step = None, -1
    for path in glob.glob(os.path.join(out_dir, "checkpoint-*")):
        m = _CKPT.match(os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, STATE_FILE)) and int(m.group(1)) > best_step:
            best, best_step = path, int(m.group(1))
    return best


def _load_modules(vip) -> GlimpseModules:
    if isinstance(vip, GlimpseModules):
        return copy.deepcopy(vip)
    if isinstance(vip, (str, os.PathLike)):
        path = os.fspath(vip)
        if os.path.isfile(os.path.join(path, "new_modules_gp.pt")):
            return GlimpseModules.from_public_checkpoint(path)
        return GlimpseModules.load(path)
    raise TypeError(f"vip must be a path or a GlimpseModules, got {type(vip).__name__}")


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``m`` of an endless stream: epoch ``m // per_epoch`` is a seeded permutation of
    the rows, cut into ``batch_size`` chunks (the last one may be short). A pure function of
    ``(seed, m)``, so resuming needs only ``m``."""

    def __init__(self, dataset, processor, batch_size: int, seed: int):
        self.dataset, self.processor, self.batch_size, self.seed = dataset, processor, batch_size, seed
        self.per_epoch = math.ceil(len(dataset) / batch_size)
        self._perm: dict[int, list[int]] = {}

    def indices(self, m: int) -> list[int]:
        epoch, chunk = divmod(m, self.per_epoch)
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(len(self.dataset), generator=gen).tolist()}
        perm = self._perm[epoch]
        return perm[chunk * self.batch_size:(chunk + 1) * self.batch_size]

    def __len__(self):  # only used by samplers that ask
        return 2 ** 62

    def __getitem__(self, m: int) -> dict:
        enc = [self.processor.encode(self.dataset[i]) for i in self.indices(m)]
        return collate(enc, self.processor.pad_token_id)


def _to_device(inputs: dict, device, dtype) -> dict:
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


@dataclass
class TrainResult:
    """What :func:`train_vip` returns.

    Attributes:
        modules: the trained :class:`GlimpseModules` (float32, on the model's device).
        step: optimizer steps done in total (including those before a resume).
        history: one dict per optimizer step (loss and its parts, keep ratios, lr).
        out_dir: where the final modules were saved (loadable by ``patch(vip=out_dir)``), or None.
        resumed_from: the checkpoint resumed from, or None.
    """

    modules: GlimpseModules
    step: int
    history: list = field(default_factory=list)
    out_dir: str | None = None
    resumed_from: str | None = None
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------------------------
# train_vip
# --------------------------------------------------------------------------------------------


def train_vip(
    model,
    dataset,
    *,
    layer: int | None = None,
    out_dir: str | os.PathLike | None = None,
    processor=None,
    objective: str = "kl",
    kl_weight: float | None = None,
    sparsity_weight: float | None = None,
    ce_weight: float | None = None,
    dice_weight: float | None = None,
    bce_weight: float | None = None,
    target_keep: float = 0.1,
    bias_floor: float = -30.0,
    normalise_keep: bool = True,
    temperature: float = 0.25,
    calibration_momentum: float | None = None,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 4,
    grad_accum: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.1,
    min_lr_ratio: float = 0.0,
    max_grad_norm: float | None = 1.0,
    gradient_checkpointing: bool = False,
    bf16: bool | None = None,
    save_every: int | None = None,
    keep_checkpoints: int | None = None,
    resume: bool = False,
    init_vip=None,
    vision_layers: list[int] | None = None,
    vip_options: dict | None = None,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    log_every: int = 1,
    callback=None,
) -> TrainResult:
    """Train the glimpse embeddings + VIP of a frozen LVLM (GlimpsePrune stage 1) at layer K.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration``, ``LlavaForConditionalGeneration`` or
            ``LlavaNextForConditionalGeneration``; sdpa or eager attention (the student passes
            custom float masks). Its weights are never changed.
        dataset: a JSONL path, a :class:`~token_prune.data.VipDataset`, or a list of row dicts.
        layer: K, the decoder layer the VIP reads and prunes after (default: the public setting
            for this model size, else ~64% of the depth).
        out_dir: where checkpoints (``checkpoint-<step>/``) and the final modules go. None: save
            nothing.
        processor: turns rows into inputs (see :func:`default_processor`).
        objective, *_weight: see the module docstring.
        target_keep: the share of each image's visual tokens to keep (the student's soft budget and
            the threshold calibration target; with ``normalise_keep=False``, the sparsity target).
        bias_floor: clamp of the ``log p`` attention bias.
        normalise_keep, temperature, calibration_momentum: how logits become keep probabilities
            and how the keep threshold is calibrated (module docstring, "Keep probabilities").
            ``calibration_momentum`` defaults to 0.2, or 0 when box losses are on.
            ``sparsity_weight`` only applies with ``normalise_keep=False``.
        steps: optimizer steps (default: ``epochs`` passes over the data).
        batch_size, grad_accum: rows per micro-batch and micro-batches per optimizer step.
        lr, weight_decay, warmup_ratio, min_lr_ratio: AdamW and the warmup + cosine schedule.
        max_grad_norm: gradient clipping (None: off).
        gradient_checkpointing: recompute every decoder-layer call in backward.
        bf16: bf16 autocast (default: on when the model is on CUDA; ignored on CPU).
        save_every: write a checkpoint every this many steps (and always at the end).
        keep_checkpoints: keep only the newest this many ``checkpoint-*`` directories.
        resume: continue from the newest checkpoint in ``out_dir`` (start fresh if none).
        init_vip: start from these modules (path or :class:`GlimpseModules`) instead of random.
        vision_layers: ViT blocks for the VIP's conditions (default: the adapter's).
        vip_options: other :class:`GlimpseConfig` fields of a new VIP (``hidden_size``, ``cond_size``,
            ``num_heads``, ``mlp_ratio``; default: the public sizes).
        seed: seeds the module init and the data order.
        num_workers: DataLoader workers that load and encode rows.
        progress: show a tqdm progress bar.
        callback: called as ``callback(record)`` after every optimizer step.

    Returns:
        A :class:`TrainResult`.
    """
    from .. import api
    from ..models import adapter_for
    from ..runtime import Runtime

    if api.get_handle(model) is not None:
        raise ValueError("the model is patched; call token_prune.unpatch(model) before training")
    adapter = adapter_for(model)
    impl = hf.attn_implementation(adapter.lm_config)
    if "flash" in impl:
        raise ValueError(f"training needs sdpa or eager attention (custom float masks); the model uses {impl!r}")
    weights = _resolve_weights(objective, dict(kl=kl_weight, sparsity=sparsity_weight, ce=ce_weight,
                                               dice=dice_weight, bce=bce_weight))
    for name, v in (("batch_size", batch_size), ("grad_accum", grad_accum), ("epochs", epochs)):
        _check_positive_int(name, v)
    _check_positive_int("steps", steps, allow_none=True)
    _check_positive_int("save_every", save_every, allow_none=True)
    _check_positive_int("keep_checkpoints", keep_checkpoints, allow_none=True)
    _check_positive_int("log_every", log_every)
    if not (isinstance(target_keep, (int, float)) and 0 < target_keep <= 1):
        raise ValueError(f"target_keep must be in (0, 1], got {target_keep!r}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoints are)")
    n_layers = adapter.num_layers
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers):
        raise ValueError(f"layer must be an int in [0, {n_layers - 1}] for this {n_layers}-layer model, got {layer!r}")

    data = as_dataset(dataset)
    if (weights["dice"] or weights["bce"]) and not any(r.boxes for r in data):
        raise ValueError(f"the objective uses box masks (dice={weights['dice']}, bce={weights['bce']}) but no row "
                         f"of {data.source} has 'boxes'")
    proc = default_processor(model, processor)
    device = next(model.parameters()).device
    use_bf16 = (device.type == "cuda") if bf16 is None else bool(bf16) and device.type == "cuda"

    # -- modules -----------------------------------------------------------------------------
    if init_vip is not None:
        modules = _load_modules(init_vip)
        if layer is not None and layer != modules.config.layer:
            modules.config = dataclasses.replace(modules.config, layer=layer)
    else:
        config = GlimpseConfig(
            llm_hidden_size=adapter.hidden_size, llm_num_layers=n_layers, llm_num_heads=adapter.num_heads,
            llm_rms_norm_eps=float(getattr(adapter.lm_config, "rms_norm_eps", 1e-6)),
            vision_width=adapter.vision_width(),
            vision_layers=list(vision_layers) if vision_layers is not None else adapter.default_vision_layers(),
            layer=layer if layer is not None else adapter.default_glimpse_layer(),
            glimpse_score=adapter.glimpse_score, model_type=adapter.model_type, **(vip_options or {}),
        )
        modules = GlimpseModules.random(config, seed=seed)
    modules.check_compatible(llm_hidden_size=adapter.hidden_size, llm_num_layers=n_layers,
                             llm_num_heads=adapter.num_heads, vision_width=adapter.vision_width(),
                             num_vision_blocks=adapter.vision_depth())
    modules = modules.to(device=device, dtype=torch.float32).train()
    K = modules.config.layer

    micro = _MicroBatches(data, proc, batch_size, seed)
    steps_per_epoch = math.ceil(micro.per_epoch / grad_accum)
    total = steps if steps is not None else epochs * steps_per_epoch
    warmup = int(math.ceil(warmup_ratio * total))
    params = [p for p in modules.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup, min_lr_ratio))
    if calibration_momentum is None:  # box losses calibrate the logits themselves
        calibration_momentum = 0.0 if (weights["dice"] or weights["bce"]) else 0.2
    run_args = dict(layer=K, batch_size=batch_size, grad_accum=grad_accum, total_steps=total, lr=lr,
                    objective=objective, weights=weights, target_keep=target_keep, seed=seed,
                    normalise_keep=normalise_keep, temperature=temperature,
                    calibration_momentum=calibration_momentum,
                    rows=len(data), vision_layers=list(modules.config.vision_layers))

    start_step, history, resumed_from = 0, [], None
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
    if resume:
        ckpt = _latest_checkpoint(out_dir)
        if ckpt is not None:
            state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=True)
            diff = {k: (state["args"].get(k), v) for k, v in run_args.items() if state["args"].get(k) != v}
            if diff:
                raise ValueError(f"cannot resume from {ckpt}: these settings differ (checkpoint, now): {diff}")
            saved = GlimpseModules.load(ckpt)
            modules.load_state_dict(saved.state_dict())
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_step, history = int(state["step"]), list(state["history"])
            _set_rng_state(state["rng"])
            resumed_from = ckpt
            with open(os.path.join(out_dir, LOG_FILE), "w") as f:  # drop records past the checkpoint
                f.writelines(json.dumps(h) + "\n" for h in history)

    # -- freeze the model, install the student -------------------------------------------------
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    student = SoftGlimpseStudent(modules, K, bias_floor=bias_floor, checkpoint=gradient_checkpointing,
                                 normalise_to=target_keep if normalise_keep else None, temperature=temperature)
    runtime = Runtime(adapter, student)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else _null())
    model_dtype = next(model.parameters()).dtype
    loader = torch.utils.data.DataLoader(
        micro, batch_size=None, sampler=range(start_step * grad_accum, total * grad_accum),
        num_workers=num_workers, collate_fn=None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc=f"train-vip K={K}", dynamic_ncols=True)
    if out_dir is not None:
        with open(os.path.join(out_dir, "train_args.json"), "w") as f:
            json.dump(run_args, f, indent=2)
        if resumed_from is None:
            open(os.path.join(out_dir, LOG_FILE), "w").close()
    step = start_step
    try:
        it = iter(loader)
        t0 = time.perf_counter()
        while step < total:
            parts = {k: 0.0 for k in ("loss", "kl", "sparsity", "ce", "dice", "bce", "keep_soft", "keep_hard")}
            shift = 0.0
            for _ in range(grad_accum):
                mb = next(it)
                with autocast:
                    loss, info = _micro_step(model, runtime, student, mb, weights, target_keep, device,
                                             model_dtype, adapter.has_newline_tokens)
                (loss / grad_accum).backward()
                shift += info.pop("_shift", 0.0) / grad_accum
                for k, v in info.items():
                    parts[k] += v / grad_accum
            if max_grad_norm is not None:
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            parts["lr"] = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if normalise_keep and calibration_momentum:
                with torch.no_grad():  # move the keep threshold toward target_keep (running calibration)
                    modules.vip.attn_out_projs[-1].bias.add_(calibration_momentum * shift)
            step += 1
            parts["step"] = step
            history.append(parts)
            if bar is not None:
                bar.update(1)
                if step % log_every == 0 or step == total:
                    bar.set_postfix(loss=f"{parts['loss']:.4f}", keep=f"{parts['keep_soft']:.3f}",
                                    hard=f"{parts['keep_hard']:.3f}")
            if out_dir is not None:
                with open(os.path.join(out_dir, LOG_FILE), "a") as f:
                    f.write(json.dumps(parts) + "\n")
            if callback is not None:
                callback(parts)
            if out_dir is not None and ((save_every and step % save_every == 0) or step == total):
                _save_checkpoint(out_dir, step, modules, opt, sched, history, run_args, keep_checkpoints)
        if out_dir is not None:
            modules.save(out_dir)
        elapsed = time.perf_counter() - t0
    finally:
        runtime.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        if bar is not None:
            bar.close()
    modules.eval()
    return TrainResult(modules=modules, step=step, history=history, out_dir=out_dir, resumed_from=resumed_from,
                       elapsed_s=elapsed)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _micro_step(model, runtime, student, mb, weights, target_keep, device, model_dtype, newline_column):
    inputs = _to_device(mb["inputs"], device, model_dtype)
    answer_lens = mb["answer_lens"].to(device)
    keep = int(answer_lens.max()) + 1
    info = {}
    loss = torch.zeros((), device=device)
    t_logp = None
    if weights["kl"]:
        with torch.no_grad():
            t_logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
            t_logp = _answer_rows(t_logits, answer_lens).float().log_softmax(-1)
            del t_logits
    student.answer_mask = mb["answer_mask"].to(device)
    runtime.install()
    try:
        s_logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    finally:
        runtime.remove()
        student.answer_mask = None
    s_rows = _answer_rows(s_logits, answer_lens).float()
    s_logp = s_rows.log_softmax(-1)
    if weights["kl"]:
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        loss = loss + weights["kl"] * kl
        info["kl"] = kl.item()
    if weights["ce"]:
        targets = inputs["input_ids"][mb["answer_mask"].to(device)]
        ce = F.nll_loss(s_logp, targets)
        loss = loss + weights["ce"] * ce
        info["ce"] = ce.item()
    last = student.last
    logits, sizes = last["logits"].float(), last["sizes"]
    probs = torch.sigmoid(logits)
    per_image = _split(probs, sizes)
    means = torch.stack([p.mean() for p in per_image])
    if student.normalise_to is not None:
        # The student sees only each image's standardised logits (and solves the shift to the target
        # exactly), so the keep threshold is calibrated apart from the gradient: train_vip moves the
        # output bias by a running average of the shift that makes the threshold rule keep
        # target_keep of the tokens (sigmoid of the logits over a temperature of 5% of their spread).
        tau_cal = 0.05 * float(logits.detach().std()) + 1e-6 if logits.numel() > 1 else 1.0
        info["_shift"] = _global_shift(logits.detach() / tau_cal, sizes, target_keep) * tau_cal
    elif weights["sparsity"]:
        sp = ((means - target_keep) ** 2).mean()
        loss = loss + weights["sparsity"] * sp
        info["sparsity"] = sp.item()
    if weights["dice"] or weights["bce"]:
        if len(sizes) != len(mb["boxes"]):
            raise ValueError(f"box targets need one image per row; the batch has {len(mb['boxes'])} rows and "
                             f"{len(sizes)} images")
        targets = box_targets(last["layout"], mb["boxes"], newline_column)
        per_logits = _split(logits, sizes)
        dl, bl, n = 0.0, 0.0, 0
        for lg, pr, tg in zip(per_logits, per_image, targets):
            if tg is None:
                continue
            tg = tg.to(lg.device)
            dl = dl + _dice(pr, tg)
            bl = bl + F.binary_cross_entropy_with_logits(lg, tg)
            n += 1
        if n:
            dl, bl = dl / n, bl / n
            loss = loss + weights["dice"] * dl + weights["bce"] * bl
            info["dice"], info["bce"] = dl.item(), bl.item()
    info["loss"] = loss.item()
    info["keep_soft"] = means.mean().item()
    info["keep_hard"] = float(torch.stack([(lg > 0).float().mean() for lg in _split(logits, sizes)]).mean())
    student.last = None
    return loss, info


def _save_checkpoint(out_dir, step, modules, opt, sched, history, run_args, keep_checkpoints):
    path = os.path.join(out_dir, f"checkpoint-{step:06d}")
    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    modules.save(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _rng_state(), "history": history, "args": run_args}, os.path.join(tmp, STATE_FILE))
    if os.path.isdir(path):
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    if keep_checkpoints:
        import shutil

        found = sorted((int(_CKPT.match(os.path.basename(p)).group(1)), p)
                       for p in glob.glob(os.path.join(out_dir, "checkpoint-*")) if _CKPT.match(os.path.basename(p)))
        for _, old in found[:-keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
