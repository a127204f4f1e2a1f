// Batched blocked Cholesky solve on the GPU (CUDA runtime only, no torch, no cuBLAS).
//
// Solves the SPD systems A_s X_s = B_s of all edited modules of a turn (s < batch) in one
// launch sequence: every kernel's grid spans the whole batch (blockIdx.z or .y = system).
// Row-major storage; a: batch x n x n (lower triangle read, overwritten with L, the upper
// triangle used as scratch), b: batch x n x k (overwritten with X), info: batch int32 on
// the device (0, or the 1-based order of the first non-positive-definite / NaN leading minor,
// like torch.linalg.cholesky_ex; X of such a system is filled with NaN).
//
// Algorithm (right-looking, tile kTile = 32), per block column j:
//   potf2 on the diagonal tile (shared memory, one CTA per system),
//   panel triangular solve (32-row tiles), trailing update A22 -= P Pᵀ (lower tiles only);
// then forward and backward block substitutions: diagonal-tile solve (one thread per
// right-hand-side column) followed by a GEMM update of the remaining rows.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace ultraedit {
namespace cholesky {
namespace device {

constexpr int kTile = 32;

template <typename T>
cudaError_t spd_solve_batched(int64_t batch, int64_t n, T* a, int64_t stride_a, T* b, int64_t k,
                              int64_t stride_b, int32_t* info, cudaStream_t stream);

extern template cudaError_t spd_solve_batched<float>(int64_t, int64_t, float*, int64_t, float*,
                                                     int64_t, int64_t, int32_t*, cudaStream_t);
extern template cudaError_t spd_solve_batched<double>(int64_t, int64_t, double*, int64_t,
                                                      double*, int64_t, int64_t, int32_t*,
                                                      cudaStream_t);

}  // namespace device
}  // namespace cholesky
}  // namespace ultraedit
