#pragma once
/// The problem and options types shared by the CPU and CUDA engines: one contract, two
/// implementations (DESIGN.md, "Notation and the numerical contract").
#include <cstdint>
#include <stdexcept>
#include <string>

namespace dffkit {

/// Loss: beta = 2 (Frobenius) or beta = 1 (generalized Kullback-Leibler).
enum class Loss : int { kullback_leibler = 1, frobenius = 2 };

/// X (m x n) ~ W (m x k) H (k x n), all row-major (C-contiguous).
/// Penalties are the already-scaled scikit-learn >= 1.2 terms:
///   l1_W = n * alpha_W * l1_ratio, l2_W = n * alpha_W * (1 - l1_ratio),
///   l1_H = m * alpha_H * l1_ratio, l2_H = m * alpha_H * (1 - l1_ratio).
/// Group-sparse NMF (Frobenius only): rows come in n_groups contiguous segments,
/// group g = rows [group_offsets[g], group_offsets[g+1]), group_offsets[0] = 0,
/// group_offsets[n_groups] = m. lam is the group penalty, mu the L2 weight on H:
///   1/2 ||X - WH||^2 + lam sum_g sum_j ||W[G_g, j]||_2 + 1/2 mu ||H||^2 (+ ordinary penalties).
struct Problem {
  std::int64_t m = 0, n = 0, k = 0;
  Loss loss = Loss::frobenius;
  double l1_W = 0, l2_W = 0, l1_H = 0, l2_H = 0;
  const std::int64_t* group_offsets = nullptr;  // host memory, n_groups + 1 entries, or null
  std::int64_t n_groups = 0;
  double lam = 0, mu = 0;
};

struct Options {
  int max_iter = 200;
  double tol = 1e-4;      // relative decrease of the error, tested every 10 iterations; 0: run max_iter
  bool update_H = true;   // false: H is fixed (transform of new data)
  bool record_objective = false;  // fill Result::objective each iteration (costs a little)
  int num_threads = 0;    // CPU only: 0 = OpenMP default
};

struct Result {
  int n_iter = 0;
  double error_init = 0;  // scikit-learn's error: sqrt(2 * beta-divergence) at the start
  double error = 0;       // the same at the end
  bool interrupted = false;
};

/// A bad-input error from the engines (shapes, contiguity): maps to ValueError in Python.
struct invalid_argument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline void check_problem(const Problem& p) {
  if (p.m < 1 || p.n < 1 || p.k < 1)
    throw invalid_argument("dffkit: X must be non-empty and n_components >= 1 (got m=" +
                           std::to_string(p.m) + ", n=" + std::to_string(p.n) +
                           ", k=" + std::to_string(p.k) + ")");
  if (p.loss != Loss::frobenius && p.loss != Loss::kullback_leibler)
    throw invalid_argument("dffkit: loss must be beta=2 (frobenius) or beta=1 (kullback-leibler)");
  if (p.group_offsets) {
    if (p.loss != Loss::frobenius)
      throw invalid_argument("dffkit: group-sparse NMF is defined for the Frobenius loss only");
    if (p.n_groups < 1 || p.group_offsets[0] != 0 || p.group_offsets[p.n_groups] != p.m)
      throw invalid_argument("dffkit: group offsets must start at 0 and end at m");
    for (std::int64_t g = 0; g < p.n_groups; ++g)
      if (p.group_offsets[g + 1] < p.group_offsets[g])
        throw invalid_argument("dffkit: group offsets must be non-decreasing");
  }
  if (p.lam < 0 || p.mu < 0 || p.l1_W < 0 || p.l2_W < 0 || p.l1_H < 0 || p.l2_H < 0)
    throw invalid_argument("dffkit: penalties must be >= 0");
}

}  // namespace dffkit
