"""The fused kernels against their references (token_prune/reference.py).

* glimpse_attention_map, vip_attention: the kernel's error against a float64
  computation must be at most twice the error of the same-precision PyTorch
  reference (plus a tiny floor for errors that are exactly zero).
* keep_mask, scatter_rows (and compact_tokens' single-launch CUDA kernel):
  bit-for-bit equal.
* torch.library.opcheck for every op, the methods' kernel paths against their
  plain PyTorch paths on whole tiny models.

Every test runs on the CPU kernels here; the ``gpu`` ones (skipped without a
GPU) run the CUDA kernels, with the caching allocator poisoned before each
call so an output element a kernel forgets to write reads as NaN / 0xFF.
"""

from __future__ import annotations

import functools

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import token_prune as tp
from token_prune import _ops, tiny
from token_prune.reference import (
    compact_tokens_ref,
    glimpse_attention_map_ref,
    keep_mask_ref,
    scatter_rows_ref,
    vip_attention_ref,
)
from token_prune.runtime import keep_mask_from_scores

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]

OPS = ["compact_tokens", "glimpse_attention_map", "vip_attention", "keep_mask", "scatter_rows", "scatter_rows_"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def poison(device):
    """Fill the blocks the CUDA caching allocator hands out next with 0xFF."""
    if torch.device(device).type != "cuda":
        return
    big = torch.empty(256 << 20, dtype=torch.uint8, device=device).fill_(0xFF)
    small = [torch.empty(1 << 19, dtype=torch.uint8, device=device).fill_(0xFF) for _ in range(32)]
    torch.cuda.synchronize()
    del big, small


def rel_err(got, want):
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def assert_within_twice_reference(got, same_precision, exact, floor=1e-6, what=""):
    """``got`` no further from ``exact`` than twice the same-precision reference is."""
    got, same_precision, exact = got.cpu(), same_precision.cpu(), exact.cpu()
    assert got.shape == exact.shape, (got.shape, exact.shape)
    assert not got.isnan().any(), f"{what}: NaN in the output"
    inf = exact.isinf()
    assert torch.equal(got.isinf(), inf), f"{what}: infinities differ"
    assert torch.equal(got[inf], exact[inf].to(got.dtype)), f"{what}: infinities differ in sign"
    fin = ~inf
    e_got = rel_err(got[fin], exact[fin])
    e_ref = rel_err(same_precision[fin], exact[fin])
    assert e_got <= 2 * e_ref + floor, f"{what}: error {e_got:.3e} vs same-precision reference {e_ref:.3e}"


def sizes_to_cu(sizes, device):
    return _ops.cu_seqlens_from_sizes(sizes, device)


def test_every_op_is_registered_with_its_schema():
    for name in OPS:
        op = getattr(torch.ops.token_prune, name).default
        assert str(op._schema) == "token_prune::" + _ops.SCHEMAS[name]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"token_prune::{name}", "CPU")
        if _ops.EXTENSION_WITH_CUDA:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"token_prune::{name}", "CUDA")
    assert not _ops._MISSING_OPS


# ---------------------------------------------------------------------------
# glimpse_attention_map
# ---------------------------------------------------------------------------


