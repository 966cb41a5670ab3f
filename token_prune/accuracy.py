"""Accuracy retention of pruned models on a small Qwen2.5-VL trained from scratch.

Three steps, each a function and a CLI subcommand:

* :func:`train_small_lvlm` (``token-prune train-small-lvlm``): build a small
  ``Qwen2_5_VLForConditionalGeneration`` from a config and train it from scratch on the
  grounded VQA task of :mod:`token_prune.synthetic` (prompt: ``<vision_start> <image>*N
  <vision_end> question``, loss on the answer word and EOS only). Writes ``save_pretrained``
  weights, ``tokenizer.json`` and ``small_lvlm.json`` (preset, seed, task, command) to a
  directory outside git (``checkpoints/``). The preset and seed reproduce a run.
* :func:`eval_accuracy` (``token-prune eval-accuracy``): exact-match accuracy on a held-out split
  for the unpatched model and every method at keep ratios 0.111 / 0.222 / 0.333: GlimpsePrune
  (VIP trained by :func:`token_prune.train_vip`; capped with ``max_keep_ratio`` and with the plain
  threshold), ALVTS (calibrated with :func:`token_prune.calibrate_alvts`, and SVD only), FastV
  (K=2) and random pruning (the floor). Results go to JSON + Markdown + a plot.
* ``--pictures N``: per held-out sample one PNG with, per method, the image and its token grid,
  pruned cells dimmed (ALVTS: shaded by the fraction of layers that processed each token).

Presets (``PRESETS``):

* ``cpu``: 96 px images, 36 visual tokens, grid-aligned objects, colour and shape questions,
  0.38M parameters; 4000 steps of 16, 5-15 minutes on one CPU core depending on load (about
  0.1-0.2 s a step). ``--threads 1``: on a busy two-core machine more threads make it slower.
* ``h100``: 448-896 px images (256-1024 visual tokens), free placement, all six question types,
  bf16, progressive resizing from 224-336 px, 12 data workers; sized for under 15 minutes on one
  H100 but not yet run on one (see the README).
* ``test``: 64 px images, a 3-layer LLM; seconds, for the test suite.

What made a from-scratch model learn this quickly (found with trial runs while choosing the
CPU preset): weight init ~1/sqrt(width) instead of HF's 0.02; questions ending in the word that
picks the region; few visual tokens per object (alignment to the token grid) and few tokens
overall; a curriculum with single-object images. Before these the loss sat at the answer prior
for thousands of steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import hf
from .synthetic import Sample, TaskConfig, WordTokenizer, make_sample

__all__ = [
    "PRESETS",
    "Preset",
    "ModelSpec",
    "TrainSpec",
    "EvalSpec",
    "SmallVLMProcessor",
    "small_qwen_config",
    "build_small_lvlm",
    "load_small_lvlm",
    "train_small_lvlm",
    "eval_accuracy",
    "answer_accuracy",
    "draw_token_picture",
]

CONFIG_FILE = "small_lvlm.json"
KEEP_RATIOS = (0.111, 0.222, 0.333)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Size of the small Qwen2.5-VL. The token unit is ``patch_size * 2`` pixels (2x2 merge)."""

    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vision_hidden_size: int = 64
    vision_depth: int = 4
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    patch_size: int = 8
    window_tokens: int = 4  # window attention side, in merged tokens
    init_scale: float = 1.0  # weight init std = init_scale / sqrt(width)

    @property
    def unit(self) -> int:
        return self.patch_size * 2


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    bf16: bool = False
    eval_every: int = 250
    eval_samples: int = 256
    #: curriculum: a training image has 1 .. (objects min - 1) objects with probability
    #: ``easy_start`` at step 0, falling linearly to ``easy_end`` at ``easy_steps`` (0: off)
    easy_steps: int = 0
    easy_start: float = 0.5
    easy_end: float = 0.1
    #: image side range of the curriculum's easy images (None: the task's own)
    easy_image_sizes: tuple[int, int] | None = None
    #: DataLoader workers that draw and encode training batches (0: in the training process)
    num_workers: int = 0


@dataclass(frozen=True)
class EvalSpec:
    samples: int = 500
    batch_size: int = 50
    #: K of the main GlimpsePrune rows (None: the package's default for this depth, ~0.64 L)
    vip_layer: int | None = None
    #: more K values, each with its own VIP and a threshold-rule row (e.g. FastV's layer)
    extra_vip_layers: tuple[int, ...] = (2,)
    vip_rows: int = 2000
    vip_steps: int = 400
    vip_batch_size: int = 8
    vip_lr: float = 2e-3
    vip_objective: str = "mask"
    alvts_samples: int = 32
    alvts_steps: int = 60
    alvts_batch_size: int = 8
    fastv_layer: int = 2


@dataclass(frozen=True)
class Preset:
    name: str
    task: TaskConfig
    model: ModelSpec
    train: TrainSpec
    eval: EvalSpec
    description: str = ""

    def to_dict(self) -> dict:
        return dict(name=self.name, description=self.description, task=self.task.to_dict(),
                    model=dataclasses.asdict(self.model), train=dataclasses.asdict(self.train),
                    eval=dataclasses.asdict(self.eval))

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        return cls(name=d["name"], description=d.get("description", ""), task=TaskConfig.from_dict(d["task"]),
                   model=ModelSpec(**d["model"]), train=_train_spec(d["train"]), eval=_eval_spec(d["eval"]))


