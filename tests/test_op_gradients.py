"""Gradients of the ops a pruned forward runs through (compaction, scatter/merge): opcheck with
inputs that require grad (autograd registration, AOT dispatch of forward and backward), numerical
gradient checks in float64, and the backward against the plain-PyTorch reference differentiated by
autograd itself."""

from __future__ import annotations

import pytest
import torch

from token_prune import _ops
from token_prune.reference import compact_tokens_ref, scatter_rows_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
COMPACT = torch.ops.token_prune.compact_tokens.default
SCATTER = torch.ops.token_prune.scatter_rows.default


def _compact_inputs(batch=3, seq=7, dim=5, caches=((2, 3), (1, 4)), density=0.5, seed=0, device="cpu",
                    dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, seq, generator=g) < density
    keep[0, :2] = False  # left padding is never kept
    hidden = torch.randn(batch, seq, dim, generator=g, dtype=dtype)
    cs = [torch.randn(batch, h, seq, d, generator=g, dtype=dtype) for h, d in caches]
    positions = torch.randint(0, 100, (3, batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    to = lambda t: t.to(device)  # noqa: E731
    return to(keep), to(hidden).requires_grad_(), [to(c).requires_grad_() for c in cs], to(positions), to(mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra", [0, 2])
def test_compact_tokens_opcheck_with_gradients(device, extra):
    keep, hidden, caches, positions, mask = _compact_inputs(device=device, dtype=torch.float32)
    out_len = int(keep.sum(1).max()) + extra
    torch.library.opcheck(COMPACT, (keep, out_len, hidden, caches, positions, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_compact_tokens_gradcheck(device):
    keep, hidden, caches, positions, mask = _compact_inputs(device=device)
    out_len = int(keep.sum(1).max()) + 1

    def fn(h, c0, c1):
        out_h, out_c, _, _ = _ops.compact_tokens(keep, h, [c0, c1], positions, mask, out_len)
        return out_h, out_c[0], out_c[1]

    assert torch.autograd.gradcheck(fn, (hidden, *caches))


@pytest.mark.parametrize("device", DEVICES)
def test_compact_tokens_backward_equals_reference_backward(device):
    """The registered backward == autograd through the boolean-indexing reference; rows that were
    dropped get exactly zero, kept rows exactly the output row's gradient."""
    keep, hidden, caches, positions, mask = _compact_inputs(batch=4, seq=9, device=device, seed=3)
    out_len = int(keep.sum(1).max())
    g = torch.Generator().manual_seed(5)
    w_h = torch.randn(keep.shape[0], out_len, hidden.shape[2], generator=g, dtype=hidden.dtype).to(device)
    w_c = [torch.randn(c.shape[0], c.shape[1], out_len, c.shape[3], generator=g, dtype=c.dtype).to(device)
           for c in caches]

    def loss(fn):
        out_h, out_c, _, _ = fn(keep, hidden, caches, positions, mask, out_len)
        return (out_h * w_h).sum() + sum((o * w).sum() for o, w in zip(out_c, w_c))

    got = torch.autograd.grad(loss(_ops.compact_tokens), [hidden, *caches])
    want = torch.autograd.grad(loss(compact_tokens_ref), [hidden, *caches])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(got[0][~keep], torch.zeros_like(got[0][~keep]))


def test_compact_tokens_gradient_of_unused_outputs():
    """Only the hidden output used: the caches' gradient is zero (torch materialises the unused
    outputs' gradients), the hidden state's is one on kept rows and zero on dropped ones."""
    keep, hidden, caches, positions, mask = _compact_inputs()
    out_h, _, _, _ = _ops.compact_tokens(keep, hidden, caches, positions, mask)
    out_h.sum().backward()
    assert all(c.grad is None or not bool(c.grad.any()) for c in caches)
    assert torch.equal(hidden.grad, keep[..., None].expand_as(hidden).to(hidden.dtype))


def _scatter_inputs(device="cpu", dtype=torch.float64, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, S, Sp, H = 3, 8, 4, 5
    full = torch.randn(B, S, H, generator=g, dtype=dtype)
    packed = torch.randn(B, Sp, H, generator=g, dtype=dtype)
    index = torch.stack([torch.randperm(S, generator=g)[:Sp] for _ in range(B)])
    index[1, 0] = -1  # a padding slot
    res = torch.randn(B, Sp, H, generator=g, dtype=dtype) if residual else None
    to = lambda t: None if t is None else t.to(device).requires_grad_(t.is_floating_point())  # noqa: E731
    return to(full), to(packed), index.to(device), to(res)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
def test_scatter_rows_opcheck_with_gradients(device, residual):
    torch.library.opcheck(SCATTER, _scatter_inputs(device, torch.float32, residual))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
def test_scatter_rows_gradcheck_and_reference(device, residual):
    full, packed, index, res = _scatter_inputs(device, residual=residual, seed=2)
    leaves = [t for t in (full, packed, res) if t is not None]

    def fn(fn_, *xs):
        f, p = xs[0], xs[1]
        r = xs[2] if residual else None
        return fn_(f, p, index, r)

    assert torch.autograd.gradcheck(lambda *xs: fn(_ops.scatter_rows, *xs), tuple(leaves))
    w = torch.randn_like(full)
    got = torch.autograd.grad((fn(_ops.scatter_rows, *leaves) * w).sum(), leaves)
    want = torch.autograd.grad((fn(scatter_rows_ref, *leaves) * w).sum(), leaves)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
