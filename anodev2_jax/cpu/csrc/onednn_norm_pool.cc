// Training-mode BatchNorm (a ReLU optionally fused in) and the max pool by oneDNN, forward and
// backward, as XLA FFI handlers for the CPU, float32, NHWC. Built with onednn_conv.cc by
// anodev2_jax/cpu/onednn.py.
//
// Each forward also returns oneDNN's workspace (the ReLU's mask, the pool's argmax), which its
// backward reads: an opaque uint8 buffer whose size Anodev2OnednnWorkspaceBytes gives.

#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
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

// -- BatchNorm -------------------------------------------------------------------------------
struct NormPlan {
  dnnl::batch_normalization_forward::primitive_desc forward;
  dnnl::batch_normalization_backward::primitive_desc backward;
  dnnl::batch_normalization_forward run_forward;
  dnnl::batch_normalization_backward run_backward;
};

using NormKey = std::tuple<int64_t, int64_t, int64_t, int64_t, float, bool>;

const NormPlan& CachedNormPlan(const NormKey& key) {
  static std::mutex mutex;
  static std::map<NormKey, std::unique_ptr<NormPlan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[key];
  if (!plan) {
    const auto [n, h, w, c, epsilon, relu] = key;
    const auto md = Nhwc(n, h, w, c);
    auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    if (relu) flags |= dnnl::normalization_flags::fuse_norm_relu;
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::batch_normalization_forward::primitive_desc forward(
        Engine(), dnnl::prop_kind::forward_training, md, md, epsilon, flags, attr);
    const dnnl::batch_normalization_backward::primitive_desc backward(
        Engine(), dnnl::prop_kind::backward, md, md, md, epsilon, flags, forward, attr);
    plan = std::make_unique<NormPlan>(NormPlan{forward, backward,
                                               dnnl::batch_normalization_forward(forward),
                                               dnnl::batch_normalization_backward(backward)});
  }
  return *plan;
}

NormKey MakeNormKey(ffi::Span<const int64_t> d, float epsilon, int64_t relu) {
  return {d[0], d[1], d[2], d[3], epsilon, relu != 0};
}

// x (N, H, W, C), scale and bias (C,) -> y (ReLU'd if relu), mean and var (C,), workspace
ffi::Error NormForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                       ffi::ResultBuffer<ffi::U8> workspace, float epsilon, int64_t relu) {
  if (x.dimensions().size() != 4) return ffi::Error::InvalidArgument("batch norm: x not 4-D");
  try {
    const NormPlan& plan = CachedNormPlan(MakeNormKey(x.dimensions(), epsilon, relu));
    auto& engine = Engine();
    thread_local dnnl::stream stream(Engine());
    thread_local std::vector<char> scratchpad;
    scratchpad.resize(plan.forward.scratchpad_desc().get_size());
    const auto& pd = plan.forward;
    plan.run_forward.execute(
        stream, {{DNNL_ARG_SRC, memory(pd.src_desc(), engine, x.typed_data())},
                 {DNNL_ARG_DST, memory(pd.dst_desc(), engine, y->typed_data())},
                 {DNNL_ARG_MEAN, memory(pd.mean_desc(), engine, mean->typed_data())},
                 {DNNL_ARG_VARIANCE, memory(pd.variance_desc(), engine, var->typed_data())},
                 {DNNL_ARG_SCALE, memory(pd.weights_desc(), engine, scale.typed_data())},
                 {DNNL_ARG_SHIFT, memory(pd.weights_desc(), engine, bias.typed_data())},
                 {DNNL_ARG_WORKSPACE, memory(pd.workspace_desc(), engine, workspace->typed_data())},
                 {DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), engine, scratchpad.data())}});
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("anodev2 onednn batch norm: ") + error.what());
  }
  // oneDNN's fused ReLU turns NaN into 0; the formula's y is NaN all over a channel whose
  // moments are not finite (a NaN or inf in x), and the training loop's NaN guard needs it.
  const auto d = x.dimensions();
  const int64_t c = d[3], m = d[0] * d[1] * d[2];
  const float *mu = mean->typed_data(), *sigma2 = var->typed_data();
  float* out = y->typed_data();
  for (int64_t k = 0; k < c; ++k) {
    if (std::isfinite(mu[k]) && std::isfinite(sigma2[k])) continue;
    for (int64_t i = 0; i < m; ++i) out[i * c + k] = std::numeric_limits<float>::quiet_NaN();
  }
  return ffi::Error::Success();
}

