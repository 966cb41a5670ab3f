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

}  // namespace token_prune
