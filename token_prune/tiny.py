"""Tiny random-weight models and synthetic inputs, built offline from config objects.

They exercise exactly the code paths of the full-size architectures (window attention in the
Qwen2.5-VL ViT, M-RoPE, GQA, left padding) at a size that runs on a CPU in milliseconds. Tests,
the demo and the ``--tiny`` benchmark mode use them; nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hf

# Token ids of the tiny Qwen2.5-VL vocabulary. Real checkpoints use 151643.. for these; the tiny
# vocabulary keeps them small so the embedding table stays tiny too.
QWEN_TINY_IDS = dict(
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    vision_start_token_id=3,
    vision_end_token_id=4,
    image_token_id=5,
    video_token_id=6,
)


def tiny_qwen2_5_vl_config(
    num_hidden_layers: int = 6,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_depth: int = 4,
    vocab_size: int = 128,
):
    """Config of a tiny Qwen2.5-VL: 6 decoder layers, 4 ViT blocks, 8x8-pixel patches.

    The ViT keeps the real structure (2x2 patch merging, window attention with full-attention
    blocks in between); ``window_size`` is chosen so an image of more than 4x4 merged tokens
    spans several windows.
    """
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // num_attention_heads
    # mrope_section splits head_dim/2 rotary frequencies between the t, h, w axes.
    half = head_dim // 2
    t_sec = half - 2 * (half * 3 // 8)
    mrope_section = [t_sec, half * 3 // 8, half * 3 // 8]
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # Larger than the real 0.02 so a random tiny model has peaked, tie-free logits.
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        bos_token_id=QWEN_TINY_IDS["bos_token_id"],
        eos_token_id=QWEN_TINY_IDS["eos_token_id"],
        pad_token_id=QWEN_TINY_IDS["pad_token_id"],
    )
    vision_config = dict(
        depth=vision_depth,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=64,  # 64 px / 8 px / 2 = 4x4 merged tokens per window
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[vision_depth // 2 - 1, vision_depth - 1],
    )
    ids = {k: v for k, v in QWEN_TINY_IDS.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **ids)


def tiny_qwen2_5_vl(
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **config_overrides,
):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` in eval mode (seeded, offline)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_qwen2_5_vl_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf.model_from_config(Qwen2_5_VLForConditionalGeneration, config,
                                     attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.pad_token_id = QWEN_TINY_IDS["pad_token_id"]
    model.generation_config.eos_token_id = None  # random weights: never stop early in tests
    return model.to(device).eval()


@dataclass
class SampleSpec:
    """One synthetic prompt: text before the images, images (height x width in pixels), text after."""

    images: tuple[tuple[int, int], ...] = ((64, 64),)
    prefix_len: int = 3
    suffix_len: int = 5


def qwen_inputs(model, samples: list[SampleSpec], seed: int = 0, device=None) -> dict:
    """Build processor-like inputs for a Qwen2.5-VL model from sample specs.

    Returns a dict with ``input_ids`` [B, S] (left padded), ``attention_mask`` [B, S],
    ``mm_token_type_ids`` [B, S] (0 text, 1 image), and, when any sample has images,
    ``pixel_values`` [sum patches, C*T*P*P] and ``image_grid_thw`` [n_images, 3] — the same
    layout the HF processor produces. Image sizes must be multiples of patch*merge pixels.
    """
    cfg = model.config
    vc = cfg.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    vocab = cfg.text_config.vocab_size
    special = set(QWEN_TINY_IDS.values())
    text_ids = torch.tensor([i for i in range(vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    device = device if device is not None else model.device

    rows, types, pixels, grids = [], [], [], []
    for spec in samples:
        ids: list[int] = []
        tt: list[int] = []

        def text(n):
            ids.extend(text_ids[torch.randint(len(text_ids), (n,), generator=gen)].tolist())
            tt.extend([0] * n)

        text(spec.prefix_len)
        for h, w in spec.images:
            if h % unit or w % unit:
                raise ValueError(f"image size {h}x{w} must be a multiple of {unit} px")
            gh, gw = h // vc.patch_size, w // vc.patch_size
            n_tok = gh * gw // vc.spatial_merge_size**2
            ids.append(cfg.vision_start_token_id)
            tt.append(0)
            ids.extend([cfg.image_token_id] * n_tok)
            tt.extend([1] * n_tok)
            ids.append(cfg.vision_end_token_id)
            tt.append(0)
            grids.append([1, gh, gw])
            patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
            pixels.append(torch.randn(gh * gw, patch_dim, generator=gen))
        text(spec.suffix_len)
        rows.append(ids)
        types.append(tt)

    S = max(len(r) for r in rows)
    pad = QWEN_TINY_IDS["pad_token_id"]
    input_ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mm = torch.zeros((len(rows), S), dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, (r, t) in enumerate(zip(rows, types)):
        input_ids[b, S - len(r):] = torch.tensor(r)
        mm[b, S - len(t):] = torch.tensor(t)
        mask[b, S - len(r):] = 1
    out = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm)
    if pixels:
        out["pixel_values"] = torch.cat(pixels).to(model.dtype)
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()}


# Token ids of the tiny LLaVA vocabularies (real checkpoints: pad 0 / 32001, bos 1, eos 2, <image> 32000).
LLAVA_TINY_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, image_token_id=3)

#: LLaVA-NeXT's anyres resolutions [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], scaled
#: from 336-px to 56-px tiles.
TINY_GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]


def _tiny_llava_parts(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, vision_layers,
                      vocab_size, image_size, patch_size):
    text_config = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # Larger than the real 0.02 so a random tiny model has peaked, tie-free logits.
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=LLAVA_TINY_IDS["bos_token_id"],
        eos_token_id=LLAVA_TINY_IDS["eos_token_id"],
        pad_token_id=LLAVA_TINY_IDS["pad_token_id"],
    )
    vision_config = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    return dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=LLAVA_TINY_IDS["image_token_id"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2,
    )


def tiny_llava_config(num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                      num_key_value_heads: int = 2, vision_layers: int = 8, vocab_size: int = 128,
                      image_size: int = 56, patch_size: int = 14):
    """Config of a tiny LLaVA-1.5: a CLIP tower (56-px images, 14-px patches: 4x4 = 16 tokens per image,
    8 layers, features from the second-to-last, CLS dropped) and a 6-layer Llama with GQA."""
    from transformers import LlavaConfig

    return LlavaConfig(**_tiny_llava_parts(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
                                           vision_layers, vocab_size, image_size, patch_size))


def tiny_llava_next_config(num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                           num_key_value_heads: int = 2, vision_layers: int = 8, vocab_size: int = 128,
                           image_size: int = 56, patch_size: int = 14, image_grid_pinpoints=None):
    """Config of a tiny LLaVA-NeXT: the tiny LLaVA-1.5 parts plus anyres tiling over
    :data:`TINY_GRID_PINPOINTS` (56-px tiles of 4x4 tokens)."""
    from transformers import LlavaNextConfig

    parts = _tiny_llava_parts(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
                              vision_layers, vocab_size, image_size, patch_size)
    pinpoints = image_grid_pinpoints or [[h * image_size // 56, w * image_size // 56] for h, w in TINY_GRID_PINPOINTS]
    return LlavaNextConfig(image_grid_pinpoints=pinpoints, **parts)


def _build(cls, config, attn_implementation, dtype, seed, device):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf.model_from_config(cls, config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.pad_token_id = LLAVA_TINY_IDS["pad_token_id"]
    model.generation_config.eos_token_id = None  # random weights: never stop early in tests
    return model.to(device).eval()


def tiny_llava(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0,
               device: str | torch.device = "cpu", **config_overrides):
    """A random-weight ``LlavaForConditionalGeneration`` in eval mode (seeded, offline)."""
    from transformers import LlavaForConditionalGeneration

    return _build(LlavaForConditionalGeneration, tiny_llava_config(**config_overrides), attn_implementation, dtype,
                  seed, device)


def tiny_llava_next(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0,
                    device: str | torch.device = "cpu", **config_overrides):
    """A random-weight ``LlavaNextForConditionalGeneration`` in eval mode (seeded, offline)."""
    from transformers import LlavaNextForConditionalGeneration

    return _build(LlavaNextForConditionalGeneration, tiny_llava_next_config(**config_overrides), attn_implementation,
                  dtype, seed, device)


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice of canvas (height, width) for an image: the pinpoint that keeps the most of
    the image's pixels after an aspect-preserving downscale, ties broken by the least wasted area."""
    best, best_eff, best_waste = None, -1, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def llava_next_tile_count(config, height: int, width: int) -> int:
    """Tiles (base + high-res) LLaVA-NeXT's processor cuts an image of ``height x width`` pixels into."""
    tile = config.vision_config.image_size
    ph, pw = best_resolution(height, width, config.image_grid_pinpoints)
    return 1 + (ph // tile) * (pw // tile)


def llava_next_num_image_tokens(config, height: int, width: int) -> int:
    """Image tokens the LLaVA-NeXT processor puts in the prompt for an image of ``height x width`` pixels
    (``"default"`` feature selection): the base tile's grid, plus the unpadded high-res grid with one
    newline token per row."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    ph, pw = best_resolution(height, width, config.image_grid_pinpoints)
    grid_h, grid_w = side * (ph // vc.image_size), side * (pw // vc.image_size)
    # The image is scaled to fit the canvas and centred; rows/cols of pure padding are dropped.
    if width / height > grid_w / grid_h:
        kept = int(round(height * (grid_w / width), 7))
        grid_h -= 2 * ((grid_h - kept) // 2)
    else:
        kept = int(round(width * (grid_h / height), 7))
        grid_w -= 2 * ((grid_w - kept) // 2)
    return side * side + grid_h * grid_w + grid_h


def _llava_prompts(model, samples, seed, image_tokens):
    """Left-padded prompts: BOS, prefix text, each image's tokens followed by one text token, suffix text."""
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    special = set(LLAVA_TINY_IDS.values())
    text_ids = torch.tensor([i for i in range(vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for spec in samples:
        def text(n):
            return text_ids[torch.randint(len(text_ids), (n,), generator=gen)].tolist()

        ids = [LLAVA_TINY_IDS["bos_token_id"]] + text(spec.prefix_len)
        for h, w in spec.images:
            ids += [cfg.image_token_id] * image_tokens(h, w) + text(1)
        ids += text(spec.suffix_len)
        rows.append(ids)
    S = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), S), LLAVA_TINY_IDS["pad_token_id"], dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, S - len(r):] = torch.tensor(r)
        mask[b, S - len(r):] = 1
    return input_ids, mask, gen


def llava_inputs(model, samples: list[SampleSpec], seed: int = 0, device=None) -> dict:
    """Processor-like inputs for a LLaVA-1.5 model: ``input_ids`` / ``attention_mask`` [B, S] (left
    padded; each image is ``image_seq_length`` = side^2 ``<image>`` tokens) and, when any sample has
    images, ``pixel_values`` [n_images, 3, size, size] in prompt order (every image is resized to the
    tower's size, so ``SampleSpec.images`` sizes only count images here)."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    input_ids, mask, gen = _llava_prompts(model, samples, seed, lambda h, w: side * side)
    out = dict(input_ids=input_ids, attention_mask=mask)
    n_images = sum(len(s.images) for s in samples)
    if n_images:
        out["pixel_values"] = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=gen).to(model.dtype)
    device = device if device is not None else model.device
    return {k: v.to(device) for k, v in out.items()}


def llava_next_inputs(model, samples: list[SampleSpec], seed: int = 0, device=None) -> dict:
    """Processor-like inputs for a LLaVA-NeXT model: ``input_ids`` / ``attention_mask`` [B, S] (left
    padded, :func:`llava_next_num_image_tokens` ``<image>`` tokens per image) and, when any sample has
    images, ``pixel_values`` [n_images, max_tiles, 3, size, size] (each image's tiles first, zero
    padding after, as the processor pads) and ``image_sizes`` [n_images, 2] (height, width)."""
    cfg = model.config
    vc = cfg.vision_config
    input_ids, mask, gen = _llava_prompts(model, samples, seed,
                                          lambda h, w: llava_next_num_image_tokens(cfg, h, w))
    out = dict(input_ids=input_ids, attention_mask=mask)
    sizes = [hw for s in samples for hw in s.images]
    if sizes:
        counts = [llava_next_tile_count(cfg, h, w) for h, w in sizes]
        pixels = torch.zeros(len(sizes), max(counts), 3, vc.image_size, vc.image_size)
        for i, n in enumerate(counts):
            pixels[i, :n] = torch.randn(n, 3, vc.image_size, vc.image_size, generator=gen)
        out["pixel_values"] = pixels.to(model.dtype)
        out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
    device = device if device is not None else model.device
    return {k: v.to(device) for k, v in out.items()}


def _image_runs(ids: torch.Tensor, image_token_id: int) -> int:
    """Number of separate runs of image tokens in one row of input ids (= images in the sample)."""
    is_img = (ids == image_token_id).long()
    return int(((is_img[1:] - is_img[:-1]) == 1).sum() + is_img[0])


def select_sample(model, inputs: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch, laid out exactly as if it had been built alone."""
    mask = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b:b + 1, mask] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    if "image_grid_thw" in inputs:
        tok = model.config.image_token_id
        counts = [_image_runs(row, tok) for row in inputs["input_ids"]]
        first, n = sum(counts[:b]), counts[b]
        patches = inputs["image_grid_thw"].prod(-1).tolist()
        p0 = sum(patches[:first])
        if n:
            out["pixel_values"] = inputs["pixel_values"][p0:p0 + sum(patches[first:first + n])]
            out["image_grid_thw"] = inputs["image_grid_thw"][first:first + n]
    elif "pixel_values" in inputs:
        # LLaVA / LLaVA-NeXT: one pixel_values (and image_sizes) row per image, in prompt order.
        tok = model.config.image_token_id
        counts = [_image_runs(row, tok) for row in inputs["input_ids"]]
        first, n = sum(counts[:b]), counts[b]
        if n:
            for key in ("pixel_values", "image_sizes"):
                if key in inputs:
                    out[key] = inputs[key][first:first + n]
    return out


def default_samples() -> list[SampleSpec]:
    """Two prompts of different image sizes, the demo's default batch."""
    return [SampleSpec(images=((128, 128),)), SampleSpec(images=((96, 160),), prefix_len=4, suffix_len=7)]


__all__ = [
    "tiny_qwen2_5_vl_config",
    "tiny_qwen2_5_vl",
    "qwen_inputs",
    "SampleSpec",
    "default_samples",
    "select_sample",
    "QWEN_TINY_IDS",
    "LLAVA_TINY_IDS",
    "TINY_GRID_PINPOINTS",
    "tiny_llava_config",
    "tiny_llava_next_config",
    "tiny_llava",
    "tiny_llava_next",
    "llava_inputs",
    "llava_next_inputs",
    "llava_next_num_image_tokens",
    "llava_next_tile_count",
    "best_resolution",
]
