// Input validation of token_prune::causal_attention_received, shared by its
// CPU and CUDA kernels (and the GPU-less emulation of the CUDA kernels in
// tests/emulation/, which is why it lives apart from any registration).
#include "attention_received.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace token_prune {
namespace {

constexpr const char* kOp = "token_prune::causal_attention_received: ";

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_mask(const at::Tensor& m, const at::Tensor& q, const char* name, int64_t batch,
                int64_t seq) {
  TORCH_CHECK(m.layout() == at::kStrided, kOp, name, " must be a dense tensor");
  TORCH_CHECK(m.device() == q.device(), kOp, name, " is on ", m.device(), " but q is on ",
              q.device());
  TORCH_CHECK(m.scalar_type() == at::kBool, kOp, name, " must be bool, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == batch && m.size(1) == seq, kOp, name,
              " must be [B, S] = [", batch, ", ", seq, "], got shape ", m.sizes());
}

}  // namespace

ReceivedShape check_causal_attention_received(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& visual,
                                              const std::optional<at::Tensor>& valid,
                                              double scale) {
  TORCH_CHECK(q.layout() == at::kStrided && k.layout() == at::kStrided, kOp,
              "q and k must be dense tensors");
  TORCH_CHECK(k.device() == q.device(), kOp, "k is on ", k.device(), " but q is on ",
              q.device());
  TORCH_CHECK(q.dim() == 4, kOp, "q must be [B, Hq, S, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, kOp, "k must be [B, Hk, S, D], got shape ", k.sizes());
  TORCH_CHECK(is_float(q), kOp, "q must be float32, float64, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), kOp, "k (", k.scalar_type(),
              ") must have q's dtype (", q.scalar_type(), ")");
  ReceivedShape s;
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.seq = q.size(2);
  s.dim = q.size(3);
  s.kv_heads = k.size(1);
  TORCH_CHECK(k.size(0) == s.batch && k.size(2) == s.seq && k.size(3) == s.dim, kOp,
              "k has shape ", k.sizes(), " but q is ", q.sizes(), "; expected [", s.batch,
              ", Hk, ", s.seq, ", ", s.dim, "]");
  TORCH_CHECK(s.heads >= 1 && s.kv_heads >= 1 && s.heads % s.kv_heads == 0, kOp, "the ",
              s.heads, " query heads must split evenly over the ", s.kv_heads,
              " key heads (at least one of each)");
  TORCH_CHECK(s.dim >= 1, kOp, "q and k rows must not be empty");
  TORCH_CHECK(s.seq < std::numeric_limits<int32_t>::max(), kOp,
              "the sequence length must fit in int32");
  TORCH_CHECK(std::isfinite(scale), kOp, "scale must be finite, got ", scale);
  check_mask(visual, q, "visual", s.batch, s.seq);
  if (valid.has_value()) {
    check_mask(*valid, q, "valid", s.batch, s.seq);
  }
  return s;
}

}  // namespace token_prune
