// CUDA kernels of token_prune::vip_attention, the VIP's conditional
// self-attention: q/k head dim 192, v head dim 64, 2D RoPE computed in the
// kernel from each token's (row, col), bidirectional softmax attention within
// each image of a ragged batch (cu_seqlens), no N x N matrix in memory.
//
// Both kernels stride over their image's query tiles (tile x, x + gridDim.x,
// ...), so the grid only needs to be as long as the caller's max_seqlen says
// and a max_seqlen below the longest image costs time, not rows. Rows outside
// every image (cu_seqlens not running from 0 to N, a broken precondition the
// CUDA side cannot check without a host sync) are written as NaN, so no
// output element is ever left uninitialised.
//
// Tensor-core kernel (bf16 / fp16, D = 192, Dv = 64), FlashAttention-2 style:
//   * one CTA = 4 warps = 64 query rows of one (image, head); each warp owns
//     16 rows and keeps its rotated query tile in registers as mma.sync A
//     fragments (12 k-steps x 4 registers);
//   * keys/values stream through shared memory in tiles of 64 tokens, two
//     buffers deep: cp.async brings tile j+1 while tile j is multiplied; a
//     freshly landed K tile is rotated in place (RoPE: one sincos per element
//     pair, range-reduced __sincosf, rounded back to the input dtype like the
//     VIP module) before it is used;
//   * S = Q K^T and O += P V with mma.sync.m16n8k16 (fp32 accumulate), B
//     fragments through ldmatrix (.trans for V), online softmax in fp32 on
//     the S fragments (exp2 with the scale folded into log2(e)), P rounded
//     to the input dtype for the P V product;
//   * rows padded by 8 elements in shared memory so every ldmatrix phase hits
//     8 distinct 16-byte bank groups.
// Shared memory: 2 x (64 x 200 + 64 x 72) x 2 bytes = 68 KiB (the Q tile
// borrows K buffer 1 before the loop), so 3 CTAs fit an H100 SM.
//
// SIMT kernel (any float dtype, any head dims): 16 queries x 32 keys per
// step, everything in shared memory in float32 (float64 for float64), exact
// sincos; the fp32 path and the fallback for other VIP widths.
#include "common.h"

