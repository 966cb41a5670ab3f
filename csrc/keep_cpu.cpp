// CPU kernel of token_prune::keep_mask: GlimpsePrune's keep rule per image.
//
// Probabilities come from ATen's own sigmoid (on float32, like the Python
// rule), so every comparison and tie sees bit-identical values; the top-k is a
// stable sort on keys that order floats like torch.sort(descending=True,
// stable=True).
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace token_prune {

// How many of an image's n tokens the rule keeps by top-k, or -1 when it
// keeps exactly the tokens above the threshold. Shared with nothing on the
// device side on purpose: the CUDA kernel has its own copy of these lines.
static int64_t topk_count(int64_t n, int64_t above, std::optional<double> max_keep_ratio,
                          int64_t min_keep, std::optional<double> keep_ratio) {
  if (keep_ratio.has_value()) {
    const double want = std::ceil(*keep_ratio * static_cast<double>(n) - 1e-9);
    // Clamp before the cast: casting a double beyond int64's range is undefined.
    return want < static_cast<double>(n) ? static_cast<int64_t>(want) : n;
  }
  const int64_t floor = std::min<int64_t>(n, min_keep);
  if (max_keep_ratio.has_value()) {
    // A cap >= n never binds (above <= n); clamping first avoids an out-of-range cast.
    const double cap_d = *max_keep_ratio * static_cast<double>(n);
    const int64_t cap = cap_d < static_cast<double>(n) ? static_cast<int64_t>(cap_d) : n;
    if (above > cap) {
      return std::max(cap, floor);
    }
  }
  return above < floor ? floor : -1;
}

at::Tensor keep_mask_cpu(const at::Tensor& scores, const at::Tensor& cu_seqlens,
                         double threshold, std::optional<double> max_keep_ratio,
                         int64_t min_keep, std::optional<double> keep_ratio,
                         bool scores_are_logits) {
  check_keep_mask(scores, cu_seqlens, max_keep_ratio, min_keep, keep_ratio);
  const int64_t total = scores.size(0);
  const std::vector<int32_t> cu =
      checked_cu_seqlens("token_prune::keep_mask: ", cu_seqlens, total, false);
  at::Tensor probs = scores.to(at::kFloat);
  if (scores_are_logits) {
    probs = at::sigmoid(probs);
  }
  probs = probs.contiguous();
  at::Tensor keep = at::zeros({total}, scores.options().dtype(at::kBool));
  const float* p = probs.const_data_ptr<float>();
  bool* out = keep.mutable_data_ptr<bool>();
  // The Python rule compares a float32 tensor with a Python float, which
  // torch does in float32.
  const auto thr = static_cast<float>(threshold);
  const auto images = static_cast<int64_t>(cu.size()) - 1;
  at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order;
    std::vector<uint32_t> key;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t start = cu[i], n = cu[i + 1] - cu[i];
      if (n <= 0) {
        continue;
      }
      const float* pi = p + start;
      bool* oi = out + start;
      int64_t above = 0;
      for (int64_t j = 0; j < n; ++j) {
        above += pi[j] > thr;
      }
      const int64_t k = topk_count(n, above, max_keep_ratio, min_keep, keep_ratio);
      if (k < 0) {
        for (int64_t j = 0; j < n; ++j) {
          oi[j] = pi[j] > thr;
        }
        continue;
      }
      key.resize(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) {
        uint32_t bits;
        std::memcpy(&bits, pi + j, sizeof(bits));
        key[j] = descending_key_bits(bits);
      }
      order.resize(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return key[a] > key[b]; });
      for (int64_t j = 0; j < k; ++j) {
        oi[order[j]] = true;
      }
    }
  });
  return keep;
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CPU, m) {
  m.impl("keep_mask", &token_prune::keep_mask_cpu);
}
