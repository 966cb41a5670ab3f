// Device code of token_prune::causal_attention_received (CUDA backend).
//
// Kept apart from the launcher so that tests/emulation/ can compile these very
// kernels as host code (threads as std::threads, __syncthreads as a barrier)
// and check them against the reference on a machine without a GPU. Only the
// primitives that emulation provides may be used here: __syncthreads,
// __syncthreads_or, __shfl_xor_sync, threadIdx/blockIdx/gridDim, __shared__.
//
// Tiling: a CTA of 256 threads owns a 64 x 64 tile of logits, each thread a
// 4 x 4 sub-tile (rows ty + 16 i, columns tx + 16 j for ty, tx in 0..15). Row
// elements are staged through shared memory 32 at a time, transposed, so the
// inner product reads broadcast rows of q and conflict-free rows of k. Logits,
// softmax statistics and sums accumulate in Acc (float, or double for double
// inputs). SIMT arithmetic: with the low-rank selector the rows are short and
// the kernel is bound by the exp and the masking as much as by the products.
//
// Pass 1 (row statistics): CTA = (query block, head, sample), walking the key
// blocks up to the diagonal with an online max / sum. Pass 2 (column sums):
// CTA = (key block, head, sample), walking the query blocks from the diagonal
// on, accumulating w_j exp(s_ji - m_j) / l_j per column in registers; the 16
// partial column sums per column are added in shared memory at the end.
// Blocks with no real key (pass 1) or no real query (pass 2) are skipped, so
// left padding costs almost nothing.
#pragma once

#include "attention_received.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace token_prune {
namespace received {

constexpr int kTile = 64;     // queries and keys per tile
constexpr int kThreads = 256;
constexpr int kSide = 16;     // threads per tile side
constexpr int kPer = kTile / kSide;  // rows (and columns) per thread
constexpr int kChunk = 32;    // row elements staged per step

template <typename T, typename Acc>
struct Params {
  const T* q;  // [B, Hq, S, D], element strides
  int64_t q_sb, q_sh, q_ss, q_sd;
  const T* k;  // [B, Hk, S, D]
  int64_t k_sb, k_sh, k_ss, k_sd;
  const bool* visual;  // [B, S]
  int64_t vis_sb, vis_ss;
  const bool* valid;   // [B, S], or null: every token is real
  int64_t val_sb, val_ss;
  Acc* row_m;      // [B, Hq, S]: row max; +inf for rows without weight
  Acc* row_inv_l;  // [B, Hq, S]: 1 / sum of exp(s - m); 0 for rows without weight
  Acc* partial;    // [B, Hq, 2, S]: per-head column sums
  int heads, group, seq, dim;
  Acc scale;
};

__host__ __device__ inline float acc_exp(float x) { return expf(x); }
__host__ __device__ inline double acc_exp(double x) { return exp(x); }

template <typename Acc>
__device__ __forceinline__ Acc acc_inf() {
  return static_cast<Acc>(INFINITY);
}

template <typename Acc>
__device__ __forceinline__ Acc acc_max(Acc a, Acc b) {
  return a > b ? a : b;
}

// Half and bfloat16 convert through float; double stays double.
template <typename Acc, typename T>
__device__ __forceinline__ Acc load_acc(T x) {
  return static_cast<Acc>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double load_acc<double, double>(double x) {
  return x;
}

template <typename T, typename Acc>
__device__ __forceinline__ bool is_real(const Params<T, Acc>& p, int b, int64_t i) {
  if (i >= p.seq) {
    return false;
  }
  return p.valid == nullptr || p.valid[b * p.val_sb + i * p.val_ss];
}

// Reduction over the 16 threads that share a tile row (lanes 0-15 or 16-31 of
// one warp, since tid = 16 ty + tx).
template <typename Acc>
__device__ __forceinline__ Acc row_max16(Acc v) {
#pragma unroll
  for (int m = kSide / 2; m >= 1; m /= 2) {
    v = acc_max(v, __shfl_xor_sync(0xffffffffu, v, m));
  }
  return v;
}

template <typename Acc>
__device__ __forceinline__ Acc row_sum16(Acc v) {
#pragma unroll
  for (int m = kSide / 2; m >= 1; m /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, m);
  }
  return v;
}

// acc[i][j] = q[q0 + ty + 16 i] . k[k0 + tx + 16 j] (unscaled; rows past the
// end read as zeros). Begins with a barrier, so the caller may overwrite any
// shared memory it read before the call only after the call.
template <typename T, typename Acc>
__device__ __forceinline__ void tile_products(const Params<T, Acc>& p, const T* qh, const T* kh,
                                              int q0, int k0, Acc (*qs)[kTile + 1],
                                              Acc (*ks)[kTile + 1], Acc (&acc)[kPer][kPer]) {
  const int tid = threadIdx.x, ty = tid / kSide, tx = tid % kSide;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      acc[i][j] = Acc(0);
    }
  }
  for (int d0 = 0; d0 < p.dim; d0 += kChunk) {
    __syncthreads();  // everyone is done reading the previous stage
    for (int idx = tid; idx < kTile * kChunk; idx += kThreads) {
      const int r = idx / kChunk, e = idx % kChunk, d = d0 + e;
      const int64_t qrow = q0 + r, krow = k0 + r;
      qs[e][r] = (qrow < p.seq && d < p.dim)
                     ? load_acc<Acc>(qh[qrow * p.q_ss + d * p.q_sd])
                     : Acc(0);
      ks[e][r] = (krow < p.seq && d < p.dim)
                     ? load_acc<Acc>(kh[krow * p.k_ss + d * p.k_sd])
                     : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int e = 0; e < kChunk; ++e) {
      Acc a[kPer], c[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        a[i] = qs[e][ty + kSide * i];
        c[i] = ks[e][tx + kSide * i];
      }
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          acc[i][j] += a[i] * c[j];
        }
      }
    }
  }
}