#if TOKEN_PRUNE_WITH_CUDA

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace token_prune {
namespace {

struct VipParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t q_sn, q_sh, k_sn, k_sh, v_sn, v_sh, o_sn, o_sh;  // elements
  const int32_t* pos;  // [N, 2] (row, col), contiguous
  const int32_t* cu;   // [images + 1]
  int64_t tokens;      // N
  int64_t images;
  float scale;
  float theta;
  int dim;
  int vdim;
};

// ---------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                        uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                              uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}

template <typename T>
struct TcType;

template <>
struct TcType<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 from_float2(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
  // d += a * b (m16n8k16, row.col, fp32 accumulate)
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct TcType<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ T2 from_float2(float a, float b) {
    return __floats2half2_rn(a, b);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  static_assert(sizeof(T2) == 4, "two 16-bit values");
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// sin/cos of a rotary angle on the special-function unit: reduced to
// [-pi, pi] first (two-term 2*pi), where __sincosf is accurate to ~1e-6.
__device__ __forceinline__ void fast_sincos(float a, float& s, float& c) {
  const float turns = rintf(a * 0.15915494309189535f);
  float r = fmaf(-turns, 6.28318548202514648f, a);
  r = fmaf(-turns, -1.7484555314695172e-07f, r);
  __sincosf(r, &s, &c);
}

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(__int_as_float(0x7fc00000));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half(__int_as_float(0x7fc00000));
  } else if constexpr (std::is_same_v<T, double>) {
    return __longlong_as_double(0x7ff8000000000000ll);
  } else {
    return static_cast<T>(__int_as_float(0x7fc00000));
  }
}

// NaN into this head's output rows that belong to no image: [0, cu[0]) by
// the first x-block of image 0, [cu[images], N) by that of the last image.
template <typename T, int kThreadCount>
__device__ __forceinline__ void fill_rows_outside_images(const VipParams& p, int img, int head) {
  if (blockIdx.x != 0) {
    return;
  }
  T* og = static_cast<T*>(p.out) + static_cast<int64_t>(head) * p.o_sh;
  const T nan = quiet_nan<T>();
  // Clamped to [0, N]: cu_seqlens may be anything here.
  const int64_t head_end = min(max(static_cast<int64_t>(p.cu[0]), int64_t{0}), p.tokens);
  const int64_t tail_start = min(max(static_cast<int64_t>(p.cu[p.images]), int64_t{0}), p.tokens);
  const int64_t ranges[2][2] = {{0, img == 0 ? head_end : 0},
                                {tail_start, img == p.images - 1 ? p.tokens : tail_start}};
  for (const auto& r : ranges) {
    const int64_t count = (r[1] - r[0]) * p.vdim;
    for (int64_t i = threadIdx.x; i < count; i += kThreadCount) {
      const int64_t row = r[0] + i / p.vdim;
      og[row * p.o_sn + i % p.vdim] = nan;
    }
  }
}

// ---------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------
namespace tc {
constexpr int kD = 192;
constexpr int kDv = 64;
constexpr int kBr = 64;  // query rows per CTA
constexpr int kBc = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKS = kD + 8;   // smem row stride (elements) of Q and K tiles
constexpr int kVS = kDv + 8;  // of V tiles
constexpr int kHalf = kD / 2;
constexpr int kQuarter = kD / 4;
constexpr int kPairs = kHalf / 2;  // 2-element chunks per rotary half
constexpr size_t kSmemBytes =
    static_cast<size_t>(2 * kBc * kKS + 2 * kBc * kVS) * 2 + kQuarter * sizeof(float);
static_assert(kBr == kBc, "the Q tile borrows a K buffer");
static_assert(kBr == kWarps * 16, "16 query rows per warp");
}  // namespace tc

// Rows [0, rows_valid) of a tile, `cols` wide, into shared memory by
// cp.async; rows beyond are zero-filled.
template <int kRows, int kCols, int kStride, typename T>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int rows_valid) {
  constexpr int kChunks = kCols / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += tc::kThreads) {
    const int r = idx / kChunks;
    const int ch = idx - r * kChunks;
    const bool ok = r < rows_valid;
    const T* src = g + static_cast<int64_t>(ok ? r : 0) * row_stride + ch * 8;
    cp_async_16(smem_u32(s + r * kStride + ch * 8), src, ok);
  }
}

// 2D RoPE in place on rows [0, rows_valid) of a Q or K tile. Element pair
// (e, e + 96) shares the angle; e < 48 uses the row, 48 <= e < 96 the column.
template <int kRows, typename T>
__device__ __forceinline__ void rope_tile(T* tile, int rows_valid, const int32_t* pos,
                                          const float* inv_freq) {
  using TT = TcType<T>;
  using T2 = typename TT::T2;
  for (int idx = threadIdx.x; idx < kRows * tc::kPairs; idx += tc::kThreads) {
    const int r = idx / tc::kPairs;
    const int c = idx - r * tc::kPairs;
    if (r < rows_valid) {
      // One 4-byte load: positions may be an int32 view that is only 4-byte
      // aligned (the host's .to(kInt).contiguous() does not copy it), so no int2.
      const bool by_row = c < tc::kPairs / 2;
      const float pv = static_cast<float>(pos[2 * r + (by_row ? 0 : 1)]);
      const int f = by_row ? 2 * c : 2 * c - tc::kQuarter;
      float s0, c0, s1, c1;
      fast_sincos(__fmul_rn(pv, inv_freq[f]), s0, c0);
      fast_sincos(__fmul_rn(pv, inv_freq[f + 1]), s1, c1);
      T2* lo = reinterpret_cast<T2*>(tile + r * tc::kKS + 2 * c);
      T2* hi = reinterpret_cast<T2*>(tile + r * tc::kKS + tc::kHalf + 2 * c);
      const float2 x1 = TT::to_float2(*lo);
      const float2 x2 = TT::to_float2(*hi);
      // x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1].
      *lo = TT::from_float2(__fadd_rn(__fmul_rn(x1.x, c0), __fmul_rn(-x2.x, s0)),
                            __fadd_rn(__fmul_rn(x1.y, c1), __fmul_rn(-x2.y, s1)));
      *hi = TT::from_float2(__fadd_rn(__fmul_rn(x2.x, c0), __fmul_rn(x1.x, s0)),
                            __fadd_rn(__fmul_rn(x2.y, c1), __fmul_rn(x1.y, s1)));
    }
  }
}