def _eval_spec(d: dict) -> EvalSpec:
    d = dict(d)
    if "extra_vip_layers" in d:
        d["extra_vip_layers"] = tuple(d["extra_vip_layers"])
    return EvalSpec(**d)


def _train_spec(d: dict) -> TrainSpec:
    d = dict(d)
    if d.get("easy_image_sizes") is not None:
        d["easy_image_sizes"] = tuple(d["easy_image_sizes"])
    return TrainSpec(**d)


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        description="96x96 px images (6x6 = 36 visual tokens; every object fills one token cell, so the "
                    "answer region is 1/36 of the image), color and shape questions, 6-layer 64-wide LLM, "
                    "4-block 32-wide ViT (0.38M parameters)",
        task=TaskConfig(image_sizes=(96, 96), unit=16, object_size=(14, 14), objects=(2, 4), align=True,
                        tasks=(("color", 1.0), ("shape", 1.0)),
                        colors=6, shapes=5, letters=6, words=8, max_count=3, letter_scale=0.75, noise=4.0),
        model=ModelSpec(hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=192,
                        vision_hidden_size=32, vision_depth=4, vision_heads=2, vision_intermediate_size=64,
                        patch_size=8, window_tokens=4),
        train=TrainSpec(steps=4000, batch_size=16, lr=2e-3, warmup=50, eval_every=250, eval_samples=256,
                        easy_steps=1500),
        eval=EvalSpec(),
    ),
    "h100": Preset(
        name="h100",
        description="448-896 px images (16x16 to 32x32 = 256-1024 visual tokens), all six question types, "
                    "8-layer 384-wide LLM, 8-block ViT, bf16; sized for under 15 minutes on one H100 "
                    "(not yet run on a GPU)",
        task=TaskConfig(image_sizes=(448, 896), unit=28, object_size=(36, 56), objects=(4, 7),
                        colors=8, shapes=7, letters=26, words=16, max_count=4, noise=4.0),
        model=ModelSpec(hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2, intermediate_size=1152,
                        vision_hidden_size=192, vision_depth=8, vision_heads=3, vision_intermediate_size=576,
                        patch_size=14, window_tokens=4),
        train=TrainSpec(steps=4000, batch_size=64, lr=1e-3, warmup=200, bf16=True, eval_every=500,
                        eval_samples=512, easy_steps=2000, easy_start=0.7, easy_end=0.1,
                        easy_image_sizes=(224, 336), num_workers=12),
        eval=EvalSpec(samples=1000, batch_size=32, vip_rows=8000, vip_steps=1000, vip_batch_size=16,
                      alvts_samples=64, alvts_steps=100),
    ),
    "test": Preset(
        name="test",
        description="smoke test: 64x64 px images, 2-layer LLM; seconds on a CPU, accuracy meaningless",
        task=TaskConfig(image_sizes=(64, 64), unit=16, object_size=(14, 18), objects=(2, 3),
                        tasks=(("color", 1.0), ("shape", 1.0)), colors=4, shapes=4, letters=4, words=4,
                        max_count=2, noise=2.0),
        model=ModelSpec(hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=64,
                        vision_hidden_size=16, vision_depth=4, vision_heads=1, vision_intermediate_size=32),
        train=TrainSpec(steps=20, batch_size=8, lr=3e-3, warmup=2, eval_every=10, eval_samples=8),
        eval=EvalSpec(samples=8, batch_size=4, vip_layer=1, extra_vip_layers=(), vip_rows=8, vip_steps=2,
                      vip_batch_size=4,
                      alvts_samples=4, alvts_steps=2, alvts_batch_size=2, fastv_layer=1),
    ),
}


# --------------------------------------------------------------------------------------------
# Model and processor
# --------------------------------------------------------------------------------------------


