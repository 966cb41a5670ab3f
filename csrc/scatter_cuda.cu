// CUDA kernels of token_prune::scatter_rows and scatter_rows_ (ALVTS's
// skip-and-merge: the rows a decoder layer processed go back into the full
// hidden state, in their original order).
//
// One warp per packed row (grid y = sample): it reads the row's target index once, then its
// lanes move the row in vectors of up to 16 bytes (the widest the row size,
// base addresses and strides allow). With a residual the vectors are added
// element-wise in float (double for float64) and rounded once, which is what
// torch's add does, so results are bit-identical to the reference.
//
// scatter_rows (functional) first copies `full` into a new contiguous tensor
// (a device-to-device copy), then scatters; scatter_rows_ scatters into `full`
// itself and so moves only the packed rows.
//
// Targets must be unique per sample (as compact_tokens' index rows are);
// negative targets are skipped, and so are targets >= S (not checked: that
// would need a sync).
#include "common.h"

#if TOKEN_PRUNE_WITH_CUDA

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace token_prune {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct ScatterArgs {
  const char* packed;
  const char* residual;
  char* out;
  const void* index;
  int64_t packed_stride_b;  // bytes
  int64_t packed_stride_s;
  int64_t residual_stride_b;
  int64_t residual_stride_s;
  int64_t out_stride_b;
  int64_t out_stride_s;
  int64_t index_stride_b;  // elements
  int64_t index_stride_s;
  int64_t rows;  // S' (packed rows per sample)
  int64_t seq;   // S
  int64_t batch_offset;  // sample of blockIdx.y == 0
  int64_t row_vecs;
};

// Grid: x strides over a sample's packed rows (one warp per row), y is the
// sample, so no index math needs a division.
template <typename IndexT>
__device__ __forceinline__ bool target_of(const ScatterArgs& a, int64_t b, int64_t j, int64_t& t) {
  t = static_cast<int64_t>(
      static_cast<const IndexT*>(a.index)[b * a.index_stride_b + j * a.index_stride_s]);
  return t >= 0 && t < a.seq;
}

template <typename Vec, typename IndexT>
__global__ void __launch_bounds__(kThreads, 4) scatter_copy_kernel(const ScatterArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t b = a.batch_offset + blockIdx.y;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t j = first; j < a.rows; j += step) {
    int64_t t;
    if (!target_of<IndexT>(a, b, j, t)) {
      continue;
    }
    const Vec* src = reinterpret_cast<const Vec*>(a.packed + b * a.packed_stride_b + j * a.packed_stride_s);
    Vec* dst = reinterpret_cast<Vec*>(a.out + b * a.out_stride_b + t * a.out_stride_s);
    for (int64_t v = lane; v < a.row_vecs; v += 32) {
      dst[v] = src[v];
    }
  }
}

template <typename T, int kElems>
struct alignas(sizeof(T) * kElems) Pack {
  T v[kElems];
};

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

template <typename T, int kElems, typename IndexT>
__global__ void __launch_bounds__(kThreads, 4) scatter_add_kernel(const ScatterArgs a) {
  using P = Pack<T, kElems>;
  using Op = typename OpMath<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t b = a.batch_offset + blockIdx.y;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t j = first; j < a.rows; j += step) {
    int64_t t;
    if (!target_of<IndexT>(a, b, j, t)) {
      continue;
    }
    const P* src = reinterpret_cast<const P*>(a.packed + b * a.packed_stride_b + j * a.packed_stride_s);
    const P* res = reinterpret_cast<const P*>(a.residual + b * a.residual_stride_b + j * a.residual_stride_s);
    P* dst = reinterpret_cast<P*>(a.out + b * a.out_stride_b + t * a.out_stride_s);
    for (int64_t v = lane; v < a.row_vecs; v += 32) {
      P x = src[v];
      const P y = res[v];
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        x.v[e] = static_cast<T>(static_cast<Op>(x.v[e]) + static_cast<Op>(y.v[e]));
      }
      dst[v] = x;
    }
  }
}

int64_t used_stride_bytes(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim) * t.element_size();
}

int64_t address_mod16(const void* p) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
}

template <typename IndexT>
void launch_samples(ScatterArgs a, int64_t samples, int64_t vec_bytes, at::ScalarType dtype,
                    bool with_residual, cudaStream_t stream) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_sample = std::max<int64_t>(1, sms * 16 / samples);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(
                      1, std::min<int64_t>((a.rows + kWarps - 1) / kWarps, per_sample))),
                  static_cast<unsigned>(samples));
  if (!with_residual) {
    switch (vec_bytes) {
      case 16:
        scatter_copy_kernel<uint4, IndexT><<<grid, kThreads, 0, stream>>>(a);
        break;
      case 8:
        scatter_copy_kernel<uint2, IndexT><<<grid, kThreads, 0, stream>>>(a);
        break;
      case 4:
        scatter_copy_kernel<uint32_t, IndexT><<<grid, kThreads, 0, stream>>>(a);
        break;
      case 2:
        scatter_copy_kernel<uint16_t, IndexT><<<grid, kThreads, 0, stream>>>(a);
        break;
      default:
        scatter_copy_kernel<uint8_t, IndexT><<<grid, kThreads, 0, stream>>>(a);
        break;
    }
    TOKEN_PRUNE_LAUNCH_CHECK();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scatter_rows_cuda", [&] {
    constexpr int kWide = static_cast<int>(16 / sizeof(scalar_t));
    if (vec_bytes == 16) {
      scatter_add_kernel<scalar_t, kWide, IndexT><<<grid, kThreads, 0, stream>>>(a);
    } else {
      // Rows that cannot be moved 16 bytes at a time: element by element.
      a.row_vecs = a.row_vecs * vec_bytes / static_cast<int64_t>(sizeof(scalar_t));
      scatter_add_kernel<scalar_t, 1, IndexT><<<grid, kThreads, 0, stream>>>(a);
    }
  });
  TOKEN_PRUNE_LAUNCH_CHECK();
}

