// Blocked Cholesky factorization and triangular solves on the host (torch-free); see host.h.
//
// Factorization (left-looking, LAPACK potrf "lower" order), block column j of width jb:
//   A[j:n, j:j+jb] -= A[j:n, 0:j] A[j:j+jb, 0:j]ᵀ      one GEMM (diagonal block + panel)
//   L_jj = chol(A[j:j+jb, j:j+jb])                      unblocked, reports the info code
//   A[j+jb:n, j:j+jb] := A[j+jb:n, j:j+jb] L_jj⁻ᵀ        row-wise substitution, rows in parallel
// Forward solve L Y = B (left-looking):    Y_j -= L[j, 0:j] Y[0:j]   (GEMM), Y_j := L_jj⁻¹ Y_j
// Backward solve Lᵀ X = Y (left-looking):  X_j -= L[j+1:, j]ᵀ X[j+1:] (GEMM), X_j := L_jj⁻ᵀ X_j
// The diagonal-block substitutions run over 4-vector-wide column tiles of B (kept in
// registers across the inner loop), tiles in parallel.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "host.h"
#include "simd.h"

namespace ultraedit {
namespace cholesky {
namespace {

using simd::load;
using simd::store;

// Unblocked Cholesky of the jb x jb block at `a`; returns 0 or the 1-based failing order.
template <typename T>
UE_INLINE int32_t potf2_impl(T* a, int64_t jb, int64_t lda) {
  for (int64_t i = 0; i < jb; ++i) {
    T* ri = a + i * lda;
    for (int64_t c = 0; c < i; ++c) {
      const T* rc = a + c * lda;
      ri[c] = (ri[c] - simd::dot(ri, rc, c)) / rc[c];
    }
    const T d = ri[i] - simd::dot(ri, ri, i);
    if (!(d > T(0))) return static_cast<int32_t>(i + 1);  // also catches NaN
    ri[i] = std::sqrt(d);
  }
  return 0;
}

// Rows [r0, r1) of the panel P (rows of length jb at `p`, stride ld): P := P L⁻ᵀ.
template <typename T>
UE_INLINE void trsm_rows_impl(const T* l, int64_t jb, int64_t ldl, T* p, int64_t ld,
                              int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* x = p + r * ld;
    for (int64_t c = 0; c < jb; ++c) {
      const T* lc = l + c * ldl;
      x[c] = (x[c] - simd::dot(x, lc, c)) / lc[c];
    }
  }
}

// Columns [c0, c1) of the jb x k block B (stride ldb): B := L⁻¹ B (forward) or L⁻ᵀ B.
template <typename T, bool kForward>
UE_INLINE void diag_solve_impl(const T* l, int64_t jb, int64_t ldl, T* b, int64_t ldb,
                               int64_t c0, int64_t c1) {
  typedef typename simd::Vec<T>::type V;
  constexpr int W = simd::Vec<T>::kWidth;
  constexpr int64_t kTile = 4 * W;
  // Each full tile is copied to a contiguous buffer first: rows of B are ldb apart (often a
  // multiple of 4 KiB), which would make every row of the tile collide in the same L1 sets.
  std::vector<T> buf(static_cast<size_t>(jb * kTile));
  int64_t cc = c0;
  for (; cc + kTile <= c1; cc += kTile) {
    T* t = buf.data();
    for (int64_t r = 0; r < jb; ++r) std::memcpy(t + r * kTile, b + r * ldb + cc, sizeof(T) * kTile);
    for (int64_t s = 0; s < jb; ++s) {
      const int64_t i = kForward ? s : jb - 1 - s;
      T* bi = t + i * kTile;
      V a0 = load(bi), a1 = load(bi + W), a2 = load(bi + 2 * W), a3 = load(bi + 3 * W);
      const int64_t p0 = kForward ? 0 : i + 1, p1 = kForward ? i : jb;
      for (int64_t p = p0; p < p1; ++p) {
        const T lip = kForward ? l[i * ldl + p] : l[p * ldl + i];
        const T* bp = t + p * kTile;
        a0 -= lip * load(bp);
        a1 -= lip * load(bp + W);
        a2 -= lip * load(bp + 2 * W);
        a3 -= lip * load(bp + 3 * W);
      }
      const T d = l[i * ldl + i];
      store(bi, a0 / d);
      store(bi + W, a1 / d);
      store(bi + 2 * W, a2 / d);
      store(bi + 3 * W, a3 / d);
    }
    for (int64_t r = 0; r < jb; ++r) std::memcpy(b + r * ldb + cc, t + r * kTile, sizeof(T) * kTile);
  }
  if (cc < c1) {  // remaining columns: scalar tile
    for (int64_t s = 0; s < jb; ++s) {
      const int64_t i = kForward ? s : jb - 1 - s;
      const int64_t p0 = kForward ? 0 : i + 1, p1 = kForward ? i : jb;
      T* bi = b + i * ldb;
      for (int64_t p = p0; p < p1; ++p) {
        const T lip = kForward ? l[i * ldl + p] : l[p * ldl + i];
        const T* bp = b + p * ldb;
        for (int64_t c = cc; c < c1; ++c) bi[c] -= lip * bp[c];
      }
      const T d = l[i * ldl + i];
      for (int64_t c = cc; c < c1; ++c) bi[c] /= d;
    }
  }
}

#define UE_DEFINE_KERNELS(T, SUFFIX)                                                          \
  UE_CLONES int32_t potf2_##SUFFIX(T* a, int64_t jb, int64_t lda) {                          \
    return potf2_impl<T>(a, jb, lda);                                                         \
  }                                                                                           \
  UE_CLONES void trsm_rows_##SUFFIX(const T* l, int64_t jb, int64_t ldl, T* p, int64_t ld,   \
                                    int64_t r0, int64_t r1) {                                 \
    trsm_rows_impl<T>(l, jb, ldl, p, ld, r0, r1);                                             \
  }                                                                                           \
  UE_CLONES void diag_fwd_##SUFFIX(const T* l, int64_t jb, int64_t ldl, T* b, int64_t ldb,   \
                                   int64_t c0, int64_t c1) {                                  \
    diag_solve_impl<T, true>(l, jb, ldl, b, ldb, c0, c1);                                     \
  }                                                                                           \
  UE_CLONES void diag_bwd_##SUFFIX(const T* l, int64_t jb, int64_t ldl, T* b, int64_t ldb,   \
                                   int64_t c0, int64_t c1) {                                  \
    diag_solve_impl<T, false>(l, jb, ldl, b, ldb, c0, c1);                                    \
  }

