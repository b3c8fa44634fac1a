// 3x3 stride-1 convolutions (NHWC x HWIO) by Winograd's F(4x4, 3x3), XLA FFI handlers for
// the CPU:
//
//   y[n, r, q, o] = sum_{i, j, c} x[n, r + i - pad_top, q + j - pad_left, c] w[i, j, c, o]
//
// (zero outside x). Each 4x4 tile of outputs is A^T [sum_c (G w G^T)[., ., c, o] .
// (B^T d B)[., ., c]] A, where d is the tile's 6x6 input patch and the 6x6 products run over
// the Toom-Cook points 0, 1, -1, 2, -1/2, inf: 36 multiply-adds per channel pair and tile
// instead of the direct 144. The tiles are split into chunks that the call's thread and
// XLA's intra-op pool share; per block of kTiles tiles, the patches are transformed, then
// each of the 36 points is one (tiles x C) @ (C x O) product in registers, then the output
// transform writes the tiles. Rounding: float32 results differ from the direct sum by a few
// 1e-6 of their magnitude; -1/2 rather than the usual -2 halves that (B's entries stay
// within 5/2, G's within 16/15), and the kernel gradient adds its float32 sums over 128 tiles
// into double partials. Needs C and O multiples of the vector length. Built by
// anodev2_jax/cpu/native.py.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPoints = 6;
constexpr int kTiles = 24;  // tiles per block: a multiple of PX = 24 / OV for OV = 1..4
constexpr double kBT[kPoints][kPoints] = {
    {1, 3. / 2, -2, -3. / 2, 1, 0},   {0, -1, -5. / 2, -1. / 2, 1, 0},
    {0, 1, 1. / 2, -5. / 2, 1, 0},    {0, -1. / 2, -1, 1. / 2, 1, 0},
    {0, 2, -1, -2, 1, 0},             {0, 1, 3. / 2, -2, -3. / 2, 1}};

// F(kOut x kOut, kTaps x kTaps) over the six points (kOut + kTaps - 1 = 6): G's row for a
// finite point p is f_p (1, p, p^2), A^T's column is (1, p, p^2, p^3). (oneDNN took over the
// 5x5 convolutions that F(2x2, 5x5) ran here: BENCHMARKS.md §1.)
struct F4x3 {
  static constexpr int kOut = 4, kTaps = 3;
  static constexpr double kG[kPoints][kTaps] = {
      {1, 0, 0},          {-1. / 3, -1. / 3, -1. / 3}, {1. / 3, -1. / 3, 1. / 3},
      {1. / 15, 2. / 15, 4. / 15}, {-16. / 15, 8. / 15, -4. / 15}, {0, 0, 1}};
  static constexpr double kAT[kOut][kPoints] = {{1, 1, 1, 1, 1, 0},
                                               {0, 1, -1, 2, -1. / 2, 0},
                                               {0, 1, 1, 4, 1. / 4, 0},
                                               {0, 1, -1, 8, -1. / 8, 1}};
};

struct Shape {
  int64_t n, h, w, c;  // x
  int64_t ho, wo, o;   // y
  int64_t pad_top, pad_left;
  int64_t th, tw;      // tiles along H and W
};

// U[p, c, o] = (G w G^T)[p / 6, p % 6, c, o] for the 36 points p.
template <typename F, typename T>
void TransformKernel(const T* w, const Shape& s, T* u) {
  const int64_t co = s.c * s.o;
  std::vector<T> half(kPoints * F::kTaps * co, T(0));  // (G w)[a, j, c, o]
  for (int a = 0; a < kPoints; ++a)
    for (int i = 0; i < F::kTaps; ++i) {
      const T g = T(F::kG[a][i]);
      if (g == T(0)) continue;
      for (int j = 0; j < F::kTaps; ++j) {
        T* dst = half.data() + (a * F::kTaps + j) * co;
        const T* src = w + (i * F::kTaps + j) * co;
        for (int64_t e = 0; e < co; ++e) dst[e] += g * src[e];
      }
    }
  std::fill(u, u + kPoints * kPoints * co, T(0));
  for (int a = 0; a < kPoints; ++a)
    for (int b = 0; b < kPoints; ++b)
      for (int j = 0; j < F::kTaps; ++j) {
        const T g = T(F::kG[b][j]);
        if (g == T(0)) continue;
        T* dst = u + (a * kPoints + b) * co;
        const T* src = half.data() + (a * F::kTaps + j) * co;
        for (int64_t e = 0; e < co; ++e) dst[e] += g * src[e];
      }
}

