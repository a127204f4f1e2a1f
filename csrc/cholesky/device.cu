// Batched blocked Cholesky solve on the GPU; see device.cuh for the contract and algorithm.
// Compiles with plain `nvcc -arch=sm_80 -c device.cu` (CUDA runtime headers only).
#include <algorithm>
#include <cmath>

#include "device.cuh"

namespace ultraedit {
namespace cholesky {
namespace device {
namespace {

constexpr int kGemmTile = 64;   // C tile per CTA of the update kernel (64 x 64)
constexpr int kGemmDepth = 16;  // inner-dimension chunk staged in shared memory
constexpr int kSolveCols = 128; // right-hand-side columns per CTA of the diagonal solve

// Unblocked Cholesky of the diagonal tile starting at (j, j); one CTA (32 x 32) per system.
template <typename T>
__global__ void potf2_kernel(T* a, int64_t n, int64_t stride, int64_t j, int32_t* info) {
  const int64_t s = blockIdx.x;
  if (info[s] != 0) return;
  a += s * stride;
  const int jb = static_cast<int>(n - j < kTile ? n - j : kTile);
  const int tx = threadIdx.x, ty = threadIdx.y;
  __shared__ T t[kTile][kTile + 1];
  __shared__ int fail;
  if (tx < jb && ty < jb && tx <= ty) t[ty][tx] = a[(j + ty) * n + j + tx];
  if (tx == 0 && ty == 0) fail = 0;
  __syncthreads();
  for (int c = 0; c < jb; ++c) {
    if (tx == c && ty == c) {
      const T d = t[c][c];
      if (!(d > T(0))) {
        fail = static_cast<int>(j) + c + 1;  // also catches NaN
      } else {
        t[c][c] = sqrt(d);
      }
    }
    __syncthreads();
    if (fail != 0) break;  // uniform: every thread reads the same shared value
    if (tx == c && ty > c && ty < jb) t[ty][c] /= t[c][c];
    __syncthreads();
    if (tx > c && ty >= tx && ty < jb) t[ty][tx] -= t[ty][c] * t[tx][c];
    __syncthreads();
  }
  if (fail != 0) {
    if (tx == 0 && ty == 0) info[s] = fail;
    return;
  }
  if (tx < jb && ty < jb && tx <= ty) a[(j + ty) * n + j + tx] = t[ty][tx];
}

// Panel solve P := P L_jj⁻ᵀ for 32-row tiles below the diagonal tile; grid (tiles, batch).
template <typename T>
__global__ void trsm_panel_kernel(T* a, int64_t n, int64_t stride, int64_t j,
                                  const int32_t* info) {
  const int64_t s = blockIdx.y;
  if (info[s] != 0) return;
  a += s * stride;
  const int jb = static_cast<int>(n - j < kTile ? n - j : kTile);
  const int64_t r0 = j + jb + static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  __shared__ T l[kTile][kTile + 1];
  __shared__ T x[kTile][kTile + 1];
  if (tx < jb && ty < jb && tx <= ty) l[ty][tx] = a[(j + ty) * n + j + tx];
  const bool row_ok = r0 + ty < n;
  if (row_ok && tx < jb) x[ty][tx] = a[(r0 + ty) * n + j + tx];
  __syncthreads();
  for (int c = 0; c < jb; ++c) {
    if (tx == c && row_ok) x[ty][c] /= l[c][c];
    __syncthreads();
    if (tx > c && tx < jb && row_ok) x[ty][tx] -= x[ty][c] * l[tx][c];
    __syncthreads();
  }
  if (row_ok && tx < jb) a[(r0 + ty) * n + j + tx] = x[ty][tx];
}

// C (m x p) -= op(A) (m x kk) op(B) (kk x p), row-major, batched over blockIdx.z.
// 64 x 64 C tile per CTA of 256 threads, 4 x 4 outputs per thread.  With lower_only, CTAs
// whose tile lies entirely above the diagonal of C are skipped (symmetric trailing update).
template <typename T, bool kTransA, bool kTransB>
__global__ void __launch_bounds__(256)
gemm_sub_kernel(int64_t m, int64_t p, int64_t kk, const T* __restrict__ A, int64_t lda,
                int64_t sa, const T* __restrict__ B, int64_t ldb, int64_t sb, T* C, int64_t ldc,
                int64_t sc, const int32_t* info, bool lower_only) {
  const int64_t s = blockIdx.z;
  if (info[s] != 0) return;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kGemmTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kGemmTile;
  if (lower_only && col0 > row0 + kGemmTile - 1) return;
  A += s * sa;
  B += s * sb;
  C += s * sc;
  __shared__ T as[kGemmDepth][kGemmTile + 1];
  __shared__ T bs[kGemmDepth][kGemmTile + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[i][q] = T(0);
  for (int64_t p0 = 0; p0 < kk; p0 += kGemmDepth) {
    for (int e = tid; e < kGemmDepth * kGemmTile; e += 256) {
      // Consecutive threads read consecutive addresses for either storage order.
      const int r = kTransA ? e % kGemmTile : e / kGemmDepth;
      const int q = kTransA ? e / kGemmTile : e % kGemmDepth;
      const int64_t gr = row0 + r, gq = p0 + q;
      T v = T(0);
      if (gr < m && gq < kk) v = kTransA ? A[gq * lda + gr] : A[gr * lda + gq];
      as[q][r] = v;
    }
    for (int e = tid; e < kGemmDepth * kGemmTile; e += 256) {
      const int c = kTransB ? e / kGemmDepth : e % kGemmTile;
      const int q = kTransB ? e % kGemmDepth : e / kGemmTile;
      const int64_t gc = col0 + c, gq = p0 + q;
      T v = T(0);
      if (gc < p && gq < kk) v = kTransB ? B[gc * ldb + gq] : B[gq * ldb + gc];
      bs[q][c] = v;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kGemmDepth; ++q) {
      T av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[q][ty + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = bs[q][tx + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] += av[i] * bv[c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = row0 + ty + 16 * i;
    if (r >= m) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t col = col0 + tx + 16 * c;
      if (col < p) C[r * ldc + col] -= acc[i][c];
    }
  }
}

// Diagonal-tile substitution for the rows [j, j+jb) of B: B_j := L_jj⁻¹ B_j (forward) or
// L_jjᵀ⁻¹ B_j (backward); one thread per column, grid (column tiles, batch).
template <typename T, bool kForward>
__global__ void __launch_bounds__(kSolveCols)
diag_solve_kernel(const T* a, int64_t n, int64_t sa, T* b, int64_t k, int64_t sb, int64_t j,
                  const int32_t* info) {
  const int64_t s = blockIdx.y;
  if (info[s] != 0) return;
  a += s * sa;
  b += s * sb;
  const int jb = static_cast<int>(n - j < kTile ? n - j : kTile);
  __shared__ T l[kTile][kTile + 1];
  __shared__ T x[kTile][kSolveCols];
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int r = e / kTile, c = e % kTile;
    if (r < jb && c <= r) l[r][c] = a[(j + r) * n + j + c];
  }
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSolveCols + threadIdx.x;
  const bool ok = col < k;
  for (int r = 0; r < jb; ++r) x[r][threadIdx.x] = ok ? b[(j + r) * k + col] : T(0);
  __syncthreads();
  if (ok) {
    for (int t = 0; t < jb; ++t) {
      const int i = kForward ? t : jb - 1 - t;
      T v = x[i][threadIdx.x];
      if (kForward) {
        for (int q = 0; q < i; ++q) v -= l[i][q] * x[q][threadIdx.x];
      } else {
        for (int q = i + 1; q < jb; ++q) v -= l[q][i] * x[q][threadIdx.x];
      }
      x[i][threadIdx.x] = v / l[i][i];
    }
    for (int r = 0; r < jb; ++r) b[(j + r) * k + col] = x[r][threadIdx.x];
  }
}

template <typename T>
__global__ void nan_fill_kernel(T* b, int64_t per_system, int64_t stride, const int32_t* info) {
  const int64_t s = blockIdx.y;
  if (info[s] == 0) return;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < per_system;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    b[s * stride + e] = static_cast<T>(NAN);
  }
}

inline unsigned blocks_for(int64_t extent, int64_t tile) {
  return static_cast<unsigned>((extent + tile - 1) / tile);
}

template <typename T, bool kTransA, bool kTransB>
void gemm_sub(int64_t batch, int64_t m, int64_t p, int64_t kk, const T* A, int64_t lda,
              int64_t sa, const T* B, int64_t ldb, int64_t sb, T* C, int64_t ldc, int64_t sc,
              const int32_t* info, bool lower_only, cudaStream_t stream) {
  if (m <= 0 || p <= 0 || kk <= 0) return;
  const dim3 grid(blocks_for(p, kGemmTile), blocks_for(m, kGemmTile),
                  static_cast<unsigned>(batch));
  gemm_sub_kernel<T, kTransA, kTransB><<<grid, 256, 0, stream>>>(
      m, p, kk, A, lda, sa, B, ldb, sb, C, ldc, sc, info, lower_only);
}

}  // namespace

template <typename T>
cudaError_t spd_solve_batched(int64_t batch, int64_t n, T* a, int64_t stride_a, T* b, int64_t k,
                              int64_t stride_b, int32_t* info, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (batch > 65535) return cudaErrorInvalidValue;  // grid y/z limit; callers split larger batches
  cudaError_t err = cudaMemsetAsync(info, 0, sizeof(int32_t) * batch, stream);
  if (err != cudaSuccess || n <= 0) return err;
  const dim3 tile_threads(kTile, kTile);
  const unsigned nbatch = static_cast<unsigned>(batch);
  // Factorization A = L Lᵀ.
  for (int64_t j = 0; j < n; j += kTile) {
    const int64_t jb = std::min<int64_t>(kTile, n - j), m = n - j - jb;
    potf2_kernel<T><<<nbatch, tile_threads, 0, stream>>>(a, n, stride_a, j, info);
    if (m > 0) {
      trsm_panel_kernel<T><<<dim3(blocks_for(m, kTile), nbatch), tile_threads, 0, stream>>>(
          a, n, stride_a, j, info);
      T* panel = a + (j + jb) * n + j;
      gemm_sub<T, false, true>(batch, m, m, jb, panel, n, stride_a, panel, n, stride_a,
                               a + (j + jb) * n + j + jb, n, stride_a, info, true, stream);
    }
  }
  if (k > 0) {
    const dim3 solve_grid(blocks_for(k, kSolveCols), nbatch);
    // Forward: L Y = B.
    for (int64_t j = 0; j < n; j += kTile) {
      const int64_t jb = std::min<int64_t>(kTile, n - j), m = n - j - jb;
      diag_solve_kernel<T, true><<<solve_grid, kSolveCols, 0, stream>>>(a, n, stride_a, b, k,
                                                                          stride_b, j, info);
      gemm_sub<T, false, false>(batch, m, k, jb, a + (j + jb) * n + j, n, stride_a, b + j * k, k,
                                stride_b, b + (j + jb) * k, k, stride_b, info, false, stream);
    }
    // Backward: Lᵀ X = Y.
    for (int64_t j = ((n - 1) / kTile) * kTile; j >= 0; j -= kTile) {
      const int64_t jb = std::min<int64_t>(kTile, n - j);
      diag_solve_kernel<T, false><<<solve_grid, kSolveCols, 0, stream>>>(a, n, stride_a, b, k,
                                                                           stride_b, j, info);
      gemm_sub<T, true, false>(batch, j, k, jb, a + j * n, n, stride_a, b + j * k, k, stride_b,
                               b, k, stride_b, info, false, stream);
    }
    const dim3 fill_grid(std::min<unsigned>(blocks_for(n * k, 256), 1024u), nbatch);
    nan_fill_kernel<T><<<fill_grid, 256, 0, stream>>>(b, n * k, stride_b, info);
  }
  return cudaGetLastError();
}

template cudaError_t spd_solve_batched<float>(int64_t, int64_t, float*, int64_t, float*, int64_t,
                                              int64_t, int32_t*, cudaStream_t);
template cudaError_t spd_solve_batched<double>(int64_t, int64_t, double*, int64_t, double*,
                                               int64_t, int64_t, int32_t*, cudaStream_t);

}  // namespace device
}  // namespace cholesky
}  // namespace ultraedit