// Pass 1. grid (query blocks, Hq, B); the last query blocks (the most key
// blocks to visit) are scheduled first.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    received_row_stats_kernel(const Params<T, Acc> p) {
  __shared__ Acc qs[kChunk][kTile + 1];
  __shared__ Acc ks[kChunk][kTile + 1];
  __shared__ bool key_ok[kTile];
  const int tid = threadIdx.x, ty = tid / kSide, tx = tid % kSide;
  const int qb = static_cast<int>(gridDim.x - 1 - blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const int q0 = qb * kTile;
  const T* qh = p.q + b * p.q_sb + h * p.q_sh;
  const T* kh = p.k + b * p.k_sb + (h / p.group) * p.k_sh;
  const Acc inf = acc_inf<Acc>();

  Acc m[kPer], l[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    m[i] = -inf;
    l[i] = Acc(0);
  }
  const bool any_row = __syncthreads_or(tid < kTile && is_real(p, b, q0 + tid));
  if (any_row) {
    for (int k0 = 0; k0 <= q0; k0 += kTile) {
      __syncthreads();  // key_ok of the previous block has been read
      bool ok = false;
      if (tid < kTile) {
        ok = is_real(p, b, k0 + tid);
        key_ok[tid] = ok;
      }
      if (!__syncthreads_or(ok)) {
        continue;  // a block of padding keys
      }
      Acc acc[kPer][kPer];
      tile_products(p, qh, kh, q0, k0, qs, ks, acc);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int row = q0 + ty + kSide * i;
        Acc s[kPer];
        Acc tmax = -inf;
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int col = tx + kSide * j;
          s[j] = (key_ok[col] && k0 + col <= row) ? acc[i][j] * p.scale : -inf;
          tmax = acc_max(tmax, s[j]);
        }
        const Acc m_new = acc_max(m[i], row_max16(tmax));
        // A row that has seen no real key yet keeps m = -inf; shifting by 0
        // then keeps exp(-inf - -inf) from making a NaN.
        const Acc shift = m_new == -inf ? Acc(0) : m_new;
        Acc sum = Acc(0);
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          sum += acc_exp(s[j] - shift);
        }
        l[i] = l[i] * acc_exp(m[i] - shift) + row_sum16(sum);
        m[i] = m_new;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int row = q0 + ty + kSide * i;
      if (row < p.seq) {
        const int64_t o = (static_cast<int64_t>(b) * p.heads + h) * p.seq + row;
        const bool real = is_real(p, b, row);
        p.row_m[o] = real ? m[i] : inf;
        p.row_inv_l[o] = real ? Acc(1) / l[i] : Acc(0);
      }
    }
  }
}

