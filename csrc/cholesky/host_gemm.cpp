// Built-in packed GEMM for the host Cholesky (torch-free): C += alpha op(A) op(B), row-major.
//
// BLIS-style: B is packed in KC x NR slivers, A in MR x KC slivers, and an MR x NR register
// micro-kernel (GCC vector extensions, 64-byte vectors) accumulates them.  On x86-64 with GCC
// the serial kernels are compiled three times (x86-64-v4 = AVX-512, v3 = AVX2+FMA, baseline)
// and the loader picks one for the running CPU (target_clones); elsewhere the baseline build
// is used.  Compile with -ffp-contract=fast so the multiply-adds become FMAs.
#include <algorithm>
#include <cstring>
#include <vector>

#include "host.h"
#include "simd.h"


namespace ultraedit {
namespace cholesky {
namespace {

template <typename T>
struct Vec {
  typedef typename simd::Vec<T>::type type;
  static constexpr int kNR = simd::Vec<T>::kWidth;
};

constexpr int kMR = 6;
constexpr int64_t kKC = 256;
constexpr int64_t kMC = 96;    // multiple of kMR; kMC x kKC of A stays in L2
constexpr int64_t kNC = 1024;  // kKC x kNC of B

template <typename T>
UE_INLINE void pack_a(bool ta, const T* a, int64_t lda, int64_t i0, int64_t mc, int64_t p0,
                      int64_t kc, T* dst) {
  for (int64_t s = 0; s < mc; s += kMR) {
    const int64_t rows = std::min<int64_t>(kMR, mc - s);
    for (int64_t p = 0; p < kc; ++p) {
      T* d = dst + (s * kc) + p * kMR;
      int r = 0;
      for (; r < rows; ++r) {
        const int64_t i = i0 + s + r, q = p0 + p;
        d[r] = ta ? a[q * lda + i] : a[i * lda + q];
      }
      for (; r < kMR; ++r) d[r] = T(0);
    }
  }
}

template <typename T>
UE_INLINE void pack_b(bool tb, const T* b, int64_t ldb, int64_t p0, int64_t kc, int64_t j0,
                      int64_t nc, T* dst) {
  constexpr int NR = Vec<T>::kNR;
  for (int64_t s = 0; s < nc; s += NR) {
    const int64_t cols = std::min<int64_t>(NR, nc - s);
    for (int64_t p = 0; p < kc; ++p) {
      T* d = dst + s * kc + p * NR;
      const int64_t q = p0 + p;
      if (!tb && cols == NR) {
        std::memcpy(d, b + q * ldb + j0 + s, sizeof(T) * NR);
        continue;
      }
      int64_t c = 0;
      for (; c < cols; ++c) {
        const int64_t j = j0 + s + c;
        d[c] = tb ? b[j * ldb + q] : b[q * ldb + j];
      }
      for (; c < NR; ++c) d[c] = T(0);
    }
  }
}

template <typename T>
UE_INLINE void micro_kernel(int64_t kc, const T* __restrict__ ap, const T* __restrict__ bp,
                            T* __restrict__ c, int64_t ldc, T alpha, int64_t mr, int64_t nr) {
  typedef typename Vec<T>::type V;
  constexpr int NR = Vec<T>::kNR;
  V acc[kMR];
  for (int r = 0; r < kMR; ++r) acc[r] = V{};
  for (int64_t p = 0; p < kc; ++p) {
    V bv;
    std::memcpy(&bv, bp + p * NR, sizeof(V));
    const T* av = ap + p * kMR;
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) acc[r] += av[r] * bv;
  }
  if (mr == kMR && nr == NR) {
    for (int r = 0; r < kMR; ++r) {
      V cv;
      std::memcpy(&cv, c + r * ldc, sizeof(V));
      cv += alpha * acc[r];
      std::memcpy(c + r * ldc, &cv, sizeof(V));
    }
  } else {
    for (int64_t r = 0; r < mr; ++r)
      for (int64_t j = 0; j < nr; ++j) c[r * ldc + j] += alpha * acc[r][j];
  }
}

template <typename T>
UE_INLINE void gemm_serial(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha,
                           const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
                           T* abuf, T* bbuf) {
  constexpr int NR = Vec<T>::kNR;
  for (int64_t jc = 0; jc < n; jc += kNC) {
    const int64_t nc = std::min(kNC, n - jc);
    for (int64_t pc = 0; pc < k; pc += kKC) {
      const int64_t kc = std::min(kKC, k - pc);
      pack_b(tb, b, ldb, pc, kc, jc, nc, bbuf);
      for (int64_t ic = 0; ic < m; ic += kMC) {
        const int64_t mc = std::min(kMC, m - ic);
        pack_a(ta, a, lda, ic, mc, pc, kc, abuf);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          for (int64_t ir = 0; ir < mc; ir += kMR) {
            micro_kernel<T>(kc, abuf + ir * kc, bbuf + jr * kc,
                            c + (ic + ir) * ldc + jc + jr, ldc, alpha,
                            std::min<int64_t>(kMR, mc - ir), std::min<int64_t>(NR, nc - jr));
          }
        }
      }
    }
  }
}

UE_CLONES void gemm_serial_f32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                               const float* a, int64_t lda, const float* b, int64_t ldb,
                               float* c, int64_t ldc, float* abuf, float* bbuf) {
  gemm_serial<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, abuf, bbuf);
}

