"""Tiny random-weight models and synthetic inputs of every supported family, built offline from
config objects.

They exercise exactly the code paths of the full-size architectures (window attention in the
Qwen2.5-VL ViT, M-RoPE, GQA, anyres tiling, left padding) at a size that runs on a CPU in
milliseconds. Tests, the demo, ``train-vip --tiny`` and the ``--tiny`` benchmark mode use them;
nothing here touches the network. What a family's model and prompts look like is its adapter's
business (``token_prune/models/``); this module only assembles prompts from those pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import ADAPTERS, DEFAULT_MODEL, adapter_class


@dataclass
class SampleSpec:
    """One synthetic prompt: text before the visual inputs, images (height x width in pixels) and
    videos (frames x height x width), text after.

    ``order`` says in which order the images and videos appear (``"image"`` / ``"video"`` per
    item, e.g. ``("video", "image")``); by default the images come first, then the videos.
    """

    images: tuple[tuple[int, int], ...] = ((64, 64),)
    prefix_len: int = 3
    suffix_len: int = 5
    videos: tuple[tuple[int, int, int], ...] = ()
    order: tuple[str, ...] | None = None

    def items(self) -> list[tuple[str, tuple]]:
        """(kind, size) of each image and video in prompt order."""
        order = self.order or ("image",) * len(self.images) + ("video",) * len(self.videos)
        if sorted(order) != sorted(("image",) * len(self.images) + ("video",) * len(self.videos)):
            raise ValueError(f"order {order} does not list {len(self.images)} images and {len(self.videos)} videos")
        it = {"image": iter(self.images), "video": iter(self.videos)}
        return [(kind, next(it[kind])) for kind in order]


def tiny_config(model_type: str = DEFAULT_MODEL, **overrides):
    """Config of the tiny model of ``model_type`` (see each adapter's ``tiny_config``)."""
    return adapter_class(model_type).tiny_config(**overrides)


def tiny_model(model_type: str = DEFAULT_MODEL, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
               seed: int = 0, device: str | torch.device = "cpu", **config_overrides):
    """A random-weight tiny model of ``model_type`` in eval mode (seeded, offline)."""
    return adapter_class(model_type).tiny_model(attn_implementation=attn_implementation, dtype=dtype, seed=seed,
                                                 device=device, **config_overrides)


def text_pool(config, low: int = 0, high: int | None = None) -> torch.Tensor:
    """[V'] ids usable as plain text: ``low .. high-1`` (default: the whole vocabulary) without the
    family's special ids."""
    special = adapter_class(config.model_type).special_ids(config)
    high = config.text_config.vocab_size if high is None else min(high, config.text_config.vocab_size)
    return torch.tensor([i for i in range(low, high) if i not in special])


def make_inputs(model, samples: list[SampleSpec], seed: int = 0, device=None, pool: torch.Tensor | None = None,
                pixel_device=None) -> dict:
    """Processor-like inputs for ``model`` from sample specs, as the family's processor lays them out.

    Returns ``input_ids`` / ``attention_mask`` [B, S] (left padded), ``mm_token_type_ids`` [B, S]
    where the family takes them (0 text, 1 image, 2 video), and, when any sample has images, the
    family's pixel inputs (``pixel_values`` plus ``image_grid_thw`` or ``image_sizes``) in prompt
    order; when any has videos, its video inputs (``pixel_values_videos``, ``video_grid_thw``).
    Text ids are drawn from ``pool`` (default: every non-special id) with a generator seeded by
    ``seed``; pixels from a second one, on ``pixel_device`` (default CPU).
    """
    cfg = model.config
    family = adapter_class(cfg.model_type)
    pool = text_pool(cfg) if pool is None else pool
    gen = torch.Generator().manual_seed(seed)
    device = device if device is not None else model.device

    def text(n):
        return pool[torch.randint(len(pool), (n,), generator=gen)].tolist()

    rows, types, images, videos = [], [], [], []
    for spec in samples:
        parts = [("text", text(spec.prefix_len))]
        for kind, size in spec.items():
            if kind == "image":
                parts.append(("image", family.image_tokens(cfg, *size)))
                images.append(size)
            else:
                if not family.supports_video:
                    raise ValueError(f"{family.display_name or family.model_type} takes no videos")
                parts.append(("video", family.video_tokens(cfg, *size)))
                videos.append(size)
            if family.image_separator_tokens:
                parts.append(("text", text(family.image_separator_tokens)))
        parts.append(("text", text(spec.suffix_len)))
        ids, tt = family.prompt_tokens(cfg, parts)
        rows.append(ids)
        types.append(tt)

    S = max(len(r) for r in rows)
    pad = cfg.text_config.pad_token_id
    input_ids = torch.full((len(rows), S), pad if pad is not None else 0, dtype=torch.long)
    mm = torch.zeros((len(rows), S), dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, (r, t) in enumerate(zip(rows, types)):
        input_ids[b, S - len(r):] = torch.tensor(r)
        mm[b, S - len(t):] = torch.tensor(t)
        mask[b, S - len(r):] = 1
    out = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    if family.uses_token_types():
        out["mm_token_type_ids"] = mm.to(device)
    if images:
        pix_gen = torch.Generator(device=pixel_device or "cpu").manual_seed(seed + 1)
        out.update(family.random_pixels(cfg, images, pix_gen, device, model.dtype))
    if videos:
        vid_gen = torch.Generator(device=pixel_device or "cpu").manual_seed(seed + 2)
        out.update(family.random_video_pixels(cfg, videos, vid_gen, device, model.dtype))
    return out


def prompt_layout(config, image_hw: tuple[int, int], text_before: int, text_after: int,
                  video_frames: int | None = None) -> dict:
    """Token counts of a one-image prompt as :func:`make_inputs` builds it for ``SampleSpec(
    images=(image_hw,), prefix_len=text_before, suffix_len=text_after)``, from the config alone;
    with ``video_frames``, of a one-video prompt (``videos=((video_frames, *image_hw),)``).

    Returns ``{"text": T, "visual": N, "prompt": T + N}`` plus what the vision tower processes
    (``"vision_patches"`` or ``"tiles"``; a video: over all frames, and ``"frame_groups"``).
    """
    family = adapter_class(config.model_type)
    h, w = image_hw
    if video_frames:
        groups = family.video_tokens(config, video_frames, h, w)
        n = sum(groups)
        parts = [("text", [0] * text_before), ("video", groups)]
        units = {k: v * len(groups) for k, v in family.vision_units(config, h, w).items()}
        units["frame_groups"] = len(groups)
    else:
        n = family.image_tokens(config, h, w)
        parts = [("text", [0] * text_before), ("image", n)]
        units = family.vision_units(config, h, w)
    if family.image_separator_tokens:
        parts.append(("text", [0] * family.image_separator_tokens))
    parts.append(("text", [0] * text_after))
    ids, _ = family.prompt_tokens(config, parts)
    return {"text": len(ids) - n, "visual": n, "prompt": len(ids), **units}


def _image_runs(ids: torch.Tensor, image_token_id: int) -> int:
    """Number of separate runs of image tokens in one row of input ids (= images in the sample)."""
    is_img = (ids == image_token_id).long()
    return int(((is_img[1:] - is_img[:-1]) == 1).sum() + is_img[0])


def select_sample(model, inputs: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch, laid out exactly as if it had been built alone."""
    mask = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b:b + 1, mask] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    family = adapter_class(model.config.model_type)
    if "pixel_values" in inputs:
        tok = model.config.image_token_id
        counts = [_image_runs(row, tok) for row in inputs["input_ids"]]
        if counts[b]:
            out.update(family.pixel_rows(inputs, sum(counts[:b]), counts[b], config=model.config))
    if "pixel_values_videos" in inputs:
        # Videos by their token counts: a video's tokens may come in several runs (one per frame).
        per_row = (inputs["input_ids"] == model.config.video_token_id).sum(1).tolist()
        sizes, first, count, seen = family.video_sizes(model.config, inputs), None, 0, 0
        for i, n in enumerate(sizes):
            row = next(r for r in range(len(per_row)) if sum(per_row[:r + 1]) > seen)
            if row == b:
                first = i if first is None else first
                count += 1
            seen += n
        if count:
            out.update(family.video_rows(inputs, first, count))
    return out


def default_samples(model_type: str = DEFAULT_MODEL) -> list[SampleSpec]:
    """Two prompts of different images and text lengths: the demo's default batch."""
    first, second = adapter_class(model_type).demo_images()
    return [SampleSpec(images=first), SampleSpec(images=second, prefix_len=4, suffix_len=7)]


def supported_tiny_models() -> list[str]:
    """Every family with a tiny model (all registered ones)."""
    return sorted(ADAPTERS)


__all__ = ["SampleSpec", "tiny_config", "tiny_model", "make_inputs", "prompt_layout", "select_sample",
           "default_samples", "text_pool", "supported_tiny_models"]