def glimpse_inputs(batch, heads, kv_heads, seq, dim, sizes, dtype, *, layout="contiguous", cos_dtype=None,
                   pos_dtype=torch.int32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    angles = torch.rand(batch, dim // 2, generator=g) * 100
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(cos_dtype or dtype), emb.sin().to(cos_dtype or dtype)
    if layout == "contiguous":
        keys = torch.randn(batch, kv_heads, seq, dim, generator=g).to(dtype)
    elif layout == "cache_prefix":  # a prefix of a longer cache buffer
        keys = torch.randn(batch, kv_heads, seq + 5, dim, generator=g).to(dtype)[:, :, :seq]
    elif layout == "seq_major":  # [B, S, Hkv, d] storage
        keys = torch.randn(batch, seq, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
    elif layout == "strided_dim":  # elements not contiguous
        keys = torch.randn(batch, kv_heads, seq, 2 * dim, generator=g).to(dtype)[..., ::2]
    else:
        raise ValueError(layout)
    positions = []
    for n in sizes:
        start = int(torch.randint(0, seq - n + 1, (1,), generator=g)) if n else 0
        positions.append(torch.arange(start, start + n))  # images are contiguous runs
    positions = torch.cat(positions).to(pos_dtype) if positions else torch.zeros(0, dtype=pos_dtype)
    mask = torch.rand(batch, seq, generator=g) < 0.85
    cu = sizes_to_cu(sizes, "cpu")
    to = lambda t: t.to(device)
    return to(q), to(cos), to(sin), to(keys), to(cu), to(positions), to(mask)


GLIMPSE_CASES = [
    # batch, heads, kv_heads, seq, dim, sizes, dtype, layout
    (1, 4, 4, 9, 16, [5], F32, "contiguous"),
    (2, 28, 4, 70, 128, [20, 33], BF16, "contiguous"),  # Qwen2.5-VL-7B heads
    (3, 16, 2, 40, 128, [1, 0, 17], F16, "cache_prefix"),  # 8 query heads per key head
    (2, 24, 2, 31, 64, [13, 30], BF16, "seq_major"),  # 12 per key head: two head groups
    (2, 8, 8, 25, 80, [7, 11], F32, "contiguous"),  # head dim not a power of two
    (2, 6, 3, 19, 32, [4, 9], F16, "strided_dim"),
    (1, 4, 1, 300, 256, [257], BF16, "contiguous"),
    (2, 4, 2, 12, 8, [3, 12], F64, "contiguous"),
]


def glimpse_id(case):
    b, h, kvh, s, d, sizes, dtype, layout = case
    return f"B{b}-H{h}-KV{kvh}-S{s}-d{d}-{sizes}-{str(dtype)[6:]}-{layout}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log_softmax", [False, True], ids=["logits", "log_softmax"])
@pytest.mark.parametrize("case", GLIMPSE_CASES, ids=glimpse_id)
def test_glimpse_attention_map_matches_reference(case, log_softmax, device):
    b, h, kvh, s, d, sizes, dtype, layout = case
    q, cos, sin, keys, cu, pos, mask = glimpse_inputs(b, h, kvh, s, d, sizes, dtype, layout=layout, seed=s + d,
                                                      device=device)
    scale = 1.0 / math.sqrt(d)
    poison(device)
    got = _ops.glimpse_attention_map(q, cos, sin, keys, cu, pos, mask, log_softmax=log_softmax)
    assert got.dtype == (F64 if dtype == F64 else F32) and got.shape == (sum(sizes), h)
    same = glimpse_attention_map_ref(q, cos, sin, keys, cu, pos, mask, scale, log_softmax)
    exact = glimpse_attention_map_ref(q.double(), cos.double(), sin.double(), keys.double(), cu, pos, mask, scale,
                                      log_softmax)
    floor = 1e-12 if dtype == F64 else 1e-6
    assert_within_twice_reference(got, same, exact.to(same.dtype), floor=floor, what="glimpse map")


@pytest.mark.parametrize("device", DEVICES)
def test_glimpse_attention_map_options(device):
    # float32 cos/sin with bf16 q/keys (the tables a caller may keep in float32),
    # int64 positions, no mask, explicit scale.
    q, cos, sin, keys, cu, pos, _ = glimpse_inputs(2, 8, 2, 50, 64, [10, 25], BF16, cos_dtype=F32,
                                                   pos_dtype=torch.int64, seed=3, device=device)
    for log_softmax in (False, True):
        got = _ops.glimpse_attention_map(q, cos, sin, keys, cu, pos, None, scale=0.3, log_softmax=log_softmax)
        same = glimpse_attention_map_ref(q, cos, sin, keys, cu, pos, None, 0.3, log_softmax)
        exact = glimpse_attention_map_ref(q.double(), cos.double(), sin.double(), keys.double(), cu, pos, None,
                                          0.3, log_softmax)
        assert_within_twice_reference(got, same, exact.float(), what="glimpse options")


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 10),
    dim=st.sampled_from([8, 16, 24, 64]),
    seq=st.integers(1, 30),
    dtype=st.sampled_from([F32, BF16, F16]),
    log_softmax=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_glimpse_attention_map_hypothesis(batch, kv_heads, groups, dim, seq, dtype, log_softmax, seed, data):
    sizes = [data.draw(st.integers(0, seq)) for _ in range(batch)]
    q, cos, sin, keys, cu, pos, mask = glimpse_inputs(batch, kv_heads * groups, kv_heads, seq, dim, sizes, dtype,
                                                      seed=seed)
    got = _ops.glimpse_attention_map(q, cos, sin, keys, cu, pos, mask, log_softmax=log_softmax)
    scale = 1.0 / math.sqrt(dim)
    same = glimpse_attention_map_ref(q, cos, sin, keys, cu, pos, mask, scale, log_softmax)
    exact = glimpse_attention_map_ref(q.double(), cos.double(), sin.double(), keys.double(), cu, pos, mask, scale,
                                      log_softmax)
    assert_within_twice_reference(got, same, exact.float(), what="glimpse hypothesis")


@pytest.mark.gpu
def test_glimpse_attention_map_cuda_realistic():
    # Qwen2.5-VL-7B at layer K: 28 heads over 4 key heads, head dim 128, a KV
    # cache with 4 images of up to 4k tokens.
    sizes = [4096, 1024, 2304, 3000]
    seq = 4200
    for log_softmax in (False, True):
        q, cos, sin, keys, cu, pos, mask = glimpse_inputs(4, 28, 4, seq, 128, sizes, BF16, seed=5, device="cuda")
        poison("cuda")
        got = _ops.glimpse_attention_map(q, cos, sin, keys, cu, pos, mask, log_softmax=log_softmax)
        torch.cuda.synchronize()
        scale = 1.0 / math.sqrt(128)
        same = glimpse_attention_map_ref(q, cos, sin, keys, cu, pos, mask, scale, log_softmax)
        exact = glimpse_attention_map_ref(q.double(), cos.double(), sin.double(), keys.double(), cu, pos, mask,
                                          scale, log_softmax)
        assert_within_twice_reference(got, same, exact.float(), what="glimpse realistic")


GLIMPSE_OUTSIDE_CASES = [
    # batch, heads, kv_heads, dim, dtype, layout, N_v, cu_seqlens (not running from 0 to N_v)
    (2, 28, 4, 128, BF16, "contiguous", 20, [3, 9, 15]),  # 16-byte path
    (1, 6, 3, 32, F16, "strided_dim", 10, [2, 7]),  # element path, one sample: both ranges
    (2, 4, 2, 8, F64, "contiguous", 7, [0, 2, 5]),  # float64: the ATen path, a tail only
    (0, 4, 2, 8, F32, "contiguous", 3, [0]),  # no sample at all
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log_softmax", [False, True], ids=["logits", "log_softmax"])
@pytest.mark.parametrize("case", range(len(GLIMPSE_OUTSIDE_CASES)))
def test_glimpse_attention_map_rows_outside_every_sample(case, log_softmax, device):
    batch, heads, kv_heads, dim, dtype, layout, n_vis, offsets = GLIMPSE_OUTSIDE_CASES[case]
    seq = 30
    q, cos, sin, keys, _, _, mask = glimpse_inputs(max(batch, 1), heads, kv_heads, seq, dim, [1] * max(batch, 1),
                                                   dtype, layout=layout, seed=case, device=device)
    q, cos, sin, keys, mask = (t[:batch] for t in (q, cos, sin, keys, mask))
    positions = torch.randint(0, seq, (n_vis,), generator=torch.Generator().manual_seed(case)).to(device)
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    args = (q, cos, sin, keys, cu, positions, mask)
    if device == "cpu":  # the values are at hand: a broken precondition raises
        with pytest.raises(RuntimeError, match="cu_seqlens must run from 0"):
            _ops.glimpse_attention_map(*args, log_softmax=log_softmax)
        with pytest.raises(RuntimeError, match="cu_seqlens must run from 0"):
            glimpse_attention_map_ref(*args, log_softmax=log_softmax)
        return
    poison(device)
    got = _ops.glimpse_attention_map(*args, log_softmax=log_softmax).cpu()
    assert got.shape == (n_vis, heads)
    outside = _rows_outside(n_vis, offsets)
    assert got[outside].isnan().all()
    lo, hi = offsets[0], offsets[-1]
    if hi > lo:
        sub = (q, cos, sin, keys, (cu - lo), positions[lo:hi], mask)
        scale = 1.0 / math.sqrt(dim)
        same = glimpse_attention_map_ref(*sub, scale, log_softmax)
        exact = glimpse_attention_map_ref(*(t.double() for t in sub[:4]), *sub[4:], scale, log_softmax)
        floor = 1e-12 if dtype == F64 else 1e-6
        assert_within_twice_reference(got[lo:hi], same, exact.to(same.dtype), floor=floor, what="glimpse inside rows")


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(q=torch.randn(2, 6)), "q"),
        (dict(keys=torch.randn(2, 4, 10, 8)), "query heads"),
        (dict(keys=torch.randn(2, 2, 10, 8, dtype=F64)), "dtype"),
        (dict(cos=torch.randn(2, 6)), "cos"),
        (dict(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 3, 5])), "int32"),
        (dict(positions=torch.zeros(5)), "positions"),
        (dict(key_mask=torch.ones(2, 9, dtype=torch.bool)), "key_mask"),
    ],
)
def test_glimpse_attention_map_errors(override, match):
    args = dict(q=torch.randn(2, 6, 8), cos=torch.randn(2, 8), sin=torch.randn(2, 8), keys=torch.randn(2, 2, 10, 8),
                cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32), positions=torch.tensor([1, 2, 3, 0, 9]),
                key_mask=None)
    args.update(override)
    with pytest.raises(RuntimeError, match=match):
        _ops.glimpse_attention_map(**args)


