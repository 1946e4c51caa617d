#pragma once
/// The CPU engine for sparse X (scipy.sparse from Python): the same multiplicative updates as
/// fit_mu_cpu, with X touched only at its stored entries. X comes twice, by rows (CSR) for the
/// W step and by columns (the CSR of X^T) for the H step, so both steps gather and no thread
/// writes what another reads: the results do not depend on the thread count.
#include <cstdint>
#include <vector>

#include "nmf_mu_cpu.hpp"

namespace dffkit {

/// A CSR matrix in caller-owned memory: row r's entries are indices/data[indptr[r] ..
/// indptr[r + 1]), column indices sorted and without duplicates.
template <class T>
struct CsrView {
  std::int64_t rows = 0, cols = 0;
  const std::int64_t* indptr = nullptr;
  const std::int32_t* indices = nullptr;
  const T* data = nullptr;
  std::int64_t nnz() const { return indptr[rows]; }
};

/// Checks a CSR view (shape, monotone indptr, indices in range and increasing within a row);
/// throws invalid_argument naming `name` otherwise.
template <class T>
void check_csr(const CsrView<T>& A, const char* name);

/// fit_mu_cpu for sparse X: X (m x n) by rows, Xt (n x m) the same matrix by columns (not
/// read, and may be empty, when H is not updated).
/// Frobenius and KL, the ordinary penalties, update_H = false, tol, the objective record;
/// no groups (group-sparse NMF is for dense CNN features). The Frobenius error is
/// ||X||^2 - 2 <X, WH> + <W^T W, H H^T> summed in float64 (the entries of WH away from X's are
/// never formed), KL's the divergence over X's entries plus sum(WH), as scikit-learn does.
template <class T>
Result fit_mu_cpu_sparse(const CsrView<T>& X, const CsrView<T>& Xt, T* W, T* H,
                         const Problem& p, const Options& o, const StopFn& should_stop = {},
                         std::vector<double>* objective = nullptr,
                         const ProgressFn& progress = {});

/// scikit-learn's error sqrt(2 * beta-divergence(X, WH)) for sparse X.
template <class T>
double beta_error_sparse(const CsrView<T>& X, const T* W, const T* H, const Problem& p,
                         int num_threads = 0);

/// mean_fixed_order of the dense X, bit for bit, from its stored entries (the zeros add
/// nothing to the chunk sums), so that init="random" starts where the dense X would.
template <class T>
double mean_sparse(const CsrView<T>& X);

}  // namespace dffkit
