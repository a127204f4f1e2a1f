// The largest magnitude of an array in one vectorized pass (see abs_max.h).
#include "abs_max.h"

#include <limits>

#include "../cholesky/simd.h"

namespace ultraedit {
namespace checks {
namespace {

namespace simd = cholesky::simd;

// Two independent maxima (a comparison's latency would serialize one) and a running
// x * 0 sum, which turns NaN as soon as one value is NaN or infinite: the max alone would
// skip a NaN, because NaN compares false.
template <typename T>
UE_INLINE double abs_max_impl(const T* x, int64_t n) {
  typedef typename simd::Vec<T>::type V;
  constexpr int W = simd::Vec<T>::kWidth;
  V m0 = V{}, m1 = V{}, probe = V{};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V a = simd::load(x + i), b = simd::load(x + i + W);
    const V aa = a < 0 ? -a : a, bb = b < 0 ? -b : b;
    m0 = aa > m0 ? aa : m0;
    m1 = bb > m1 ? bb : m1;
    probe += a * T(0) + b * T(0);
  }
  m0 = m1 > m0 ? m1 : m0;
  T best = T(0), zero = T(0);
  for (int j = 0; j < W; ++j) {
    best = m0[j] > best ? m0[j] : best;
    zero += probe[j];
  }
  for (; i < n; ++i) {
    const T v = x[i] < 0 ? -x[i] : x[i];
    best = v > best ? v : best;
    zero += x[i] * T(0);
  }
  return zero == T(0) ? double(best) : std::numeric_limits<double>::quiet_NaN();
}

UE_CLONES double abs_max_f32(const float* x, int64_t n) { return abs_max_impl(x, n); }
UE_CLONES double abs_max_f64(const double* x, int64_t n) { return abs_max_impl(x, n); }

}  // namespace

double abs_max(const float* x, int64_t n) { return abs_max_f32(x, n); }
double abs_max(const double* x, int64_t n) { return abs_max_f64(x, n); }

}  // namespace checks
}  // namespace ultraedit
