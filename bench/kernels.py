"""Times token_prune's fused kernels against the PyTorch code they replace.

    python bench/kernels.py                 # GPU: realistic sizes (Qwen2.5-VL-7B)
    python bench/kernels.py --smoke         # any machine: tiny sizes on the CPU, proves the script
    python bench/kernels.py --ops vip_attention keep_mask --repeats 50

For every case: a correctness check of the kernel against its reference on the same inputs
(exact for the data-movement ops, an error bound for the attention ops) *before* timing, then
CUDA-event timing of both (warm-up, then the median of ``--repeats`` runs, the L2 cache flushed
before each run by writing a buffer twice its size). Memory-bound ops are also reported as a
fraction of the measured device-to-device copy bandwidth (bytes read + written over time of a
large ``copy_``), the practical ceiling; the attention kernel as TFLOP/s.

Writes ``bench/results/kernels-<device>-<timestamp>.json`` (GPU name, torch / CUDA versions,
git sha, settings, every measurement) and a Markdown table next to it (``.md``), and prints the
table. See bench/NOTES.md for the design of each kernel and the predicted times.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from token_prune import _ops  # noqa: E402
from token_prune.reference import (  # noqa: E402
    causal_attention_received_ref,
    compact_tokens_ref,
    glimpse_attention_map_ref,
    keep_mask_ref,
    scatter_rows_ref,
    vip_attention_ref,
)

BF16 = torch.bfloat16

# Qwen2.5-VL-7B
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, CACHED_LAYERS = 28, 4, 128, 3584, 19
VIP_HEADS, VIP_D, VIP_DV = 4, 192, 64


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device, warmup: int, repeats: int, flush: bool):
        self.device = device
        self.warmup = warmup
        self.repeats = repeats
        self.cuda = device.type == "cuda"
        self.flush_buf = None
        if self.cuda and flush:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
            self.flush_buf = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=device)

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for _ in range(self.repeats):
                if self.flush_buf is not None:
                    self.flush_buf.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                "repeats": len(times)}


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))["median_s"]
    return 2 * nbytes / t


# ---------------------------------------------------------------------------
# baselines: the PyTorch code each kernel replaces in the methods
# ---------------------------------------------------------------------------


def torch_glimpse_map(q, cos, sin, keys, visual, valid, log_softmax):
    """methods/glimpse.py's PyTorch path (rotary in the model dtype, repeat_interleave, matmul)."""
    half = q.shape[-1] // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], -1)
    qr = (q * cos[:, None] + rot * sin[:, None])[:, :, None]  # [B, Hq, 1, d], in the model dtype
    k = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
    scores = (qr.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, Hq, 1, S]
    if log_softmax:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf")).log_softmax(-1)
    return scores[:, :, 0].transpose(1, 2)[visual]


def torch_vip_attention(q, k, v, positions, sizes, theta=10000.0):
    """The VIP module's PyTorch path: rotary tables, apply_rope, SDPA per image (or batched)."""
    from token_prune.vip.rope import _rope_2d_tables, apply_rope

    cos, sin = _rope_2d_tables(positions, q.shape[-1], theta, q.device, torch.float32)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, start = [], 0
    if len(set(sizes)) == 1:
        b, m = len(sizes), sizes[0]
        o = torch.nn.functional.scaled_dot_product_attention(
            qr.view(b, m, q.shape[1], -1).transpose(1, 2), kr.view(b, m, q.shape[1], -1).transpose(1, 2),
            v.view(b, m, q.shape[1], -1).transpose(1, 2))
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
    for m in sizes:
        sl = slice(start, start + m)
        o = torch.nn.functional.scaled_dot_product_attention(qr[sl].transpose(0, 1), kr[sl].transpose(0, 1),
                                                             v[sl].transpose(0, 1))
        out.append(o.transpose(0, 1))
        start += m
    return torch.cat(out)


def torch_keep_mask(scores, sizes, **opts):
    """runtime.keep_mask_from_scores' PyTorch path (per-image sorts, host reads of counts)."""
    with _ops.use_kernels(False):
        from token_prune.runtime import keep_mask_from_scores

        return keep_mask_from_scores(scores, sizes, **opts)


def torch_compact(keep, hidden, caches, positions, mask):
    """Boolean-mask gathers per sample (what a plain PyTorch compaction does)."""
    return compact_tokens_ref(keep, hidden, caches, positions, mask)


