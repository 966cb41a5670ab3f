// Operator schemas of the token_prune library and the Python module that
// loads them.
//
// The schemas live here, apart from any kernel, so a CPU-only build and a CUDA
// build declare exactly the same operators; backends only add kernels. Keep
// token_prune/_ops.py (the pure-Python fallback and the fake kernels) in sync
// with these strings.
#include <Python.h>

#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(token_prune, m) {
  // Moves the kept tokens of each sample to the right end of out_len slots
  // (left padding, order preserved) in the hidden states, every KV cache
  // tensor, the position ids and the attention mask; padding slots are zero.
  m.def(
      "compact_tokens(Tensor keep, SymInt out_len, Tensor hidden, "
      "Tensor[] caches, Tensor position_ids, Tensor attention_mask) "
      "-> (Tensor, Tensor[], Tensor, Tensor)");
  // GlimpsePrune's glimpse attention map: the glimpse query of each sample
  // (before rotary; rotated here by cos/sin [B, d]) against the rotated keys
  // [B, Hkv, S, d] of the sample's visual tokens (GQA heads shared), scaled;
  // optionally log-softmax over all real keys (key_mask) of the sample.
  // Visual tokens come varlen style: sample b owns positions[cu[b]:cu[b+1]].
  // -> float32 [N_v, Hq] (float64 for float64 q).
  m.def(
      "glimpse_attention_map(Tensor q, Tensor cos, Tensor sin, Tensor keys, "
      "Tensor cu_seqlens, Tensor positions, Tensor? key_mask, float scale, "
      "bool log_softmax) -> Tensor");
  // The VIP's conditional self-attention: q, k [N, H, D] before rotary, v
  // [N, H, Dv]; 2D RoPE from the (row, col) int positions [N, 2]; softmax
  // attention within each image (cu_seqlens [n_images + 1], bidirectional).
  // -> [N, H, Dv] in q's dtype.
  m.def(
      "vip_attention(Tensor q, Tensor k, Tensor v, Tensor positions, "
      "Tensor cu_seqlens, SymInt max_seqlen, float scale, float theta) -> Tensor");
  // GlimpsePrune's keep rule per image (cu_seqlens over images), decided on
  // the device: sigmoid(score) > threshold with an optional top-k cap
  // (max_keep_ratio) and top-k floor (min_keep), or exactly
  // ceil(keep_ratio * n) top-scored; ties to the earlier token. -> bool [N].
  m.def(
      "keep_mask(Tensor scores, Tensor cu_seqlens, float threshold, "
      "float? max_keep_ratio, int min_keep, float? keep_ratio, "
      "bool scores_are_logits) -> Tensor");
  // Skip-and-merge: out = full; out[b, index[b, j]] = packed[b, j]
  // (+ residual[b, j]) for index >= 0. full [B, S, H], packed [B, S', H].
  m.def(
      "scatter_rows(Tensor full, Tensor packed, Tensor index, Tensor? residual) "
      "-> Tensor");
  // The same, written into full itself.
  m.def(
      "scatter_rows_(Tensor(a!) full, Tensor packed, Tensor index, "
      "Tensor? residual) -> ()");
  // Attention each key receives under the causal softmax of q [B, Hq, S, D]
  // against k [B, Hk, S, D] (GQA heads shared, any row width D), averaged over
  // query heads and summed over the real visual queries (row 0) and the real
  // text queries (row 1) of its sample; visual, valid bool [B, S] (valid None:
  // no padding). -> float32 [B, 2, S] (float64 for float64 q). ALVTS's score.
  m.def(
      "causal_attention_received(Tensor q, Tensor k, Tensor visual, Tensor? valid, "
      "float scale) -> Tensor");
}

// The extension exposes no Python functions (everything goes through
// torch.ops.token_prune), so a bare module is enough: importing it is what runs
// the static registrations above. Plain C API instead of pybind11 keeps the
// build light and the module independent of pybind11's ABI.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled token_prune operators; use them via torch.ops.token_prune.",
      -1,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "WITH_CUDA", TOKEN_PRUNE_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