// v[p, t, c0 : c0 + lanes] = (B^T d B)[p] for the 6x6 patch d of tile `tile` (of the
// flattened (n, a, b)), one vector of channels, v holding `block` tiles per point; the
// products by B's constant entries unroll to adds and scalings.
template <typename F, typename T>
void TransformPatch(const T* x, const Shape& s, int64_t tile, int64_t t, int64_t c0,
                    int64_t block, T* v) {
  typedef T V __attribute__((vector_size(64)));
  const int64_t n = tile / (s.th * s.tw), a = tile / s.tw % s.th, b = tile % s.tw;
  const int64_t top = F::kOut * a - s.pad_top, left = F::kOut * b - s.pad_left;
  V d[kPoints][kPoints];
  for (int i = 0; i < kPoints; ++i)
    for (int j = 0; j < kPoints; ++j) {
      const int64_t yi = top + i, xj = left + j;
      if (yi < 0 || yi >= s.h || xj < 0 || xj >= s.w)
        d[i][j] = V{};
      else
        std::memcpy(&d[i][j], x + ((n * s.h + yi) * s.w + xj) * s.c + c0, sizeof(V));
    }
  V rows[kPoints][kPoints];  // (B^T d)[p, j]
#pragma GCC unroll 6
  for (int p = 0; p < kPoints; ++p)
#pragma GCC unroll 6
    for (int j = 0; j < kPoints; ++j) {
      V sum{};
#pragma GCC unroll 6
      for (int i = 0; i < kPoints; ++i)
        if (kBT[p][i] != 0) sum += T(kBT[p][i]) * d[i][j];
      rows[p][j] = sum;
    }
#pragma GCC unroll 6
  for (int p = 0; p < kPoints; ++p)
#pragma GCC unroll 6
    for (int q = 0; q < kPoints; ++q) {
      V sum{};
#pragma GCC unroll 6
      for (int j = 0; j < kPoints; ++j)
        if (kBT[q][j] != 0) sum += T(kBT[q][j]) * rows[p][j];
      std::memcpy(v + ((p * kPoints + q) * block + t) * s.c + c0, &sum, sizeof(V));
    }
}

// m[t0 + t, o0 : o0 + OV * lanes] = sum_c v[t0 + t, c] u[c, o0 : ...] for PX tiles, one point.
template <typename T, int PX, int OV>
inline void Product(const T* v, const T* u, const Shape& s, int64_t o0, T* m) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T);
  V acc[PX][OV];
  for (int p = 0; p < PX; ++p)
    for (int k = 0; k < OV; ++k) acc[p][k] = V{};
  for (int64_t c = 0; c < s.c; ++c) {
    V uv[OV];
    for (int k = 0; k < OV; ++k) std::memcpy(&uv[k], u + c * s.o + o0 + k * L, sizeof(V));
#pragma GCC unroll 24
    for (int p = 0; p < PX; ++p) {
      const T vs = v[p * s.c + c];
      for (int k = 0; k < OV; ++k) acc[p][k] += vs * uv[k];
    }
  }
#pragma GCC unroll 24
  for (int p = 0; p < PX; ++p)
    for (int k = 0; k < OV; ++k) std::memcpy(m + p * s.o + o0 + k * L, &acc[p][k], sizeof(V));
}

