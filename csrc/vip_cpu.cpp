// CPU kernel of token_prune::vip_attention: plain loops, exact softmax per
// query row (the images of a VIP call are small enough on the CPU).
//
// Numerics follow the VIP module: the 2D RoPE tables and the rotation are in
// float32 (float64 for float64 inputs) and the rotated q/k are rounded back to
// the input dtype; scores, softmax and the weighted sum of v accumulate in
// float32 (float64).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace token_prune {
namespace {

template <typename T, typename Acc>
void rope_rows(const T* x, T* out, int64_t tokens, int64_t heads, int64_t dim,
               const int64_t* pos, const std::vector<Acc>& inv_freq) {
  const int64_t half = dim / 2;
  const int64_t quarter = dim / 4;
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Acc row = static_cast<Acc>(pos[2 * t]);
      const Acc col = static_cast<Acc>(pos[2 * t + 1]);
      for (int64_t e = 0; e < half; ++e) {
        const Acc angle = e < quarter ? row * inv_freq[e] : col * inv_freq[e - quarter];
        const Acc c = std::cos(angle);
        const Acc s = std::sin(angle);
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t base = (t * heads + h) * dim;
          const Acc x1 = static_cast<Acc>(x[base + e]);
          const Acc x2 = static_cast<Acc>(x[base + e + half]);
          // x*cos + rotate_half(x)*sin, with rotate_half(x) = [-x2, x1].
          out[base + e] = static_cast<T>(x1 * c + (-x2) * s);
          out[base + e + half] = static_cast<T>(x2 * c + x1 * s);
        }
      }
    }
  });
}

template <typename T, typename Acc>
void vip_attention_loops(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& positions, const std::vector<int32_t>& cu,
                         double scale, double theta, at::Tensor& out) {
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), vdim = v.size(2);
  const int64_t half = dim / 2;
  std::vector<Acc> inv_freq(static_cast<size_t>(dim / 4));
  for (int64_t j = 0; j < dim / 4; ++j) {
    // 1 / theta^(arange(0, half, 2) / half), as the reference builds it.
    const Acc exponent = static_cast<Acc>(2 * j) / static_cast<Acc>(half);
    inv_freq[j] = static_cast<Acc>(1) / std::pow(static_cast<Acc>(theta), exponent);
  }
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  std::vector<T> qr(static_cast<size_t>(n * heads * dim));
  std::vector<T> kr(static_cast<size_t>(n * heads * dim));
  rope_rows<T, Acc>(q.const_data_ptr<T>(), qr.data(), n, heads, dim, pos, inv_freq);
  rope_rows<T, Acc>(k.const_data_ptr<T>(), kr.data(), n, heads, dim, pos, inv_freq);
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();

  // Image bounds of every token.
  std::vector<int32_t> first(static_cast<size_t>(n)), last(static_cast<size_t>(n));
  int32_t longest = 0;
  for (size_t i = 0; i + 1 < cu.size(); ++i) {
    for (int32_t t = cu[i]; t < cu[i + 1]; ++t) {
      first[t] = cu[i];
      last[t] = cu[i + 1];
    }
    longest = std::max(longest, cu[i + 1] - cu[i]);
  }
  const Acc sc = static_cast<Acc>(scale);
  const int64_t lo = cu.front(), hi = cu.back();
  at::parallel_for(lo * heads, hi * heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<Acc> p(static_cast<size_t>(longest));
    std::vector<Acc> acc(static_cast<size_t>(vdim));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / heads, h = item % heads;
      const int32_t a = first[t], b = last[t];
      const T* qrow = qr.data() + (t * heads + h) * dim;
      Acc mx = -std::numeric_limits<Acc>::infinity();
      for (int32_t j = a; j < b; ++j) {
        const T* krow = kr.data() + (static_cast<int64_t>(j) * heads + h) * dim;
        Acc dot = 0;
        for (int64_t e = 0; e < dim; ++e) {
          dot += static_cast<Acc>(qrow[e]) * static_cast<Acc>(krow[e]);
        }
        p[j - a] = dot * sc;
        mx = std::max(mx, p[j - a]);
      }
      Acc sum = 0;
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int32_t j = a; j < b; ++j) {
        const Acc w = std::exp(p[j - a] - mx);
        sum += w;
        const T* vrow = vp + (static_cast<int64_t>(j) * heads + h) * vdim;
        for (int64_t e = 0; e < vdim; ++e) {
          acc[e] += w * static_cast<Acc>(vrow[e]);
        }
      }
      T* orow = op + (t * heads + h) * vdim;
      for (int64_t e = 0; e < vdim; ++e) {
        orow[e] = static_cast<T>(acc[e] / sum);
      }
    }
  });
}

}  // namespace

std::vector<int32_t> checked_cu_seqlens(const char* op, const at::Tensor& cu_seqlens,
                                        int64_t tokens, bool cover_all) {
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.const_data_ptr<int32_t>();
  std::vector<int32_t> out(c, c + cu.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i] >= 0 && out[i] <= tokens, op, "cu_seqlens[", i, "] = ", out[i],
                " is outside [0, ", tokens, "]");
    TORCH_CHECK(i == 0 || out[i] >= out[i - 1], op,
                "cu_seqlens must be non-decreasing, got ", out[i - 1], " then ", out[i]);
  }
  if (cover_all) {
    TORCH_CHECK(out.front() == 0 && out.back() == tokens, op,
                "cu_seqlens must run from 0 to the token count ", tokens, ", got ",
                out.front(), " .. ", out.back());
  }
  return out;
}

at::Tensor vip_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& positions, const at::Tensor& cu_seqlens,
                             int64_t max_seqlen, double scale, double theta) {
  const VipShape s = check_vip_attention(q, k, v, positions, cu_seqlens, max_seqlen);
  const std::vector<int32_t> cu =
      checked_cu_seqlens("token_prune::vip_attention: ", cu_seqlens, s.tokens, true);
  at::Tensor out = at::empty({s.tokens, s.heads, s.vdim}, v.options());
  if (s.tokens == 0 || s.heads == 0) {
    return out;
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor pc = positions.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vip_attention_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    vip_attention_loops<scalar_t, Acc>(qc, kc, vc, pc, cu, scale, theta, out);
  });
  return out;
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CPU, m) {
  m.impl("vip_attention", &token_prune::vip_attention_cpu);
}
