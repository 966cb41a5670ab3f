// CPU kernels of token_prune::scatter_rows and scatter_rows_.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

namespace token_prune {
namespace {

template <typename Index>
void scatter_into(at::Tensor& out, const at::Tensor& packed, const at::Tensor& index,
                  const std::optional<at::Tensor>& residual, const char* op) {
  const int64_t B = packed.size(0), P = packed.size(1), H = packed.size(2);
  const int64_t S = out.size(1);
  const at::Tensor pk = packed.contiguous();
  const at::Tensor ix = index.contiguous();
  const Index* idx = ix.const_data_ptr<Index>();
  // Validate every target first, so a bad index leaves `out` untouched.
  for (int64_t r = 0; r < B * P; ++r) {
    TORCH_CHECK(idx[r] < S, op, "index[", r / P, ", ", r % P, "] = ", idx[r],
                " is out of range for a sequence of ", S, " rows");
  }
  const int64_t osb = out.stride(0), oss = out.stride(1);
  const int64_t elem = out.element_size();
  if (!residual.has_value()) {
    const char* src = static_cast<const char*>(pk.const_data_ptr());
    char* dst = static_cast<char*>(out.mutable_data_ptr());
    at::parallel_for(0, B * P, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = idx[r];
        if (t < 0) {
          continue;
        }
        const int64_t b = r / P;
        std::memcpy(dst + (b * osb + t * oss) * elem, src + r * H * elem,
                    static_cast<size_t>(H * elem));
      }
    });
    return;
  }
  const at::Tensor rs = residual->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_rows_cpu", [&] {
    const scalar_t* src = pk.const_data_ptr<scalar_t>();
    const scalar_t* res = rs.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * P, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = idx[r];
        if (t < 0) {
          continue;
        }
        const int64_t b = r / P;
        scalar_t* row = dst + b * osb + t * oss;
        for (int64_t e = 0; e < H; ++e) {
          // One rounding, like torch's add: half types add in float.
          row[e] = static_cast<scalar_t>(src[r * H + e] + res[r * H + e]);
        }
      }
    });
  });
}

void scatter_rows_impl(at::Tensor& out, const at::Tensor& packed, const at::Tensor& index,
                       const std::optional<at::Tensor>& residual, const char* op) {
  if (packed.numel() == 0 || index.numel() == 0) {
    return;
  }
  if (index.scalar_type() == at::kInt) {
    scatter_into<int32_t>(out, packed, index, residual, op);
  } else {
    scatter_into<int64_t>(out, packed, index, residual, op);
  }
}

}  // namespace

at::Tensor scatter_rows_cpu(const at::Tensor& full, const at::Tensor& packed,
                            const at::Tensor& index, const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "token_prune::scatter_rows: ";
  check_scatter_rows(op, full, packed, index, residual);
  at::Tensor out = at::empty(full.sizes(), full.options());
  out.copy_(full);
  scatter_rows_impl(out, packed, index, residual, op);
  return out;
}

void scatter_rows_inplace_cpu(const at::Tensor& full, const at::Tensor& packed,
                              const at::Tensor& index, const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "token_prune::scatter_rows_: ";
  check_scatter_rows(op, full, packed, index, residual);
  if (full.stride(2) == 1 || full.size(2) <= 1) {
    at::Tensor out = full;
    scatter_rows_impl(out, packed, index, residual, op);
    return;
  }
  // Rows that are not contiguous: work on a contiguous copy.
  at::Tensor out = full.contiguous();
  scatter_rows_impl(out, packed, index, residual, op);
  const_cast<at::Tensor&>(full).copy_(out);
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CPU, m) {
  m.impl("scatter_rows", &token_prune::scatter_rows_cpu);
  m.impl("scatter_rows_", &token_prune::scatter_rows_inplace_cpu);
}
