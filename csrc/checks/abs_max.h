// The largest magnitude in an array, and whether every value is finite, in one pass (torch-free):
// the bound the in-place update checks before it touches a weight.
//
//     abs_max(x, n) = max_i |x_i|,  or NaN when any x_i is NaN or ±Inf
//
// Read once, vectorized (GCC vector extensions; AVX-512 / AVX2 / baseline clones on x86-64).
#pragma once

#include <cstdint>

namespace ultraedit {
namespace checks {

double abs_max(const float* x, int64_t n);
double abs_max(const double* x, int64_t n);

}  // namespace checks
}  // namespace ultraedit