def small_qwen_config(tokenizer: WordTokenizer, spec: ModelSpec):
    """A ``Qwen2_5_VLConfig`` of the given size whose special ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    head_dim = spec.hidden_size // spec.num_heads
    half = head_dim // 2
    hw = half * 3 // 8
    vocab = -(-len(tokenizer) // 8) * 8
    text_config = dict(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
        # HF's 0.02 suits widths in the thousands; a 64-wide model needs ~1/sqrt(width), or attention
        # starts uniform with near-zero q/k gradients and training sits on a long plateau.
        initializer_range=spec.init_scale / math.sqrt(spec.hidden_size), tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * hw, hw, hw]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    depth = spec.vision_depth
    vision_config = dict(
        depth=depth, hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_heads, in_channels=3, patch_size=spec.patch_size, spatial_merge_size=2,
        temporal_patch_size=2, window_size=spec.window_tokens * spec.unit, out_hidden_size=spec.hidden_size,
        fullatt_block_indexes=sorted({max(0, depth // 2 - 1), depth - 1}),
        initializer_range=spec.init_scale / math.sqrt(spec.vision_hidden_size),
    )
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config,
                            vision_start_token_id=tokenizer.vision_start_token_id,
                            vision_end_token_id=tokenizer.vision_end_token_id,
                            image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id,
                            tie_word_embeddings=False)


def build_small_lvlm(tokenizer: WordTokenizer, spec: ModelSpec, seed: int = 0, attn_implementation: str = "sdpa"):
    """A freshly initialised small ``Qwen2_5_VLForConditionalGeneration`` (seeded)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = small_qwen_config(tokenizer, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf.model_from_config(Qwen2_5_VLForConditionalGeneration, config,
                                     attn_implementation=attn_implementation, dtype=torch.float32)
    _generation_ids(model, tokenizer)
    return model


def _generation_ids(model, tokenizer):
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False


class SmallVLMProcessor:
    """Images + questions -> inputs of the small model (also a processor for ``train_vip``).

    The image keeps its size (a multiple of the token unit); ``pixel_values`` are laid out as the
    Qwen2.5-VL image processor lays them out (patches grouped by 2x2 merge unit, channel-major,
    the frame repeated over the temporal patch), scaled to [-1, 1]. Prompt:
    ``<vision_start> <image>*N <vision_end> question``; answer: its words then ``<eos>``.
    """

    is_vip_processor = True  # token_prune.train accepts it as is

    def __init__(self, tokenizer: WordTokenizer, config, dtype: torch.dtype = torch.float32):
        self.tokenizer = tokenizer
        self.config = config
        self.dtype = dtype
        vc = config.vision_config
        self.patch, self.merge, self.temporal = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        self.unit = self.patch * self.merge
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id}

    def pixels(self, image):
        """(pixel_values [gh*gw, 3*T*P*P], image_grid_thw [1, 3], visual tokens) of a PIL image."""
        import numpy as np

        W, H = image.size
        if W % self.unit or H % self.unit:
            W2, H2 = max(self.unit, W // self.unit * self.unit), max(self.unit, H // self.unit * self.unit)
            image = image.resize((W2, H2))
            W, H = W2, H2
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        P, m, T = self.patch, self.merge, self.temporal
        gh, gw = H // P, W // P
        frames = x[None].expand(T, 3, H, W)
        p = frames.reshape(T, 3, gh // m, m, P, gw // m, m, P).permute(2, 5, 3, 6, 1, 0, 4, 7)
        return p.reshape(gh * gw, 3 * T * P * P).contiguous(), torch.tensor([[1, gh, gw]]), gh * gw // (m * m)

    def sequence(self, n_image_tokens: int, question: str, answer: str | None = None):
        """(ids, mm_token_type_ids, prompt_len) of one prompt (+ answer)."""
        tok = self.tokenizer
        q = tok.encode(question)
        prompt = [tok.vision_start_token_id] + [tok.image_token_id] * n_image_tokens + [tok.vision_end_token_id] + q
        types = [0] + [1] * n_image_tokens + [0] * (1 + len(q))
        ids = list(prompt)
        if answer is not None:
            a = tok.encode(answer) + [tok.eos_token_id]
            ids += a
            types += [0] * len(a)
        return ids, types, len(prompt)

    def single(self, image, question: str, answer: str | None = None) -> dict:
        pv, grid, n = self.pixels(image)
        ids, types, plen = self.sequence(n, question, answer)
        return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    mm_token_type_ids=torch.tensor([types]), pixel_values=pv.to(self.dtype), image_grid_thw=grid,
                    prompt_len=plen)

    def encode(self, row):
        """A :class:`token_prune.data.VipRow` (image path, question, answer, boxes) -> ``Encoded``."""
        from PIL import Image

        from .data import Encoded

        with Image.open(row.image) as im:
            image = im.convert("RGB")
        d = self.single(image, row.question, row.answer)
        plen = d.pop("prompt_len")
        return Encoded(inputs=d, prompt_len=plen, boxes=row.boxes, ref=row.ref)

    def batch(self, samples: list[Sample], with_answer: bool) -> dict:
        """Left-padded batch. With answers also ``answer_mask`` [B, S] (answer tokens incl. EOS)."""
        rows, pixels, grids = [], [], []
        for s in samples:
            pv, grid, n = self.pixels(s.image)
            ids, types, plen = self.sequence(n, s.question, s.answer if with_answer else None)
            rows.append((ids, types, plen))
            pixels.append(pv)
            grids.append(grid)
        S = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, S), self.pad_token_id, dtype=torch.long)
        mm = torch.zeros(B, S, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.long)
        answer_mask = torch.zeros(B, S, dtype=torch.bool)
        for b, (ids, types, plen) in enumerate(rows):
            L = len(ids)
            input_ids[b, S - L:] = torch.tensor(ids)
            mm[b, S - L:] = torch.tensor(types)
            mask[b, S - L:] = 1
            answer_mask[b, S - L + plen:] = True
        out = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm,
                   pixel_values=torch.cat(pixels).to(self.dtype), image_grid_thw=torch.cat(grids))
        if with_answer:
            out["answer_mask"] = answer_mask
        return out


