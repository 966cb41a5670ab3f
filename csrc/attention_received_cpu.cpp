// CPU kernel of token_prune::causal_attention_received (the two passes are
// described in attention_received.h).
//
// The CPU kernel works on 256 x 256 logit tiles with ATen ops: the tile
// products go to BLAS and exp to ATen's vectorised kernel, which a hand loop
// in an extension built without -mavx2 could not match. Tasks are (sample,
// head, block) triples spread over ATen's thread pool; nested ATen calls run
// single-threaded there.
#include "attention_received.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace token_prune {
namespace {

constexpr int64_t kBlock = 256;

// Adds -inf above the diagonal of a tile whose query and key blocks start at
// the same position (only such tiles straddle the causal boundary).
at::Tensor causal_bias(int64_t n, const at::TensorOptions& opts) {
  return at::ones({n, n}, opts.dtype(at::kBool))
      .triu(1)
      .logical_not()
      .to(opts.dtype())
      .log();  // log(1) = 0 on and below the diagonal, log(0) = -inf above
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
  const int64_t blocks = (S + kBlock - 1) / kBlock;

  // The kernel's own tensors never need autograd (worker threads would not
  // inherit the caller's grad mode).
  const at::Tensor qf = q_in.detach().to(acc).contiguous();
  const at::Tensor kf = k_in.detach().to(acc).contiguous();
  const at::Tensor real = valid.has_value() ? valid->detach().contiguous()
                                            : at::ones({B, S}, visual.options());
  const at::Tensor vis = visual.detach().contiguous();
  // 0 at real keys, -inf at padding keys: added to every logit of that column.
  const at::Tensor key_bias = at::zeros({B, S}, opts).masked_fill_(real.logical_not(), -inf);
  // Per-query weights [B, S, 2]: (real visual, real text).
  const at::Tensor weights = at::stack({vis.logical_and(real), vis.logical_not().logical_and(real)}, -1).to(acc);
  const at::Tensor diag = causal_bias(kBlock, opts);

  // Host flags per (sample, block): any real key / any weighted query in it.
  // Whole blocks of left padding are then skipped without computing a tile.
  std::vector<char> any_real(B * blocks, 0);
  {
    const bool* r = real.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < S; ++i) {
        any_real[b * blocks + i / kBlock] |= static_cast<char>(r[b * S + i]);
      }
    }
  }

  // Pass 1: per-row max and 1/sum; rows without weight get m = +inf and 1/l = 0,
  // so that pass 2's exp(s - m) is 0 for them whatever s is.
  at::Tensor row_m = at::empty({B, H, S}, opts);
  at::Tensor row_inv_l = at::empty({B, H, S}, opts);
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % blocks, bh = task / blocks, h = bh % H, b = bh / H;
      const int64_t q0 = qb * kBlock, nq = std::min(kBlock, S - q0);
      at::Tensor out_m = row_m[b][h].narrow(0, q0, nq);
      at::Tensor out_l = row_inv_l[b][h].narrow(0, q0, nq);
      if (!any_real[b * blocks + qb]) {
        out_m.fill_(inf);
        out_l.zero_();
        continue;
      }
      const at::Tensor Q = qf[b][h].narrow(0, q0, nq);
      const at::Tensor K_all = kf[b][h / group];
      at::Tensor m = at::full({nq}, -inf, opts);
      at::Tensor l = at::zeros({nq}, opts);
      for (int64_t kb = 0; kb <= qb; ++kb) {
        if (!any_real[b * blocks + kb]) {
          continue;
        }
        const int64_t k0 = kb * kBlock, nk = std::min(kBlock, S - k0);
        at::Tensor t = at::mm(Q, K_all.narrow(0, k0, nk).t()).mul_(scale);
        t.add_(key_bias[b].narrow(0, k0, nk));
        if (kb == qb) {
          t.add_(diag.narrow(0, 0, nq).narrow(1, 0, nk));
        }
        const at::Tensor m_new = at::maximum(m, std::get<0>(t.max(1)));
        // A row that has seen no real key yet keeps m = -inf; shift it by 0
        // instead, so exp(-inf - -inf) never makes a NaN.
        const at::Tensor shift = m_new.masked_fill(m_new.isneginf(), 0.0);
        l = l.mul_((m - shift).exp_()).add_(t.sub_(shift.unsqueeze(1)).exp_().sum(1));
        m = m_new;
      }
      const at::Tensor weighted = weights[b].narrow(0, q0, nq).sum(1).gt(0);
      out_m.copy_(at::where(weighted, m, at::full({}, inf, opts)));
      out_l.copy_(at::where(weighted, l.reciprocal(), at::zeros({}, opts)));
    }
  });

  // Pass 2: per (sample, head, key block), the weighted column sums over every
  // query block at or after it (earlier queries cannot see these keys).
  at::Tensor partial = at::zeros({B, H, 2, S}, opts);
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kb = task % blocks, bh = task / blocks, h = bh % H, b = bh / H;
      if (!any_real[b * blocks + kb]) {
        continue;  // padding keys receive nothing
      }
      const int64_t k0 = kb * kBlock, nk = std::min(kBlock, S - k0);
      const at::Tensor K = kf[b][h / group].narrow(0, k0, nk);
      at::Tensor col = partial[b][h].narrow(1, k0, nk);  // [2, nk]
      for (int64_t qb = kb; qb < blocks; ++qb) {
        if (!any_real[b * blocks + qb]) {
          continue;
        }
        const int64_t q0 = qb * kBlock, nq = std::min(kBlock, S - q0);
        at::Tensor t = at::mm(qf[b][h].narrow(0, q0, nq), K.t()).mul_(scale);
        t.add_(key_bias[b].narrow(0, k0, nk));
        t.sub_(row_m[b][h].narrow(0, q0, nq).unsqueeze(1));
        if (qb == kb) {
          t.add_(diag.narrow(0, 0, nq).narrow(1, 0, nk));
        }
        const at::Tensor w = weights[b].narrow(0, q0, nq) *
                             row_inv_l[b][h].narrow(0, q0, nq).unsqueeze(1);  // [nq, 2]
        col.addmm_(w.t(), t.exp_());
      }
    }
  });
  return H == 1 ? partial.select(1, 0) : partial.sum(1).div_(static_cast<double>(H));
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CPU, m) {
  m.impl("causal_attention_received", &token_prune::causal_attention_received_cpu);
}
