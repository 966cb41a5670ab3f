// CUDA kernels of token_prune::glimpse_attention_map.
//
// The op reads one key row per (visual token, key head) and writes Hq floats
// per visual token: memory bound, ~1 KiB per visual token for Qwen2.5-VL-7B.
// Blocks own one (sample, key head, group of up to 8 query heads); the
// block's prologue rotates those query heads' glimpse query (float32, exactly
// the reference's q*cos + rotate_half(q)*sin) into shared memory, and each
// lane keeps the 8 elements it multiplies by for all 8 heads in registers.
// A row of d key elements is read by `lanes_per_row` lanes, 8 elements
// (16 bytes for half types) each, so one warp covers 32 / lanes_per_row rows
// per step; partial dot products are reduced with shuffles.
//
// Log-softmax mode (LLaVA) needs the log-sum-exp of each query head over all
// real keys of its sample: a first launch computes (max, sum of exp) per
// split of the key range online; the main launch combines the splits in its
// prologue. Logit mode is one launch.
//
// float64 inputs and head dims over 256 go to the ATen implementation
// (glimpse_cpu.cpp), which runs on any device.
//
// Rows of visual tokens that belong to no sample (cu_seqlens not running
// from 0 to N_v: a broken precondition that only the CPU kernel can afford to
// check) are written as NaN, so no output element is left uninitialised.
#include "common.h"

#if TOKEN_PRUNE_WITH_CUDA

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace token_prune {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxG = 8;        // query heads per block
constexpr int kMaxDim = 256;    // head dim limit of these kernels
constexpr int kLaneElems = 8;   // key elements per lane and row

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };

DType dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kDouble;
    default:
      return DType::kFloat;
  }
}

// A float of any of the four dtypes (small prologue reads only).
__device__ __forceinline__ float load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kHalf:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case DType::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case DType::kDouble:
      return static_cast<float>(static_cast<const double*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

struct Params {
  const void* q;  // [B, Hq, d]
  int64_t q_sb, q_sh, q_sd;
  DType q_type;
  const void* cos;  // [B, d]
  int64_t c_sb, c_sd;
  DType c_type;
  const void* sin;
  int64_t s_sb, s_sd;
  DType s_type;
  const void* keys;  // [B, Hkv, S, d]
  int64_t k_sb, k_sh, k_ss, k_sd;
  const int32_t* cu;       // [B + 1]
  const void* positions;   // [N_v]
  bool positions_64;
  const bool* key_mask;    // [B, S] contiguous, or null (all real)
  float2* partial;         // [B, Hq, splits] (max, sum of exp)
  int64_t splits;
  int64_t keys_per_split;
  float* out;              // [N_v, Hq]
  int64_t n_vis;
  int heads, kv_heads, groups, group_splits, dim, seq;
  int lanes_per_row;       // power of two <= 32
  float scale;
  bool log_softmax;
};

// Rotates this block's query heads into smem: qs[g * d + e].
__device__ __forceinline__ void rotate_queries(const Params& p, int b, int h0, int gc, float* qs) {
  const int d = p.dim, half = d / 2;
  for (int idx = threadIdx.x; idx < gc * d; idx += kThreads) {
    const int g = idx / d, e = idx - g * d;
    const int64_t qb = b * p.q_sb + static_cast<int64_t>(h0 + g) * p.q_sh;
    const float x = load_any(p.q, p.q_type, qb + e * p.q_sd);
    const float partner = e < half ? -load_any(p.q, p.q_type, qb + (e + half) * p.q_sd)
                                   : load_any(p.q, p.q_type, qb + (e - half) * p.q_sd);
    const float c = load_any(p.cos, p.c_type, b * p.c_sb + e * p.c_sd);
    const float s = load_any(p.sin, p.s_type, b * p.s_sb + e * p.s_sd);
    // q*cos + rotate_half(q)*sin, rounded like the reference's three ops.
    qs[idx] = __fadd_rn(__fmul_rn(x, c), __fmul_rn(partner, s));
  }
}

// Per-lane state: the rotated query elements this lane multiplies by.
template <int kVec>
struct LaneQuery {
  static constexpr int kChunks = kLaneElems / kVec;
  float v[kChunks][kVec][kMaxG];
};

template <int kVec>
__device__ __forceinline__ void load_lane_query(const Params& p, const float* qs, int gc, int sub,
                                                LaneQuery<kVec>& lq) {
  const int nc = p.dim / kVec;
#pragma unroll
  for (int i = 0; i < LaneQuery<kVec>::kChunks; ++i) {
    const int c = sub + p.lanes_per_row * i;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        lq.v[i][e][g] = (c < nc && g < gc) ? qs[g * p.dim + c * kVec + e] : 0.0f;
      }
    }
  }
}

