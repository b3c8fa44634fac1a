// Gradient of the max over non-overlapping s x s windows (NHWC), an XLA FFI handler for the
// CPU:
//
//   dx[n, s r + i, s q + j, c] = [x == y[n, r, q, c]] g[n, r, q, c] / (number of such (i, j))
//
// y the window's max: the gradient is split equally between the window's tied maxima (as
// JAX's reduce-max derivative splits it). One pass over x, the output rows split between the
// call's thread and XLA's pool; XLA:CPU ran this as a broadcast, a compare and a window sum
// in several passes. Built by anodev2_jax/native.py.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Output rows [r0, r1) of the flattened (n, output row); the channel loops innermost.
template <typename T>
void Rows(const T* x, const T* y, const T* g, int64_t s, int64_t w, int64_t c, int64_t wo,
          int64_t r0, int64_t r1, T* dx) {
  std::vector<T> share(c);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < wo; ++q) {
      const T* ym = y + (r * wo + q) * c;
      const T* gm = g + (r * wo + q) * c;
      const int64_t base = (r * s * w + q * s) * c;  // x[n, s r', s q, 0]
      std::fill(share.begin(), share.end(), T(0));
      for (int64_t i = 0; i < s; ++i)
        for (int64_t j = 0; j < s; ++j) {
          const T* xe = x + base + (i * w + j) * c;
          for (int64_t k = 0; k < c; ++k) share[k] += xe[k] == ym[k] ? T(1) : T(0);
        }
      for (int64_t k = 0; k < c; ++k) share[k] = gm[k] / share[k];
      for (int64_t i = 0; i < s; ++i)
        for (int64_t j = 0; j < s; ++j) {
          const T* xe = x + base + (i * w + j) * c;
          T* de = dx + base + (i * w + j) * c;
          for (int64_t k = 0; k < c; ++k) de[k] = xe[k] == ym[k] ? share[k] : T(0);
        }
    }
}

template <ffi::DataType DT>
ffi::Error MaxPoolGrad(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> y,
                       ffi::Buffer<DT> g, ffi::ResultBuffer<DT> dx, int64_t size) {
  using T = ffi::NativeType<DT>;
  auto xd = x.dimensions(), yd = y.dimensions(), gd = g.dimensions();
  if (xd.size() != 4 || yd.size() != 4 || gd.size() != 4 || size < 1 || yd[0] != xd[0] ||
      yd[1] * size != xd[1] || yd[2] * size != xd[2] || yd[3] != xd[3] ||
      !std::equal(yd.begin(), yd.end(), gd.begin())) {
    return ffi::Error::InvalidArgument("anodev2 max_pool_grad: inconsistent shapes");
  }
  const int64_t rows = yd[0] * yd[1], chunks = std::min<int64_t>(rows, 64);
  const T* xp = x.typed_data();
  const T* yp = y.typed_data();
  const T* gp = g.typed_data();
  T* dxp = dx->typed_data();
  const int64_t w = xd[2], c = xd[3], wo = yd[2];
  anodev2::RunChunks(pool, chunks, [=](int64_t k) {
    Rows(xp, yp, gp, size, w, c, wo, rows * k / chunks, rows * (k + 1) / chunks, dxp);
  });
  return ffi::Error::Success();
}

}  // namespace

#define ANODEV2_DEFINE_MAX_POOL_GRAD(name, DT)                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, MaxPoolGrad<DT>,                   \
                                xla::ffi::Ffi::Bind()                    \
                                    .Ctx<xla::ffi::ThreadPool>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Arg<xla::ffi::Buffer<DT>>()         \
                                    .Ret<xla::ffi::Buffer<DT>>()         \
                                    .Attr<int64_t>("size"));

ANODEV2_DEFINE_MAX_POOL_GRAD(Anodev2MaxPoolGradF32, ffi::F32)
ANODEV2_DEFINE_MAX_POOL_GRAD(Anodev2MaxPoolGradF64, ffi::F64)
