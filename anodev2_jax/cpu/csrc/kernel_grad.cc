// Kernel gradient of a 2-D convolution (NHWC x HWIO), an XLA FFI handler for the CPU.
//
//   dw[i, j, c, o] = sum_{n, y, x} xin[n, s y + i - pad_h, s x + j - pad_w, c] * g[n, y, x, o]
//
// (stride s; zero outside xin; pad_h, pad_w: the zero rows and columns before the image). XLA:CPU runs
// this as a convolution over the batch, on one thread and behind two transposes; here the
// batch is split into chunks that the call's thread and XLA's intra-op pool share, each
// chunk accumulating (c, o) tiles held in registers over all its pixels, tap by tap, and the
// chunks' partial sums are added in chunk order (deterministic).
// Built by anodev2_jax/native.py.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t n, h, w, c;   // x
  int64_t ho, wo, o;    // g
  int64_t kh, kw;       // kernel
  int64_t pad_h, pad_w, stride;
};

// The output columns [lo, hi) whose tap j reads a column of x: 0 <= s q + j - pad_w < w.
inline void Columns(const Shape& s, int64_t j, int64_t* lo, int64_t* hi) {
  const int64_t first = s.pad_w - j, last = s.w - 1 + s.pad_w - j;  // bounds of s q
  *lo = first <= 0 ? 0 : (first + s.stride - 1) / s.stride;
  *hi = last < 0 ? 0 : std::min<int64_t>(s.wo, last / s.stride + 1);
}

// out[c0 + cb, o0 + v * lanes : ...] += the sum over the pixels (y, q) of
// x[n, s y + i - pad_h, s q + j - pad_w, c0 + cb] * g[n, y, q, o0 + v * lanes : ...], one tap
// (i, j) and one image n: CB x OV vectors of accumulators in registers (GCC/Clang vector
// extensions, lowered to the machine's SIMD), PU copies of them over interleaved pixels where
// CB x OV alone are too few to hide the latency of the multiply-adds.
template <typename T, int CB, int OV>
void TapBlock(const T* x, const T* g, const Shape& s, int64_t n, int64_t i,
              int64_t j, int64_t c0, int64_t o0, T* out) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T);
  constexpr int PU = CB * OV >= 8 ? 1 : (CB * OV >= 4 ? 2 : 4);
  const int64_t ps = s.stride * s.c;  // x's step from one output pixel to the next
  int64_t q_lo, q_hi;
  Columns(s, j, &q_lo, &q_hi);
  V acc[PU][CB][OV];
  for (int u = 0; u < PU; ++u)
    for (int cb = 0; cb < CB; ++cb)
      for (int v = 0; v < OV; ++v) acc[u][cb][v] = V{};
  for (int64_t y = 0; y < s.ho; ++y) {
    const int64_t yi = y * s.stride + i - s.pad_h;
    if (yi < 0 || yi >= s.h || q_lo >= q_hi) continue;
    const T* xr = x + ((n * s.h + yi) * s.w + q_lo * s.stride + j - s.pad_w) * s.c + c0;
    const T* gr = g + ((n * s.ho + y) * s.wo + q_lo) * s.o + o0;
    const int64_t count = q_hi - q_lo;
    int64_t q = 0;
    for (; q + PU <= count; q += PU)
      for (int u = 0; u < PU; ++u) {
        V gv[OV];
        for (int v = 0; v < OV; ++v) std::memcpy(&gv[v], gr + (q + u) * s.o + v * L, sizeof(V));
        for (int cb = 0; cb < CB; ++cb) {
          const T xs = xr[(q + u) * ps + cb];
          for (int v = 0; v < OV; ++v) acc[u][cb][v] += xs * gv[v];
        }
      }
    for (; q < count; ++q) {
      V gv[OV];
      for (int v = 0; v < OV; ++v) std::memcpy(&gv[v], gr + q * s.o + v * L, sizeof(V));
      for (int cb = 0; cb < CB; ++cb) {
        const T xs = xr[q * ps + cb];
        for (int v = 0; v < OV; ++v) acc[0][cb][v] += xs * gv[v];
      }
    }
  }
  for (int cb = 0; cb < CB; ++cb)
    for (int v = 0; v < OV; ++v) {
      V sum;
      T* dst = out + (c0 + cb) * s.o + o0 + v * L;
      std::memcpy(&sum, dst, sizeof(V));
      for (int u = 0; u < PU; ++u) sum += acc[u][cb][v];
      std::memcpy(dst, &sum, sizeof(V));
    }
}

