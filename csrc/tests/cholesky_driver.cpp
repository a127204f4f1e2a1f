// Standalone check and timing of the host Cholesky (no torch): compares the blocked
// factorization and solves against a naive unblocked Cholesky, for float and double.
//   cholesky_driver [n] [k] [batch] [threads]     (defaults: a sweep of odd sizes)
// Exit status 0 when every case is within tolerance.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cholesky/host.h"

using namespace ultraedit::cholesky;

namespace {

// Random SPD matrix M Mᵀ / cols + I (double precision).
std::vector<double> random_spd(int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<double> dist;
  const int64_t cols = n + 7;
  std::vector<double> m(n * cols), a(n * n);
  for (auto& v : m) v = dist(rng);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t p = 0; p < cols; ++p) s += m[i * cols + p] * m[j * cols + p];
      a[i * n + j] = a[j * n + i] = s / cols + (i == j ? 1.0 : 0.0);
    }
  return a;
}

// Naive reference in double: unblocked Cholesky, then two substitutions.
void naive_solve(std::vector<double> a, int64_t n, std::vector<double>& b, int64_t k) {
  for (int64_t j = 0; j < n; ++j) {
    double d = a[j * n + j];
    for (int64_t p = 0; p < j; ++p) d -= a[j * n + p] * a[j * n + p];
    a[j * n + j] = std::sqrt(d);
    for (int64_t i = j + 1; i < n; ++i) {
      double s = a[i * n + j];
      for (int64_t p = 0; p < j; ++p) s -= a[i * n + p] * a[j * n + p];
      a[i * n + j] = s / a[j * n + j];
    }
  }
  for (int64_t c = 0; c < k; ++c) {
    for (int64_t i = 0; i < n; ++i) {
      double s = b[i * k + c];
      for (int64_t p = 0; p < i; ++p) s -= a[i * n + p] * b[p * k + c];
      b[i * k + c] = s / a[i * n + i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      double s = b[i * k + c];
      for (int64_t p = i + 1; p < n; ++p) s -= a[p * n + i] * b[p * k + c];
      b[i * k + c] = s / a[i * n + i];
    }
  }
}

template <typename T>
bool check(int64_t n, int64_t k, int64_t batch, const HostContext& ctx, bool timing) {
  std::mt19937_64 rng(1234 + n + k);
  std::normal_distribution<double> dist;
  std::vector<T> a(batch * n * n), b(batch * n * k);
  std::vector<std::vector<double>> a64(batch), x64(batch);
  for (int64_t s = 0; s < batch; ++s) {
    a64[s] = random_spd(n, rng);
    x64[s].resize(n * k);
    for (auto& v : x64[s]) v = dist(rng);
    for (int64_t i = 0; i < n * n; ++i) a[s * n * n + i] = static_cast<T>(a64[s][i]);
    for (int64_t i = 0; i < n * k; ++i) b[s * n * k + i] = static_cast<T>(x64[s][i]);
    // Reference on the rounded inputs.
    for (int64_t i = 0; i < n * n; ++i) a64[s][i] = static_cast<double>(a[s * n * n + i]);
    for (int64_t i = 0; i < n * k; ++i) x64[s][i] = static_cast<double>(b[s * n * k + i]);
    if (!timing) naive_solve(a64[s], n, x64[s], k);
  }
  std::vector<int32_t> info(batch, -1);
  const auto t0 = std::chrono::steady_clock::now();
  spd_solve_batched<T>(batch, n, a.data(), n * n, b.data(), k, n * k, info.data(), ctx);
  const double ms = std::chrono::duration<double, std::milli>(
                        std::chrono::steady_clock::now() - t0).count();
  double worst = 0;
  bool ok = true;
  for (int64_t s = 0; s < batch; ++s) {
    if (info[s] != 0) ok = false;
    if (timing) continue;
    double num = 0, den = 0;
    for (int64_t i = 0; i < n * k; ++i) {
      const double d = b[s * n * k + i] - x64[s][i];
      num += d * d;
      den += x64[s][i] * x64[s][i];
    }
    worst = std::max(worst, std::sqrt(num / std::max(den, 1e-300)));
  }
  const double tol = sizeof(T) == 4 ? 1e-4 : 1e-11;
  ok = ok && worst <= tol;
  const double gflop = batch * (n * n * (double)n / 3.0 + 2.0 * n * n * (double)k) / 1e9;
  std::printf("%-6s n=%5lld k=%5lld batch=%2lld  rel.err=%.2e (tol %.0e)  %8.2f ms  %6.1f GFLOP/s  %s\n",
              sizeof(T) == 4 ? "float" : "double", (long long)n, (long long)k, (long long)batch,
              worst, tol, ms, gflop / (ms / 1e3), ok ? "ok" : "FAIL");
  return ok;
}

bool check_not_spd(const HostContext& ctx) {
  // diag(1, 1, -1, 1): the leading minor of order 3 fails; NaN at (5, 2) fails at order 6.
  const int64_t n = 8;
  std::vector<float> a(n * n, 0.f), b(n, 1.f);
  for (int64_t i = 0; i < n; ++i) a[i * n + i] = 1.f;
  a[2 * n + 2] = -1.f;
  int32_t info = 0;
  spd_solve_batched<float>(1, n, a.data(), n * n, b.data(), 1, n, &info, ctx);
  bool ok = info == 3 && std::isnan(b[0]);
  for (int64_t i = 0; i < n * n; ++i) a[i] = (i % (n + 1) == 0) ? 2.f : 0.f;
  a[5 * n + 2] = NAN;
  spd_solve_batched<float>(1, n, a.data(), n * n, b.data(), 1, n, &info, ctx);
  ok = ok && info == 6;
  std::printf("not positive definite / NaN info codes: %s\n", ok ? "ok" : "FAIL");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 4 ? std::atoi(argv[4]) : 0;
  const HostContext ctx = native_context(thread_pool_for(threads));
  std::printf("host Cholesky driver; built-in GEMM: %s\n", gemm_native_isa());
  bool ok = true;
  if (argc > 1) {
    const int64_t n = std::atoll(argv[1]), k = argc > 2 ? std::atoll(argv[2]) : 1;
    const int64_t batch = argc > 3 ? std::atoll(argv[3]) : 1;
    ok &= check<float>(n, k, batch, ctx, false);
    ok &= check<float>(n, k, batch, ctx, true);
    ok &= check<double>(n, k, batch, ctx, true);
    return ok ? 0 : 1;
  }
  const int64_t sizes[][3] = {{1, 1, 1}, {17, 33, 1}, {17, 5, 12}, {129, 77, 3},
                              {255, 300, 1}, {300, 1, 2}, {1000, 100, 1}};
  for (const auto& s : sizes) {
    ok &= check<float>(s[0], s[1], s[2], ctx, false);
    ok &= check<double>(s[0], s[1], s[2], ctx, false);
  }
  ok &= check_not_spd(ctx);
  std::printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}