def _to(inputs: dict, device, dtype=None) -> dict:
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


def load_small_lvlm(path, device="cpu", dtype=torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer, processor, preset, info) from a directory written by :func:`train_small_lvlm`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = os.fspath(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a directory written by train-small-lvlm")
    with open(cfg_path) as f:
        info = json.load(f)
    preset = Preset.from_dict(info["preset"])
    tokenizer = WordTokenizer.load(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                               attn_implementation=attn_implementation)
    model = model.to(device).eval()
    _generation_ids(model, tokenizer)
    proc = SmallVLMProcessor(tokenizer, model.config, dtype=dtype)
    return model, tokenizer, proc, preset, info


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
            grids = (inputs["image_grid_thw"][:, 1:] // proc.merge).tolist()
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


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def draw_token_picture(image, grid: tuple[int, int], weight, box=None, title: str | None = None, scale: int = 2):
    """The image with its visual-token grid drawn over it.

    Args:
        image: PIL RGB image.
        grid: (rows, cols) of the image's visual tokens.
        weight: per token (row-major, rows*cols) a number in [0, 1]: 1 kept / always processed,
            0 pruned (drawn dimmed to 25 % brightness), in between (ALVTS: the fraction of
            layers that processed the token) shaded in proportion.
        box: the answer's normalised box, outlined in green.
        title: a line of text above the picture.
        scale: upscaling factor (nearest neighbour, so pixels stay crisp).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rows, cols = grid
    W, H = image.size
    w = torch.as_tensor(weight, dtype=torch.float32).reshape(rows, cols).clamp(0, 1)
    cell_h, cell_w = H / rows, W / cols
    ys = (torch.arange(H) / cell_h).long().clamp(max=rows - 1)
    xs = (torch.arange(W) / cell_w).long().clamp(max=cols - 1)
    factor = (0.25 + 0.75 * w)[ys][:, xs].numpy()[..., None]
    px = np.asarray(image.convert("RGB"), dtype=np.float32) * factor
    out = Image.fromarray(px.clip(0, 255).astype(np.uint8)).resize((W * scale, H * scale), Image.NEAREST)
    d = ImageDraw.Draw(out)
    for r in range(rows + 1):
        y = round(r * cell_h * scale)
        d.line([(0, y), (W * scale, y)], fill=(70, 70, 70), width=1)
    for c in range(cols + 1):
        x = round(c * cell_w * scale)
        d.line([(x, 0), (x, H * scale)], fill=(70, 70, 70), width=1)
    # Kept cells get a bright outline so they read at a glance.
    for r in range(rows):
        for c in range(cols):
            if w[r, c] >= 0.999:
                x0, y0 = round(c * cell_w * scale), round(r * cell_h * scale)
                d.rectangle([x0, y0, round((c + 1) * cell_w * scale) - 1, round((r + 1) * cell_h * scale) - 1],
                            outline=(255, 235, 60))
    if box is not None:
        x0, y0, x1, y1 = box
        d.rectangle([x0 * W * scale, y0 * H * scale, x1 * W * scale - 1, y1 * H * scale - 1], outline=(40, 230, 60),
                    width=2)
    if title:
        lines = title.split("\n")
        pad = 13 * len(lines) + 4
        canvas = Image.new("RGB", (out.width, out.height + pad), (255, 255, 255))
        canvas.paste(out, (0, pad))
        dd = ImageDraw.Draw(canvas)
        from .synthetic import _font

        for i, line in enumerate(lines):
            dd.text((3, 2 + 13 * i), line, fill=(0, 0, 0), font=_font(11))
        out = canvas
    return out


def _box_cells(box, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols] bool: token cells a normalised box overlaps with positive area (at least its centre's)."""
    x0, y0, x1, y1 = box
    c0, r0 = min(cols - 1, int(x0 * cols)), min(rows - 1, int(y0 * rows))
    c1, r1 = max(c0 + 1, min(cols, math.ceil(x1 * cols - 1e-9))), max(r0 + 1, min(rows, math.ceil(y1 * rows - 1e-9)))
    m = torch.zeros(rows, cols, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m.flatten()


def _token_weights(handle, inputs: dict, b: int) -> torch.Tensor:
    """Per visual token of sample ``b`` (prompt order = row-major grid): 1 kept, 0 pruned; ALVTS: the
    fraction of layers that processed it."""
    visual = inputs["mm_token_type_ids"][b] == 1
    processed = getattr(handle.method, "last_processed", None)
    if processed:
        stack = torch.stack([p[b] for p in processed]).float()  # [layers, S]
        return stack.mean(0)[visual].cpu()
    return handle.keep_mask[b][visual].float().cpu()


def _compose(panels, columns: int = 4):
    from PIL import Image

    w = max(p.width for p in panels)
    h = max(p.height for p in panels)
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * w + (columns - 1) * 6, rows * h + (rows - 1) * 6), (255, 255, 255))
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % columns) * (w + 6), (i // columns) * (h + 6)))
    return sheet


# --------------------------------------------------------------------------------------------
# eval-accuracy
# --------------------------------------------------------------------------------------------


def _fmt_opts(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())


def _vip_trainer():
    """``token_prune.train_vip`` when that module exists (issue 5), else None."""
    try:
        from .train import train_vip
    except Exception:  # noqa: BLE001 - not written yet, or broken: the rows say so
        return None
    return train_vip


def _with_current_eval(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        return dataclasses.replace(preset, eval=PRESETS[preset.name].eval)
    return preset


def vip_layer_of(model, preset: Preset) -> int:
    """K of the main GlimpsePrune rows: the preset's, else the package default for the model's depth."""
    if preset.eval.vip_layer is not None:
        return preset.eval.vip_layer
    from .models import adapter_for

    return adapter_for(model).default_glimpse_layer()


def _prepare_vip(model, proc, preset: Preset, seed: int, ckpt: str, layer: int, log, progress: bool,
                 retrain: bool) -> tuple:
    """(VIP directory or None, note). Trains the VIP for layer K with ``train_vip`` unless a matching
    one is cached in ``ckpt/vip_K<layer>``."""
    train_vip = _vip_trainer()
    if train_vip is None:
        return None, "token_prune.train_vip (issue 5) is not available in this checkout: GlimpsePrune not evaluated"
    e = preset.eval
    vdir = os.path.join(ckpt, f"vip_K{layer}")
    want = dict(layer=layer, rows=e.vip_rows, steps=e.vip_steps, batch_size=e.vip_batch_size, lr=e.vip_lr,
                objective=e.vip_objective, seed=seed)
    note = f"VIP trained by token_prune.train_vip (objective {e.vip_objective}, {e.vip_steps} steps x " \
           f"{e.vip_batch_size} rows, K={layer})"
    stamp = os.path.join(vdir, "accuracy_vip.json")
    if not retrain and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f).get("args") == want:
                log(f"using the VIP in {vdir}")
                return vdir, note
    from .synthetic import write_jsonl

    data_dir = os.path.join(ckpt, "vip_data")
    jsonl = os.path.join(data_dir, "data.jsonl")
    if not os.path.isfile(jsonl) or sum(1 for _ in open(jsonl)) != e.vip_rows:
        log(f"writing {e.vip_rows} VIP training rows to {data_dir}")
        # A range of train-split indices past what the LVLM saw (any would do; these are fresh).
        start = 50_000_000
        rows = [make_sample(preset.task, seed, start + i, "train") for i in range(e.vip_rows)]
        jsonl = write_jsonl(rows, data_dir)
    log(f"training the VIP with token_prune.train_vip: K={layer}, objective={e.vip_objective}, "
        f"{e.vip_steps} steps x {e.vip_batch_size} rows")
    t0 = time.perf_counter()
    res = train_vip(model, jsonl, layer=layer, out_dir=vdir, processor=proc, objective=e.vip_objective,
                    steps=e.vip_steps, batch_size=e.vip_batch_size, lr=e.vip_lr, seed=seed, progress=progress)
    hist = getattr(res, "history", []) or []
    with open(stamp, "w") as f:
        json.dump(dict(args=want, seconds=round(time.perf_counter() - t0, 1),
                       last=hist[-1] if hist else None), f, indent=2)
    return vdir, note


def _prepare_alvts(model, proc, preset: Preset, seed: int, ckpt: str, log, progress: bool, retrain: bool):
    from .methods.alvts import calibrate_alvts

    e = preset.eval
    sdir = os.path.join(ckpt, "alvts_selector")
    want = dict(samples=e.alvts_samples, steps=e.alvts_steps, batch_size=e.alvts_batch_size, seed=seed)
    stamp = os.path.join(sdir, "accuracy_alvts.json")
    if not retrain and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f).get("args") == want:
                log(f"using the ALVTS selector in {sdir}")
                return sdir
    log(f"calibrating ALVTS on {e.alvts_samples} val-split samples, {e.alvts_steps} steps per layer")
    device = next(model.parameters()).device
    cal = [make_sample(preset.task, seed, i, "val") for i in range(e.alvts_samples)]
    batches = [_to(proc.batch(cal[i:i + e.alvts_batch_size], with_answer=False), device)
               for i in range(0, len(cal), e.alvts_batch_size)]
    t0 = time.perf_counter()
    calibrate_alvts(model, batches, steps=e.alvts_steps, out=sdir, progress=progress, seed=seed)
    with open(stamp, "w") as f:
        json.dump(dict(args=want, seconds=round(time.perf_counter() - t0, 1)), f, indent=2)
    return sdir


