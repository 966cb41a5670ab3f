"""Data for training and evaluating a GlimpsePrune VIP.

Rows are JSON lines::

    {"image": "path/to/img.png", "question": "...", "answer": "...",
     "boxes": [[x0, y0, x1, y1], ...]}          # optional, normalised to 0..1

Relative image paths are resolved against the JSONL file's directory. :func:`load_jsonl`
validates every row up front (JSON syntax, keys, types, box ranges, that the image file exists)
and names the offending row as ``file:line``.

A *processor* turns one row into model inputs (one prompt + answer sequence, batch dim 1):

* :class:`HFChatProcessor` wraps a local Hugging Face processor
  (``AutoProcessor.from_pretrained(model_dir)``) and builds the sequence with its chat template.
* :class:`TinyProcessor` serves the tiny random-weight models of :mod:`token_prune.tiny`: images
  resized to the model's token unit, a deterministic word -> id mapping into the tiny vocabulary.

:func:`collate` left-pads encoded rows into a batch; :func:`box_targets` rasterises boxes onto
each image's visual-token layout. :func:`make_synthetic_dataset` writes PNG images plus JSONL
rows for a toy task (a few coloured squares on a flat background), so training can be
exercised offline.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "VipRow",
    "VipDataset",
    "Encoded",
    "load_jsonl",
    "as_dataset",
    "HFChatProcessor",
    "TinyProcessor",
    "collate",
    "prompt_inputs",
    "box_targets",
    "rasterise_boxes",
    "make_synthetic_dataset",
    "SEQUENCE_KEYS",
]

#: Processor outputs that run along the token sequence (left padded by :func:`collate`).
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class VipRow:
    """One validated row. ``ref`` names where it came from (``file:line`` or ``rows[i]``)."""

    image: str
    question: str
    answer: str
    boxes: list[list[float]] | None
    ref: str


class VipDataset(Sequence):
    """A list of :class:`VipRow` (what :func:`load_jsonl` returns)."""

    def __init__(self, rows: list[VipRow], source: str = "<rows>"):
        self.rows = list(rows)
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self) -> str:
        return f"VipDataset({len(self.rows)} rows from {self.source})"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_row(obj: Any, ref: str, base_dir: str, check_files: bool) -> VipRow:
    if not isinstance(obj, dict):
        raise ValueError(f"{ref}: a row must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("image", "question", "answer") if k not in obj]
    if missing:
        raise ValueError(f"{ref}: missing key(s) {missing} (a row needs 'image', 'question', 'answer')")
    unknown = sorted(set(obj) - {"image", "question", "answer", "boxes"})
    if unknown:
        raise ValueError(f"{ref}: unknown key(s) {unknown} (allowed: image, question, answer, boxes)")
    for k in ("image", "question", "answer"):
        if not isinstance(obj[k], str):
            raise ValueError(f"{ref}: '{k}' must be a string, got {type(obj[k]).__name__}")
    if not obj["image"].strip():
        raise ValueError(f"{ref}: 'image' is empty")
    if not obj["answer"].strip():
        raise ValueError(f"{ref}: 'answer' is empty (the answer tokens are what training scores)")
    boxes = obj.get("boxes")
    if boxes is not None:
        if not isinstance(boxes, list):
            raise ValueError(f"{ref}: 'boxes' must be a list of [x0, y0, x1, y1], got {type(boxes).__name__}")
        clean = []
        for j, b in enumerate(boxes):
            if not isinstance(b, list) or len(b) != 4 or not all(_is_number(v) for v in b):
                raise ValueError(f"{ref}: boxes[{j}] must be 4 numbers [x0, y0, x1, y1], got {b!r}")
            x0, y0, x1, y1 = (float(v) for v in b)
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                raise ValueError(
                    f"{ref}: boxes[{j}] = {b!r} must be normalised with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
            clean.append([x0, y0, x1, y1])
        boxes = clean or None  # an empty list: no box supervision for this row
    path = obj["image"]
    if not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    path = os.path.normpath(path)
    if check_files and not os.path.isfile(path):
        raise FileNotFoundError(f"{ref}: image file not found: {path}")
    return VipRow(image=path, question=obj["question"], answer=obj["answer"], boxes=boxes, ref=ref)


def load_jsonl(path: str | os.PathLike, check_files: bool = True) -> VipDataset:
    """Read and validate a JSONL file of rows (see the module docstring).

    Blank lines are skipped. Raises ``FileNotFoundError`` (the file, or a row's image) or
    ``ValueError`` naming the row as ``file:line``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            ref = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{ref}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{ref}: not valid JSON: {e.msg} (column {e.colno})") from None
            rows.append(_validate_row(obj, ref, base, check_files))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return VipDataset(rows, source=path)


def as_dataset(data, check_files: bool = True) -> VipDataset:
    """A :class:`VipDataset` from a JSONL path, a dataset, or a list of row dicts / :class:`VipRow`."""
    if isinstance(data, VipDataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_jsonl(data, check_files=check_files)
    if isinstance(data, (list, tuple)):
        rows = []
        for i, r in enumerate(data):
            rows.append(r if isinstance(r, VipRow) else _validate_row(r, f"rows[{i}]", os.getcwd(), check_files))
        if not rows:
            raise ValueError("the dataset has no rows")
        return VipDataset(rows)
    raise TypeError(f"dataset must be a JSONL path, a VipDataset or a list of rows, got {type(data).__name__}")


def _open_image(row: VipRow):
    from PIL import Image

    if not os.path.isfile(row.image):
        raise FileNotFoundError(f"{row.ref}: image file not found: {row.image}")
    try:
        with Image.open(row.image) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        raise ValueError(f"{row.ref}: cannot read image {row.image}: {e}") from None


# --------------------------------------------------------------------------------------------
# Encoded rows and batches
# --------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One row as model inputs.

    Attributes:
        inputs: processor outputs for the prompt + answer sequence, batch dim 1.
        prompt_len: tokens of the prompt (the answer is ``input_ids[0, prompt_len:]``).
        boxes: the row's boxes, mapped onto what the model sees of the image (or None).
        ref: the row's ``file:line``.
    """

    inputs: dict[str, torch.Tensor]
    prompt_len: int
    boxes: list[list[float]] | None
    ref: str

    @property
    def answer_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"][0, self.prompt_len:]


def prompt_inputs(enc: Encoded) -> dict[str, torch.Tensor]:
    """The prompt-only inputs of an encoded row (what generation starts from)."""
    out = {}
    for k, v in enc.inputs.items():
        out[k] = v[:, :enc.prompt_len] if k in SEQUENCE_KEYS else v
    return out


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def collate(encoded: list[Encoded], pad_token_id: int) -> dict:
    """Left-pad encoded rows into one batch.

    Returns a dict with ``inputs`` (model inputs; sequence keys left padded, image keys
    concatenated along dim 0, LLaVA-NeXT's per-image tile dim zero padded), ``answer_mask``
    [B, S] bool (the answer tokens), ``answer_lens`` [B], ``boxes`` (per row) and ``refs``.
    """
    if not encoded:
        raise ValueError("collate: empty batch")
    S = max(e.inputs["input_ids"].shape[1] for e in encoded)
    B = len(encoded)
    inputs: dict[str, torch.Tensor] = {}
    keys = list(encoded[0].inputs)
    for e in encoded[1:]:
        if list(e.inputs) != keys:
            raise ValueError(f"collate: {e.ref} has inputs {list(e.inputs)}, {encoded[0].ref} has {keys}")
    for k in keys:
        vals = [e.inputs[k] for e in encoded]
        if k in SEQUENCE_KEYS:
            fill = pad_token_id if k == "input_ids" else 0
            out = torch.full((B, S), fill, dtype=vals[0].dtype)
            for b, v in enumerate(vals):
                out[b, S - v.shape[1]:] = v[0]
            inputs[k] = out
        else:
            if vals[0].dim() >= 2 and any(v.shape[1:] != vals[0].shape[1:] for v in vals):
                # LLaVA-NeXT: [n_images, tiles, C, H, W] with a different tile count per image.
                width = max(v.shape[1] for v in vals)
                vals = [_pad_to(v, 1, width) for v in vals]
            inputs[k] = torch.cat(vals, 0)
    if "attention_mask" not in inputs:
        mask = torch.zeros(B, S, dtype=torch.long)
        for b, e in enumerate(encoded):
            mask[b, S - e.inputs["input_ids"].shape[1]:] = 1
        inputs["attention_mask"] = mask
    answer_lens = torch.tensor([e.inputs["input_ids"].shape[1] - e.prompt_len for e in encoded])
    col = torch.arange(S)
    answer_mask = col[None, :] >= (S - answer_lens)[:, None]
    return dict(inputs=inputs, answer_mask=answer_mask, answer_lens=answer_lens,
                boxes=[e.boxes for e in encoded], refs=[e.ref for e in encoded])


# --------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


class HFChatProcessor:
    """Rows -> inputs with a local Hugging Face processor and its chat template.

    The prompt is the user turn (the image, then the question) plus the assistant prefix
    (``add_generation_prompt=True``); the full sequence adds the assistant's answer. The answer
    tokens are the full sequence's tokens after the prompt, cut after the first end-of-turn /
    EOS token. Boxes are mapped through a center crop or pad-to-square the image processor
    applies (CLIP-style processors), so they stay aligned with the token grid.

    Args:
        processor: an HF processor (``AutoProcessor.from_pretrained(model_dir)``), or a path.
        model: the model (its ``generation_config`` names extra EOS ids), optional.
        system_prompt: optional system message.
    """

    def __init__(self, processor, model=None, system_prompt: str | None = None):
        if isinstance(processor, (str, os.PathLike)):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(os.fspath(processor))
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.system_prompt = system_prompt
        self.eos_ids = _eos_ids(model, self.tokenizer)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None) or 0
        self.pad_token_id = int(pad)

    def _messages(self, row: VipRow, with_answer: bool):
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row.question}]})
        if with_answer:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": row.answer}]})
        return msgs

    def encode(self, row: VipRow) -> Encoded:
        image = _open_image(row)
        proc = self.processor
        try:
            prompt_text = proc.apply_chat_template(self._messages(row, False), add_generation_prompt=True,
                                                   tokenize=False)
            full_text = proc.apply_chat_template(self._messages(row, True), tokenize=False)
        except Exception as e:
            raise ValueError(f"{row.ref}: the processor's chat template failed: {e}") from None
        if not full_text.startswith(prompt_text):
            # A template that rewrites earlier turns when an answer follows: append the answer.
            eos = getattr(self.tokenizer, "eos_token", None) or ""
            full_text = prompt_text + row.answer + eos
        full = proc(text=[full_text], images=[image], return_tensors="pt")
        prompt = proc(text=[prompt_text], images=[image], return_tensors="pt")
        ids, pids = full["input_ids"], prompt["input_ids"]
        P = pids.shape[1]
        if ids.shape[1] <= P or not torch.equal(ids[0, :P], pids[0]):
            raise ValueError(f"{row.ref}: the tokenised prompt is not a prefix of the tokenised prompt + answer; "
                             "cannot tell the answer tokens apart")
        end = ids.shape[1]
        for j in range(P, ids.shape[1]):
            if int(ids[0, j]) in self.eos_ids:
                end = j + 1
                break
        inputs = {}
        for k, v in full.items():
            if not isinstance(v, torch.Tensor):
                continue
            inputs[k] = v[:, :end] if k in SEQUENCE_KEYS else v
        boxes = _map_boxes(row.boxes, image.size, getattr(proc, "image_processor", None))
        return Encoded(inputs=inputs, prompt_len=P, boxes=boxes, ref=row.ref)


def _map_boxes(boxes, size_wh, image_processor):
    """Map normalised boxes on the original image onto the processed image: CLIP-style
    resize-shortest-edge + center crop, or LLaVA-1.5's pad-to-square. Boxes that fall outside
    the crop are dropped (None when none remain)."""
    if not boxes or image_processor is None:
        return boxes
    w, h = size_wh
    name = type(image_processor).__name__
    if name.startswith("LlavaImageProcessor") and getattr(image_processor, "do_pad", False):
        side = max(w, h)
        ox, oy = (side - w) / 2, (side - h) / 2
        return [[(x0 * w + ox) / side, (y0 * h + oy) / side, (x1 * w + ox) / side, (y1 * h + oy) / side]
                for x0, y0, x1, y1 in boxes]
    crop = getattr(image_processor, "crop_size", None)
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_center_crop", False) and crop and size and "shortest_edge" in size:
        crop = dict(crop)
        s = size["shortest_edge"]
        scale = s / min(w, h)
        rw, rh = w * scale, h * scale
        cw, ch = crop.get("width", s), crop.get("height", s)
        left, top = (rw - cw) / 2, (rh - ch) / 2
        out = []
        for x0, y0, x1, y1 in boxes:
            nx0 = min(max((x0 * rw - left) / cw, 0.0), 1.0)
            nx1 = min(max((x1 * rw - left) / cw, 0.0), 1.0)
            ny0 = min(max((y0 * rh - top) / ch, 0.0), 1.0)
            ny1 = min(max((y1 * rh - top) / ch, 0.0), 1.0)
            if nx1 > nx0 and ny1 > ny0:
                out.append([nx0, ny0, nx1, ny1])
        return out or None
    return boxes


_WORD = re.compile(r"\w+|[^\w\s]")


class TinyProcessor:
    """Rows -> inputs for models built from a config with no tokenizer or image processor: the tiny
    models of :mod:`token_prune.tiny`, or a full-size architecture with random weights (the
    training benchmark). Any supported family; offline.

    * Text: words (``\\w+`` or single punctuation) map to ids of the vocabulary (below 32000,
      special ids excluded) by a CRC32 hash, so the mapping is deterministic across runs and
      machines. The answer ends with the EOS id.
    * The image and its place in the prompt (before the question) are encoded as the family's
      processor does it (the adapter's ``encode_image`` and ``prompt_tokens``; e.g. Qwen2.5-VL
      resizes to a multiple of its merged-token unit with the longer side at most ``max_side``,
      LLaVA-NeXT cuts anyres tiles). Pixels are scaled to [-1, 1].
    """

    def __init__(self, model, max_side: int = 128):
        from .models import adapter_class

        self.config = model.config
        self.dtype = model.dtype
        self.family = adapter_class(self.config.model_type)
        self.max_side = max_side
        tc = self.config.text_config
        gen = getattr(model, "generation_config", None)

        def first(*values, default=None):
            for v in values:
                if isinstance(v, (list, tuple)):
                    v = v[0] if v else None
                if v is not None:
                    return int(v)
            return default

        self.eos_id = first(tc.eos_token_id, getattr(gen, "eos_token_id", None), default=2)
        self.pad_token_id = first(tc.pad_token_id, getattr(gen, "pad_token_id", None), default=0)
        special = self.family.special_ids(self.config) | {self.eos_id, self.pad_token_id}
        self.text_ids = [i for i in range(min(tc.vocab_size, 32000)) if i not in special]

    def word_ids(self, text: str) -> list[int]:
        return [self.text_ids[zlib.crc32(w.lower().encode()) % len(self.text_ids)] for w in _WORD.findall(text)]

    def encode(self, row: VipRow) -> Encoded:
        image = _open_image(row)
        q, a = self.word_ids(row.question), self.word_ids(row.answer) + [self.eos_id]
        pixels, n_img = self.family.encode_image(self.config, image, self.max_side)
        prompt, types = self.family.prompt_tokens(self.config, [("image", n_img), ("text", q)])
        ids = prompt + a
        inputs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        if self.family.uses_token_types():
            inputs["mm_token_type_ids"] = torch.tensor([types + [0] * len(a)])
        inputs.update({k: v.to(self.dtype) if v.is_floating_point() else v for k, v in pixels.items()})
        return Encoded(inputs=inputs, prompt_len=len(prompt), boxes=row.boxes, ref=row.ref)


# --------------------------------------------------------------------------------------------
# Box targets
# --------------------------------------------------------------------------------------------


def rasterise_boxes(boxes: Iterable[Sequence[float]], rows: int, cols: int) -> torch.Tensor:
    """[rows * cols] bool, row-major: True for grid cells that overlap any box with positive area.

    Cell (r, c) covers ``[c/cols, (c+1)/cols] x [r/rows, (r+1)/rows]`` of the image; a box
    always marks at least the cell holding its centre.
    """
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        c0 = min(cols - 1, max(0, math.floor(x0 * cols)))
        r0 = min(rows - 1, max(0, math.floor(y0 * rows)))
        c1 = max(c0 + 1, min(cols, math.ceil(x1 * cols)))
        r1 = max(r0 + 1, min(rows, math.ceil(y1 * rows)))
        mask[r0:r1, c0:c1] = True
    return mask.flatten()


def box_targets(layout, boxes_per_image: list, newline_column: bool = False) -> list[torch.Tensor | None]:
    """Per image, the [n_tokens] float 0/1 target of its visual tokens (None: no boxes).

    Args:
        layout: the adapter's vision layout: a grid tensor [n_images, 2] (rows, cols), or
            ``(positions [N, 2], lengths)`` (LLaVA-NeXT: per image a base grid, then the
            unpadded high-res grid whose last column is the row-newline token).
        boxes_per_image: normalised boxes of each image, or None.
        newline_column: the last column of every grid after an image's first is a row-newline
            token (LLaVA-NeXT's high-res grid), which carries no image content: background.
    """
    out: list[torch.Tensor | None] = []
    if isinstance(layout, torch.Tensor):
        grids = layout.tolist()
        if len(grids) != len(boxes_per_image):
            raise ValueError(f"box_targets: {len(grids)} images in the layout, {len(boxes_per_image)} box lists")
        for (r, c), boxes in zip(grids, boxes_per_image):
            out.append(None if not boxes else rasterise_boxes(boxes, int(r), int(c)).float())
        return out
    positions, lengths = layout
    if len(lengths) != len(boxes_per_image):
        raise ValueError(f"box_targets: {len(lengths)} images in the layout, {len(boxes_per_image)} box lists")
    start = 0
    for n, boxes in zip(lengths, boxes_per_image):
        pos = positions[start:start + n].cpu()
        start += n
        if not boxes:
            out.append(None)
            continue
        # Each grid of the image restarts at (0, 0).
        starts = [i for i in range(n) if int(pos[i, 0]) == 0 and int(pos[i, 1]) == 0] + [n]
        target = torch.zeros(n)
        for s, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            seg = pos[a:b]
            rows = int(seg[:, 0].max()) + 1
            cols = int(seg[:, 1].max()) + 1
            if newline_column and s > 0:
                cols -= 1  # the newline column carries no image content
            cells = rasterise_boxes(boxes, rows, max(cols, 1)).view(rows, max(cols, 1))
            r, c = seg[:, 0], seg[:, 1]
            inside = c < cols
            vals = torch.zeros(b - a)
            vals[inside] = cells[r[inside], c[inside]].float()
            target[a:b] = vals
        out.append(target)
    return out


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------

_COLORS = {
    "red": (230, 25, 25), "green": (25, 200, 40), "blue": (30, 60, 235), "yellow": (240, 220, 20),
    "magenta": (220, 30, 210), "cyan": (20, 215, 225), "white": (250, 250, 250), "black": (5, 5, 5),
}


def make_synthetic_dataset(directory: str | os.PathLike, n: int, *, seed: int = 0,
                           sizes: Sequence[tuple[int, int]] = ((64, 64), (64, 96), (96, 64), (96, 96)),
                           squares: tuple[int, int] = (1, 2), unit: int = 16, noise: float = 3.0,
                           name: str = "data.jsonl") -> str:
    """Write ``n`` PNG images and a JSONL file of rows for a toy task; returns the JSONL path.

    Each image is a flat grey background with faint noise and 1-2 saturated coloured squares of
    ``unit`` px, aligned to a ``unit``-px grid (16 px = one merged token of the tiny Qwen2.5-VL),
    so a few visual tokens carry all the content. The question asks for the squares' colours;
    the answer names them; ``boxes`` are the squares. Deterministic in ``seed``.
    """
    from PIL import Image

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    names = sorted(_COLORS)
    questions = ["what color is the square ?", "which colors do you see ?", "name the color of the box .",
                 "what is shown in the picture ?"]
    lines = []
    for i in range(n):
        h, w = sizes[int(torch.randint(len(sizes), (1,), generator=gen))]
        bg = 110 + int(torch.randint(0, 36, (1,), generator=gen))
        px = torch.full((h, w, 3), float(bg)) + torch.randn(h, w, 3, generator=gen) * noise
        k = int(torch.randint(squares[0], squares[1] + 1, (1,), generator=gen))
        cells = torch.randperm((h // unit) * (w // unit), generator=gen)[:k].tolist()
        boxes, colors = [], []
        for cell in cells:
            r, c = divmod(cell, w // unit)
            color = names[int(torch.randint(len(names), (1,), generator=gen))]
            px[r * unit:(r + 1) * unit, c * unit:(c + 1) * unit] = torch.tensor(_COLORS[color], dtype=torch.float)
            boxes.append([c * unit / w, r * unit / h, (c + 1) * unit / w, (r + 1) * unit / h])
            colors.append(color)
        img = Image.fromarray(px.clamp(0, 255).round().to(torch.uint8).numpy())
        fname = f"img_{i:05d}.png"
        img.save(os.path.join(directory, fname))
        q = questions[int(torch.randint(len(questions), (1,), generator=gen))]
        answer = " and ".join(colors) + (" squares" if k > 1 else " square")
        lines.append(json.dumps({"image": fname, "question": q, "answer": answer, "boxes": boxes}))
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