def torch_scatter(full, packed, index):
    """methods/alvts.py's PyTorch path: clone + index_put."""
    out = full.clone()
    ok = index >= 0
    rows = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(index)
    out[rows[ok], index[ok]] = packed[ok]
    return out


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def rel_err(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    return float((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-300))


def case_glimpse(device, batch, n_vis, log_softmax, smoke):
    heads, kv, d = (4, 2, 16) if smoke else (HEADS, KV_HEADS, HEAD_DIM)
    text = 8 if smoke else 100
    seq = n_vis + text + 1  # text, image, glimpse token
    g = torch.Generator().manual_seed(batch * 7 + n_vis)
    dtype = torch.float32 if smoke else BF16
    q = torch.randn(batch, heads, d, generator=g).to(device, dtype)
    ang = torch.rand(batch, d // 2, generator=g) * 50
    cos = torch.cat([ang, ang], -1).cos().to(device, dtype)
    sin = torch.cat([ang, ang], -1).sin().to(device, dtype)
    keys = torch.randn(batch, kv, seq, d, generator=g).to(device, dtype)
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    visual[:, text // 2: text // 2 + n_vis] = True
    valid = torch.ones(batch, seq, dtype=torch.bool)
    visual, valid = visual.to(device), valid.to(device)
    idx = visual.nonzero()
    cu = _ops.cu_seqlens_from_sizes([n_vis] * batch, device)
    pos = idx[:, 1].to(torch.int32)

    def kernel():
        return _ops.glimpse_attention_map(q, cos, sin, keys, cu, pos, valid if log_softmax else None,
                                          log_softmax=log_softmax)

    def baseline():
        return torch_glimpse_map(q, cos, sin, keys, visual, valid, log_softmax)

    want = glimpse_attention_map_ref(q.double(), cos.double(), sin.double(), keys.double(), cu, pos,
                                     valid, 1 / math.sqrt(d), log_softmax)
    err, err_base = rel_err(kernel(), want), rel_err(baseline(), want)
    ok = err <= 2 * err_base + 1e-5
    elem = keys.element_size()
    nbytes = batch * n_vis * kv * d * elem + batch * n_vis * heads * 4
    if log_softmax:
        nbytes += batch * seq * kv * d * elem
    return dict(kernel=kernel, baseline=baseline, ok=ok, check=f"rel err {err:.2e} (torch path {err_base:.2e})",
                bytes=nbytes, flops=2 * batch * n_vis * heads * d)


def case_vip(device, n_images, n_tok, smoke):
    heads, d, dv = VIP_HEADS, VIP_D, VIP_DV
    sizes = [n_tok] * n_images
    n = sum(sizes)
    g = torch.Generator().manual_seed(n_images * 31 + n_tok)
    dtype = torch.float32 if smoke else BF16
    q = torch.randn(n, heads * d, generator=g).to(device, dtype).view(n, heads, d)
    k = torch.randn(n, heads * d, generator=g).to(device, dtype).view(n, heads, d)
    v = torch.randn(n, heads * dv, generator=g).to(device, dtype).view(n, heads, dv)
    side = int(math.ceil(math.sqrt(n_tok)))
    one = torch.stack([torch.arange(n_tok) // side, torch.arange(n_tok) % side], -1)
    pos = one.repeat(n_images, 1).to(device)
    pos32 = pos.to(torch.int32)
    cu = _ops.cu_seqlens_from_sizes(sizes, device)

    def kernel():
        return _ops.vip_attention(q, k, v, pos32, cu, n_tok)

    def baseline():
        return torch_vip_attention(q, k, v, pos, sizes)

    got = kernel()
    base = baseline()
    if n_tok <= 4096 or smoke:
        exact = vip_attention_ref(q.double(), k.double(), v.double(), pos, cu, n_tok)
        err, err_base = rel_err(got, exact), rel_err(base, exact)
        ok = err <= 2 * err_base + 1e-5
        check = f"rel err {err:.2e} (torch path {err_base:.2e})"
    else:  # a float64 reference of 16k-token images is too slow: compare with the torch path
        err = rel_err(got, base)
        ok = err < 2e-2
        check = f"rel diff to torch path {err:.2e}"
    elem = q.element_size()
    flops = 2 * sum(m * m for m in sizes) * heads * (d + dv)
    nbytes = n * heads * (2 * d + 2 * dv) * elem + n * 8
    return dict(kernel=kernel, baseline=baseline, ok=ok, check=check, bytes=nbytes, flops=flops)


def case_keep(device, n_images, n_tok, opts, smoke):
    sizes = [n_tok] * n_images
    g = torch.Generator().manual_seed(n_images + n_tok)
    scores = (torch.randn(sum(sizes), generator=g) * 3).to(device)
    cu = _ops.cu_seqlens_from_sizes(sizes, device)

    def kernel():
        return _ops.keep_mask(scores, cu, **opts)

    def baseline():
        return torch_keep_mask(scores, sizes, **opts)

    ok = torch.equal(kernel().cpu(), keep_mask_ref(scores, cu, **opts).cpu())  # same device: same sigmoid
    return dict(kernel=kernel, baseline=baseline, ok=ok, check="exact" if ok else "MISMATCH",
                bytes=sum(sizes) * 5, flops=0)


def _compact_inputs(device, batch, n_vis, ratio, smoke):
    hidden, layers, kv, d = (64, 3, 2, 16) if smoke else (HIDDEN, CACHED_LAYERS, KV_HEADS, HEAD_DIM)
    text = 8 if smoke else 100
    seq = n_vis + text
    g = torch.Generator().manual_seed(batch * 3 + n_vis)
    dtype = torch.float32 if smoke else BF16
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[:, text // 2: text // 2 + n_vis] = torch.rand(batch, n_vis, generator=g) < ratio
    h = torch.randn(batch, seq, hidden, generator=g).to(device, dtype)
    caches = [torch.randn(batch, kv, seq, d, generator=g).to(device, dtype) for _ in range(2 * layers)]
    pos = torch.arange(seq).expand(4, batch, seq).contiguous().to(device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    return keep.to(device), h, caches, pos, mask


def case_compact(device, batch, n_vis, ratio, smoke):
    keep, h, caches, pos, mask = _compact_inputs(device, batch, n_vis, ratio, smoke)
    out_len = int(keep.sum(1).max())

    def kernel():
        return _ops.compact_tokens(keep, h, caches, pos, mask, out_len=out_len)

    def baseline():
        return torch_compact(keep, h, caches, pos, mask)

    got, want = kernel(), baseline()
    ok = all(torch.equal(a, b) for a, b in zip([got[0], *got[1], got[2], got[3]], [want[0], *want[1], want[2], want[3]]))
    per_token = h.shape[-1] * h.element_size() + sum(c.shape[1] * c.shape[3] * c.element_size() for c in caches)
    per_token += pos.shape[0] * 8 + mask.element_size()
    nbytes = 2 * keep.shape[0] * out_len * per_token + keep.numel()
    return dict(kernel=kernel, baseline=baseline, ok=ok, check="exact" if ok else "MISMATCH", bytes=nbytes, flops=0)


def case_scatter(device, batch, n_vis, ratio, inplace, smoke):
    hidden = 64 if smoke else HIDDEN
    text = 8 if smoke else 100
    seq = n_vis + text
    g = torch.Generator().manual_seed(batch * 5 + n_vis)
    dtype = torch.float32 if smoke else BF16
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[:, text // 2: text // 2 + n_vis] = torch.rand(batch, n_vis, generator=g) < ratio
    full = torch.randn(batch, seq, hidden, generator=g).to(device, dtype)
    keep = keep.to(device)
    packed, index = _ops.gather_rows(full, keep)
    packed = torch.randn_like(packed)
    target = full.clone()

    def kernel():
        return _ops.scatter_rows(target if inplace else full, packed, index, inplace=inplace)

    def baseline():
        return torch_scatter(full, packed, index)

    want = scatter_rows_ref(full, packed, index)
    ok = torch.equal(_ops.scatter_rows(full, packed, index), want)
    scratch = full.clone()
    ok = ok and torch.equal(_ops.scatter_rows(scratch, packed, index, inplace=True), want)
    row = hidden * full.element_size()
    rows = int((index >= 0).sum())
    nbytes = 2 * rows * row + (0 if inplace else 2 * full.numel() * full.element_size())
    return dict(kernel=kernel, baseline=baseline, ok=ok, check="exact" if ok else "MISMATCH", bytes=nbytes, flops=0)


def torch_alvts_score(q, k, visual, valid):
    """methods/alvts.py's GPU path: the score as the value-gradient of one fused SDPA call
    (forward and backward of a causal attention, seven n x n x d products per head)."""
    from token_prune.methods.alvts import selection_scores

    return selection_scores(q, k, valid, visual, impl="sdpa" if q.is_cuda else "chunked")


def case_received(device, batch, seq, heads, kv_heads, dim, smoke, text=104):
    """The ALVTS score: ``text`` text tokens around ``seq - text`` visual ones, left padding in
    every other sample; heads/kv_heads/dim the selector's form (28/4/128: the full-width
    selector of Qwen2.5-VL-7B; 1/1/R: a head-shared rank-R map)."""
    g = torch.Generator().manual_seed(batch * 13 + seq + dim)
    dtype = torch.float32 if smoke else BF16
    q = torch.randn(batch, seq, heads, dim, generator=g).to(device, dtype).transpose(1, 2)  # projection layout
    k = torch.randn(batch, seq, kv_heads, dim, generator=g).to(device, dtype).transpose(1, 2)
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    visual[:, text // 2: seq - text // 2] = True
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1::2, : seq // 10] = False
    visual, valid = visual.to(device), valid.to(device)

    def kernel():
        return _ops.alvts_score(q, k, visual, valid)

    def baseline():
        return torch_alvts_score(q, k, visual, valid)

    rec = causal_attention_received_ref(q.double(), k.double(), visual, valid)
    n_vis = (visual & valid).sum(1, keepdim=True).double()
    n_txt = (~visual & valid).sum(1, keepdim=True).double()
    want = (rec[:, 0] / n_vis * rec[:, 1] / n_txt)[visual & valid]
    err, err_base = rel_err(kernel()[visual & valid], want), rel_err(baseline()[visual & valid], want)
    ok = err <= 2 * err_base + 1e-5
    pairs = float(valid.sum(1).double().mul(valid.sum(1).double() + 1).div(2).sum())
    nbytes = (q.numel() + k.numel()) * q.element_size() + batch * seq * 2 * 4
    return dict(kernel=kernel, baseline=baseline, ok=ok, check=f"rel err {err:.2e} (torch path {err_base:.2e})",
                bytes=nbytes, flops=4.0 * heads * dim * pairs)


def cases(smoke: bool, device):
    if smoke:
        return [
            ("glimpse_attention_map", dict(batch=2, n_vis=64, log_softmax=False), case_glimpse),
            ("glimpse_attention_map", dict(batch=2, n_vis=64, log_softmax=True), case_glimpse),
            ("vip_attention", dict(n_images=2, n_tok=40), case_vip),
            ("keep_mask", dict(n_images=2, n_tok=100, opts=dict(keep_ratio=0.11)), case_keep),
            ("keep_mask", dict(n_images=2, n_tok=100, opts=dict(threshold=0.5, max_keep_ratio=0.222)), case_keep),
            ("compact_tokens", dict(batch=2, n_vis=64, ratio=0.11), case_compact),
            ("scatter_rows", dict(batch=2, n_vis=64, ratio=0.11, inplace=False), case_scatter),
            ("scatter_rows", dict(batch=2, n_vis=64, ratio=0.11, inplace=True), case_scatter),
            ("causal_attention_received", dict(batch=2, seq=150, heads=4, kv_heads=2, dim=16), case_received),
            ("causal_attention_received", dict(batch=2, seq=150, heads=1, kv_heads=1, dim=32), case_received),
        ]
    out = []
    for batch in (1, 8):
        for n in (1024, 4096, 16384):
            if batch * n > 65536:
                continue
            for ls in (False, True):
                out.append(("glimpse_attention_map", dict(batch=batch, n_vis=n, log_softmax=ls), case_glimpse))
    for n_images, n in ((1, 1024), (1, 2304), (1, 4096), (1, 16384), (8, 1024), (8, 2304), (4, 4096)):
        out.append(("vip_attention", dict(n_images=n_images, n_tok=n), case_vip))
    for n_images, n in ((1, 1024), (1, 16384), (8, 2304), (8, 16384)):
        out.append(("keep_mask", dict(n_images=n_images, n_tok=n, opts=dict(keep_ratio=0.11)), case_keep))
        out.append(("keep_mask", dict(n_images=n_images, n_tok=n,
                                      opts=dict(threshold=0.5, max_keep_ratio=0.222)), case_keep))
    for batch, n in ((1, 1024), (1, 4096), (1, 16384), (8, 2304), (4, 4096)):
        for ratio in (0.11, 0.33):
            out.append(("compact_tokens", dict(batch=batch, n_vis=n, ratio=ratio), case_compact))
    for batch, n in ((1, 2304), (1, 16384), (8, 2304)):
        for inplace in (False, True):
            out.append(("scatter_rows", dict(batch=batch, n_vis=n, ratio=0.11, inplace=inplace), case_scatter))
    # The ALVTS score per layer: full-width (every head, head dim 128), per KV group, head-shared rank R.
    for batch, seq in ((1, 1128), (1, 4200), (4, 4200)):
        for heads, kv, dim in ((28, 4, 128), (4, 4, 64), (1, 1, 256), (1, 1, 128)):
            out.append(("causal_attention_received", dict(batch=batch, seq=seq, heads=heads, kv_heads=kv, dim=dim),
                        case_received))
    return out


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def git_sha() -> str:
    """HEAD (with ``-dirty``), else what the caller passed in ``TOKEN_PRUNE_GIT_SHA`` (a copy of the
    tree without ``.git``, as on the GPU machines)."""
    passed = os.environ.get("TOKEN_PRUNE_GIT_SHA") or "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else passed
    except (OSError, subprocess.SubprocessError):
        return passed


def describe(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script, not speed)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--ops", nargs="*", default=None, help="only these ops")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-flush", action="store_true", help="do not flush the L2 cache between runs")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type != "cuda" and not args.smoke:
        print("bench/kernels.py: no GPU; use --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    repeats = args.repeats if args.repeats is not None else (3 if args.smoke else 30)
    timer = Timer(device, warmup, repeats, flush=not args.no_flush)

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "extension_loaded": _ops.EXTENSION_LOADED,
        "extension_with_cuda": _ops.EXTENSION_WITH_CUDA,
        "python": platform.python_version(),
        "settings": {"smoke": args.smoke, "warmup": warmup, "repeats": repeats, "l2_flush": not args.no_flush,
                     "timing": "CUDA events, median" if device.type == "cuda" else "perf_counter, median"},
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sms"] = props.multi_processor_count
        env["memory_gb"] = round(props.total_memory / 2**30, 1)
    copy_bytes = (8 << 20) if args.smoke else (1 << 30)
    bw = copy_bandwidth(device, timer, copy_bytes)
    env["copy_bandwidth_gbs"] = round(bw / 1e9, 1)
    print(f"device: {env['device']}  torch {env['torch']}  CUDA {env['cuda']}  git {env['git_sha']}")
    print(f"device-to-device copy bandwidth (read + write): {bw / 1e9:.1f} GB/s")

    rows = []
    failures = 0
    for op, params, build in cases(args.smoke, device):
        if args.ops and op not in args.ops:
            continue
        c = build(device, smoke=args.smoke, **params)
        row = {"op": op, "params": params, "check": c["check"], "ok": bool(c["ok"]), "bytes": c["bytes"],
               "flops": c["flops"]}
        if not c["ok"]:
            failures += 1
            print(f"FAILED correctness: {op} {describe(params)}: {c['check']}", file=sys.stderr)
        else:
            row["kernel"] = timer(c["kernel"])
            row["baseline"] = timer(c["baseline"])
            t = row["kernel"]["median_s"]
            row["speedup"] = row["baseline"]["median_s"] / t
            row["gbs"] = c["bytes"] / t / 1e9
            row["bw_fraction"] = c["bytes"] / t / bw
            row["tflops"] = c["flops"] / t / 1e12 if c["flops"] else None
        rows.append(row)
        del c
        if device.type == "cuda":
            torch.cuda.empty_cache()

    lines = [
        f"# token_prune kernels: {env['device']}",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, git {env['git_sha']}, {env['time']}; "
        f"{env['settings']['timing']} of {repeats} runs after {warmup} warm-up, "
        f"L2 flush {'on' if env['settings']['l2_flush'] else 'off'}; copy bandwidth {env['copy_bandwidth_gbs']} GB/s"
        + (" (SMOKE RUN: tiny sizes on the CPU, not a measurement)" if args.smoke else ""),
        "",
        "| op | case | check | kernel (us) | PyTorch (us) | speedup | GB/s | % copy BW | TFLOP/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['op']} | {describe(r['params'])} | {r['check']} | - | - | - | - | - | - |")
            continue
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        lines.append(
            f"| {r['op']} | {describe(r['params'])} | {r['check']} | {r['kernel']['median_s'] * 1e6:.1f} | "
            f"{r['baseline']['median_s'] * 1e6:.1f} | {r['speedup']:.2f}x | {r['gbs']:.0f} | "
            f"{100 * r['bw_fraction']:.0f}% | {tf} |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "cpu" if device.type != "cuda" else env["device"].replace(" ", "_")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"kernels-{'smoke-' if args.smoke else ''}{name}-{stamp}{'-' + args.tag if args.tag else ''}"
    (out_dir / f"{stem}.json").write_text(json.dumps({"env": env, "results": rows}, indent=2, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(table)
    print(f"wrote {out_dir / stem}.json and .md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
