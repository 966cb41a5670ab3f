"""The CPU measurement mode of the benchmark (interleaved paired repeats, thread CPU time, the
stage timer on the nvtx ranges, peak RSS, KV bytes, the measured CPU roofline) and its presets,
checked on the tiny models: that presets resolve to what they promise, that a quick interleaved run
writes valid, self-consistent files, and that the stage timer adds up. No timing is asserted."""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import pytest
import torch

from token_prune import bench, nvtx
from token_prune import costmodel as cm
from token_prune.bench.paired import cache_bytes
from token_prune.bench.presets import PRESETS
from token_prune.bench.stages import stage_rows
from token_prune.bench.timing import RSSPeak, cpu_peaks, linear_rate_ratios

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU_PRESETS = sorted(k for k in PRESETS if "_cpu" in k)


def _parse(*argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return bench.resolve_options(p.parse_args(list(argv)))


# ---------------------------------------------------------------------------------------
# Presets and the mid-size architectures
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_cpu_presets_resolve(name):
    o = _parse("--preset", name)
    assert o["device"] == "cpu" and o["threads"] == 1 and o["interleave"] and o["cpu_clock"] == "thread"
    assert o["phases"] == ["latency"]  # keep-all rows are compared with the unpatched tokens instead
    arch = bench.load_arch(o["model"])
    cfg = bench.hf_config(arch)
    L = cfg.text_config.num_hidden_layers
    s = bench.expand_settings(o["settings"], o["keep_ratios"], arch["family"], L)
    labels = [x.label for x in s]
    assert labels[0] == "unpatched"
    if name.endswith("_batch4"):
        assert o["batch"] == 4
    if name.endswith("_bf16"):
        assert o["dtype"] == "bfloat16"
    if name.endswith("_cpu"):  # the full list: every method, both ALVTS readings, keep-all for each
        assert o["batch"] == 1 and o["dtype"] == "float32"
        K = bench.default_options("glimpse", arch["family"], L)["layer"]
        for want in (f"glimpse K={K} f=0.07", f"glimpse K={K} f=1", "glimpse K=2 f=0.07", "glimpse K=2 f=0.11",
                     "fastv K=2 f=0.07", "fastv K=2 f=1", "alvts f=0.11", "alvts f=1", "alvts f=0.11 skipped=drop",
                     "alvts f=1 skipped=drop", "random K=0 f=0.11", "random K=0 f=1"):
            assert want in labels, want
        assert {x.method for x in s if x.keep_ratio == 1.0} == {"none", "glimpse", "fastv", "alvts", "random"}
    # At least 1k visual tokens per image at the architecture's default image.
    lay = cm.prompt_layout(cfg, tuple(arch["defaults"]["image"]), arch["defaults"]["text_before"],
                           arch["defaults"]["text_after"])
    assert lay["visual"] >= 1024
    # CLI values still win over the preset.
    o = _parse("--preset", name, "--repeats", "2", "--no-interleave")
    assert o["repeats"] == 2 and o["interleave"] is False


@pytest.mark.parametrize("name", sorted({PRESETS[k]["model"] for k in CPU_PRESETS}))
def test_mid_size_architectures(name):
    """A 0.5B-sized decoder (Qwen2.5-0.5B's published sizes), a shallower vision tower; the parameter
    count in the file is what the model builds, and the cost model reproduces it module by module."""
    arch = bench.load_arch(name)
    cfg = bench.hf_config(arch)
    tc = cfg.text_config
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size) == (24, 896, 14, 2, 4864)
    model = bench.build_model(arch, device="meta", dtype=torch.float32)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model) == arch["params"]
    a = cm.arch_from_config(cfg)
    inner = model.model
    head = 0 if a.lm.tied_embeddings else count(model.lm_head)
    assert a.lm.params() == count(inner.language_model) + head
    vision = count(inner.visual) if hasattr(inner, "visual") else count(inner.vision_tower) + count(
        inner.multi_modal_projector)
    assert a.vision.params() == vision
    assert a.vision.depth < 24  # the shallower tower


# ---------------------------------------------------------------------------------------
# A quick interleaved run on a tiny model
# ---------------------------------------------------------------------------------------


