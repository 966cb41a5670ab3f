// CUDA kernel of token_prune::keep_mask: GlimpsePrune's keep rule, decided on
// the device with no host synchronization.
//
// The probabilities come from ATen's sigmoid on float32 (one small
// elementwise launch), the very function the Python rule calls, so every
// comparison and every tie sees bit-identical values on both paths. Then one
// block per image:
//   * counts p > threshold (threshold rounded to float32, as torch compares a
//     float32 tensor with a Python float) and derives k, the number to keep by
//     top-k, or keeps exactly the tokens above the threshold;
//   * top-k: radix select over 32-bit keys that order floats like
//     torch.sort(descending=True, stable=True) (NaN first, -0 == +0): four
//     8-bit digit passes with warp-aggregated shared-memory histograms find
//     the k-th largest key K and how many tokens equal to K are kept (E);
//   * marks tokens with key > K, and the first E tokens with key == K in index
//     order (a block-wide ordered scan), which is exactly a stable top-k.
// An image's keys are staged in shared memory when they fit (up to
// kSmemKeys tokens, 96 KiB); larger images read them from global memory
// (L2) on every pass, so there is no size limit, only a slower path.
#include "common.h"

#if TOKEN_PRUNE_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sigmoid.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace token_prune {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kSmemKeys = 24576;  // 96 KiB of uint32 keys

struct KeepParams {
  const float* probs;
  const int32_t* cu;
  bool* keep;
  float threshold;
  double max_keep_ratio;  // < 0: none
  double keep_ratio;      // < 0: none
  int64_t min_keep;
  int smem_keys;          // capacity of the dynamic shared-memory key buffer
};

__device__ __forceinline__ uint32_t key_of(float p) {
  return descending_key_bits(__float_as_uint(p));
}

// Sum over the block (all threads get it). Uses `scratch` [kWarps].
__device__ __forceinline__ int block_sum(int value, int* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, off);
  }
  if ((threadIdx.x & 31) == 0) {
    scratch[threadIdx.x >> 5] = value;
  }
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    total += scratch[w];
  }
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kThreads) keep_mask_kernel(const KeepParams p) {
  extern __shared__ uint32_t skeys[];
  __shared__ uint32_t hist[256];
  __shared__ int scratch[kWarps];
  __shared__ int chosen_digit;
  __shared__ int chosen_rank;

  const int start = p.cu[blockIdx.x];
  const int n = p.cu[blockIdx.x + 1] - start;
  if (n <= 0) {
    return;
  }
  const float* probs = p.probs + start;
  bool* out = p.keep + start;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // --- how many to keep --------------------------------------------------
  int64_t k;
  if (p.keep_ratio >= 0.0) {
    // Rounded like Python's `keep_ratio * n - 1e-9`: product, then difference.
    // Written as intrinsics because nvcc would contract it into one fma (a
    // single rounding), which moves ceil() across an integer for some ratios.
    const double want =
        ceil(__dsub_rn(__dmul_rn(p.keep_ratio, static_cast<double>(n)), 1e-9));
    k = want < static_cast<double>(n) ? static_cast<int64_t>(want) : n;
  } else {
    int above = 0;
    for (int64_t i = tid; i < n; i += kThreads) {
      above += probs[i] > p.threshold;
    }
    above = block_sum(above, scratch);
    const int64_t floor = p.min_keep < n ? p.min_keep : n;
    k = -1;
    if (p.max_keep_ratio >= 0.0) {
      // int(max_keep_ratio * n); a cap >= n never binds (above <= n), so
      // clamp before the cast instead of relying on an out-of-range one.
      const double cap_d = __dmul_rn(p.max_keep_ratio, static_cast<double>(n));
      const int64_t cap = cap_d < static_cast<double>(n) ? static_cast<int64_t>(cap_d) : n;
      if (above > cap) {
        k = cap > floor ? cap : floor;
      }
    }
    if (k < 0 && above < floor) {
      k = floor;
    }
    if (k < 0) {
      for (int64_t i = tid; i < n; i += kThreads) {
        out[i] = probs[i] > p.threshold;
      }
      return;
    }
  }
  if (k <= 0 || k >= n) {
    const bool all = k >= n;
    for (int64_t i = tid; i < n; i += kThreads) {
      out[i] = all;
    }
    return;
  }

  // --- radix select of the k-th largest key --------------------------------
  const bool staged = n <= p.smem_keys;
  if (staged) {
    for (int64_t i = tid; i < n; i += kThreads) {
      skeys[i] = key_of(probs[i]);
    }
  }
  // (the first barrier below also publishes skeys)
  uint32_t prefix = 0, prefix_mask = 0;
  int rank = static_cast<int>(k);  // 1-based rank of the target among the prefix group
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) {
      hist[i] = 0;
    }
    __syncthreads();
    // Every thread runs the same number of iterations so the warp-wide
    // __match_any_sync below sees all 32 lanes.
    for (int64_t base = 0; base < n; base += kThreads) {
      const int64_t i = base + tid;
      int digit = -1;
      if (i < n) {
        const uint32_t u = staged ? skeys[i] : key_of(probs[i]);
        if ((u & prefix_mask) == prefix) {
          digit = static_cast<int>((u >> shift) & 0xffu);
        }
      }
      // Warp-aggregated increments: probabilities share their high bytes, so
      // most lanes hit the same few bins.
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (digit >= 0 && lane == __ffs(peers) - 1) {
        atomicAdd(&hist[digit], static_cast<uint32_t>(__popc(peers)));
      }
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns digits 255-8l .. 248-8l, highest first.
      uint32_t c[8];
      uint32_t local = 0;
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        c[r] = hist[255 - 8 * lane - r];
        local += c[r];
      }
      uint32_t inclusive = local;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t other = __shfl_up_sync(0xffffffffu, inclusive, off);
        if (lane >= off) {
          inclusive += other;
        }
      }
      const unsigned reach = __ballot_sync(0xffffffffu, inclusive >= static_cast<uint32_t>(rank));
      if (lane == __ffs(reach) - 1) {
        uint32_t acc = inclusive - local;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          if (acc + c[r] >= static_cast<uint32_t>(rank)) {
            chosen_digit = 255 - 8 * lane - r;
            chosen_rank = rank - static_cast<int>(acc);
            break;
          }
          acc += c[r];
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(chosen_digit) << shift;
    prefix_mask |= 0xffu << shift;
    rank = chosen_rank;
    __syncthreads();  // chosen_* and hist are rewritten by the next pass
  }
  // prefix is now the k-th largest key; `rank` of the tokens equal to it are
  // kept, the earliest ones.

  // --- mark ------------------------------------------------------------------
  int seen_equal = 0;  // uniform over the block
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t i = base + tid;
    uint32_t u = 0;
    if (i < n) {
      u = staged ? skeys[i] : key_of(probs[i]);
    }
    const bool equal = i < n && u == prefix;
    const unsigned ballot = __ballot_sync(0xffffffffu, equal);
    if (lane == 0) {
      scratch[warp] = __popc(ballot);
    }
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u));
    int chunk = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int c = scratch[w];
      before += w < warp ? c : 0;
      chunk += c;
    }
    if (i < n) {
      out[i] = u > prefix || (equal && seen_equal + before < rank);
    }
    seen_equal += chunk;
    __syncthreads();
  }
}

}  // namespace

