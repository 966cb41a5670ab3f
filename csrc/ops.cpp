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
