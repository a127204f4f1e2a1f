// Portable SIMD helpers for the host Cholesky (GCC/Clang vector extensions, torch-free).
#pragma once

#include <cstdint>
#include <cstring>

// On x86-64 Linux with GCC, hot functions are compiled for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and the baseline; the dynamic loader picks the best for the running CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define UE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define UE_HAVE_CLONES 1
#else
#define UE_CLONES
#define UE_HAVE_CLONES 0
#endif
#define UE_INLINE inline __attribute__((always_inline))

namespace ultraedit {
namespace cholesky {
namespace simd {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int kWidth = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int kWidth = 8;
};

template <typename T>
UE_INLINE typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
UE_INLINE void store(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
UE_INLINE T hsum(typename Vec<T>::type v) {
  T s = T(0);
  for (int i = 0; i < Vec<T>::kWidth; ++i) s += v[i];
  return s;
}

// sum_p x[p] * y[p] for p < len (two vector accumulators, then a scalar tail).
template <typename T>
UE_INLINE T dot(const T* x, const T* y, int64_t len) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::kWidth;
  V acc0 = V{}, acc1 = V{};
  int64_t p = 0;
  for (; p + 2 * W <= len; p += 2 * W) {
    acc0 += load(x + p) * load(y + p);
    acc1 += load(x + p + W) * load(y + p + W);
  }
  for (; p + W <= len; p += W) acc0 += load(x + p) * load(y + p);
  T s = hsum<T>(acc0 + acc1);
  for (; p < len; ++p) s += x[p] * y[p];
  return s;
}

}  // namespace simd
}  // namespace cholesky
}  // namespace ultraedit