def _settings(preset: Preset, keep_ratios, vips: dict, selector_dir, methods=None,
              hidden: int | None = None) -> list[dict]:
    """The rows to evaluate. ``vips``: K -> (VIP dir or None, note); the first K is the main one."""
    e = preset.eval
    rows = [dict(key="unpatched", label="unpatched", method=None, options={}, target=1.0)]
    layers = list(vips)
    if layers:
        K = layers[0]
        vdir, note = vips[K]
        for r in keep_ratios:
            rows.append(dict(key=f"glimpse_cap@{r}", label=f"GlimpsePrune K={K} (cap)", method="glimpse",
                             options=dict(vip=vdir, threshold=0.5, max_keep_ratio=r, layer=K), target=r, note=note))
        rows.append(dict(key="glimpse_threshold", label=f"GlimpsePrune K={K} (threshold)", method="glimpse",
                         options=dict(vip=vdir, threshold=0.5, layer=K), target=None, note=note))
        for K in layers[1:]:
            vdir, note = vips[K]
            rows.append(dict(key=f"glimpse_threshold_K{K}", label=f"GlimpsePrune K={K} (threshold)",
                             method="glimpse", options=dict(vip=vdir, threshold=0.5, layer=K), target=None,
                             note=note))
    # ALVTS under both readings of a skipped token (methods/alvts.py): "context" (default: still a
    # key/value for the others) and "drop" (invisible at that layer; smaller caches).
    for skipped, tag in (("context", ""), ("drop", "_drop")):
        for r in keep_ratios:
            rows.append(dict(key=f"alvts_cal{tag}@{r}", label=f"ALVTS (calibrated, {skipped})", method="alvts",
                             options=dict(keep_ratio=r, selector=selector_dir, skipped=skipped), target=r))
        for r in keep_ratios:
            rows.append(dict(key=f"alvts_svd{tag}@{r}", label=f"ALVTS (SVD only, {skipped})", method="alvts",
                             options=dict(keep_ratio=r, skipped=skipped), target=r))
    # Diagnostics of the "drop" reading: what the low rank costs (exact q/k), and what selecting at
    # layer 0 costs.
    if hidden:
        for r in keep_ratios:
            rows.append(dict(key=f"alvts_fullrank@{r}", label="ALVTS drop, full-rank q/k (diagnostic)",
                             method="alvts", options=dict(keep_ratio=r, rank=hidden, skipped="drop"), target=r))
    for r in keep_ratios:
        rows.append(dict(key=f"alvts_cal_from1@{r}", label="ALVTS drop, calibrated, layer 0 unpruned (diagnostic)",
                         method="alvts", options=dict(keep_ratio=r, selector=selector_dir, start_layer=1,
                                                      skipped="drop"), target=r))
    for r in keep_ratios:
        rows.append(dict(key=f"fastv@{r}", label=f"FastV K={e.fastv_layer}", method="fastv",
                         options=dict(keep_ratio=r, layer=e.fastv_layer), target=r))
    for r in keep_ratios:
        rows.append(dict(key=f"random@{r}", label="random (after layer 0)", method="random",
                         options=dict(keep_ratio=r, layer=0, seed=0), target=r))
    if methods:
        rows = [s for s in rows if s["method"] is None or s["method"] in methods]
    return rows


