"""The small vision-language model of the accuracy benchmark: its presets (model size,
training, evaluation), construction from a config, processor and loading.

The model is of a registered family (``ModelSpec.family``, a Qwen2.5-VL by default) that can
build a config of a given size (its adapter's ``config_of_size``); its prompts and pixels are
laid out by the same adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch

from .. import hf
from ..models import DEFAULT_MODEL, adapter_class
from .synthetic import Sample, TaskConfig, WordTokenizer


CONFIG_FILE = "small_lvlm.json"
KEEP_RATIOS = (0.111, 0.222, 0.333)



# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Family and size of the small model. The token unit is ``patch_size * 2`` pixels (2x2 merge)."""

    family: str = DEFAULT_MODEL
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


def small_config(tokenizer: WordTokenizer, spec: ModelSpec):
    """The config of a small model of ``spec.family`` and size, whose special ids are the tokenizer's."""
    family = adapter_class(spec.family)
    return family.config_of_size(
        hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
        vocab_size=-(-len(tokenizer) // 8) * 8, vision_hidden_size=spec.vision_hidden_size,
        vision_depth=spec.vision_depth, vision_heads=spec.vision_heads,
        vision_intermediate_size=spec.vision_intermediate_size, patch_size=spec.patch_size,
        window_tokens=spec.window_tokens,
        # HF's 0.02 suits widths in the thousands; a 64-wide model needs ~1/sqrt(width), or attention
        # starts uniform with near-zero q/k gradients and training sits on a long plateau.
        init_std=spec.init_scale / math.sqrt(spec.hidden_size),
        vision_init_std=spec.init_scale / math.sqrt(spec.vision_hidden_size),
        ids=dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, vision_start_token_id=tokenizer.vision_start_token_id,
                 vision_end_token_id=tokenizer.vision_end_token_id, image_token_id=tokenizer.image_token_id,
                 video_token_id=tokenizer.video_token_id),
        tie_embeddings=False,
    )


def build_small_lvlm(tokenizer: WordTokenizer, spec: ModelSpec, seed: int = 0, attn_implementation: str = "sdpa"):
    """A freshly initialised small model of ``spec.family`` (seeded)."""
    import transformers

    config = small_config(tokenizer, spec)
    cls = getattr(transformers, adapter_class(spec.family).hf_model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf.model_from_config(cls, config, attn_implementation=attn_implementation, dtype=torch.float32)
    _generation_ids(model, tokenizer)
    return model


def _generation_ids(model, tokenizer):
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False


class SmallVLMProcessor:
    """Images + questions -> inputs of the small model (also a processor for ``train_vip``).

    The image keeps its size (cut down to a multiple of the token unit); pixels and the prompt
    (image, then the question) are laid out by the family's adapter, pixels scaled to [-1, 1];
    the answer is its words then ``<eos>``.
    """

    is_vip_processor = True  # token_prune.train accepts it as is

    def __init__(self, tokenizer: WordTokenizer, config, dtype: torch.dtype = torch.float32):
        self.tokenizer = tokenizer
        self.config = config
        self.dtype = dtype
        self.family = adapter_class(config.model_type)
        vc = config.vision_config
        self.unit = vc.patch_size * vc.spatial_merge_size
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id}

    def pixels(self, image) -> tuple[dict, int]:
        """(pixel inputs, visual tokens) of a PIL image."""
        W, H = image.size
        if W % self.unit or H % self.unit:
            W, H = max(self.unit, W // self.unit * self.unit), max(self.unit, H // self.unit * self.unit)
            image = image.resize((W, H))
        return self.family.encode_image(self.config, image.convert("RGB"), max(W, H))

    def token_grid(self, image) -> tuple[int, int]:
        """(rows, cols) of the image's visual tokens (the picture and box-hit grids)."""
        W, H = image.size
        return max(1, H // self.unit), max(1, W // self.unit)

    def visual_tokens(self, image) -> int:
        rows, cols = self.token_grid(image)
        return rows * cols

    def sequence(self, n_image_tokens: int, question: str, answer: str | None = None):
        """(ids, mm_token_type_ids, prompt_len) of one prompt (+ answer)."""
        tok = self.tokenizer
        prompt, types = self.family.prompt_tokens(self.config, [("image", n_image_tokens),
                                                                ("text", tok.encode(question))])
        ids = list(prompt)
        if answer is not None:
            a = tok.encode(answer) + [tok.eos_token_id]
            ids += a
            types = types + [0] * len(a)
        return ids, types, len(prompt)

    def single(self, image, question: str, answer: str | None = None) -> dict:
        pix, n = self.pixels(image)
        ids, types, plen = self.sequence(n, question, answer)
        out = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        if self.family.uses_token_types():
            out["mm_token_type_ids"] = torch.tensor([types])
        out.update(self._cast(pix))
        out["prompt_len"] = plen
        return out

    def _cast(self, pixels: dict) -> dict:
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in pixels.items()}

    def encode(self, row):
        """A :class:`token_prune.data.VipRow` (image path, question, answer, boxes) -> ``Encoded``."""
        from PIL import Image

        from ..data import Encoded

        with Image.open(row.image) as im:
            image = im.convert("RGB")
        d = self.single(image, row.question, row.answer)
        plen = d.pop("prompt_len")
        return Encoded(inputs=d, prompt_len=plen, boxes=row.boxes, ref=row.ref)

    def batch(self, samples: list[Sample], with_answer: bool) -> dict:
        """Left-padded batch. With answers also ``answer_mask`` [B, S] (answer tokens incl. EOS)."""
        rows, pixels = [], []
        for s in samples:
            pix, n = self.pixels(s.image)
            ids, types, plen = self.sequence(n, s.question, s.answer if with_answer else None)
            rows.append((ids, types, plen))
            pixels.append(pix)
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
        out = dict(input_ids=input_ids, attention_mask=mask)
        if self.family.uses_token_types():
            out["mm_token_type_ids"] = mm
        out.update(self._cast({k: torch.cat([p[k] for p in pixels]) for k in pixels[0]}))
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
    import transformers

    path = os.fspath(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a directory written by train-small-lvlm")
    with open(cfg_path) as f:
        info = json.load(f)
    preset = Preset.from_dict(info["preset"])
    tokenizer = WordTokenizer.load(path)
    cls = getattr(transformers, adapter_class(preset.model.family).hf_model_class)
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model = model.to(device).eval()
    _generation_ids(model, tokenizer)
    proc = SmallVLMProcessor(tokenizer, model.config, dtype=dtype)
    return model, tokenizer, proc, preset, info
