// CPU kernel of token_prune::causal_attention_received.
//
// Unlike the CUDA kernel (two passes over key blocks, see attention_received.h)
// the CPU kernel forms each logit once: it takes a strip of query rows against
// every key they may see, so a row's max and sum are known before its column
// sums are added, and the strip is the only logit memory. Strips are sized to
// stay in a core's L2 (rows x keys x 4 bytes <= 1 MiB), so the elementwise
// passes over them (mask, max, exp, sum) do not go to DRAM; the products go to
// BLAS and exp to ATen's vectorised kernel, which a hand loop in an extension
// built without -mavx2 could not match. On this project's reference CPU the
// strips halve the logits and exps of the two-pass tiles and cut the op's time
// about fourfold (bench/NOTES.md, "ALVTS score at its floor").
//
// Tasks are (sample, head, chunk of kChunkRows query rows); each writes its own
// [2, S] row of a buffer that is reduced in a fixed order afterwards, so the
// result does not depend on the number of threads. Nested ATen calls run
// single-threaded inside ATen's thread pool.
#include "attention_received.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace token_prune {
namespace {

constexpr int64_t kStripFloats = int64_t{1} << 18;  // 1 MiB of fp32 logits per strip
constexpr int64_t kMinRows = 16;
constexpr int64_t kMaxRows = 256;
constexpr int64_t kChunkRows = 1024;  // query rows per task (a multiple of kMaxRows)

// Query rows per strip: the largest power of two whose strip against all S keys
// fits kStripFloats, within [kMinRows, kMaxRows].
int64_t strip_rows(int64_t seq) {
  int64_t rows = kMaxRows;
  while (rows > kMinRows && rows * seq > kStripFloats) {
    rows /= 2;
  }
  return rows;
}

// -inf above the diagonal, 0 on and below it.
at::Tensor causal_bias(int64_t n, const at::TensorOptions& opts) {
  return at::zeros({n, n}, opts).masked_fill_(at::ones({n, n}, opts.dtype(at::kBool)).triu(1),
                                              -std::numeric_limits<double>::infinity());
}

}  // namespace

at::Tensor causal_attention_received_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                         const at::Tensor& visual,
                                         const std::optional<at::Tensor>& valid,
                                         double scale) {
  const ReceivedShape s = check_causal_attention_received(q_in, k_in, visual, valid, scale);
  const auto acc = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = q_in.options().dtype(acc);
  if (s.batch == 0 || s.seq == 0) {
    return at::zeros({s.batch, 2, s.seq}, opts);
  }
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t B = s.batch, H = s.heads, S = s.seq;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t rows = strip_rows(S);
  const int64_t chunks = (S + kChunkRows - 1) / kChunkRows;

  // The kernel's own tensors never need autograd (worker threads would not
  // inherit the caller's grad mode). The scale goes into q once, not into
  // every logit, together with log2(e): the softmax is taken as 2^(s' - m'),
  // and ATen's exp2 runs about twice as fast as its exp.
  at::Tensor qf, kf;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    qf = q_in.detach().to(acc).mul(scale * 1.4426950408889634).contiguous();
    kf = k_in.detach().to(acc).contiguous();
  }
  const at::Tensor real = valid.has_value() ? valid->detach().contiguous()
                                            : at::ones({B, S}, visual.options());
  const at::Tensor vis = visual.detach().contiguous();
  // 0 at real keys, -inf at padding keys: added to every logit of that column.
  const at::Tensor key_bias = at::zeros({B, S}, opts).masked_fill_(real.logical_not(), -inf);
  // Per-query weights [B, S, 2]: (real visual, real text).
  const at::Tensor weights =
      at::stack({vis.logical_and(real), vis.logical_not().logical_and(real)}, -1).to(acc);
  const at::Tensor diag = causal_bias(rows, opts);

  // Host facts per sample: the first real key (left padding is skipped), whether
  // any key is padding (else the key bias is not added), and per strip whether
  // it holds a real query (strips of padding only are skipped).
  const int64_t strips = (S + rows - 1) / rows;
  std::vector<int64_t> first_real(B, S);
  std::vector<char> padded(B, 0);
  std::vector<char> strip_real(B * strips, 0);
  {
    const bool* r = real.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = S - 1; i >= 0; --i) {
        if (r[b * S + i]) {
          first_real[b] = i;
          strip_real[b * strips + i / rows] = 1;
        } else {
          padded[b] = 1;
        }
      }
    }
  }

  // partial[b, h, c] holds chunk c's column sums; chunks never share a row.
  at::Tensor partial = at::zeros({B, H, chunks, 2, S}, opts);
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, bh = task / chunks, h = bh % H, b = bh / H;
      const at::Tensor Q = qf[b][h];
      const at::Tensor K = kf[b][h / group];
      at::Tensor col = partial[b][h][c];  // [2, S]
      const int64_t k0 = first_real[b];
      const int64_t row_end = std::min(S, (c + 1) * kChunkRows);
      for (int64_t q0 = c * kChunkRows; q0 < row_end; q0 += rows) {
        const int64_t nq = std::min(rows, S - q0), stop = q0 + nq;
        if (!strip_real[b * strips + q0 / rows] || stop <= k0) {
          continue;
        }
        const int64_t nk = stop - k0;
        at::Tensor t = at::mm(Q.narrow(0, q0, nq), K.narrow(0, k0, nk).t());  // [nq, nk]
        if (padded[b]) {
          t.add_(key_bias[b].narrow(0, k0, nk));
        }
        // Only keys at or after the strip's first query can lie above the diagonal.
        const int64_t d0 = std::max(q0, k0);
        t.narrow(1, d0 - k0, stop - d0).add_(diag.narrow(0, 0, nq).narrow(1, d0 - q0, stop - d0));
        // amax, not max: max also finds the argmax, an order of magnitude slower.
        at::Tensor m = t.amax(1);
        // A row with no visible real key (padding before the first real one)
        // has m = -inf: shift it by 0 so its exps are 0, not NaN.
        m.masked_fill_(m.isneginf(), 0.0);
        t.sub_(m.unsqueeze(1)).exp2_();
        const at::Tensor l = t.sum(1);
        const at::Tensor inv = at::where(l.gt(0), l.reciprocal(), at::zeros({}, opts));
        const at::Tensor w = weights[b].narrow(0, q0, nq) * inv.unsqueeze(1);  // [nq, 2]
        col.narrow(1, k0, nk).addmm_(w.t(), t);
      }
    }
  });
  const at::Tensor per_head = chunks == 1 ? partial.select(2, 0) : partial.sum(2);
  return H == 1 ? per_head.select(1, 0) : per_head.sum(1).div_(static_cast<double>(H));
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CPU, m) {
  m.impl("causal_attention_received", &token_prune::causal_attention_received_cpu);
}
