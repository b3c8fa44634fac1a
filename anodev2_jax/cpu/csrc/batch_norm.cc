// Training-mode BatchNorm over the channels of NHWC activations, optionally followed by a
// ReLU, and its gradient, as XLA FFI handlers for the CPU. With x flattened to (M, C):
//
//   mean, var = the biased moments of x over its M rows;  a = scale / sqrt(var + eps)
//   y = (x - mean) a + bias, then max(y, 0) if relu
//
// The forward pass reads x twice (the moments from shifted sums in double, then y); the
// backward pass, given g = dL/dy and the moments' cotangents, reads x and g twice (the sums
// of dy and dy xhat, then dx), recomputing xhat and the ReLU's mask. XLA:CPU made about
// twice as many passes, its reductions on one thread. The rows are split into chunks that
// the call's thread and XLA's pool share. Built by anodev2_jax/native.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Per channel, what both passes use: the moments as stored (type T) and a = scale rstd from
// them, so that forward and backward compute the same pre-activation to the bit.
template <typename T>
struct Affine {
  std::vector<T> mean, a, bias, rstd_t;
  std::vector<double> rstd;
  Affine(const T* m, const T* v, const T* scale, const T* b, int64_t c, double eps)
      : mean(m, m + c), a(c), bias(b, b + c), rstd_t(c), rstd(c) {
    for (int64_t k = 0; k < c; ++k) {
      rstd[k] = 1.0 / std::sqrt(double(v[k]) + eps);
      rstd_t[k] = T(rstd[k]);
      a[k] = T(double(scale[k]) * rstd[k]);
    }
  }
};

// The pre-activation (x - mean) a + bias, one rounding for the multiply-add.
template <typename T>
inline T Pre(T x, T mean, T a, T bias) {
  return std::fma(x - mean, a, bias);
}

// Runs sums(r0, r1, s1, s2) for row chunks and returns the totals of its two (C,) partial
// sums in double.
template <typename Sums>
void ChunkedSums(ffi::ThreadPool& pool, int64_t m, int64_t c, Sums sums,
                 std::vector<double>& t1, std::vector<double>& t2) {
  const int64_t chunks = std::clamp<int64_t>(m * c / 32768, 1, 64);
  std::vector<double> p1(chunks * c), p2(chunks * c);
  double *q1 = p1.data(), *q2 = p2.data();
  anodev2::RunChunks(pool, chunks, [=](int64_t k) {
    std::vector<double> s(2 * c, 0.0);  // local: the threads' partials share cache lines
    sums(m * k / chunks, m * (k + 1) / chunks, s.data(), s.data() + c);
    std::copy(s.begin(), s.begin() + c, q1 + k * c);
    std::copy(s.begin() + c, s.end(), q2 + k * c);
  });
  t1.assign(c, 0.0);
  t2.assign(c, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t j = 0; j < c; ++j) t1[j] += p1[k * c + j], t2[j] += p2[k * c + j];
}

template <typename Rows>
void ChunkedRows(ffi::ThreadPool& pool, int64_t m, int64_t c, Rows rows) {
  const int64_t chunks = std::clamp<int64_t>(m * c / 32768, 1, 64);
  anodev2::RunChunks(pool, chunks,
                     [=](int64_t k) { rows(m * k / chunks, m * (k + 1) / chunks); });
}

bool Flatten(ffi::Span<const int64_t> dims, int64_t c, int64_t& m) {
  if (dims.size() == 0 || dims.back() != c) return false;
  m = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) m *= dims[i];
  return m > 0;
}

// The per-row loops, over rows [r0, r1) of (M, C) arrays; `__restrict` and RELU as a
// template parameter so that the channel loops vectorize.
template <typename T, bool RELU>
void NormalizeRows(const T* __restrict x, const Affine<T>& f, int64_t c, int64_t r0,
                   int64_t r1, T* __restrict y) {
  const T *__restrict mu = f.mean.data(), *__restrict a = f.a.data(),
                      *__restrict b = f.bias.data();
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * c;
    T* __restrict yr = y + r * c;
    for (int64_t k = 0; k < c; ++k) {
      const T v = Pre(xr[k], mu[k], a[k], b[k]);
      yr[k] = RELU ? (v < T(0) ? T(0) : v) : v;  // NaN stays NaN
    }
  }
}

