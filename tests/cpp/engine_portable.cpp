// The CPU engine (cpp/nmf_mu_cpu.cpp) compiled on its own with whatever flags the test gives
// (tests/test_nmf.py::test_engine_builds_and_agrees_without_native_flags): the package is built
// with -march=native, so without this the code paths for machines without AVX-512 (other x86
// CPUs, ARM) would never be compiled here. Usage: engine_portable DIR. DIR/meta.txt: m n k dtype
// (f32, f64) loss (frobenius, kl) max_iter threads; DIR: X.bin, W.bin, H.bin. Writes W_out.bin,
// H_out.bin, out.txt (n_iter error_init error).
#include "nmf_mu_cpu.cpp"

#include <fstream>
#include <map>
#include <string>

#include "../emu/emu_io.hpp"

namespace {

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
  const dffkit::Result r = dffkit::fit_mu_cpu(X.data(), W.data(), H.data(), p, o);
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
