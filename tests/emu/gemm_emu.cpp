// Runs the gemm engine's kernels (cuda/nmf_gemm.cuh) on the CPU emulator for tests/test_cuda_emu.py.
// Usage: gemm_emu DIR. DIR/meta.txt holds "key value" lines (m n k dtype first vec l1 l2 lam
// ngroups max_slices; dtype f32, tf32 (tensor cores), f32split (tensor cores, 3xTF32), f64, bf16x
// or bf16xsplit); DIR holds X.bin (float32, float64, or bfloat16 bits for the bf16x types), W.bin, H.bin,
// GH.bin (T), goff.bin (int64, ngroups + 1), gnorm.bin (float64, ngroups x k). Writes W_new.bin,
// Ppart.bin (S x k x n), Gpart.bin (S x k x k), GHpart.bin (H H^T over slices of H's columns), d0.bin and gg.bin (float64 per N block) and
// plan.txt.
#define DFFKIT_EMULATE 1
#include "nmf_gemm.cuh"

#include "emu_io.hpp"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

using namespace dffkit::cuda_detail;

namespace {

using emu_io::read_bin;
using emu_io::read_meta;
using emu_io::write_bin;

template <class T, class XS, int KP, int MODE>
void run_kp(const std::string& dir, std::map<std::string, std::string>& meta) {
  const i64 m = std::stoll(meta["m"]), n = std::stoll(meta["n"]);
  const int k = std::stoi(meta["k"]);
  const int first = std::stoi(meta["first"]);
  const i64 ng = std::stoll(meta["ngroups"]);
  auto X = read_bin<XS>(dir + "/X.bin", std::size_t(m * n));
  auto W = read_bin<T>(dir + "/W.bin", std::size_t(m * k));
  auto H = read_bin<T>(dir + "/H.bin", std::size_t(k * n));
  auto GH = read_bin<T>(dir + "/GH.bin", std::size_t(k * k));
  auto goff = read_bin<i64>(dir + "/goff.bin", ng ? std::size_t(ng + 1) : 0);
  auto gnorm = read_bin<double>(dir + "/gnorm.bin", std::size_t(ng * k));

  KParams q;
  q.l1_W = std::stod(meta["l1"]);
  q.l2_W = std::stod(meta["l2"]);
  q.lam = std::stod(meta["lam"]);
  q.groups = ng > 0 && q.lam > 0;

  const GemmPlan plan = gemm_plan(m, n, k, std::stoll(meta["max_slices"]));
  std::vector<T> Ppart(std::size_t(plan.slices * k * n), T(-7)), Gpart(std::size_t(plan.slices * k * k), T(-7));
  std::vector<double> d0(std::size_t(plan.n_blocks), -7.0), gg(std::size_t(plan.n_blocks), -7.0);

  GemmArgs<T, XS> a;
  a.X = X.data(); a.W = W.data(); a.H = H.data(); a.GH = GH.data();
  a.m = m; a.n = n; a.k = k;
  a.vec = std::stoi(meta["vec"]) && n % 4 == 0;
  a.goff = ng ? goff.data() : nullptr; a.ngroups = ng; a.gnorm = gnorm.data();
  a.Ppart = Ppart.data(); a.Gpart = Gpart.data(); a.d0part = d0.data(); a.ggpart = gg.data();
  a.slice_rows = plan.slice_rows;
  int stopped = 0;

  dffkit_emu::launch(gemm_n_kernel<T, XS, KP, MODE>, dim3(unsigned(plan.n_blocks)), dim3(NT),
                     gemm_n_smem<T>(KP, MODE), a, q, static_cast<const int*>(&stopped), first);
  dffkit_emu::launch(gemm_p_kernel<T, XS, KP, MODE>, dim3(unsigned(plan.col_blocks), unsigned(plan.slices)),
                     dim3(NT), gemm_p_smem<T>(KP), a, static_cast<const int*>(&stopped));
  dffkit_emu::launch(gemm_gram_kernel<T, KP>, dim3(unsigned(plan.slices)), dim3(NT),
                     gemm_gram_smem<T>(KP), static_cast<const T*>(W.data()), m, k, i64(k), i64(1),
                     plan.slice_rows, Gpart.data(), static_cast<const int*>(&stopped));
  std::vector<T> GHpart(std::size_t(plan.h_slices * k * k), T(-7));
  dffkit_emu::launch(gemm_gram_kernel<T, KP>, dim3(unsigned(plan.h_slices)), dim3(NT),
                     gemm_gram_smem<T>(KP), static_cast<const T*>(H.data()), n, k, i64(1), n,
                     plan.h_slice_cols, GHpart.data(), static_cast<const int*>(&stopped));

  write_bin(dir + "/W_new.bin", W.data(), W.size());
  write_bin(dir + "/Ppart.bin", Ppart.data(), Ppart.size());
  write_bin(dir + "/Gpart.bin", Gpart.data(), Gpart.size());
  write_bin(dir + "/GHpart.bin", GHpart.data(), GHpart.size());
  write_bin(dir + "/d0.bin", d0.data(), d0.size());
  write_bin(dir + "/gg.bin", gg.data(), gg.size());
  std::ofstream p(dir + "/plan.txt");
  p << "kp " << plan.kp << "\nn_blocks " << plan.n_blocks << "\ncol_blocks " << plan.col_blocks
    << "\nslices " << plan.slices << "\nslice_rows " << plan.slice_rows << "\nh_slices "
    << plan.h_slices << "\nh_slice_cols " << plan.h_slice_cols << "\n";
}

template <class T, class XS, int MODE>
void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  switch (gemm_kp(std::stoll(meta["k"]))) {
    case 16: run_kp<T, XS, 16, MODE>(dir, meta); break;
    case 32: run_kp<T, XS, 32, MODE>(dir, meta); break;
    case 64: run_kp<T, XS, 64, MODE>(dir, meta); break;
    default: throw std::runtime_error("k > 64");
  }
}

}  // namespace

int main(int argc, char** argv) {
  return emu_io::run_main(argc, argv, "gemm_emu", [](const std::string& dir, std::map<std::string, std::string>& meta) {
    const std::string dt = meta["dtype"];
    if (dt == "f32") run<float, float, 0>(dir, meta);
    else if (dt == "tf32") run<float, float, 1>(dir, meta);
    else if (dt == "f32split") run<float, float, 2>(dir, meta);
    else if (dt == "bf16xsplit") run<float, __nv_bfloat16, 2>(dir, meta);
    else if (dt == "f64") run<double, double, 0>(dir, meta);
    else if (dt == "bf16x") run<float, __nv_bfloat16, 0>(dir, meta);
    else throw std::runtime_error("dtype must be f32, tf32, f32split, f64, bf16x or bf16xsplit");
  });
}