template <typename T, int OV>
void Products(const T* v, const T* u, const Shape& s, int64_t o0, T* m) {
  constexpr int PX = 24 / OV;  // accumulators that fit the 32 vector registers
  for (int64_t t = 0; t < kTiles; t += PX)
    Product<T, PX, OV>(v + t * s.c, u, s, o0, m + t * s.o);
}

// Writes tile `tile`'s outputs A^T m A from m[p, t, :], the block's products.
template <typename F, typename T>
void TransformOutput(const T* m, const Shape& s, int64_t tile, int64_t t, T* y) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T);
  const int64_t n = tile / (s.th * s.tw), a = tile / s.tw % s.th, b = tile % s.tw;
  for (int64_t o0 = 0; o0 < s.o; o0 += L) {
    V half[F::kOut][kPoints];  // (A^T m)[r, q]
#pragma GCC unroll 6
    for (int q = 0; q < kPoints; ++q) {
      V mv[kPoints];
      for (int p = 0; p < kPoints; ++p)
        std::memcpy(&mv[p], m + ((p * kPoints + q) * kTiles + t) * s.o + o0, sizeof(V));
#pragma GCC unroll 2
      for (int r = 0; r < F::kOut; ++r) {
        V sum{};
#pragma GCC unroll 6
        for (int p = 0; p < kPoints; ++p)
          if (F::kAT[r][p] != 0) sum += T(F::kAT[r][p]) * mv[p];
        half[r][q] = sum;
      }
    }
    for (int r = 0; r < F::kOut; ++r)
      for (int e = 0; e < F::kOut; ++e) {
        const int64_t yr = F::kOut * a + r, yc = F::kOut * b + e;
        if (yr >= s.ho || yc >= s.wo) continue;
        V sum{};
#pragma GCC unroll 6
        for (int q = 0; q < kPoints; ++q)
          if (F::kAT[e][q] != 0) sum += T(F::kAT[e][q]) * half[r][q];
        std::memcpy(y + ((n * s.ho + yr) * s.wo + yc) * s.o + o0, &sum, sizeof(V));
      }
  }
}

// Tiles [t0, t1) of the flattened (n, a, b) tiles, in blocks of kTiles (the last one padded
// with zero patches, whose outputs are not written).
template <typename F, typename T>
void Chunk(const T* x, const T* u, const Shape& s, int64_t t0, int64_t t1, T* y) {
  constexpr int64_t L = 64 / sizeof(T);
  const int64_t points = kPoints * kPoints;
  std::vector<T> v(points * kTiles * s.c), m(points * kTiles * s.o);
  for (int64_t block = t0; block < t1; block += kTiles) {
    const int64_t count = std::min<int64_t>(kTiles, t1 - block);
    if (count < kTiles) std::fill(v.begin(), v.end(), T(0));
    for (int64_t t = 0; t < count; ++t)
      for (int64_t c0 = 0; c0 < s.c; c0 += L)
        TransformPatch<F>(x, s, block + t, t, c0, kTiles, v.data());
    for (int64_t p = 0; p < points; ++p) {
      const T* vp = v.data() + p * kTiles * s.c;
      const T* up = u + p * s.c * s.o;
      T* mp = m.data() + p * kTiles * s.o;
      const int64_t vectors = s.o / L;
      int64_t k = 0;
      for (; k + 4 <= vectors; k += 4) Products<T, 4>(vp, up, s, k * L, mp);
      switch (vectors - k) {
        case 3:
          Products<T, 3>(vp, up, s, k * L, mp);
          break;
        case 2:
          Products<T, 2>(vp, up, s, k * L, mp);
          break;
        case 1:
          Products<T, 1>(vp, up, s, k * L, mp);
          break;
        default:
          break;
      }
    }
    for (int64_t t = 0; t < count; ++t) TransformOutput<F>(m.data(), s, block + t, t, y);
  }
}