// Pass 2. grid (key blocks, Hq, B); key block 0 (the most query blocks to
// visit) first.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    received_column_sums_kernel(const Params<T, Acc> p) {
  __shared__ Acc qs[kChunk][kTile + 1];
  __shared__ Acc ks[kChunk][kTile + 1];
  __shared__ bool key_ok[kTile];
  __shared__ Acc row_m[kTile];
  __shared__ Acc w_vis[kTile];
  __shared__ Acc w_txt[kTile];
  const int tid = threadIdx.x, ty = tid / kSide, tx = tid % kSide;
  const int kb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int k0 = kb * kTile;
  const T* qh = p.q + b * p.q_sb + h * p.q_sh;
  const T* kh = p.k + b * p.k_sb + (h / p.group) * p.k_sh;
  const int64_t stats = (static_cast<int64_t>(b) * p.heads + h) * p.seq;

  bool ok = false;
  if (tid < kTile) {
    ok = is_real(p, b, k0 + tid);
    key_ok[tid] = ok;
  }
  Acc sum_vis[kPer], sum_txt[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    sum_vis[j] = Acc(0);
    sum_txt[j] = Acc(0);
  }
  if (__syncthreads_or(ok)) {
    for (int q0 = k0; q0 < p.seq; q0 += kTile) {
      __syncthreads();  // the previous block's row data has been read
      bool live = false;
      if (tid < kTile) {
        const int64_t row = q0 + tid;
        Acc mr = acc_inf<Acc>(), wv = Acc(0), wt = Acc(0);
        if (row < p.seq) {
          const Acc inv_l = p.row_inv_l[stats + row];
          const bool vis = p.visual[b * p.vis_sb + row * p.vis_ss];
          mr = p.row_m[stats + row];
          wv = vis ? inv_l : Acc(0);
          wt = vis ? Acc(0) : inv_l;
          live = inv_l != Acc(0);
        }
        row_m[tid] = mr;
        w_vis[tid] = wv;
        w_txt[tid] = wt;
      }
      if (!__syncthreads_or(live)) {
        continue;  // a block of padding queries
      }
      Acc acc[kPer][kPer];
      tile_products(p, qh, kh, q0, k0, qs, ks, acc);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int r = ty + kSide * i;
        const Acc wv = w_vis[r], wt = w_txt[r], mr = row_m[r];
        if (wv == Acc(0) && wt == Acc(0)) {
          continue;
        }
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int col = tx + kSide * j;
          if (key_ok[col] && k0 + col <= q0 + r) {
            const Acc e = acc_exp(acc[i][j] * p.scale - mr);
            sum_vis[j] += e * wv;
            sum_txt[j] += e * wt;
          }
        }
      }
    }
  }
  // Add the 16 partial sums of each column (one per ty), reusing qs / ks.
  __syncthreads();
  Acc* red_vis = &qs[0][0];  // [kSide][kTile]
  Acc* red_txt = &ks[0][0];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    red_vis[ty * kTile + tx + kSide * j] = sum_vis[j];
    red_txt[ty * kTile + tx + kSide * j] = sum_txt[j];
  }
  __syncthreads();
  if (tid < 2 * kTile) {
    const int col = tid % kTile, group = tid / kTile;
    const Acc* red = group == 0 ? red_vis : red_txt;
    Acc total = Acc(0);
    for (int y = 0; y < kSide; ++y) {
      total += red[y * kTile + col];
    }
    if (k0 + col < p.seq) {
      p.partial[(stats * 2) + static_cast<int64_t>(group) * p.seq + k0 + col] = total;
    }
  }
}