UE_CLONES void gemm_serial_f64(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                               const double* a, int64_t lda, const double* b, int64_t ldb,
                               double* c, int64_t ldc, double* abuf, double* bbuf) {
  gemm_serial<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, abuf, bbuf);
}

inline void gemm_serial_any(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                            const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                            int64_t ldc, float* abuf, float* bbuf) {
  gemm_serial_f32(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, abuf, bbuf);
}
inline void gemm_serial_any(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                            const double* a, int64_t lda, const double* b, int64_t ldb,
                            double* c, int64_t ldc, double* abuf, double* bbuf) {
  gemm_serial_f64(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, abuf, bbuf);
}

// The micro-tiles of rows [ic, ic + mc) x columns [jc, jc + nc) of C that touch the diagonal or
// lie below it, from a packed block of A (abuf) and a packed panel of B (bp), both kc deep.
template <typename T>
UE_INLINE void lower_tiles(int64_t kc, const T* abuf, const T* bp, int64_t ic, int64_t mc,
                           int64_t jc, int64_t nc, T* c, int64_t ldc) {
  constexpr int NR = Vec<T>::kNR;
  for (int64_t ir = 0; ir < mc; ir += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, mc - ir);
    const int64_t last_col = ic + ir + mr - 1;  // the diagonal of this strip's last row
    for (int64_t jr = 0; jr < nc && jc + jr <= last_col; jr += NR) {
      micro_kernel<T>(kc, abuf + ir * kc, bp + jr * kc, c + (ic + ir) * ldc + jc + jr, ldc, T(1),
                      mr, std::min<int64_t>(NR, nc - jr));
    }
  }
}

// The rows [i0, i1) of the lower triangle of C = op(A) op(B) where op(B) = op(A)ᵀ (op(A):
// m x k, Aᵀ if ta; op(B): k x m, Bᵀ if tb; the caller passes the same matrix twice or A and
// its transpose, so that both operands pack from contiguous rows): C[i0:i1, 0:i1] +=
// op(A)[i0:i1] op(B)[:, 0:i1], skipping every micro-tile that lies wholly above the diagonal (a
// diagonal tile is computed whole; its upper part is left to the caller).
template <typename T>
UE_INLINE void syrk_rows_serial(bool ta, const T* a, int64_t lda, bool tb, const T* b,
                                int64_t ldb, int64_t i0, int64_t i1, int64_t k, T* c,
                                int64_t ldc, T* abuf, T* bbuf) {
  for (int64_t jc = 0; jc < i1; jc += kNC) {
    const int64_t nc = std::min(kNC, i1 - jc);
    for (int64_t pc = 0; pc < k; pc += kKC) {
      const int64_t kc = std::min(kKC, k - pc);
      pack_b(tb, b, ldb, pc, kc, jc, nc, bbuf);
      for (int64_t ic = i0; ic < i1; ic += kMC) {
        const int64_t mc = std::min(kMC, i1 - ic);
        if (jc > ic + mc - 1) continue;  // this block of rows lies wholly left of the panel
        pack_a(ta, a, lda, ic, mc, pc, kc, abuf);
        lower_tiles<T>(kc, abuf, bbuf, ic, mc, jc, nc, c, ldc);
      }
    }
  }
}