def _quick(tmp_path, model, *extra):
    rc = bench.main(["--tiny", "--model", model, "--out-dir", str(tmp_path), "--tag", "q", "--quiet", "--device", "cpu",
                     "--interleave", "--threads", "1", "--skip-check", "--warmup", "1", "--repeats", "2",
                     "--decode-tokens", "2", "--no-sweep", *extra])
    assert rc == 0
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".json"))
    with open(tmp_path / files[0]) as f:
        return json.load(f), tmp_path / files[0][:-5]


@pytest.mark.parametrize("model", ["qwen2_5_vl_lm0_5b_vit8", "llava_1_5_lm0_5b_clip448_8l"])
def test_interleaved_quick_run_writes_consistent_files(tmp_path, model):
    res, stem = _quick(tmp_path, model, "--setting", "none", "--setting", "glimpse:layer=1,keep_ratio=0.25",
                       "--setting", "glimpse:layer=1,keep_ratio=1.0", "--setting", "fastv:layer=1,keep_ratio=0.25",
                       "--setting", "alvts:keep_ratio=0.25,skipped=drop")
    assert res["clock"] == "thread CPU time" and res["threads"] == 1
    peak = res["machine_peak"]
    assert peak["flops"] > 0 and peak["bandwidth"] > 0
    assert res["model"]["arch"]["score_passes"] == 1  # the ALVTS score's CPU kernel: one pass
    rows = {r["setting"]: r for r in res["latency"]}
    # The roofline measured the matrix-product rate at every row count a decoder stage runs.
    T, N = res["model"]["text_tokens"], res["model"]["visual_tokens"]
    kept = rows["glimpse K=1 f=0.25"]["kept_tokens"]
    for n in (T + N, T + N + 1, T + kept):
        assert peak["flops_by_rows"][str(n)] > 0, n
    base = rows["unpatched"]
    L = res["model"]["layers"]
    kvb = cm.LMSpec(**res["model"]["arch"]["lm"]).kv_bytes_per_token(4)  # float32
    for label, r in rows.items():
        # Each setting ran once per repeat; ratios are paired per repeat, so the baseline's are exactly 1.
        assert len(r["lm_prefill_ms"]["runs"]) == 2 and len(r["ttft_ms"]["runs"]) == 2
        for key in ("lm_prefill", "ttft", "decode_step"):
            pr = r["paired_ratios"][key]
            assert pr["min"] <= pr["median"] <= pr["max"]
            if label == "unpatched":
                assert pr["median"] == 1.0 and pr["spread"] == 0.0
        assert r["lm_prefill_ms"]["median"] < r["ttft_ms"]["median"]
        assert r["wall"]["lm_prefill"]["median"] > 0
        # The cache's tensors at the end hold the prompt's kept tokens plus every fed decode token.
        assert r["kv_cache_bytes_end_measured"]["median"] == r["kv_cache_bytes_end_expected"]
        assert r["kv_cache_bytes"] == sum(r["kv_len"]) * kvb
        assert r["rss"]["peak_gb"]["median"] >= r["rss"]["start_gb"]["min"]
        q = r["ratios"]
        assert q["lm_prefill"] == r["paired_ratios"]["lm_prefill"]["median"]
        assert q["model_lm_prefill_roofline"] > 0 and q["model_decode_step_roofline"] > 0
    assert rows["glimpse K=1 f=1"]["tokens_match_unpatched"] is True
    assert base["stages"] == {}
    assert rows["glimpse K=1 f=0.25"]["kv_len"] == [rows["glimpse K=1 f=0.25"]["kv_len"][0]] * L
    # The stage timer adds up: nested stages inside their parents, top-level stages inside the LM prefill.
    for label in ("glimpse K=1 f=0.25", "fastv K=1 f=0.25", "alvts f=0.25 skipped=drop"):
        r = rows[label]
        method = r["method"]
        st = r["stages"]
        assert "token_prune.prefill" in st, st.keys()
        assert {f"{method}.{x}" for x in (("layers_0_K", "score", "compact", "layers_K1_L") if method != "alvts"
                                          else ("select", "compact", "layer", "merge"))} <= set(st)
        if method == "glimpse":
            assert {"glimpse.map", "glimpse.vip", "glimpse.keep_rule"} <= set(st)
            assert st["glimpse.vip"]["parent"] == "glimpse.score"
        if method == "alvts":
            assert st["alvts.select"]["calls"] == L
        for name, s in st.items():
            for i in range(2):
                kids = sum(c["cpu_ms"]["runs"][i] for c in st.values() if c["parent"] == name)
                assert kids <= s["cpu_ms"]["runs"][i] + 0.01, (name, kids)
        for i in range(2):
            top = sum(s["cpu_ms"]["runs"][i] for s in st.values() if s["parent"] is None)
            assert top <= r["lm_prefill_ms"]["runs"][i] + 0.01
        srows = stage_rows({**r, "_peak": peak})
        assert srows[-1]["stage"].startswith("(LM prefill outside")
        assert sum(s["cpu_ms"] for s in srows if s["parent"] is None) == pytest.approx(r["lm_prefill_ms"]["median"])
    md = (stem.parent / (stem.name + ".md")).read_text()
    assert "## Measured against the cost model" in md and "## Stage breakdown of the LM prefill" in md
    assert md.count("| glimpse K=1 f=0.25 | glimpse.vip |") == 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (stem.parent / (stem.name + ".png")).read_bytes()[:8] == PNG_MAGIC