// The shape of a convolution with kernel size `taps` from x's, the kernel's and the output's
// dimensions (the output's: y's, or g's for the kernel gradient); false if Winograd does not
// take it (kernel 3x3, stride 1, C_in a multiple of c_mult, C_out of the vector).
template <typename T>
bool MakeShape(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
               ffi::Span<const int64_t> yd, int64_t pad_top, int64_t pad_left, int64_t stride,
               int64_t c_mult, Shape& s) {
  constexpr int64_t L = 64 / sizeof(T);
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || yd[0] != xd[0] ||
      wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3] || yd[3] != wd[3] ||
      xd[3] % c_mult != 0 || yd[3] % L != 0 || pad_top < 0 || pad_left < 0 || stride != 1)
    return false;
  const int64_t out = F4x3::kOut;
  s = Shape{xd[0],    xd[1],    xd[2], xd[3], yd[1], yd[2], yd[3], pad_top,
            pad_left, (yd[1] + out - 1) / out, (yd[2] + out - 1) / out};
  return true;
}

template <typename F, typename T>
void Convolve(ffi::ThreadPool& pool, const T* xp, const T* w, const Shape& s, T* yp) {
  std::vector<T> u(kPoints * kPoints * s.c * s.o);
  TransformKernel<F>(w, s, u.data());
  const int64_t tiles = s.n * s.th * s.tw, blocks = (tiles + kTiles - 1) / kTiles;
  const int64_t chunks = std::min<int64_t>(blocks, 16);
  const T* up = u.data();
  anodev2::RunChunks(pool, chunks, [=](int64_t k) {
    const int64_t b0 = blocks * k / chunks, b1 = blocks * (k + 1) / chunks;
    Chunk<F>(xp, up, s, b0 * kTiles, std::min(b1 * kTiles, tiles), yp);
  });
}

template <ffi::DataType DT>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> w,
                   ffi::ResultBuffer<DT> y, int64_t pad_top, int64_t pad_left, int64_t stride) {
  using T = ffi::NativeType<DT>;
  Shape s;
  if (!MakeShape<T>(x.dimensions(), w.dimensions(), y->dimensions(), pad_top, pad_left, stride,
                    64 / sizeof(T), s))
    return ffi::Error::InvalidArgument("anodev2 winograd: inconsistent shapes");
  Convolve<F4x3, T>(
      pool, x.typed_data(), w.typed_data(), s, y->typed_data());
  return ffi::Error::Success();
}

// -- kernel gradient: dU[p, c, o] = sum over tiles of v[p, t, c] (A dY_t A^T)[p, o], then
// dw = G^T dU G --------------------------------------------------------------------------------

constexpr int kGradTiles = 32;  // tiles per block
constexpr int kFlush = 4;  // blocks summed in T before their sum is added to the double partial

// e[p, t, o0 : o0 + lanes] = (A dY A^T)[p] for tile `tile`'s kOut x kOut outputs dY of g (zero beyond
// the output), one vector of output channels.
template <typename F, typename T>
void TransformGradient(const T* g, const Shape& s, int64_t tile, int64_t t, int64_t o0, T* e) {
  typedef T V __attribute__((vector_size(64)));
  const int64_t n = tile / (s.th * s.tw), a = tile / s.tw % s.th, b = tile % s.tw;
  V dy[F::kOut][F::kOut];
  for (int r = 0; r < F::kOut; ++r)
    for (int q = 0; q < F::kOut; ++q) {
      const int64_t yr = F::kOut * a + r, yc = F::kOut * b + q;
      if (yr >= s.ho || yc >= s.wo)
        dy[r][q] = V{};
      else
        std::memcpy(&dy[r][q], g + ((n * s.ho + yr) * s.wo + yc) * s.o + o0, sizeof(V));
    }
  V half[kPoints][F::kOut];  // (A dY)[p, q]
#pragma GCC unroll 6
  for (int p = 0; p < kPoints; ++p)
    for (int q = 0; q < F::kOut; ++q) {
      V sum{};
      for (int r = 0; r < F::kOut; ++r)
        if (F::kAT[r][p] != 0) sum += T(F::kAT[r][p]) * dy[r][q];
      half[p][q] = sum;
    }
#pragma GCC unroll 6
  for (int p = 0; p < kPoints; ++p)
#pragma GCC unroll 6
    for (int u = 0; u < kPoints; ++u) {
      V sum{};
      for (int q = 0; q < F::kOut; ++q)
        if (F::kAT[q][u] != 0) sum += T(F::kAT[q][u]) * half[p][q];
      std::memcpy(e + ((p * kPoints + u) * kGradTiles + t) * s.o + o0, &sum, sizeof(V));
    }
}

