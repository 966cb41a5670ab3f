"""Named benchmark configurations (``token-prune bench --preset NAME``).

GPU: ``qwen2_5_vl_7b_4k``, ``qwen2_5_vl_7b_video``. CPU (one pinned thread, interleaved paired repeats, thread CPU time;
see bench/NOTES.md "Measured on the CPU"): ``<arch>_cpu`` is the full list of settings in float32
at batch 1; ``<arch>_cpu_batch4`` and ``<arch>_cpu_bf16`` measure a shorter list at batch 4 and in
bfloat16, so that each run stays within about 20 minutes on one core.
"""

from __future__ import annotations

# Every method against the unpatched model on one pinned CPU thread: GlimpsePrune at the family's
# default K and at K=2, FastV K=2, ALVTS 0.11 in both readings, random, and keep-all for each.
CPU_SETTINGS = [
    "none",
    "glimpse:keep_ratio=0.07",
    "glimpse:keep_ratio=1.0",
    "glimpse:layer=2,keep_ratio=0.07",
    "glimpse:layer=2,keep_ratio=0.11",
    "fastv:layer=2,keep_ratio=0.07",
    "fastv:layer=2,keep_ratio=0.11",
    "fastv:layer=2,keep_ratio=1.0",
    "alvts:keep_ratio=0.11",
    "alvts:keep_ratio=1.0",
    "alvts:keep_ratio=0.11,skipped=drop",
    "alvts:keep_ratio=1.0,skipped=drop",
    "random:keep_ratio=0.11",
    "random:keep_ratio=1.0",
]

# The shorter list of the batch-4 and bfloat16 runs (each costs 4-5x the float32 batch-1 run here).
CPU_SETTINGS_SHORT = [
    "none",
    "glimpse:keep_ratio=0.07",
    "glimpse:keep_ratio=1.0",
    "glimpse:layer=2,keep_ratio=0.07",
    "fastv:layer=2,keep_ratio=0.07",
    "alvts:keep_ratio=0.11",
]

_CPU_COMMON = dict(
    device="cpu",
    threads=1,
    interleave=True,
    skip_check=True,  # keep-all rows are compared token by token with the unpatched run instead
    dtype="float32",
    attn="sdpa",
    batch=1,
    decode_tokens=8,
    warmup=1,
    repeats=3,
    sweep=False,
)


def _cpu_presets(model: str) -> dict:
    return {
        f"{model}_cpu": dict(_CPU_COMMON, model=model, settings=list(CPU_SETTINGS)),
        f"{model}_cpu_batch4": dict(_CPU_COMMON, model=model, settings=list(CPU_SETTINGS_SHORT), batch=4),
        f"{model}_cpu_bf16": dict(_CPU_COMMON, model=model, settings=list(CPU_SETTINGS_SHORT), dtype="bfloat16"),
    }


def _qwen_7b_methods() -> dict:
    """Every method of the Qwen2.5-VL-7B presets at the keep fractions the papers report (fresh
    lists for each preset, so that a run editing its settings leaves the other preset alone)."""
    return dict(
        settings=["none", "glimpse:layer=18", "glimpse:layer=2,keep_ratio=0.074", "fastv:layer=2", "alvts",
                  "alvts:keep_ratio=0.11,skipped=drop"],
        keep_ratios={
            "glimpse": [0.074, 0.25, 0.5, 1.0],
            "fastv": [0.074, 0.25, 0.5, 1.0],
            "alvts": [0.11, 0.25, 0.5, 1.0],
        },
        batch=1,
        decode_tokens=32,
        warmup=2,
        repeats=5,
        decode_warmup=1,
        decode_repeats=3,
    )


PRESETS = {
    # Qwen2.5-VL-7B, one 1792x1792 image (64x64 = 4096 merged visual tokens): every method at the
    # keep fractions the papers report, and the decode batch sweep.
    "qwen2_5_vl_7b_4k": dict(
        model="qwen2_5_vl_7b",
        image=(1792, 1792),
        dtype="bfloat16",
        attn="sdpa",
        **_qwen_7b_methods(),
        sweep=True,
        sweep_batches=[1, 2, 4, 8, 16, 32, 64],
        sweep_max_batch=64,
        sweep_settings=[
            "none",
            "glimpse:layer=18,keep_ratio=0.074",
            "fastv:layer=2,keep_ratio=0.074",
            # decode on the "context" reading's full caches is the unpatched model's; "drop" prunes them
            "alvts:keep_ratio=0.11,skipped=drop",
        ],
        sweep_decode_tokens=16,
        sweep_warm_steps=4,
        mem_cap_gb=70.0,
        check_tokens=8,
        check_batch=1,
    ),
    # Qwen2.5-VL-7B, one video of 32 frames at 448x448 (16 temporal groups of 16x16 = 4096 merged
    # visual tokens): every method, the keep ratio applied per video.
    "qwen2_5_vl_7b_video": dict(
        model="qwen2_5_vl_7b",
        image=(448, 448),
        video_frames=32,
        dtype="bfloat16",
        attn="sdpa",
        **_qwen_7b_methods(),
        sweep=False,
        check_tokens=8,
        check_batch=1,
    ),
    # Qwen2.5-VL layout, Qwen2.5-0.5B decoder, 8-block ViT; 896x896 image = 32x32 = 1024 visual tokens.
    **_cpu_presets("qwen2_5_vl_lm0_5b_vit8"),
    # LLaVA-1.5 layout, 0.5B-sized Llama decoder, 8-layer CLIP at 448 px = 1024 visual tokens.
    **_cpu_presets("llava_1_5_lm0_5b_clip448_8l"),
}
