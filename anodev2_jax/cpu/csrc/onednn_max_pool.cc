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

PoolKey MakePoolKey(ffi::Span<const int64_t> d, int64_t size) {
  return {d[0], d[1], d[2], d[3], size};
}

// x (N, H, W, C) -> y (N, H/size, W/size, C), workspace
ffi::Error PoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::U8> workspace, int64_t size) {
  const auto d = x.dimensions();
  if (d.size() != 4 || size < 1 || d[1] % size || d[2] % size) {
    return ffi::Error::InvalidArgument("max pool: x not 4-D or size does not divide it");
  }
  try {
    const PoolPlan& plan = CachedPoolPlan(MakePoolKey(d, size));
    const auto& pd = plan.forward;
    auto& engine = Engine();
    thread_local dnnl::stream stream(Engine());
    thread_local std::vector<char> scratchpad;
    scratchpad.resize(pd.scratchpad_desc().get_size());
    plan.run_forward.execute(
        stream,
        {{DNNL_ARG_SRC, memory(pd.src_desc(), engine, x.typed_data())},
         {DNNL_ARG_DST, memory(pd.dst_desc(), engine, y->typed_data())},
         {DNNL_ARG_WORKSPACE, memory(pd.workspace_desc(), engine, workspace->typed_data())},
         {DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), engine, scratchpad.data())}});
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("anodev2 onednn max pool: ") + error.what());
  }
  return ffi::Error::Success();
}

// dL/dx from g = dL/dy and the forward's workspace: each window's g goes to its argmax
ffi::Error PoolBackward(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> workspace,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t size) {
  const auto d = dx->dimensions();
  if (d.size() != 4 || size < 1 || d[1] % size || d[2] % size) {
    return ffi::Error::InvalidArgument("max pool grad: dx not 4-D or size does not divide it");
  }
  try {
    const PoolPlan& plan = CachedPoolPlan(MakePoolKey(d, size));
    const auto& pd = plan.backward;
    auto& engine = Engine();
    thread_local dnnl::stream stream(Engine());
    thread_local std::vector<char> scratchpad;
    scratchpad.resize(pd.scratchpad_desc().get_size());
    plan.run_backward.execute(
        stream,
        {{DNNL_ARG_DIFF_DST, memory(pd.diff_dst_desc(), engine, g.typed_data())},
         {DNNL_ARG_DIFF_SRC, memory(pd.diff_src_desc(), engine, dx->typed_data())},
         {DNNL_ARG_WORKSPACE, memory(pd.workspace_desc(), engine, workspace.typed_data())},
         {DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), engine, scratchpad.data())}});
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("anodev2 onednn max pool grad: ") + error.what());
  }
  return ffi::Error::Success();
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
