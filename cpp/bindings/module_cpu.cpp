// pybind11 module dffkit._cpu: the CPU engine. Arrays are checked, never converted: the Python
// layer makes the one deliberate copy (dtype, contiguity) before calling in.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdio>
#include <omp.h>
#include <string>
#include <vector>

#include "nmf_mu_cpu.hpp"
#include "nmf_mu_sparse.hpp"
#include "params.hpp"
#include "resample.hpp"
#include "threads.hpp"

namespace py = pybind11;
using namespace dffkit;
using i64 = std::int64_t;

namespace {

template <class T>
T* data_of(const py::array& a, const char* name, i64 rows, i64 cols, bool writable) {
  if (!py::isinstance<py::array_t<T>>(a) || a.dtype().kind() != 'f' || a.itemsize() != sizeof(T))
    throw invalid_argument(std::string("dffkit._cpu: ") + name + " has the wrong dtype");
  if (a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != cols)
    throw invalid_argument(std::string("dffkit._cpu: ") + name + " must have shape (" +
                           std::to_string(rows) + ", " + std::to_string(cols) + ")");
  if (!(a.flags() & py::array::c_style))
    throw invalid_argument(std::string("dffkit._cpu: ") + name + " must be C-contiguous");
  if (writable && !a.writeable())
    throw invalid_argument(std::string("dffkit._cpu: ") + name + " must be writeable");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

/// Polls Python signals (Ctrl-C) at most every 50 ms from the calling thread.
struct SignalPoller {
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  bool operator()() {
    const auto now = std::chrono::steady_clock::now();
    if (now - last < std::chrono::milliseconds(50)) return false;
    last = now;
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
  }
};

using bindings::Params;

/// With params.verbose: scikit-learn's line at each tol test, printed through Python's print
/// (so sys.stdout redirections see it), the time counted from the call.
ProgressFn progress_printer(const Params& q) {
  if (!q.verbose) return {};
  const auto start = std::chrono::steady_clock::now();
  return [start](int it, double err) {
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    char line[128];
    std::snprintf(line, sizeof line, "Epoch %02d reached after %.3f seconds, error: %f", it, secs,
                  err);
    py::gil_scoped_acquire gil;
    py::print(line);
  };
}

Problem make_problem(i64 m, i64 n, i64 k, const Params& q, const std::vector<i64>* groups) {
  return bindings::make_problem(m, n, k, q, groups, "dffkit._cpu");
}
using bindings::make_options;

py::dict result_dict(const Result& r, const std::vector<double>* obj) {
  py::dict d;
  d["n_iter"] = r.n_iter;
  d["error_init"] = r.error_init;
  d["error"] = r.error;
  if (obj) d["objective"] = *obj;
  return d;
}

void raise_if_interrupted(const Result& r) {
  if (r.interrupted && PyErr_Occurred()) throw py::error_already_set();
}

template <class T>
py::dict fit_t(const py::array& X, py::array& W, py::array& H, const Params& q,
               const std::vector<i64>& groups) {
  if (X.ndim() != 2) throw invalid_argument("dffkit._cpu: X must be 2-D");
  const i64 m = X.shape(0), n = X.shape(1), k = W.ndim() == 2 ? W.shape(1) : -1;
  const T* x = data_of<T>(X, "X", m, n, false);
  T* w = data_of<T>(W, "W", m, k, true);
  T* h = data_of<T>(H, "H", k, n, true);
  const Problem p = make_problem(m, n, k, q, &groups);
  const Options o = make_options(q);
  std::vector<double> obj;
  Result r;
  {
    py::gil_scoped_release nogil;
    SignalPoller poll;
    r = fit_mu_cpu<T>(x, w, h, p, o, std::ref(poll), q.record_objective ? &obj : nullptr,
                      progress_printer(q));
  }
  raise_if_interrupted(r);
  return result_dict(r, q.record_objective ? &obj : nullptr);
}

template <class T>
py::list fit_batched_t(const std::vector<py::array>& Xs, std::vector<py::array>& Ws,
                       std::vector<py::array>& Hs, const Params& q) {
  const std::size_t B = Xs.size();
  if (Ws.size() != B || Hs.size() != B)
    throw invalid_argument("dffkit._cpu: X, W and H lists must have the same length");
  std::vector<BatchItem<T>> items(B);
  for (std::size_t b = 0; b < B; ++b) {
    if (Xs[b].ndim() != 2 || Ws[b].ndim() != 2)
      throw invalid_argument("dffkit._cpu: every X and W must be 2-D");
    const i64 m = Xs[b].shape(0), n = Xs[b].shape(1), k = Ws[b].shape(1);
    items[b].X = data_of<T>(Xs[b], "X[b]", m, n, false);
    items[b].W = data_of<T>(Ws[b], "W[b]", m, k, true);
    items[b].H = data_of<T>(Hs[b], "H[b]", k, n, true);
    items[b].problem = make_problem(m, n, k, q, nullptr);
    check_problem(items[b].problem);
  }
  const Options o = make_options(q);
  bool interrupted = false;
  {
    py::gil_scoped_release nogil;
    SignalPoller poll;
    StopFn stop = [&]() { return interrupted = interrupted || poll(); };
    fit_mu_cpu_batched<T>(items, o, stop);
  }
  if (interrupted && PyErr_Occurred()) throw py::error_already_set();
  py::list out;
  for (auto& it : items) out.append(result_dict(it.result, nullptr));
  return out;
}

bool is_f32(const py::array& a) { return py::isinstance<py::array_t<float>>(a); }
bool is_f64(const py::array& a) { return py::isinstance<py::array_t<double>>(a); }

/// A CSR view of (indptr int64, indices int32, data T) for a rows x cols matrix, checked.
template <class T>
CsrView<T> csr_of(const py::tuple& csr, const char* name) {
  if (csr.size() != 5)
    throw invalid_argument(std::string("dffkit._cpu: ") + name +
                           " must be (indptr, indices, data, rows, cols)");
  for (int i = 0; i < 3; ++i)  // arrays only: a list would become a temporary, freed on return
    if (!py::isinstance<py::array>(csr[i]))
      throw invalid_argument(std::string("dffkit._cpu: ") + name +
                             ": indptr, indices and data must be numpy arrays");
  const py::array indptr = csr[0], indices = csr[1], data = csr[2];
  CsrView<T> v;
  v.rows = csr[3].cast<i64>();
  v.cols = csr[4].cast<i64>();
  auto vec = [&](const py::array& a, const char* what, bool ok_type, i64 len) {
    if (!ok_type || a.ndim() != 1 || !(a.flags() & py::array::c_style) || a.shape(0) != len)
      throw invalid_argument(std::string("dffkit._cpu: ") + name + "." + what +
                             " has the wrong dtype, shape or layout");
  };
  if (v.rows < 1 || v.cols < 1)
    throw invalid_argument(std::string("dffkit._cpu: ") + name + " must be non-empty");
  vec(indptr, "indptr", py::isinstance<py::array_t<i64>>(indptr) && indptr.dtype().kind() == 'i',
      v.rows + 1);
  v.indptr = static_cast<const i64*>(indptr.data());
  const i64 nnz = v.indptr[v.rows];
  vec(indices, "indices",
      py::isinstance<py::array_t<std::int32_t>>(indices) && indices.dtype().kind() == 'i', nnz);
  vec(data, "data", py::isinstance<py::array_t<T>>(data) && data.dtype().kind() == 'f', nnz);
  v.indices = static_cast<const std::int32_t*>(indices.data());
  v.data = static_cast<const T*>(data.data());
  check_csr(v, name);
  return v;
}

template <class T>
py::dict fit_sparse_t(const py::tuple& Xc, const py::object& Xtc, py::array& W, py::array& H,
                      const Params& q) {
  const CsrView<T> X = csr_of<T>(Xc, "X");
  if (Xtc.is_none() && q.update_H)
    throw invalid_argument("dffkit._cpu.fit_sparse: X.T is needed when H is updated");
  const CsrView<T> Xt = Xtc.is_none() ? CsrView<T>{} : csr_of<T>(Xtc.cast<py::tuple>(), "X.T");
  const i64 m = X.rows, n = X.cols, k = W.ndim() == 2 ? W.shape(1) : -1;
  T* w = data_of<T>(W, "W", m, k, true);
  T* h = data_of<T>(H, "H", k, n, true);
  const Problem p = make_problem(m, n, k, q, nullptr);
  const Options o = make_options(q);
  std::vector<double> obj;
  Result r;
  {
    py::gil_scoped_release nogil;
    SignalPoller poll;
    r = fit_mu_cpu_sparse<T>(X, Xt, w, h, p, o, std::ref(poll),
                             q.record_objective ? &obj : nullptr, progress_printer(q));
  }
  raise_if_interrupted(r);
  return result_dict(r, q.record_objective ? &obj : nullptr);
}

bool csr_is_f32(const py::tuple& csr) { return csr.size() == 5 && is_f32(csr[2]); }
bool csr_is_f64(const py::tuple& csr) { return csr.size() == 5 && is_f64(csr[2]); }

}  // namespace

PYBIND11_MODULE(_cpu, mod) {
  mod.doc() = "dffkit CPU engine (C++17/OpenMP): multiplicative-update NMF";
  bindings::bind_params<Params>(mod);

  mod.def(
      "fit",
      [](const py::array& X, py::array& W, py::array& H, const Params& q,
         const std::vector<i64>& groups) {
        if (is_f32(X)) return fit_t<float>(X, W, H, q, groups);
        if (is_f64(X)) return fit_t<double>(X, W, H, q, groups);
        throw invalid_argument("dffkit._cpu.fit: X must be float32 or float64");
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("params"),
      py::arg("group_offsets") = std::vector<i64>{},
      "Fit W (m x k) and H (k x n) in place for X (m x n); all C-contiguous, same dtype.");
  mod.def(
      "fit_batched",
      [](const std::vector<py::array>& Xs, std::vector<py::array>& Ws, std::vector<py::array>& Hs,
         const Params& q) {
        if (Xs.empty()) return py::list();
        if (is_f32(Xs[0])) return fit_batched_t<float>(Xs, Ws, Hs, q);
        if (is_f64(Xs[0])) return fit_batched_t<double>(Xs, Ws, Hs, q);
        throw invalid_argument("dffkit._cpu.fit_batched: X must be float32 or float64");
      },
      py::arg("Xs"), py::arg("Ws"), py::arg("Hs"), py::arg("params"));
  mod.def(
      "random_init",
      [](const py::array& X, py::array& W, py::array& H, std::uint64_t seed, int num_threads) {
        const i64 m = X.shape(0), n = X.shape(1), k = W.shape(1);
        auto run = [&](auto tag) {
          using T = decltype(tag);
          const T* x = data_of<T>(X, "X", m, n, false);
          T* w = data_of<T>(W, "W", m, k, true);
          T* h = data_of<T>(H, "H", k, n, true);
          py::gil_scoped_release nogil;
          random_init_cpu<T>(x, w, h, m, n, k, seed, num_threads);
        };
        if (X.ndim() != 2 || W.ndim() != 2) throw invalid_argument("random_init: 2-D arrays");
        if (is_f32(X)) return run(float{});
        if (is_f64(X)) return run(double{});
        throw invalid_argument("dffkit._cpu.random_init: X must be float32 or float64");
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("seed"), py::arg("num_threads") = 0,
      "init='random': W, H = sqrt(mean(X)/k) |N(0,1)| from Philox(seed), in place.");
  mod.def(
      "beta_error",
      [](const py::array& X, const py::array& W, const py::array& H, int beta) {
        if (X.ndim() != 2 || W.ndim() != 2) throw invalid_argument("beta_error: 2-D arrays");
        const i64 m = X.shape(0), n = X.shape(1), k = W.shape(1);
        Params q;
        q.beta = beta;
        const Problem p = make_problem(m, n, k, q, nullptr);
        auto run = [&](auto tag) {
          using T = decltype(tag);
          const T* x = data_of<T>(X, "X", m, n, false);
          const T* w = data_of<T>(W, "W", m, k, false);
          const T* h = data_of<T>(H, "H", k, n, false);
          py::gil_scoped_release nogil;
          return beta_error_cpu<T>(x, w, h, p, 0);
        };
        if (is_f32(X)) return run(float{});
        if (is_f64(X)) return run(double{});
        throw invalid_argument("dffkit._cpu.beta_error: X must be float32 or float64");
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("beta"),
      "scikit-learn's error sqrt(2 * beta-divergence(X, W H)), one pass over X.");
  mod.def(
      "resample_bilinear",
      [](const py::array_t<float, py::array::c_style>& src, i64 H, i64 W,
         const py::array_t<i64, py::array::c_style>& iy0, const py::array_t<i64, py::array::c_style>& iy1,
         const py::array_t<float, py::array::c_style>& wy0, const py::array_t<float, py::array::c_style>& wy1,
         const py::array_t<i64, py::array::c_style>& ix0, const py::array_t<i64, py::array::c_style>& ix1,
         const py::array_t<float, py::array::c_style>& wx0, const py::array_t<float, py::array::c_style>& wx1,
         int num_threads) {
        if (src.ndim() != 3) throw invalid_argument("resample_bilinear: src must be (planes, h, w)");
        const i64 planes = src.shape(0), h = src.shape(1), w = src.shape(2);
        if (h < 1 || w < 1 || H < 1 || W < 1) throw invalid_argument("resample_bilinear: empty planes");
        auto check = [](const auto& a, i64 len, const char* name) {
          if (a.ndim() != 1 || a.shape(0) != len)
            throw invalid_argument(std::string("resample_bilinear: ") + name + " must have " +
                                   std::to_string(len) + " entries");
        };
        check(iy0, H, "iy0"); check(iy1, H, "iy1"); check(wy0, H, "wy0"); check(wy1, H, "wy1");
        check(ix0, W, "ix0"); check(ix1, W, "ix1"); check(wx0, W, "wx0"); check(wx1, W, "wx1");
        auto in_range = [](const py::array_t<i64, py::array::c_style>& a, i64 n, const char* name) {
          const i64* d = a.data();
          for (i64 i = 0; i < a.shape(0); ++i)
            if (d[i] < 0 || d[i] >= n)
              throw invalid_argument(std::string("resample_bilinear: ") + name + " out of range");
        };
        in_range(iy0, h, "iy0"); in_range(iy1, h, "iy1"); in_range(ix0, w, "ix0"); in_range(ix1, w, "ix1");
        py::array_t<float> out({planes, H, W});
        float* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          resample_bilinear(src.data(), planes, h, w, o, H, W, iy0.data(), iy1.data(), wy0.data(),
                            wy1.data(), ix0.data(), ix1.data(), wx0.data(), wx1.data(), num_threads);
        }
        return out;
      },
      py::arg("src"), py::arg("H"), py::arg("W"), py::arg("iy0"), py::arg("iy1"), py::arg("wy0"),
      py::arg("wy1"), py::arg("ix0"), py::arg("ix1"), py::arg("wx0"), py::arg("wx1"),
      py::arg("num_threads") = 0,
      "Separable bilinear resampling of float32 (planes, h, w) to (planes, H, W) from two taps "
      "per output row and column (no BLAS).");
  mod.def(
      "fit_sparse",
      [](const py::tuple& X, const py::object& Xt, py::array& W, py::array& H, const Params& q) {
        if (csr_is_f32(X)) return fit_sparse_t<float>(X, Xt, W, H, q);
        if (csr_is_f64(X)) return fit_sparse_t<double>(X, Xt, W, H, q);
        throw invalid_argument("dffkit._cpu.fit_sparse: X's data must be float32 or float64");
      },
      py::arg("X"), py::arg("Xt"), py::arg("W"), py::arg("H"), py::arg("params"),
      "Fit W, H in place for sparse X given as CSR tuples (indptr int64, indices int32, data, "
      "rows, cols) of X and of X^T (None when update_H is false).");
  mod.def(
      "beta_error_sparse",
      [](const py::tuple& Xc, const py::array& W, const py::array& H, int beta) {
        auto run = [&](auto tag) {
          using T = decltype(tag);
          const CsrView<T> X = csr_of<T>(Xc, "X");
          const i64 k = W.ndim() == 2 ? W.shape(1) : -1;
          Params q;
          q.beta = beta;
          const Problem p = make_problem(X.rows, X.cols, k, q, nullptr);
          const T* w = data_of<T>(W, "W", X.rows, k, false);
          const T* h = data_of<T>(H, "H", k, X.cols, false);
          py::gil_scoped_release nogil;
          return beta_error_sparse<T>(X, w, h, p, 0);
        };
        if (csr_is_f32(Xc)) return run(float{});
        if (csr_is_f64(Xc)) return run(double{});
        throw invalid_argument("dffkit._cpu.beta_error_sparse: data must be float32 or float64");
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("beta"),
      "scikit-learn's error sqrt(2 * beta-divergence(X, W H)) for sparse X (a CSR tuple).");
  mod.def(
      "random_init_sparse",
      [](const py::tuple& Xc, py::array& W, py::array& H, std::uint64_t seed, int num_threads) {
        auto run = [&](auto tag) {
          using T = decltype(tag);
          const CsrView<T> X = csr_of<T>(Xc, "X");
          const i64 k = W.ndim() == 2 ? W.shape(1) : -1;
          T* w = data_of<T>(W, "W", X.rows, k, true);
          T* h = data_of<T>(H, "H", k, X.cols, true);
          py::gil_scoped_release nogil;
          random_init_from_mean<T>(mean_sparse(X), w, h, X.rows, X.cols, k, seed, num_threads);
        };
        if (csr_is_f32(Xc)) return run(float{});
        if (csr_is_f64(Xc)) return run(double{});
        throw invalid_argument("dffkit._cpu.random_init_sparse: data must be float32 or float64");
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("seed"), py::arg("num_threads") = 0,
      "init='random' for sparse X: the start random_init gives the dense X, bit for bit.");
  mod.def("max_threads", []() { return dffkit::usable_threads(0); });
  mod.attr("build_info") = py::str(dffkit::engine_build_text);
}