// du[c0 + cb, o0 + k * lanes : ...] += the sum over the block's tiles t of v[t, c0 + cb] e[t, ...]:
// CB x OV accumulators in registers, one point.
template <typename T, int CB, int OV>
inline void Accumulate(const T* v, const T* e, const Shape& s, int64_t c0, int64_t o0, T* du) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T);
  V acc[CB][OV];
  for (int cb = 0; cb < CB; ++cb)
    for (int k = 0; k < OV; ++k) std::memcpy(&acc[cb][k], du + (c0 + cb) * s.o + o0 + k * L,
                                             sizeof(V));
  for (int t = 0; t < kGradTiles; ++t) {
    V ev[OV];
    for (int k = 0; k < OV; ++k) std::memcpy(&ev[k], e + t * s.o + o0 + k * L, sizeof(V));
    for (int cb = 0; cb < CB; ++cb) {
      const T vs = v[t * s.c + c0 + cb];
      for (int k = 0; k < OV; ++k) acc[cb][k] += vs * ev[k];
    }
  }
  for (int cb = 0; cb < CB; ++cb)
    for (int k = 0; k < OV; ++k) std::memcpy(du + (c0 + cb) * s.o + o0 + k * L, &acc[cb][k],
                                             sizeof(V));
}

// All (c, o) of one point in CB = 16 / OV channel blocks (C is a multiple of 16 here).
template <typename T, int OV>
void AccumulatePoint(const T* v, const T* e, const Shape& s, int64_t o0, T* du) {
  constexpr int CB = 16 / OV;
  for (int64_t c0 = 0; c0 < s.c; c0 += CB) Accumulate<T, CB, OV>(v, e, s, c0, o0, du);
}

// Adds the tiles [t0, t1)'s share of dU (36, C, O) to du.
template <typename F, typename T>
void GradChunk(const T* x, const T* g, const Shape& s, int64_t t0, int64_t t1, double* du) {
  constexpr int64_t L = 64 / sizeof(T);
  const int64_t points = kPoints * kPoints, vectors = s.o / L;
  std::vector<T> v(points * kGradTiles * s.c), e(points * kGradTiles * s.o);
  std::vector<T> sums(points * s.c * s.o, T(0));  // of the last kFlush blocks, then into du
  int64_t blocks = 0;
  for (int64_t block = t0; block < t1; block += kGradTiles) {
    const int64_t count = std::min<int64_t>(kGradTiles, t1 - block);
    if (count < kGradTiles) {  // the rest of the block: zero patches and gradients
      std::fill(v.begin(), v.end(), T(0));
      std::fill(e.begin(), e.end(), T(0));
    }
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t c0 = 0; c0 < s.c; c0 += L)
        TransformPatch<F>(x, s, block + t, t, c0, kGradTiles, v.data());
      for (int64_t o0 = 0; o0 < s.o; o0 += L) TransformGradient<F>(g, s, block + t, t, o0, e.data());
    }
    for (int64_t p = 0; p < points; ++p) {
      const T* vp = v.data() + p * kGradTiles * s.c;
      const T* ep = e.data() + p * kGradTiles * s.o;
      T* dup = sums.data() + p * s.c * s.o;
      int64_t k = 0;
      for (; k + 4 <= vectors; k += 4) AccumulatePoint<T, 4>(vp, ep, s, k * L, dup);
      switch (vectors - k) {
        case 3:  // CB = 16 / 3 would not divide C: blocks of 1 and 2 vectors
          AccumulatePoint<T, 1>(vp, ep, s, k * L, dup);
          AccumulatePoint<T, 2>(vp, ep, s, (k + 1) * L, dup);
          break;
        case 2:
          AccumulatePoint<T, 2>(vp, ep, s, k * L, dup);
          break;
        case 1:
          AccumulatePoint<T, 1>(vp, ep, s, k * L, dup);
          break;
        default:
          break;
      }
    }
    if (++blocks % kFlush == 0 || block + kGradTiles >= t1) {
      for (size_t i = 0; i < sums.size(); ++i) du[i] += sums[i];
      std::fill(sums.begin(), sums.end(), T(0));
    }
  }
}

