#pragma once
/// The CPU engine: multiplicative-update NMF (Frobenius and KL, scikit-learn's penalties,
/// group-sparse W term), one pass over X per iteration, OpenMP over row chunks, reductions in
/// a fixed order so results do not depend on the number of threads.
#include <cstdint>
#include <functional>
#include <vector>

#include "nmf_types.hpp"

namespace dffkit {

/// Called once per iteration from the calling thread; returning true stops the fit
/// (Result::interrupted). May be empty.
using StopFn = std::function<bool()>;

/// Called from the calling thread at each tol test (every 10 iterations when tol > 0) with the
/// iteration and its error, before the test (scikit-learn's verbose output). May be empty.
using ProgressFn = std::function<void(int, double)>;

/// The end of iteration `it`, shared by the engines: the progress report and the tol test
/// (check: every 10 iterations when tol > 0; the decrease since the last test, relative to the
/// initial error), then the caller's stop request (Result::interrupted). True: stop now.
inline bool end_of_iteration(int it, bool check, double err, double tol, double& prev,
                             const StopFn& should_stop, const ProgressFn& progress,
                             Result& res) {
  if (check && progress) progress(it, err);
  if (check) {
    if ((prev - err) / res.error_init < tol) return true;
    prev = err;
  }
  if (should_stop && should_stop()) {
    res.interrupted = true;
    return true;
  }
  return false;
}

/// Fit in place. X: m*n, W: m*k, H: k*n, row-major host memory. W and H hold the initial
/// factors on entry and the result on exit. If objective is non-null, the objective
/// (1/2 err^2 + penalties for Frobenius, the divergence + penalties for KL) after each
/// iteration is appended to it.
template <class T>
Result fit_mu_cpu(const T* X, T* W, T* H, const Problem& p, const Options& o,
                  const StopFn& should_stop = {}, std::vector<double>* objective = nullptr,
                  const ProgressFn& progress = {});

/// One problem of a batch: pointers into caller-owned memory.
template <class T>
struct BatchItem {
  const T* X;
  T* W;
  T* H;
  Problem problem;
  Result result;
};

/// Solve independent problems in parallel (OpenMP over problems, one thread each). Each item
/// gets exactly the result fit_mu_cpu would give it alone.
template <class T>
void fit_mu_cpu_batched(std::vector<BatchItem<T>>& items, const Options& o,
                        const StopFn& should_stop = {});

/// scikit-learn's error sqrt(2 * beta-divergence(X, WH)) computed with one pass over X.
template <class T>
double beta_error_cpu(const T* X, const T* W, const T* H, const Problem& p, int num_threads = 0);

/// Mean of X in float64 with the fixed chunked order shared by both backends
/// (kMeanChunk consecutive elements summed in order, then the chunk sums in order).
constexpr std::int64_t kMeanChunk = 4096;
template <class T>
double mean_fixed_order(const T* X, std::int64_t count, int num_threads = 0);

/// init="random": W = s |N(0,1)| (stream 0), H = s |N(0,1)| (stream 1), s = sqrt(mean(X)/k),
/// from Philox under `seed`.
template <class T>
void random_init_cpu(const T* X, T* W, T* H, std::int64_t m, std::int64_t n, std::int64_t k,
                     std::uint64_t seed, int num_threads = 0);

/// random_init_cpu with mean(X) given (sparse X computes it from its stored entries).
template <class T>
void random_init_from_mean(double mean, T* W, T* H, std::int64_t m, std::int64_t n,
                           std::int64_t k, std::uint64_t seed, int num_threads = 0);

/// How this engine was compiled: "name=value" lines (compiler, instruction_sets: those the
/// kernels were compiled for (-march=native builds for the building machine), vector_bytes,
/// vector_registers, random_init, openmp, sanitizers). Constant data: reading it runs none of
/// the engine's code. `dffkit info` shows it; the package refuses an engine built for
/// instructions the CPU lacks.
extern const char engine_build_text[];

}  // namespace dffkit
