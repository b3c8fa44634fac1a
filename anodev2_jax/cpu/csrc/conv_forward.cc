// 2-D convolution (NHWC x HWIO), an XLA FFI handler for the CPU.
//
//   y[n, r, q, o] = sum_{i, j, c} x[n, s r + i - pad_top, s q + j - pad_left, c] w[i, j, c, o]
//
// (stride s; zero outside x; pad_top, pad_left >= 0: the zero rows and columns before the
// image, those after it follow from the output's size). XLA:CPU gives convolutions with more than 16 channels to YNNPACK on one
// thread; here the output rows are split into chunks that the call's thread and XLA's
// intra-op pool share. Per output row, the kh input rows it reads are copied with their zero
// columns into a buffer; then tiles of PX pixels x OV vectors of output channels accumulate
// in registers over the taps and input channels, whose (j, c) loop is one contiguous run of
// kw * C values in the buffer (from pixel p's first column, s p) and of kw * C rows of w. Needs C_out to be a multiple of the
// vector length. Built by anodev2_jax/native.py.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t n, h, w, c;  // x
  int64_t ho, wo, o;   // y
  int64_t kh, kw;      // kernel
  int64_t pad_top, pad_left, stride;
  int64_t wp;          // padded row width: (wo - 1) * stride + kw
};

// out[p, o0 : o0 + OV * lanes] = sum over i < kh and k < kw * C of
// rows[i][(q0 + p) * stride * C + k] * w[i, k, o0 : ...], for the PX pixels q0 + p of one
// output row. PS: the pixel stride, stride * C, when known at compile time (then the PX
// pixels' offsets are constants, not integer registers spilled to the stack), else 0.
template <typename T, int PX, int OV, int PS>
inline void Tile(const T* const* rows, const T* w, const Shape& s, int64_t q0, int64_t o0,
                 T* out) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T);
  const int64_t ps = PS ? PS : s.stride * s.c, run = s.kw * s.c;
  V acc[PX][OV];
  #pragma GCC unroll 24  // all PX accumulators in registers
  for (int p = 0; p < PX; ++p)
    for (int v = 0; v < OV; ++v) acc[p][v] = V{};
  for (int64_t i = 0; i < s.kh; ++i) {
    const T* xr = rows[i] + q0 * ps;
    const T* wr = w + i * run * s.o + o0;
    for (int64_t k = 0; k < run; ++k) {
      V wv[OV];
      for (int v = 0; v < OV; ++v) std::memcpy(&wv[v], wr + k * s.o + v * L, sizeof(V));
      #pragma GCC unroll 24  // all PX accumulators in registers
      for (int p = 0; p < PX; ++p) {
        const T xs = xr[p * ps + k];
        for (int v = 0; v < OV; ++v) acc[p][v] += xs * wv[v];
      }
    }
  }
  #pragma GCC unroll 24  // all PX accumulators in registers
  for (int p = 0; p < PX; ++p)
    for (int v = 0; v < OV; ++v) std::memcpy(out + p * s.o + o0 + v * L, &acc[p][v], sizeof(V));
}

// Pixel tiles of PX (= 24 / OV, the accumulators that fit the 32 vector registers), the last
// one narrower.
template <typename T, int OV, int PS>
void RowBlock(const T* const* rows, const T* w, const Shape& s, int64_t o0, T* out) {
  constexpr int PX = 24 / OV;
  int64_t q0 = 0;
  for (; q0 + PX <= s.wo; q0 += PX) Tile<T, PX, OV, PS>(rows, w, s, q0, o0, out + q0 * s.o);
  T* rest = out + q0 * s.o;
  switch (s.wo - q0) {
#define ANODEV2_REST(r) \
  case r:               \
    if constexpr (r < PX) Tile<T, r, OV, PS>(rows, w, s, q0, o0, rest); \
    break;
    ANODEV2_REST(1) ANODEV2_REST(2) ANODEV2_REST(3) ANODEV2_REST(4) ANODEV2_REST(5)
    ANODEV2_REST(6) ANODEV2_REST(7) ANODEV2_REST(8) ANODEV2_REST(9) ANODEV2_REST(10)
    ANODEV2_REST(11) ANODEV2_REST(12) ANODEV2_REST(13) ANODEV2_REST(14) ANODEV2_REST(15)
    ANODEV2_REST(16) ANODEV2_REST(17) ANODEV2_REST(18) ANODEV2_REST(19) ANODEV2_REST(20)
    ANODEV2_REST(21) ANODEV2_REST(22) ANODEV2_REST(23)
#undef ANODEV2_REST
    default:
      break;
  }
}

