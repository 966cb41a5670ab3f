// CUDA kernels of token_prune::compact_tokens.
//
// Two launches, neither of which needs the host to see any data:
//   1. build_src_index_kernel: one block per sample counts and scans keep[b]
//      and writes, for every output slot, the source position (or -1 for a
//      padding slot);
//   2. gather_rows_kernel: every output tensor (hidden, each cache, position
//      ids, mask) in one launch, described as byte rows; each thread moves one
//      vector of 1..16 bytes and writes zeros for padding slots, so outputs
//      need no separate fill.
// More than kMaxGathersPerLaunch tensors (e.g. the caches of many layers) are
// split over several launches of kernel 2.
#include "common.h"

#if TOKEN_PRUNE_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace token_prune {
namespace {

constexpr int kIndexThreads = 256;
constexpr int kCopyThreads = 256;
constexpr int kCopyBlocksPerSm = 8;

// ---------------------------------------------------------------------------
// Kernel 1: slot -> source index.
//
// The caller promises out_len >= n_b for every sample; checking it would need
// the counts on the host (a sync). If the promise is broken, the earliest kept
// tokens are dropped (their slot would be negative) so nothing is written out
// of bounds: every slot still gets either a valid source or -1.
//
// No __launch_bounds__: with it ptxas squeezes this kernel into 32 registers
// (full occupancy) and spills, which buys nothing for B blocks.
// ---------------------------------------------------------------------------
__global__ void build_src_index_kernel(const bool* __restrict__ keep, int64_t seq,
                                       int64_t out_len,
                                       int32_t* __restrict__ src_index) {
  constexpr int kWarps = kIndexThreads / 32;
  __shared__ int warp_counts[kWarps];

  const int64_t b = blockIdx.x;
  const bool* row = keep + b * seq;
  int32_t* slots = src_index + b * out_len;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  // Pass 1: n_b. The loop bound is uniform over the block, as
  // __syncthreads_count requires.
  int64_t kept = 0;
  for (int64_t base = 0; base < seq; base += kIndexThreads) {
    const int64_t s = base + threadIdx.x;
    kept += __syncthreads_count(s < seq && row[s]);
  }
  const int64_t pad = out_len - kept;  // < 0 only if the caller's promise broke

  for (int64_t j = threadIdx.x; j < pad; j += kIndexThreads) {
    slots[j] = -1;
  }

  // Pass 2: exclusive scan of keep in chunks of one block, carrying the
  // running count across chunks.
  int64_t running = 0;
  for (int64_t base = 0; base < seq; base += kIndexThreads) {
    const int64_t s = base + threadIdx.x;
    const bool k = s < seq && row[s];
    const unsigned ballot = __ballot_sync(0xffffffffu, k);
    if (lane == 0) {
      warp_counts[warp] = __popc(ballot);
    }
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u));
    int chunk = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_counts[w];
      before += w < warp ? c : 0;
      chunk += c;
    }
    if (k) {
      const int64_t slot = pad + running + before;
      if (slot >= 0) {
        slots[slot] = static_cast<int32_t>(s);
      }
    }
    running += chunk;
    // warp_counts is rewritten by the next chunk.
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Kernel 2: gather rows of every output tensor.
// ---------------------------------------------------------------------------
struct KernelGather {
  const char* in;
  char* out;
  int64_t in_stride_b;
  int64_t in_stride_h;
  int64_t in_stride_s;
  int64_t out_stride_b;
  int64_t out_stride_h;
  int64_t heads;
  int64_t row_vecs;    // row length in units of vec_bytes
  int64_t total_vecs;  // B * heads * out_len * row_vecs
  int64_t vec_bytes;
};

// Passed by value as a kernel parameter (no host-to-device copy); kept under
// the classic 4 KiB parameter limit.
constexpr int kMaxGathersPerLaunch = 32;
struct GatherPack {
  KernelGather g[kMaxGathersPerLaunch];
  int count;
};
static_assert(sizeof(GatherPack) <= 4000, "GatherPack exceeds 4 KiB of params");

template <typename Vec, typename Index>
__device__ __forceinline__ void gather_rows(const KernelGather& g,
                                            const int32_t* __restrict__ src_index,
                                            Index out_len) {
  const Index row_vecs = static_cast<Index>(g.row_vecs);
  const Index heads = static_cast<Index>(g.heads);
  const Index total = static_cast<Index>(g.total_vecs);
  const Index stride = static_cast<Index>(gridDim.x) * kCopyThreads;
  // Consecutive threads take consecutive vectors of a row, so both the read
  // of a kept row and the write of an output row are coalesced.
  for (Index i = static_cast<Index>(blockIdx.x) * kCopyThreads + threadIdx.x;
       i < total; i += stride) {
    const Index row = i / row_vecs;
    const Index v = i - row * row_vecs;
    const Index bh = row / out_len;
    const Index j = row - bh * out_len;
    const Index b = bh / heads;
    const Index h = bh - b * heads;
    const int32_t s =
        src_index[static_cast<int64_t>(b) * static_cast<int64_t>(out_len) + j];
    Vec value{};  // zeros for padding slots
    if (s >= 0) {
      value = *reinterpret_cast<const Vec*>(
          g.in + static_cast<int64_t>(b) * g.in_stride_b +
          static_cast<int64_t>(h) * g.in_stride_h +
          static_cast<int64_t>(s) * g.in_stride_s +
          static_cast<int64_t>(v) * static_cast<int64_t>(sizeof(Vec)));
    }
    *reinterpret_cast<Vec*>(
        g.out + static_cast<int64_t>(b) * g.out_stride_b +
        static_cast<int64_t>(h) * g.out_stride_h +
        (static_cast<int64_t>(j) * g.row_vecs + static_cast<int64_t>(v)) *
            static_cast<int64_t>(sizeof(Vec))) = value;
  }
}

