"""The transformers seam (token_prune/hf.py): the declared range is the same everywhere, a release
outside it warns once, argument names follow the installed release, and no other module of the
package reaches into transformers internals."""

from __future__ import annotations

import io
import pathlib
import re
import subprocess
import tokenize
import warnings

import pytest
import torch

import token_prune as tp
from token_prune import hf
from token_prune.tiny import SampleSpec, make_inputs, tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _declared_range() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'"transformers([^"]*)"', text)
    assert len(found) == 1, found
    return found[0]


def test_pyproject_declares_the_seams_range():
    assert _declared_range() == f">={hf.SUPPORTED[0]},<{hf.SUPPORTED[1]}"


def test_readme_states_the_declared_range():
    readme = (ROOT / "README.md").read_text()
    assert f"transformers{_declared_range()}" in readme


@pytest.mark.parametrize("which, expect", [
    ("newest", f"transformers>={hf.SUPPORTED[0]},<{hf.SUPPORTED[1]}"),
    ("lowest", f"transformers=={hf.SUPPORTED[0]}"),
    ("5.99.1", "transformers==5.99.1"),
])
def test_scripts_install_what_pyproject_declares(which, expect):
    out = subprocess.run(["bash", "-c", "source scripts/common.sh && transformers_requirement"], cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "TOKEN_PRUNE_TRANSFORMERS": which},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expect


@pytest.mark.parametrize("version, inside", [
    ("5.16.1", False), ("5.17.0", True), ("5.17", True), (f"{hf.SUPPORTED[1]}.0", False),
    ("5.24.3", True), ("5.25.0rc1", False), ("5.24.0.dev0", True), ("6.0.0", False), ("4.57.6", False),
])
def test_supported_range(version, inside):
    assert hf.in_supported_range(version) is inside


def test_untested_release_warns_once_and_still_patches(monkeypatch):
    monkeypatch.setattr(hf, "transformers_version", lambda: "9.0.0")
    monkeypatch.setattr(hf, "_warned_version", [False])
    model = tiny_model("qwen2_5_vl")
    with pytest.warns(RuntimeWarning, match=r"tested with transformers>=5\.\d+,<5\.\d+, but 9\.0\.0"):
        handle = tp.patch(model, method="fastv")
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.patch(model, method="fastv").remove()  # once per process


def test_supported_release_does_not_warn():
    assert hf.in_supported_range()  # the suite itself runs on an allowed release
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tp.patch(tiny_model("qwen2_5_vl"), method="fastv").remove()


def test_cache_argument_name_follows_the_signature():
    def new(hidden, cache=None, **kwargs): ...

    def old(hidden, past_key_values=None, **kwargs): ...

    assert hf.cache_arg(new) == "cache"
    assert hf.cache_arg(old) == "past_key_values"
    kwargs = {"past_key_values": 1, "x": 2}
    assert hf.pop_cache(kwargs) == 1 and kwargs == {"x": 2}
    assert hf.get_cache({"cache": 3}) == 3 and hf.get_cache({}) is None


def test_installed_release_takes_the_name_the_seam_passes():
    """The decoder layers, the language model and the whole model all take the cache under the
    name the seam picks for them (so nothing lands in **kwargs unseen)."""
    import inspect

    model = tiny_model("qwen2_5_vl")
    lm = model.model.language_model
    for module in (lm.layers[0], lm, model):
        assert hf.cache_arg(module) in inspect.signature(type(module).forward).parameters


def test_seam_round_trip_through_a_real_cache():
    """A prefill through the seam's layer call fills the cache the seam then reads and rewrites."""
    model = tiny_model("qwen2_5_vl")
    inputs = make_inputs(model, [SampleSpec(images=((64, 64),))], seed=0)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = hf.output_cache(out)
    n = inputs["input_ids"].shape[1]
    assert hf.cache_layers(cache) == model.config.text_config.num_hidden_layers
    assert hf.layer_length(cache, 0) == n and hf.layer_length(None, 0) == 0
    k, v = hf.layer_kv(cache, 1)
    hf.set_layer_kv(cache, 1, k[:, :, :3], v[:, :, :3])
    assert hf.layer_length(cache, 1) == 3 and hf.layer_length(cache, 0) == n
    assert hf.output_cache(hf.lm_output(torch.zeros(1, 1, 4), cache)) is cache