// acc[g] += key_row . q_g over this lane's elements of the row.
template <typename T, int kVec>
__device__ __forceinline__ void lane_dots(const Params& p, const T* row, int sub,
                                          const LaneQuery<kVec>& lq, float (&acc)[kMaxG]) {
  const int nc = p.dim / kVec;
#pragma unroll
  for (int i = 0; i < LaneQuery<kVec>::kChunks; ++i) {
    const int c = sub + p.lanes_per_row * i;
    if (c < nc) {
      float x[kVec];
      if constexpr (kVec == 1) {
        x[0] = static_cast<float>(row[static_cast<int64_t>(c) * p.k_sd]);
      } else {
        constexpr int kLoads = kVec * static_cast<int>(sizeof(T)) / 16;
        static_assert(kLoads >= 1, "vector path needs 16-byte chunks");
        uint4 raw[kLoads];
        const uint4* src = reinterpret_cast<const uint4*>(row + c * kVec);
#pragma unroll
        for (int l = 0; l < kLoads; ++l) {
          raw[l] = src[l];
        }
        const T* vals = reinterpret_cast<const T*>(raw);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          x[e] = static_cast<float>(vals[e]);
        }
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) {
          acc[g] = fmaf(x[e], lq.v[i][e][g], acc[g]);
        }
      }
    }
  }
}

__device__ __forceinline__ void reduce_row(float (&acc)[kMaxG], int lanes_per_row) {
  for (int off = lanes_per_row >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
    }
  }
}

__device__ __forceinline__ float pick(const float (&acc)[kMaxG], int g) {
  float v = acc[0];
#pragma unroll
  for (int i = 1; i < kMaxG; ++i) {
    v = g == i ? acc[i] : v;
  }
  return v;
}

__device__ __forceinline__ int64_t position_at(const Params& p, int64_t i) {
  return p.positions_64 ? static_cast<const int64_t*>(p.positions)[i]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.positions)[i]);
}

