// CPU kernel of token_prune::glimpse_attention_map, written with ATen ops
// only, so it runs on any device: the CUDA kernel uses it too for the inputs
// its fast path does not take (float64, head dims over 256).
#include "common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

namespace token_prune {

at::Tensor glimpse_attention_map_composite(const at::Tensor& q, const at::Tensor& cos,
                                           const at::Tensor& sin, const at::Tensor& keys,
                                           const at::Tensor& cu_seqlens,
                                           const at::Tensor& positions,
                                           const std::optional<at::Tensor>& key_mask,
                                           double scale, bool log_softmax) {
  const GlimpseShape g =
      check_glimpse_attention_map(q, cos, sin, keys, cu_seqlens, positions, key_mask);
  // On the CPU the values are at hand, so the precondition is checked; on a
  // GPU that would need a host sync, and rows outside every sample come out
  // NaN instead (as in the CUDA kernel).
  const bool checked = cu_seqlens.is_cpu();
  if (checked) {
    checked_cu_seqlens("token_prune::glimpse_attention_map: ", cu_seqlens, g.n_vis, true);
  }
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = q.options().dtype(acc);
  if (g.n_vis == 0 || g.heads == 0) {
    return at::empty({g.n_vis, g.heads}, opts);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (g.batch == 0) {
    return at::full({g.n_vis, g.heads}, nan, opts);
  }
  const int64_t half = g.dim / 2;
  const int64_t groups = g.heads / g.kv_heads;

  // Rotated query in the accumulation type, not rounded: [B, Hq, d].
  const at::Tensor qf = q.to(acc);
  const at::Tensor c = cos.to(acc).unsqueeze(1);
  const at::Tensor s = sin.to(acc).unsqueeze(1);
  const at::Tensor rot = at::cat({qf.narrow(-1, half, half).neg(), qf.narrow(-1, 0, half)}, -1);
  const at::Tensor q_rot = qf * c + rot * s;

  // Sample of each packed visual token: b with cu[b] <= i < cu[b + 1].
  const at::Tensor idx = at::arange(g.n_vis, cu_seqlens.options());
  // Clamped: a token past cu[B] would otherwise index sample B.
  const at::Tensor sample = at::searchsorted(cu_seqlens.narrow(0, 1, g.batch), idx,
                                             /*out_int32=*/false, /*right=*/true)
                                .clamp_max(g.batch - 1);
  const auto outside_as_nan = [&](const at::Tensor& out) {
    if (checked) {
      return out;
    }
    const at::Tensor outside = idx.lt(cu_seqlens.narrow(0, 0, 1)).logical_or(idx.ge(cu_seqlens.narrow(0, g.batch, 1)));
    return at::where(outside.unsqueeze(1), at::full({}, nan, out.options()), out).contiguous();
  };
  const at::Tensor pos = positions.to(at::kLong);
  using at::indexing::Slice;

  if (!log_softmax) {
    // Only the visual keys are read: [N_v, Hkv, d].
    const at::Tensor kv = keys.index({sample, Slice(), pos}).to(acc);
    const at::Tensor qv = q_rot.index_select(0, sample).view({g.n_vis, g.kv_heads, groups, g.dim});
    return outside_as_nan((at::matmul(qv, kv.unsqueeze(-1)).squeeze(-1) * scale)
                              .reshape({g.n_vis, g.heads})
                              .contiguous());
  }

  // Log-softmax over every real key of the sample.
  const at::Tensor logits =
      (at::matmul(q_rot.view({g.batch, g.kv_heads, groups, g.dim}), keys.to(acc).transpose(-1, -2)) *
       scale)
          .reshape({g.batch, g.heads, g.seq});
  const at::Tensor real = key_mask.has_value()
                              ? key_mask->to(at::kBool)
                              : at::ones({g.batch, g.seq}, q.options().dtype(at::kBool));
  const at::Tensor masked =
      logits.masked_fill(real.logical_not().unsqueeze(1), -std::numeric_limits<double>::infinity());
  const at::Tensor lse = at::logsumexp(masked, {-1});                       // [B, Hq]
  const at::Tensor vis = masked.index({sample, Slice(), pos});               // [N_v, Hq]
  // Keys the mask marks as padding are -inf (also in a sample without any
  // real key, where vis - lse would be -inf - -inf).
  const at::Tensor vis_real = real.index({sample, pos}).unsqueeze(1);       // [N_v, 1]
  return outside_as_nan(at::where(vis_real, vis - lse.index_select(0, sample),
                                  at::full({}, -std::numeric_limits<double>::infinity(), vis.options()))
                            .contiguous());
}

}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CPU, m) {
  m.impl("glimpse_attention_map", &token_prune::glimpse_attention_map_composite);
}
