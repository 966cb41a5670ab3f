"""token_prune::compact_tokens against hand-computed outputs and the reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from token_prune import _ops
from token_prune._ops import compact_tokens
from token_prune.reference import compact_tokens_ref

OP = torch.ops.token_prune.compact_tokens.default

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def flat(result):
    hidden, caches, positions, mask = result
    return [hidden, *caches, positions, mask]


def assert_same(got, want):
    """Bit-for-bit equality, dtypes, shapes and devices included."""
    got, want = flat(got), flat(want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, (i, g.dtype, w.dtype)
        assert g.shape == w.shape, (i, g.shape, w.shape)
        assert g.device == w.device, (i, g.device, w.device)
        assert g.is_contiguous(), i
        assert torch.equal(g, w), f"output {i} differs:\n{g}\nvs\n{w}"


def to(result_or_inputs, device):
    if isinstance(result_or_inputs, torch.Tensor):
        return result_or_inputs.to(device)
    if isinstance(result_or_inputs, (list, tuple)):
        return type(result_or_inputs)(to(x, device) for x in result_or_inputs)
    return result_or_inputs


def poison_cuda_allocator():
    """Fill blocks the caching allocator will hand out next with 0xFF bytes.

    An output slot a kernel forgets to write then reads as NaN / -1 instead
    of a lucky zero.
    """
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    small = [torch.empty(1 << 19, dtype=torch.uint8, device="cuda").fill_(0xFF) for _ in range(32)]
    torch.cuda.synchronize()
    del big, small


def make_inputs(
    batch,
    seq,
    dim,
    cache_specs=((2, 4, torch.float32),),
    rows=3,
    hidden_dtype=torch.float32,
    mask_dtype=torch.int64,
    keep_mode="random",
    density=0.5,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, seq, generator=g) < density
    if keep_mode == "all":
        keep[:] = True
    elif keep_mode == "none":
        keep[:] = False
    elif keep_mode == "none_in_one":
        keep[batch // 2] = False
    elif keep_mode == "left_padded":
        # Like a real batch: each sample's padding is on the left, and padding
        # is never kept.
        for b in range(batch):
            pad = int(torch.randint(0, seq + 1, (1,), generator=g))
            keep[b, :pad] = False
    hidden = torch.randn(batch, seq, dim, generator=g).to(hidden_dtype)
    caches = []
    for heads, head_dim, dtype in cache_specs:
        if dtype.is_floating_point:
            c = torch.randn(batch, heads, seq, head_dim, generator=g).to(dtype)
        else:
            c = torch.randint(-100, 100, (batch, heads, seq, head_dim), generator=g).to(dtype)
        caches.append(c)
    positions = torch.randint(1, 10_000, (rows, batch, seq), generator=g)
    if mask_dtype == torch.bool:
        mask = torch.rand(batch, seq, generator=g) < 0.9
    else:
        mask = torch.randint(1, 100, (batch, seq), generator=g).to(mask_dtype)
    return keep, hidden, caches, positions, mask


# ---------------------------------------------------------------------------
# the compiled extension is what is under test
# ---------------------------------------------------------------------------


def test_compiled_extension_is_loaded():
    if os.environ.get("TOKEN_PRUNE_ALLOW_PY_FALLBACK") == "1":
        pytest.skip("TOKEN_PRUNE_ALLOW_PY_FALLBACK=1")
    assert _ops.EXTENSION_LOADED, _ops.EXTENSION_ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key("token_prune::compact_tokens", "CPU")
    if _ops.EXTENSION_WITH_CUDA:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("token_prune::compact_tokens", "CUDA")


def test_schema_matches_the_python_copy():
    schema = str(OP._schema)
    assert schema == "token_prune::" + _ops.SCHEMAS["compact_tokens"]


# ---------------------------------------------------------------------------
# hand-computed example
# ---------------------------------------------------------------------------


def hand_inputs():
    keep = torch.tensor(
        [
            [True, False, True, True, False, True],  # n = 4: s = 0, 2, 3, 5
            [False, True, False, False, True, False],  # n = 2: s = 1, 4
        ]
    )
    b = torch.arange(2).view(2, 1)
    s = torch.arange(6).view(1, 6)
    v = (10 * b + s).float()  # [2, 6]
    hidden = torch.stack([v, -v], dim=-1)  # [2, 6, 2]
    h = torch.arange(2).view(1, 2, 1)
    cache = (100 * b.view(2, 1, 1) + 10 * h + s.view(1, 1, 6)).unsqueeze(-1).to(torch.bfloat16)  # [2, 2, 6, 1]
    p = torch.arange(3).view(3, 1, 1)
    positions = (10 * p + s.view(1, 1, 6) + b.view(1, 2, 1)).long()  # [3, 2, 6]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    return keep, hidden, [cache], positions, mask


HAND_OUT_LEN_4 = (
    torch.tensor(
        [
            [[0.0, -0.0], [2.0, -2.0], [3.0, -3.0], [5.0, -5.0]],
            [[0.0, 0.0], [0.0, 0.0], [11.0, -11.0], [14.0, -14.0]],
        ]
    ),
    [
        torch.tensor(
            [
                [[[0.0], [2.0], [3.0], [5.0]], [[10.0], [12.0], [13.0], [15.0]]],
                [[[0.0], [0.0], [101.0], [104.0]], [[0.0], [0.0], [111.0], [114.0]]],
            ],
            dtype=torch.bfloat16,
        )
    ],
    torch.tensor(
        [
            [[0, 2, 3, 5], [0, 0, 2, 5]],
            [[10, 12, 13, 15], [0, 0, 12, 15]],
            [[20, 22, 23, 25], [0, 0, 22, 25]],
        ]
    ),
    torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),
)

HAND_OUT_LEN_5 = (
    torch.tensor(
        [
            [[0.0, 0.0], [0.0, -0.0], [2.0, -2.0], [3.0, -3.0], [5.0, -5.0]],
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [11.0, -11.0], [14.0, -14.0]],
        ]
    ),
    [
        torch.tensor(
            [
                [[[0.0], [0.0], [2.0], [3.0], [5.0]], [[0.0], [10.0], [12.0], [13.0], [15.0]]],
                [[[0.0], [0.0], [0.0], [101.0], [104.0]], [[0.0], [0.0], [0.0], [111.0], [114.0]]],
            ],
            dtype=torch.bfloat16,
        )
    ],
    torch.tensor(
        [
            [[0, 0, 2, 3, 5], [0, 0, 0, 2, 5]],
            [[0, 10, 12, 13, 15], [0, 0, 0, 12, 15]],
            [[0, 20, 22, 23, 25], [0, 0, 0, 22, 25]],
        ]
    ),
    torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]),
)


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed_default_out_len(device):
    got = compact_tokens(*to(hand_inputs(), device))
    assert_same(got, to(HAND_OUT_LEN_4, device))


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed_extra_padding(device):
    got = compact_tokens(*to(hand_inputs(), device), out_len=5)
    assert_same(got, to(HAND_OUT_LEN_5, device))
    # Padding slots are +0.0, not -0.0: the kernels write zero bytes.
    assert not torch.signbit(got[0][0, 0]).any()


def test_reference_matches_hand_computed():
    assert_same(compact_tokens_ref(*hand_inputs()), HAND_OUT_LEN_4)
    assert_same(compact_tokens_ref(*hand_inputs(), out_len=5), HAND_OUT_LEN_5)


# ---------------------------------------------------------------------------
# op vs reference on random inputs
# ---------------------------------------------------------------------------

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

RANDOM_CASES = [
    # batch, seq, dim, cache_specs, rows, hidden dtype, mask dtype, keep mode
    (1, 1, 1, (), 1, F32, torch.int64, "all"),
    (1, 7, 5, ((1, 3, F32),), 1, F32, torch.int64, "random"),
    (2, 13, 8, ((2, 4, BF16), (2, 4, BF16)), 3, BF16, torch.int64, "random"),
    (3, 17, 12, ((4, 16, F16), (1, 3, F32), (2, 7, BF16)), 3, F16, torch.bool, "random"),
    (4, 33, 3, ((3, 5, torch.int8),), 4, F32, torch.int32, "none_in_one"),
    (4, 64, 64, ((8, 64, BF16),) * 4, 3, BF16, torch.int64, "left_padded"),
    (2, 9, 7, (), 1, F64, torch.uint8, "all"),
    (3, 11, 6, ((2, 2, F32),), 2, F16, torch.bool, "none_in_one"),
    (2, 5, 4, ((1, 1, F32),), 1, F32, torch.int64, "none"),
    (1, 300, 40, ((2, 24, BF16),), 3, BF16, torch.int64, "random"),  # > one CUDA block of seq
    (3, 1000, 9, ((5, 9, F16), (5, 9, F16)), 4, F16, torch.int16, "left_padded"),
    (2, 0, 4, ((2, 4, F32),), 3, F32, torch.int64, "random"),  # empty sequence
    (0, 5, 4, ((2, 4, F32),), 3, F32, torch.int64, "random"),  # empty batch
    (2, 8, 0, ((2, 0, F32),), 1, F32, torch.int64, "random"),  # empty rows
]


def case_id(case):
    batch, seq, dim, caches, rows, dtype, mask_dtype, mode = case
    return f"B{batch}-S{seq}-D{dim}-{len(caches)}caches-P{rows}-{str(dtype)[6:]}-{str(mask_dtype)[6:]}-{mode}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("case", RANDOM_CASES, ids=case_id)
def test_matches_reference(case, extra, device):
    batch, seq, dim, caches, rows, dtype, mask_dtype, mode = case
    inputs = make_inputs(batch, seq, dim, caches, rows, dtype, mask_dtype, mode, seed=seq + extra)
    keep = inputs[0]
    max_kept = int(keep.sum(1).max()) if batch else 0
    want = compact_tokens_ref(*inputs, out_len=max_kept + extra)
    if device == "cuda":
        poison_cuda_allocator()
    got = compact_tokens(*to(inputs, device), out_len=max_kept + extra)
    assert_same(to(got, "cpu"), want)


@pytest.mark.parametrize("device", DEVICES)
def test_default_out_len_is_max_kept(device):
    inputs = make_inputs(3, 20, 4, seed=1)
    got = compact_tokens(*to(inputs, device))
    assert got[0].shape[1] == int(inputs[0].sum(1).max())
    assert_same(to(got, "cpu"), compact_tokens_ref(*inputs))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(0, 40),
    dim=st.integers(1, 9),
    heads=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 6)), max_size=3),
    rows=st.integers(1, 4),
    dtype=st.sampled_from([F32, BF16, F16]),
    mask_dtype=st.sampled_from([torch.bool, torch.int64, torch.int32]),
    density=st.floats(0.0, 1.0),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_hypothesis(batch, seq, dim, heads, rows, dtype, mask_dtype, density, extra, seed):
    specs = [(h, d, dtype) for h, d in heads]
    inputs = make_inputs(batch, seq, dim, specs, rows, dtype, mask_dtype, density=density, seed=seed)
    out_len = int(inputs[0].sum(1).max()) + extra
    assert_same(compact_tokens(*inputs, out_len=out_len), compact_tokens_ref(*inputs, out_len=out_len))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    batch, seq, dim = 3, 10, 6
    keep, hidden, _, positions, mask = make_inputs(batch, seq, dim, (), seed=3)
    g = torch.Generator().manual_seed(4)
    # Rows not contiguous: a transposed view and a strided slice.
    hidden_t = torch.randn(batch, dim, seq, generator=g).transpose(1, 2)
    cache_strided_rows = torch.randn(batch, 2, seq, 12, generator=g)[..., ::2]
    # Rows contiguous but the tensor is not: the prefix of a bigger buffer, a
    # head-major layout, and transposed last two dims.
    cache_prefix = torch.randn(batch, 2, seq + 7, 4, generator=g)[:, :, :seq]
    cache_heads_major = torch.randn(2, batch, seq, 8, generator=g).transpose(0, 1)
    cache_transposed = torch.randn(batch, 3, 5, seq, generator=g).transpose(2, 3)
    caches = [cache_strided_rows, cache_prefix, cache_heads_major, cache_transposed]
    # Stride 0 (expanded) positions and a strided mask.
    positions_expanded = torch.arange(seq).expand(3, batch, seq)
    mask_strided = torch.randint(0, 2, (batch, 2 * seq), generator=g)[:, ::2]
    keep_strided = torch.rand(2 * batch, seq, generator=g)[::2] < 0.6
    for h in (hidden, hidden_t):
        for k in (keep, keep_strided):
            for p, m in ((positions, mask), (positions_expanded, mask_strided)):
                inputs = (k, h, caches, p, m)
                want = compact_tokens_ref(*inputs)
                got = compact_tokens(*to(inputs, device))
                assert_same(to(got, "cpu"), want)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_position_ids_and_tuple_caches(device):
    keep, hidden, caches, positions, mask = make_inputs(2, 12, 4, seed=5)
    flat_positions = positions[0]
    got = compact_tokens(*to((keep, hidden, tuple(caches), flat_positions, mask), device))
    want = compact_tokens_ref(keep, hidden, caches, flat_positions, mask)
    assert got[2].shape == (2, int(keep.sum(1).max()))
    assert isinstance(got[1], list)
    assert_same(to(got, "cpu"), want)


def test_outputs_do_not_alias_inputs():
    keep, hidden, caches, positions, mask = make_inputs(2, 6, 4, keep_mode="all")
    got = compact_tokens(keep, hidden, caches, positions, mask)
    assert_same(got, (hidden, caches, positions, mask))
    got[0].zero_()
    got[1][0].zero_()
    assert hidden.abs().sum() > 0 and caches[0].abs().sum() > 0


def test_many_caches():
    # More caches than the CUDA kernel takes per launch.
    specs = [(2, 4 + (i % 3), BF16 if i % 2 else F16) for i in range(70)]
    inputs = make_inputs(2, 15, 8, specs, seed=7)
    assert_same(compact_tokens(*inputs), compact_tokens_ref(*inputs))


# ---------------------------------------------------------------------------
# torch.library machinery
# ---------------------------------------------------------------------------

OPCHECK_CASES = [
    dict(batch=2, seq=9, dim=4, cache_specs=((2, 3, F32), (1, 5, BF16)), rows=3),
    dict(batch=3, seq=7, dim=5, cache_specs=(), rows=1, mask_dtype=torch.bool),
    dict(batch=1, seq=6, dim=8, cache_specs=((4, 2, F16),), rows=4, hidden_dtype=BF16, keep_mode="none"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(OPCHECK_CASES)))
def test_opcheck(case, device):
    keep, hidden, caches, positions, mask = to(make_inputs(**OPCHECK_CASES[case]), device)
    out_len = int(keep.sum(1).max()) + 1
    torch.library.opcheck(OP, (keep, out_len, hidden, caches, positions, mask))


def test_torch_compile_traces_through_the_fake_kernel():
    def step(keep, hidden, k, v, positions, mask):
        h, (k2, v2), p, m = compact_tokens(keep, hidden, [k, v], positions, mask, out_len=6)
        return h * 2, k2 + v2, p + 1, m

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for seq in (8, 11):
        keep, hidden, caches, positions, mask = make_inputs(2, seq, 4, ((2, 3, F32), (2, 3, F32)), density=0.3)
        keep[:, 6:] = False  # at most 6 kept
        args = (keep, hidden, *caches, positions, mask)
        for got, want in zip(compiled(*args), step(*args)):
            assert torch.equal(got, want)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        keep = torch.empty(3, 10, dtype=torch.bool)
        out = OP(
            keep,
            4,
            torch.empty(3, 10, 7, dtype=BF16),
            [torch.empty(3, 2, 10, 5), torch.empty(3, 1, 10, 3, dtype=F16)],
            torch.empty(4, 3, 10, dtype=torch.long),
            torch.empty(3, 10, dtype=torch.bool),
        )
        shapes = [tuple(t.shape) for t in flat(out)]
        dtypes = [t.dtype for t in flat(out)]
    assert shapes == [(3, 4, 7), (3, 2, 4, 5), (3, 1, 4, 3), (4, 3, 4), (3, 4)]
    assert dtypes == [BF16, F32, F16, torch.long, torch.bool]


def test_pure_python_fallback_when_extension_is_missing():
    # A fresh interpreter in which `import token_prune._C` fails.
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["token_prune._C"] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from token_prune import _ops
        assert not _ops.EXTENSION_LOADED
        assert "token_prune._C" in _ops.EXTENSION_ERROR
        assert any("could not be loaded" in str(w.message) for w in caught), caught
        import torch
        from token_prune.reference import compact_tokens_ref
        keep = torch.tensor([[True, False, True], [False, False, True]])
        hidden = torch.randn(2, 3, 4)
        caches = [torch.randn(2, 2, 3, 5)]
        positions = torch.arange(3).expand(3, 2, 3).contiguous()
        mask = torch.ones(2, 3, dtype=torch.long)
        got = _ops.compact_tokens(keep, hidden, caches, positions, mask)
        want = compact_tokens_ref(keep, hidden, caches, positions, mask)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0])
        torch.library.opcheck(torch.ops.token_prune.compact_tokens.default,
                              (keep, 3, hidden, caches, positions, mask))
        print("fallback ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fallback ok" in proc.stdout


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

ERRORS = (RuntimeError,)


def bad_inputs(**override):
    keep, hidden, caches, positions, mask = make_inputs(2, 6, 4, ((2, 3, F32), (1, 2, F32)), seed=9)
    inputs = dict(keep=keep, hidden=hidden, caches=caches, position_ids=positions, attention_mask=mask)
    inputs.update(override)
    return inputs


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(hidden=torch.randn(3, 6, 4)), "hidden"),
        (dict(hidden=torch.randn(2, 5, 4)), "hidden"),
        (dict(hidden=torch.randn(2, 6)), "hidden"),
        (dict(caches=[torch.randn(2, 2, 6, 3), torch.randn(2, 1, 7, 2)]), r"caches\[1\]"),
        (dict(caches=[torch.randn(1, 2, 6, 3)]), r"caches\[0\]"),
        (dict(caches=[torch.randn(2, 6, 3)]), r"caches\[0\]"),
        (dict(position_ids=torch.zeros(3, 2, 5, dtype=torch.long)), "position_ids"),
        (dict(position_ids=torch.zeros(3, 2, 6, dtype=torch.int32)), "position_ids"),
        (dict(position_ids=torch.zeros(2, 2, 2, 6, dtype=torch.long)), "position_ids"),
        (dict(attention_mask=torch.ones(2, 7, dtype=torch.long)), "attention_mask"),
        (dict(attention_mask=torch.ones(2, 6)), "attention_mask"),
        (dict(keep=torch.ones(2, 6, dtype=torch.long)), "keep"),
        (dict(keep=torch.ones(2, 6, 1, dtype=torch.bool)), "keep"),
    ],
)
def test_shape_and_dtype_errors(override, match):
    inputs = bad_inputs(**override)
    with pytest.raises(ERRORS, match=match):
        compact_tokens(**inputs, out_len=6)


@pytest.mark.parametrize("fn", [compact_tokens, compact_tokens_ref], ids=["op", "reference"])
def test_out_len_too_small_on_cpu(fn):
    inputs = bad_inputs()
    max_kept = int(inputs["keep"].sum(1).max())
    with pytest.raises(ERRORS, match="out_len"):
        fn(**inputs, out_len=max_kept - 1)


def test_negative_out_len():
    inputs = bad_inputs()
    with pytest.raises(ERRORS, match="out_len"):
        OP(inputs["keep"], -1, inputs["hidden"], inputs["caches"], inputs["position_ids"], inputs["attention_mask"])


# ---------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_device_mismatch():
    inputs = bad_inputs()
    cuda_inputs = to(inputs, "cuda")
    for name in ("hidden", "position_ids", "attention_mask"):
        mixed = dict(cuda_inputs, **{name: inputs[name]})
        with pytest.raises(ERRORS, match=name):
            compact_tokens(**mixed, out_len=6)
    mixed = dict(cuda_inputs, caches=[cuda_inputs["caches"][0], inputs["caches"][1]])
    with pytest.raises(ERRORS, match=r"caches\[1\]"):
        compact_tokens(**mixed, out_len=6)


@pytest.mark.gpu
def test_cuda_out_len_too_small_keeps_last_tokens_in_bounds():
    # Documented behaviour: no check (it would sync), no out-of-bounds write;
    # each sample keeps its last out_len kept tokens.
    keep, hidden, caches, positions, mask = make_inputs(3, 40, 16, ((2, 8, BF16),), density=0.7, seed=11)
    out_len = int(keep.sum(1).min()) - 2
    assert out_len > 0
    truncated = keep.clone()
    for b in range(keep.shape[0]):
        kept = keep[b].nonzero().flatten()
        truncated[b, kept[: len(kept) - out_len]] = False
    want = compact_tokens_ref(truncated, hidden, caches, positions, mask, out_len=out_len)
    got = compact_tokens(*to((keep, hidden, caches, positions, mask), "cuda"), out_len=out_len)
    torch.cuda.synchronize()
    assert_same(to(got, "cpu"), want)


@pytest.mark.gpu
def test_cuda_large_and_on_a_side_stream():
    # Realistic sizes: 16-byte vectors, many index-kernel chunks, a side stream.
    specs = [(4, 128, BF16)] * 8
    inputs = make_inputs(3, 5003, 3584, specs, rows=4, hidden_dtype=BF16, keep_mode="left_padded", density=0.3, seed=12)
    want = compact_tokens_ref(*inputs)
    poison_cuda_allocator()
    stream = torch.cuda.Stream()
    cuda_inputs = to(inputs, "cuda")
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = compact_tokens(*cuda_inputs)
    stream.synchronize()
    assert_same(to(got, "cpu"), want)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_64bit_indexing():
    # The launcher picks the 32-bit index instantiation of the kernel whenever one block's
    # vectors of one tensor (heads x row vectors x slots) fit in int32. Here one slot of one
    # cache alone holds 2 x (2**30 + 1) one-byte vectors (an odd row: 1-byte vectors), more than
    # 2**31, so only the 64-bit instantiation is correct: the 32-bit one would wrap and write
    # the row's second half over its first. The profiler confirms which one ran.
    import re

    from torch.profiler import ProfilerActivity, profile

    heads, row = 2, (1 << 30) + 1
    assert heads * row > 2**31
    cache = torch.randint(0, 256, (1, heads, 2, row), dtype=torch.uint8, device="cuda")
    keep = torch.tensor([[False, True]], device="cuda")
    hidden = torch.tensor([5, 9], dtype=torch.uint8, device="cuda").view(1, 2, 1)
    positions = torch.arange(2, device="cuda").view(1, 1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got_hidden, (got,), got_pos, got_mask = compact_tokens(keep, hidden, [cache], positions, mask, out_len=2)
        torch.cuda.synchronize()
    launched = [e.name for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and "compact_kernel" in e.name]
    assert launched, "no compact_kernel launch was recorded"
    assert all(re.search(r"compact_kernel<\d+, unsigned long>", n) for n in launched), launched
    assert got.shape == (1, heads, 2, row)
    assert not got[:, :, 0].any()  # the padding slot
    assert torch.equal(got[:, :, 1], cache[:, :, 1])
    assert got_hidden.flatten().tolist() == [0, 9]
    assert got_pos.flatten().tolist() == [0, 1] and got_mask.flatten().tolist() == [False, True]
