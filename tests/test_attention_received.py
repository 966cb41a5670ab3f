"""token_prune::causal_attention_received (the ALVTS score's fused op) against hand-computed
cases, its float64 reference, and the chunked explicit-softmax score of methods/alvts.py.

* float64 inputs: equal to the float64 references to 1e-10 (relative); float32 and the half
  types (whose values the op reads exactly) to 1e-5.
* Odd sizes around every block edge of both backends (CPU 256-key blocks, CUDA 64 x 64 tiles and
  32-wide row chunks), GQA, one shared "head" (the low-rank form), left padding, any padding
  pattern, strided layouts.
* The ``gpu`` tests run the CUDA kernels (skipped without a GPU); the ``slow`` ones run the very
  same CUDA kernels on the CPU through tests/emulation/ (fibers for threads, every schedule
  shuffled), so the device code is checked on machines without a GPU too.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from token_prune import _ops
from token_prune.methods.alvts import selection_scores
from token_prune.reference import causal_attention_received_ref

OP = torch.ops.token_prune.causal_attention_received.default
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ROOT = Path(__file__).resolve().parent.parent

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_inputs(batch, heads, kv_heads, seq, dim, dtype=F32, *, padding="left", layout="contiguous",
                visual_frac=0.7, spread=2.0, seed=0, device="cpu"):
    """q [B, Hq, S, D], k [B, Hk, S, D], visual, valid [B, S] like a real prompt: a text prefix, an
    image block, a text suffix; ``padding``: "none" (valid None), "left" (ragged lengths, left
    padded, one sample unpadded), "random" (any pattern) or "empty" (one sample all padding)."""
    g = torch.Generator().manual_seed(seed)

    def rows(h):
        if layout == "contiguous":
            return torch.randn(batch, h, seq, dim, generator=g)
        if layout == "seq_major":  # [B, S, H, D] storage, as projections produce it
            return torch.randn(batch, seq, h, dim, generator=g).transpose(1, 2)
        if layout == "strided_dim":
            return torch.randn(batch, h, seq, 2 * dim, generator=g)[..., ::2]
        raise ValueError(layout)

    q = (rows(heads) * spread).to(dtype)
    k = (rows(kv_heads) * spread).to(dtype)
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    n_vis = int(round(visual_frac * seq))
    start = (seq - n_vis) // 3
    visual[:, start:start + n_vis] = True
    valid = torch.ones(batch, seq, dtype=torch.bool)
    if padding == "left":
        for b in range(1, batch):
            pad = int(torch.randint(0, max(1, seq // 2) + 1, (1,), generator=g))
            valid[b, :pad] = False
    elif padding == "random":
        valid = torch.rand(batch, seq, generator=g) < 0.8
    elif padding == "empty":
        valid[-1] = False
    elif padding != "none":
        raise ValueError(padding)
    to = lambda t: t.to(device)
    return to(q), to(k), to(visual), None if padding == "none" else to(valid)


def rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def assert_matches(got, want, tol):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "non-finite output"
    # Relative to the whole output (column sums span orders of magnitude) and elementwise with an
    # absolute floor at that scale, so a single wrong column cannot hide in the norm.
    assert rel_err(got, want) <= tol, rel_err(got, want)
    scale = float(want.abs().max().clamp_min(1e-300))
    assert torch.allclose(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol * scale)


def exact(q, k, visual, valid, scale=None):
    """The float64 reference of the inputs as the op reads them."""
    return causal_attention_received_ref(q.double().cpu(), k.double().cpu(), visual.cpu(),
                                         None if valid is None else valid.cpu(), scale)


TOL = {F64: 1e-10, F32: 1e-5, BF16: 1e-5, F16: 1e-5}


def poison(device):
    """Fill the blocks the CUDA caching allocator hands out next with 0xFF (NaN as floats)."""
    if torch.device(device).type != "cuda":
        return
    big = torch.empty(256 << 20, dtype=torch.uint8, device=device).fill_(0xFF)
    torch.cuda.synchronize()
    del big


# ---------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_uniform_logits_by_hand(device, dtype):
    # Zero queries: every query spreads its attention evenly over the keys it sees.
    # Tokens 0, 1 visual, token 2 text. Query 0 sees key 0; query 1 keys 0-1; query 2 keys 0-2.
    q = torch.zeros(1, 1, 3, 2, dtype=dtype, device=device)
    k = torch.randn(1, 1, 3, 2, dtype=dtype, device=device)
    visual = torch.tensor([[True, True, False]], device=device)
    got = _ops.causal_attention_received(q, k, visual)
    want = torch.tensor([[[1 + 1 / 2, 1 / 2, 0.0], [1 / 3, 1 / 3, 1 / 3]]], dtype=dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)

    # Token 0 is padding: query 1 sees key 1 only, query 2 keys 1-2; column 0 receives nothing.
    valid = torch.tensor([[False, True, True]], device=device)
    got = _ops.causal_attention_received(q, k, visual, valid)
    want = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1 / 2, 1 / 2]]], dtype=dtype)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_two_heads_and_a_scale_by_hand(device):
    # One-dimensional rows: logit(j, i) = scale * q_j * k_i. Head 0 has q = (0, 1), head 1 q = (0, -1);
    # k = (0, log 3) / scale for both (one key head). Query 1 sees keys 0 and 1:
    # head 0: softmax(0, log 3) = (1/4, 3/4); head 1: softmax(0, -log 3) = (3/4, 1/4); mean (1/2, 1/2).
    scale = 0.5
    q = torch.tensor([[[[0.0], [1.0]], [[0.0], [-1.0]]]], dtype=F64, device=device)
    k = torch.tensor([[[[0.0], [math.log(3) / scale]]]], dtype=F64, device=device)
    visual = torch.tensor([[True, False]], device=device)
    got = _ops.causal_attention_received(q, k, visual, scale=scale).cpu()
    # Query 0 (visual) puts everything on key 0 in both heads; query 1 (text) as above.
    want = torch.tensor([[[1.0, 0.0], [1 / 2, 1 / 2]]], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    score = _ops.alvts_score(q, k, visual, scale=scale).cpu()
    torch.testing.assert_close(score, want[:, 0] * want[:, 1], rtol=1e-12, atol=1e-12)


def test_reference_by_hand():
    q = torch.zeros(1, 1, 3, 2, dtype=F64)
    visual = torch.tensor([[True, True, False]])
    want = torch.tensor([[[1.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]], dtype=F64)
    torch.testing.assert_close(causal_attention_received_ref(q, q, visual), want)


# ---------------------------------------------------------------------------
# against the score's definition (methods/alvts.py) and the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["none", "left", "random"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_score_equals_the_chunked_explicit_softmax_score(padding, dtype):
    q, k, visual, valid = make_inputs(3, 8, 2, 300, 32, dtype, padding=padding, seed=1)
    got = _ops.alvts_score(q, k, visual, valid)
    want = selection_scores(q.double(), k.double(), valid, visual, impl="chunked")
    assert got.dtype == (F64 if dtype == F64 else F32)
    assert_matches(got[visual], want[visual], TOL[dtype])


def test_reference_equals_the_chunked_explicit_softmax_score():
    q, k, visual, valid = make_inputs(2, 4, 4, 90, 16, F64, padding="left", seed=2)
    rec = causal_attention_received_ref(q, k, visual, valid, chunk=7)
    n_vis = (visual & valid).sum(1, keepdim=True).double()
    n_txt = (~visual & valid).sum(1, keepdim=True).double()
    mine = rec[:, 0] / n_vis * rec[:, 1] / n_txt
    want = selection_scores(q, k, valid, visual, impl="chunked", chunk=13)
    torch.testing.assert_close(mine, want, rtol=1e-12, atol=0)


CASES = [
    # batch, heads, kv_heads, seq, dim, dtype, padding, layout
    (1, 1, 1, 1, 1, F64, "none", "contiguous"),
    (2, 1, 1, 65, 256, F64, "left", "contiguous"),  # one shared rank-256 "head" (low-rank form)
    (2, 1, 1, 257, 48, F32, "left", "contiguous"),  # one past a CPU block
    (2, 28, 4, 130, 128, BF16, "left", "seq_major"),  # Qwen2.5-VL-7B heads, projection layout
    (3, 4, 1, 63, 33, F16, "random", "strided_dim"),  # a row chunk and one element
    (2, 6, 3, 64, 3, F32, "empty", "contiguous"),  # a sample with no real token
    (1, 4, 2, 300, 64, F64, "random", "seq_major"),
    (2, 2, 2, 513, 16, F32, "left", "contiguous"),  # two CPU blocks and one key
    (2, 2, 1, 2100, 8, F64, "left", "contiguous"),  # CPU: 64-row strips, three row chunks of tasks
    (1, 3, 3, 1300, 5, F32, "random", "seq_major"),  # CPU: 128-row strips across a chunk boundary
]


def case_id(c):
    b, h, hk, s, d, dt, pad, lay = c
    return f"B{b}-H{h}/{hk}-S{s}-D{d}-{str(dt).split('.')[-1]}-{pad}-{lay}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, device):
    b, h, hk, s, d, dtype, padding, layout = case
    q, k, visual, valid = make_inputs(b, h, hk, s, d, dtype, padding=padding, layout=layout, seed=s + d,
                                      device=device)
    poison(device)
    got = _ops.causal_attention_received(q, k, visual, valid)
    assert got.dtype == (F64 if dtype == F64 else F32) and got.device == q.device
    assert got.shape == (b, 2, s) and got.is_contiguous()
    assert_matches(got, exact(q, k, visual, valid), TOL[dtype])
    if valid is not None:
        assert not got.cpu()[:, :, ~valid.cpu().any(0)].any(), "padding keys must receive nothing"


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_do_not_overflow(device):
    # Logits in the hundreds: a softmax without the max shift would overflow float32.
    q, k, visual, valid = make_inputs(2, 2, 1, 140, 64, F32, spread=6.0, seed=3, device=device)
    got = _ops.causal_attention_received(q, k, visual, valid)
    assert_matches(got, exact(q, k, visual, valid), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_column_sums_conserve_the_attention_of_each_group(device):
    # Every real query's softmax sums to 1, so each row of the output sums to the group's size.
    q, k, visual, valid = make_inputs(3, 4, 2, 200, 24, F64, padding="random", seed=4, device=device)
    got = _ops.causal_attention_received(q, k, visual, valid).cpu()
    valid, visual = valid.cpu(), visual.cpu()
    torch.testing.assert_close(got[:, 0].sum(1), (visual & valid).sum(1).double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[:, 1].sum(1), (~visual & valid).sum(1).double(), rtol=1e-12, atol=1e-12)


def test_scale_option_and_degenerate_shapes():
    q, k, visual, valid = make_inputs(2, 2, 1, 40, 8, F64, seed=5)
    for scale in (0.0, 0.1, -2.0):
        assert_matches(_ops.causal_attention_received(q, k, visual, valid, scale=scale),
                       exact(q, k, visual, valid, scale), 1e-10)
    assert OP(q[:0], k[:0], visual[:0], None, 1.0).shape == (0, 2, 40)
    assert OP(q[:, :, :0], k[:, :, :0], visual[:, :0], valid[:, :0], 1.0).shape == (2, 2, 0)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    seq=st.integers(1, 150),
    dim=st.integers(1, 70),
    dtype=st.sampled_from([F64, F32, BF16]),
    padding=st.sampled_from(["none", "left", "random", "empty"]),
    visual_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_hypothesis(batch, kv_heads, groups, seq, dim, dtype, padding, visual_frac, seed):
    q, k, visual, valid = make_inputs(batch, kv_heads * groups, kv_heads, seq, dim, dtype, padding=padding,
                                      visual_frac=visual_frac, seed=seed)
    want = exact(q, k, visual, valid)
    got = _ops.causal_attention_received(q, k, visual, valid)
    if want.abs().max() == 0:  # no real token at all
        assert not got.any()
        return
    assert_matches(got, want, TOL[dtype])


# ---------------------------------------------------------------------------
# torch.library machinery, errors, fallback
# ---------------------------------------------------------------------------


def test_schema_matches_the_python_copy():
    assert str(OP._schema) == "token_prune::" + _ops.SCHEMAS["causal_attention_received"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("token_prune::causal_attention_received", "CPU")
    if _ops.EXTENSION_WITH_CUDA:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("token_prune::causal_attention_received", "CUDA")
    assert "causal_attention_received" not in _ops._MISSING_OPS


def opcheck_cases(device):
    a = make_inputs(2, 4, 2, 70, 16, F32, padding="left", seed=6, device=device)
    b = make_inputs(1, 1, 1, 33, 40, BF16, padding="none", layout="seq_major", seed=7, device=device)
    c = make_inputs(2, 2, 1, 20, 8, F64, padding="random", seed=8, device=device)
    return [(*a, 0.25), (*b, 40 ** -0.5), (*c, 1.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(3))
def test_opcheck(case, device):
    torch.library.opcheck(OP, opcheck_cases(device)[case])


def test_fake_kernel_gives_the_real_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for args in opcheck_cases("cpu"):
        want = OP(*args)
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]
            out = OP(*fake)
        assert out.shape == want.shape and out.dtype == want.dtype


def test_torch_compile_traces_through_the_op():
    q, k, visual, valid = make_inputs(2, 2, 1, 30, 8, F32, seed=9)

    def score(q, k, visual, valid):
        return _ops.alvts_score(q, k, visual, valid) * 2

    compiled = torch.compile(score, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, visual, valid), score(q, k, visual, valid))


def errors_cases():
    q, k, visual, valid = make_inputs(2, 4, 2, 10, 8, F32, seed=10)
    return [
        ((q[0], k, visual, valid, 1.0), "q must be"),
        ((q, k[:, :, :5], visual, valid, 1.0), "k has shape"),
        ((q, k.double(), visual, valid, 1.0), "dtype"),
        ((q, k[:, :1].expand(2, 3, 10, 8), visual, valid, 1.0), "split evenly"),
        ((q, k, visual.int(), valid, 1.0), "visual must be bool"),
        ((q, k, visual, valid[:, :5], 1.0), "valid must be"),
        ((q.long(), k.long(), visual, valid, 1.0), "q must be float"),
        ((q, k, visual, valid, float("nan")), "scale must be finite"),
        ((q[..., :0], k[..., :0], visual, valid, 1.0), "must not be empty"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_errors(case):
    args, match = errors_cases()[case]
    with pytest.raises(RuntimeError, match=match):
        OP(*args)


def test_pure_python_fallback_when_extension_is_missing():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["token_prune._C"] = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from token_prune import _ops
        assert not _ops.EXTENSION_LOADED
        import torch
        from token_prune.methods.alvts import selection_scores
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 4, 50, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 50, 8, generator=g, dtype=torch.float64)
        visual = torch.zeros(2, 50, dtype=torch.bool); visual[:, 10:40] = True
        valid = torch.ones(2, 50, dtype=torch.bool); valid[1, :7] = False
        got = _ops.alvts_score(q, k, visual, valid)
        want = selection_scores(q, k, valid, visual, impl="chunked")
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
        torch.library.opcheck(torch.ops.token_prune.causal_attention_received.default, (q, k, visual, valid, 0.3))
        print("fallback ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fallback ok" in proc.stdout


# ---------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,dim,dtype", [(28, 4, 128, BF16), (1, 1, 256, BF16), (4, 4, 128, F16),
                                                      (1, 1, 128, F32)])
def test_cuda_realistic_sizes(heads, kv_heads, dim, dtype):
    # ~1.1k and ~4.2k-token prompts (a 1024- and a 4096-token image), left padded.
    seq = 4200 if heads == 1 else 1130
    q, k, visual, valid = make_inputs(2, heads, kv_heads, seq, dim, dtype, padding="left", visual_frac=0.97,
                                      seed=11, device="cuda")
    poison("cuda")
    got = _ops.causal_attention_received(q, k, visual, valid)
    assert_matches(got, exact(q, k, visual, valid), 1e-5)


@pytest.mark.gpu
def test_cuda_is_deterministic_and_stream_safe():
    q, k, visual, valid = make_inputs(2, 8, 2, 700, 64, BF16, padding="left", seed=12, device="cuda")
    first = _ops.causal_attention_received(q, k, visual, valid)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        poison("cuda")
        second = _ops.causal_attention_received(q, k, visual, valid)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(first, second)


@pytest.mark.gpu
def test_cuda_matches_the_cpu_kernel():
    q, k, visual, valid = make_inputs(3, 4, 1, 333, 40, F32, padding="random", seed=13)
    got = _ops.causal_attention_received(q.cuda(), k.cuda(), visual.cuda(), valid.cuda()).cpu()
    assert_matches(got, _ops.causal_attention_received(q, k, visual, valid), 1e-5)


@pytest.mark.gpu
def test_cuda_device_mismatch():
    q, k, visual, valid = make_inputs(1, 2, 1, 10, 8, F32, seed=14)
    with pytest.raises(RuntimeError, match="is on"):
        OP(q.cuda(), k.cuda(), visual, valid.cuda(), 1.0)


# ---------------------------------------------------------------------------
# the CUDA kernels, emulated on the CPU (tests/emulation/)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulated():
    from torch.utils.cpp_extension import load

    build = Path(os.environ.get("TOKEN_PRUNE_EMULATION_BUILD", ROOT / "build" / "emulation"))
    build.mkdir(parents=True, exist_ok=True)
    return load(
        name="token_prune_attention_received_emulated",
        sources=[str(ROOT / "tests" / "emulation" / "attention_received_emulated.cpp"),
                 str(ROOT / "csrc" / "attention_received_checks.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-Wno-unknown-pragmas"],
        build_directory=str(build),
    )


EMULATED_CASES = [
    # batch, heads, kv_heads, seq, dim, dtype, padding, layout
    (2, 2, 1, 150, 40, F64, "left", "contiguous"),  # three tiles, two row chunks, GQA
    (2, 1, 1, 129, 70, F32, "random", "seq_major"),  # one shared head, a partial last tile
    (1, 3, 3, 64, 1, BF16, "none", "strided_dim"),  # exactly one tile, one-element rows
    (3, 2, 2, 70, 33, F16, "empty", "contiguous"),  # a sample of padding only
]


@pytest.mark.slow
@pytest.mark.parametrize("case", EMULATED_CASES, ids=case_id)
def test_emulated_cuda_kernels_match_reference(emulated, case):
    b, h, hk, s, d, dtype, padding, layout = case
    q, k, visual, valid = make_inputs(b, h, hk, s, d, dtype, padding=padding, layout=layout, seed=s * d)
    want = exact(q, k, visual, valid)
    runs = []
    for seed in range(3):  # random warp order, warp 0 first, warp 7 first (cuda_emulation.h)
        got = emulated.causal_attention_received(q, k, visual, valid, d ** -0.5, seed)
        assert got.dtype == (F64 if dtype == F64 else F32)
        assert_matches(got, want, TOL[dtype])
        runs.append(got)
    assert all(torch.equal(r, runs[0]) for r in runs), "the result must not depend on the schedule"
