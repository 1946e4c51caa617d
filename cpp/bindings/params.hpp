#pragma once
/// The solver parameters as both Python modules take them (_cpu.Params, _cuda.Params), and
/// their conversion to the engines' shared Problem/Options types: written once for both.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "nmf_types.hpp"

namespace dffkit {
namespace bindings {

struct Params {
  int beta = 2;
  double l1_W = 0, l2_W = 0, l1_H = 0, l2_H = 0, lam = 0, mu = 0;
  int max_iter = 200;
  double tol = 1e-4;
  bool update_H = true, record_objective = false;
  int num_threads = 0;  // CPU threads (0: OpenMP's default); unused on the GPU
  int verbose = 0;      // CPU: scikit-learn's line at each tol test; unused on the GPU
};

/// Problem for an m x n matrix at rank k; groups: n_groups + 1 offsets or empty/null.
inline Problem make_problem(std::int64_t m, std::int64_t n, std::int64_t k, const Params& q,
                            const std::vector<std::int64_t>* groups, const char* module) {
  Problem p;
  p.m = m; p.n = n; p.k = k;
  if (q.beta != 1 && q.beta != 2)
    throw invalid_argument(std::string(module) + ": beta must be 1 or 2");
  p.loss = q.beta == 2 ? Loss::frobenius : Loss::kullback_leibler;
  p.l1_W = q.l1_W; p.l2_W = q.l2_W; p.l1_H = q.l1_H; p.l2_H = q.l2_H;
  p.lam = q.lam; p.mu = q.mu;
  if (groups && !groups->empty()) {
    p.group_offsets = groups->data();
    p.n_groups = std::int64_t(groups->size()) - 1;
  }
  return p;
}

inline Options make_options(const Params& q) {
  Options o;
  o.max_iter = q.max_iter; o.tol = q.tol; o.update_H = q.update_H;
  o.record_objective = q.record_objective; o.num_threads = q.num_threads;
  return o;
}

/// The Python class of a Params type (Params itself or one that derives from it).
template <class P>
pybind11::class_<P> bind_params(pybind11::module_& mod) {
  pybind11::class_<P> cls(mod, "Params");
  cls.def(pybind11::init<>())
      .def_readwrite("beta", &P::beta)
      .def_readwrite("l1_W", &P::l1_W)
      .def_readwrite("l2_W", &P::l2_W)
      .def_readwrite("l1_H", &P::l1_H)
      .def_readwrite("l2_H", &P::l2_H)
      .def_readwrite("lam", &P::lam)
      .def_readwrite("mu", &P::mu)
      .def_readwrite("verbose", &P::verbose)
      .def_readwrite("max_iter", &P::max_iter)
      .def_readwrite("tol", &P::tol)
      .def_readwrite("update_H", &P::update_H)
      .def_readwrite("record_objective", &P::record_objective)
      .def_readwrite("num_threads", &P::num_threads);
  return cls;
}

}  // namespace bindings
}  // namespace dffkit
