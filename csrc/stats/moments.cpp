// One-pass block moments and their merge into running statistics (see moments.h).
#include "moments.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "../cholesky/simd.h"

namespace ultraedit {
namespace stats {
namespace {

// Columns per tile: the tile's float64 shift and two sums (3 x 8 KiB) stay in the L1 cache
// while the rows of the block stream through it.
constexpr int64_t kTile = 1024;
// Below this many elements (64 MiB of float32) a block is merged on the calling thread: the
// pass is bound by memory bandwidth, and starting threads for it measured slower on the 2-core
// EPYC (1M elements: 0.04-0.4 ms on one thread, 0.6-2.0 ms on two).
constexpr int64_t kParallelMin = int64_t(1) << 24;

// s1[c] += Σ_r y, s2[c] += Σ_r y² over rows [r0, r1) of one tile, y = x - shift (float64).
// Four rows per sweep: the sums are loaded and stored once per four rows.
template <typename T>
UE_INLINE void accumulate(const T* __restrict x, int64_t ld, int64_t r0, int64_t r1, int64_t width,
                          const double* __restrict shift, double* __restrict s1,
                          double* __restrict s2) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const T* x0 = x + r * ld;
    const T* x1 = x0 + ld;
    const T* x2 = x1 + ld;
    const T* x3 = x2 + ld;
    for (int64_t c = 0; c < width; ++c) {
      const double y0 = double(x0[c]) - shift[c], y1 = double(x1[c]) - shift[c];
      const double y2 = double(x2[c]) - shift[c], y3 = double(x3[c]) - shift[c];
      s1[c] += (y0 + y1) + (y2 + y3);
      s2[c] += (y0 * y0 + y1 * y1) + (y2 * y2 + y3 * y3);
    }
  }
  for (; r < r1; ++r) {
    const T* xr = x + r * ld;
    for (int64_t c = 0; c < width; ++c) {
      const double y = double(xr[c]) - shift[c];
      s1[c] += y;
      s2[c] += y * y;
    }
  }
}

template <typename T>
UE_INLINE void merge_tile(const T* x, int64_t rows, int64_t width, int64_t ld, double count,
                          const double* mean, const double* m2, bool official, double* new_mean,
                          double* new_m2) {
  double shift[kTile], s1[kTile], s2[kTile];
  for (int64_t c = 0; c < width; ++c) {
    shift[c] = double(x[c]);
    s1[c] = 0.0;
    s2[c] = 0.0;
  }
  accumulate(x, ld, 1, rows, width, shift, s1, s2);   // row 0 adds y = 0 exactly
  const double b = double(rows), total = count + b, ratio = b / total, weight = count * ratio;
  const double unbias = rows > 1 ? b / (b - 1.0) : std::numeric_limits<double>::quiet_NaN();
  for (int64_t c = 0; c < width; ++c) {
    const double mean_y = s1[c] / b;
    double block_m2 = std::max(s2[c] - s1[c] * mean_y, 0.0);
    if (official) block_m2 *= unbias;
    const double delta = (shift[c] + mean_y) - mean[c];
    new_mean[c] = mean[c] + delta * ratio;
    new_m2[c] = m2[c] + block_m2 + delta * delta * weight;
  }
}

#define UE_DEFINE_MERGE(T, SUFFIX)                                                               \
  UE_CLONES void merge_tiles_##SUFFIX(const T* x, int64_t rows, int64_t cols, int64_t ld,       \
                                      double count, const double* mean, const double* m2,       \
                                      bool official, double* new_mean, double* new_m2,          \
                                      int64_t t0, int64_t t1) {                                 \
    for (int64_t t = t0; t < t1; ++t) {                                                          \
      const int64_t c0 = t * kTile, width = std::min(kTile, cols - c0);                         \
      merge_tile(x + c0, rows, width, ld, count, mean + c0, m2 + c0, official, new_mean + c0,   \
                 new_m2 + c0);                                                                   \
    }                                                                                            \
  }
UE_DEFINE_MERGE(float, f32)
UE_DEFINE_MERGE(double, f64)
#undef UE_DEFINE_MERGE

UE_INLINE void merge_tiles(const float* x, int64_t rows, int64_t cols, int64_t ld, double count,
                           const double* mean, const double* m2, bool official, double* new_mean,
                           double* new_m2, int64_t t0, int64_t t1) {
  merge_tiles_f32(x, rows, cols, ld, count, mean, m2, official, new_mean, new_m2, t0, t1);
}
UE_INLINE void merge_tiles(const double* x, int64_t rows, int64_t cols, int64_t ld, double count,
                           const double* mean, const double* m2, bool official, double* new_mean,
                           double* new_m2, int64_t t0, int64_t t1) {
  merge_tiles_f64(x, rows, cols, ld, count, mean, m2, official, new_mean, new_m2, t0, t1);
}

template <typename T>
void merge_block_impl(const T* x, int64_t rows, int64_t cols, int64_t ld, double count,
                      const double* mean, const double* m2, bool official, double* new_mean,
                      double* new_m2, const cholesky::ParallelFor& pfor) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t tiles = (cols + kTile - 1) / kTile;
  auto body = [&](int64_t t0, int64_t t1) {
    merge_tiles(x, rows, cols, ld, count, mean, m2, official, new_mean, new_m2, t0, t1);
  };
  if (rows * cols < kParallelMin || tiles < 2 || !pfor) {
    body(0, tiles);
  } else {
    pfor(0, tiles, 1, body);   // columns are independent: tiles split over the threads
  }
}

}  // namespace

void merge_block(const float* x, int64_t rows, int64_t cols, int64_t ld, double count,
                 const double* mean, const double* m2, bool official, double* new_mean,
                 double* new_m2, const cholesky::ParallelFor& pfor) {
  merge_block_impl(x, rows, cols, ld, count, mean, m2, official, new_mean, new_m2, pfor);
}

void merge_block(const double* x, int64_t rows, int64_t cols, int64_t ld, double count,
                 const double* mean, const double* m2, bool official, double* new_mean,
                 double* new_m2, const cholesky::ParallelFor& pfor) {
  merge_block_impl(x, rows, cols, ld, count, mean, m2, official, new_mean, new_m2, pfor);
}

}  // namespace stats
}  // namespace ultraedit
