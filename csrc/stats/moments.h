// Running per-column statistics on the host (torch-free): merge a block of rows into a running
// float64 count / mean / M2 (Chan's parallel formula) in one pass over the block.
//
// For a block x (rows x cols, row-major, leading dimension ld; float or double) and running
// (count, mean, m2), with shifted sums y = x - x[0] in float64:
//
//     s1 = Σ_i y_i,  s2 = Σ_i y_i²,  μ_b = x[0] + s1 / B,  M2_b = max(s2 - s1²/B, 0)
//     (official: M2_b · B / (B - 1), NaN for B = 1: the reference code's B · var_unbiased)
//     δ = μ_b - mean,  n' = count + B,  mean' = mean + δ B / n',  m2' = m2 + M2_b + δ² count B / n'
//
// Every element of x is read once (the pure-PyTorch reference reads a float64 copy of it four
// times); the shift by a row of the block keeps the sums free of cancellation.
#pragma once

#include <cstdint>

#include "../cholesky/host.h"

namespace ultraedit {
namespace stats {

// new_mean, new_m2, mean, m2: `cols` doubles each (new_* may not alias the inputs).
void merge_block(const float* x, int64_t rows, int64_t cols, int64_t ld, double count,
                 const double* mean, const double* m2, bool official, double* new_mean,
                 double* new_m2, const cholesky::ParallelFor& pfor);
void merge_block(const double* x, int64_t rows, int64_t cols, int64_t ld, double count,
                 const double* mean, const double* m2, bool official, double* new_mean,
                 double* new_m2, const cholesky::ParallelFor& pfor);

}  // namespace stats
}  // namespace ultraedit
