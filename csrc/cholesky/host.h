// Blocked Cholesky factorization and triangular solves on the host (torch-free).
//
// Everything here takes raw pointers to row-major matrices with a leading dimension (the
// distance between consecutive rows, in elements).  Only the lower triangle of A is read.
//
//   factor_lower:  A = L Lᵀ in place (lower triangle of `a` becomes L); returns 0 or the
//                  1-based order j of the first leading minor that is not positive definite
//                  (or holds NaN), like LAPACK potrf / torch.linalg.cholesky_ex.
//   solve_lower:   B := L⁻ᵀ (L⁻¹ B) in place for an n x k right-hand side B.
//   spd_solve_batched: both, for `batch` systems stored with constant strides.
//
// The algorithm is blocked (block size `HostContext::block`): the trailing updates of the
// factorization and of both solves are matrix products (C += alpha op(A) op(B)) handed to
// `HostContext::gemm_*`; the diagonal blocks (unblocked factor, panel triangular solve,
// diagonal-block substitutions) are computed here with vectorizable loops, threaded over
// rows or column chunks with `HostContext::parallel_for`.  The torch binding (csrc/ops.cpp)
// plugs in at::parallel_for and, by default, ATen's GEMM; the standalone driver uses the
// built-in packed GEMM (host_gemm.cpp) and std::thread.
#pragma once

#include <cstdint>
#include <functional>

namespace ultraedit {
namespace cholesky {

// C (m x n, ldc) += alpha * op(A) (m x k) * op(B) (k x n); row-major; op(X) = Xᵀ if trans.
template <typename T>
using GemmFn = std::function<void(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                                  T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                                  T* c, int64_t ldc)>;

// Calls body(lo, hi) on disjoint sub-ranges covering [begin, end), possibly concurrently.
using ParallelFor = std::function<void(int64_t begin, int64_t end, int64_t grain,
                                       const std::function<void(int64_t, int64_t)>& body)>;

struct HostContext {
  ParallelFor parallel_for;  // required
  GemmFn<float> sgemm;       // required
  GemmFn<double> dgemm;      // required
  int64_t block = 128;       // block size of the blocked algorithm
};

// Runs body serially (for nested use inside an outer parallel loop).
void serial_for(int64_t begin, int64_t end, int64_t grain,
                const std::function<void(int64_t, int64_t)>& body);
// std::thread-based parallel_for with `threads` workers (0: hardware concurrency).
ParallelFor thread_pool_for(int threads = 0);

// The built-in packed GEMM (host_gemm.cpp), parallelized with `pfor`.
void gemm_native(const ParallelFor& pfor, bool trans_a, bool trans_b, int64_t m, int64_t n,
                 int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc);
void gemm_native(const ParallelFor& pfor, bool trans_a, bool trans_b, int64_t m, int64_t n,
                 int64_t k, double alpha, const double* a, int64_t lda, const double* b,
                 int64_t ldb, double* c, int64_t ldc);
// The lower triangle of C = op(A) op(B), op(B) = op(A)ᵀ, with the built-in kernels (op(A):
// m x k, Aᵀ if trans_a; op(B): k x m, Bᵀ if trans_b; pass a matrix and its transpose so that
// both operands are read by rows). C (m x m, ldc) must be zero on entry; on return its lower
// triangle holds the product, and so do the entries above the diagonal inside diagonal
// micro-tiles (the rest of the upper triangle stays zero): the caller mirrors.
void syrk_lower_native(const ParallelFor& pfor, bool trans_a, const float* a, int64_t lda,
                       bool trans_b, const float* b, int64_t ldb, int64_t m, int64_t k,
                       float* c, int64_t ldc);
void syrk_lower_native(const ParallelFor& pfor, bool trans_a, const double* a, int64_t lda,
                       bool trans_b, const double* b, int64_t ldb, int64_t m, int64_t k,
                       double* c, int64_t ldc);
// Which instruction set the built-in GEMM dispatched to ("avx512", "avx2", "generic").
const char* gemm_native_isa();

// A context using the built-in GEMM and `pfor` (thread_pool_for() when empty).
HostContext native_context(ParallelFor pfor = ParallelFor(), int64_t block = 128);

template <typename T>
int32_t factor_lower(T* a, int64_t n, int64_t lda, const HostContext& ctx);

template <typename T>
void solve_lower(const T* l, int64_t n, int64_t ldl, T* b, int64_t k, int64_t ldb,
                 const HostContext& ctx);

// a: batch x (n x n, lda = n) at stride stride_a, overwritten by L;
// b: batch x (n x k, ldb = k) at stride stride_b, overwritten by X (NaN where info != 0);
// info: batch int32 codes.  Small systems are solved concurrently, one per thread.
template <typename T>
void spd_solve_batched(int64_t batch, int64_t n, T* a, int64_t stride_a, T* b, int64_t k,
                       int64_t stride_b, int32_t* info, const HostContext& ctx);

}  // namespace cholesky
}  // namespace ultraedit
