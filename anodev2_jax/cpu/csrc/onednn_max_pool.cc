// The max pool by oneDNN, forward and backward, as XLA FFI handlers for the CPU, float32, NHWC.
// Built with onednn_conv.cc by anodev2_jax/cpu/onednn.py.
//
// The forward also returns oneDNN's workspace (each window's argmax), which the backward reads:
// an opaque uint8 buffer whose size Anodev2OnednnMaxPoolWorkspaceBytes gives.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Nhwc(int64_t n, int64_t h, int64_t w, int64_t c) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, memory::format_tag::nhwc);
}

// -- max pool: size × size windows at stride size --------------------------------------------
using PoolKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>;

struct PoolPlan {
  dnnl::pooling_forward::primitive_desc forward;
  dnnl::pooling_backward::primitive_desc backward;
  dnnl::pooling_forward run_forward;
  dnnl::pooling_backward run_backward;
};

const PoolPlan& CachedPoolPlan(const PoolKey& key) {
  static std::mutex mutex;
  static std::map<PoolKey, std::unique_ptr<PoolPlan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[key];
  if (!plan) {
    const auto [n, h, w, c, k] = key;
    const auto x_md = Nhwc(n, h, w, c), y_md = Nhwc(n, h / k, w / k, c);
    const memory::dims window{k, k}, none{0, 0};
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const auto max = dnnl::algorithm::pooling_max;
    const dnnl::pooling_forward::primitive_desc forward(
        Engine(), dnnl::prop_kind::forward_training, max, x_md, y_md, window, window, none, none,
        none, attr);
    const dnnl::pooling_backward::primitive_desc backward(
        Engine(), max, x_md, y_md, window, window, none, none, none, forward, attr);
    plan = std::make_unique<PoolPlan>(PoolPlan{forward, backward, dnnl::pooling_forward(forward),
                                               dnnl::pooling_backward(backward)});
  }
  return *plan;
}

// The forward (big = x → small = y, writing the workspace) or the backward (small = dL/dy →
// big = dL/dx, reading it) of the pool of big's shape d.
ffi::Error Run(bool backward, float* big, float* small, uint8_t* workspace,
               ffi::Span<const int64_t> d, int64_t size) {
  if (d.size() != 4 || size < 1 || d[1] % size || d[2] % size) {
    return ffi::Error::InvalidArgument("max pool: x not 4-D or size does not divide it");
  }
  try {
    const PoolPlan& plan = CachedPoolPlan({d[0], d[1], d[2], d[3], size});
    const auto& fwd = plan.forward;
    const auto& bwd = plan.backward;
    auto& engine = Engine();
    thread_local dnnl::stream stream(Engine());
    thread_local std::vector<char> scratchpad;
    const memory::desc pad_md = backward ? bwd.scratchpad_desc() : fwd.scratchpad_desc();
    scratchpad.resize(pad_md.get_size());
    memory big_mem(backward ? bwd.diff_src_desc() : fwd.src_desc(), engine, big);
    memory small_mem(backward ? bwd.diff_dst_desc() : fwd.dst_desc(), engine, small);
    memory ws_mem(backward ? bwd.workspace_desc() : fwd.workspace_desc(), engine, workspace);
    memory pad_mem(pad_md, engine, scratchpad.data());
    if (backward) {
      plan.run_backward.execute(stream, {{DNNL_ARG_DIFF_SRC, big_mem},
                                         {DNNL_ARG_DIFF_DST, small_mem},
                                         {DNNL_ARG_WORKSPACE, ws_mem},
                                         {DNNL_ARG_SCRATCHPAD, pad_mem}});
    } else {
      plan.run_forward.execute(stream, {{DNNL_ARG_SRC, big_mem},
                                        {DNNL_ARG_DST, small_mem},
                                        {DNNL_ARG_WORKSPACE, ws_mem},
                                        {DNNL_ARG_SCRATCHPAD, pad_mem}});
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("anodev2 onednn max pool: ") + error.what());
  }
  return ffi::Error::Success();
}

// x (N, H, W, C) -> y (N, H/size, W/size, C), workspace
ffi::Error PoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::U8> workspace, int64_t size) {
  return Run(false, x.typed_data(), y->typed_data(), workspace->typed_data(), x.dimensions(),
             size);
}

// dL/dx from g = dL/dy and the forward's workspace: each window's g goes to its argmax
ffi::Error PoolBackward(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> workspace,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t size) {
  return Run(true, dx->typed_data(), g.typed_data(), workspace.typed_data(), dx->dimensions(),
             size);
}

}  // namespace

// Bytes of the workspace that the forward returns for x (n, h, w, c) in float32 and
// size × size windows; -1 on error.
extern "C" int64_t Anodev2OnednnMaxPoolWorkspaceBytes(int64_t n, int64_t h, int64_t w,
                                                      int64_t c, int64_t size) {
  try {
    return CachedPoolPlan({n, h, w, c, size}).forward.workspace_desc().get_size();
  } catch (const dnnl::error&) {
  }
  return -1;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Anodev2OnednnMaxPool, PoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Anodev2OnednnMaxPoolGrad, PoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("size"));