UE_CLONES void syrk_rows_f32(bool ta, const float* a, int64_t lda, bool tb, const float* b,
                             int64_t ldb, int64_t i0, int64_t i1, int64_t k, float* c,
                             int64_t ldc, float* abuf, float* bbuf) {
  syrk_rows_serial<float>(ta, a, lda, tb, b, ldb, i0, i1, k, c, ldc, abuf, bbuf);
}

UE_CLONES void syrk_rows_f64(bool ta, const double* a, int64_t lda, bool tb, const double* b,
                             int64_t ldb, int64_t i0, int64_t i1, int64_t k, double* c,
                             int64_t ldc, double* abuf, double* bbuf) {
  syrk_rows_serial<double>(ta, a, lda, tb, b, ldb, i0, i1, k, c, ldc, abuf, bbuf);
}

inline void syrk_rows_any(bool ta, const float* a, int64_t lda, bool tb, const float* b,
                          int64_t ldb, int64_t i0, int64_t i1, int64_t k, float* c, int64_t ldc,
                          float* abuf, float* bbuf) {
  syrk_rows_f32(ta, a, lda, tb, b, ldb, i0, i1, k, c, ldc, abuf, bbuf);
}
inline void syrk_rows_any(bool ta, const double* a, int64_t lda, bool tb, const double* b,
                          int64_t ldb, int64_t i0, int64_t i1, int64_t k, double* c,
                          int64_t ldc, double* abuf, double* bbuf) {
  syrk_rows_f64(ta, a, lda, tb, b, ldb, i0, i1, k, c, ldc, abuf, bbuf);
}

// The row blocks u in [u_lo, u_hi) (rows block_of(u) * kMC ... of kMC each, in the order of
// `order`: blocks[u]) of the same lower triangle against a B packed whole beforehand (`bpack`:
// the panels of kKC rows of op(B), each mround x kc, one after the other; mround = m rounded up
// to NR), so that the threads share one packing of B. Panel by panel: a thread's blocks reuse a
// panel while it is in its cache.
template <typename T>
UE_INLINE void syrk_rows_prepacked(bool ta, const T* a, int64_t lda, const T* bpack,
                                   int64_t m, int64_t mround, const int64_t* order,
                                   int64_t u_lo, int64_t u_hi, int64_t k, T* c, int64_t ldc,
                                   T* abuf) {
  for (int64_t pc = 0; pc < k; pc += kKC) {
    const int64_t kc = std::min(kKC, k - pc);
    const T* bp = bpack + pc * mround;
    for (int64_t u = u_lo; u < u_hi; ++u) {
      const int64_t ic = order[u] * kMC, mc = std::min(kMC, m - ic);
      pack_a(ta, a, lda, ic, mc, pc, kc, abuf);
      lower_tiles<T>(kc, abuf, bp, ic, mc, 0, m, c, ldc);
    }
  }
}

UE_CLONES void syrk_prepacked_f32(bool ta, const float* a, int64_t lda, const float* bpack,
                                  int64_t m, int64_t mround, const int64_t* order, int64_t u_lo,
                                  int64_t u_hi, int64_t k, float* c, int64_t ldc, float* abuf) {
  syrk_rows_prepacked<float>(ta, a, lda, bpack, m, mround, order, u_lo, u_hi, k, c, ldc, abuf);
}

UE_CLONES void syrk_prepacked_f64(bool ta, const double* a, int64_t lda, const double* bpack,
                                  int64_t m, int64_t mround, const int64_t* order, int64_t u_lo,
                                  int64_t u_hi, int64_t k, double* c, int64_t ldc, double* abuf) {
  syrk_rows_prepacked<double>(ta, a, lda, bpack, m, mround, order, u_lo, u_hi, k, c, ldc, abuf);
}

UE_CLONES void pack_b_f32(bool tb, const float* b, int64_t ldb, int64_t p0, int64_t kc,
                          int64_t nc, float* dst) {
  pack_b<float>(tb, b, ldb, p0, kc, 0, nc, dst);
}

