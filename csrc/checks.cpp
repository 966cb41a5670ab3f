// Input validation of glimpse_attention_map, vip_attention, keep_mask and
// scatter_rows, shared by their CPU and CUDA kernels. Only shapes, dtypes,
// layouts and devices are checked: reading values would synchronize with the
// device, so value preconditions (cu_seqlens monotone, positions in range,
// unique scatter targets) are documented instead and only the CPU kernels
// verify them.
#include "common.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

namespace token_prune {
namespace {

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_dense(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, op, name,
              " must be a dense (strided) tensor, got layout ", t.layout());
}

void check_device(const char* op, const at::Tensor& t, const at::Tensor& ref,
                  const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all inputs must be on the same device");
}

void check_cu_seqlens(const char* op, const at::Tensor& cu, const at::Tensor& ref,
                      const char* ref_name) {
  check_dense(op, cu, "cu_seqlens");
  check_device(op, cu, ref, "cu_seqlens", ref_name);
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, op,
              "cu_seqlens must be 1-D with at least one entry, got shape ", cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, "cu_seqlens must be int32, got ",
              cu.scalar_type());
}

}  // namespace

GlimpseShape check_glimpse_attention_map(const at::Tensor& q, const at::Tensor& cos,
                                         const at::Tensor& sin, const at::Tensor& keys,
                                         const at::Tensor& cu_seqlens,
                                         const at::Tensor& positions,
                                         const std::optional<at::Tensor>& key_mask) {
  constexpr const char* op = "token_prune::glimpse_attention_map: ";
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"},
                                {cos, "cos"}, {sin, "sin"}, {keys, "keys"},
                                {positions, "positions"}}) {
    check_dense(op, t, name);
    check_device(op, t, q, name, "q");
  }
  TORCH_CHECK(q.dim() == 3, op, "q must be [B, Hq, d], got shape ", q.sizes());
  TORCH_CHECK(is_float(q), op, "q must be a floating tensor, got ", q.scalar_type());
  GlimpseShape g;
  g.batch = q.size(0);
  g.heads = q.size(1);
  g.dim = q.size(2);
  TORCH_CHECK(keys.dim() == 4, op, "keys must be [B, Hkv, S, d], got shape ", keys.sizes());
  TORCH_CHECK(keys.scalar_type() == q.scalar_type(), op, "keys (", keys.scalar_type(),
              ") must have q's dtype (", q.scalar_type(), ")");
  TORCH_CHECK(keys.size(0) == g.batch && keys.size(3) == g.dim, op, "keys has shape ",
              keys.sizes(), " but q is ", q.sizes(), "; expected [", g.batch, ", Hkv, S, ",
              g.dim, "]");
  g.kv_heads = keys.size(1);
  g.seq = keys.size(2);
  TORCH_CHECK(g.kv_heads >= 1 && g.heads % g.kv_heads == 0, op, "the ", g.heads,
              " query heads must split evenly over the ", g.kv_heads, " key heads");
  TORCH_CHECK(g.dim % 2 == 0, op, "the head dim must be even for rotary, got ", g.dim);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == g.batch && t.size(1) == g.dim, op, name,
                " must be [B, d] = [", g.batch, ", ", g.dim, "], got shape ", t.sizes());
    TORCH_CHECK(is_float(t), op, name, " must be a floating tensor, got ", t.scalar_type());
  }
  check_cu_seqlens(op, cu_seqlens, q, "q");
  TORCH_CHECK(cu_seqlens.size(0) == g.batch + 1, op, "cu_seqlens must have B + 1 = ",
              g.batch + 1, " entries, got ", cu_seqlens.size(0));
  TORCH_CHECK(positions.dim() == 1, op, "positions must be 1-D [N_v], got shape ",
              positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, op,
              "positions must be int32 or int64, got ", positions.scalar_type());
  g.n_vis = positions.size(0);
  TORCH_CHECK(g.seq <= std::numeric_limits<int32_t>::max() &&
                  g.n_vis <= std::numeric_limits<int32_t>::max(),
              op, "sequence length and visual token count must fit in int32");
  if (key_mask.has_value()) {
    const at::Tensor& m = *key_mask;
    check_dense(op, m, "key_mask");
    check_device(op, m, q, "key_mask", "q");
    TORCH_CHECK(m.dim() == 2 && m.size(0) == g.batch && m.size(1) == g.seq, op,
                "key_mask must be [B, S] = [", g.batch, ", ", g.seq, "], got shape ",
                m.sizes());
    TORCH_CHECK(at::isIntegralType(m.scalar_type(), /*includeBool=*/true), op,
                "key_mask must be a bool or integer tensor, got ", m.scalar_type());
  }
  return g;
}

