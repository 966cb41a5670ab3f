"""GlimpsePrune stage 1: train the glimpse embeddings and the VIP of a frozen LVLM, at any layer K.

Only :class:`~token_prune.vip.GlimpseModules` train (glimpse vectors, their projection and norm,
the VIP); every base-model weight is frozen and stays bit-identical.

Objectives (weights combine freely)
-----------------------------------
* ``kl`` (needs no annotations): KL(full model || soft-pruned model) on the answer tokens,
  teacher-forced (prompt + answer in one sequence, loss on the answer positions only). The
  teacher is the unpatched model.
* ``sparsity``: pulls the keep fraction toward ``target_keep`` (see "Keep probabilities").
* ``ce``: answer cross-entropy of the soft-pruned model.
* ``dice`` / ``bce``: Dice and binary cross-entropy of the VIP logits against box masks
  rasterised onto each image's token grid (rows without boxes do not count). The public recipe
  is ``ce`` + 1.0 Dice + 0.1 BCE.

``objective="kl"`` (default) is ``kl=1, sparsity=1``; ``"mask"`` is ``ce=1, dice=1, bce=0.1``;
``"kl+mask"`` is ``kl=1, sparsity=1, dice=1, bce=0.1``. Explicit ``*_weight`` arguments override.

The soft-pruned student
-----------------------
Hard pruning at inference does three things: layers ``0..K`` run on the whole prompt plus the
glimpse token; the VIP keeps a subset of the visual tokens; from then on *every* later
computation sees only the kept ones: the prompt in layers ``K+1..``, and the answer tokens
(decoded later) in *all* layers, because the caches of layers ``0..K`` are compacted too. The
student relaxes the keep decision to a probability ``p_i`` and reproduces that structure with an
additive attention bias ``log p_i`` (clamped at ``bias_floor``) on each visual key i:

1. Pass 1 (layers ``0..K-1``, then layer K's q/k): the prompt plus the glimpse token appended at
   the end of the row (rotary position ``last prompt position + 1``, the per-layer glimpse
   vector added before each layer, answer tokens hidden from it), exactly as the inference
   prefill does. The glimpse attention map at K and the ViT features give the VIP logits.
2. Pass 2 (all layers, no glimpse token, a custom float 4D mask per layer): in layers ``0..K``
   prompt queries see every token (bias 0) and *answer* queries get the ``log p`` bias on visual
   keys; in layers ``K+1..`` every query gets it. Text keys always get bias 0.

With ``p`` in {0, 1} this is exactly the hard-pruned model (checked in the tests against the
real pruned path), so the loss is measured on the structure that runs at inference. Pass 2
recomputes the prompt rows of layers ``0..K`` (they do not depend on ``p``): one extra ``K/L``
partial forward, with no backward through the prompt rows.

Keep probabilities
------------------
``normalise_keep=True`` (default): per image, the VIP logits are standardised (zero mean, unit
spread), divided by ``temperature`` (0.25) and shifted by the c that makes their mean sigmoid
exactly ``target_keep`` (solved by bisection, with the implicit-function gradient of c):
``p_i = sigmoid(z_i / temperature + c)``. The distillation loss then only shapes the *ranking*
within each image, at exactly the budget the threshold rule will keep, with near-binary keep
probabilities; a plain ``sigmoid(logit)`` with a squared sparsity penalty lets uniform soft
down-weighting of every visual token (much gentler than dropping most of them) pass for a good
mask and trains the ranking poorly. The keep *threshold* is calibrated apart from the gradient:
after every optimizer step the VIP's output bias moves by ``calibration_momentum`` (0.2) times
the shift that makes ``sigmoid(logit) > 0.5`` keep ``target_keep`` of the batch's visual tokens,
so the threshold rule at inference keeps about ``target_keep`` (the role of the sparsity term).
Box losses calibrate the logits themselves, so this is off when they are on.
``normalise_keep=False`` is the literal relaxation: ``p = sigmoid(logit / temperature)`` plus
``sparsity_weight * mean_images (mean p - target_keep)^2``.

Training loop: AdamW, linear warmup + cosine decay, gradient accumulation, bf16 autocast on
CUDA, optional activation checkpointing of every decoder-layer call, periodic checkpoints
(``GlimpseModules.save`` format plus ``trainer_state.pt`` with optimizer / scheduler / step /
RNG state) and exact resume.

Evaluation (:func:`evaluate_vip`) runs the real patched inference path (``token_prune.patch``)
sample by sample and reports the mean keep ratio, the KL of the pruned model's answer
distribution to the full model's, and greedy-answer agreement.
"""

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