template <typename F, typename T>
void GradKernel(ffi::ThreadPool& pool, const T* xp, const T* gp, const Shape& s, T* dw) {
  const int64_t tiles = s.n * s.th * s.tw, size = kPoints * kPoints * s.c * s.o;
  const int64_t blocks = (tiles + kGradTiles - 1) / kGradTiles;
  const int64_t chunks = std::min<int64_t>(blocks, 4);  // few: each has a double partial
  std::vector<double> partials(chunks * size, 0.0);
  double* pp = partials.data();
  anodev2::RunChunks(pool, chunks, [=](int64_t k) {
    const int64_t b0 = blocks * k / chunks, b1 = blocks * (k + 1) / chunks;
    GradChunk<F>(xp, gp, s, b0 * kGradTiles, std::min(b1 * kGradTiles, tiles), pp + k * size);
  });
  for (int64_t k = 1; k < chunks; ++k)  // in chunk order: deterministic
    for (int64_t i = 0; i < size; ++i) pp[i] += pp[k * size + i];
  // dw[i, j] = sum_{a, b} G[a, i] G[b, j] dU[a, b], in double
  const int64_t co = s.c * s.o;
  std::vector<double> half(F::kTaps * kPoints * co, 0.0), full(F::kTaps * F::kTaps * co, 0.0);
  for (int i = 0; i < F::kTaps; ++i)
    for (int a = 0; a < kPoints; ++a) {
      if (F::kG[a][i] == 0) continue;
      for (int b = 0; b < kPoints; ++b) {
        double* dst = half.data() + (i * kPoints + b) * co;
        const double* src = pp + (a * kPoints + b) * co;
        for (int64_t e = 0; e < co; ++e) dst[e] += F::kG[a][i] * src[e];
      }
    }
  for (int i = 0; i < F::kTaps; ++i)
    for (int j = 0; j < F::kTaps; ++j)
      for (int b = 0; b < kPoints; ++b) {
        if (F::kG[b][j] == 0) continue;
        double* dst = full.data() + (i * F::kTaps + j) * co;
        const double* src = half.data() + (i * kPoints + b) * co;
        for (int64_t e = 0; e < co; ++e) dst[e] += F::kG[b][j] * src[e];
      }
  std::copy(full.begin(), full.end(), dw);  // rounded to T
}

template <ffi::DataType DT>
ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> g,
                      ffi::ResultBuffer<DT> dw, int64_t pad_top, int64_t pad_left,
                      int64_t stride) {
  using T = ffi::NativeType<DT>;
  Shape s;
  if (!MakeShape<T>(x.dimensions(), dw->dimensions(), g.dimensions(), pad_top, pad_left,
                    stride, 16, s))
    return ffi::Error::InvalidArgument("anodev2 winograd kernel_grad: inconsistent shapes");
  GradKernel<F4x3, T>(
      pool, x.typed_data(), g.typed_data(), s, dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

ANODEV2_DEFINE_HANDLER(Anodev2WinogradF32, Forward, ffi::F32)
ANODEV2_DEFINE_HANDLER(Anodev2WinogradF64, Forward, ffi::F64)
ANODEV2_DEFINE_HANDLER(Anodev2WinogradKernelGradF32, KernelGrad, ffi::F32)
ANODEV2_DEFINE_HANDLER(Anodev2WinogradKernelGradF64, KernelGrad, ffi::F64)
