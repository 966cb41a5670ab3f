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