def eval_accuracy(checkpoint, *, out_dir="bench/results", name: str | None = None, samples: int | None = None,
                  keep_ratios=KEEP_RATIOS, methods: list[str] | None = None, pictures: int = 0,
                  picture_ratio: float | None = None, device: str | None = None, threads: int | None = None,
                  retrain: bool = False, progress: bool = True, log=print, command: str | None = None) -> dict:
    """Exact-match accuracy on the held-out (``test``) split, unpatched and per pruning method.

    Args:
        checkpoint: a directory written by :func:`train_small_lvlm`.
        out_dir: where ``<name>.json`` / ``.md`` / ``.png`` go (and ``<name>_pictures/``).
        name: file stem (default ``accuracy_<preset>``).
        samples: held-out samples (default: the preset's).
        methods: evaluate only these (``glimpse``, ``alvts``, ``fastv``, ``random``).
        pictures: write a picture of the first ``pictures`` held-out samples.
        picture_ratio: the keep ratio shown in the pictures (default: the smallest).
        retrain: retrain the VIP and recalibrate ALVTS even when cached ones match.

    The VIP (trained with :func:`token_prune.train_vip`) and the ALVTS selector
    (:func:`token_prune.calibrate_alvts`) are cached inside ``checkpoint``.
    """
    import token_prune as tp
    from .bench import git_info

    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok, proc, preset, info = load_small_lvlm(checkpoint, device=dev)
    seed = int(info.get("seed", 0))
    # The task and model come from the checkpoint; the evaluation settings from the current preset of
    # that name (they are benchmark settings, not part of the trained model).
    preset = _with_current_eval(preset)
    e = preset.eval
    n = samples or e.samples
    name = name or f"accuracy_{preset.name}"
    os.makedirs(out_dir, exist_ok=True)
    test = [make_sample(preset.task, seed, i, "test") for i in range(n)]
    grids = [proc.pixels(s.image)[2] for s in test[:50]]
    visual_tokens = sum(grids) / len(grids)
    t_start = time.perf_counter()

    want = set(methods) if methods else {"glimpse", "alvts", "fastv", "random"}
    vips: dict = {}
    main_k = vip_layer_of(model, preset)
    if "glimpse" in want:
        for K in [main_k] + [k for k in e.extra_vip_layers if k != main_k]:
            vips[K] = _prepare_vip(model, proc, preset, seed, os.fspath(checkpoint), K, log, progress, retrain)
    selector_dir = _prepare_alvts(model, proc, preset, seed, os.fspath(checkpoint), log, progress, retrain) \
        if "alvts" in want else None
    settings = _settings(preset, keep_ratios, vips, selector_dir, methods, hidden=model.config.text_config.hidden_size)

    results = []
    full_acc = None
    for s in settings:
        row = dict(key=s["key"], label=s["label"], method=s["method"] or "none", target_keep=s["target"],
                   options={k: v for k, v in s["options"].items() if k not in ("vip", "selector")})
        if s["method"] == "alvts":
            row["options"]["selector"] = "calibrated" if s["options"].get("selector") else "svd"
        if s["method"] == "glimpse" and s["options"].get("vip") is None:
            row.update(status="not run", note=s.get("note"), accuracy=None, keep_ratio=None)
            results.append(row)
            log(f"{s['key']:<22} not run: {s.get('note')}")
            continue
        t0 = time.perf_counter()
        if s["method"] is None:
            res = answer_accuracy(model, proc, test, batch_size=e.batch_size)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle = tp.patch(model, method=s["method"], **s["options"])
            with handle:
                row["options"] = {**row["options"], **{k: v for k, v in handle.options.items()
                                                       if k not in ("selector",)}}
                res = answer_accuracy(model, proc, test, batch_size=e.batch_size, handle=handle)
        res.pop("answers")
        if full_acc is None:
            full_acc = res["accuracy"]
        row.update(status="ok", accuracy=res["accuracy"], keep_ratio=res["keep_ratio"], box_hit=res["box_hit"],
                   retained=(res["accuracy"] / full_acc) if full_acc else None, per_task=res["per_task"],
                   seconds=round(time.perf_counter() - t0, 1))
        if s.get("note"):
            row["note"] = s["note"]
        results.append(row)
        log(f"{s['key']:<22} accuracy {res['accuracy']:.3f}  kept {res['keep_ratio']:.3f}  "
            f"answer box kept {res['box_hit']:.3f}  "
            f"({row['seconds']:.0f}s)")

    report = dict(
        checkpoint=os.fspath(checkpoint), preset=preset.name, preset_description=preset.description,
        train_seed=seed, train_steps=info.get("steps"), train_seconds=info.get("train_seconds"),
        train_device=info.get("device"), eval_split="test", samples=n, keep_ratios=list(keep_ratios),
        visual_tokens=round(visual_tokens, 1),
        device=str(dev), gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        cuda=torch.version.cuda, torch=torch.__version__, transformers=_tf_version(), **git_info(),
        task=preset.task.to_dict(),
        model=dataclasses.asdict(preset.model), vip_layer=main_k, vip_layers=list(vips), fastv_layer=e.fastv_layer,
        vip=[v[1] for v in vips.values()], seconds=round(time.perf_counter() - t_start, 1), command=command,
        results=results,
    )
    paths = dict(json=os.path.join(out_dir, f"{name}.json"), md=os.path.join(out_dir, f"{name}.md"),
                 png=os.path.join(out_dir, f"{name}.png"))
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(_markdown(report))
    _plot(report, paths["png"])
    if pictures:
        paths["pictures"] = _pictures(model, proc, test[:pictures], settings, keep_ratios, picture_ratio,
                                      os.path.join(out_dir, f"{name}_pictures"))
    report["files"] = paths
    for k, v in paths.items():
        log(f"wrote {v}")
    return report


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _markdown(rep: dict) -> str:
    full = next((r for r in rep["results"] if r["key"] == "unpatched"), None)
    lines = [
        f"# Accuracy retention: small Qwen2.5-VL on synthetic grounded VQA ({rep['preset']} preset)",
        "",
        f"Model: {rep['preset_description']}; trained from scratch, seed {rep['train_seed']}, "
        f"{rep['train_steps']} steps ({rep['train_seconds']} s on {rep['train_device']}). "
        f"Held-out `{rep['eval_split']}` split, {rep['samples']} samples, greedy exact match; "
        f"evaluated on {rep.get('gpu') or rep['device']} (torch {rep['torch']}, transformers {rep['transformers']}, "
        f"git {str(rep.get('git_sha', 'unknown'))[:10]}{' + local changes' if rep.get('git_dirty') else ''}).",
        "",
        f"Tasks: {', '.join(t for t, _ in rep['task']['tasks'])}; images {rep['task']['image_sizes'][0]}-"
        f"{rep['task']['image_sizes'][1]} px, {rep.get('visual_tokens', '?')} visual tokens per image (mean), "
        f"objects {rep['task']['object_size'][0]}-{rep['task']['object_size'][1]} px"
        + (", one per token cell" if rep['task'].get('align') else "") + ". "
        f"GlimpsePrune prunes after the layer K in its label, FastV after K={rep['fastv_layer']}, random pruning "
        "after layer 0; ALVTS selects before every layer. 'kept' is the mean fraction of visual tokens kept "
        "(ALVTS: processed per layer, averaged over layers); 'answer box kept' the share of samples where a "
        "token of the answer's box survived (ALVTS: was processed by at least half the layers); 'retained' "
        "is accuracy relative to the unpatched model.",
        "",
        "| method | options | target keep | kept | answer box kept | accuracy | retained | per task |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rep["results"]:
        opts = _fmt_opts({k: v for k, v in r["options"].items()
                          if v is not None and k not in ("min_keep",) and not (k == "start_layer" and v == 0)})
        tgt = "-" if r["target_keep"] is None else f"{r['target_keep']:.3f}"
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {opts} | {tgt} | - | - | not run | - | {r.get('note', '')} |")
            continue
        tasks = ", ".join(f"{k} {v:.2f}" for k, v in r["per_task"].items())
        ret = "-" if r.get("retained") is None else f"{100 * r['retained']:.1f}%"
        hit = "-" if r.get("box_hit") is None else f"{100 * r['box_hit']:.1f}%"
        lines.append(f"| {r['label']} | {opts} | {tgt} | {r['keep_ratio']:.3f} | {hit} | {100 * r['accuracy']:.1f}% | "
                     f"{ret} | {tasks} |")
    for note in rep.get("vip") or []:
        lines += ["", f"GlimpsePrune: {note}."]
    if full is not None:
        lines += ["", f"Command: `{rep['command']}`" if rep.get("command") else ""]
    return "\n".join(lines).rstrip() + "\n"


def _plot(rep: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional: JSON + Markdown still written
        warnings.warn("matplotlib is not installed: no accuracy plot")
        return
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    groups: dict[str, list] = {}
    full = None
    for r in rep["results"]:
        if r.get("status") != "ok":
            continue
        if r["key"] == "unpatched":
            full = r["accuracy"]
            continue
        if "diagnostic" in r["label"]:  # in the table only: the plot compares the methods
            continue
        groups.setdefault(r["label"], []).append((r["keep_ratio"], r["accuracy"]))
    markers = itertools.cycle("osD^v<>p*hXP")
    for label, pts in groups.items():
        pts.sort()
        xs, ys = [100 * p[0] for p in pts], [100 * p[1] for p in pts]
        ax.plot(xs, ys, marker=next(markers), label=label, linestyle="-" if len(pts) > 1 else "none", markersize=7)
    if full is not None:
        ax.axhline(100 * full, color="black", linestyle="--", linewidth=1, label=f"unpatched ({100 * full:.1f}%)")
    ax.set_xlabel("visual tokens kept (%, mean; ALVTS: processed per layer)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"Accuracy vs keep ratio, small Qwen2.5-VL, {rep['preset']} preset, n={rep['samples']}")
    lows = [100 * a for pts in groups.values() for _, a in pts] + ([100 * full] if full is not None else [])
    ax.set_ylim(max(0, 10 * math.floor((min(lows) - 5) / 10)) if lows else 0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pictures(model, proc, samples: list[Sample], settings, keep_ratios, ratio, out_dir) -> str:
    """One PNG per sample: the image with the answer box, then each method's kept tokens."""
    import token_prune as tp

    os.makedirs(out_dir, exist_ok=True)
    ratio = ratio if ratio is not None else min(keep_ratios)
    chosen = [s for s in settings if s["method"] is not None and "diagnostic" not in s["label"]
              and (s["target"] is None or abs(s["target"] - ratio) < 1e-9)]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tok = proc.tokenizer
    inputs = _to(proc.batch(samples, with_answer=False), device, dtype)
    grids = (inputs["image_grid_thw"][:, 1:] // proc.merge).tolist()
    plen = inputs["input_ids"].shape[1]
    panels = [[] for _ in samples]

    def answers(out):
        return [tok.decode(g) for g in out[:, plen:].tolist()]

    with torch.no_grad():
        full = answers(model.generate(**inputs, max_new_tokens=3, do_sample=False))
    for b, s in enumerate(samples):
        panels[b].append(draw_token_picture(s.image, grids[b], torch.ones(grids[b][0] * grids[b][1]), box=s.box,
                                            title=f"{s.question}\nunpatched: {full[b]} (truth: {s.answer})"))
    for st in chosen:
        if st["method"] == "glimpse" and st["options"].get("vip") is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = tp.patch(model, method=st["method"], **st["options"])
        with handle, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            # generate's last prefill is the prompt: keep_mask / last_processed describe it.
            got = answers(out)
            for b, s in enumerate(samples):
                w = _token_weights(handle, inputs, b)
                kept = handle.stats[b]
                frac = (sum(kept["processed_ratio"]) / len(kept["processed_ratio"]) if "processed_ratio" in kept
                        else kept["keep_ratio"])
                mark = "ok" if got[b] == tok.normalize(s.answer) else "WRONG"
                label = st["label"] + (f" r={st['target']}" if st["target"] is not None else "")
                panels[b].append(draw_token_picture(s.image, grids[b], w, box=s.box,
                                                    title=f"{label}\n{got[b]} [{mark}], kept {100 * frac:.0f}%"))
    for b, s in enumerate(samples):
        _compose(panels[b]).save(os.path.join(out_dir, f"sample_{s.index:03d}_{s.task}.png"), optimize=True)
    return out_dir


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
    grids = (inputs["image_grid_thw"][:, 1:] // proc.merge).tolist()
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