// Launch 1 (log-softmax only): (max, sum exp) of each query head over the
// real keys of one split of the key range.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) glimpse_lse_kernel(const Params p) {
  __shared__ float qs[kMaxG * kMaxDim];
  __shared__ float2 part[kWarps][kMaxG];
  const int b = blockIdx.z;
  const int hk = blockIdx.y / p.group_splits;
  const int g0 = (blockIdx.y - hk * p.group_splits) * kMaxG;
  const int gc = min(kMaxG, p.groups - g0);
  const int h0 = hk * p.groups + g0;
  rotate_queries(p, b, h0, gc, qs);
  __syncthreads();

  const int lpr = p.lanes_per_row, rpw = 32 / lpr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane & (lpr - 1), row_in_warp = lane / lpr;
  LaneQuery<kVec> lq;
  load_lane_query<kVec>(p, qs, gc, sub, lq);

  const int64_t lo = blockIdx.x * p.keys_per_split;
  const int64_t hi = lo + p.keys_per_split < p.seq ? lo + p.keys_per_split : p.seq;
  const T* kbase = static_cast<const T*>(p.keys) + b * p.k_sb + hk * p.k_sh;
  float m[kMaxG], l[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  for (int64_t base = lo + static_cast<int64_t>(warp) * rpw; base < hi; base += kWarps * rpw) {
    const int64_t s = base + row_in_warp;
    const bool active =
        s < hi && (p.key_mask == nullptr || p.key_mask[static_cast<int64_t>(b) * p.seq + s]);
    float acc[kMaxG] = {};
    if (active) {
      lane_dots<T, kVec>(p, kbase + s * p.k_ss, sub, lq, acc);
    }
    reduce_row(acc, lpr);
    if (active) {
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        const float v = acc[g] * p.scale;
        if (v > m[g]) {
          l[g] = l[g] * expf(m[g] - v) + 1.0f;
          m[g] = v;
        } else {
          l[g] += expf(v - m[g]);
        }
      }
    }
  }
  // Merge the rows of a warp (lanes of one subgroup hold equal values), then
  // the warps of the block.
  for (int off = lpr; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      const float om = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float ol = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float nm = fmaxf(m[g], om);
      if (nm != -INFINITY) {
        l[g] = (m[g] == -INFINITY ? 0.0f : l[g] * expf(m[g] - nm)) +
               (om == -INFINITY ? 0.0f : ol * expf(om - nm));
        m[g] = nm;
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      part[warp][g] = make_float2(m[g], l[g]);
    }
  }
  __syncthreads();
  if (threadIdx.x < gc) {
    const int g = threadIdx.x;
    float mm = -INFINITY;
    for (int w = 0; w < kWarps; ++w) {
      mm = fmaxf(mm, part[w][g].x);
    }
    float ll = 0.0f;
    if (mm != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float2 pw = part[w][g];
        ll += pw.x == -INFINITY ? 0.0f : pw.y * expf(pw.x - mm);
      }
    }
    p.partial[(static_cast<int64_t>(b) * p.heads + h0 + g) * p.splits + blockIdx.x] =
        make_float2(mm, ll);
  }
}

// out[lo:hi, :] = NaN, strided over the x-blocks.
__device__ __forceinline__ void fill_nan_rows(float* out, int64_t lo, int64_t hi, int heads) {
  const float nan = __int_as_float(0x7fc00000);
  for (int64_t i = lo * heads + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < hi * heads;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    out[i] = nan;
  }
}