// Min 3 blocks: the query-tile loop lifts ptxas to 171 registers otherwise, which leaves 2
// CTAs per sm_90 SM instead of 3. At 168 it spills one word, read once per query tile
// (outside the key-tile loop).
template <typename T>
__global__ void __launch_bounds__(tc::kThreads, 3) vip_attention_tc_kernel(const VipParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // cp.async and bf16 mma.sync need sm_80; the host routes older GPUs to the
  // SIMT kernel, so this body only keeps builds for older archs compiling.
  __trap();
#else
  using namespace tc;
  using TT = TcType<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);                       // [2][kBc][kKS]
  T* sV = sK + 2 * kBc * kKS;                               // [2][kBc][kVS]
  float* sInv = reinterpret_cast<float*>(sV + 2 * kBc * kVS);  // [kQuarter]
  T* sQ = sK + kBc * kKS;                                   // = K buffer 1 until the loop

  const int img = blockIdx.z;
  const int head = blockIdx.y;
  fill_rows_outside_images<T, kThreads>(p, img, head);
  const int start = p.cu[img];
  const int len = p.cu[img + 1] - start;
  if (static_cast<int>(blockIdx.x) * kBr >= len) {
    return;
  }
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;

  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(start) * p.k_sn +
                static_cast<int64_t>(head) * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + static_cast<int64_t>(start) * p.v_sn +
                static_cast<int64_t>(head) * p.v_sh;
  const int32_t* pos = p.pos + 2 * static_cast<int64_t>(start);

  if (tid < kQuarter) {
    // 1 / theta^(arange(0, D/2, 2) / (D/2)), each step rounded like torch's.
    sInv[tid] = 1.0f / powf(p.theta, static_cast<float>(2 * tid) / static_cast<float>(kHalf));
  }
  for (int q0 = blockIdx.x * kBr; q0 < len; q0 += gridDim.x * kBr) {
    // Every warp must be done with the shared buffers of the previous query tile
    // (its last K/V tile) before they are refilled; the first pass also
    // publishes sInv.
    __syncthreads();
    const T* qg = static_cast<const T*>(p.q) + static_cast<int64_t>(start + q0) * p.q_sn +
                  static_cast<int64_t>(head) * p.q_sh;
    const int q_rows = min(kBr, len - q0);
    const int k_rows0 = min(kBc, len);
    load_tile<kBr, kD, kKS>(sQ, qg, p.q_sn, q_rows);
    load_tile<kBc, kD, kKS>(sK, kg, p.k_sn, k_rows0);
    load_tile<kBc, kDv, kVS>(sV, vg, p.v_sn, k_rows0);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    rope_tile<kBr>(sQ, q_rows, pos + 2 * q0, sInv);
    rope_tile<kBc>(sK, k_rows0, pos, sInv);
    __syncthreads();

    // Query fragments (A operand, row-major 16 x 16 per k-step).
    uint32_t qf[kD / 16][4];
  #pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3],
              smem_u32(sQ + (warp * 16 + (lane & 15)) * kKS + kk * 16 + (lane >> 4) * 8));
    }
    __syncthreads();  // sQ is K buffer 1 again from here on

    float o[kDv / 8][4];
  #pragma unroll
    for (int t = 0; t < kDv / 8; ++t) {
      o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
    }
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    const float scale_log2 = p.scale * 1.4426950408889634f;
    const int ntiles = (len + kBc - 1) / kBc;

    for (int j = 0; j < ntiles; ++j) {
      const int buf = j & 1;
      if (j + 1 < ntiles) {
        // Buffer buf^1 was last read in iteration j-1, before the barriers
        // that ended it.
        const int k0 = (j + 1) * kBc;
        const int rows = min(kBc, len - k0);
        load_tile<kBc, kD, kKS>(sK + (buf ^ 1) * kBc * kKS, kg + static_cast<int64_t>(k0) * p.k_sn,
                                p.k_sn, rows);
        load_tile<kBc, kDv, kVS>(sV + (buf ^ 1) * kBc * kVS, vg + static_cast<int64_t>(k0) * p.v_sn,
                                 p.v_sn, rows);
        cp_async_commit();
      }
      const T* K = sK + buf * kBc * kKS;
      const T* V = sV + buf * kBc * kVS;

      // S = Q K^T: 16 x 64 per warp, 8 n-tiles of 8 keys.
      float s[kBc / 8][4];
  #pragma unroll
      for (int t = 0; t < kBc / 8; ++t) {
        s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
      }
  #pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
  #pragma unroll
        for (int nb = 0; nb < kBc / 16; ++nb) {
          // Matrices: keys 0-7 x dims 0-7, keys 0-7 x dims 8-15, keys 8-15 x
          // dims 0-7, keys 8-15 x dims 8-15 -> (b0, b1) of n-tiles 2nb, 2nb+1.
          uint32_t b0, b1, b2, b3;
          ldsm_x4(b0, b1, b2, b3,
                  smem_u32(K + (nb * 16 + (lane & 7) + ((lane >> 4) << 3)) * kKS + kk * 16 +
                           ((lane >> 3) & 1) * 8));
          TT::mma(s[2 * nb], qf[kk], b0, b1);
          TT::mma(s[2 * nb + 1], qf[kk], b2, b3);
        }
      }

      // Online softmax on the fragments: this thread holds rows lane/4 and
      // lane/4 + 8, columns t*8 + 2*(lane%4) + {0, 1}.
      const int key0 = j * kBc + (lane & 3) * 2;
      float mx[2] = {row_max[0], row_max[1]};
  #pragma unroll
      for (int t = 0; t < kBc / 8; ++t) {
        const int col = key0 + t * 8;
        s[t][0] = col < len ? s[t][0] * scale_log2 : -INFINITY;
        s[t][1] = col + 1 < len ? s[t][1] * scale_log2 : -INFINITY;
        s[t][2] = col < len ? s[t][2] * scale_log2 : -INFINITY;
        s[t][3] = col + 1 < len ? s[t][3] * scale_log2 : -INFINITY;
        mx[0] = fmaxf(mx[0], fmaxf(s[t][0], s[t][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[t][2], s[t][3]));
      }
      float alpha[2];
  #pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        // Every tile has a real key, so mx is finite; exp2(-inf) = 0 at j = 0.
        alpha[r] = exp2f(row_max[r] - mx[r]);
        row_max[r] = mx[r];
      }
      float part[2] = {0.0f, 0.0f};
  #pragma unroll
      for (int t = 0; t < kBc / 8; ++t) {
        s[t][0] = exp2f(s[t][0] - row_max[0]);
        s[t][1] = exp2f(s[t][1] - row_max[0]);
        s[t][2] = exp2f(s[t][2] - row_max[1]);
        s[t][3] = exp2f(s[t][3] - row_max[1]);
        part[0] += s[t][0] + s[t][1];
        part[1] += s[t][2] + s[t][3];
      }
      row_sum[0] = row_sum[0] * alpha[0] + part[0];
      row_sum[1] = row_sum[1] * alpha[1] + part[1];
  #pragma unroll
      for (int t = 0; t < kDv / 8; ++t) {
        o[t][0] *= alpha[0];
        o[t][1] *= alpha[0];
        o[t][2] *= alpha[1];
        o[t][3] *= alpha[1];
      }

      // O += P V: P's A fragments are the S accumulators of n-tiles 2kb, 2kb+1.
  #pragma unroll
      for (int kb = 0; kb < kBc / 16; ++kb) {
        const uint32_t a[4] = {
            as_u32(TT::from_float2(s[2 * kb][0], s[2 * kb][1])),
            as_u32(TT::from_float2(s[2 * kb][2], s[2 * kb][3])),
            as_u32(TT::from_float2(s[2 * kb + 1][0], s[2 * kb + 1][1])),
            as_u32(TT::from_float2(s[2 * kb + 1][2], s[2 * kb + 1][3])),
        };
  #pragma unroll
        for (int dp = 0; dp < kDv / 16; ++dp) {
          // Matrices (transposed): keys 0-7 x dims 0-7, keys 8-15 x dims 0-7,
          // keys 0-7 x dims 8-15, keys 8-15 x dims 8-15.
          uint32_t b0, b1, b2, b3;
          ldsm_x4_trans(b0, b1, b2, b3,
                        smem_u32(V + (kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kVS + dp * 16 +
                                 (lane >> 4) * 8));
          TT::mma(o[2 * dp], a, b0, b1);
          TT::mma(o[2 * dp + 1], a, b2, b3);
        }
      }

      if (j + 1 < ntiles) {
        cp_async_wait_all();
        __syncthreads();  // tile j+1 landed; everyone is done with tile j
        const int k0 = (j + 1) * kBc;
        rope_tile<kBc>(sK + (buf ^ 1) * kBc * kKS, min(kBc, len - k0), pos + 2 * k0, sInv);
        __syncthreads();
      }
    }

    // Normalize and store: rows lane/4 and lane/4 + 8 of this warp's 16.
  #pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
      row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    }
    const float inv0 = 1.0f / row_sum[0];
    const float inv1 = 1.0f / row_sum[1];
    const int row0 = q0 + warp * 16 + (lane >> 2);
    const int row1 = row0 + 8;
    using T2 = typename TT::T2;
    T* og = static_cast<T*>(p.out) + static_cast<int64_t>(head) * p.o_sh;
  #pragma unroll
    for (int t = 0; t < kDv / 8; ++t) {
      const int col = t * 8 + (lane & 3) * 2;
      if (row0 < len) {
        *reinterpret_cast<T2*>(og + static_cast<int64_t>(start + row0) * p.o_sn + col) =
            TT::from_float2(o[t][0] * inv0, o[t][1] * inv0);
      }
      if (row1 < len) {
        *reinterpret_cast<T2*>(og + static_cast<int64_t>(start + row1) * p.o_sn + col) =
            TT::from_float2(o[t][2] * inv1, o[t][3] * inv1);
      }
    }
  }  // query tiles
