// A deterministic, GPU-less executor for simple CUDA kernels, for tests.
//
// Every thread of a block is a fiber (ucontext) on one OS thread. A fiber runs
// until it reaches a barrier (__syncthreads, __syncthreads_or, or the warp
// barriers inside __shfl_xor_sync); when no fiber can run, one barrier whose
// members all wait is released, and its fibers run in a shuffled order.
// So a missing barrier shows up as a wrong result for some seed instead of
// depending on luck, a barrier that not every thread reaches is reported as a
// divergence, and __shared__ arrays are plain statics (one block runs at a
// time). Only what the token_prune kernels written for it use is provided.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmuDim3 threadIdx, blockIdx, gridDim, blockDim;

namespace emu {

constexpr int kRunnable = -1;
constexpr int kBlockBarrier = 0;  // warp w waits on 1 + w

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  int wait = kRunnable;
  int pred = 0;
  int result = 0;
  bool done = false;
};

struct Machine {
  std::vector<Fiber> fibers;
  std::vector<double> exchange;
  ucontext_t scheduler;
  int current = 0;
  std::mt19937 rng;
  std::function<void()> body;
  int64_t barriers = 0;
};

inline Machine* machine = nullptr;

inline int wait_at(int barrier, int pred) {
  Fiber& f = machine->fibers[machine->current];
  f.wait = barrier;
  f.pred = pred;
  swapcontext(&f.ctx, &machine->scheduler);
  return f.result;
}

inline void trampoline() {
  machine->body();
  machine->fibers[machine->current].done = true;
}

// Releases one barrier all of whose members wait (false when none can be):
// policy 0 picks at random, 1 the lowest-numbered (warp 0 runs ahead of the
// others as far as it can), 2 the highest. Releasing one warp at a time lets
// warps drift apart as they do on a GPU, which is what exposes a missing
// __syncthreads between a shared-memory read in one warp and a write in
// another.
inline bool release(Machine& m, int policy) {
  const int n = static_cast<int>(m.fibers.size());
  const int warps = (n + 31) / 32;
  std::vector<int> ready;
  for (int b = kBlockBarrier; b <= warps; ++b) {
    const int lo = b == kBlockBarrier ? 0 : 32 * (b - 1);
    const int hi = b == kBlockBarrier ? n : std::min(n, 32 * b);
    bool all = true;
    for (int t = lo; t < hi; ++t) {
      all = all && m.fibers[t].wait == b;
    }
    if (all) {
      ready.push_back(b);
    }
  }
  if (ready.empty()) {
    return false;
  }
  const int b = policy == 1   ? ready.front()
                : policy == 2 ? ready.back()
                              : ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(m.rng)];
  const int lo = b == kBlockBarrier ? 0 : 32 * (b - 1);
  const int hi = b == kBlockBarrier ? n : std::min(n, 32 * b);
  int any = 0;
  for (int t = lo; t < hi; ++t) {
    any |= m.fibers[t].pred;
  }
  for (int t = lo; t < hi; ++t) {
    m.fibers[t].wait = kRunnable;
    m.fibers[t].result = any;
  }
  ++m.barriers;
  return true;
}

// Runs body() as every thread of every block of grid, blocks in order; seed
// picks the schedule (seed % 3 the release policy, the rest the shuffles).
inline void launch(EmuDim3 grid, unsigned threads, uint32_t seed, std::function<void()> body) {
  Machine m;
  m.rng.seed(seed);
  m.body = std::move(body);
  m.exchange.assign(threads, 0.0);
  gridDim = grid;
  blockDim = EmuDim3{threads, 1, 1};
  machine = &m;
  constexpr size_t kStack = 64 * 1024;
  m.fibers.resize(threads);
  for (Fiber& f : m.fibers) {
    f.stack.reset(new char[kStack]);
  }
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = EmuDim3{x, y, z};
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = m.fibers[t];
          f.wait = kRunnable;
          f.pred = f.result = 0;
          f.done = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &m.scheduler;
          makecontext(&f.ctx, trampoline, 0);
        }
        std::vector<int> order(threads);
        for (;;) {
          order.clear();
          for (unsigned t = 0; t < threads; ++t) {
            if (!m.fibers[t].done && m.fibers[t].wait == kRunnable) {
              order.push_back(static_cast<int>(t));
            }
          }
          if (order.empty()) {
            bool all_done = true;
            for (const Fiber& f : m.fibers) {
              all_done = all_done && f.done;
            }
            if (all_done) {
              break;
            }
            if (!release(m, static_cast<int>(seed % 3))) {
              machine = nullptr;
              throw std::runtime_error(
                  "emulated CUDA: a barrier is not reached by every thread of block (" +
                  std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + ")");
            }
            continue;
          }
          std::shuffle(order.begin(), order.end(), m.rng);
          for (int t : order) {
            m.current = t;
            threadIdx = EmuDim3{static_cast<unsigned>(t), 0, 0};
            swapcontext(&m.scheduler, &m.fibers[t].ctx);
          }
        }
      }
    }
  }
  machine = nullptr;
}

}  // namespace emu

inline void __syncthreads() { emu::wait_at(emu::kBlockBarrier, 0); }

inline int __syncthreads_or(int pred) { return emu::wait_at(emu::kBlockBarrier, pred ? 1 : 0); }

template <typename V>
V __shfl_xor_sync(unsigned /*mask*/, V v, int lane_mask) {
  const int t = static_cast<int>(threadIdx.x);
  const int barrier = 1 + t / 32;
  emu::machine->exchange[t] = static_cast<double>(v);
  emu::wait_at(barrier, 0);
  const V got = static_cast<V>(emu::machine->exchange[t ^ lane_mask]);
  emu::wait_at(barrier, 0);  // every lane has read before any lane writes again
  return got;
}
