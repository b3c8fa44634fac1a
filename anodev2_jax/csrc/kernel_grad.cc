// Kernel gradient of a stride-1 2-D convolution (NHWC x HWIO), an XLA FFI handler for the CPU.
//
//   dw[i, j, c, o] = sum_{n, y, x} xin[n, y + i - pad_h, x + j - pad_w, c] * g[n, y, x, o]
//
// (zero outside xin; pad_h, pad_w: the zero rows and columns before the image). XLA:CPU runs this as a convolution over the batch, on one thread and
// behind two transposes; here the batch is split into chunks that the calls' thread and
// XLA's intra-op pool share, each chunk accumulating (c, o) tiles held in registers over an
// output row, and the chunks' partial sums are added in chunk order (deterministic).
// Built by anodev2_jax/native.py.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t n, h, w, c;   // x
  int64_t ho, wo, o;    // g
  int64_t kh, kw;       // kernel
  int64_t pad_h, pad_w;
};

// out[c0 + cb, o0 : o0 + lanes] += sum over one output row's columns of x[column + j - pad_w,
// c0 + cb] * g[column, o0 : o0 + lanes]: CB accumulators of one vector each, in registers
// (GCC/Clang vector extensions, lowered to the machine's SIMD: AVX-512 here).
template <typename T, int CB>
inline void RowTile(const T* xrow, const T* grow, const Shape& s, int64_t j, int64_t c0,
                    int64_t o0, T* out) {
  typedef T V __attribute__((vector_size(64)));
  const int64_t x_lo = std::max<int64_t>(0, s.pad_w - j);
  const int64_t x_hi = std::min<int64_t>(s.wo, s.w + s.pad_w - j);
  V acc[CB];
  for (int cb = 0; cb < CB; ++cb) acc[cb] = V{};
  for (int64_t x = x_lo; x < x_hi; ++x) {
    const T* xv = xrow + (x + j - s.pad_w) * s.c + c0;
    V gv;
    std::memcpy(&gv, grow + x * s.o + o0, sizeof(V));
    for (int cb = 0; cb < CB; ++cb) acc[cb] += xv[cb] * gv;
  }
  for (int cb = 0; cb < CB; ++cb) {
    V o;
    T* dst = out + (c0 + cb) * s.o + o0;
    std::memcpy(&o, dst, sizeof(V));
    o += acc[cb];
    std::memcpy(dst, &o, sizeof(V));
  }
}

// Any channel counts: CB x (one vector of outputs) tiles where they fit, scalar loops for the
// rest.
template <typename T, int CB>
void Row(const T* xrow, const T* grow, const Shape& s, int64_t j, T* out) {
  constexpr int64_t OB = 64 / sizeof(T);
  const int64_t c_full = s.c / CB * CB, o_full = s.o / OB * OB;
  for (int64_t c0 = 0; c0 < c_full; c0 += CB)
    for (int64_t o0 = 0; o0 < o_full; o0 += OB) RowTile<T, CB>(xrow, grow, s, j, c0, o0, out);
  if (c_full == s.c && o_full == s.o) return;
  const int64_t x_lo = std::max<int64_t>(0, s.pad_w - j);
  const int64_t x_hi = std::min<int64_t>(s.wo, s.w + s.pad_w - j);
  for (int64_t x = x_lo; x < x_hi; ++x) {
    const T* xv = xrow + (x + j - s.pad_w) * s.c;
    const T* gv = grow + x * s.o;
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t o = (c < c_full ? o_full : 0); o < s.o; ++o) out[c * s.o + o] += xv[c] * gv[o];
  }
}

// Partial dw (kh, kw, c, o) of images [n0, n1).
template <typename T>
void Chunk(const T* xin, const T* g, const Shape& s, int64_t n0, int64_t n1, T* out) {
  const int64_t tap = s.c * s.o;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t y = 0; y < s.ho; ++y) {
      const T* grow = g + ((n * s.ho + y) * s.wo) * s.o;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t yi = y + i - s.pad_h;
        if (yi < 0 || yi >= s.h) continue;
        const T* xrow = xin + ((n * s.h + yi) * s.w) * s.c;
        for (int64_t j = 0; j < s.kw; ++j)
          Row<T, 16>(xrow, grow, s, j, out + (i * s.kw + j) * tap);
      }
    }
}

template <typename T>
void KernelGrad(const T* xin, const T* g, const Shape& s, ffi::ThreadPool& pool, T* dw) {
  const int64_t size = s.kh * s.kw * s.c * s.o;
  const int64_t chunks = std::min<int64_t>(s.n, 16);
  struct Work {
    std::vector<T> partials;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto work = std::make_shared<Work>();
  work->partials.assign(chunks * size, T(0));
  auto run = [xin, g, s, size, chunks, work]() {
    for (int64_t k; (k = work->next.fetch_add(1)) < chunks;) {
      Chunk(xin, g, s, s.n * k / chunks, s.n * (k + 1) / chunks, work->partials.data() + k * size);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  // The calling thread works too, so every chunk gets done even if the pool is busy: a task
  // that starts late finds no chunk left and only drops its reference to `work`.
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (work->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  std::fill(dw, dw + size, T(0));
  for (int64_t k = 0; k < chunks; ++k) {
    const T* p = work->partials.data() + k * size;
    for (int64_t e = 0; e < size; ++e) dw[e] += p[e];
  }
}

template <ffi::DataType DT>
ffi::Error Handler(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> g,
                   ffi::ResultBuffer<DT> dw, int64_t pad_h, int64_t pad_w) {
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  // Reads stay inside x and g whatever the padding after the image (it only sets Ho, Wo).
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || xd[0] != gd[0] ||
      wd[2] != xd[3] || wd[3] != gd[3] || pad_h < 0 || pad_w < 0) {
    return ffi::Error::InvalidArgument("anodev2 kernel_grad: inconsistent shapes");
  }
  const Shape s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], wd[0], wd[1], pad_h, pad_w};
  KernelGrad(x.typed_data(), g.typed_data(), s, pool, dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

#define ANODEV2_KERNEL_GRAD(name, DT)                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Handler<DT>,     \
                                ffi::Ffi::Bind()       \
                                    .Ctx<ffi::ThreadPool>() \
                                    .Arg<ffi::Buffer<DT>>() \
                                    .Arg<ffi::Buffer<DT>>() \
                                    .Ret<ffi::Buffer<DT>>() \
                                    .Attr<int64_t>("pad_h") \
                                    .Attr<int64_t>("pad_w"));

ANODEV2_KERNEL_GRAD(Anodev2KernelGradF32, ffi::F32)
ANODEV2_KERNEL_GRAD(Anodev2KernelGradF64, ffi::F64)