// Host side: validation, buffers, the two launches and the reduction over
// heads, for a launcher `launch(kernel, grid, params)` (a CUDA launch on the
// current stream, or the emulator's).
struct Grid {
  unsigned x, y, z;
};

template <typename T, typename Acc, typename Launch>
at::Tensor run_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& visual,
                     const std::optional<at::Tensor>& valid, double scale,
                     const ReceivedShape& s, Launch&& launch) {
  const auto opts = q.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  at::Tensor row_m = at::empty({s.batch, s.heads, s.seq}, opts);
  at::Tensor row_inv_l = at::empty({s.batch, s.heads, s.seq}, opts);
  at::Tensor partial = at::empty({s.batch, s.heads, 2, s.seq}, opts);
  Params<T, Acc> p{};
  p.q = static_cast<const T*>(q.const_data_ptr());
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_ss = q.stride(2);
  p.q_sd = q.stride(3);
  p.k = static_cast<const T*>(k.const_data_ptr());
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_ss = k.stride(2);
  p.k_sd = k.stride(3);
  p.visual = visual.const_data_ptr<bool>();
  p.vis_sb = visual.stride(0);
  p.vis_ss = visual.stride(1);
  if (valid.has_value()) {
    p.valid = valid->const_data_ptr<bool>();
    p.val_sb = valid->stride(0);
    p.val_ss = valid->stride(1);
  }
  p.row_m = row_m.data_ptr<Acc>();
  p.row_inv_l = row_inv_l.data_ptr<Acc>();
  p.partial = partial.data_ptr<Acc>();
  p.heads = static_cast<int>(s.heads);
  p.group = static_cast<int>(s.heads / s.kv_heads);
  p.seq = static_cast<int>(s.seq);
  p.dim = static_cast<int>(s.dim);
  p.scale = static_cast<Acc>(scale);
  const Grid grid{static_cast<unsigned>((s.seq + kTile - 1) / kTile),
                  static_cast<unsigned>(s.heads), static_cast<unsigned>(s.batch)};
  launch(received_row_stats_kernel<T, Acc>, grid, p);
  launch(received_column_sums_kernel<T, Acc>, grid, p);
  return s.heads == 1 ? partial.select(1, 0) : partial.sum(1).div_(static_cast<double>(s.heads));
}

template <typename Launch>
at::Tensor run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& visual,
               const std::optional<at::Tensor>& valid, double scale, Launch&& launch) {
  const ReceivedShape s = check_causal_attention_received(q, k, visual, valid, scale);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (s.batch == 0 || s.seq == 0) {
    return at::zeros({s.batch, 2, s.seq}, q.options().dtype(acc));
  }
  // Grid y and z are limited to 65535.
  TORCH_CHECK(s.heads <= 65535 && s.batch <= 65535,
              "token_prune::causal_attention_received: at most 65535 heads and samples, got ",
              s.heads, " and ", s.batch);
  switch (q.scalar_type()) {
    case at::kDouble:
      return run_typed<double, double>(q, k, visual, valid, scale, s, launch);
    case at::kHalf:
      return run_typed<c10::Half, float>(q, k, visual, valid, scale, s, launch);
    case at::kBFloat16:
      return run_typed<c10::BFloat16, float>(q, k, visual, valid, scale, s, launch);
    default:
      return run_typed<float, float>(q, k, visual, valid, scale, s, launch);
  }
}

}  // namespace received
}  // namespace token_prune
