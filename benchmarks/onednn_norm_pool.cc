// oneDNN's training-mode BatchNorm (+ ReLU) and max pool, forward and backward, timed alone
// on one NHWC float32 shape: what benchmarks/norm_pool.py sets beside our C++ kernels.
//
//   onednn_norm_pool bn N H W C REPS       # BatchNorm with scale, shift and a fused ReLU
//   onednn_norm_pool pool N H W C K REPS   # K x K max pool, stride K
//
// Prints "fwd MS" and "fwd+bwd MS": medians over REPS calls after 3 warm-up calls.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

using dnnl::memory;

namespace {

double MedianMs(const std::function<void()>& fn, int reps) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::vector<float> Random(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& x : v) x = normal(gen);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  const bool bn = argc == 7 && std::strcmp(argv[1], "bn") == 0;
  const bool pool = argc == 8 && std::strcmp(argv[1], "pool") == 0;
  if (!bn && !pool) {
    std::fprintf(stderr, "usage: %s bn N H W C REPS | pool N H W C K REPS\n", argv[0]);
    return 2;
  }
  const memory::dim n = std::atol(argv[2]), h = std::atol(argv[3]), w = std::atol(argv[4]),
                    c = std::atol(argv[5]);
  const int reps = std::atoi(argv[argc - 1]);
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  const auto f32 = memory::data_type::f32;
  const auto nhwc = memory::format_tag::nhwc;
  const memory::desc x_md({n, c, h, w}, f32, nhwc);
  auto x = Random(n * h * w * c, 1);
  memory x_mem(x_md, engine, x.data());
  double fwd_ms, both_ms;
  if (bn) {
    const auto flags = dnnl::normalization_flags::use_scale |
                       dnnl::normalization_flags::use_shift |
                       dnnl::normalization_flags::fuse_norm_relu;
    const dnnl::batch_normalization_forward::primitive_desc fwd_pd(
        engine, dnnl::prop_kind::forward_training, x_md, x_md, 1e-5f, flags);
    const dnnl::batch_normalization_backward::primitive_desc bwd_pd(
        engine, dnnl::prop_kind::backward, x_md, x_md, x_md, 1e-5f, flags, fwd_pd);
    memory y(x_md, engine), dx(x_md, engine), g(x_md, engine);
    std::vector<float> dy = Random(n * h * w * c, 2);
    std::memcpy(g.get_data_handle(), dy.data(), dy.size() * sizeof(float));
    memory mean(fwd_pd.mean_desc(), engine), var(fwd_pd.variance_desc(), engine);
    memory scale(fwd_pd.weights_desc(), engine), shift(fwd_pd.weights_desc(), engine);
    memory dscale(bwd_pd.diff_weights_desc(), engine), dshift(bwd_pd.diff_weights_desc(), engine);
    memory workspace(fwd_pd.workspace_desc(), engine);
    std::fill_n(static_cast<float*>(scale.get_data_handle()), c, 1.0f);
    std::fill_n(static_cast<float*>(shift.get_data_handle()), c, 0.1f);
    dnnl::batch_normalization_forward fwd(fwd_pd);
    dnnl::batch_normalization_backward bwd(bwd_pd);
    const auto forward = [&] {
      fwd.execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DST, y}, {DNNL_ARG_MEAN, mean},
                           {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_SCALE, scale},
                           {DNNL_ARG_SHIFT, shift}, {DNNL_ARG_WORKSPACE, workspace}});
      stream.wait();
    };
    const auto both = [&] {
      forward();
      bwd.execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_MEAN, mean},
                           {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_DIFF_DST, g},
                           {DNNL_ARG_SCALE, scale}, {DNNL_ARG_WORKSPACE, workspace},
                           {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_DIFF_SCALE, dscale},
                           {DNNL_ARG_DIFF_SHIFT, dshift}});
      stream.wait();
    };
    fwd_ms = MedianMs(forward, reps);
    both_ms = MedianMs(both, reps);
  } else {
    const memory::dim k = std::atol(argv[6]);
    const memory::desc y_md({n, c, h / k, w / k}, f32, nhwc);
    const dnnl::pooling_forward::primitive_desc fwd_pd(
        engine, dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, x_md, y_md,
        {k, k}, {k, k}, {0, 0}, {0, 0}, {0, 0});
    const dnnl::pooling_backward::primitive_desc bwd_pd(
        engine, dnnl::algorithm::pooling_max, x_md, y_md, {k, k}, {k, k}, {0, 0}, {0, 0},
        {0, 0}, fwd_pd);
    memory y(y_md, engine), g(y_md, engine), dx(x_md, engine);
    memory workspace(fwd_pd.workspace_desc(), engine);
    std::vector<float> dy = Random(n * (h / k) * (w / k) * c, 2);
    std::memcpy(g.get_data_handle(), dy.data(), dy.size() * sizeof(float));
    dnnl::pooling_forward fwd(fwd_pd);
    dnnl::pooling_backward bwd(bwd_pd);
    const auto forward = [&] {
      fwd.execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DST, y}, {DNNL_ARG_WORKSPACE, workspace}});
      stream.wait();
    };
    const auto both = [&] {
      forward();
      bwd.execute(stream, {{DNNL_ARG_DIFF_DST, g}, {DNNL_ARG_DIFF_SRC, dx},
                           {DNNL_ARG_WORKSPACE, workspace}});
      stream.wait();
    };
    fwd_ms = MedianMs(forward, reps);
    both_ms = MedianMs(both, reps);
  }
  std::printf("fwd %.4f\nfwd+bwd %.4f\n", fwd_ms, both_ms);
  return 0;
}