// dy: g, times the ReLU's mask (pre-activation > 0) if RELU.
template <typename T, bool RELU>
inline T Dy(T x, T g, T mean, T a, T bias) {
  return RELU ? (Pre(x, mean, a, bias) > T(0) ? g : T(0)) : g;
}

// Below, xhat = (x - mean) rstd.
template <typename T, bool RELU>
void GradSumRows(const T* __restrict x, const T* __restrict g, const Affine<T>& f, int64_t c,
                 int64_t r0, int64_t r1, double* __restrict s1, double* __restrict s2) {
  const T *__restrict mu = f.mean.data(), *__restrict a = f.a.data(),
                      *__restrict b = f.bias.data(), *__restrict rs = f.rstd_t.data();
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * c;
    const T* __restrict gr = g + r * c;
    for (int64_t k = 0; k < c; ++k) {
      const T xk = xr[k], d = Dy<T, RELU>(xk, gr[k], mu[k], a[k], b[k]);
      s1[k] += double(d);
      s2[k] += double(d * ((xk - mu[k]) * rs[k]));
    }
  }
}

template <typename T, bool RELU>
void GradRows(const T* __restrict x, const T* __restrict g, const Affine<T>& f,
              const T* __restrict cb, const T* __restrict cc, int64_t c, int64_t r0, int64_t r1,
              T* __restrict dx) {
  const T *__restrict mu = f.mean.data(), *__restrict a = f.a.data(),
                      *__restrict b = f.bias.data(), *__restrict rs = f.rstd_t.data();
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * c;
    const T* __restrict gr = g + r * c;
    T* __restrict dxr = dx + r * c;
    for (int64_t k = 0; k < c; ++k) {
      const T xk = xr[k], d = Dy<T, RELU>(xk, gr[k], mu[k], a[k], b[k]);
      dxr[k] = a[k] * d + cb[k] * ((xk - mu[k]) * rs[k]) + cc[k];
    }
  }
}

template <ffi::DataType DT>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> scale,
                   ffi::Buffer<DT> bias, ffi::ResultBuffer<DT> y, ffi::ResultBuffer<DT> mean,
                   ffi::ResultBuffer<DT> var, double eps, int64_t relu) {
  using T = ffi::NativeType<DT>;
  const int64_t c = scale.element_count();
  int64_t m;
  if (!Flatten(x.dimensions(), c, m) || bias.element_count() != c)
    return ffi::Error::InvalidArgument("anodev2 batch_norm: inconsistent shapes");
  const T* xp = x.typed_data();
  // Sums of x - x[0] (the first row): no cancellation when |mean| >> std.
  std::vector<double> shift(xp, xp + c), s1, s2;
  const double* sh = shift.data();
  ChunkedSums(
      pool, m, c,
      [=](int64_t r0, int64_t r1, double* __restrict q1, double* __restrict q2) {
        for (int64_t r = r0; r < r1; ++r) {
          const T* __restrict xr = xp + r * c;
          for (int64_t k = 0; k < c; ++k) {
            const double d = double(xr[k]) - sh[k];
            q1[k] += d;
            q2[k] += d * d;
          }
        }
      },
      s1, s2);
  T* mp = mean->typed_data();
  T* vp = var->typed_data();
  for (int64_t k = 0; k < c; ++k) {
    const double d = s1[k] / double(m);
    mp[k] = T(shift[k] + d);
    vp[k] = T(std::max(s2[k] / double(m) - d * d, 0.0));
  }
  const Affine<T> f(mp, vp, scale.typed_data(), bias.typed_data(), c, eps);
  const Affine<T>* fp = &f;
  T* yp = y->typed_data();
  ChunkedRows(pool, m, c, [=](int64_t r0, int64_t r1) {
    (relu ? NormalizeRows<T, true> : NormalizeRows<T, false>)(xp, *fp, c, r0, r1, yp);
  });
  return ffi::Error::Success();
}