// One output row: blocks of 4 output vectors, then the 1-3 left (one vector of outputs from
// 16 input channels at stride 1, as in the ResNets' blocks, with its offsets known at compile
// time).
template <typename T>
void Row(const T* const* rows, const T* w, const Shape& s, T* out) {
  constexpr int64_t L = 64 / sizeof(T);
  const int64_t vectors = s.o / L;
  int64_t v0 = 0;
  for (; v0 + 4 <= vectors; v0 += 4) RowBlock<T, 4, 0>(rows, w, s, v0 * L, out);
  switch (vectors - v0) {
    case 3:
      RowBlock<T, 3, 0>(rows, w, s, v0 * L, out);
      break;
    case 2:
      RowBlock<T, 2, 0>(rows, w, s, v0 * L, out);
      break;
    case 1:
      if (s.stride * s.c == 16)
        RowBlock<T, 1, 16>(rows, w, s, v0 * L, out);
      else
        RowBlock<T, 1, 0>(rows, w, s, v0 * L, out);
      break;
    default:
      break;
  }
}

// Output rows [r0, r1) of the flattened (n, r) rows.
template <typename T>
void Chunk(const T* x, const T* w, const Shape& s, int64_t r0, int64_t r1, T* y) {
  const int64_t row_size = s.wp * s.c;
  std::vector<T> buffer((s.kh + 1) * row_size, T(0));  // kh padded rows, then a zero row
  std::vector<const T*> rows(s.kh);
  const T* zeros = buffer.data() + s.kh * row_size;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / s.ho, top = r % s.ho * s.stride - s.pad_top;
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t yi = top + i;
      if (yi < 0 || yi >= s.h) {
        rows[i] = zeros;
        continue;
      }
      // columns [pad_left, pad_left + w) of the buffer row hold x's row (those the output
      // reads), the others zeros
      T* dst = buffer.data() + i * row_size;
      const int64_t count = std::min(s.w, s.wp - s.pad_left);
      std::memcpy(dst + s.pad_left * s.c, x + (n * s.h + yi) * s.w * s.c, count * s.c * sizeof(T));
      rows[i] = dst;
    }
    Row(rows.data(), w, s, y + r * s.wo * s.o);
  }
}

template <ffi::DataType DT>
ffi::Error Handler(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> w,
                   ffi::ResultBuffer<DT> y, int64_t pad_top, int64_t pad_left, int64_t stride) {
  using T = ffi::NativeType<DT>;
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  constexpr int64_t L = 64 / sizeof(T);
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || yd[0] != xd[0] ||
      wd[2] != xd[3] || yd[3] != wd[3] || yd[3] % L != 0 || pad_top < 0 || pad_left < 0 ||
      stride < 1 || (yd[2] - 1) * stride + wd[1] <= pad_left) {
    return ffi::Error::InvalidArgument("anodev2 conv_forward: inconsistent shapes");
  }
  const Shape s{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3],
                wd[0], wd[1], pad_top, pad_left, stride, (yd[2] - 1) * stride + wd[1]};
  const int64_t rows = s.n * s.ho, chunks = std::min<int64_t>(rows, 64);
  const T* xp = x.typed_data();
  const T* wp = w.typed_data();
  T* yp = y->typed_data();
  anodev2::RunChunks(pool, chunks, [=](int64_t k) {
    Chunk(xp, wp, s, rows * k / chunks, rows * (k + 1) / chunks, yp);
  });
  return ffi::Error::Success();
}

}  // namespace

ANODEV2_DEFINE_HANDLER(Anodev2ConvForwardF32, Handler, ffi::F32)
ANODEV2_DEFINE_HANDLER(Anodev2ConvForwardF64, Handler, ffi::F64)