# ---------------------------------------------------------------------------
# vip_attention
# ---------------------------------------------------------------------------


def grid_positions(sizes, g):
    """(row, col) of images laid out as grids of random width (explicit positions)."""
    out = []
    for n in sizes:
        cols = int(torch.randint(1, max(2, int(math.sqrt(n)) + 3), (1,), generator=g))
        idx = torch.arange(n)
        out.append(torch.stack([idx // cols, idx % cols], -1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


def vip_inputs(sizes, heads, dim, vdim, dtype, *, seed=0, device="cpu", layout="vip", pos_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    if layout == "vip":  # what the VIP's projections produce: views of [N, H*D]
        q = torch.randn(n, heads * dim, generator=g).view(n, heads, dim)
        k = torch.randn(n, heads * dim, generator=g).view(n, heads, dim)
        v = torch.randn(n, heads * vdim, generator=g).view(n, heads, vdim)
    else:  # head-major storage
        q = torch.randn(heads, n, dim, generator=g).transpose(0, 1)
        k = torch.randn(heads, n, dim, generator=g).transpose(0, 1)
        v = torch.randn(heads, n, vdim, generator=g).transpose(0, 1)
    pos = grid_positions(sizes, g).to(pos_dtype)
    cu = sizes_to_cu(sizes, "cpu")
    to = lambda t: t.to(device)
    return to(q.to(dtype)), to(k.to(dtype)), to(v.to(dtype)), to(pos), to(cu)


VIP_CASES = [
    # sizes, heads, dim, vdim, dtype
    ([37], 4, 192, 64, BF16),
    ([64, 1, 65, 128, 3], 4, 192, 64, BF16),  # tile edges, a one-token image
    ([200, 63], 4, 192, 64, F16),
    ([1], 4, 192, 64, F16),
    ([50, 17], 4, 192, 64, F32),
    ([12, 1, 20], 2, 16, 8, F32),  # another VIP width
    ([9, 30], 3, 24, 40, BF16),
    ([15, 4], 2, 32, 16, F64),
]


def vip_id(case):
    sizes, h, d, dv, dtype = case
    return f"{sizes}-H{h}-D{d}-Dv{dv}-{str(dtype)[6:]}"


def check_vip(q, k, v, pos, cu, sizes, device, max_seqlen=None, **kw):
    poison(device)
    got = _ops.vip_attention(q, k, v, pos, cu, max(sizes) if max_seqlen is None else max_seqlen, **kw)
    assert got.dtype == q.dtype and got.shape == (q.shape[0], q.shape[1], v.shape[2])
    scale = kw.get("scale")
    theta = kw.get("theta", 10000.0)
    same = vip_attention_ref(q, k, v, pos, cu, max(sizes), scale, theta)
    exact = vip_attention_ref(q.double(), k.double(), v.double(), pos, cu, max(sizes), scale, theta)
    # The reference rounds the rotated q/k to the input dtype; so does the kernel.
    # Its float64 run rotates in float64 without rounding, which is the exact value.
    floor = 1e-12 if q.dtype == F64 else 1e-6
    assert_within_twice_reference(got.float() if q.dtype != F64 else got, same.float() if q.dtype != F64 else same,
                                  exact.float() if q.dtype != F64 else exact, floor=floor, what="vip_attention")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", VIP_CASES, ids=vip_id)
def test_vip_attention_matches_reference(case, device):
    sizes, heads, dim, vdim, dtype = case
    if device == "cpu" and sum(sizes) > 200 and dtype != F32:
        sizes = sizes[:2]  # keep the CPU loops quick
    q, k, v, pos, cu = vip_inputs(sizes, heads, dim, vdim, dtype, seed=sum(sizes), device=device)
    check_vip(q, k, v, pos, cu, sizes, device)


@pytest.mark.parametrize("device", DEVICES)
def test_vip_attention_options_and_layouts(device):
    sizes = [40, 9]
    q, k, v, pos, cu = vip_inputs(sizes, 4, 192, 64, BF16, seed=1, device=device, layout="head_major",
                                  pos_dtype=torch.int32)
    check_vip(q, k, v, pos, cu, sizes, device, scale=0.05, theta=100.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])  # CUDA: tensor-core / SIMT kernel
@pytest.mark.parametrize("max_seqlen", [0, 1, 64, 65, 10_000])
def test_vip_attention_any_max_seqlen_covers_every_row(max_seqlen, dtype, device):
    # Images longer than max_seqlen: the CUDA kernels stride over the query tiles the grid
    # does not cover, so every row is written (the allocator is poisoned: a lost row is NaN).
    sizes = [130, 1, 67, 200]
    q, k, v, pos, cu = vip_inputs(sizes, 4, 192, 64, dtype, seed=max_seqlen, device=device)
    check_vip(q, k, v, pos, cu, sizes, device, max_seqlen=max_seqlen)


def _rows_outside(n, cu):
    inside = torch.zeros(n, dtype=torch.bool)
    inside[cu[0]:cu[-1]] = True
    return ~inside


VIP_OUTSIDE_CASES = [
    # tokens, cu_seqlens (not running from 0 to N)
    (60, [5, 25, 25, 48]),
    (12, [3, 10]),  # one image: both ranges
    (9, [0, 4]),  # a tail only
    (4, [0]),  # no image at all
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
@pytest.mark.parametrize("case", range(len(VIP_OUTSIDE_CASES)))
def test_vip_attention_rows_outside_every_image(case, dtype, device):
    n, offsets = VIP_OUTSIDE_CASES[case]
    q, k, v, pos, _ = vip_inputs([n], 4, 192, 64, dtype, seed=case, device=device)
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    if device == "cpu":  # the values are at hand: a broken precondition raises
        with pytest.raises(RuntimeError, match="cu_seqlens must run from 0"):
            _ops.vip_attention(q, k, v, pos, cu, n)
        with pytest.raises(RuntimeError, match="cu_seqlens must run from 0"):
            vip_attention_ref(q, k, v, pos, cu, n)
        return
    poison(device)
    got = _ops.vip_attention(q, k, v, pos, cu, n).cpu()
    outside = _rows_outside(n, offsets)
    assert got[outside].isnan().all()
    lo, hi = offsets[0], offsets[-1]
    if hi > lo:
        sub = [t[lo:hi] for t in (q, k, v, pos)]
        sub_cu = (cu - lo).cpu()
        same = vip_attention_ref(*sub, sub_cu, n)
        exact = vip_attention_ref(*(t.double() for t in sub[:3]), sub[3], sub_cu, n)
        assert_within_twice_reference(got[lo:hi].float(), same.float(), exact.float(), what="vip inside rows")


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    heads=st.integers(1, 3),
    dim=st.sampled_from([4, 8, 16]),
    vdim=st.integers(1, 9),
    dtype=st.sampled_from([F32, BF16, F16]),
    seed=st.integers(0, 2**16),
)
def test_vip_attention_hypothesis(sizes, heads, dim, vdim, dtype, seed):
    q, k, v, pos, cu = vip_inputs(sizes, heads, dim, vdim, dtype, seed=seed)
    check_vip(q, k, v, pos, cu, sizes, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_vip_attention_cuda_large_ragged(dtype):
    # Realistic VIP batch: images of 1k-16k tokens (48x48 = 2304 for 1344 px).
    sizes = [2304, 16384, 1, 1000, 4097]
    q, k, v, pos, cu = vip_inputs(sizes, 4, 192, 64, dtype, seed=7, device="cuda")
    check_vip(q, k, v, pos, cu, sizes, "cuda")


@pytest.mark.gpu
def test_vip_attention_cuda_is_deterministic_and_stream_safe():
    sizes = [300, 129]
    q, k, v, pos, cu = vip_inputs(sizes, 4, 192, 64, BF16, seed=8, device="cuda")
    first = _ops.vip_attention(q, k, v, pos, cu, 300)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = _ops.vip_attention(q, k, v, pos, cu, 300)
    stream.synchronize()
    assert torch.equal(first, second)


def test_vip_attention_errors():
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    pos = torch.zeros(5, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        _ops.vip_attention(torch.randn(5, 2, 6), torch.randn(5, 2, 6), q, pos, cu, 5)
    with pytest.raises(RuntimeError, match="k must"):
        _ops.vip_attention(q, torch.randn(5, 3, 8), q, pos, cu, 5)
    with pytest.raises(RuntimeError, match="positions"):
        _ops.vip_attention(q, q, q, torch.zeros(5, 3, dtype=torch.long), cu, 5)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        _ops.vip_attention(q, q, q, pos, torch.tensor([0, 4], dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match="dtype"):
        _ops.vip_attention(q, q, q.double(), pos, cu, 5)


# ---------------------------------------------------------------------------
# keep_mask
# ---------------------------------------------------------------------------

KEEP_OPTIONS = [
    dict(),
    dict(threshold=0.7),
    dict(threshold=0.3, max_keep_ratio=0.111),
    dict(threshold=0.5, max_keep_ratio=0.333, min_keep=4),
    dict(threshold=0.99, min_keep=3),
    dict(threshold=0.0, min_keep=0),
    dict(threshold=1.0, min_keep=0),
    dict(threshold=0.5, max_keep_ratio=0.0, min_keep=2),
    dict(keep_ratio=0.25),
    dict(keep_ratio=1.0),
    dict(keep_ratio=0.0),
    dict(keep_ratio=0.5, scores_are_logits=False),
    dict(threshold=0.4, scores_are_logits=False, max_keep_ratio=0.2),
]


def keep_scores(sizes, mode, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    if mode == "normal":
        s = torch.randn(n, generator=g) * 2
    elif mode == "ties":  # few distinct values: ties decide
        s = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
    elif mode == "saturated":  # sigmoid rounds to exactly 0 or 1 in float32
        s = torch.randint(0, 2, (n,), generator=g).float() * 80 - 40 + torch.randn(n, generator=g)
    elif mode == "nan":  # a fifth NaN: ranked first by the sort, never above the threshold
        s = torch.randn(n, generator=g) * 2
        s[torch.rand(n, generator=g) < 0.2] = float("nan")
    else:
        raise ValueError(mode)
    return s.to(dtype)


KEEP_SIZES = [[10], [1, 0, 7, 1], [64, 63, 129], [576, 576], [2304, 17, 1000]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["normal", "ties", "saturated", "nan"])
@pytest.mark.parametrize("sizes", KEEP_SIZES, ids=lambda s: "-".join(map(str, s)))
def test_keep_mask_matches_the_rule_exactly(sizes, mode, device):
    for dtype in (F32, BF16, F64):
        scores = keep_scores(sizes, mode, dtype, seed=sum(sizes)).to(device)
        cu = sizes_to_cu(sizes, device)
        for opts in KEEP_OPTIONS:
            poison(device)
            got = _ops.keep_mask(scores, cu, **opts)
            # Same device: sigmoid may round differently on the CPU and the GPU.
            want = keep_mask_ref(scores, cu, **opts)
            with _ops.use_kernels(False):
                rule = keep_mask_from_scores(scores, sizes, **opts)
            assert got.dtype == torch.bool and got.shape == scores.shape
            assert torch.equal(got.cpu(), want.cpu()), (dtype, opts)
            assert torch.equal(want.cpu(), rule.cpu()), (dtype, opts)


@pytest.mark.parametrize("device", DEVICES)
def test_keep_mask_nan_and_signed_zero_order_like_torch_sort(device):
    scores = torch.tensor([0.0, -0.0, float("nan"), 0.5, float("nan"), -0.0, 1.0, 0.0]).to(device)
    cu = sizes_to_cu([8], device)
    for k in (0.125, 0.25, 0.375, 0.5, 0.75, 1.0):
        got = _ops.keep_mask(scores, cu, keep_ratio=k, scores_are_logits=False)
        assert torch.equal(got.cpu(), keep_mask_ref(scores.cpu(), cu.cpu(), keep_ratio=k, scores_are_logits=False))


@pytest.mark.parametrize("device", DEVICES)
def test_keep_mask_tokens_outside_images_are_false(device):
    scores = torch.randn(12).to(device)
    cu = torch.tensor([2, 5, 5, 9], dtype=torch.int32, device=device)
    got = _ops.keep_mask(scores, cu, keep_ratio=1.0)
    assert got[:2].sum() == 0 and got[9:].sum() == 0 and got[2:9].all()


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=0, max_size=5),
    threshold=st.floats(0, 1),
    max_keep_ratio=st.one_of(st.none(), st.floats(0, 1)),
    min_keep=st.integers(0, 5),
    keep_ratio=st.one_of(st.none(), st.floats(0, 1)),
    logits=st.booleans(),
    mode=st.sampled_from(["normal", "ties", "saturated", "nan"]),
    seed=st.integers(0, 2**16),
)
def test_keep_mask_hypothesis(sizes, threshold, max_keep_ratio, min_keep, keep_ratio, logits, mode, seed):
    scores = keep_scores(sizes, mode, F32, seed)
    if not logits:
        scores = torch.sigmoid(scores)
    opts = dict(threshold=threshold, max_keep_ratio=max_keep_ratio, min_keep=min_keep, keep_ratio=keep_ratio,
                scores_are_logits=logits)
    got = _ops.keep_mask(scores, sizes_to_cu(sizes, "cpu"), **opts)
    assert torch.equal(got, keep_mask_from_scores(scores, sizes, **opts))


KEEP_NAN_CASES = [
    # p (already probabilities), options, kept: worked out by hand from the rule
    # floor decides: exactly the top 2 of the order nan, nan, 0.9; 0.9 is above the threshold but left out
    ([math.nan, math.nan, 0.9], dict(min_keep=2), [True, True, False]),
    # the cap decides (3 above 0.5 > cap 2): the top 2 are nan and 0.9
    ([0.9, math.nan, 0.8, 0.7], dict(max_keep_ratio=0.5), [True, True, False, False]),
    # neither decides (1 above, floor 1): the threshold alone, NaN is not above it
    ([math.nan, 0.9, 0.2], dict(min_keep=1), [False, True, False]),
    # floor 3 of 4 with one above: the top 3 are nan, nan, 0.9
    ([0.1, math.nan, 0.9, math.nan], dict(min_keep=3), [False, True, True, True]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(KEEP_NAN_CASES)))
def test_keep_mask_nan_scores_keep_exactly_the_top_k(case, device):
    probs, opts, want = KEEP_NAN_CASES[case]
    opts = dict(threshold=0.5, scores_are_logits=False, **opts)
    scores = torch.tensor(probs).to(device)
    cu = sizes_to_cu([len(probs)], device)
    want = torch.tensor(want)
    assert torch.equal(keep_mask_ref(scores, cu, **opts).cpu(), want)
    assert torch.equal(_ops.keep_mask(scores, cu, **opts).cpu(), want)
    with _ops.use_kernels(False):
        assert torch.equal(keep_mask_from_scores(scores, [len(probs)], **opts).cpu(), want)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=4),
    threshold=st.floats(0, 1),
    max_keep_ratio=st.one_of(st.none(), st.floats(0, 1)),
    min_keep=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_keep_mask_count_does_not_depend_on_nan(sizes, threshold, max_keep_ratio, min_keep, seed):
    # Independent of the sort: each image keeps max(floor, min(above, cap)) tokens, every
    # token above the threshold when neither bound decides, and only top-ranked ones otherwise.
    scores = keep_scores(sizes, "nan", F32, seed)
    opts = dict(threshold=threshold, max_keep_ratio=max_keep_ratio, min_keep=min_keep)
    got = _ops.keep_mask(scores, sizes_to_cu(sizes, "cpu"), **opts)
    assert torch.equal(got, keep_mask_ref(scores, sizes_to_cu(sizes, "cpu"), **opts))
    probs = torch.sigmoid(scores)
    start = 0
    for n in sizes:
        p, kept = probs[start:start + n], got[start:start + n]
        start += n
        above = p > threshold
        cap = n if max_keep_ratio is None else int(max_keep_ratio * n)
        count = int(above.sum())
        want = max(min(n, min_keep), min(count, cap))
        assert int(kept.sum()) == want
        if min(n, min_keep) <= count <= cap:
            assert torch.equal(kept, above)
        else:  # a kept token outranks every dropped one (NaN highest)
            rank = torch.where(p.isnan(), torch.full_like(p, 2.0), p)
            if kept.any() and (~kept).any():
                assert rank[kept].min() >= rank[~kept].max()


@pytest.mark.gpu
def test_keep_mask_cuda_large_images_use_the_global_memory_path():
    # More tokens per image than fit the kernel's shared-memory key buffer.
    sizes = [30000, 5, 24576, 24577]
    for mode in ("normal", "ties", "saturated"):
        scores = keep_scores(sizes, mode, F32, seed=9).cuda()
        cu = sizes_to_cu(sizes, "cuda")
        for opts in (dict(keep_ratio=0.11), dict(threshold=0.5, max_keep_ratio=0.222), dict(threshold=0.999, min_keep=77)):
            poison("cuda")
            got = _ops.keep_mask(scores, cu, **opts)
            assert torch.equal(got.cpu(), keep_mask_ref(scores, cu, **opts).cpu()), (mode, opts)


@pytest.mark.parametrize("device", DEVICES)
def test_keep_mask_counts_round_like_python(device):
    """The count is ``ceil(keep_ratio * n - 1e-9)`` rounded as Python rounds it (product, then
    difference): a fused multiply-add moves ceil() across an integer for ratios like this one.
    Ratios far beyond 1 keep everything (no out-of-range integer cast)."""
    scores = torch.tensor([0.3, 0.9, 0.1, 0.6, 0.2, 0.8, 0.4]).to(device)
    cu = sizes_to_cu([3, 4], device)
    cases = [dict(keep_ratio=0.33333333366666673), dict(keep_ratio=1e300), dict(keep_ratio=1.5),
             dict(threshold=0.0, max_keep_ratio=1e300), dict(threshold=0.0, max_keep_ratio=0.5),
             dict(threshold=0.0, max_keep_ratio=1e300, min_keep=2)]
    for opts in cases:
        got = _ops.keep_mask(scores, cu, scores_are_logits=False, **opts)
        want = keep_mask_ref(scores.cpu(), cu.cpu(), scores_are_logits=False, **opts)
        assert torch.equal(got.cpu(), want), opts
    # by hand: 0.33333333366666673 * 3 = 1.000000001; minus 1e-9 rounds to exactly 1.0, so ceil keeps 1
    first = _ops.keep_mask(scores, cu, keep_ratio=0.33333333366666673, scores_are_logits=False).cpu()
    assert first.tolist()[:3] == [False, True, False]


def test_keep_mask_errors():
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="1-D"):
        _ops.keep_mask(torch.randn(3, 1), cu)
    with pytest.raises(RuntimeError, match="min_keep"):
        _ops.keep_mask(torch.randn(3), cu, min_keep=-1)
    with pytest.raises(RuntimeError, match="keep_ratio"):
        _ops.keep_mask(torch.randn(3), cu, keep_ratio=float("nan"))
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        _ops.keep_mask(torch.randn(3), torch.tensor([0, 4], dtype=torch.int32))


# ---------------------------------------------------------------------------
# scatter_rows / gather_rows
# ---------------------------------------------------------------------------


def scatter_inputs(batch, seq, rows, hidden, dtype, index_dtype, *, seed=0, layout="contiguous", residual=False):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, seq, hidden, generator=g).to(dtype)
    packed = torch.randn(batch, rows, hidden, generator=g).to(dtype)
    if layout == "strided":
        full = torch.randn(batch, seq + 3, hidden, generator=g).to(dtype)[:, 2:-1]
        packed = torch.randn(rows, batch, hidden, generator=g).to(dtype).transpose(0, 1)
    index = torch.full((batch, rows), -1, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(0, min(rows, seq) + 1, (1,), generator=g))
        targets = torch.randperm(seq, generator=g)[:n]
        slots = torch.randperm(rows, generator=g)[:n]
        index[b, slots] = targets
    res = torch.randn(batch, rows, hidden, generator=g).to(dtype) if residual else None
    return full, packed, index.to(index_dtype), res


SCATTER_CASES = [
    # batch, seq, rows, hidden, dtype
    (1, 5, 3, 8, F32),
    (2, 40, 13, 3584, BF16),  # Qwen2.5-VL-7B rows: 16-byte vectors
    (3, 17, 17, 7, F16),  # odd rows: 2-byte vectors
    (2, 9, 4, 5, F64),
    (2, 64, 20, 33, F32),
    (4, 11, 6, 1, BF16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("case", SCATTER_CASES, ids=lambda c: f"B{c[0]}-S{c[1]}-P{c[2]}-H{c[3]}-{str(c[4])[6:]}")
def test_scatter_rows_matches_reference_exactly(case, layout, index_dtype, residual, device):
    batch, seq, rows, hidden, dtype = case
    full, packed, index, res = scatter_inputs(batch, seq, rows, hidden, dtype, index_dtype, seed=seq * hidden,
                                              layout=layout, residual=residual)
    want = scatter_rows_ref(full, packed, index, res)
    d = lambda t: None if t is None else t.to(device)
    poison(device)
    got = _ops.scatter_rows(d(full), d(packed), d(index), d(res))
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got.cpu(), want)
    inplace = d(full).clone()
    out = _ops.scatter_rows(inplace, d(packed), d(index), d(res), inplace=True)
    assert out is inplace
    assert torch.equal(inplace.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_rows_inplace_on_a_view_writes_through(device):
    base = torch.randn(2, 10, 6).to(device)
    view = base[:, 2:8]  # rows contiguous, tensor not
    packed = torch.randn(2, 3, 6).to(device)
    index = torch.tensor([[0, 5, -1], [3, -1, 1]]).to(device)
    want = scatter_rows_ref(view.cpu(), packed.cpu(), index.cpu())
    _ops.scatter_rows(view, packed, index, inplace=True)
    assert torch.equal(base[:, 2:8].cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_then_scatter_is_identity(device):
    g = torch.Generator().manual_seed(4)
    full = torch.randn(3, 20, 16, generator=g).to(device)
    keep = (torch.rand(3, 20, generator=g) < 0.4).to(device)
    packed, index = _ops.gather_rows(full, keep)
    assert packed.shape == (3, int(keep.sum(1).max()), 16)
    assert torch.equal(_ops.scatter_rows(full, packed, index).cpu(), full.cpu())
    zeros = torch.zeros_like(full)
    merged = _ops.scatter_rows(zeros, packed, index).cpu()
    assert torch.equal(merged, torch.where(keep.cpu()[..., None], full.cpu(), zeros.cpu()))


def test_scatter_rows_errors():
    full = torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match="packed"):
        _ops.scatter_rows(full, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="index"):
        _ops.scatter_rows(full, torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        _ops.scatter_rows(full, torch.randn(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="residual"):
        _ops.scatter_rows(full, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 3))
    with pytest.raises(RuntimeError, match="out of range"):
        _ops.scatter_rows(full, torch.randn(2, 3, 4), torch.tensor([[0, 1, 5], [0, 1, 2]]))


# ---------------------------------------------------------------------------
# compact_tokens: the single-launch CUDA kernel
# ---------------------------------------------------------------------------


def compact_inputs(batch, seq, hidden, n_caches, heads, head_dim, density, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, seq, generator=g) < density
    for b in range(batch):  # left padding is never kept
        keep[b, : int(torch.randint(0, seq // 4 + 1, (1,), generator=g))] = False
    h = torch.randn(batch, seq, hidden, generator=g).to(BF16)
    caches = [torch.randn(batch, heads, seq, head_dim, generator=g).to(BF16) for _ in range(n_caches)]
    pos = torch.randint(0, 10_000, (4, batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    return keep, h, caches, pos, mask


def flat(result):
    hidden, caches, positions, mask = result
    return [hidden, *caches, positions, mask]


@pytest.mark.gpu
@pytest.mark.parametrize("n_caches", [0, 2, 38, 401, 850])  # one launch up to 400 tensors
def test_compact_tokens_cuda_many_tensors(n_caches):
    inputs = compact_inputs(2, 301, 96, n_caches, 2, 16, 0.3, seed=n_caches)
    want = compact_tokens_ref(*inputs)
    poison("cuda")
    got = _ops.compact_tokens(*[x.cuda() if torch.is_tensor(x) else [c.cuda() for c in x] for x in inputs])
    for g_, w in zip(flat(got), flat(want)):
        assert torch.equal(g_.cpu(), w)


@pytest.mark.gpu
def test_compact_tokens_cuda_is_one_launch():
    from torch.profiler import ProfilerActivity, profile

    inputs = compact_inputs(4, 5000, 3584, 38, 4, 128, 0.2, seed=1)  # Qwen2.5-VL-7B, K = 18
    cuda_inputs = [x.cuda() if torch.is_tensor(x) else [c.cuda() for c in x] for x in inputs]
    out_len = int(inputs[0].sum(1).max())
    _ops.compact_tokens(*cuda_inputs, out_len=out_len)  # warm up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = _ops.compact_tokens(*cuda_inputs, out_len=out_len)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e.name for e in kernels if "compact" in e.name]
    assert len(launches) == 1, [e.name for e in kernels]
    want = compact_tokens_ref(*inputs, out_len=out_len)
    for g_, w in zip(flat(got), flat(want)):
        assert torch.equal(g_.cpu(), w)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 5),
    seq=st.integers(1, 3000),
    density=st.floats(0, 1),
    extra=st.integers(0, 3),
    n_caches=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_compact_tokens_cuda_hypothesis(batch, seq, density, extra, n_caches, seed):
    inputs = compact_inputs(batch, seq, 24, n_caches, 2, 8, density, seed)
    out_len = int(inputs[0].sum(1).max()) + extra
    want = compact_tokens_ref(*inputs, out_len=out_len)
    poison("cuda")
    got = _ops.compact_tokens(*[x.cuda() if torch.is_tensor(x) else [c.cuda() for c in x] for x in inputs],
                              out_len=out_len)
    for g_, w in zip(flat(got), flat(want)):
        assert torch.equal(g_.cpu(), w)


# ---------------------------------------------------------------------------
# torch.library machinery
# ---------------------------------------------------------------------------


def opcheck_cases(device):
    q, cos, sin, keys, cu, pos, mask = glimpse_inputs(2, 8, 2, 12, 16, [3, 5], F32, seed=1, device=device)
    vq, vk, vv, vpos, vcu = vip_inputs([5, 1, 7], 2, 16, 8, F32, seed=2, device=device)
    hq, hk, hv, hpos, hcu = vip_inputs([20, 9], 4, 192, 64, BF16, seed=2, device=device)
    scores = torch.randn(20).to(device)
    kcu = sizes_to_cu([7, 0, 13], device)
    full, packed, index, res = (None if t is None else t.to(device)
                                for t in scatter_inputs(2, 9, 4, 8, F32, torch.int64, seed=3, residual=True))
    keep, hidden, caches, positions, amask = (x.to(device) if torch.is_tensor(x) else [c.to(device) for c in x]
                                              for x in compact_inputs(2, 9, 8, 2, 2, 4, 0.5, seed=4))
    return [
        ("compact_tokens", (keep, int(keep.sum(1).max()) + 1, hidden, caches, positions, amask)),
        ("glimpse_attention_map", (q, cos, sin, keys, cu, pos, None, 0.25, False)),
        ("glimpse_attention_map", (q.to(BF16), cos, sin, keys.to(BF16), cu, pos, mask, 0.25, True)),
        ("vip_attention", (vq, vk, vv, vpos, vcu, 7, 0.25, 10000.0)),
        ("vip_attention", (hq, hk, hv, hpos, hcu, 20, 192 ** -0.5, 10000.0)),
        ("keep_mask", (scores, kcu, 0.5, 0.3, 2, None, True)),
        ("keep_mask", (scores, kcu, 0.5, None, 1, 0.25, False)),
        ("scatter_rows", (full, packed, index, None)),
        ("scatter_rows", (full, packed, index.int(), res)),
        ("scatter_rows_", (full.clone(), packed, index, res)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(10))
def test_opcheck(case, device):
    name, args = opcheck_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.token_prune, name).default, args)


def test_fake_kernels_give_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [(name, args) for name, args in opcheck_cases("cpu") if name != "scatter_rows_"]
    real = [getattr(torch.ops.token_prune, name).default(*args) for name, args in cases]
    with FakeTensorMode() as mode:
        for (name, args), want in zip(cases, real):
            fake_args = [mode.from_tensor(a) if torch.is_tensor(a) else
                         [mode.from_tensor(c) for c in a] if isinstance(a, list) else a for a in args]
            out = getattr(torch.ops.token_prune, name).default(*fake_args)
            outs = flat(out) if name == "compact_tokens" else [out]
            wants = flat(want) if name == "compact_tokens" else [want]
            for o, w in zip(outs, wants):
                assert o.shape == w.shape and o.dtype == w.dtype, name


def test_torch_compile_traces_the_new_ops():
    q, k, v, pos, cu = vip_inputs([6, 3], 2, 8, 4, F32, seed=5)
    scores = torch.randn(9)

    def step(q, k, v, pos, cu, scores):
        out = _ops.vip_attention(q, k, v, pos, cu, 6)
        keep = _ops.keep_mask(scores, cu, keep_ratio=0.5)
        return out * 2, keep

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(q, k, v, pos, cu, scores), step(q, k, v, pos, cu, scores)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------
# the methods' kernel paths vs their plain PyTorch paths
# ---------------------------------------------------------------------------

KERNEL_DEVICES = [
    pytest.param("cpu", id="cpu-kernels"),  # CPU kernels through the GPU code paths
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def kernels_on(device):
    return _ops.use_kernels(True, on_cpu=device == "cpu")


def _qwen_samples():
    return [tiny.SampleSpec(images=((128, 96),), prefix_len=3, suffix_len=6),
            tiny.SampleSpec(images=((64, 64), (32, 64)), prefix_len=5, suffix_len=4)]


def _llava_samples():
    return [tiny.SampleSpec(images=((56, 56),), prefix_len=3, suffix_len=6),
            tiny.SampleSpec(images=((56, 56), (56, 56)), prefix_len=5, suffix_len=4)]


def _llava_next_samples():
    return [tiny.SampleSpec(images=((60, 100),), prefix_len=3, suffix_len=6),
            tiny.SampleSpec(images=((100, 60), (40, 100)), prefix_len=5, suffix_len=4)]


FAMILIES = {
    "qwen2_5_vl": (functools.partial(tiny.tiny_model, "qwen2_5_vl"), tiny.make_inputs, _qwen_samples),
    "llava": (functools.partial(tiny.tiny_model, "llava"), tiny.make_inputs, _llava_samples),
    "llava_next": (functools.partial(tiny.tiny_model, "llava_next"), tiny.make_inputs, _llava_next_samples),
}

METHODS = [
    ("glimpse", dict(keep_ratio=0.25, layer=2)),
    ("glimpse", dict(threshold=0.5, max_keep_ratio=0.4, min_keep=3, layer=1)),
    ("fastv", dict(keep_ratio=0.3, layer=1)),
    ("alvts", dict(keep_ratio=0.3, start_layer=1)),
]


def run_patched(model, inputs, method, opts):
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        logits = model(**inputs).logits
        keep = handle.keep_mask.clone() if handle.keep_mask is not None else None
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return logits, keep, tokens


@pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("method, opts", METHODS, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_methods_give_the_same_tokens_with_kernels(family, method, opts, device):
    build, make_inputs, samples = FAMILIES[family]
    model = build(dtype=F32, seed=11).to(device)
    inputs = make_inputs(model, samples(), seed=2)
    with _ops.use_kernels(False):
        ref_logits, ref_keep, ref_tokens = run_patched(model, inputs, method, opts)
    with kernels_on(device):
        logits, keep, tokens = run_patched(model, inputs, method, opts)
    if ref_keep is not None:
        assert torch.equal(keep, ref_keep)
    assert torch.equal(tokens, ref_tokens)
    assert logits.shape == ref_logits.shape
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_half_precision_models_run_every_kernel(family, dtype):
    # keep_ratio 1.0: the VIP (tensor-core attention) runs but cannot change what is
    # kept, so the tokens must match exactly; 0.5 must run and keep the same count.
    build, make_inputs, samples = FAMILIES[family]
    model = build(dtype=dtype, seed=12).to("cuda")
    inputs = make_inputs(model, samples(), seed=3)
    with _ops.use_kernels(False):
        _, ref_keep, ref_tokens = run_patched(model, inputs, "glimpse", dict(keep_ratio=1.0, layer=2))
    _, keep, tokens = run_patched(model, inputs, "glimpse", dict(keep_ratio=1.0, layer=2))
    assert torch.equal(keep, ref_keep) and torch.equal(tokens, ref_tokens)
    with _ops.use_kernels(False):
        _, ref_keep, _ = run_patched(model, inputs, "glimpse", dict(keep_ratio=0.5, layer=2))
    _, keep, _ = run_patched(model, inputs, "glimpse", dict(keep_ratio=0.5, layer=2))
    assert torch.equal(keep.sum(1), ref_keep.sum(1))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_vip_fused_attention_matches_the_sdpa_path(device):
    from token_prune.vip import GlimpseConfig, GlimpseModules

    cfg = GlimpseConfig(llm_hidden_size=64, llm_num_layers=4, llm_num_heads=28, vision_width=32,
                        vision_layers=[3, 2, 1, 0], layer=2)
    dtype = F32 if device == "cpu" else BF16
    vip = GlimpseModules.random(cfg, seed=3).vip.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(6)
    grid = torch.tensor([[7, 9], [1, 1], [16, 12]])
    n = int((grid[:, 0] * grid[:, 1]).sum())
    attn = torch.randn(n, 28, generator=g).to(device)
    conds = [torch.randn(n, 32, generator=g).to(device) for _ in range(4)]
    with torch.no_grad():
        with _ops.use_kernels(False):
            ref = vip(attn, conds, grid)
            ref64 = vip.double()(attn.double(), [c.double() for c in conds], grid)
            vip.to(dtype)
        with kernels_on(device):
            got = vip(attn, conds, grid)
            lengths = (grid[:, 0] * grid[:, 1]).tolist()
            from token_prune.vip import positions_from_grid
            got_pos = vip(attn, conds, positions=positions_from_grid(grid), lengths=lengths)
    assert torch.equal(got, got_pos)
    assert_within_twice_reference(got.double(), ref.double(), ref64, floor=1e-5, what="VIP logits")


# ---------------------------------------------------------------------------
# the benchmark script
# ---------------------------------------------------------------------------


def test_kernel_benchmark_smoke_run(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".md"]
