"""ALVTS selector calibration on a tiny model, judged on held-out samples against the full-rank
oracle score (computed from the model's own q/k projections, independently of the selector)."""

from __future__ import annotations

import json

import pytest
import torch

import token_prune as tp
from token_prune.alvts_calibration import calibrate_alvts, score_error
from token_prune.methods.alvts_selector import FullWidthSelector, GroupRopeSelector, LowRankSelector
from token_prune.models import adapter_for
from token_prune.tiny import SampleSpec, make_inputs, tiny_model


@pytest.fixture(scope="module")
def anisotropic_model():
    """A tiny model whose RMSNorm gains span a wide range, like real LLMs' outlier channels.

    With isotropic random inputs the weight-space SVD is already the best rank-R fit, so only
    a model with structured activations can show what calibration is for.
    """
    model = tiny_model("qwen2_5_vl", dtype=torch.float32, seed=3)
    g = torch.Generator().manual_seed(0)
    for layer in model.model.language_model.layers:
        layer.input_layernorm.weight.data = torch.exp(1.5 * torch.randn(layer.input_layernorm.weight.shape, generator=g))
    return model


def _batches(model, seeds):
    spec = [SampleSpec(images=((64, 64),), prefix_len=3, suffix_len=6)] * 8
    return [make_inputs(model, spec, seed=s) for s in seeds]


@pytest.mark.parametrize("form, cls, rank, lr", [("full_width", FullWidthSelector, 4, 3e-3),
                                                  ("group_rope", GroupRopeSelector, 8, None)])
def test_calibrated_selector_beats_svd_on_held_out_samples(anisotropic_model, tmp_path, form, cls, rank, lr):
    model = anisotropic_model
    train, held_out = _batches(model, range(6)), _batches(model, range(1000, 1002))
    svd = cls.from_weights(adapter_for(model), rank, list(range(6)))
    before = score_error(svd, model, held_out)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sel = calibrate_alvts(model, train, rank=rank, steps=25, lr=lr, out=tmp_path / "sel", progress=False,
                          selector_form=form)
    assert type(sel) is cls
    after = score_error(sel, model, held_out)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(after["rel_mse"]) < 0.8 * mean(before["rel_mse"])
    assert mean(after["topk_overlap"]) > mean(before["topk_overlap"])
    # the model is frozen
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # saved selector loads and drives the method
    info = json.loads((tmp_path / "sel" / "selector.json").read_text())
    assert info["rank"] == rank and info["layers"] == list(range(6)) and info["form"] == form
    loaded, _ = LowRankSelector.load(tmp_path / "sel")
    assert type(loaded) is cls
    # the saved selector holds the calibrated parameters and scores as the calibrated one
    want = sel.state_dict()
    assert sorted(loaded.state_dict()) == sorted(want)
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())
    torch.testing.assert_close(score_error(loaded, model, held_out[:1], layers=[2])["rel_mse"],
                               score_error(sel, model, held_out[:1], layers=[2])["rel_mse"], rtol=1e-5, atol=0)
    inputs = held_out[0]
    with torch.no_grad(), tp.patch(model, method="alvts", keep_ratio=0.25, selector=str(tmp_path / "sel")) as h:
        assert h.options["rank"] == rank and h.options["selector_form"] == form
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    other = "group_rope" if form == "full_width" else "full_width"
    with pytest.raises(ValueError, match=f"selector_form='{other}' but the selector given is a '{form}' selector"):
        tp.patch(model, method="alvts", selector=str(tmp_path / "sel"), selector_form=other)
    assert tp.get_handle(model) is None


def test_calibration_rejects_patched_model_and_bad_selector(anisotropic_model, tmp_path):
    model = anisotropic_model
    with tp.patch(model, method="fastv"):
        with pytest.raises(ValueError, match="unpatched"):
            calibrate_alvts(model, _batches(model, [0]), rank=4, steps=1, progress=False)
    sel = FullWidthSelector.from_weights(adapter_for(model), 4, list(range(6)))
    sel.save(tmp_path / "s")
    with pytest.raises(ValueError, match="calibrated at rank 4"):
        tp.patch(model, method="alvts", selector=str(tmp_path / "s"), rank=8)
    sel2 = GroupRopeSelector.from_weights(adapter_for(model), 4, [3, 4, 5])
    with pytest.raises(ValueError, match=r"no factors for layers \[0, 1, 2\]"):
        tp.patch(model, method="alvts", selector=sel2)
    assert tp.get_handle(model) is None


def test_version_one_selector_files_load_as_full_width(anisotropic_model, tmp_path):
    """Directories written before the per-group form (no "form" in selector.json) are full-width."""
    model = anisotropic_model
    sel = FullWidthSelector.from_weights(adapter_for(model), 4, list(range(6)))
    sel.save(tmp_path / "v1")
    info = json.loads((tmp_path / "v1" / "selector.json").read_text())
    del info["form"]
    info["version"] = 1
    (tmp_path / "v1" / "selector.json").write_text(json.dumps(info))
    loaded, _ = LowRankSelector.load(tmp_path / "v1")
    assert type(loaded) is FullWidthSelector
    want = sel.state_dict()
    assert sorted(loaded.state_dict()) == sorted(want)
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())
