"""The cost model and ``bench`` on the Qwen2-VL / Qwen3-VL architectures and on video prompts:
published parameter counts, MoE FLOPs of the active experts only, and the video preset."""

from __future__ import annotations

import json
import os

import pytest
import torch

from token_prune import bench
from token_prune import costmodel as cm

#: published totals (model cards): Qwen2-VL-7B 8.29B, Qwen3-VL-8B 8.77B, Qwen3-VL-30B-A3B 31.1B
PUBLISHED = {"qwen2_vl_7b": 8.29e9, "qwen3_vl_8b": 8.77e9, "qwen3_vl_30b_a3b": 31.1e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_config_sizes(name):
    arch = bench.load_arch(name)
    cfg = bench.hf_config(arch)
    a = cm.arch_from_config(cfg)
    assert a.lm.params() + a.vision.params() == arch["params"]
    assert arch["params"] == pytest.approx(PUBLISHED[name], rel=0.005)
    vc = cfg.vision_config
    if name.startswith("qwen3"):
        assert (vc.depth, vc.hidden_size, vc.patch_size, list(vc.deepstack_visual_indexes)) == (27, 1152, 16,
                                                                                                [8, 16, 24])
        assert a.lm.head_norms and a.vision.deepstack_mergers == 3
    else:
        assert (vc.depth, vc.embed_dim, vc.patch_size, vc.mlp_ratio) == (32, 1280, 14, 4)


def test_moe_flops_count_the_active_experts_only():
    """Qwen3-VL-30B-A3B: 128 experts of width 768, 8 per token: the MLP FLOPs of a token are those
    of 8 experts plus the router (about 3B active parameters), the weights all 128."""
    a = cm.arch_from_config(bench.hf_config(bench.load_arch("qwen3_vl_30b_a3b")))
    lm = a.lm
    H = 2048
    proj, mlp = lm.linear_flops_per_token()
    assert mlp == 2.0 * (8 * 3 * H * 768 + H * 128)
    active = lm.layers * (proj / 2 + mlp / 2) + H * lm.vocab  # + the LM head
    assert 2.5e9 < active + a.vision.params() < 3.6e9
    assert lm.layer_params() > 128 * 3 * H * 768
    # A decode step of one token reads 8 experts per layer, a large batch nearly all 128.
    assert lm.experts_reached(1) == pytest.approx(8)
    assert lm.experts_reached(1024) == pytest.approx(128, rel=1e-3)
    assert lm.read_layer_params(1) < lm.read_layer_params(64) <= lm.layer_params()


def test_video_layout_and_vision_cost():
    """32 frames at 448x448 on Qwen2.5-VL-7B: 16 temporal groups of 16x16 merged tokens (4096
    visual tokens); the ViT costs 16 images of that size (it attends within each group)."""
    cfg = bench.hf_config(bench.load_arch("qwen2_5_vl_7b"))
    lay = cm.prompt_layout(cfg, (448, 448), 14, 20, video_frames=32)
    assert lay["visual"] == 4096 and lay["frame_groups"] == 16
    assert lay["text"] == 14 + 20 + 2  # <vision_start> ... <vision_end>
    assert lay["vision_patches"] == 16 * 32 * 32
    a = cm.arch_from_config(cfg)
    one = cm.total(cm.vision_cost(a, (448, 448))).flops
    assert cm.total(cm.vision_cost(a, (448, 448), frame_groups=16)).flops == pytest.approx(16 * one)
    # Qwen3-VL's prompt puts a timestamp before every temporal group.
    cfg3 = bench.hf_config(bench.load_arch("qwen3_vl_8b"))
    lay3 = cm.prompt_layout(cfg3, (512, 512), 14, 20, video_frames=32)
    assert lay3["visual"] == 16 * 16 * 16 and lay3["text"] > 14 + 20 + 16 * 2


def test_cost_only_video_preset(tmp_path):
    rc = bench.main(["--out-dir", str(tmp_path), "--tag", "v", "--preset", "qwen2_5_vl_7b_video", "--cost-only",
                     "--quiet"])
    assert rc == 0
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".json"))
    res = json.loads((tmp_path / files[0]).read_text())
    assert res["model"]["visual_tokens"] == 4096 and res["settings"]["video_frames"] == 32
    rows = {r["setting"]: r for r in res["latency"]}
    g = rows["glimpse K=18 f=0.074"]
    assert g["kept_tokens"] == 304  # ceil(0.074 * 4096): the keep ratio applies to the whole video
    assert g["ratios"]["floor"] <= g["ratios"]["model_lm_prefill_flops"] <= g["ratios"]["floor"] + 0.02


@pytest.mark.parametrize("name", ["qwen3_vl_8b", "qwen3_vl_30b_a3b"])
def test_cost_only_qwen3(tmp_path, name):
    rc = bench.main(["--out-dir", str(tmp_path), "--tag", "q", "--model", name, "--cost-only", "--quiet"])
    assert rc == 0


def test_tiny_video_bench_runs(tmp_path):
    """The video setting end to end on the tiny model: agreement check and latency on a CPU."""
    if torch.cuda.is_available():
        pytest.skip("timed on a GPU by the GPU scripts")
    rc = bench.main(["--out-dir", str(tmp_path), "--tag", "tv", "--tiny", "--preset", "qwen2_5_vl_7b_video",
                     "--quiet", "--setting", "none", "--setting", "fastv:layer=2,keep_ratio=0.25", "--only",
                     "check,latency", "--device", "cpu"])
    assert rc == 0
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".json"))
    res = json.loads((tmp_path / files[0]).read_text())
    assert res["model"]["visual_tokens"] == 16 * 8 * 8  # 16 temporal groups of the tiny 128x128 frame (16 px units)