from . import hf
from .models import DEFAULT_MODEL, supported_models
from .data import (Encoded, HFChatProcessor, TinyProcessor, as_dataset, box_targets, collate, prompt_inputs)
from .runtime import PrefillResult
from .vip import GlimpseConfig, GlimpseModules

__all__ = ["train_vip", "evaluate_vip", "TrainResult", "OBJECTIVES", "SoftGlimpseStudent", "default_processor",
           "load_model", "add_subcommands"]

OBJECTIVES = {
    "kl": dict(kl=1.0, sparsity=1.0, ce=0.0, dice=0.0, bce=0.0),
    "mask": dict(kl=0.0, sparsity=0.0, ce=1.0, dice=1.0, bce=0.1),
    "kl+mask": dict(kl=1.0, sparsity=1.0, ce=0.0, dice=1.0, bce=0.1),
}

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------------------------
# The soft-pruned student (a Runtime method)
# --------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class SoftGlimpseStudent:
    """The model pruned by the VIP's soft keep mask (see the module docstring).

    Installed with a :class:`~token_prune.runtime.Runtime`; before each forward the trainer
    sets ``answer_mask`` ([B, S] bool, the teacher-forced answer tokens). After it, ``last``
    holds the VIP ``logits`` [N] (images concatenated), ``sizes`` (tokens per image) and the
    vision ``layout``.
    """

    name = "glimpse-train"

    def __init__(self, modules: GlimpseModules, layer: int, bias_floor: float = -30.0, checkpoint: bool = False,
                 normalise_to: float | None = None, temperature: float = 1.0):
        self.temperature = float(temperature)
        self.modules = modules
        self.layer = layer
        self.bias_floor = float(bias_floor)
        self.checkpoint = checkpoint
        self.normalise_to = normalise_to
        self.answer_mask: torch.Tensor | None = None
        self.last: dict | None = None

    def vision_layers(self) -> list[int]:
        return list(self.modules.config.vision_layers)

    def options(self) -> dict:
        return dict(layer=self.layer, bias_floor=self.bias_floor, checkpoint=self.checkpoint)

    def _call(self, layer, hidden, mask, cos, sin, text_pos, kwargs):
        def run(h, m, c, s):
            return hf.call_layer(layer, h, mask=m, rope=(c, s), text_pos=text_pos, cache=None, use_cache=False,
                                 **kwargs)

        if self.checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(run, hidden, mask, cos, sin, use_reentrant=False)
        return run(hidden, mask, cos, sin)

    def prefill(self, rt, lm, batch, cache, use_cache, kwargs):
        if cache is not None:
            raise ValueError("token_prune training forward: call the model with use_cache=False")
        adapter, ctx = rt.adapter, rt.ctx
        K, mods = self.layer, self.modules
        B, S, H = batch.hidden.shape
        dev = batch.hidden.device
        if self.answer_mask is None or tuple(self.answer_mask.shape) != (B, S):
            raise ValueError(f"SoftGlimpseStudent: answer_mask must be set to a [{B}, {S}] bool tensor before the call")
        answer = self.answer_mask.to(dev)
        valid = batch.valid
        prompt = valid & ~answer
        visual = batch.visual
        cdtype = _compute_dtype(batch.hidden)
        neg = torch.tensor(torch.finfo(cdtype).min, dtype=cdtype, device=dev)
        zero = torch.zeros((), dtype=cdtype, device=dev)
        layers = lm.layers
        gvec = mods.glimpse.all_layers(K).to(batch.hidden.dtype)  # [K+1, H]

        # -- pass 1: prompt + glimpse through layers 0..K-1, then layer K's q/k ----------------
        cols = torch.arange(S, device=dev)
        last = torch.where(prompt, cols, -1).amax(1)  # last prompt token of each row
        P = batch.pos.shape[0]
        gpos = batch.pos.gather(2, last.view(1, B, 1).expand(P, B, 1)).amax(0, keepdim=True) + 1
        pos1 = torch.cat([batch.pos, gpos.expand(P, B, 1)], 2)
        text_pos1 = None
        if batch.text_pos is not None:
            text_pos1 = torch.cat([batch.text_pos, batch.text_pos.gather(1, last[:, None]) + 1], 1)
        keys1 = torch.cat([prompt, prompt.new_ones(B, 1)], 1)  # answers and padding hidden
        c1 = torch.arange(S + 1, device=dev)
        allowed1 = (c1[None, :] <= c1[:, None])[None] & keys1[:, None, :]
        allowed1 = allowed1 | torch.eye(S + 1, dtype=torch.bool, device=dev)[None]
        mask1 = torch.where(allowed1, zero, neg)[:, None]
        hidden = torch.cat([batch.hidden, gvec[0].view(1, 1, H).expand(B, 1, H)], 1)
        cos1, sin1 = adapter.rotary(hidden, pos1)
        for i in range(K + 1):
            if i > 0:
                hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + gvec[i]], 1)
            if i == K:
                break
            hidden = self._call(layers[i], hidden, mask1, cos1, sin1, text_pos1, kwargs)
        q, k = adapter.project_qk(K, hidden, cos1, sin1)
        q = q[:, :, -1:]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, heads, 1, S+1]
        if mods.config.glimpse_score == "log_softmax":
            scores = scores.masked_fill(~allowed1[:, None, S:S + 1, :], float("-inf")).log_softmax(-1)
        attn_map = scores[:, :, 0, :S].transpose(1, 2)[visual]  # [N, heads]

        layout = ctx.image_grids
        if isinstance(layout, torch.Tensor):
            sizes, where = (layout[:, 0] * layout[:, 1]).tolist(), dict(grid_hw=layout.to(dev))
        else:
            sizes = [int(n) for n in layout[1]]
            where = dict(positions=layout[0].to(dev), lengths=sizes)
        n_vis = int(visual.sum())
        if sum(sizes) != n_vis:
            raise RuntimeError(f"token_prune: {n_vis} image tokens in the prompt but the image grids give {sum(sizes)}")
        wdtype = next(mods.parameters()).dtype
        conds = [c.to(wdtype) for c in ctx.vision_features]
        logits = mods.vip(attn_map.to(wdtype), conds, **where)  # [N]
        self.last = dict(logits=logits, sizes=sizes, layout=layout)

        # -- pass 2: the whole sequence through every layer with the soft keep bias ----------
        z = logits.float()
        if self.normalise_to is not None:
            z, _ = _normalise_logits(_standardise(z, sizes) / self.temperature, sizes, self.normalise_to)
        else:
            z = z / self.temperature
        logp = F.logsigmoid(z).clamp_min(self.bias_floor)
        key_bias = torch.zeros(B, S, dtype=logp.dtype, device=dev).masked_scatter(visual, logp).to(cdtype)
        allowed2 = (cols[None, :] <= cols[:, None])[None] & valid[:, None, :]
        allowed2 = allowed2 | torch.eye(S, dtype=torch.bool, device=dev)[None]
        biased = torch.where(allowed2, key_bias[:, None, :], neg)
        late = biased[:, None]  # layers K+1..: every query
        early = torch.where(answer[:, :, None], biased, torch.where(allowed2, zero, neg))[:, None]  # layers 0..K
        cos2, sin2 = adapter.rotary(batch.hidden, batch.pos)
        hidden = batch.hidden
        for i, layer in enumerate(layers):
            hidden = self._call(layer, hidden, early if i <= K else late, cos2, sin2, batch.text_pos, kwargs)
        stats = [{"visual_tokens": int(n)} for n in visual.sum(1).tolist()]
        return PrefillResult(hidden, batch, stats)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _keep_shift(z: torch.Tensor, sizes: list[int], target: float, iters: int = 60) -> torch.Tensor:
    """Per image, the c with mean(sigmoid(z + c)) == target (bisection; no gradient). [n_images]"""
    dev, dt = z.device, z.dtype
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
    n = torch.tensor(sizes, device=dev, dtype=dt)
    z = z.detach()
    lo = torch.full((len(sizes),), -float(z.max()) - 40.0, device=dev, dtype=dt)
    hi = torch.full_like(lo, -float(z.min()) + 40.0)
    for _ in range(iters):
        c = (lo + hi) / 2
        mean = torch.zeros_like(c).index_add_(0, ids, torch.sigmoid(z + c[ids])) / n
        above = mean > target
        hi = torch.where(above, c, hi)
        lo = torch.where(above, lo, c)
    return (lo + hi) / 2


