// Validation and output allocation for compact_tokens, shared by the CPU and
// CUDA kernels so that both accept and reject exactly the same inputs.
#include "common.h"

#include <c10/util/Exception.h>

#include <limits>
#include <string>

namespace token_prune {
namespace {

constexpr const char* kOp = "token_prune::compact_tokens: ";

// Strides of size-1 dimensions are never multiplied by a non-zero index, so
// they must not limit the copy width (a [B, 1, S, d] view of a bigger buffer
// may carry any stride there).
int64_t used_stride_bytes(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim) * t.element_size();
}

void finish(RowGather& g) {
  g.vec_bytes = widest_vector({
      g.row_bytes,
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(g.in) % 16),
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(g.out) % 16),
      g.in_stride_b, g.in_stride_h, g.in_stride_s,
      g.out_stride_b, g.out_stride_h,
  });
}

void check_same_device(const at::Tensor& t, const at::Tensor& keep,
                       const std::string& name) {
  TORCH_CHECK(t.device() == keep.device(), kOp, name, " is on ", t.device(),
              " but keep is on ", keep.device(),
              "; all inputs must be on the same device");
}

void check_strided(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(t.layout() == at::kStrided, kOp, name,
              " must be a dense (strided) tensor, got layout ", t.layout());
}

}  // namespace

int64_t widest_vector(std::initializer_list<int64_t> values) {
  int64_t width = 16;
  while (width > 1) {
    bool ok = true;
    for (int64_t v : values) {
      ok = ok && (v % width == 0);
    }
    if (ok) {
      break;
    }
    width /= 2;
  }
  return width;
}

