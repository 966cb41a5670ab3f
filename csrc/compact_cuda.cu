// CUDA kernel of token_prune::compact_tokens: one launch for the hidden
// states, every KV cache tensor, the position ids and the mask.
//
// Each block owns `tile` consecutive output slots of one sample and works out
// their sources itself, so no index pass (and no grid-wide barrier) precedes
// the copy:
//   1. Slots are right-aligned, so output slot j holds the kept token that
//      has exactly L-1-j kept tokens after it (its "reverse rank"), and needs
//      no knowledge of the sample's total kept count. The block scans keep[b]
//      backwards in chunks of 4*256 tokens (a block-wide exclusive scan of
//      per-thread counts) until it has seen the reverse ranks of its slots,
//      and records their sources in shared memory; a slot whose reverse rank
//      is never reached is padding (-1).
//   2. It then copies, for every tensor in the descriptor array, the rows of
//      its slots (all heads) in vectors of 1..16 bytes, zeros for padding.
// The descriptor array (up to kMaxDescriptors tensors, 72 bytes each) is a
// __grid_constant__ kernel parameter, i.e. it lives in the constant bank and
// needs no host-to-device copy; CUDA 12.1+ allows kernel parameters up to 32
// KiB. More tensors than that (over 150 decoder layers) take several launches.
//
// The caller promises out_len >= n_b for every sample (checking it would need
// the counts on the host). If the promise is broken each such sample keeps its
// last out_len kept tokens, and nothing is written out of bounds.
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

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kScanPerThread = 4;
constexpr int kScanChunk = kThreads * kScanPerThread;
constexpr int kMaxTile = 128;

struct Descriptor {
  const char* in;
  char* out;
  int64_t in_stride_b;
  int64_t in_stride_h;
  int64_t in_stride_s;
  int64_t out_stride_b;
  int64_t out_stride_h;
  int32_t heads;
  int32_t row_vecs;   // row length in units of vec_bytes
  int32_t vec_bytes;  // 1, 2, 4, 8 or 16
  int32_t unused;
};
static_assert(sizeof(Descriptor) == 72, "keep the descriptor compact");

template <int kCap>
struct DescriptorPack {
  Descriptor d[kCap];
  int count;
};
constexpr int kSmallPack = 32;
constexpr int kMaxDescriptors = 400;
static_assert(sizeof(DescriptorPack<kMaxDescriptors>) + 64 <= 32764,
              "kernel parameters are limited to 32764 bytes");

// Block-wide exclusive scan of one int per thread; also returns the total.
__device__ __forceinline__ int block_exclusive_scan(int value, int* warp_sums, int& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) {
      inclusive += other;
    }
  }
  if (lane == 31) {
    warp_sums[warp] = inclusive;
  }
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int s = warp_sums[w];
    before += w < warp ? s : 0;
    total += s;
  }
  // warp_sums is rewritten by the next call.
  __syncthreads();
  return before + inclusive - value;
}

template <typename Vec, typename Index>
__device__ __forceinline__ void copy_rows(const Descriptor& d, const int32_t* src, int64_t b,
                                          int64_t j0, Index tile) {
  const Index row_vecs = static_cast<Index>(d.row_vecs);
  const Index total = static_cast<Index>(d.heads) * tile * row_vecs;
  const int64_t row_bytes = static_cast<int64_t>(d.row_vecs) * static_cast<int64_t>(sizeof(Vec));
  const char* in_b = d.in + b * d.in_stride_b;
  char* out_b = d.out + b * d.out_stride_b;
  for (Index i = threadIdx.x; i < total; i += kThreads) {
    const Index row = i / row_vecs;
    const Index v = i - row * row_vecs;
    const Index h = row / tile;
    const Index jj = row - h * tile;
    const int32_t s = src[jj];
    Vec value{};  // zeros for padding slots
    if (s >= 0) {
      value = *reinterpret_cast<const Vec*>(in_b + static_cast<int64_t>(h) * d.in_stride_h +
                                            static_cast<int64_t>(s) * d.in_stride_s +
                                            static_cast<int64_t>(v) * static_cast<int64_t>(sizeof(Vec)));
    }
    *reinterpret_cast<Vec*>(out_b + static_cast<int64_t>(h) * d.out_stride_h +
                            (j0 + static_cast<int64_t>(jj)) * row_bytes +
                            static_cast<int64_t>(v) * static_cast<int64_t>(sizeof(Vec))) = value;
  }
}