template <typename IndexT>
void launch(ScatterArgs a, int64_t batch, int64_t vec_bytes, at::ScalarType dtype,
            bool with_residual, cudaStream_t stream) {
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t first = 0; first < batch; first += kMaxGridY) {
    a.batch_offset = first;
    launch_samples<IndexT>(a, std::min(kMaxGridY, batch - first), vec_bytes, dtype, with_residual,
                           stream);
  }
}

// Scatters into `out` (last dim contiguous).
void scatter_into(at::Tensor& out, const at::Tensor& packed_in, const at::Tensor& index,
                  const std::optional<at::Tensor>& residual_in) {
  if (packed_in.numel() == 0 || index.numel() == 0) {
    return;
  }
  const at::Tensor packed = packed_in.stride(2) == 1 ? packed_in : packed_in.contiguous();
  at::Tensor residual;
  if (residual_in.has_value()) {
    residual = residual_in->stride(2) == 1 ? *residual_in : residual_in->contiguous();
  }
  const int64_t elem = out.element_size();
  ScatterArgs a{};
  a.packed = static_cast<const char*>(packed.const_data_ptr());
  a.out = static_cast<char*>(out.mutable_data_ptr());
  a.index = index.const_data_ptr();
  a.packed_stride_b = used_stride_bytes(packed, 0);
  a.packed_stride_s = used_stride_bytes(packed, 1);
  a.out_stride_b = used_stride_bytes(out, 0);
  a.out_stride_s = used_stride_bytes(out, 1);
  a.index_stride_b = index.size(0) == 1 ? 0 : index.stride(0);
  a.index_stride_s = index.size(1) == 1 ? 0 : index.stride(1);
  a.rows = packed.size(1);
  a.seq = out.size(1);
  const int64_t row_bytes = packed.size(2) * elem;
  int64_t vec = 0;
  if (residual.defined()) {
    a.residual = static_cast<const char*>(residual.const_data_ptr());
    a.residual_stride_b = used_stride_bytes(residual, 0);
    a.residual_stride_s = used_stride_bytes(residual, 1);
    vec = widest_vector({row_bytes, address_mod16(a.packed), address_mod16(a.out),
                         address_mod16(a.residual), a.packed_stride_b, a.packed_stride_s,
                         a.out_stride_b, a.out_stride_s, a.residual_stride_b,
                         a.residual_stride_s});
  } else {
    vec = widest_vector({row_bytes, address_mod16(a.packed), address_mod16(a.out),
                         a.packed_stride_b, a.packed_stride_s, a.out_stride_b, a.out_stride_s});
  }
  a.row_vecs = row_bytes / vec;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (index.scalar_type() == at::kInt) {
    launch<int32_t>(a, packed.size(0), vec, out.scalar_type(), residual.defined(), stream);
  } else {
    launch<int64_t>(a, packed.size(0), vec, out.scalar_type(), residual.defined(), stream);
  }
}

}  // namespace

at::Tensor scatter_rows_cuda(const at::Tensor& full, const at::Tensor& packed,
                             const at::Tensor& index, const std::optional<at::Tensor>& residual) {
  check_scatter_rows("token_prune::scatter_rows: ", full, packed, index, residual);
  const c10::cuda::CUDAGuard guard(full.device());
  at::Tensor out = at::empty(full.sizes(), full.options());
  out.copy_(full);
  scatter_into(out, packed, index, residual);
  return out;
}

void scatter_rows_inplace_cuda(const at::Tensor& full, const at::Tensor& packed,
                               const at::Tensor& index, const std::optional<at::Tensor>& residual) {
  check_scatter_rows("token_prune::scatter_rows_: ", full, packed, index, residual);
  const c10::cuda::CUDAGuard guard(full.device());
  if (full.stride(2) == 1 || full.size(2) <= 1) {
    at::Tensor out = full;
    scatter_into(out, packed, index, residual);
    return;
  }
  at::Tensor out = full.contiguous();
  scatter_into(out, packed, index, residual);
  const_cast<at::Tensor&>(full).copy_(out);
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CUDA, m) {
  m.impl("scatter_rows", &token_prune::scatter_rows_cuda);
  m.impl("scatter_rows_", &token_prune::scatter_rows_inplace_cuda);
}

#endif  // TOKEN_PRUNE_WITH_CUDA
