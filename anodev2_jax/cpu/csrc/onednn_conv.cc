// 2-D convolution (NHWC x HWIO) by oneDNN: forward, input gradient and kernel gradient, as
// XLA FFI handlers for the CPU, float32.
//
//   y[n, r, q, o] = sum_{i, j, c} x[n, s r + i - pad_top, s q + j - pad_left, c] w[i, j, c, o]
//
// Activations stay in XLA's NHWC; the weights are reordered from HWIO into the layout the
// primitive prefers (and the kernel gradient back), which costs little next to the
// convolution. Primitives are built once per shape and pass and cached; each call brings its
// own scratchpad, so calls from several XLA threads may run at once. oneDNN runs on its own
// (OpenMP) threads. Built by anodev2_jax/cpu/onednn.py.

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Pass { kForward, kInputGrad, kKernelGrad };

// n, c, h, w (x); o, ho, wo (y); kh, kw; pad_top, pad_left, stride
using Key = std::array<int64_t, 12>;

struct Plan {
  dnnl::primitive conv;
  memory::desc weights;              // the layout conv reads (or writes) the kernel in
  memory::desc user_weights;         // HWIO
  std::unique_ptr<dnnl::reorder> reorder;  // between them; null when they are the same
  memory::desc scratchpad;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

Plan MakePlan(Pass pass, const Key& k) {
  const auto [n, c, h, w, o, ho, wo, kh, kw, pad_top, pad_left, stride] = k;
  const memory::dims strides{stride, stride}, pad_l{pad_top, pad_left},
      pad_r{(ho - 1) * stride + kh - h - pad_top, (wo - 1) * stride + kw - w - pad_left};
  const auto f32 = memory::data_type::f32;
  const memory::desc x_md({n, c, h, w}, f32, memory::format_tag::nhwc);
  const memory::desc y_md({n, o, ho, wo}, f32, memory::format_tag::nhwc);
  const memory::desc w_any({o, c, kh, kw}, f32, memory::format_tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algorithm = dnnl::algorithm::convolution_direct;
  auto& engine = Engine();
  const dnnl::convolution_forward::primitive_desc forward(
      engine, dnnl::prop_kind::forward_training, algorithm, x_md, w_any, y_md, strides, pad_l,
      pad_r, attr);
  Plan plan;
  plan.user_weights = memory::desc({o, c, kh, kw}, f32, memory::format_tag::hwio);
  if (pass == kForward) {
    plan.conv = dnnl::convolution_forward(forward);
    plan.weights = forward.weights_desc();
    plan.scratchpad = forward.scratchpad_desc();
  } else if (pass == kInputGrad) {
    const dnnl::convolution_backward_data::primitive_desc backward(
        engine, algorithm, x_md, w_any, y_md, strides, pad_l, pad_r, forward, attr);
    plan.conv = dnnl::convolution_backward_data(backward);
    plan.weights = backward.weights_desc();
    plan.scratchpad = backward.scratchpad_desc();
  } else {
    const dnnl::convolution_backward_weights::primitive_desc backward(
        engine, algorithm, x_md, w_any, y_md, strides, pad_l, pad_r, forward, attr);
    plan.conv = dnnl::convolution_backward_weights(backward);
    plan.weights = backward.diff_weights_desc();
    plan.scratchpad = backward.scratchpad_desc();
  }
  if (plan.weights != plan.user_weights) {
    const bool into_user = pass == kKernelGrad;
    const auto& from = into_user ? plan.weights : plan.user_weights;
    const auto& to = into_user ? plan.user_weights : plan.weights;
    plan.reorder = std::make_unique<dnnl::reorder>(
        dnnl::reorder::primitive_desc(engine, from, engine, to));
  }
  return plan;
}

const Plan& CachedPlan(Pass pass, const Key& key) {
  static std::mutex mutex;
  static std::map<std::pair<int, Key>, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[{pass, key}];
  if (!plan) plan = std::make_unique<Plan>(MakePlan(pass, key));
  return *plan;
}

// Runs `pass` with activations x (N, H, W, C) and y (N, Ho, Wo, O) and kernel (kh, kw, C, O);
// the one that the pass writes is its result.
ffi::Error Run(Pass pass, float* x, float* y, float* kernel, ffi::Span<const int64_t> xd,
               ffi::Span<const int64_t> yd, ffi::Span<const int64_t> wd, int64_t pad_top,
               int64_t pad_left, int64_t stride) {
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4 || xd[0] != yd[0] || wd[2] != xd[3] ||
      wd[3] != yd[3] || stride < 1 || pad_top < 0 || pad_left < 0) {
    return ffi::Error::InvalidArgument("anodev2 onednn conv: inconsistent shapes or padding");
  }
  const Key key{xd[0], xd[3], xd[1], xd[2], yd[3], yd[1], yd[2], wd[0], wd[1],
                pad_top,  pad_left, stride};
  try {
    const Plan& plan = CachedPlan(pass, key);
    auto& engine = Engine();
    thread_local dnnl::stream stream(Engine());
    thread_local std::vector<char> scratchpad, weights;
    scratchpad.resize(plan.scratchpad.get_size());
    memory user_w(plan.user_weights, engine, kernel);
    memory conv_w = user_w;
    if (plan.reorder) {
      weights.resize(plan.weights.get_size());
      conv_w = memory(plan.weights, engine, weights.data());
      if (pass != kKernelGrad) plan.reorder->execute(stream, user_w, conv_w);
    }
    memory x_mem(memory::desc({xd[0], xd[3], xd[1], xd[2]}, memory::data_type::f32,
                              memory::format_tag::nhwc),
                 engine, x);
    memory y_mem(memory::desc({yd[0], yd[3], yd[1], yd[2]}, memory::data_type::f32,
                              memory::format_tag::nhwc),
                 engine, y);
    memory pad_mem(plan.scratchpad, engine, scratchpad.data());
    if (pass == kForward) {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                 {DNNL_ARG_WEIGHTS, conv_w},
                                 {DNNL_ARG_DST, y_mem},
                                 {DNNL_ARG_SCRATCHPAD, pad_mem}});
    } else if (pass == kInputGrad) {
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, x_mem},
                                 {DNNL_ARG_WEIGHTS, conv_w},
                                 {DNNL_ARG_DIFF_DST, y_mem},
                                 {DNNL_ARG_SCRATCHPAD, pad_mem}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                 {DNNL_ARG_DIFF_WEIGHTS, conv_w},
                                 {DNNL_ARG_DIFF_DST, y_mem},
                                 {DNNL_ARG_SCRATCHPAD, pad_mem}});
      if (plan.reorder) plan.reorder->execute(stream, conv_w, user_w);
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("anodev2 onednn conv: ") + error.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t pad_top, int64_t pad_left,
                   int64_t stride) {
  return Run(kForward, x.typed_data(), y->typed_data(), w.typed_data(), x.dimensions(),
             y->dimensions(), w.dimensions(), pad_top, pad_left, stride);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t pad_top, int64_t pad_left,
                     int64_t stride) {
  return Run(kInputGrad, dx->typed_data(), g.typed_data(), w.typed_data(), dx->dimensions(),
             g.dimensions(), w.dimensions(), pad_top, pad_left, stride);
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t pad_top, int64_t pad_left,
                      int64_t stride) {
  return Run(kKernelGrad, x.typed_data(), g.typed_data(), dw->typed_data(), x.dimensions(),
             g.dimensions(), dw->dimensions(), pad_top, pad_left, stride);
}

}  // namespace

#define ANODEV2_ONEDNN_HANDLER(name, fn)                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                                      \
                                xla::ffi::Ffi::Bind()                          \
                                    .Arg<xla::ffi::Buffer<xla::ffi::F32>>()    \
                                    .Arg<xla::ffi::Buffer<xla::ffi::F32>>()    \
                                    .Ret<xla::ffi::Buffer<xla::ffi::F32>>()    \
                                    .Attr<int64_t>("pad_top")                  \
                                    .Attr<int64_t>("pad_left")                 \
                                    .Attr<int64_t>("stride"));

ANODEV2_ONEDNN_HANDLER(Anodev2OnednnConvForward, Forward)
ANODEV2_ONEDNN_HANDLER(Anodev2OnednnConvInputGrad, InputGrad)
ANODEV2_ONEDNN_HANDLER(Anodev2OnednnConvKernelGrad, KernelGrad)