// __grid_constant__ lets the loop index the parameter array without copying
// the whole pack into per-thread local memory.
template <typename Index>
__global__ void __launch_bounds__(kCopyThreads)
    gather_rows_kernel(const __grid_constant__ GatherPack pack,
                       const int32_t* __restrict__ src_index, int64_t out_len) {
  const Index L = static_cast<Index>(out_len);
  for (int t = 0; t < pack.count; ++t) {
    const KernelGather& g = pack.g[t];
    // Uniform over the grid, so the switch does not diverge.
    switch (g.vec_bytes) {
      case 16:
        gather_rows<uint4, Index>(g, src_index, L);
        break;
      case 8:
        gather_rows<uint2, Index>(g, src_index, L);
        break;
      case 4:
        gather_rows<uint32_t, Index>(g, src_index, L);
        break;
      case 2:
        gather_rows<uint16_t, Index>(g, src_index, L);
        break;
      default:
        gather_rows<uint8_t, Index>(g, src_index, L);
        break;
    }
  }
}

KernelGather to_kernel(const RowGather& r, int64_t batch, int64_t out_len) {
  KernelGather k;
  k.in = r.in;
  k.out = r.out;
  k.in_stride_b = r.in_stride_b;
  k.in_stride_h = r.in_stride_h;
  k.in_stride_s = r.in_stride_s;
  k.out_stride_b = r.out_stride_b;
  k.out_stride_h = r.out_stride_h;
  k.heads = r.heads;
  k.vec_bytes = r.vec_bytes;
  k.row_vecs = r.row_bytes / r.vec_bytes;
  k.total_vecs = batch * r.heads * out_len * k.row_vecs;
  return k;
}

void launch_gathers(const std::vector<RowGather>& gathers,
                    const int32_t* src_index, int64_t batch, int64_t out_len,
                    cudaStream_t stream) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
      kCopyBlocksPerSm;
  for (size_t first = 0; first < gathers.size(); first += kMaxGathersPerLaunch) {
    GatherPack pack{};
    int64_t max_total = 0;
    const size_t last =
        std::min(gathers.size(), first + static_cast<size_t>(kMaxGathersPerLaunch));
    for (size_t i = first; i < last; ++i) {
      pack.g[pack.count] = to_kernel(gathers[i], batch, out_len);
      max_total = std::max(max_total, pack.g[pack.count].total_vecs);
      ++pack.count;
    }
    const int64_t blocks = std::max<int64_t>(
        1, std::min(max_blocks, (max_total + kCopyThreads - 1) / kCopyThreads));
    // 32-bit index math is markedly cheaper on the GPU; it is safe while
    // i + stride cannot wrap.
    const bool small = max_total + blocks * kCopyThreads <=
                       static_cast<int64_t>(std::numeric_limits<int32_t>::max());
    if (small) {
      gather_rows_kernel<uint32_t><<<static_cast<unsigned>(blocks), kCopyThreads,
                                     0, stream>>>(pack, src_index, out_len);
    } else {
      gather_rows_kernel<uint64_t><<<static_cast<unsigned>(blocks), kCopyThreads,
                                     0, stream>>>(pack, src_index, out_len);
    }
    TOKEN_PRUNE_LAUNCH_CHECK();
  }
}

}  // namespace

CompactResult compact_tokens_cuda(const at::Tensor& keep, int64_t out_len,
                                  const at::Tensor& hidden,
                                  at::TensorList caches,
                                  const at::Tensor& position_ids,
                                  const at::Tensor& attention_mask) {
  TORCH_CHECK(keep.is_cuda(), "token_prune::compact_tokens: keep is on ",
              keep.device(), " but another input is on CUDA; all inputs must "
              "be on the same device");
  const c10::cuda::CUDAGuard guard(keep.device());
  CompactPlan plan = plan_compact_tokens(keep, out_len, hidden, caches,
                                         position_ids, attention_mask);
  const int64_t B = plan.batch;
  const int64_t L = plan.out_len;
  if (B == 0 || L == 0 || plan.gathers.empty()) {
    return std::move(plan.outputs);
  }
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(),
              "token_prune::compact_tokens: batch size ", B, " is too large");

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor src_index =
      at::empty({B, L}, keep.options().dtype(at::kInt));
  build_src_index_kernel<<<static_cast<unsigned>(B), kIndexThreads, 0, stream>>>(
      plan.keep.const_data_ptr<bool>(), plan.seq, L,
      src_index.mutable_data_ptr<int32_t>());
  TOKEN_PRUNE_LAUNCH_CHECK();

  launch_gathers(plan.gathers, src_index.const_data_ptr<int32_t>(), B, L, stream);
  return std::move(plan.outputs);
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CUDA, m) {
  m.impl("compact_tokens", &token_prune::compact_tokens_cuda);
}

#endif  // TOKEN_PRUNE_WITH_CUDA
