"""The benchmark tool (token_prune.bench), its cost model and its NVTX ranges, checked on the CPU:
the tool runs end to end on the tiny models and writes valid results, the keep-everything
agreement check passes (and aborts a run when it fails), the shipped full-size configs have the
published sizes, and the cost model matches hand-computed FLOPs. The numbers themselves are not
checked: that needs the GPU session (bench/NOTES.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os

import pytest
import torch

from token_prune import bench, nvtx
import token_prune.bench.timing  # noqa: F401 (bench.timing._nvtx_name)
from token_prune import costmodel as cm

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Only what the tool needs to run once: one keep ratio below 1 and 1 itself, one timed run.
FAST = [
    "--keep-ratios",
    "0.25,1.0",
    "--warmup",
    "0",
    "--repeats",
    "1",
    "--decode-warmup",
    "0",
    "--decode-repeats",
    "1",
    "--decode-tokens",
    "2",
    "--check-tokens",
    "3",
    "--sweep-batches",
    "1,2",
    "--sweep-decode-tokens",
    "2",
    "--sweep-warm-steps",
    "1",
    "--quiet",
]


def _run(tmp_path, *args, tag="t"):
    rc = bench.main(["--out-dir", str(tmp_path), "--tag", tag, *args])
    return rc


def _results(tmp_path):
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".json"))
    assert len(files) == 1, files
    with open(tmp_path / files[0]) as f:
        return json.load(f), tmp_path / files[0][:-5]


# ---------------------------------------------------------------------------------------
# End to end on the tiny models
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["qwen2_5_vl_7b", "llava_1_5_7b", "llava_next_7b"])
def test_tiny_end_to_end(tmp_path, model):
    rc = _run(tmp_path, "--tiny", "--model", model, *FAST)
    assert rc == 0
    res, stem = _results(tmp_path)
    assert res["schema"] == bench.SCHEMA
    env = res["env"]
    assert env["gpu"] == "cpu" and env["device"] == "cpu"
    for key in ("torch", "transformers", "git_sha", "python"):
        assert env[key]
    assert res["settings"]["tiny"] is True and res["settings"]["model"] == model

    # The keep-everything check ran for every method and passed.
    assert sorted(c["method"] for c in res["check"]) == ["alvts", "fastv", "glimpse"]
    assert all(c["status"] == "exact" for c in res["check"]), res["check"]

    rows = res["latency"]
    assert [r["setting"] for r in rows][0] == "unpatched"
    assert len(rows) == 1 + 3 * 2
    n_vis = res["model"]["visual_tokens"]
    layers = res["model"]["layers"]
    for r in rows:
        for key in ("ttft_ms", "lm_prefill_ms", "vision_ms", "decode_step_ms", "decode_tok_s"):
            assert r[key]["median"] > 0, (r["setting"], key)
        # The decoder is part of the whole forward.
        assert r["lm_prefill_ms"]["median"] < r["ttft_ms"]["median"]
        assert len(r["kv_len"]) == layers
        assert r["kept_tokens"] == (n_vis if r["method"] == "none" else math.ceil(r["keep_ratio"] * n_vis - 1e-9))
        mem = r["memory"]
        assert mem["peak_gb"] is None and mem["above_weights_gb"] is None  # CPU: no GPU memory
        cost = r["cost"]
        assert cost["totals"]["lm_prefill_flops"] > 0 and cost["floor"] <= 1.0
        q = r["ratios"]
        assert q["model_lm_prefill_flops"] > 0 and q["floor"] > 0
    base = rows[0]
    assert base["ratios"]["lm_prefill"] == pytest.approx(1.0)
    prompt = res["model"]["prompt_tokens"]
    assert base["kv_len"] == [prompt] * layers
    for r in rows:
        if r["method"] == "glimpse":  # every layer's cache holds the kept tokens only
            assert set(r["kv_len"]) == {prompt - n_vis + r["kept_tokens"]}
        if r["method"] == "fastv":
            K = r["options"]["layer"]
            assert r["kv_len"][: K + 1] == [prompt] * (K + 1)
            assert set(r["kv_len"][K + 1 :]) == {prompt - n_vis + r["kept_tokens"]}

    # Decode sweep: two batch sizes for the baseline and each method's smallest keep ratio.
    sweep = res["sweep"]
    assert {r["setting"] for r in sweep} == {"unpatched", "glimpse K=4 f=0.25", "fastv K=2 f=0.25", "alvts f=0.25"}
    assert all(r["status"] == "ok" and r["decode_tok_s"] > 0 for r in sweep)
    assert set(res["largest_batch"].values()) == {2}

    md = (stem.parent / (stem.name + ".md")).read_text()
    for heading in (
        "## Agreement check",
        "## Latency and memory",
        "### Cost model per setting",
        "## Decode batch sweep",
    ):
        assert heading in md
    assert md.count("\n| glimpse K=4 f=0.25 |") >= 2
    png = stem.parent / (stem.name + ".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and any("no plot" in n for n in res["notes"])
    else:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert res["files"]["png"] == png.name


def test_cli_subcommand_and_report_from(tmp_path):
    from token_prune.cli import main as cli_main

    out = tmp_path / "a"
    rc = cli_main(
        [
            "bench",
            "--tiny",
            "--out-dir",
            str(out),
            "--tag",
            "x",
            "--setting",
            "none",
            "--setting",
            "fastv:layer=1",
            *FAST,
            "--no-sweep",
        ]
    )
    assert rc == 0
    res, stem = _results(out)
    assert [r["setting"] for r in res["latency"]] == ["unpatched", "fastv K=1 f=0.25", "fastv K=1 f=1"]
    assert res["sweep"] == []
    # Re-render (and merge) from the JSON alone.
    rc = bench.main(
        ["--report-from", str(stem) + ".json", str(stem) + ".json", "--out-dir", str(tmp_path / "b"), "--quiet"]
    )
    assert rc == 0
    merged = [p for p in os.listdir(tmp_path / "b") if p.endswith(".json")]
    assert len(merged) == 1 and "merged" in merged[0]
    with open(tmp_path / "b" / merged[0]) as f:
        assert len(json.load(f)["latency"]) == 6


def test_agreement_failure_aborts(tmp_path, monkeypatch):
    """A patched model that computes something else is caught before any timing."""
    orig = bench.Bench.patched

    @contextlib.contextmanager
    def broken(self, setting):
        with orig(self, setting) as handle:
            if handle is None:
                yield handle
                return
            gen = torch.Generator().manual_seed(0)
            hook = self.model.lm_head.register_forward_hook(
                lambda m, a, out: out + 10 * torch.randn(out.shape, generator=gen, dtype=out.dtype)
            )
            try:
                yield handle
            finally:
                hook.remove()

    monkeypatch.setattr(bench.Bench, "patched", broken)
    rc = _run(tmp_path, "--tiny", "--setting", "none", "--setting", "fastv", *FAST)
    assert rc == 3
    res, _ = _results(tmp_path)
    assert res["check"][0]["status"] == "mismatch"
    assert res["latency"] == [] and res["sweep"] == []


def test_full_size_code_path_on_cpu(tmp_path):
    """The non-tiny path (config JSON -> _from_config under a device context -> in-place random
    init -> synthetic inputs with the real token layout) on a shrunk Qwen2.5-VL config in bf16."""
    arch = bench.load_arch("qwen2_5_vl_7b")
    cfg = arch["config"]
    cfg["text_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        bos_token_id=500,
        eos_token_id=501,
        pad_token_id=500,
    )
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]
    cfg["vision_config"].update(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1, 3]
    )
    cfg.update(image_token_id=505, video_token_id=506, vision_start_token_id=502, vision_end_token_id=503)
    arch.update(name="qwen_small", defaults={"image": [112, 112], "text_before": 4, "text_after": 5})
    path = tmp_path / "qwen_small.json"
    path.write_text(json.dumps(arch))
    out = tmp_path / "out"
    rc = bench.main(
        [
            "--model",
            str(path),
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--out-dir",
            str(out),
            "--tag",
            "s",
            "--setting",
            "none",
            "--setting",
            "glimpse:layer=1",
            "--setting",
            "alvts",
            *FAST,
            "--no-sweep",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    res, _ = _results(out)
    assert res["settings"]["check_rtol"] == 5e-2  # the bf16 default
    assert all(c["status"] in ("exact", "near_tie") for c in res["check"])
    assert res["model"]["visual_tokens"] == 16 and res["model"]["prompt_tokens"] == 4 + 1 + 16 + 1 + 5
    assert (
        res["model"]["params"]
        == cm.arch_from_config(bench.hf_config(arch)).lm.params()
        + cm.arch_from_config(bench.hf_config(arch)).vision.params()
    )


def test_full_size_on_cpu_needs_explicit_device(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = _run(tmp_path, "--model", "qwen2_5_vl_7b")
    assert rc == 2
    assert "--tiny" in capsys.readouterr().err


def test_cost_only_qwen2_5_vl_7b_4k(tmp_path):
    rc = _run(tmp_path, "--preset", "qwen2_5_vl_7b_4k", "--cost-only", "--quiet")
    assert rc == 0
    res, _ = _results(tmp_path)
    assert res["model"]["visual_tokens"] == 4096
    rows = {r["setting"]: r for r in res["latency"]}
    assert len(rows) == 1 + 4 + 1 + 4 + 4 + 1
    g18 = rows["glimpse K=18 f=0.074"]["ratios"]
    assert g18["floor"] == pytest.approx((19 + 9 * 0.074) / 28)
    # Text tokens, the glimpse token and the VIP cost a little above the floor, never much.
    assert g18["floor"] <= g18["model_lm_prefill_flops"] <= g18["floor"] + 0.02
    g2 = rows["glimpse K=2 f=0.074"]["ratios"]
    assert g2["model_lm_prefill_flops"] < 0.2 < g18["model_lm_prefill_flops"]
    al = rows["alvts f=0.11"]["ratios"]
    assert al["floor"] == pytest.approx(0.11) and al["model_lm_prefill_flops"] > al["floor"]  # + the selector
    for r in rows.values():
        if r["keep_ratio"] < 1 and (r["method"] != "alvts" or r["options"].get("skipped") == "drop"):
            assert r["ratios"]["model_decode_step_bytes"] < 1 and r["ratios"]["model_kv_cache_bytes"] < 1
    # ALVTS "context" keeps the whole prompt in every cache, and pays the skipped rows' K/V on top of "drop".
    assert al["model_kv_cache_bytes"] == 1 and al["model_decode_step_bytes"] == pytest.approx(1)
    drop = rows["alvts f=0.11 skipped=drop"]["ratios"]
    assert drop["model_kv_cache_bytes"] < 0.2 and drop["model_lm_prefill_flops"] < al["model_lm_prefill_flops"]
    # The selector's targets: ALVTS at keep 0.11 within 0.20 of the unpatched LM prefill, at keep 1.0
    # within 1.06, the selector itself within 5% of the unpatched LM.
    base = rows["unpatched"]["cost"]["totals"]["lm_prefill_flops"]
    sel = rows["alvts f=0.11"]["cost"]
    assert sel["selector_form"] == "group_rope" and sel["alvts_rank"] == 256
    assert al["model_lm_prefill_flops"] <= 0.20 and rows["alvts f=1"]["ratios"]["model_lm_prefill_flops"] <= 1.06
    assert sel["lm_prefill"]["select"]["flops"] / base <= 0.05


# ---------------------------------------------------------------------------------------
# Configs, options, comparison
# ---------------------------------------------------------------------------------------

FACTS = {
    "qwen2_5_vl_7b": dict(layers=28, hidden=3584, heads=28, kv=4, inter=18944, vocab=152064),
    "qwen2_vl_7b": dict(layers=28, hidden=3584, heads=28, kv=4, inter=18944, vocab=152064),
    "qwen3_vl_8b": dict(layers=36, hidden=4096, heads=32, kv=8, inter=12288, vocab=151936),
    "qwen3_vl_30b_a3b": dict(layers=48, hidden=2048, heads=32, kv=4, inter=6144, vocab=151936),
    "llava_1_5_7b": dict(layers=32, hidden=4096, heads=32, kv=32, inter=11008, vocab=32064),
    "llava_next_7b": dict(layers=32, hidden=4096, heads=32, kv=32, inter=11008, vocab=32064),
    "internvl3_8b": dict(layers=28, hidden=3584, heads=28, kv=4, inter=18944, vocab=151674),
    "llava_onevision_7b": dict(layers=28, hidden=3584, heads=28, kv=4, inter=18944, vocab=152128),
}
#: (layers, width, input size, patch) of the CLIP-style towers
TOWERS = {"llava_1_5_7b": (24, 1024, 336, 14), "llava_next_7b": (24, 1024, 336, 14),
          "internvl3_8b": (24, 1024, [448, 448], [14, 14]), "llava_onevision_7b": (26, 1152, 384, 14)}


def list_or(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("name", sorted(FACTS))
def test_shipped_configs(name):
    assert name in bench.list_archs()
    arch = bench.load_arch(name)
    cfg = bench.hf_config(arch)
    tc, vc, f = cfg.text_config, cfg.vision_config, FACTS[name]
    assert (
        tc.num_hidden_layers,
        tc.hidden_size,
        tc.num_attention_heads,
        tc.num_key_value_heads,
        tc.intermediate_size,
        tc.vocab_size,
    ) == (f["layers"], f["hidden"], f["heads"], f["kv"], f["inter"], f["vocab"])
    if name.startswith("qwen2_5"):
        assert (
            vc.depth,
            vc.hidden_size,
            vc.num_heads,
            vc.intermediate_size,
            vc.patch_size,
            vc.window_size,
            list(vc.fullatt_block_indexes),
            vc.out_hidden_size,
        ) == (32, 1280, 16, 3420, 14, 112, [7, 15, 23, 31], 3584)
        assert tc.rope_parameters["mrope_section"] == [16, 24, 24] and tc.rope_parameters["rope_theta"] == 1e6
    elif not name.startswith("qwen"):  # (the other Qwen towers: tests/test_bench_qwen_video.py)
        assert (vc.num_hidden_layers, vc.hidden_size, list_or(vc.image_size), list_or(vc.patch_size)) == TOWERS[name]
        assert cfg.projector_hidden_act == "gelu"
        assert cfg.image_token_id == {"internvl3_8b": 151667, "llava_onevision_7b": 151646}.get(name, 32000)
        if name == "llava_next_7b":
            assert cfg.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    # The architecture builds without memory, with the published parameter count, which the cost
    # model's parameter formulas reproduce module by module.
    model = bench.build_model(arch, device="meta", dtype=torch.bfloat16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == arch["params"]
    a = cm.arch_from_config(cfg)
    inner = model.model
    assert a.lm.params() == count(inner.language_model) + count(model.lm_head)
    vision = (
        count(inner.visual)
        if hasattr(inner, "visual")
        else count(inner.vision_tower) + count(inner.multi_modal_projector)
    )
    assert a.vision.params() == vision


def test_settings_parse_and_expand():
    assert bench.parse_setting("glimpse:layer=18,keep_ratio=0.074") == ("glimpse", {"layer": 18, "keep_ratio": 0.074})
    assert bench.parse_setting("unpatched") == ("none", {})
    for bad in ("magic", "glimpse:layer", "none:layer=2"):
        with pytest.raises(bench.BenchError):
            bench.parse_setting(bad)
    s = bench.expand_settings(["glimpse", "fastv:layer=2", "alvts:keep_ratio=0.11"], [0.1, 1.0], "qwen2_5_vl", 28)
    assert [x.label for x in s] == [
        "unpatched",
        "glimpse K=18 f=0.1",
        "glimpse K=18 f=1",
        "fastv K=2 f=0.1",
        "fastv K=2 f=1",
        "alvts f=0.11",
    ]
    assert s[1].family_key == "glimpse K=18"
    s = bench.expand_settings(["glimpse"], [0.5], "llava", 32, baseline=False)
    assert [x.label for x in s] == ["glimpse K=21 f=0.5"]
    assert bench.timing._nvtx_name("glimpse K=18 f=0.074") == "glimpse_K18_f0.074"


def test_preset_qwen2_5_vl_7b_4k_resolves():
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    o = bench.resolve_options(p.parse_args(["--preset", "qwen2_5_vl_7b_4k"]))
    assert o["model"] == "qwen2_5_vl_7b" and tuple(o["image"]) == (1792, 1792) and o["mem_cap_gb"] == 70.0
    assert o["phases"] == ["check", "latency", "sweep"] and o["sweep_batches"][-1] == 64
    s = bench.expand_settings(o["settings"], o["keep_ratios"], "qwen2_5_vl", 28)
    labels = [x.label for x in s]
    for want in (
        "unpatched",
        "glimpse K=18 f=0.074",
        "glimpse K=2 f=0.074",
        "alvts f=0.11",
        "fastv K=2 f=0.074",
        "glimpse K=18 f=1",
    ):
        assert want in labels
    sweep = bench.expand_settings(o["sweep_settings"], o["keep_ratios"], "qwen2_5_vl", 28)
    assert [x.label for x in sweep] == ["unpatched", "glimpse K=18 f=0.074", "fastv K=2 f=0.074",
                                      "alvts f=0.11 skipped=drop"]
    o = bench.resolve_options(p.parse_args(["--preset", "qwen2_5_vl_7b_4k", "--only", "check,latency", "--repeats", "3"]))
    assert o["phases"] == ["check", "latency"] and o["repeats"] == 3
    lay = cm.prompt_layout(bench.hf_config(bench.load_arch("qwen2_5_vl_7b")), (1792, 1792), 14, 20)
    assert lay["visual"] == 64 * 64 == 4096


def test_compare_generations():
    V = 5
    ref_scores = torch.tensor([[[5.0, 1, 0, 0, 0], [0, 4, 3.999, 0, 0], [0, 0, 0, 3, 0]]])
    ref = ref_scores.argmax(-1)
    same = bench.compare_generations(ref, ref_scores, ref.clone(), ref_scores.clone(), rtol=1e-3)
    assert same["status"] == "exact" and same["first_diff_step"] is None
    tie = ref.clone()
    tie[0, 1] = 2  # the reference's runner-up, 0.001 below its maximum
    info = bench.compare_generations(ref, ref_scores, tie, ref_scores, rtol=1e-3)
    assert info["status"] == "near_tie" and info["first_diff_step"] == 1
    wrong = ref.clone()
    wrong[0, 0] = 1  # 4 below the maximum
    assert bench.compare_generations(ref, ref_scores, wrong, ref_scores, rtol=1e-3)["status"] == "mismatch"
    off = ref_scores.clone()
    off[0, 0, 3] += 1.0  # same tokens, but the first-step logits are 20% off
    assert bench.compare_generations(ref, ref_scores, ref, off, rtol=1e-3)["status"] == "mismatch"
    assert V == ref_scores.shape[-1]


def test_synthetic_inputs_match_the_cost_model_layout():
    from token_prune import tiny

    from token_prune.models import adapter_class, supported_models

    for model in (tiny.tiny_model(t) for t in supported_models()):
        hw = adapter_class(model.config.model_type).tiny_image
        x = bench.synthetic_inputs(model, hw, 3, 4, 6)
        lay = cm.prompt_layout(model.config, hw, 4, 6)
        ids = x["input_ids"]
        assert ids.shape == (3, lay["prompt"])
        assert int((ids[0] == model.config.image_token_id).sum()) == lay["visual"]
        with torch.no_grad():
            model(**x, logits_to_keep=1)  # the model accepts them


# ---------------------------------------------------------------------------------------
# Cost model against hand-computed numbers
# ---------------------------------------------------------------------------------------

LM = cm.LMSpec(layers=4, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)


def test_lm_layer_flops_by_hand():
    # proj: 2 n (H q + 2 H kv + q H) = 2*3*(64 + 64 + 64); mlp: 2 n 3 H I = 2*3*3*8*16;
    # attention: 4 heads d pairs, causal pairs 3*4/2 = 6 -> 4*2*4*6.
    c = cm.lm_layer_cost(LM, n=3, pairs=6)
    assert (c.proj_flops, c.mlp_flops, c.attn_flops) == (1152, 2304, 192)
    assert c.flops == 1152 + 2304 + 192
    c2 = cm.lm_layer_cost(LM, n=3, pairs=6, batch=2)
    assert c2.flops == 2 * c.flops
    # Weights counted once whatever the batch: bytes grow by the per-sample part only.
    w = LM.layer_params() * 2
    assert c2.bytes - w == 2 * (c.bytes - w)
    assert LM.layer_params() == 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16 + 2 * 8


def test_prefill_costs_by_hand():
    arch = cm.Arch("llava", LM, cm.VisionSpec("clip", 1, 4, 1, 8, 2), cm.VIPSpec(2, 4), alvts_rank=2)
    one = lambda n: cm.lm_layer_cost(LM, n, n * (n + 1) / 2).flops  # noqa: E731
    T, N = 2, 8
    none = cm.lm_prefill_cost(arch, T, N, "none")
    assert none["layers"].flops == pytest.approx(4 * one(10))
    fv = cm.lm_prefill_cost(arch, T, N, "fastv", keep_ratio=0.25, K=1)  # keeps 2: layers 2..3 on 4 tokens
    assert fv["layers_0_K"].flops == pytest.approx(2 * one(10))
    assert fv["layers_K1_L"].flops == pytest.approx(2 * one(4))
    gl = cm.lm_prefill_cost(arch, T, N, "glimpse", keep_ratio=0.25, K=1)  # + the glimpse token up to K
    assert gl["layers_0_K"].flops == pytest.approx(2 * one(11)) and gl["vip"].flops > 0
    al = cm.lm_prefill_cost(arch, T, N, "alvts", keep_ratio=0.25, skipped="drop")
    assert al["layers"].flops == pytest.approx(4 * one(4))
    # "context": 4 rows (2 text + 2 selected) through the layer, attending over all 10 keys causally
    # (selected rows on average half the image, text after it: 2 * 9 / 2 + 2 * 8 + 3 pairs), plus the
    # K/V projections (2 H kv_width each) of the 6 skipped rows.
    ctx = cm.lm_prefill_cost(arch, T, N, "alvts", keep_ratio=0.25)
    assert ctx["layers"].flops == pytest.approx(4 * (cm.lm_layer_cost(LM, 4, 28).flops + 6 * 2 * 2 * 8 * 4))
    # selector (default form group_rope, rank 2 = half of kv_heads * head_dim = 4): q~, k~ to rank R
    # (2 n H 2R), then two passes over the n (n + 1) / 2 = 55 causal pairs forming R-wide logits
    # (4 R per pair) and one exp per pair, pass and KV group (2 kv_heads per pair).
    n, P = 10, 55
    assert arch.selector_rank("group_rope") == 2
    assert al["select"].flops == pytest.approx(4 * (2 * n * 8 * 2 * 2 + 4 * 2 * P))
    assert al["select"].exps == pytest.approx(4 * 2 * 1 * P)
    # full width at rank 2: factors 2 n (2 H R + R q + R kv), logits of every query head (q = 8 wide),
    # one exp per pair, pass and head.
    fw = cm.lm_prefill_cost(arch, T, N, "alvts", keep_ratio=0.25, skipped="drop", selector_form="full_width")
    assert fw["select"].flops == pytest.approx(4 * (2 * n * (2 * 8 * 2 + 2 * 8 + 2 * 4) + 4 * 8 * P))
    assert fw["select"].exps == pytest.approx(4 * 2 * 2 * P)
    r4 = cm.lm_prefill_cost(arch, T, N, "alvts", keep_ratio=0.25, skipped="drop", alvts_rank=4)
    assert r4["select"].flops == pytest.approx(4 * (2 * n * 8 * 2 * 4 + 4 * 4 * P))
    # The CPU kernel forms each logit once: half the score FLOPs and exps, the same projections.
    cpu = dataclasses.replace(arch, score_passes=1)
    one_pass = cm.lm_prefill_cost(cpu, T, N, "alvts", keep_ratio=0.25, skipped="drop")
    assert one_pass["select"].flops == pytest.approx(4 * (2 * n * 8 * 2 * 2 + 2 * 2 * P))
    assert one_pass["select"].exps == pytest.approx(4 * 1 * 1 * P)
    with pytest.raises(ValueError, match="passes"):
        cm.lm_prefill_cost(dataclasses.replace(arch, score_passes=3), T, N, "alvts")
    with pytest.raises(ValueError, match="selector form"):
        cm.lm_prefill_cost(arch, T, N, "alvts", selector_form="shared")
    assert cm.kv_lens(arch, T, N, "fastv", keep_ratio=0.25, K=1) == [10, 10, 4, 4]
    assert cm.kv_lens(arch, T, N, "glimpse", keep_ratio=0.25, K=1) == [4] * 4
    assert cm.kv_lens(arch, T, N, "alvts", keep_ratio=0.25, start_layer=1, skipped="drop") == [10, 4, 4, 4]
    assert cm.kv_lens(arch, T, N, "alvts", keep_ratio=0.25, start_layer=1) == [10] * 4


def test_prefill_floor():
    assert cm.prefill_floor(28, 18, 0.074) == pytest.approx((18 + 1 + (28 - 18 - 1) * 0.074) / 28)
    assert cm.prefill_floor(28, 2, 0.074) == pytest.approx((3 + 25 * 0.074) / 28)
    assert cm.prefill_floor(28, 27, 0.1) == 1.0
    assert cm.prefill_floor(28, None, 0.11, "alvts") == pytest.approx(0.11)
    assert cm.prefill_floor(28, None, 0.5, "alvts", start_layer=2) == pytest.approx((2 + 26 * 0.5) / 28)
    assert cm.prefill_floor(28, None, 0.3, "none") == 1.0
    # Without text tokens the linear part of the FastV cost is exactly the floor.
    arch = cm.Arch("llava", LM, cm.VisionSpec("clip", 1, 4, 1, 8, 2), cm.VIPSpec(2, 4), alvts_rank=2)
    lin = lambda st: sum(c.proj_flops + c.mlp_flops for c in st.values())  # noqa: E731
    base = lin(cm.lm_prefill_cost(arch, 0, 40, "none"))
    fv = lin(cm.lm_prefill_cost(arch, 0, 40, "fastv", keep_ratio=0.25, K=1))
    assert fv / base == pytest.approx(cm.prefill_floor(4, 1, 0.25))


def test_vision_and_decode_costs_by_hand():
    # Qwen-style ViT: 2 blocks (block 1 full attention), width 4, SwiGLU 8, 2-px patches, 2x2 merge,
    # 8-px windows (2x2 merged tokens). An 8x12-px image: 4x6 = 24 patches, merged grid 2x3 ->
    # windows of 2x2 and 2x1 merged tokens = 16 and 8 patches.
    v = cm.VisionSpec(
        "qwen_vit",
        depth=2,
        width=4,
        heads=1,
        intermediate=8,
        patch=2,
        in_channels=1,
        out=6,
        temporal_patch=1,
        merge=2,
        window=8,
        fullatt=(1,),
    )
    arch = cm.Arch("qwen2_5_vl", LM, v, cm.VIPSpec(2, 4), alvts_rank=2)
    c = cm.vision_cost(arch, (8, 12))
    P = 24
    assert c["embed"].flops == 2 * P * 4 * 4
    assert c["blocks"].proj_flops == 2 * (2 * P * 4 * 4 * 4)
    assert c["blocks"].mlp_flops == 2 * (2 * P * 3 * 4 * 8)
    assert c["blocks"].attn_flops == 4 * 4 * (P * P + (16**2 + 8**2))
    assert c["merger"].flops == 2 * (P // 4) * (16 * 16 + 16 * 6)
    assert cm.vision_cost(arch, (8, 12), batch=3)["blocks"].flops == 3 * c["blocks"].flops
    # Decode step, batch 2, caches [5, 5]: attention 4 heads d B (sum c + L); KV bytes B (sum c + L) kvb.
    lm2 = cm.LMSpec(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    arch2 = cm.Arch("llava", lm2, v, cm.VIPSpec(2, 4), alvts_rank=2)
    d = cm.decode_step_cost(arch2, [5, 5], batch=2)
    assert d["kv"].attn_flops == 4 * 2 * 4 * 2 * (10 + 2)
    kvb = 2 * 4 * 2
    assert d["kv"].bytes == 2 * (10 * kvb + 2 * kvb)
    assert d["weights"].bytes == (2 * lm2.layer_params() + 8 + 8 * 10) * 2
    assert d["weights"].flops == 2 * (2 * sum(lm2.linear_flops_per_token()) + 2 * 8 * 10)


def test_roofline_and_gpu_names():
    assert cm.gpu_peak("NVIDIA H100 80GB HBM3")["name"] == "H100"
    assert cm.gpu_peak("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
    assert cm.gpu_peak("NVIDIA H200")["name"] == "H200"
    assert cm.gpu_peak("cpu") is None
    peak = {"flops": 1e12, "bandwidth": 1e9}
    assert cm.roofline_ms([cm.Cost(proj_flops=1e9, bytes=1e3)], peak) == pytest.approx(1.0)
    assert cm.roofline_ms([cm.Cost(proj_flops=1.0, bytes=1e9)], peak) == pytest.approx(1000.0)


# ---------------------------------------------------------------------------------------
# NVTX
# ---------------------------------------------------------------------------------------


def test_nvtx_is_a_noop_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    nvtx.set_enabled(True)  # cannot switch on without CUDA
    try:
        assert not nvtx.enabled()
        r = nvtx.range("x")
        assert r is nvtx.range("y")  # one shared null context: nothing allocated per call
        with r:
            pass
        assert nvtx.push("x") is False
        nvtx.pop(False)
    finally:
        nvtx.set_enabled(None)


def test_nvtx_ranges_are_balanced_and_named(tmp_path, monkeypatch):
    """With ranges forced on (and torch.cuda.nvtx recorded), a tiny benchmark run pushes every
    documented stage and pops every range it pushes."""
    events = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: events.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: events.append(("pop", None)))
    monkeypatch.setattr(nvtx, "_ENABLED", True)
    rc = _run(
        tmp_path,
        "--tiny",
        *FAST,
        "--keep-ratios",
        "0.5",
        "--skip-check",
        "--no-sweep",
        "--setting",
        "none",
        "--setting",
        "glimpse",
        "--setting",
        "fastv",
        "--setting",
        "alvts",
    )
    assert rc == 0
    depth, names = 0, set()
    for kind, name in events:
        depth += 1 if kind == "push" else -1
        assert depth >= 0
        if name:
            names.add(name)
    assert depth == 0
    for want in (
        "bench.vision_encoder",
        "bench.language_model",
        "bench.ttft",
        "bench.generate",
        "bench.prefill",
        "bench.decode_step",
        "token_prune.prefill",
        "token_prune.layerwise_decode",
        "glimpse.layers_0_K",
        "glimpse.map",
        "glimpse.vip",
        "glimpse.compact",
        "glimpse.layers_K1_L",
        "fastv.layers_0_K",
        "fastv.score",
        "fastv.compact",
        "fastv.layers_K1_L",
        "alvts.select",
        "alvts.compact",
        "alvts.layer",
        "alvts.merge",
    ):
        assert want in names, want
    assert any(n.startswith("bench.setting.glimpse_K4_f0.5") for n in names)


def test_sweep_doubles_until_out_of_memory(tmp_path, monkeypatch):
    """Batch sizes double past the list up to --sweep-max-batch; the first OOM (simulated here)
    ends the search for that setting, and the next setting starts again from the bottom."""
    orig = bench.Bench._sweep_inner
    tried = []

    def fake(self, setting, B):
        tried.append((setting.label, B))
        if B >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return orig(self, setting, B)

    monkeypatch.setattr(bench.Bench, "_sweep_inner", fake)
    rc = _run(
        tmp_path,
        "--tiny",
        *FAST,
        "--skip-check",
        "--only",
        "sweep",
        "--sweep-batches",
        "1",
        "--sweep-max-batch",
        "16",
        "--setting",
        "none",
        "--setting",
        "fastv:keep_ratio=0.5",
    )
    assert rc == 0
    res, _ = _results(tmp_path)
    assert tried == [
        ("unpatched", 1),
        ("unpatched", 2),
        ("unpatched", 4),
        ("fastv K=2 f=0.5", 1),
        ("fastv K=2 f=0.5", 2),
        ("fastv K=2 f=0.5", 4),
    ]
    assert [(r["batch"], r["status"]) for r in res["sweep"]] == [(1, "ok"), (2, "ok"), (4, "oom")] * 2
    assert res["largest_batch"] == {"unpatched": 2, "fastv K=2 f=0.5": 2}
    assert res["latency"] == []