// dbias = sum dy, dscale = sum dy xhat, and dx = A dy + B xhat + C per channel, A = a,
// B = (2 dvar / rstd - a dscale) / M, C = (dmean - a dbias) / M.
template <ffi::DataType DT>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> g,
                    ffi::Buffer<DT> scale, ffi::Buffer<DT> bias, ffi::Buffer<DT> mean,
                    ffi::Buffer<DT> var, ffi::Buffer<DT> dmean, ffi::Buffer<DT> dvar,
                    ffi::ResultBuffer<DT> dx, ffi::ResultBuffer<DT> dscale,
                    ffi::ResultBuffer<DT> dbias, double eps, int64_t relu) {
  using T = ffi::NativeType<DT>;
  const int64_t c = scale.element_count();
  int64_t m;
  if (!Flatten(x.dimensions(), c, m) || g.element_count() != x.element_count() ||
      bias.element_count() != c || mean.element_count() != c || var.element_count() != c ||
      dmean.element_count() != c || dvar.element_count() != c)
    return ffi::Error::InvalidArgument("anodev2 batch_norm_grad: inconsistent shapes");
  const Affine<T> f(mean.typed_data(), var.typed_data(), scale.typed_data(),
                    bias.typed_data(), c, eps);
  const Affine<T>* fp = &f;
  const T* xp = x.typed_data();
  const T* gp = g.typed_data();
  std::vector<double> s1, s2;
  ChunkedSums(
      pool, m, c,
      [=](int64_t r0, int64_t r1, double* q1, double* q2) {
        (relu ? GradSumRows<T, true> : GradSumRows<T, false>)(xp, gp, *fp, c, r0, r1, q1, q2);
      },
      s1, s2);
  std::vector<T> cb(c), cc(c);
  const double inv_m = 1.0 / double(m);
  for (int64_t k = 0; k < c; ++k) {
    const double a = double(f.a[k]);
    dbias->typed_data()[k] = T(s1[k]);
    dscale->typed_data()[k] = T(s2[k]);
    cb[k] = T((2.0 * double(dvar.typed_data()[k]) / f.rstd[k] - a * s2[k]) * inv_m);
    cc[k] = T((double(dmean.typed_data()[k]) - a * s1[k]) * inv_m);
  }
  const T* bp = cb.data();
  const T* cp = cc.data();
  T* dxp = dx->typed_data();
  ChunkedRows(pool, m, c, [=](int64_t r0, int64_t r1) {
    (relu ? GradRows<T, true> : GradRows<T, false>)(xp, gp, *fp, bp, cp, c, r0, r1, dxp);
  });
  return ffi::Error::Success();
}

}  // namespace

#define ANODEV2_DEFINE_BATCH_NORM(name, DT)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Forward<DT>,                       \
                                xla::ffi::Ffi::Bind()                    \
                                    .Ctx<xla::ffi::ThreadPool>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Ret<xla::ffi::Buffer<DT>>()         \
                                    .Ret<xla::ffi::Buffer<DT>>()         \
                                    .Ret<xla::ffi::Buffer<DT>>()         \
                                    .Attr<double>("epsilon")             \
                                    .Attr<int64_t>("relu"));

#define ANODEV2_DEFINE_BATCH_NORM_GRAD(name, DT)                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Backward<DT>,                      \
                                xla::ffi::Ffi::Bind()                    \
                                    .Ctx<xla::ffi::ThreadPool>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Ret<xla::ffi::Buffer<DT>>()         \
                                    .Ret<xla::ffi::Buffer<DT>>()         \
                                    .Ret<xla::ffi::Buffer<DT>>()         \
                                    .Attr<double>("epsilon")             \
                                    .Attr<int64_t>("relu"));

ANODEV2_DEFINE_BATCH_NORM(Anodev2BatchNormF32, ffi::F32)
ANODEV2_DEFINE_BATCH_NORM(Anodev2BatchNormF64, ffi::F64)
ANODEV2_DEFINE_BATCH_NORM_GRAD(Anodev2BatchNormGradF32, ffi::F32)
ANODEV2_DEFINE_BATCH_NORM_GRAD(Anodev2BatchNormGradF64, ffi::F64)