def _standardise(z: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per image, (z - mean) / std (0 for a one-token image)."""
    out = []
    for t in _split(z, sizes):
        out.append((t - t.mean()) / (t.std(unbiased=False) + 1e-6) if t.numel() > 1 else t - t)
    return torch.cat(out) if out else z


def _global_shift(z: torch.Tensor, sizes: list[int], target: float, iters: int = 60) -> float:
    """The single c with mean over images of mean(sigmoid(z + c)) == target (bisection)."""
    parts = _split(z.detach(), sizes)
    lo, hi = -float(z.max()) - 40.0, -float(z.min()) + 40.0
    for _ in range(iters):
        c = (lo + hi) / 2
        mean = sum(float(torch.sigmoid(p + c).mean()) for p in parts) / len(parts)
        lo, hi = (lo, c) if mean > target else (c, hi)
    return (lo + hi) / 2


def _normalise_logits(z: torch.Tensor, sizes: list[int], target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each image's logits by c so that mean(sigmoid(z + c)) == target, with the exact
    first-order gradient of the shift (implicit function: dc/dz_j = -s'_j / sum s'), so the
    result depends only on the *relative* logits of an image. Returns (shifted z, c)."""
    c = _keep_shift(z, sizes, target)
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=z.device), torch.tensor(sizes, device=z.device))
    s = torch.sigmoid(z.detach() + c[ids])
    d = s * (1 - s)
    den = torch.zeros_like(c).index_add_(0, ids, d).clamp_min(1e-12)
    lin = -torch.zeros_like(c).index_add_(0, ids, d * z) / den
    return z + (c + lin - lin.detach())[ids], c


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


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes))


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
    from . import api
    from .models import adapter_for
    from .runtime import Runtime

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