// All input channels of one block of OV output vectors: CB = 16 / OV at a time (16
// accumulators), the rest in one narrower block.
template <typename T, int OV>
void ChannelBlocks(const T* x, const T* g, const Shape& s, int64_t n, int64_t i,
                   int64_t j, int64_t o0, T* out) {
  constexpr int CB = 16 / OV;
  int64_t c0 = 0;
  for (; c0 + CB <= s.c; c0 += CB) TapBlock<T, CB, OV>(x, g, s, n, i, j, c0, o0, out);
  switch (s.c - c0) {
#define ANODEV2_REST(r) \
  case r:               \
    if constexpr (r < CB) TapBlock<T, r, OV>(x, g, s, n, i, j, c0, o0, out); \
    break;
    ANODEV2_REST(1) ANODEV2_REST(2) ANODEV2_REST(3) ANODEV2_REST(4) ANODEV2_REST(5)
    ANODEV2_REST(6) ANODEV2_REST(7) ANODEV2_REST(8) ANODEV2_REST(9) ANODEV2_REST(10)
    ANODEV2_REST(11) ANODEV2_REST(12) ANODEV2_REST(13) ANODEV2_REST(14) ANODEV2_REST(15)
#undef ANODEV2_REST
    default:
      break;
  }
}

// Adds image n's share of dw (kh, kw, c, o) to partial: per tap, blocks of 4 output vectors,
// the 1-3 vectors left, then a scalar loop for the outputs that fill no vector. (One image at
// a time keeps its x and g in the L2 cache over the taps.)
template <typename T>
void Image(const T* x, const T* g, const Shape& s, int64_t n, T* partial) {
  constexpr int64_t L = 64 / sizeof(T);
  const int64_t vectors = s.o / L, o_full = vectors * L;
  for (int64_t i = 0; i < s.kh; ++i)
    for (int64_t j = 0; j < s.kw; ++j) {
      T* out = partial + (i * s.kw + j) * s.c * s.o;
      int64_t v0 = 0;
      for (; v0 + 4 <= vectors; v0 += 4) ChannelBlocks<T, 4>(x, g, s, n, i, j, v0 * L, out);
      switch (vectors - v0) {
        case 3:
          ChannelBlocks<T, 3>(x, g, s, n, i, j, v0 * L, out);
          break;
        case 2:
          ChannelBlocks<T, 2>(x, g, s, n, i, j, v0 * L, out);
          break;
        case 1:
          ChannelBlocks<T, 1>(x, g, s, n, i, j, v0 * L, out);
          break;
        default:
          break;
      }
      if (o_full == s.o) continue;
      int64_t q_lo, q_hi;
      Columns(s, j, &q_lo, &q_hi);
      for (int64_t y = 0; y < s.ho; ++y) {
        const int64_t yi = y * s.stride + i - s.pad_h;
        if (yi < 0 || yi >= s.h) continue;
        for (int64_t q = q_lo; q < q_hi; ++q) {
          const T* xv = x + ((n * s.h + yi) * s.w + q * s.stride + j - s.pad_w) * s.c;
          const T* gv = g + ((n * s.ho + y) * s.wo + q) * s.o;
          for (int64_t c = 0; c < s.c; ++c)
            for (int64_t o = o_full; o < s.o; ++o) out[c * s.o + o] += xv[c] * gv[o];
        }
      }
    }
}

template <typename T>
void KernelGrad(const T* xin, const T* g, const Shape& s, ffi::ThreadPool& pool, T* dw) {
  const int64_t size = s.kh * s.kw * s.c * s.o;
  const int64_t chunks = std::min<int64_t>(s.n, 16);
  std::vector<T> partials(chunks * size);
  T* p = partials.data();
  anodev2::RunChunks(pool, chunks, [=](int64_t k) {
    for (int64_t n = s.n * k / chunks; n < s.n * (k + 1) / chunks; ++n)
      Image(xin, g, s, n, p + k * size);
  });
  std::fill(dw, dw + size, T(0));
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t e = 0; e < size; ++e) dw[e] += p[k * size + e];
}

template <ffi::DataType DT>
ffi::Error Handler(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> g,
                   ffi::ResultBuffer<DT> dw, int64_t pad_h, int64_t pad_w, int64_t stride) {
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  // Reads stay inside x and g whatever the padding after the image (it only sets Ho, Wo).
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || xd[0] != gd[0] ||
      wd[2] != xd[3] || wd[3] != gd[3] || pad_h < 0 || pad_w < 0 || stride < 1) {
    return ffi::Error::InvalidArgument("anodev2 kernel_grad: inconsistent shapes");
  }
  const Shape s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], wd[0], wd[1],
                pad_h, pad_w, stride};
  KernelGrad(x.typed_data(), g.typed_data(), s, pool, dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

ANODEV2_DEFINE_HANDLER(Anodev2KernelGradF32, Handler, ffi::F32)
ANODEV2_DEFINE_HANDLER(Anodev2KernelGradF64, Handler, ffi::F64)