def test_interleaved_needs_the_baseline(tmp_path):
    rc = bench.main(["--tiny", "--out-dir", str(tmp_path), "--quiet", "--interleave", "--no-baseline", "--skip-check",
                     "--setting", "fastv:layer=1,keep_ratio=0.5", "--no-sweep"])
    assert rc == 2


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------


def _busy(ms: float) -> None:
    end = time.thread_time() + ms / 1e3
    while time.thread_time() < end:
        pass


def test_stage_timer_nesting_and_sums():
    assert nvtx.range("x") is nvtx.range("y") or torch.cuda.is_available()  # no timer: the shared no-op
    with nvtx.StageTimer() as t:
        with nvtx.range("a"):
            _busy(3)
            with nvtx.range("a.b"):
                _busy(4)
            with nvtx.range("a.b"):
                _busy(1)
        with nvtx.range("c"):
            _busy(2)
    assert list(t.totals) == ["a", "a.b", "c"]
    tot = t.totals
    assert tot["a.b"]["calls"] == 2 and tot["a.b"]["parent"] == "a" and tot["a"]["parent"] is None
    assert tot["a"]["cpu_ms"] >= tot["a.b"]["cpu_ms"] >= 5.0
    ex = nvtx.StageTimer.exclusive(tot)
    assert ex["a"] == pytest.approx(tot["a"]["cpu_ms"] - tot["a.b"]["cpu_ms"])
    assert ex["a"] >= 3.0 and ex["c"] == tot["c"]["cpu_ms"] >= 2.0
    assert sum(ex.values()) == pytest.approx(tot["a"]["cpu_ms"] + tot["c"]["cpu_ms"])
    # Inactive again: ranges no longer record.
    with nvtx.range("after"):
        pass
    assert "after" not in t.totals


def test_stage_timer_counts_only_its_thread():
    import threading

    with nvtx.StageTimer() as t, nvtx.range("wait"):
        th = threading.Thread(target=_busy, args=(30,))
        th.start()
        th.join()
    assert t.totals["wait"]["cpu_ms"] < 15 <= t.totals["wait"]["wall_ms"]


def test_rss_peak_sees_an_allocation():
    r = RSSPeak()
    if not r.available:
        pytest.skip("no /proc/self/clear_refs")
    start = r.reset()
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    peak = r.peak()
    del x
    assert peak - start >= (64 << 20) * 0.9


def test_cpu_peaks_and_cache_bytes():
    p = cpu_peaks(torch.float32, 64, 128, 256, repeats=1)
    assert p["flops"] > 0 and p["bandwidth"] > 0 and "cpu" in p["name"]
    assert p["flops_by_rows"] == {"64": p["flops"]}
    rel = linear_rate_ratios(torch.float32, 64, [64, 8], 128, 256, rounds=3)
    assert set(rel) == {64, 8} and rel[64] == 1.0 and 0 < rel[8] < math.inf
    from transformers.cache_utils import DynamicCache

    c = DynamicCache()
    k = torch.zeros(2, 3, 5, 4)
    c.update(k, k.clone(), 0)
    c.update(k[:, :, :2], k[:, :, :2].clone(), 1)
    assert cache_bytes(c) == 2 * (2 * 3 * 5 * 4 + 2 * 3 * 2 * 4) * 4
    assert cache_bytes(None) is None