// Launch 2: the map itself.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) glimpse_map_kernel(const Params p) {
  __shared__ float qs[kMaxG * kMaxDim];
  __shared__ float lse[kMaxG];
  const int b = blockIdx.z;
  const int hk = blockIdx.y / p.group_splits;
  const int g0 = (blockIdx.y - hk * p.group_splits) * kMaxG;
  const int gc = min(kMaxG, p.groups - g0);
  const int h0 = hk * p.groups + g0;
  rotate_queries(p, b, h0, gc, qs);
  if (p.log_softmax && threadIdx.x < gc) {
    const float2* part = p.partial + (static_cast<int64_t>(b) * p.heads + h0 + threadIdx.x) * p.splits;
    float mm = -INFINITY;
    for (int64_t s = 0; s < p.splits; ++s) {
      mm = fmaxf(mm, part[s].x);
    }
    float ll = 0.0f;
    if (mm != -INFINITY) {
      for (int64_t s = 0; s < p.splits; ++s) {
        ll += part[s].x == -INFINITY ? 0.0f : part[s].y * expf(part[s].x - mm);
      }
    }
    lse[threadIdx.x] = mm == -INFINITY ? -INFINITY : mm + logf(ll);
  }
  __syncthreads();

  const int lpr = p.lanes_per_row, rpw = 32 / lpr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane & (lpr - 1), row_in_warp = lane / lpr;
  LaneQuery<kVec> lq;
  load_lane_query<kVec>(p, qs, gc, sub, lq);

  const int64_t start = p.cu[b];
  const int64_t n = p.cu[b + 1] - start;
  const T* kbase = static_cast<const T*>(p.keys) + b * p.k_sb + hk * p.k_sh;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps * rpw;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * rpw; base < n;
       base += step) {
    const int64_t t = base + row_in_warp;
    const bool active = t < n;
    int64_t pos = 0;
    float acc[kMaxG] = {};
    if (active) {
      pos = position_at(p, start + t);
      lane_dots<T, kVec>(p, kbase + pos * p.k_ss, sub, lq, acc);
    }
    reduce_row(acc, lpr);
    if (active) {
      const bool real = !p.log_softmax || p.key_mask == nullptr ||
                        p.key_mask[static_cast<int64_t>(b) * p.seq + pos];
      float* orow = p.out + (start + t) * p.heads + h0;
      for (int g = sub; g < gc; g += lpr) {
        float v = pick(acc, g) * p.scale;
        if (p.log_softmax) {
          v = real ? v - lse[g] : -INFINITY;
        }
        orow[g] = v;
      }
    }
  }

  // Rows outside every sample: [0, cu[0]) by sample 0's blocks, [cu[B], N_v)
  // by the last sample's, all heads, clamped to [0, N_v].
  if (blockIdx.y == 0) {
    const int64_t last = static_cast<int64_t>(gridDim.z);
    if (b == 0) {
      fill_nan_rows(p.out, 0, min(max(static_cast<int64_t>(p.cu[0]), int64_t{0}), p.n_vis), p.heads);
    }
    if (b == last - 1) {
      fill_nan_rows(p.out, min(max(static_cast<int64_t>(p.cu[last]), int64_t{0}), p.n_vis), p.n_vis, p.heads);
    }
  }
}

int next_pow2(int x) {
  int p = 1;
  while (p < x) {
    p <<= 1;
  }
  return p;
}

int64_t used_stride(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

template <typename T, int kVec>
void launch(Params p, int64_t blocks_x, int64_t batch, bool log_softmax, cudaStream_t stream) {
  const dim3 grid_map(static_cast<unsigned>(blocks_x),
                      static_cast<unsigned>(p.kv_heads * p.group_splits),
                      static_cast<unsigned>(batch));
  if (log_softmax) {
    const dim3 grid_lse(static_cast<unsigned>(p.splits), grid_map.y, grid_map.z);
    glimpse_lse_kernel<T, kVec><<<grid_lse, kThreads, 0, stream>>>(p);
    TOKEN_PRUNE_LAUNCH_CHECK();
  }
  glimpse_map_kernel<T, kVec><<<grid_map, kThreads, 0, stream>>>(p);
  TOKEN_PRUNE_LAUNCH_CHECK();
}

}  // namespace

