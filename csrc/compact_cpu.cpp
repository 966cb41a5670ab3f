// CPU kernel of token_prune::compact_tokens.
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace token_prune {
namespace {

// Slot -> source table, -1 for padding. Built on the host because on the CPU
// the counts are free, which also lets us reject an out_len that is too small
// instead of silently truncating.
std::vector<int32_t> build_src_index(const at::Tensor& keep, int64_t out_len) {
  const int64_t B = keep.size(0);
  const int64_t S = keep.size(1);
  const bool* k = keep.const_data_ptr<bool>();
  std::vector<int32_t> src(static_cast<size_t>(B * out_len), -1);
  for (int64_t b = 0; b < B; ++b) {
    const bool* row = k + b * S;
    const int64_t n = std::count(row, row + S, true);
    TORCH_CHECK(n <= out_len,
                "token_prune::compact_tokens: out_len (", out_len,
                ") is smaller than the number of kept tokens in sample ", b,
                " (", n, "); pass out_len >= keep.sum(1).max()");
    int32_t* dst = src.data() + b * out_len + (out_len - n);
    for (int64_t s = 0; s < S; ++s) {
      if (row[s]) {
        *dst++ = static_cast<int32_t>(s);
      }
    }
  }
  return src;
}

void gather_rows(const RowGather& g, const int32_t* src, int64_t B,
                 int64_t L) {
  const int64_t rows = B * g.heads * L;
  // Aim for ~64 KiB per task so tiny rows (mask, positions) are not split
  // into per-element tasks.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(g.row_bytes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = r % L;
      const int64_t bh = r / L;
      const int64_t b = bh / g.heads;
      const int64_t h = bh % g.heads;
      char* dst = g.out + b * g.out_stride_b + h * g.out_stride_h + j * g.row_bytes;
      const int32_t s = src[b * L + j];
      if (s >= 0) {
        std::memcpy(dst,
                    g.in + b * g.in_stride_b + h * g.in_stride_h +
                        static_cast<int64_t>(s) * g.in_stride_s,
                    static_cast<size_t>(g.row_bytes));
      } else {
        std::memset(dst, 0, static_cast<size_t>(g.row_bytes));
      }
    }
  });
}

}  // namespace

CompactResult compact_tokens_cpu(const at::Tensor& keep, int64_t out_len,
                                 const at::Tensor& hidden,
                                 at::TensorList caches,
                                 const at::Tensor& position_ids,
                                 const at::Tensor& attention_mask) {
  CompactPlan plan = plan_compact_tokens(keep, out_len, hidden, caches,
                                         position_ids, attention_mask);
  const std::vector<int32_t> src = build_src_index(plan.keep, out_len);
  for (const RowGather& g : plan.gathers) {
    gather_rows(g, src.data(), plan.batch, plan.out_len);
  }
  return std::move(plan.outputs);
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CPU, m) {
  m.impl("compact_tokens", &token_prune::compact_tokens_cpu);
}
