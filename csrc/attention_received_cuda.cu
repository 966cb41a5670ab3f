// CUDA kernel of token_prune::causal_attention_received: the launcher. The
// kernels and the host driver are in attention_received_kernels.cuh (shared
// with the GPU-less emulation in tests/emulation/).
#include "common.h"

#if TOKEN_PRUNE_WITH_CUDA

#include "attention_received_kernels.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace token_prune {
namespace {

at::Tensor causal_attention_received_cuda(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& visual,
                                          const std::optional<at::Tensor>& valid,
                                          double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  return received::run(q, k, visual, valid, scale,
                       [stream](auto kernel, received::Grid grid, const auto& params) {
                         kernel<<<dim3(grid.x, grid.y, grid.z), received::kThreads, 0, stream>>>(
                             params);
                         TOKEN_PRUNE_LAUNCH_CHECK();
                       });
}

}  // namespace
}  // namespace token_prune

TORCH_LIBRARY_IMPL(token_prune, CUDA, m) {
  m.impl("causal_attention_received", &token_prune::causal_attention_received_cuda);
}

#endif  // TOKEN_PRUNE_WITH_CUDA