VipShape check_vip_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& positions, const at::Tensor& cu_seqlens,
                             int64_t max_seqlen) {
  constexpr const char* op = "token_prune::vip_attention: ";
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"},
                                {v, "v"}, {positions, "positions"}}) {
    check_dense(op, t, name);
    check_device(op, t, q, name, "q");
  }
  TORCH_CHECK(q.dim() == 3, op, "q must be [N, H, D], got shape ", q.sizes());
  TORCH_CHECK(is_float(q), op, "q must be a floating tensor, got ", q.scalar_type());
  VipShape s;
  s.tokens = q.size(0);
  s.heads = q.size(1);
  s.dim = q.size(2);
  TORCH_CHECK(k.sizes() == q.sizes(), op, "k must have q's shape ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == s.tokens && v.size(1) == s.heads, op,
              "v must be [N, H, Dv] = [", s.tokens, ", ", s.heads, ", Dv], got shape ",
              v.sizes());
  s.vdim = v.size(2);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              "q, k and v must share one dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(s.dim >= 4 && s.dim % 4 == 0, op,
              "the q/k head dim must be a positive multiple of 4 for 2D RoPE, got ", s.dim);
  TORCH_CHECK(s.vdim >= 1, op, "the v head dim must be positive");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == s.tokens && positions.size(1) == 2,
              op, "positions must be [N, 2] = [", s.tokens, ", 2] (row, col), got shape ",
              positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, op,
              "positions must be int32 or int64, got ", positions.scalar_type());
  check_cu_seqlens(op, cu_seqlens, q, "q");
  s.images = cu_seqlens.size(0) - 1;
  TORCH_CHECK(max_seqlen >= 0, op, "max_seqlen must be >= 0, got ", max_seqlen);
  TORCH_CHECK(s.tokens <= std::numeric_limits<int32_t>::max(), op,
              "the token count must fit in int32");
  return s;
}

void check_keep_mask(const at::Tensor& scores, const at::Tensor& cu_seqlens,
                     std::optional<double> max_keep_ratio, int64_t min_keep,
                     std::optional<double> keep_ratio) {
  constexpr const char* op = "token_prune::keep_mask: ";
  check_dense(op, scores, "scores");
  TORCH_CHECK(scores.dim() == 1, op, "scores must be 1-D [N], got shape ", scores.sizes());
  TORCH_CHECK(is_float(scores), op, "scores must be a floating tensor, got ",
              scores.scalar_type());
  TORCH_CHECK(scores.size(0) <= std::numeric_limits<int32_t>::max(), op,
              "the token count must fit in int32");
  check_cu_seqlens(op, cu_seqlens, scores, "scores");
  TORCH_CHECK(min_keep >= 0, op, "min_keep must be >= 0, got ", min_keep);
  if (max_keep_ratio.has_value()) {
    TORCH_CHECK(std::isfinite(*max_keep_ratio) && *max_keep_ratio >= 0.0, op,
                "max_keep_ratio must be a finite number >= 0, got ", *max_keep_ratio);
  }
  if (keep_ratio.has_value()) {
    TORCH_CHECK(std::isfinite(*keep_ratio) && *keep_ratio >= 0.0, op,
                "keep_ratio must be a finite number >= 0, got ", *keep_ratio);
  }
}

void check_scatter_rows(const char* op, const at::Tensor& full, const at::Tensor& packed,
                        const at::Tensor& index, const std::optional<at::Tensor>& residual) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{full, "full"},
                                {packed, "packed"}, {index, "index"}}) {
    check_dense(op, t, name);
    check_device(op, t, full, name, "full");
  }
  TORCH_CHECK(full.dim() == 3, op, "full must be [B, S, H], got shape ", full.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.size(0) == full.size(0) &&
                  packed.size(2) == full.size(2),
              op, "packed must be [B, S', H] = [", full.size(0), ", S', ", full.size(2),
              "], got shape ", packed.sizes());
  TORCH_CHECK(packed.scalar_type() == full.scalar_type(), op, "packed (",
              packed.scalar_type(), ") must have full's dtype (", full.scalar_type(), ")");
  TORCH_CHECK(index.dim() == 2 && index.size(0) == packed.size(0) &&
                  index.size(1) == packed.size(1),
              op, "index must be [B, S'] = [", packed.size(0), ", ", packed.size(1),
              "], got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, op,
              "index must be int32 or int64, got ", index.scalar_type());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_dense(op, r, "residual");
    check_device(op, r, full, "residual", "full");
    TORCH_CHECK(r.sizes() == packed.sizes(), op, "residual must have packed's shape ",
                packed.sizes(), ", got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == packed.scalar_type(), op, "residual (", r.scalar_type(),
                ") must have packed's dtype (", packed.scalar_type(), ")");
    TORCH_CHECK(is_float(r), op,
                "residual must be float32, float64, float16 or bfloat16, got ", r.scalar_type());
  }
}

}  // namespace token_prune