UE_DEFINE_KERNELS(float, f32)
UE_DEFINE_KERNELS(double, f64)
#undef UE_DEFINE_KERNELS

// Overloads so the templates below can call the cloned kernels by element type.
inline const GemmFn<float>& pick_gemm(const HostContext& ctx, const float*) { return ctx.sgemm; }
inline const GemmFn<double>& pick_gemm(const HostContext& ctx, const double*) {
  return ctx.dgemm;
}

inline int32_t potf2(float* a, int64_t jb, int64_t lda) { return potf2_f32(a, jb, lda); }
inline int32_t potf2(double* a, int64_t jb, int64_t lda) { return potf2_f64(a, jb, lda); }
inline void trsm_rows(const float* l, int64_t jb, int64_t ldl, float* p, int64_t ld, int64_t r0,
                      int64_t r1) {
  trsm_rows_f32(l, jb, ldl, p, ld, r0, r1);
}
inline void trsm_rows(const double* l, int64_t jb, int64_t ldl, double* p, int64_t ld,
                      int64_t r0, int64_t r1) {
  trsm_rows_f64(l, jb, ldl, p, ld, r0, r1);
}
inline void diag_solve(bool fwd, const float* l, int64_t jb, int64_t ldl, float* b, int64_t ldb,
                       int64_t c0, int64_t c1) {
  fwd ? diag_fwd_f32(l, jb, ldl, b, ldb, c0, c1) : diag_bwd_f32(l, jb, ldl, b, ldb, c0, c1);
}
inline void diag_solve(bool fwd, const double* l, int64_t jb, int64_t ldl, double* b,
                       int64_t ldb, int64_t c0, int64_t c1) {
  fwd ? diag_fwd_f64(l, jb, ldl, b, ldb, c0, c1) : diag_bwd_f64(l, jb, ldl, b, ldb, c0, c1);
}

constexpr int64_t kColTile = 64;  // columns of B per parallel unit in the diagonal solves

template <typename T>
void diag_solve_parallel(bool fwd, const T* l, int64_t jb, int64_t ldl, T* b, int64_t k,
                         int64_t ldb, const HostContext& ctx) {
  const int64_t units = (k + kColTile - 1) / kColTile;
  auto body = [&](int64_t lo, int64_t hi) {
    diag_solve(fwd, l, jb, ldl, b, ldb, lo * kColTile, std::min(k, hi * kColTile));
  };
  if (units <= 1 || jb * jb * k < (int64_t(1) << 16)) {
    body(0, units);
  } else {
    ctx.parallel_for(0, units, 1, body);
  }
}

}  // namespace

void serial_for(int64_t begin, int64_t end, int64_t /*grain*/,
                const std::function<void(int64_t, int64_t)>& body) {
  if (begin < end) body(begin, end);
}

ParallelFor thread_pool_for(int threads) {
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  return [threads](int64_t begin, int64_t end, int64_t grain,
                   const std::function<void(int64_t, int64_t)>& body) {
    const int64_t total = end - begin;
    if (total <= 0) return;
    grain = std::max<int64_t>(1, grain);
    const int64_t parts = std::min<int64_t>(threads, (total + grain - 1) / grain);
    if (parts <= 1) {
      body(begin, end);
      return;
    }
    const int64_t step = (total + parts - 1) / parts;
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < parts; ++t) {
      const int64_t lo = begin + t * step, hi = std::min(end, lo + step);
      if (lo < hi) pool.emplace_back([&body, lo, hi] { body(lo, hi); });
    }
    body(begin, std::min(end, begin + step));
    for (auto& th : pool) th.join();
  };
}