CompactPlan plan_compact_tokens(const at::Tensor& keep, int64_t out_len,
                                const at::Tensor& hidden,
                                at::TensorList caches,
                                const at::Tensor& position_ids,
                                const at::Tensor& attention_mask) {
  check_strided(keep, "keep");
  TORCH_CHECK(keep.dim() == 2, kOp, "keep must be 2-D [B, S], got shape ",
              keep.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kBool, kOp,
              "keep must be a bool tensor, got ", keep.scalar_type());
  TORCH_CHECK(out_len >= 0, kOp, "out_len must be >= 0, got ", out_len);
  const int64_t B = keep.size(0);
  const int64_t S = keep.size(1);
  // Source positions are stored as int32 in the slot -> source index table.
  TORCH_CHECK(S <= std::numeric_limits<int32_t>::max(), kOp,
              "sequence length ", S, " does not fit in int32");
  TORCH_CHECK(out_len <= std::numeric_limits<int32_t>::max(), kOp,
              "out_len ", out_len, " does not fit in int32");

  check_strided(hidden, "hidden");
  check_same_device(hidden, keep, "hidden");
  TORCH_CHECK(hidden.dim() == 3, kOp, "hidden must be 3-D [B, S, D], got shape ",
              hidden.sizes());
  TORCH_CHECK(hidden.size(0) == B && hidden.size(1) == S, kOp,
              "hidden has shape ", hidden.sizes(), " but keep is [", B, ", ", S,
              "]; expected [", B, ", ", S, ", D]");

  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    const std::string name = "caches[" + std::to_string(i) + "]";
    check_strided(c, name);
    check_same_device(c, keep, name);
    TORCH_CHECK(c.dim() == 4, kOp, name,
                " must be 4-D [B, H, S, d] (sequence dim 2), got shape ",
                c.sizes());
    TORCH_CHECK(c.size(0) == B && c.size(2) == S, kOp, name, " has shape ",
                c.sizes(), " but keep is [", B, ", ", S, "]; expected [", B,
                ", H, ", S, ", d]");
  }

  check_strided(position_ids, "position_ids");
  check_same_device(position_ids, keep, "position_ids");
  TORCH_CHECK(position_ids.dim() == 3, kOp,
              "position_ids must be 3-D [P, B, S], got shape ",
              position_ids.sizes());
  TORCH_CHECK(position_ids.scalar_type() == at::kLong, kOp,
              "position_ids must be int64, got ", position_ids.scalar_type());
  TORCH_CHECK(position_ids.size(0) >= 1, kOp,
              "position_ids needs at least one row (P >= 1), got shape ",
              position_ids.sizes());
  TORCH_CHECK(position_ids.size(1) == B && position_ids.size(2) == S, kOp,
              "position_ids has shape ", position_ids.sizes(),
              " but keep is [", B, ", ", S, "]; expected [P, ", B, ", ", S,
              "]");

  check_strided(attention_mask, "attention_mask");
  check_same_device(attention_mask, keep, "attention_mask");
  TORCH_CHECK(attention_mask.dim() == 2, kOp,
              "attention_mask must be 2-D [B, S], got shape ",
              attention_mask.sizes());
  TORCH_CHECK(at::isIntegralType(attention_mask.scalar_type(),
                                 /*includeBool=*/true),
              kOp, "attention_mask must be an integer or bool tensor, got ",
              attention_mask.scalar_type());
  TORCH_CHECK(attention_mask.size(0) == B && attention_mask.size(1) == S, kOp,
              "attention_mask has shape ", attention_mask.sizes(),
              " but keep is [", B, ", ", S, "]");

  CompactPlan plan;
  plan.batch = B;
  plan.seq = S;
  plan.out_len = out_len;
  plan.keep = keep.contiguous();

  const int64_t L = out_len;

  // Rows must be contiguous to be moved as blocks of bytes. Model tensors
  // nearly always are; only the rare exception pays for a copy.
  at::Tensor hid = hidden.stride(2) == 1 ? hidden : hidden.contiguous();
  if (!hid.is_same(hidden)) {
    plan.keepalive.push_back(hid);
  }
  const int64_t D = hid.size(2);
  at::Tensor hidden_out = at::empty({B, L, D}, hid.options());
  {
    RowGather g;
    g.in = static_cast<const char*>(hid.data_ptr());
    g.out = static_cast<char*>(hidden_out.data_ptr());
    g.heads = 1;
    g.row_bytes = D * hid.element_size();
    g.in_stride_b = used_stride_bytes(hid, 0);
    g.in_stride_s = used_stride_bytes(hid, 1);
    g.out_stride_b = L * g.row_bytes;
    finish(g);
    plan.gathers.push_back(g);
  }

  std::vector<at::Tensor> caches_out;
  caches_out.reserve(caches.size());
  for (const at::Tensor& cache : caches) {
    at::Tensor c = cache.stride(3) == 1 ? cache : cache.contiguous();
    if (!c.is_same(cache)) {
      plan.keepalive.push_back(c);
    }
    const int64_t H = c.size(1);
    const int64_t d = c.size(3);
    at::Tensor out = at::empty({B, H, L, d}, c.options());
    RowGather g;
    g.in = static_cast<const char*>(c.data_ptr());
    g.out = static_cast<char*>(out.data_ptr());
    g.heads = H;
    g.row_bytes = d * c.element_size();
    g.in_stride_b = used_stride_bytes(c, 0);
    g.in_stride_h = used_stride_bytes(c, 1);
    g.in_stride_s = used_stride_bytes(c, 2);
    g.out_stride_h = L * g.row_bytes;
    g.out_stride_b = H * g.out_stride_h;
    finish(g);
    plan.gathers.push_back(g);
    caches_out.push_back(std::move(out));
  }

  // position_ids is [P, B, S]: the P rows play the role of heads, with the
  // batch in the middle, so the output's batch stride is smaller than its
  // "head" stride.
  const int64_t P = position_ids.size(0);
  at::Tensor pos_out = at::empty({P, B, L}, position_ids.options());
  {
    RowGather g;
    g.in = static_cast<const char*>(position_ids.data_ptr());
    g.out = static_cast<char*>(pos_out.data_ptr());
    g.heads = P;
    g.row_bytes = position_ids.element_size();
    g.in_stride_b = used_stride_bytes(position_ids, 1);
    g.in_stride_h = used_stride_bytes(position_ids, 0);
    g.in_stride_s = used_stride_bytes(position_ids, 2);
    g.out_stride_b = L * g.row_bytes;
    g.out_stride_h = B * L * g.row_bytes;
    finish(g);
    plan.gathers.push_back(g);
  }

  at::Tensor mask_out = at::empty({B, L}, attention_mask.options());
  {
    RowGather g;
    g.in = static_cast<const char*>(attention_mask.data_ptr());
    g.out = static_cast<char*>(mask_out.data_ptr());
    g.heads = 1;
    g.row_bytes = attention_mask.element_size();
    g.in_stride_b = used_stride_bytes(attention_mask, 0);
    g.in_stride_s = used_stride_bytes(attention_mask, 1);
    g.out_stride_b = L * g.row_bytes;
    finish(g);
    plan.gathers.push_back(g);
  }

  // Nothing to copy for empty outputs; dropping them here saves the kernels
  // from handling zero-sized work (and empty tensors may have null pointers).
  std::vector<RowGather> nonempty;
  for (const RowGather& g : plan.gathers) {
    if (B > 0 && L > 0 && g.heads > 0 && g.row_bytes > 0) {
      nonempty.push_back(g);
    }
  }
  plan.gathers = std::move(nonempty);

  plan.outputs = CompactResult(std::move(hidden_out), std::move(caches_out),
                               std::move(pos_out), std::move(mask_out));
  return plan;
}

}  // namespace token_prune