// The VJP of NormForward at x, from g = dL/dy and the moments' own cotangents dmean, dvar:
// oneDNN's backward, plus dmean/m + dvar·2(x − mean)/m where those are not zero.
ffi::Error NormBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::U8> workspace,
                        ffi::Buffer<ffi::F32> dmean, ffi::Buffer<ffi::F32> dvar,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias, float epsilon, int64_t relu) {
  if (x.dimensions().size() != 4) return ffi::Error::InvalidArgument("batch norm: x not 4-D");
  try {
    const NormPlan& plan = CachedNormPlan(MakeNormKey(x.dimensions(), epsilon, relu));
    auto& engine = Engine();
    thread_local dnnl::stream stream(Engine());
    thread_local std::vector<char> scratchpad;
    const auto& pd = plan.backward;
    scratchpad.resize(pd.scratchpad_desc().get_size());
    plan.run_backward.execute(
        stream,
        {{DNNL_ARG_SRC, memory(pd.src_desc(), engine, x.typed_data())},
         {DNNL_ARG_DIFF_DST, memory(pd.diff_dst_desc(), engine, g.typed_data())},
         {DNNL_ARG_MEAN, memory(pd.mean_desc(), engine, mean.typed_data())},
         {DNNL_ARG_VARIANCE, memory(pd.variance_desc(), engine, var.typed_data())},
         {DNNL_ARG_SCALE, memory(pd.weights_desc(), engine, scale.typed_data())},
         {DNNL_ARG_WORKSPACE, memory(pd.workspace_desc(), engine, workspace.typed_data())},
         {DNNL_ARG_DIFF_SRC, memory(pd.diff_src_desc(), engine, dx->typed_data())},
         {DNNL_ARG_DIFF_SCALE, memory(pd.diff_weights_desc(), engine, dscale->typed_data())},
         {DNNL_ARG_DIFF_SHIFT, memory(pd.diff_weights_desc(), engine, dbias->typed_data())},
         {DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), engine, scratchpad.data())}});
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("anodev2 onednn batch norm grad: ") + error.what());
  }
  const auto d = x.dimensions();
  const int64_t c = d[3], m = d[0] * d[1] * d[2];
  const float *dm = dmean.typed_data(), *dv = dvar.typed_data();
  bool moments_used = false;
  for (int64_t k = 0; k < c; ++k) moments_used |= dm[k] != 0.0f || dv[k] != 0.0f;
  if (moments_used) {  // a rare case (training differentiates through y only): a plain loop
    const float *xs = x.typed_data(), *mu = mean.typed_data();
    float* out = dx->typed_data();
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t k = 0; k < c; ++k) {
        out[i * c + k] += (dm[k] + 2.0f * dv[k] * (xs[i * c + k] - mu[k])) / m;
      }
    }
  }
  return ffi::Error::Success();
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

// Bytes of the workspace that the forward of op 0 (BatchNorm with `epsilon`, `arg`: fuse the
// ReLU) or op 1 (max pool, `arg`: the window size) returns for x (n, h, w, c) in float32; -1
// on error.
extern "C" int64_t Anodev2OnednnWorkspaceBytes(int64_t op, int64_t n, int64_t h, int64_t w,
                                               int64_t c, int64_t arg, float epsilon) {
  try {
    if (op == 0) {
      return CachedNormPlan({n, h, w, c, epsilon, arg != 0}).forward.workspace_desc().get_size();
    }
    if (op == 1) return CachedPoolPlan({n, h, w, c, arg}).forward.workspace_desc().get_size();
  } catch (const dnnl::error&) {
  }
  return -1;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Anodev2OnednnBatchNorm, NormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Anodev2OnednnBatchNormGrad, NormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

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