HostContext native_context(ParallelFor pfor, int64_t block) {
  HostContext ctx;
  ctx.parallel_for = pfor ? std::move(pfor) : thread_pool_for();
  ParallelFor pf = ctx.parallel_for;
  ctx.sgemm = [pf](bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                   const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                   int64_t ldc) { gemm_native(pf, ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc); };
  ctx.dgemm = [pf](bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                   const double* a, int64_t lda, const double* b, int64_t ldb, double* c,
                   int64_t ldc) { gemm_native(pf, ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc); };
  ctx.block = block;
  return ctx;
}

template <typename T>
int32_t factor_lower(T* a, int64_t n, int64_t lda, const HostContext& ctx) {
  const GemmFn<T>& gemm = pick_gemm(ctx, a);
  const int64_t nb = std::max<int64_t>(1, ctx.block);
  for (int64_t j = 0; j < n; j += nb) {
    const int64_t jb = std::min(nb, n - j);
    T* ajj = a + j * lda + j;
    if (j > 0) gemm(false, true, n - j, jb, j, T(-1), a + j * lda, lda, a + j * lda, lda, ajj, lda);
    const int32_t info = potf2(ajj, jb, lda);
    if (info != 0) return static_cast<int32_t>(j) + info;
    const int64_t m = n - j - jb;
    if (m > 0) {
      T* panel = a + (j + jb) * lda + j;
      auto body = [&](int64_t lo, int64_t hi) { trsm_rows(ajj, jb, lda, panel, lda, lo, hi); };
      if (m * jb * jb < (int64_t(1) << 16)) {
        body(0, m);
      } else {
        ctx.parallel_for(0, m, 16, body);
      }
    }
  }
  return 0;
}

template <typename T>
void solve_lower(const T* l, int64_t n, int64_t ldl, T* b, int64_t k, int64_t ldb,
                 const HostContext& ctx) {
  const GemmFn<T>& gemm = pick_gemm(ctx, l);
  const int64_t nb = std::max<int64_t>(1, ctx.block);
  for (int64_t j = 0; j < n; j += nb) {  // L Y = B
    const int64_t jb = std::min(nb, n - j);
    if (j > 0) gemm(false, false, jb, k, j, T(-1), l + j * ldl, ldl, b, ldb, b + j * ldb, ldb);
    diag_solve_parallel(true, l + j * ldl + j, jb, ldl, b + j * ldb, k, ldb, ctx);
  }
  const int64_t last = ((n - 1) / nb) * nb;
  for (int64_t j = last; j >= 0; j -= nb) {  // Lᵀ X = Y
    const int64_t jb = std::min(nb, n - j), m = n - j - jb;
    if (m > 0) {
      gemm(true, false, jb, k, m, T(-1), l + (j + jb) * ldl + j, ldl, b + (j + jb) * ldb, ldb,
           b + j * ldb, ldb);
    }
    diag_solve_parallel(false, l + j * ldl + j, jb, ldl, b + j * ldb, k, ldb, ctx);
  }
}

template <typename T>
void spd_solve_batched(int64_t batch, int64_t n, T* a, int64_t stride_a, T* b, int64_t k,
                       int64_t stride_b, int32_t* info, const HostContext& ctx) {
  auto one = [&](int64_t s, const HostContext& c) {
    T* as = a + s * stride_a;
    T* bs = b + s * stride_b;
    info[s] = n > 0 ? factor_lower(as, n, n, c) : 0;
    if (info[s] == 0) {
      if (n > 0 && k > 0) solve_lower(as, n, n, bs, k, k, c);
    } else {
      std::fill(bs, bs + n * k, std::numeric_limits<T>::quiet_NaN());
    }
  };
  // Small systems: one system per worker, everything inside it serial.
  const bool per_system = batch > 1 && n <= 2 * ctx.block && n * n * (n + 3 * k) < (int64_t(1) << 27);
  if (per_system) {
    const HostContext serial = native_context(serial_for, ctx.block);
    ctx.parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; ++s) one(s, serial);
    });
  } else {
    for (int64_t s = 0; s < batch; ++s) one(s, ctx);
  }
}

#define UE_INSTANTIATE(T)                                                                       \
  template int32_t factor_lower<T>(T*, int64_t, int64_t, const HostContext&);                   \
  template void solve_lower<T>(const T*, int64_t, int64_t, T*, int64_t, int64_t,                \
                               const HostContext&);                                             \
  template void spd_solve_batched<T>(int64_t, int64_t, T*, int64_t, T*, int64_t, int64_t,       \
                                     int32_t*, const HostContext&);
UE_INSTANTIATE(float)
UE_INSTANTIATE(double)
#undef UE_INSTANTIATE

}  // namespace cholesky
}  // namespace ultraedit