def test_random_in_the_cost_model():
    """Random pruning has FastV's shape (layers 0..K full, the rest on the kept tokens) without the score."""
    a = cm.arch_from_config(bench.hf_config(bench.load_arch("qwen2_5_vl_lm0_5b_vit8")), dtype_bytes=4)
    T, N, K, f = 34, 1024, 0, 0.11
    r = cm.lm_prefill_cost(a, T, N, "random", keep_ratio=f, K=K)
    fv = cm.lm_prefill_cost(a, T, N, "fastv", keep_ratio=f, K=K)
    for s in ("layers_0_K", "compact", "layers_K1_L"):
        assert r[s].flops == fv[s].flops and r[s].bytes == fv[s].bytes
    assert r["score"].flops == N and fv["score"].flops > 1000 * N
    k = math.ceil(f * N - 1e-9)
    assert cm.kv_lens(a, T, N, "random", keep_ratio=f, K=K) == [T + N] + [T + k] * (a.lm.layers - 1)
    # A measured peak gives roofline times.
    lay = {"text": T, "visual": N}
    est = cm.estimate(a, lay, (896, 896), "random", keep_ratio=f, K=K,
                      peak={"name": "cpu", "flops": 40e9, "bandwidth": 10e9})
    assert est["roofline_ms"]["device"] == "cpu" and est["roofline_ms"]["lm_prefill"] > 0


def test_roofline_takes_the_rate_at_each_stage_rows():
    """A stage whose products run on few rows is timed at the rate measured for that row count;
    a stage without rows, or with rows the table lacks, at the peak (hand-computed)."""
    peak = {"name": "cpu", "flops": 50e9, "bandwidth": 10e9, "flops_by_rows": {"100": 25e9}}
    thin = cm.Cost(mlp_flops=5e9, bytes=1e6, rows=100)
    wide = cm.Cost(mlp_flops=5e9, bytes=1e6, rows=1000)
    plain = cm.Cost(mlp_flops=5e9, bytes=1e6)
    assert cm.roofline_ms([thin], peak) == pytest.approx(200.0)
    assert cm.roofline_ms([wide], peak) == pytest.approx(100.0)
    assert cm.roofline_ms([plain], peak) == pytest.approx(100.0)
    assert cm.roofline_ms([thin, plain], peak) == pytest.approx(300.0)
    # Bandwidth still bounds a stage that moves more than it computes.
    assert cm.roofline_ms([cm.Cost(mlp_flops=1e6, bytes=1e9, rows=100)], peak) == pytest.approx(100.0)
    # A sum keeps the rows of its larger part; scaling keeps them.
    s = thin + cm.Cost(proj_flops=1e6, rows=7)
    assert s.rows == 100 and (cm.Cost(proj_flops=1e6) + thin).rows == 100 and thin.scaled(3).rows == 100


def test_decoder_stages_carry_their_rows():
    """Every decoder stage of the prefill says on how many rows (batch x tokens) its products run:
    the whole prompt before pruning, text + kept after it, text + selected for ALVTS's layers."""
    a = cm.arch_from_config(bench.hf_config(bench.load_arch("qwen2_5_vl_lm0_5b_vit8")), dtype_bytes=4)
    T, N, B, f = 36, 1024, 3, 0.11
    k = math.ceil(f * N - 1e-9)
    g = cm.lm_prefill_cost(a, T, N, "glimpse", keep_ratio=f, K=2, batch=B)
    assert g["layers_0_K"].rows == B * (T + N + 1) and g["layers_K1_L"].rows == B * (T + k)
    assert cm.lm_prefill_cost(a, T, N, "none", batch=B)["layers"].rows == B * (T + N)
    for skipped in ("context", "drop"):
        assert cm.lm_prefill_cost(a, T, N, "alvts", keep_ratio=f, batch=B, skipped=skipped)["layers"].rows == B * (T + k)
