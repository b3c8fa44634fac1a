// What the kernels here share: the work split between the calling thread and XLA's intra-op
// pool, and the binding of their FFI handlers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace anodev2 {

// Runs fn(k) for every k in [0, count) and returns when all have run. The calling thread
// works too, so every chunk gets done even if the pool is busy: a task that starts late finds
// no chunk left and only drops its reference to the shared state.
template <typename Fn>
void RunChunks(xla::ffi::ThreadPool& pool, int64_t count, Fn fn) {
  struct State {
    explicit State(Fn f) : fn(std::move(f)) {}
    Fn fn;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>(std::move(fn));
  auto run = [state, count]() {
    for (int64_t k; (k = state->next.fetch_add(1)) < count;) {
      state->fn(k);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace anodev2

// Defines the FFI symbol `name` for handler(pool, a, b, result, pad_top, pad_left, stride):
// two operands and one result of element type DT, three int64 attributes.
#define ANODEV2_DEFINE_HANDLER(name, handler, DT)                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, handler<DT>,                          \
                                xla::ffi::Ffi::Bind()                       \
                                    .Ctx<xla::ffi::ThreadPool>()            \
                                    .Arg<xla::ffi::Buffer<DT>>()            \
                                    .Arg<xla::ffi::Buffer<DT>>()            \
                                    .Ret<xla::ffi::Buffer<DT>>()            \
                                    .Attr<int64_t>("pad_top")               \
                                    .Attr<int64_t>("pad_left")              \
                                    .Attr<int64_t>("stride"));