UE_CLONES void pack_b_f64(bool tb, const double* b, int64_t ldb, int64_t p0, int64_t kc,
                          int64_t nc, double* dst) {
  pack_b<double>(tb, b, ldb, p0, kc, 0, nc, dst);
}

inline void syrk_prepacked_any(bool ta, const float* a, int64_t lda, const float* bpack,
                               int64_t m, int64_t mround, const int64_t* order, int64_t u_lo,
                               int64_t u_hi, int64_t k, float* c, int64_t ldc, float* abuf) {
  syrk_prepacked_f32(ta, a, lda, bpack, m, mround, order, u_lo, u_hi, k, c, ldc, abuf);
}
inline void syrk_prepacked_any(bool ta, const double* a, int64_t lda, const double* bpack,
                               int64_t m, int64_t mround, const int64_t* order, int64_t u_lo,
                               int64_t u_hi, int64_t k, double* c, int64_t ldc, double* abuf) {
  syrk_prepacked_f64(ta, a, lda, bpack, m, mround, order, u_lo, u_hi, k, c, ldc, abuf);
}
inline void pack_b_any(bool tb, const float* b, int64_t ldb, int64_t p0, int64_t kc, int64_t nc,
                       float* dst) {
  pack_b_f32(tb, b, ldb, p0, kc, nc, dst);
}
inline void pack_b_any(bool tb, const double* b, int64_t ldb, int64_t p0, int64_t kc,
                       int64_t nc, double* dst) {
  pack_b_f64(tb, b, ldb, p0, kc, nc, dst);
}

// A grow-only buffer of the calling thread, kept between calls up to kScratchKeep bytes: a fresh
// allocation above malloc's mmap threshold costs a page fault per 4 KiB on every call, which
// measured as much as the product itself at m = 300 (in a VM).
constexpr size_t kScratchKeep = size_t(32) << 20;

template <typename T>
T* scratch(std::vector<T>& fallback, size_t n, int slot) {
  thread_local std::vector<T> kept[2];
  std::vector<T>& buf = n * sizeof(T) <= kScratchKeep ? kept[slot] : fallback;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// C (m x m, zero on entry) := the lower triangle and the diagonal tiles of op(A) op(B).
//   - below ~1e9 multiply-adds or one row block: one serial pass;
//   - op(B) up to 2^25 elements: its panels are packed once (in parallel), then the row blocks
//     of kMC rows (block u costs ~ u + 1) run on the threads, handed out heaviest and lightest
//     in turn so that contiguous ranges of blocks carry similar work;
//   - larger: the row blocks run on the threads, each packing the columns it needs itself.
template <typename T>
void syrk_parallel(const ParallelFor& pfor, bool ta, const T* a, int64_t lda, bool tb,
                   const T* b, int64_t ldb, int64_t m, int64_t k, T* c, int64_t ldc) {
  if (m <= 0 || k <= 0) return;
  constexpr int NR = Vec<T>::kNR;
  const int64_t blocks = (m + kMC - 1) / kMC;
  std::vector<T> own_a, own_b;
  // threads only above ~1e9 multiply-adds: each call starts its threads (std::thread; this
  // extension is built without OpenMP), which measured ~1-3 ms on the 2-core VM
  if (blocks == 1 || m * m * k < (int64_t(1) << 30)) {
    T* abuf = scratch(own_a, static_cast<size_t>(kMC * kKC), 0);
    T* bbuf = scratch(own_b, static_cast<size_t>(kKC * (std::min(kNC, m) + NR)), 1);
    syrk_rows_any(ta, a, lda, tb, b, ldb, 0, m, k, c, ldc, abuf, bbuf);
    return;
  }
  std::vector<int64_t> order(static_cast<size_t>(blocks));   // heaviest, lightest, ...
  for (int64_t u = 0; u < blocks; ++u) order[u] = (u % 2 == 0) ? blocks - 1 - u / 2 : u / 2;
  const int64_t mround = (m + NR - 1) / NR * NR;
  if (k * mround <= (int64_t(1) << 25)) {
    T* bpack = scratch(own_b, static_cast<size_t>(k * mround), 1);
    const int64_t panels = (k + kKC - 1) / kKC;
    pfor(0, panels, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t pc = p * kKC;
        pack_b_any(tb, b, ldb, pc, std::min(kKC, k - pc), m, bpack + pc * mround);
      }
    });
    pfor(0, blocks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> abuf(static_cast<size_t>(kMC * kKC));
      syrk_prepacked_any(ta, a, lda, bpack, m, mround, order.data(), lo, hi, k, c, ldc,
                         abuf.data());
    });
    return;
  }
  pfor(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> abuf(static_cast<size_t>(kMC * kKC));
    std::vector<T> bbuf(static_cast<size_t>(kKC * (std::min(kNC, m) + NR)));
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t i0 = order[u] * kMC, i1 = std::min(m, i0 + kMC);
      syrk_rows_any(ta, a, lda, tb, b, ldb, i0, i1, k, c, ldc, abuf.data(), bbuf.data());
    }
  });
}