#endif  // __CUDA_ARCH__ >= 800
}

// ---------------------------------------------------------------------------
// SIMT kernel
// ---------------------------------------------------------------------------
namespace simt {
constexpr int kBQ = 16;
constexpr int kBK = 32;
constexpr int kThreads = 128;
}  // namespace simt

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ void exact_sincos(float a, float* s, float* c) { sincosf(a, s, c); }
__device__ __forceinline__ void exact_sincos(double a, double* s, double* c) { sincos(a, s, c); }
__device__ __forceinline__ float pow_(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double pow_(double a, double b) { return pow(a, b); }
__device__ __forceinline__ float exp_(float a) { return expf(a); }
__device__ __forceinline__ double exp_(double a) { return exp(a); }

template <typename Acc>
size_t simt_smem_bytes(int dim, int vdim) {
  using namespace simt;
  const int ds = dim + 1;
  const size_t n = static_cast<size_t>(kBQ) * ds + static_cast<size_t>(kBK) * ds +
                   static_cast<size_t>(kBK) * vdim + kBQ * kBK + static_cast<size_t>(kBQ) * vdim +
                   dim / 4 + 3 * kBQ;
  return n * sizeof(Acc);
}

// Rows [0, rows_valid) of q or k, rotated and rounded to T, into dst (stride
// ds); rows up to rows_total beyond them are zero.
template <typename T, typename Acc>
__device__ __forceinline__ void load_rotated(Acc* dst, int ds, const T* g, int64_t row_stride,
                                             int rows_valid, int rows_total, const int32_t* pos,
                                             const Acc* inv_freq, int dim) {
  const int half = dim / 2, quarter = dim / 4;
  for (int idx = threadIdx.x; idx < rows_total * half; idx += simt::kThreads) {
    const int r = idx / half;
    const int e = idx - r * half;
    Acc* out = dst + r * ds;
    if (r >= rows_valid) {
      out[e] = Acc(0);
      out[e + half] = Acc(0);
      continue;
    }
    const T* row = g + static_cast<int64_t>(r) * row_stride;
    const Acc x1 = static_cast<Acc>(row[e]);
    const Acc x2 = static_cast<Acc>(row[e + half]);
    const bool by_row = e < quarter;
    const Acc pv = static_cast<Acc>(pos[2 * r + (by_row ? 0 : 1)]);
    Acc s, c;
    exact_sincos(mul_rn(pv, inv_freq[by_row ? e : e - quarter]), &s, &c);
    const Acc y1 = add_rn(mul_rn(x1, c), mul_rn(-x2, s));
    const Acc y2 = add_rn(mul_rn(x2, c), mul_rn(x1, s));
    out[e] = static_cast<Acc>(static_cast<T>(y1));
    out[e + half] = static_cast<Acc>(static_cast<T>(y2));
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(simt::kThreads) vip_attention_simt_kernel(const VipParams p) {
  using namespace simt;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);
  const int D = p.dim, Dv = p.vdim, DS = D + 1;
  Acc* sQ = smem;               // [kBQ][DS]
  Acc* sK = sQ + kBQ * DS;      // [kBK][DS]
  Acc* sV = sK + kBK * DS;      // [kBK][Dv]
  Acc* sP = sV + kBK * Dv;      // [kBQ][kBK]
  Acc* sO = sP + kBQ * kBK;     // [kBQ][Dv]
  Acc* sInv = sO + kBQ * Dv;    // [D/4]
  Acc* sM = sInv + D / 4;       // [kBQ]
  Acc* sL = sM + kBQ;           // [kBQ]
  Acc* sA = sL + kBQ;           // [kBQ]

  const int img = blockIdx.z, head = blockIdx.y;
  fill_rows_outside_images<T, kThreads>(p, img, head);
  const int start = p.cu[img];
  const int len = p.cu[img + 1] - start;
  if (static_cast<int>(blockIdx.x) * kBQ >= len) {
    return;
  }
  const int tid = threadIdx.x;
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(start) * p.k_sn +
                static_cast<int64_t>(head) * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + static_cast<int64_t>(start) * p.v_sn +
                static_cast<int64_t>(head) * p.v_sh;
  const int32_t* pos = p.pos + 2 * static_cast<int64_t>(start);

  for (int i = tid; i < D / 4; i += kThreads) {
    sInv[i] = Acc(1) / pow_(static_cast<Acc>(p.theta), static_cast<Acc>(2 * i) / static_cast<Acc>(D / 2));
  }
  for (int q0 = blockIdx.x * kBQ; q0 < len; q0 += gridDim.x * kBQ) {
    // The previous query tile's output loop is done with sO, sL before they are reset.
    __syncthreads();
    const T* qg = static_cast<const T*>(p.q) + static_cast<int64_t>(start + q0) * p.q_sn +
                  static_cast<int64_t>(head) * p.q_sh;
    for (int i = tid; i < kBQ * Dv; i += kThreads) {
      sO[i] = Acc(0);
    }
    if (tid < kBQ) {
      sM[tid] = -INFINITY;
      sL[tid] = Acc(0);
    }
    __syncthreads();
    load_rotated<T, Acc>(sQ, DS, qg, p.q_sn, min(kBQ, len - q0), kBQ, pos + 2 * q0, sInv, D);

    const Acc scale = static_cast<Acc>(p.scale);
    for (int k0 = 0; k0 < len; k0 += kBK) {
      __syncthreads();  // the previous step is done with sK, sV, sP
      const int rows = min(kBK, len - k0);
      load_rotated<T, Acc>(sK, DS, kg + static_cast<int64_t>(k0) * p.k_sn, p.k_sn, rows, kBK,
                           pos + 2 * k0, sInv, D);
      for (int idx = tid; idx < kBK * Dv; idx += kThreads) {
        const int r = idx / Dv, e = idx - r * Dv;
        sV[idx] = r < rows ? static_cast<Acc>(vg[static_cast<int64_t>(k0 + r) * p.v_sn + e]) : Acc(0);
      }
      __syncthreads();
      for (int idx = tid; idx < kBQ * kBK; idx += kThreads) {
        const int qi = idx / kBK, kj = idx - qi * kBK;
        Acc acc = 0;
        for (int e = 0; e < D; ++e) {
          acc += sQ[qi * DS + e] * sK[kj * DS + e];
        }
        sP[idx] = kj < rows ? acc * scale : -INFINITY;
      }
      __syncthreads();
      if (tid < kBQ) {
        Acc* prow = sP + tid * kBK;
        Acc mx = sM[tid];
        for (int kj = 0; kj < kBK; ++kj) {
          mx = prow[kj] > mx ? prow[kj] : mx;
        }
        const Acc alpha = exp_(sM[tid] - mx);  // 0 on the first step (sM = -inf)
        Acc sum = 0;
        for (int kj = 0; kj < kBK; ++kj) {
          const Acc w = exp_(prow[kj] - mx);
          prow[kj] = w;
          sum += w;
        }
        sL[tid] = sL[tid] * alpha + sum;
        sM[tid] = mx;
        sA[tid] = alpha;
      }
      __syncthreads();
      for (int idx = tid; idx < kBQ * Dv; idx += kThreads) {
        const int qi = idx / Dv, e = idx - qi * Dv;
        Acc acc = sO[idx] * sA[qi];
        for (int kj = 0; kj < kBK; ++kj) {
          acc += sP[qi * kBK + kj] * sV[kj * Dv + e];
        }
        sO[idx] = acc;
      }
    }
    __syncthreads();
    T* og = static_cast<T*>(p.out) + static_cast<int64_t>(head) * p.o_sh;
    for (int idx = tid; idx < kBQ * Dv; idx += kThreads) {
      const int qi = idx / Dv, e = idx - qi * Dv;
      if (q0 + qi < len) {
        og[static_cast<int64_t>(start + q0 + qi) * p.o_sn + e] = static_cast<T>(sO[idx] / sL[qi]);
      }
    }
  }  // query tiles
}

bool aligned16(const at::Tensor& t) {
  const int64_t elem = t.element_size();
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 &&
         (t.size(0) == 1 || (t.stride(0) * elem) % 16 == 0) &&
         (t.size(1) == 1 || (t.stride(1) * elem) % 16 == 0) && t.stride(2) == 1;
}

void set_smem(const void* kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

}  // namespace

at::Tensor vip_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                              const at::Tensor& positions, const at::Tensor& cu_seqlens,
                              int64_t max_seqlen, double scale, double theta) {
  const VipShape s = check_vip_attention(q_in, k_in, v_in, positions, cu_seqlens, max_seqlen);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty({s.tokens, s.heads, s.vdim}, v_in.options());
  if (s.tokens == 0 || s.heads == 0) {
    return out;
  }
  if (s.images == 0) {
    // No image owns any row (the CPU kernel rejects this; see fill_rows_outside_images).
    return out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  TORCH_CHECK(s.images <= 65535 && s.heads <= 65535,
              "token_prune::vip_attention: at most 65535 images and heads per call on CUDA");
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(2) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(2) == 1 ? v_in : v_in.contiguous();
  const at::Tensor pos = positions.to(at::kInt).contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();

  VipParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.q_sn = q.stride(0);
  p.q_sh = q.stride(1);
  p.k_sn = k.stride(0);
  p.k_sh = k.stride(1);
  p.v_sn = v.stride(0);
  p.v_sh = v.stride(1);
  p.o_sn = out.stride(0);
  p.o_sh = out.stride(1);
  p.pos = pos.const_data_ptr<int32_t>();
  p.cu = cu.const_data_ptr<int32_t>();
  p.tokens = s.tokens;
  p.images = s.images;
  p.scale = static_cast<float>(scale);
  p.theta = static_cast<float>(theta);
  p.dim = static_cast<int>(s.dim);
  p.vdim = static_cast<int>(s.vdim);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = q.scalar_type();
  const bool half_type = dtype == at::kHalf || dtype == at::kBFloat16;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  // The grid covers max_seqlen query rows per image; the kernels stride over
  // the rest of a longer image. No image is longer than the token count, so
  // clamping to it keeps an oversized max_seqlen from wrapping the unsigned
  // grid size, and at least one row of blocks always runs (max_seqlen = 0).
  const int64_t rows = std::clamp<int64_t>(max_seqlen, 1, s.tokens);
  if (half_type && prop->major >= 8 && s.dim == tc::kD && s.vdim == tc::kDv && aligned16(q) &&
      aligned16(k) && aligned16(v)) {
    const dim3 grid(static_cast<unsigned>((rows + tc::kBr - 1) / tc::kBr),
                    static_cast<unsigned>(s.heads), static_cast<unsigned>(s.images));
    if (dtype == at::kBFloat16) {
      set_smem(reinterpret_cast<const void*>(&vip_attention_tc_kernel<__nv_bfloat16>), tc::kSmemBytes);
      vip_attention_tc_kernel<__nv_bfloat16><<<grid, tc::kThreads, tc::kSmemBytes, stream>>>(p);
    } else {
      set_smem(reinterpret_cast<const void*>(&vip_attention_tc_kernel<__half>), tc::kSmemBytes);
      vip_attention_tc_kernel<__half><<<grid, tc::kThreads, tc::kSmemBytes, stream>>>(p);
    }
    TOKEN_PRUNE_LAUNCH_CHECK();
    return out;
  }

  const dim3 grid(static_cast<unsigned>((rows + simt::kBQ - 1) / simt::kBQ),
                  static_cast<unsigned>(s.heads), static_cast<unsigned>(s.images));
  const int64_t optin = prop->sharedMemPerBlockOptin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vip_attention_cuda", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t bytes = simt_smem_bytes<Acc>(p.dim, p.vdim);
    TORCH_CHECK(static_cast<int64_t>(bytes) <= optin, "token_prune::vip_attention: head dims ", s.dim,
                "/", s.vdim, " need ", bytes, " bytes of shared memory; this GPU allows ", optin);
    set_smem(reinterpret_cast<const void*>(&vip_attention_simt_kernel<scalar_t, Acc>), bytes);
    vip_attention_simt_kernel<scalar_t, Acc><<<grid, simt::kThreads, bytes, stream>>>(p);
  });
  TOKEN_PRUNE_LAUNCH_CHECK();
  return out;
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CUDA, m) {
  m.impl("vip_attention", &token_prune::vip_attention_cuda);
}

#endif  // TOKEN_PRUNE_WITH_CUDA
