"""Launch every CUDA kernel of token_prune once or more, small and odd-sized, for compute-sanitizer.

    compute-sanitizer --tool memcheck --kernel-name kns=token_prune python bench/gpu/sanitize_ops.py
    python bench/gpu/sanitize_ops.py --device cpu      # the same calls through the CPU kernels

Each call uses odd sizes and ragged batches (empty, one-token and tile-edge images) so that the
bounds of every loop are exercised, and its result is compared with the plain PyTorch reference
(exact for the data-movement ops, within twice the same-precision reference's error against
float64 for the two attention ops), so a run under the sanitizer is also a correctness run.
Sizes stay small because racecheck instruments every shared-memory access. The 64-bit index
instantiation of the compaction kernel needs more than 4 GiB of data and is left to the GPU tests.

``KERNELS`` names the kernels the calls must launch on a GPU; tests/test_gpu_scripts.py checks
with the profiler that they do (the profiler and the sanitizer cannot run in one process).
Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from token_prune import _ops  # noqa: E402
from token_prune.reference import (  # noqa: E402
    compact_tokens_ref,
    glimpse_attention_map_ref,
    keep_mask_ref,
    scatter_rows_ref,
    vip_attention_ref,
)

# Substrings of the demangled names of the kernels the calls below launch on CUDA (sm_80+).
KERNELS = (
    "glimpse_map_kernel<c10::BFloat16, 8>",
    "glimpse_map_kernel<float, 1>",
    "glimpse_lse_kernel<c10::Half, 8>",
    "glimpse_lse_kernel<float, 1>",
    "vip_attention_tc_kernel<__nv_bfloat16>",
    "vip_attention_tc_kernel<__half>",
    "vip_attention_simt_kernel<float, float>",
    "vip_attention_simt_kernel<c10::BFloat16, float>",
    "keep_mask_kernel",
    "compact_kernel<32, unsigned int>",
    "compact_kernel<400, unsigned int>",
    "scatter_copy_kernel<uint4, long>",
    "scatter_copy_kernel<unsigned int, int>",
    "scatter_add_kernel<c10::BFloat16, 8, long>",
    "scatter_add_kernel<float, 1, int>",
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


class Checker:
    def __init__(self, device: torch.device, verbose: bool):
        self.device = device
        self.verbose = verbose
        self.failures: list[str] = []
        self.calls = 0

    def record(self, what: str, ok: bool, detail: str = "") -> None:
        self.calls += 1
        if not ok:
            self.failures.append(f"{what}: {detail}")
        if self.verbose or not ok:
            print(f"{'ok  ' if ok else 'FAIL'} {what} {detail}", flush=True)

    def exact(self, what: str, got, want) -> None:
        got, want = ([got], [want]) if torch.is_tensor(got) else (got, want)
        ok = all(torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want))
        self.record(what, ok, "" if ok else "differs from the reference")

    def close(self, what: str, got, same, exact) -> None:
        got, same, exact = got.cpu().double(), same.cpu().double(), exact.cpu().double()
        if got.isnan().any() or not torch.equal(got.isinf(), exact.isinf()):
            self.record(what, False, "NaN or misplaced infinities")
            return
        fin = ~exact.isinf()

        def err(x):
            return float((x[fin] - exact[fin]).norm() / exact[fin].norm().clamp_min(1e-300))

        e_got, e_ref = err(got), err(same)
        self.record(what, e_got <= 2 * e_ref + 1e-6, f"rel err {e_got:.2e} (reference {e_ref:.2e})")


def glimpse_calls(c: Checker) -> None:
    g = torch.Generator().manual_seed(1)
    # (dtype, heads, kv heads, head dim, key layout): bf16/fp16 rows of 16-byte chunks take the
    # vector path; float32 keys with a strided last dim take the element path.
    for dtype, heads, kv, dim, strided in ((BF16, 28, 4, 128, False), (F16, 12, 2, 64, False),
                                           (F32, 6, 3, 40, True)):
        sizes, seq = [37, 0, 1, 90], 131
        batch = len(sizes)
        q = torch.randn(batch, heads, dim, generator=g).to(c.device, dtype)
        ang = torch.rand(batch, dim // 2, generator=g) * 30
        cos = torch.cat([ang, ang], -1).cos().to(c.device, dtype)
        sin = torch.cat([ang, ang], -1).sin().to(c.device, dtype)
        keys = torch.randn(batch, kv, seq, 2 * dim if strided else dim, generator=g).to(c.device, dtype)
        keys = keys[..., ::2] if strided else keys
        positions = torch.cat([torch.randperm(seq, generator=g)[:n] for n in sizes]).to(c.device)
        cu = _ops.cu_seqlens_from_sizes(sizes, c.device)
        mask = (torch.rand(batch, seq, generator=g) < 0.9).to(c.device)
        for log_softmax in (False, True):
            got = _ops.glimpse_attention_map(q, cos, sin, keys, cu, positions, mask, log_softmax=log_softmax)
            scale = 1 / math.sqrt(dim)
            same = glimpse_attention_map_ref(q, cos, sin, keys, cu, positions, mask, scale, log_softmax)
            exact = glimpse_attention_map_ref(q.double(), cos.double(), sin.double(), keys.double(), cu, positions,
                                              mask, scale, log_softmax)
            c.close(f"glimpse_attention_map {dtype} d={dim} strided={strided} log_softmax={log_softmax}",
                    got, same, exact)


def vip_calls(c: Checker) -> None:
    g = torch.Generator().manual_seed(2)
    # bf16/fp16 at the VIP's widths: tensor-core kernel; float32 and a bf16 with another width: SIMT.
    cases = ((BF16, 192, 64, [65, 1, 0, 130]), (F16, 192, 64, [63, 17]), (F32, 192, 64, [33, 1, 20]),
             (BF16, 16, 8, [9, 40]))
    for dtype, dim, vdim, sizes in cases:
        n, heads = sum(sizes), 4
        q = torch.randn(n, heads * dim, generator=g).view(n, heads, dim).to(c.device, dtype)
        k = torch.randn(n, heads * dim, generator=g).view(n, heads, dim).to(c.device, dtype)
        v = torch.randn(n, heads * vdim, generator=g).view(n, heads, vdim).to(c.device, dtype)
        pos = torch.cat([torch.stack([torch.arange(m) // 7, torch.arange(m) % 7], -1) for m in sizes]).to(c.device)
        cu = _ops.cu_seqlens_from_sizes(sizes, c.device)
        # max_seqlen below the longest image: the kernels stride over the rest.
        for max_seqlen in (max(sizes), 1):
            got = _ops.vip_attention(q, k, v, pos, cu, max_seqlen)
            same = vip_attention_ref(q, k, v, pos, cu, max_seqlen)
            exact = vip_attention_ref(q.double(), k.double(), v.double(), pos, cu, max_seqlen)
            c.close(f"vip_attention {dtype} D={dim} Dv={vdim} {sizes} max_seqlen={max_seqlen}",
                    got.float(), same.float(), exact.float())


def keep_calls(c: Checker) -> None:
    g = torch.Generator().manual_seed(3)
    sizes = [1, 0, 7, 129, 1000, 26000]  # the last does not fit the kernel's shared-memory key buffer
    scores = torch.randn(sum(sizes), generator=g) * 2
    scores[torch.rand(scores.shape, generator=g) < 0.01] = float("nan")
    scores = scores.to(c.device)
    cu = _ops.cu_seqlens_from_sizes(sizes, c.device)
    for opts in (dict(keep_ratio=0.11), dict(threshold=0.5, max_keep_ratio=0.222), dict(threshold=0.999, min_keep=5),
                 dict(threshold=0.3)):
        c.exact(f"keep_mask {opts}", _ops.keep_mask(scores, cu, **opts), keep_mask_ref(scores, cu, **opts))


def compact_calls(c: Checker) -> None:
    g = torch.Generator().manual_seed(4)
    batch, seq = 3, 77
    keep = torch.rand(batch, seq, generator=g) < 0.4
    keep[1] = False  # a sample that keeps nothing
    hidden = torch.randn(batch, seq, 99, generator=g).to(BF16)  # odd rows: 2-byte vectors
    positions = torch.randint(0, 1000, (4, batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    # 6 caches: one launch with the small descriptor pack; 41: the large one.
    for n_caches in (6, 41):
        caches = [torch.randn(batch, 2, seq, 16 if i % 2 else 5, generator=g).to(F16) for i in range(n_caches)]
        out_len = int(keep.sum(1).max()) + 3
        inputs = (keep, hidden, caches, positions, mask)
        want = compact_tokens_ref(*inputs, out_len=out_len)
        got = _ops.compact_tokens(keep.to(c.device), hidden.to(c.device), [t.to(c.device) for t in caches],
                                  positions.to(c.device), mask.to(c.device), out_len=out_len)
        c.exact(f"compact_tokens {n_caches} caches", [got[0], *got[1], got[2], got[3]],
                [want[0], *want[1], want[2], want[3]])


def scatter_calls(c: Checker) -> None:
    g = torch.Generator().manual_seed(5)
    # (dtype, row width, index dtype, residual): 16-byte rows and an odd float32 row.
    for dtype, width, index_dtype, residual in ((BF16, 64, torch.int64, False), (F32, 3, torch.int32, False),
                                                (BF16, 64, torch.int64, True), (F32, 3, torch.int32, True)):
        batch, seq, rows = 3, 29, 11
        full = torch.randn(batch, seq, width, generator=g).to(dtype)
        packed = torch.randn(batch, rows, width, generator=g).to(dtype)
        index = torch.stack([torch.randperm(seq, generator=g)[:rows] for _ in range(batch)]).to(index_dtype)
        index[:, ::4] = -1
        res = torch.randn(batch, rows, width, generator=g).to(dtype) if residual else None
        want = scatter_rows_ref(full, packed, index, res)
        d = (lambda t: None if t is None else t.to(c.device))
        what = f"scatter_rows {dtype} width={width} {index_dtype} residual={residual}"
        c.exact(what, _ops.scatter_rows(d(full), d(packed), d(index), d(res)), want)
        target = d(full).clone()
        _ops.scatter_rows(target, d(packed), d(index), d(res), inplace=True)
        c.exact(what + " in place", target, want)


def run(device: torch.device, verbose: bool = False) -> Checker:
    """Make every call on ``device``; returns the checker with its failures."""
    c = Checker(device, verbose)
    for calls in (glimpse_calls, vip_calls, keep_calls, compact_calls, scatter_calls):
        calls(c)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the same calls on the CPU kernels)")
    ap.add_argument("--verbose", action="store_true", help="print every call, not only failures")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not _ops.EXTENSION_WITH_CUDA:
        print(f"sanitize_ops: the CUDA extension is not loaded ({_ops.EXTENSION_ERROR}); nothing to check",
              file=sys.stderr)
        return 2
    c = run(device, args.verbose)
    print(f"sanitize_ops: {c.calls} checked calls on {device}, {len(c.failures)} failed")
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
