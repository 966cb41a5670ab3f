// token_prune::causal_attention_received: how much causal softmax attention
// every key receives from the visual and from the text queries of its sample
// (the two factors of the ALVTS score), without an S x S matrix.
//
// The CUDA kernel runs two passes over 64-key blocks:
//   1. row statistics: for every (sample, query head, query) the running max m
//      and sum l of exp(s - m) over the keys it may see (online softmax);
//   2. column sums: recompute the logits block by block and add
//      w_j * exp(s_ji - m_j) / l_j into key i's two sums (w_j = 1 for real
//      visual queries in sum 0, for real text queries in sum 1).
// The CPU kernel adds the same terms in one pass over strips of query rows
// against all their keys (see attention_received_cpu.cpp). Both write per-head
// (and, on the CPU, per-row-chunk) sums to a buffer that is reduced in a fixed
// order afterwards, so the result does not depend on scheduling.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace token_prune {

struct ReceivedShape {
  int64_t batch = 0;
  int64_t heads = 0;     // query heads
  int64_t kv_heads = 0;  // key heads (heads % kv_heads == 0)
  int64_t seq = 0;
  int64_t dim = 0;       // width of a query/key row (head dim, or the rank)
};

// Validates shapes, dtypes and devices (never values, so no device sync);
// shared by the CPU and CUDA kernels so both accept exactly the same inputs.
ReceivedShape check_causal_attention_received(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& visual,
                                              const std::optional<at::Tensor>& valid,
                                              double scale);

}  // namespace token_prune