# --------------------------------------------------------------------------------------------
# evaluate_vip
# --------------------------------------------------------------------------------------------


def _answer_logprobs(model, enc: Encoded, device, dtype) -> torch.Tensor:
    """[A, V] float32 log-probs of the answer positions: prefill the prompt, then feed the answer
    tokens (but the last) as one chunk on the cache, without mask or positions, so a patched model
    decodes exactly as it would in generation."""
    pin = _to_device(prompt_inputs(enc), device, dtype)
    answer = enc.answer_ids.to(device)
    out = model(**pin, use_cache=True)
    rows = [out.logits[0, -1:]]
    if answer.numel() > 1:
        step = model(input_ids=answer[None, :-1], use_cache=True, **hf.cache_kwargs(model, hf.output_cache(out)))
        rows.append(step.logits[0])
    out = torch.cat(rows)
    return out.to(torch.promote_types(out.dtype, torch.float32)).log_softmax(-1)


def _greedy(model, enc: Encoded, n: int, device, dtype, eos: set[int]) -> list[int]:
    pin = _to_device(prompt_inputs(enc), device, dtype)
    out = model.generate(**pin, max_new_tokens=n, do_sample=False)[0, pin["input_ids"].shape[1]:].tolist()
    for j, t in enumerate(out):
        if t in eos:
            return out[:j + 1]
    return out


