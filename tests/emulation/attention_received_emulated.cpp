// The CUDA kernels of token_prune::causal_attention_received
// (csrc/attention_received_kernels.cuh), compiled as host code and run by the
// fiber executor of cuda_emulation.h on CPU tensors. Built and used by
// tests/test_attention_received.py.
#include "cuda_emulation.h"

#include "attention_received_kernels.cuh"

#include <torch/extension.h>

#include <limits>

namespace {

at::Tensor emulated(const at::Tensor& q, const at::Tensor& k, const at::Tensor& visual,
                    const std::optional<at::Tensor>& valid, double scale, int64_t seed) {
  TORCH_CHECK(q.device().is_cpu(), "the emulation runs on CPU tensors");
  int launches = 0;
  int64_t barriers = 0;
  at::Tensor out = token_prune::received::run(
      q, k, visual, valid, scale,
      [&](auto kernel, token_prune::received::Grid grid, const auto& params) {
        using Acc = std::remove_pointer_t<decltype(params.row_m)>;
        if (launches++ == 0) {
          // Every output element the kernels forget to write stays NaN.
          const int64_t rows = int64_t(grid.z) * grid.y * params.seq;
          std::fill(params.row_m, params.row_m + rows, std::numeric_limits<Acc>::quiet_NaN());
          std::fill(params.row_inv_l, params.row_inv_l + rows,
                    std::numeric_limits<Acc>::quiet_NaN());
          std::fill(params.partial, params.partial + 2 * rows,
                    std::numeric_limits<Acc>::quiet_NaN());
        }
        emu::launch(EmuDim3{grid.x, grid.y, grid.z}, token_prune::received::kThreads,
                    static_cast<uint32_t>(seed), [&] { kernel(params); });
      });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("causal_attention_received", &emulated, "emulated CUDA kernels", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("visual"), pybind11::arg("valid"),
        pybind11::arg("scale"), pybind11::arg("seed") = 0);
}
