"""The ``token-prune`` command line, end to end on the built-in tiny models."""

from __future__ import annotations

import pytest

from token_prune.cli import main


@pytest.mark.parametrize("model, method", [("qwen2_5_vl", "glimpse"), ("llava", "fastv"), ("llava_next", "alvts")])
def test_demo_prints_kept_tokens_and_kv_lengths(capsys, model, method):
    assert main(["demo", "--model", model, "--method", method, "--keep-ratio", "0.25", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "KV full" in out and "KV length per layer after prefill" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2
    for row in rows:
        visual, kept = int(row[1]), float(row[2])
        assert 0 < kept < visual  # 25% of each image's tokens, rounded up
        assert kept == pytest.approx(-(-visual // 4), abs=1) or method == "glimpse"


def test_demo_rejects_bad_option(capsys):
    assert main(["demo", "--keep-ratio", "1.5"]) == 2
    assert "keep_ratio must be in (0, 1]" in capsys.readouterr().err


def test_calibrate_alvts_cli_writes_a_selector_the_method_loads(tmp_path, capsys):
    import json

    import torch

    import token_prune as tp
    from token_prune.tiny import SampleSpec, make_inputs, tiny_model

    out = tmp_path / "sel"
    assert main(["calibrate-alvts", "--tiny", "--out", str(out), "--samples", "6", "--steps", "3",
                 "--batch-size", "3", "--no-progress"]) == 0
    assert "rel. score error SVD" in capsys.readouterr().out
    report = json.loads((out / "calibration_report.json").read_text())
    assert set(report) == {"calibrated", "svd"}
    model = tiny_model("qwen2_5_vl", seed=0)  # same weights as --tiny (model seed 0)
    inputs = make_inputs(model, [SampleSpec(images=((64, 64),))])
    with torch.no_grad(), tp.patch(model, method="alvts", selector=str(out), keep_ratio=0.25) as h:
        assert h.options["selector"] == str(out)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