at::Tensor glimpse_attention_map_cuda(const at::Tensor& q, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& keys,
                                      const at::Tensor& cu_seqlens, const at::Tensor& positions,
                                      const std::optional<at::Tensor>& key_mask, double scale,
                                      bool log_softmax) {
  const GlimpseShape g =
      check_glimpse_attention_map(q, cos, sin, keys, cu_seqlens, positions, key_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t groups = g.heads / g.kv_heads;
  const int64_t group_splits = (groups + kMaxG - 1) / kMaxG;
  // batch == 0: nothing for the kernels to do, and the grid sizing below
  // divides by the batch; the composite returns the empty map, or NaN rows
  // for visual tokens that then belong to no sample.
  if (q.scalar_type() == at::kDouble || g.dim > kMaxDim || g.batch == 0 || g.batch > 65535 ||
      g.kv_heads * group_splits > 65535) {
    return glimpse_attention_map_composite(q, cos, sin, keys, cu_seqlens, positions, key_mask,
                                           scale, log_softmax);
  }
  at::Tensor out = at::empty({g.n_vis, g.heads}, q.options().dtype(at::kFloat));
  if (g.n_vis == 0 || g.heads == 0) {
    return out;
  }
  const at::Tensor cu = cu_seqlens.contiguous();
  const at::Tensor pos = positions.contiguous();
  at::Tensor mask;
  if (log_softmax && key_mask.has_value()) {
    mask = key_mask->to(at::kBool).contiguous();
  }

  Params p{};
  p.q = q.const_data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_sd = q.stride(2);
  p.q_type = dtype_code(q.scalar_type());
  p.cos = cos.const_data_ptr();
  p.c_sb = cos.stride(0);
  p.c_sd = cos.stride(1);
  p.c_type = dtype_code(cos.scalar_type());
  p.sin = sin.const_data_ptr();
  p.s_sb = sin.stride(0);
  p.s_sd = sin.stride(1);
  p.s_type = dtype_code(sin.scalar_type());
  p.keys = keys.const_data_ptr();
  p.k_sb = keys.stride(0);
  p.k_sh = keys.stride(1);
  p.k_ss = keys.stride(2);
  p.k_sd = keys.stride(3);
  p.cu = cu.const_data_ptr<int32_t>();
  p.positions = pos.const_data_ptr();
  p.positions_64 = pos.scalar_type() == at::kLong;
  p.key_mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  p.out = out.mutable_data_ptr<float>();
  p.n_vis = g.n_vis;
  p.heads = static_cast<int>(g.heads);
  p.kv_heads = static_cast<int>(g.kv_heads);
  p.groups = static_cast<int>(groups);
  p.group_splits = static_cast<int>(group_splits);
  p.dim = static_cast<int>(g.dim);
  p.seq = static_cast<int>(g.seq);
  p.scale = static_cast<float>(scale);
  p.log_softmax = log_softmax;

  // 16-byte chunks of 8 elements when the rows allow it, else element-wise.
  const int64_t elem = keys.element_size();
  const bool vec8 =
      g.dim % 8 == 0 && p.k_sd == 1 &&
      widest_vector({static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.keys) % 16),
                     used_stride(keys, 0) * elem, used_stride(keys, 1) * elem,
                     used_stride(keys, 2) * elem, 8 * elem}) == 16;
  const int chunks = static_cast<int>(vec8 ? g.dim / 8 : g.dim);
  p.lanes_per_row = std::min(32, next_pow2(chunks));
  const int rows_per_block = kWarps * (32 / p.lanes_per_row);

  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t other_blocks = g.batch * g.kv_heads * group_splits;
  const int64_t avg_rows = (g.n_vis + g.batch - 1) / g.batch;
  const int64_t want = std::max<int64_t>(1, (4 * sms + other_blocks - 1) / other_blocks);
  const int64_t blocks_x =
      std::max<int64_t>(1, std::min<int64_t>(want, (avg_rows + rows_per_block - 1) / rows_per_block));

  at::Tensor partial;
  if (log_softmax) {
    const int64_t max_splits = std::max<int64_t>(1, (g.seq + 127) / 128);
    p.splits = std::max<int64_t>(1, std::min<int64_t>(max_splits, (2 * sms + other_blocks - 1) / other_blocks));
    p.keys_per_split = (g.seq + p.splits - 1) / p.splits;
    p.splits = std::max<int64_t>(1, (g.seq + p.keys_per_split - 1) / std::max<int64_t>(1, p.keys_per_split));
    partial = at::empty({g.batch, g.heads, p.splits, 2}, q.options().dtype(at::kFloat));
    p.partial = reinterpret_cast<float2*>(partial.mutable_data_ptr<float>());
  }

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "glimpse_attention_map_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (vec8) {
        launch<scalar_t, 8>(p, blocks_x, g.batch, log_softmax, stream);
      } else {
        launch<scalar_t, 1>(p, blocks_x, g.batch, log_softmax, stream);
      }
    }
  });
  return out;
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CUDA, m) {
  m.impl("glimpse_attention_map", &token_prune::glimpse_attention_map_cuda);
}

#endif  // TOKEN_PRUNE_WITH_CUDA