at::Tensor keep_mask_cuda(const at::Tensor& scores, const at::Tensor& cu_seqlens,
                          double threshold, std::optional<double> max_keep_ratio,
                          int64_t min_keep, std::optional<double> keep_ratio,
                          bool scores_are_logits) {
  check_keep_mask(scores, cu_seqlens, max_keep_ratio, min_keep, keep_ratio);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t total = scores.size(0);
  at::Tensor probs = scores.to(at::kFloat);
  if (scores_are_logits) {
    probs = at::sigmoid(probs);
  }
  probs = probs.contiguous();
  at::Tensor cu = cu_seqlens.contiguous();
  // Tokens outside every image stay false.
  at::Tensor keep = at::empty({total}, scores.options().dtype(at::kBool));
  const int64_t images = cu.size(0) - 1;
  if (total == 0) {
    return keep;
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(keep.mutable_data_ptr<bool>(), 0, static_cast<size_t>(total), stream));
  if (images == 0) {
    return keep;
  }
  TORCH_CHECK(images <= std::numeric_limits<int32_t>::max(), "token_prune::keep_mask: too many images");

  KeepParams p{};
  p.probs = probs.const_data_ptr<float>();
  p.cu = cu.const_data_ptr<int32_t>();
  p.keep = keep.mutable_data_ptr<bool>();
  p.threshold = static_cast<float>(threshold);
  p.max_keep_ratio = max_keep_ratio.has_value() ? *max_keep_ratio : -1.0;
  p.keep_ratio = keep_ratio.has_value() ? *keep_ratio : -1.0;
  p.min_keep = min_keep;
  // No image is longer than the whole input: size the key buffer by that.
  p.smem_keys = static_cast<int>(std::min<int64_t>(total, kSmemKeys));
  const size_t smem = static_cast<size_t>(p.smem_keys) * sizeof(uint32_t);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(keep_mask_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  keep_mask_kernel<<<static_cast<unsigned>(images), kThreads, smem, stream>>>(p);
  TOKEN_PRUNE_LAUNCH_CHECK();
  return keep;
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CUDA, m) {
  m.impl("keep_mask", &token_prune::keep_mask_cuda);
}

#endif  // TOKEN_PRUNE_WITH_CUDA