// Splits C into independent strips (columns when it is wide, rows otherwise) and runs the
// serial kernel on each strip; every worker owns its packing buffers.
template <typename T>
void gemm_parallel(const ParallelFor& pfor, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                   T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                   int64_t ldc) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  constexpr int NR = Vec<T>::kNR;
  const bool by_cols = n >= m;
  const int64_t unit = by_cols ? 4 * 64 : kMC;  // columns (multiple of NR) or rows per unit
  const int64_t extent = by_cols ? n : m;
  const int64_t units = (extent + unit - 1) / unit;
  const int64_t flops = m * n * k;
  auto body = [&](int64_t lo, int64_t hi) {
    std::vector<T> abuf(static_cast<size_t>(kMC * kKC));
    std::vector<T> bbuf(static_cast<size_t>(kKC * (std::min(kNC, by_cols ? unit : n) + NR)));
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t s = u * unit, len = std::min(unit, extent - s);
      if (by_cols) {
        gemm_serial_any(ta, tb, m, len, k, alpha, a, lda, tb ? b + s * ldb : b + s, ldb, c + s,
                        ldc, abuf.data(), bbuf.data());
      } else {
        gemm_serial_any(ta, tb, len, n, k, alpha, ta ? a + s : a + s * lda, lda, b, ldb,
                        c + s * ldc, ldc, abuf.data(), bbuf.data());
      }
    }
  };
  if (units == 1 || flops < (int64_t(1) << 18)) {
    // one pass on the calling thread, on its kept buffers: a fresh zero-filled 1 MiB packing
    // buffer per call measured ~2% of a 50-deep product into a 576 x 1536 matrix
    std::vector<T> own_a, own_b;
    T* abuf = scratch(own_a, static_cast<size_t>(kMC * kKC), 0);
    T* bbuf = scratch(own_b, static_cast<size_t>(kKC * (std::min(kNC, n) + NR)), 1);
    gemm_serial_any(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, abuf, bbuf);
  } else {
    pfor(0, units, 1, body);
  }
}

}  // namespace

void gemm_native(const ParallelFor& pfor, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                 float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc) {
  gemm_parallel<float>(pfor, ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

void gemm_native(const ParallelFor& pfor, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                 double alpha, const double* a, int64_t lda, const double* b, int64_t ldb,
                 double* c, int64_t ldc) {
  gemm_parallel<double>(pfor, ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

void syrk_lower_native(const ParallelFor& pfor, bool trans_a, const float* a, int64_t lda,
                       bool trans_b, const float* b, int64_t ldb, int64_t m, int64_t k,
                       float* c, int64_t ldc) {
  syrk_parallel<float>(pfor, trans_a, a, lda, trans_b, b, ldb, m, k, c, ldc);
}

void syrk_lower_native(const ParallelFor& pfor, bool trans_a, const double* a, int64_t lda,
                       bool trans_b, const double* b, int64_t ldb, int64_t m, int64_t k,
                       double* c, int64_t ldc) {
  syrk_parallel<double>(pfor, trans_a, a, lda, trans_b, b, ldb, m, k, c, ldc);
}

const char* gemm_native_isa() {
#if UE_HAVE_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512 (x86-64-v4 clone)";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2 (x86-64-v3 clone)";
  return "generic (baseline clone)";
#else
  return "generic";
#endif
}

}  // namespace cholesky
}  // namespace ultraedit