template <int kCap, typename Index>
__global__ void __launch_bounds__(kThreads)
    compact_kernel(const __grid_constant__ DescriptorPack<kCap> pack, const bool* __restrict__ keep,
                   int64_t seq, int64_t out_len, int64_t tiles_per_sample, int64_t tile) {
  __shared__ int32_t src[kMaxTile];
  __shared__ int warp_sums[kWarps];

  const int64_t b = blockIdx.x / tiles_per_sample;
  const int64_t j0 = (blockIdx.x - b * tiles_per_sample) * tile;
  const int64_t n_slots = tile < out_len - j0 ? tile : out_len - j0;  // >= 1
  // Reverse ranks of this block's slots: [rr_lo, rr_hi].
  const int64_t rr_hi = out_len - 1 - j0;
  const int64_t rr_lo = rr_hi - (n_slots - 1);
  for (int t = threadIdx.x; t < n_slots; t += kThreads) {
    src[t] = -1;
  }
  __syncthreads();

  // Phase 1: backward scan of keep[b] until every slot's reverse rank is seen.
  const bool* row = keep + b * seq;
  int64_t seen = 0;  // kept tokens after the current chunk; uniform over the block
  for (int64_t end = seq; end > 0 && seen <= rr_hi; end -= kScanChunk) {
    // Thread 0 takes the 4 tokens nearest `end`, thread 1 the 4 before, ...
    const int64_t top = end - 1 - static_cast<int64_t>(threadIdx.x) * kScanPerThread;
    bool flag[kScanPerThread];
    int count = 0;
#pragma unroll
    for (int u = 0; u < kScanPerThread; ++u) {
      const int64_t s = top - u;
      flag[u] = s >= 0 && row[s];
      count += flag[u];
    }
    int chunk_total;
    const int before = block_exclusive_scan(count, warp_sums, chunk_total);
    int64_t rr = seen + before;
#pragma unroll
    for (int u = 0; u < kScanPerThread; ++u) {
      if (flag[u]) {
        if (rr >= rr_lo && rr <= rr_hi) {
          src[out_len - 1 - rr - j0] = static_cast<int32_t>(top - u);
        }
        ++rr;
      }
    }
    seen += chunk_total;
  }
  __syncthreads();

  // Phase 2: every tensor's rows of these slots.
  const Index tile_i = static_cast<Index>(n_slots);
  for (int t = 0; t < pack.count; ++t) {
    const Descriptor& d = pack.d[t];
    // Uniform over the block, so the switch does not diverge.
    switch (d.vec_bytes) {
      case 16:
        copy_rows<uint4, Index>(d, src, b, j0, tile_i);
        break;
      case 8:
        copy_rows<uint2, Index>(d, src, b, j0, tile_i);
        break;
      case 4:
        copy_rows<uint32_t, Index>(d, src, b, j0, tile_i);
        break;
      case 2:
        copy_rows<uint16_t, Index>(d, src, b, j0, tile_i);
        break;
      default:
        copy_rows<uint8_t, Index>(d, src, b, j0, tile_i);
        break;
    }
  }
}

Descriptor to_descriptor(const RowGather& r) {
  Descriptor d{};
  d.in = r.in;
  d.out = r.out;
  d.in_stride_b = r.in_stride_b;
  d.in_stride_h = r.in_stride_h;
  d.in_stride_s = r.in_stride_s;
  d.out_stride_b = r.out_stride_b;
  d.out_stride_h = r.out_stride_h;
  TORCH_CHECK(r.heads <= std::numeric_limits<int32_t>::max() &&
                  r.row_bytes / r.vec_bytes <= std::numeric_limits<int32_t>::max(),
              "token_prune::compact_tokens: a tensor has too many heads or too long rows");
  d.heads = static_cast<int32_t>(r.heads);
  d.vec_bytes = static_cast<int32_t>(r.vec_bytes);
  d.row_vecs = static_cast<int32_t>(r.row_bytes / r.vec_bytes);
  return d;
}

// Slots per block: enough bytes per block to amortize its scan of keep[b],
// enough blocks to fill the GPU.
int64_t choose_tile(int64_t batch, int64_t out_len, int64_t bytes_per_slot, int64_t sms) {
  int64_t tile = kMaxTile;
  while (tile > 1 && tile * bytes_per_slot > (int64_t{256} << 10)) {
    tile /= 2;
  }
  while (tile > 4 && batch * ((out_len + tile - 1) / tile) < 2 * sms) {
    tile /= 2;
  }
  return tile;
}

template <int kCap>
void launch(const std::vector<Descriptor>& descs, size_t first, size_t last,
            const bool* keep, int64_t batch, int64_t seq, int64_t out_len, int64_t sms,
            cudaStream_t stream) {
  DescriptorPack<kCap> pack{};
  int64_t bytes_per_slot = 0;
  int64_t max_vecs_per_slot = 0;
  for (size_t i = first; i < last; ++i) {
    const Descriptor& d = descs[i];
    pack.d[pack.count++] = d;
    bytes_per_slot += static_cast<int64_t>(d.heads) * d.row_vecs * d.vec_bytes;
    max_vecs_per_slot = std::max<int64_t>(max_vecs_per_slot, static_cast<int64_t>(d.heads) * d.row_vecs);
  }
  const int64_t tile = choose_tile(batch, out_len, bytes_per_slot, sms);
  const int64_t tiles = (out_len + tile - 1) / tile;
  const int64_t blocks = batch * tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "token_prune::compact_tokens: too many output slots");
  // 32-bit index math is markedly cheaper; it is safe while a block's
  // per-tensor vector count plus the stride fits.
  const bool small = max_vecs_per_slot * tile + kThreads <=
                     static_cast<int64_t>(std::numeric_limits<int32_t>::max());
  if (small) {
    compact_kernel<kCap, uint32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        pack, keep, seq, out_len, tiles, tile);
  } else {
    compact_kernel<kCap, uint64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        pack, keep, seq, out_len, tiles, tile);
  }
  TOKEN_PRUNE_LAUNCH_CHECK();
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
  std::vector<Descriptor> descs;
  descs.reserve(plan.gathers.size());
  for (const RowGather& g : plan.gathers) {
    descs.push_back(to_descriptor(g));
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool* k = plan.keep.const_data_ptr<bool>();
  if (descs.size() <= static_cast<size_t>(kSmallPack)) {
    // A small parameter block keeps the launch cheap in the common case.
    launch<kSmallPack>(descs, 0, descs.size(), k, B, plan.seq, L, sms, stream);
  } else {
    for (size_t first = 0; first < descs.size(); first += kMaxDescriptors) {
      const size_t last = std::min(descs.size(), first + static_cast<size_t>(kMaxDescriptors));
      launch<kMaxDescriptors>(descs, first, last, k, B, plan.seq, L, sms, stream);
    }
  }
  return std::move(plan.outputs);
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CUDA, m) {
  m.impl("compact_tokens", &token_prune::compact_tokens_cuda);
}

#endif  // TOKEN_PRUNE_WITH_CUDA
