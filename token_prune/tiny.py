"""Tiny random-weight models and synthetic inputs, built offline from config objects.

They exercise exactly the code paths of the full-size architectures (window attention in the
Qwen2.5-VL ViT, M-RoPE, GQA, left padding) at a size that runs on a CPU in milliseconds. Tests,
the demo and the ``--tiny`` benchmark mode use them; nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
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


def default_samples() -> list[SampleSpec]:
    """Two prompts of different image sizes, the demo's default batch."""
    return [SampleSpec(images=((128, 128),)), SampleSpec(images=((96, 160),), prefix_len=4, suffix_len=7)]


__all__ = [
    "tiny_qwen2_5_vl_config",
    "tiny_qwen2_5_vl",
    "qwen_inputs",
    "SampleSpec",
    "default_samples",
    "QWEN_TINY_IDS",
]
