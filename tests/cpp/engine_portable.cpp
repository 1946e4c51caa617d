// The CPU engines (cpp/nmf_mu_cpu.cpp, and cpp/nmf_mu_sparse.cpp given to the compiler beside
// this file) compiled on their own with whatever flags the test gives
// (tests/test_nmf.py::test_engine_builds_and_agrees_without_native_flags): the package is built
// with -march=native, so without this the code paths for machines without AVX-512 (other x86
// CPUs, ARM) would never be compiled here. Usage: engine_portable DIR. DIR/meta.txt: m n k dtype
// (f32, f64) loss (frobenius, kl) max_iter threads sparse (0: the dense engine; 1: the sparse
// one, on X's nonzero entries); DIR: X.bin (dense), W.bin, H.bin. Writes W_out.bin, H_out.bin,
// out.txt (n_iter error_init error).
#include "nmf_mu_cpu.cpp"
#include "nmf_mu_sparse.hpp"

#include <fstream>
#include <map>
#include <string>

#include "../emu/emu_io.hpp"

namespace {

/// The CSR of a dense m x n matrix (its nonzero entries).
template <class T>
struct Csr {
  std::vector<std::int64_t> indptr;
  std::vector<std::int32_t> indices;
  std::vector<T> data;
  dffkit::CsrView<T> view(std::int64_t rows, std::int64_t cols) const {
    return {rows, cols, indptr.data(), indices.data(), data.data()};
  }
};

template <class T>
Csr<T> csr_of(const std::vector<T>& X, std::int64_t m, std::int64_t n, bool transpose) {
  Csr<T> c;
  const std::int64_t rows = transpose ? n : m, cols = transpose ? m : n;
  c.indptr.push_back(0);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t q = 0; q < cols; ++q) {
      const T v = transpose ? X[q * n + r] : X[r * n + q];
      if (v != T(0)) {
        c.indices.push_back(std::int32_t(q));
        c.data.push_back(v);
      }
    }
    c.indptr.push_back(std::int64_t(c.data.size()));
  }
  return c;
}

template <class T>
void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  dffkit::Problem p;
  p.m = std::stoll(meta["m"]);
  p.n = std::stoll(meta["n"]);
  p.k = std::stoll(meta["k"]);
  p.loss = meta["loss"] == "kl" ? dffkit::Loss::kullback_leibler : dffkit::Loss::frobenius;
  dffkit::Options o;
  o.max_iter = std::stoi(meta["max_iter"]);
  o.tol = 0;
  o.num_threads = std::stoi(meta["threads"]);
  const auto mn = std::size_t(p.m * p.n), mk = std::size_t(p.m * p.k), kn = std::size_t(p.k * p.n);
  auto X = emu_io::read_bin<T>(dir + "/X.bin", mn);
  auto W = emu_io::read_bin<T>(dir + "/W.bin", mk);
  auto H = emu_io::read_bin<T>(dir + "/H.bin", kn);
  dffkit::Result r;
  if (meta["sparse"] == "1") {
    const Csr<T> rows = csr_of(X, p.m, p.n, false), cols = csr_of(X, p.m, p.n, true);
    r = dffkit::fit_mu_cpu_sparse(rows.view(p.m, p.n), cols.view(p.n, p.m), W.data(), H.data(), p, o);
  } else {
    r = dffkit::fit_mu_cpu(X.data(), W.data(), H.data(), p, o);
  }
  emu_io::write_bin(dir + "/W_out.bin", W.data(), mk);
  emu_io::write_bin(dir + "/H_out.bin", H.data(), kn);
  std::ofstream(dir + "/out.txt") << r.n_iter << " " << r.error_init << " " << r.error << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  return emu_io::run_main(argc, argv, "engine_portable", [](const std::string& dir, auto& meta) {
    if (meta["dtype"] == "f64")
      run<double>(dir, meta);
    else
      run<float>(dir, meta);
  });
}