@torch.no_grad()
def evaluate_vip(model, vip, dataset, *, processor=None, threshold: float = 0.5, keep_ratio: float | None = None,
                 max_keep_ratio: float | None = None, min_keep: int = 1, layer: int | None = None,
                 max_new_tokens: int | None = None, generate: bool = True, limit: int | None = None,
                 progress: bool = False, return_samples: bool = False) -> dict:
    """Evaluate a trained VIP on held-out rows through the real patched inference path.

    For every row (batch size 1): the full model's and the pruned model's (``token_prune.patch``
    with ``method="glimpse"``) teacher-forced answer distributions, and their greedy answers.

    Args:
        vip: a directory (``GlimpseModules.save`` or public format) or a :class:`GlimpseModules`.
        threshold, keep_ratio, max_keep_ratio, min_keep, layer: the pruning options
            (``keep_ratio`` fixes the kept fraction instead of the threshold rule).
        max_new_tokens: greedy tokens per answer (default: the reference answer's length).
        generate: also compare greedy answers.
        limit: evaluate only the first rows.

    Returns:
        dict with ``samples``, ``keep_ratio`` (mean kept fraction of visual tokens), ``kl``
        (mean over rows of the per-token KL(full || pruned) on the answer tokens),
        ``kl_first`` (the first answer token only), ``greedy_match`` (fraction of rows whose greedy
        answers are identical), ``token_agreement`` (fraction of the full model's greedy tokens
        the pruned model reproduces at the same position), ``options``; with ``return_samples``
        also ``per_sample``.
    """
    from . import api

    if api.get_handle(model) is not None:
        raise ValueError("the model is patched; call token_prune.unpatch(model) before evaluating")
    data = as_dataset(dataset)
    proc = default_processor(model, processor)
    modules = _load_modules(vip)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = set(getattr(proc, "eos_ids", set()) or ())
    if getattr(proc, "eos_id", None) is not None:
        eos.add(proc.eos_id)
    options = dict(threshold=threshold, keep_ratio=keep_ratio, max_keep_ratio=max_keep_ratio, min_keep=min_keep)
    if layer is not None:
        options["layer"] = layer
    rows = list(data)[:limit] if limit else list(data)
    was_training = model.training
    model.eval()
    samples = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="eval-vip", dynamic_ncols=True)
    try:
        for row in rows:
            enc = proc.encode(row)
            full = _answer_logprobs(model, enc, device, dtype)
            n = max_new_tokens or int(enc.answer_ids.numel())
            g_full = _greedy(model, enc, n, device, dtype, eos) if generate else None
            with api.patch(model, method="glimpse", vip=modules, **options) as handle:  # (our own copy)
                pruned = _answer_logprobs(model, enc, device, dtype)
                stats = handle.stats[0]
                g_pruned = _greedy(model, enc, n, device, dtype, eos) if generate else None
                k_used = handle.method.layer
            kl_tok = (full.exp() * (full - pruned)).sum(-1)
            s = dict(ref=row.ref, keep_ratio=stats["keep_ratio"], kept=stats["kept_tokens"],
                     visual=stats["visual_tokens"], kl=float(kl_tok.mean()), kl_first=float(kl_tok[0]))
            if generate:
                s["greedy_match"] = g_full == g_pruned
                s["token_agreement"] = sum(a == b for a, b in zip(g_full, g_pruned)) / max(1, len(g_full))
                s["full_answer"], s["pruned_answer"] = g_full, g_pruned
            samples.append(s)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{s['kl']:.4f}", keep=f"{s['keep_ratio']:.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    mean = lambda k: sum(s[k] for s in samples) / len(samples)  # noqa: E731
    out = dict(samples=len(samples), layer=k_used, keep_ratio=mean("keep_ratio"), kl=mean("kl"),
               kl_first=mean("kl_first"), options={k: v for k, v in options.items()})
    if generate:
        out["greedy_match"] = mean("greedy_match")
        out["token_agreement"] = mean("token_agreement")
    if return_samples:
        out["per_sample"] = samples
    return out


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
        from .tiny import tiny_model

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
        from .data import make_synthetic_dataset

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

        from .data import make_synthetic_dataset

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
