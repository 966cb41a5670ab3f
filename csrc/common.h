// Shared between the CPU and CUDA implementations of token_prune's ops.
//
// The compaction op moves whole rows (a token's hidden vector, one head's key or
// value vector, one position id, one mask entry) without looking at the values,
// so every input is described here as a strided [B, heads, S, row_bytes] byte
// view. That keeps the kernels dtype-agnostic (no AT_DISPATCH, one instantiation
// for every dtype) and lets the CPU and CUDA backends share validation and the
// output allocation, so both accept exactly the same inputs.
#pragma once

// Per-operator headers instead of <ATen/ATen.h>: they cut compile time a lot
// on the small CI machines.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#ifndef TOKEN_PRUNE_WITH_CUDA
#define TOKEN_PRUNE_WITH_CUDA 0
#endif

#if TOKEN_PRUNE_WITH_CUDA && defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
// Launch errors are sticky and asynchronous: checking right after each launch
// ties a bad configuration to the launch that caused it instead of to some
// later, unrelated CUDA call.
#define TOKEN_PRUNE_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

namespace token_prune {

// (hidden, caches, position_ids, attention_mask), in the schema's order.
using CompactResult =
    std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>;

// One output tensor seen as bytes: out[b, h, j, :] = in[b, h, src(b, j), :],
// or zeros when slot j of sample b is padding. Strides are in bytes. Output
// rows of one (b, h) pair are packed, so the output needs no row stride.
struct RowGather {
  const char* in = nullptr;
  char* out = nullptr;
  int64_t heads = 1;
  int64_t row_bytes = 0;
  int64_t in_stride_b = 0;
  int64_t in_stride_h = 0;
  int64_t in_stride_s = 0;
  int64_t out_stride_b = 0;
  int64_t out_stride_h = 0;
  // Widest power of two (<= 16) dividing the row size, both base pointers and
  // every stride that is actually used, so rows can be moved in units of it.
  int64_t vec_bytes = 1;
};

struct CompactPlan {
  int64_t batch = 0;
  int64_t seq = 0;
  int64_t out_len = 0;
  at::Tensor keep;  // contiguous bool [B, S]
  CompactResult outputs;  // allocated, not yet written
  std::vector<RowGather> gathers;  // only those with work to do
  // Contiguous copies made for inputs whose rows were not contiguous; they
  // must outlive the copies that read them.
  std::vector<at::Tensor> keepalive;
};

// Validates the inputs (shapes, dtypes, devices; never the data, so it does
// not synchronize with a device), allocates the outputs uninitialized and
// describes every copy to perform.
CompactPlan plan_compact_tokens(const at::Tensor& keep, int64_t out_len,
                                const at::Tensor& hidden,
                                at::TensorList caches,
                                const at::Tensor& position_ids,
                                const at::Tensor& attention_mask);

CompactResult compact_tokens_cpu(const at::Tensor& keep, int64_t out_len,
                                 const at::Tensor& hidden,
                                 at::TensorList caches,
                                 const at::Tensor& position_ids,
                                 const at::Tensor& attention_mask);

// Widest power of two (<= 16) dividing every value: the widest vector (in
// bytes) rows with these sizes, strides and base addresses can be moved in.
int64_t widest_vector(std::initializer_list<int64_t> values);

// ---------------------------------------------------------------------------
// Input validation shared by the CPU and CUDA kernels of the other ops
// (csrc/checks.cpp): both backends accept and reject exactly the same
// inputs. None of them reads tensor data, so none synchronizes with a device.
// ---------------------------------------------------------------------------

struct GlimpseShape {
  int64_t batch = 0;
  int64_t heads = 0;     // query heads
  int64_t kv_heads = 0;  // key heads (heads % kv_heads == 0)
  int64_t seq = 0;       // keys per sample
  int64_t dim = 0;       // head dim
  int64_t n_vis = 0;     // packed visual tokens
};
GlimpseShape check_glimpse_attention_map(const at::Tensor& q, const at::Tensor& cos,
                                         const at::Tensor& sin, const at::Tensor& keys,
                                         const at::Tensor& cu_seqlens,
                                         const at::Tensor& positions,
                                         const std::optional<at::Tensor>& key_mask);

struct VipShape {
  int64_t tokens = 0;
  int64_t heads = 0;
  int64_t dim = 0;   // q/k head dim
  int64_t vdim = 0;  // v head dim
  int64_t images = 0;
};
VipShape check_vip_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& positions, const at::Tensor& cu_seqlens,
                             int64_t max_seqlen);

void check_keep_mask(const at::Tensor& scores, const at::Tensor& cu_seqlens,
                     std::optional<double> max_keep_ratio, int64_t min_keep,
                     std::optional<double> keep_ratio);

void check_scatter_rows(const char* op, const at::Tensor& full, const at::Tensor& packed,
                        const at::Tensor& index, const std::optional<at::Tensor>& residual);

// cu_seqlens copied to the host (CPU kernels only) and checked: entries in
// [0, tokens], non-decreasing, and with cover_all from 0 to tokens.
std::vector<int32_t> checked_cu_seqlens(const char* op, const at::Tensor& cu_seqlens,
                                        int64_t tokens, bool cover_all);

// Sort key of a probability for a descending, stable order that matches
// torch.sort(descending=True, stable=True): larger keys first, NaN above
// everything, -0.0 equal to +0.0.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint32_t descending_key_bits(uint32_t bits) {
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return 0xffffffffu;  // NaN
  }
  if ((bits & 0x7fffffffu) == 0u) {
    bits = 0u;  // -0.0 -> +0.0
  }
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The ATen-only glimpse attention map (any device, any float dtype): the CPU
// kernel, and the CUDA kernel's path for shapes its fast kernel does not
// cover (float64, head dims over 256 or odd).
at::Tensor glimpse_attention_map_composite(const at::Tensor& q, const at::Tensor& cos,
                                           const at::Tensor& sin, const at::Tensor& keys,
                                           const at::Tensor& cu_seqlens,
                                           const at::Tensor& positions,
                                           const std::optional<at::Tensor>& key_mask,
                                           double scale, bool log_softmax);

}  // namespace token_prune
