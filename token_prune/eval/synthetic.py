"""A synthetic grounded visual-QA task: every answer depends on a small region of the image.

Each image is a flat, slightly noisy background with a few objects: filled shapes of distinct
colours, each carrying a rendered letter, and sometimes a white sign with a short word (PIL's
default font). Questions pick one object by an attribute and ask for another attribute of it,
so the model has to find a small region and read it:

==========  ===========================================  ===============  ========================
task        question                                     answer           boxes (answer region)
==========  ===========================================  ===============  ========================
color       what color is the star                       a colour         the star
shape       what shape is colored red                    a shape          the red object
letter      what letter is in the red circle             a letter         that circle
left_of     what color is left of the star               a colour         the object, then the star
count       how many triangles                           a digit          every triangle
word        what word is on the sign                     a word           the sign
==========  ===========================================  ===============  ========================

Answers are one word (one token of :class:`WordTokenizer`). ``box`` is the answer's box and
``boxes`` every region the question needs, both normalised ``[x0, y0, x1, y1]``.

Everything is a pure function of ``(config, seed, split, index)``: :func:`make_sample` draws from
its own ``random.Random``, so any sample can be regenerated alone, in any order, on any machine
(pixels can differ slightly between Pillow versions, whose default font changed over time).

:class:`WordTokenizer` is a word-level vocabulary built from a config (every word a question or
answer can contain plus the Qwen2.5-VL special tokens), saved and loaded as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Sequence

__all__ = [
    "TaskConfig",
    "Sample",
    "COLORS",
    "SHAPES",
    "TASKS",
    "make_sample",
    "make_samples",
    "draw_shape",
    "WordTokenizer",
    "write_jsonl",
]

#: Saturated RGB colours, far from the grey background and from each other.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 200),
    "orange": (250, 130, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 190),
    "brown": (130, 80, 30),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
TASKS = ("color", "shape", "letter", "left_of", "count", "word")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SIGN_WORDS = ("cat", "dog", "sun", "map", "box", "car", "pen", "cup", "hat", "key", "bus", "egg", "fox", "jam",
              "owl", "pig", "zoo", "web", "toy", "ink", "art", "bed", "fig", "gum")

#: Question templates; ``{shape}`` / ``{color}`` / ``{plural}`` are filled in. Each ends with the
#: word that picks the region (no trailing "?"), so the last prompt token, which predicts the
#: answer, holds the query itself: a small model learns the lookup in far fewer steps.
QUESTIONS = {
    "color": ("what color is the {shape}",),
    "shape": ("what shape is colored {color}",),
    "letter": ("what letter is in the {color} {shape}",),
    "left_of": ("what color is left of the {shape}",),
    "count": ("how many {plural}",),
    "word": ("what word is on the sign",),
}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("x", "s")) else "s")


@dataclass(frozen=True)
class TaskConfig:
    """What the generator draws. Sizes are pixels.

    Attributes:
        image_sizes: (min, max) side lengths; each side is drawn independently in that range
            and rounded down to a multiple of ``unit`` (the model's token size in pixels).
        unit: pixel multiple of the image sides (patch size x spatial merge of the model).
        object_size: (min, max) object side.
        objects: (min, max) objects per image.
        tasks: question types and their sampling weights.
        colors / shapes / letters / words: the vocabularies drawn from (the first n of
            :data:`COLORS`, :data:`SHAPES`, ...).
        letter_scale: rendered letter height relative to the object side.
        sign_height: sign height relative to ``object_size[1]``.
        max_count: largest answer of a ``count`` question.
        noise: std of the per-pixel background noise (0-255 scale).
    """

    image_sizes: tuple[int, int] = (448, 896)
    unit: int = 28
    object_size: tuple[int, int] = (36, 56)
    objects: tuple[int, int] = (4, 7)
    tasks: tuple[tuple[str, float], ...] = (("color", 1.0), ("shape", 1.0), ("letter", 1.0), ("left_of", 1.0),
                                            ("count", 1.0), ("word", 1.0))
    colors: int = 8
    shapes: int = 7
    letters: int = 26
    words: int = 16
    letter_scale: float = 0.6
    sign_height: float = 0.7
    max_count: int = 4
    noise: float = 4.0
    #: snap every object into one ``unit`` x ``unit`` cell of the token grid (then
    #: ``object_size`` must not exceed ``unit``): one object = one visual token
    align: bool = False

    def __post_init__(self):
        lo, hi = self.image_sizes
        if not (self.unit >= 1 and self.unit <= lo <= hi):
            raise ValueError(f"image_sizes {self.image_sizes} must satisfy unit ({self.unit}) <= min <= max")
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects {self.objects} must satisfy 1 <= min <= max")
        if self.objects[1] > min(self.colors, self.shapes):
            raise ValueError(f"objects max {self.objects[1]} exceeds the distinct colours ({self.colors}) / "
                             f"shapes ({self.shapes}) an image needs")
        if not 2 <= self.colors <= len(COLORS) or not 2 <= self.shapes <= len(SHAPES):
            raise ValueError(f"colors must be in [2, {len(COLORS)}], shapes in [2, {len(SHAPES)}]")
        if not 1 <= self.letters <= 26 or not 1 <= self.words <= len(SIGN_WORDS):
            raise ValueError(f"letters must be in [1, 26], words in [1, {len(SIGN_WORDS)}]")
        names = [t for t, _ in self.tasks]
        unknown = sorted(set(names) - set(TASKS))
        if unknown or not names or any(w <= 0 for _, w in self.tasks):
            raise ValueError(f"tasks must be (name, weight > 0) pairs with names from {TASKS}; got {self.tasks}")
        if self.align and self.object_size[1] > self.unit:
            raise ValueError(f"align=True needs object_size max ({self.object_size[1]}) <= unit ({self.unit})")
        if "count" in names and not 2 <= self.max_count <= self.objects[1]:
            raise ValueError(f"max_count must be in [2, objects max = {self.objects[1]}]")

    # The vocabularies in use
    @property
    def color_names(self) -> list[str]:
        return list(COLORS)[: self.colors]

    @property
    def shape_names(self) -> list[str]:
        return list(SHAPES)[: self.shapes]

    @property
    def letter_set(self) -> list[str]:
        return list(LETTERS[: self.letters])

    @property
    def word_set(self) -> list[str]:
        return list(SIGN_WORDS[: self.words])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = [list(t) for t in self.tasks]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TaskConfig":
        d = dict(d)
        for k in ("image_sizes", "object_size", "objects"):
            if k in d:
                d[k] = tuple(d[k])
        if "tasks" in d:
            d["tasks"] = tuple((str(n), float(w)) for n, w in d["tasks"])
        return cls(**d)

    def vocabulary(self) -> list[str]:
        """Every word a question or an answer of this config can contain, sorted."""
        words = set()
        for name, _ in self.tasks:
            for t in QUESTIONS[name]:
                words.update(_WORD.findall(re.sub(r"\{\w+\}", " ", t)))
        words.update(self.color_names)
        words.update(self.shape_names)
        words.update(_plural(s) for s in self.shape_names)
        words.update(self.letter_set)
        words.update(self.word_set)
        words.update(str(i) for i in range(self.max_count + 1))
        return sorted(words)


@dataclass
class Sample:
    """One generated example.

    Attributes:
        image: PIL RGB image.
        question, answer: lower-case text; the answer is one word.
        box: the answer's region, normalised ``[x0, y0, x1, y1]``.
        boxes: every region the question needs (the answer's first).
        task: the question type.
        index: the sample's index in its split.
        objects: what was drawn (for tests and pictures): dicts with ``shape``, ``color``,
            ``letter``, ``box`` (pixels) and, for the sign, ``word``.
    """

    image: object
    question: str
    answer: str
    box: list[float]
    boxes: list[list[float]]
    task: str
    index: int
    objects: list[dict] = field(default_factory=list)


_WORD = re.compile(r"\w+|[^\w\s]")
_SPLITS = {"train": 0, "val": 1, "test": 2}


def _rng(seed: int, split: str, index: int) -> random.Random:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    key = f"token_prune.synthetic:{int(seed)}:{split}:{int(index)}".encode()
    return random.Random(zlib.crc32(key) * 1_000_003 + _SPLITS[split] * 7919 + int(index))


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(6, int(px)))
    except TypeError:  # very old Pillow: only the fixed bitmap font
        return ImageFont.load_default()


def _shape_points(shape: str, x0: float, y0: float, s: float) -> list[tuple[float, float]] | None:
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    if shape == "triangle":
        return [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if shape == "diamond":
        return [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a) + r * 0.08))
        return pts
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "cross":
        t = s / 6
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x0 + s, cy - t), (x0 + s, cy + t), (cx + t, cy + t),
                (cx + t, y0 + s), (cx - t, y0 + s), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    return None


def draw_shape(draw, shape: str, box: Sequence[float], color: tuple[int, int, int]) -> None:
    """Draw a filled ``shape`` into the square ``box`` = (x0, y0, x1, y1) pixels."""
    x0, y0, x1, y1 = box
    s = x1 - x0
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    else:
        pts = _shape_points(shape, x0, y0, s)
        if pts is None:
            raise ValueError(f"unknown shape {shape!r}")
        draw.polygon(pts, fill=color)


def _text_color(rgb) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def _draw_text(draw, text: str, cx: float, cy: float, px: int, fill) -> None:
    font = _font(px)
    draw.text((cx, cy), text, fill=fill, font=font, anchor="mm")


def _overlaps(a, b, gap) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place(rng, W, H, w, h, taken, gap, tries=200, region=None, unit=None):
    """A free (x0, y0, x1, y1) of size w x h not overlapping ``taken``; None when none was found.
    With ``unit`` the box is centred in one cell of the ``unit``-pixel grid."""
    if unit is not None:
        lo_x, lo_y, hi_x, hi_y = region if region is not None else (0, 0, W, H)
        cells = [(r, c) for r in range(H // unit) for c in range(W // unit)
                 if c * unit >= lo_x and (c + 1) * unit <= hi_x and r * unit >= lo_y and (r + 1) * unit <= hi_y]
        rng.shuffle(cells)
        for r, c in cells:
            x0, y0 = c * unit + (unit - w) // 2, r * unit + (unit - h) // 2
            box = (x0, y0, x0 + w, y0 + h)
            if not any(_overlaps(box, t, 0) for t in taken):
                return box
        return None
    lo_x, lo_y, hi_x, hi_y = region if region is not None else (0, 0, W, H)
    lo_x, lo_y = max(1, lo_x), max(1, lo_y)
    hi_x, hi_y = min(W - 1, hi_x), min(H - 1, hi_y)
    if hi_x - lo_x < w or hi_y - lo_y < h:
        return None
    for _ in range(tries):
        x0 = rng.randint(int(lo_x), int(hi_x - w))
        y0 = rng.randint(int(lo_y), int(hi_y - h))
        box = (x0, y0, x0 + w, y0 + h)
        if not any(_overlaps(box, t, gap) for t in taken):
            return box
    return None


def _pick_task(cfg: TaskConfig, rng: random.Random) -> str:
    names = [t for t, _ in cfg.tasks]
    weights = [w for _, w in cfg.tasks]
    return rng.choices(names, weights=weights, k=1)[0]


def make_sample(cfg: TaskConfig, seed: int, index: int, split: str = "train", task: str | None = None) -> Sample:
    """Sample ``index`` of ``split`` (a pure function of its arguments; ``task`` forces a question type)."""
    for _ in range(50):
        rng = _rng(seed, split, index)
        if _ > 0:  # placement failed: redraw from a derived stream (still deterministic)
            rng = random.Random(rng.random() + _)
        s = _try_sample(cfg, rng, index, task)
        if s is not None:
            return s
    raise RuntimeError(f"could not place the objects of sample {index}: image_sizes {cfg.image_sizes} is too "
                       f"small for objects {cfg.objects} of size {cfg.object_size}")


def _try_sample(cfg: TaskConfig, rng: random.Random, index: int, task: str | None) -> Sample | None:
    from PIL import Image, ImageDraw

    task = task or _pick_task(cfg, rng)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    lo, hi = cfg.image_sizes
    W = max(cfg.unit, rng.randint(lo, hi) // cfg.unit * cfg.unit)
    H = max(cfg.unit, rng.randint(lo, hi) // cfg.unit * cfg.unit)
    bg = rng.randint(105, 150)
    if cfg.noise > 0:
        import numpy as np

        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, cfg.noise, (H, W, 1))
        px = np.clip(np.rint(bg + noise), 0, 255).astype(np.uint8).repeat(3, axis=2)
        img = Image.fromarray(px, "RGB")
    else:
        img = Image.new("RGB", (W, H), (bg, bg, bg))
    draw = ImageDraw.Draw(img)

    colors = cfg.color_names
    shapes = cfg.shape_names
    n = rng.randint(*cfg.objects)
    if task == "left_of":
        n = max(n, 2)  # a reference and its left neighbour, also in a curriculum's one-object images
    smin, smax = cfg.object_size
    gap = max(2, smin // 6)
    taken: list[tuple] = []
    objects: list[dict] = []

    def new_object(shape, color, region=None, size=None):
        s = size or rng.randint(smin, smax)
        box = _place(rng, W, H, s, s, taken, gap, region=region, unit=cfg.unit if cfg.align else None)
        if box is None:
            return None
        taken.append(box)
        obj = dict(shape=shape, color=color, box=list(box), letter=rng.choice(cfg.letter_set))
        objects.append(obj)
        return obj

    # Which (shape, colour) pairs the image gets: distinct shapes and distinct colours, except
    # for a count question, whose shape repeats.
    color_pool = rng.sample(colors, len(colors))
    shape_pool = rng.sample(shapes, len(shapes))
    extra: dict = {}
    if task == "count":
        target_shape = shape_pool.pop()
        k = rng.randint(1, min(cfg.max_count, n))
        specs = [(target_shape, color_pool.pop()) for _ in range(k)]
        specs += [(shape_pool.pop(), color_pool.pop()) for _ in range(n - k)]
        extra.update(shape=target_shape, k=k)
    else:
        specs = [(shape_pool.pop(), color_pool.pop()) for _ in range(n)]

    if task == "left_of":
        # The reference goes right of centre; its left neighbour sits just beside it on the same
        # row; no other object may be left of the reference on that row band.
        (rs, rc), (ts, tc) = specs[0], specs[1]
        size_r = rng.randint(smin, smax)
        ref = new_object(rs, rc, region=(W * 0.35, 0, W, H), size=size_r)
        if ref is None:
            return None
        size_t = rng.randint(smin, smax)
        rx0, ry0, rx1, ry1 = ref["box"]
        cy = (ry0 + ry1) / 2
        if cfg.align:  # the cell just left of the reference's cell
            u = cfg.unit
            x0 = (rx0 // u - 1) * u + (u - size_t) // 2
            y0 = (ry0 // u) * u + (u - size_t) // 2
            tbox = (x0, y0, x0 + size_t, y0 + size_t)
        else:
            x1 = rx0 - gap - rng.randint(0, max(1, smin // 3))
            y0 = int(cy - size_t / 2 + rng.randint(-smin // 6, smin // 6))
            tbox = (x1 - size_t, y0, x1, y0 + size_t)
        if tbox[0] < 1 or tbox[1] < 1 or tbox[3] > H - 1 or any(_overlaps(tbox, t, gap) for t in taken[:-1]):
            return None
        taken.append(tbox)
        tgt = dict(shape=ts, color=tc, box=list(tbox), letter=rng.choice(cfg.letter_set))
        objects.append(tgt)
        band = (ry0 - smax, ry1 + smax)
        for sh, co in specs[2:]:
            placed = None
            for _ in range(30):
                cand = new_object(sh, co)
                if cand is None:
                    return None
                b = cand["box"]
                in_band = b[3] > band[0] and b[1] < band[1]
                if in_band and (b[0] + b[2]) / 2 < (rx0 + rx1) / 2:
                    taken.pop()
                    objects.pop()
                    continue
                placed = cand
                break
            if placed is None:
                return None
        extra.update(ref=ref, target=tgt)
    else:
        for sh, co in specs:
            if new_object(sh, co) is None:
                return None

    sign = None
    if task == "word":
        word = rng.choice(cfg.word_set)
        sh = max(8, int(smax * cfg.sign_height))
        font_px = max(6, int(sh * 0.75))
        sw = max(sh, int(len(word) * font_px * 0.62 + sh * 0.5))
        if cfg.align:  # whole cells, one pixel of margin
            u = cfg.unit
            cells_w = -(-(sw + 2) // u)
            box = None
            for _ in range(200):
                c, r = rng.randrange(0, W // u - cells_w + 1), rng.randrange(0, H // u)
                b = (c * u + 1, r * u + 1, (c + cells_w) * u - 1, (r + 1) * u - 1)
                if not any(_overlaps(b, t, 0) for t in taken):
                    box = b
                    break
        else:
            box = _place(rng, W, H, sw, sh, taken, gap)
        if box is None:
            return None
        taken.append(box)
        sign = dict(shape="sign", color="white", box=list(box), word=word, font_px=font_px)

    for obj in objects:
        draw_shape(draw, obj["shape"], obj["box"], COLORS[obj["color"]])
        x0, y0, x1, y1 = obj["box"]
        s = x1 - x0
        cy = (y0 + y1) / 2 + (s * 0.12 if obj["shape"] == "triangle" else 0)
        _draw_text(draw, obj["letter"], (x0 + x1) / 2, cy, int(s * cfg.letter_scale * (0.8 if obj["shape"] in (
            "triangle", "star", "cross", "diamond") else 1.0)), _text_color(COLORS[obj["color"]]))
    if sign is not None:
        x0, y0, x1, y1 = sign["box"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(250, 250, 250), outline=(20, 20, 20))
        _draw_text(draw, sign["word"], (x0 + x1) / 2, (y0 + y1) / 2, sign["font_px"], (0, 0, 0))
        objects.append(sign)

    def norm(b):
        return [round(b[0] / W, 6), round(b[1] / H, 6), round(b[2] / W, 6), round(b[3] / H, 6)]

    q_tmpl = rng.choice(QUESTIONS[task])
    if task == "color":
        o = rng.choice(objects[:n])
        question, answer, boxes = q_tmpl.format(shape=o["shape"]), o["color"], [o["box"]]
    elif task == "shape":
        o = rng.choice(objects[:n])
        question, answer, boxes = q_tmpl.format(color=o["color"]), o["shape"], [o["box"]]
    elif task == "letter":
        o = rng.choice(objects[:n])
        question, answer, boxes = q_tmpl.format(color=o["color"], shape=o["shape"]), o["letter"], [o["box"]]
    elif task == "left_of":
        ref, tgt = extra["ref"], extra["target"]
        question, answer, boxes = q_tmpl.format(shape=ref["shape"]), tgt["color"], [tgt["box"], ref["box"]]
    elif task == "count":
        sh = extra["shape"]
        hits = [o for o in objects if o["shape"] == sh]
        question, answer, boxes = q_tmpl.format(plural=_plural(sh)), str(len(hits)), [o["box"] for o in hits]
    else:  # word
        question, answer, boxes = q_tmpl, sign["word"], [sign["box"]]
    nb = [norm(b) for b in boxes]
    return Sample(image=img, question=question, answer=answer, box=nb[0], boxes=nb, task=task, index=index,
                  objects=objects)


def make_samples(cfg: TaskConfig, seed: int, n: int, split: str = "train", start: int = 0) -> list[Sample]:
    """Samples ``start .. start + n - 1`` of ``split``."""
    return [make_sample(cfg, seed, i, split) for i in range(start, start + n)]


def write_jsonl(samples: Sequence[Sample], directory: str | os.PathLike, name: str = "data.jsonl") -> str:
    """Write the samples as PNG files plus a JSONL file in the row format of :mod:`token_prune.data`
    (``image``, ``question``, ``answer``, ``boxes``); returns the JSONL path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    lines = []
    for s in samples:
        fname = f"{s.task}_{s.index:06d}.png"
        s.image.save(os.path.join(directory, fname))
        lines.append(json.dumps({"image": fname, "question": s.question, "answer": s.answer, "boxes": s.boxes}))
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Word-level tokenizer
# --------------------------------------------------------------------------------------------

#: Special tokens at fixed ids (the layout the small Qwen2.5-VL config uses).
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<vision_start>", "<vision_end>", "<image>", "<video>", "<unk>")


class WordTokenizer:
    """Word-level tokenizer: lower-cased ``\\w+`` words and single punctuation marks, one id each.

    Ids 0..7 are the special tokens of :data:`SPECIAL_TOKENS`; words follow in sorted order.
    ``decode(encode(text)) == normalize(text)`` for any text made of known words.
    """

    FORMAT = "token_prune.word_tokenizer"

    def __init__(self, words: Sequence[str]):
        words = [w for w in dict.fromkeys(words) if w not in SPECIAL_TOKENS]
        for w in words:
            if _WORD.fullmatch(w) is None or w != w.lower():
                raise ValueError(f"vocabulary entry {w!r} is not one lower-case word or punctuation mark")
        self.tokens = list(SPECIAL_TOKENS) + list(words)
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def for_config(cls, cfg: TaskConfig) -> "WordTokenizer":
        return cls(cfg.vocabulary())

    pad_token_id = property(lambda self: self.ids["<pad>"])
    bos_token_id = property(lambda self: self.ids["<bos>"])
    eos_token_id = property(lambda self: self.ids["<eos>"])
    unk_token_id = property(lambda self: self.ids["<unk>"])
    vision_start_token_id = property(lambda self: self.ids["<vision_start>"])
    vision_end_token_id = property(lambda self: self.ids["<vision_end>"])
    image_token_id = property(lambda self: self.ids["<image>"])
    video_token_id = property(lambda self: self.ids["<video>"])

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def normalize(text: str) -> str:
        return " ".join(_WORD.findall(text.lower()))

    def encode(self, text: str, strict: bool = False) -> list[int]:
        out = []
        for w in _WORD.findall(text.lower()):
            i = self.ids.get(w)
            if i is None:
                if strict:
                    raise ValueError(f"word {w!r} is not in the vocabulary")
                i = self.unk_token_id
            out.append(i)
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id and skip_special:
                break
            if not 0 <= i < len(self.tokens):
                words.append("<unk>")
                continue
            t = self.tokens[i]
            if skip_special and t in SPECIAL_TOKENS:
                continue
            words.append(t)
        return " ".join(words)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (a ``.json`` file, or a directory that gets ``tokenizer.json``)."""
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"format": self.FORMAT, "version": 1, "tokens": self.tokens}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != cls.FORMAT:
            raise ValueError(f"{path} is not a {cls.FORMAT} file")
        tokens = data["tokens"]
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: the special tokens must come first, in order {SPECIAL_TOKENS}")
        return cls(tokens[len(SPECIAL_TOKENS):])