# Names of transformers internals; only hf.py may use them (code, not comments or docstrings).
INTERNAL_NAMES = {
    "past_key_values", "cache_params", "create_causal_mask", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward",
    "_attn_implementation", "_from_config", "rotary_emb", "DynamicCache", "StaticCache", "BaseModelOutputWithPast",
    "get_seq_length", "rope_deltas", "select_best_resolution", "cache_utils", "masking_utils", "modeling_utils",
    "modeling_outputs", "image_processing_utils", "modeling_rope_utils", "AttentionInterface",
}


def _code_tokens(path: pathlib.Path):
    toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    return [t for t in toks if t.type not in (tokenize.COMMENT, tokenize.STRING)]


def test_only_the_seam_touches_transformers_internals():
    offenders = []
    for path in sorted((ROOT / "token_prune").rglob("*.py")):
        if path.name == "hf.py":
            continue
        toks = _code_tokens(path)
        for i, t in enumerate(toks):
            through_seam = i >= 2 and toks[i - 1].string == "." and toks[i - 2].string == "hf"
            if t.type == tokenize.NAME and t.string in INTERNAL_NAMES and not through_seam:
                offenders.append(f"{path.relative_to(ROOT)}:{t.start[0]} {t.string}")
            # `transformers.<submodule>`: anything but the top-level public namespace.
            if (t.type == tokenize.NAME and t.string == "transformers" and i + 2 < len(toks)
                    and toks[i + 1].string == "." and toks[i + 2].string != "__version__"):
                offenders.append(f"{path.relative_to(ROOT)}:{t.start[0]} transformers.{toks[i + 2].string}")
    assert not offenders, "transformers internals outside token_prune/hf.py:\n" + "\n".join(offenders)


def test_the_static_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from transformers.cache_utils import DynamicCache\nx = layer(h, past_key_values=c)\n")
    names = {t.string for t in _code_tokens(bad) if t.type == tokenize.NAME}
    assert {"cache_utils", "DynamicCache", "past_key_values"} <= names & INTERNAL_NAMES


def test_rank_space_rotary_turns_each_component_as_the_head_rotary_turns_its_frequency():
    """A rank space holding every frequency once (freq = 0..d/2-1, real parts then imaginary) is
    a head in HF's layout: rotate_at_frequencies equals apply_rotary there; with frequencies
    chosen out of order each component turns as the head's dims (f, f + d/2) do."""
    g = torch.Generator().manual_seed(0)
    B, S, G, d = 2, 7, 3, 8
    angles = torch.rand(B, S, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x = torch.randn(B, S, G, d, generator=g, dtype=torch.float64)
    every = torch.arange(d // 2).repeat(G, 1)
    want = hf.apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(hf.rotate_at_frequencies(x, cos, sin, every), want, rtol=1e-14, atol=1e-14)
    picked = torch.tensor([[3, 0], [1, 1], [2, 3]])  # [G, 2]: two components per group
    y = torch.randn(B, S, G, 4, generator=g, dtype=torch.float64)
    got = hf.rotate_at_frequencies(y, cos, sin, picked)
    z = torch.complex(y[..., :2], y[..., 2:]) * torch.polar(torch.ones(()).double(), angles[..., picked])
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), rtol=1e-14, atol=1e-14)
    w = torch.randn(G, d, 5, generator=g, dtype=torch.float64)
    c = hf.rotary_pairs(w)
    assert c.shape == (G, d // 2, 5) and torch.equal(c.real, w[:, : d // 2]) and torch.equal(c.imag, w[:, d // 2:])
