// Runs the resident fast path's kernels (cuda/nmf_small_kernel.cuh; cols 1: the column-split one,
// cuda/nmf_small_cols_kernel.cuh) on the CPU emulator, clusters included, for
// tests/test_cuda_emu.py. Usage: small_emu DIR. DIR/meta.txt holds "key value"
// lines (B m n k C bf16 tc cols max_iter tol l1_W l2_W l1_H l2_H mu update_H; tc: the tensor-core kernel;
// optional: gather, vec, push, the column-split kernel's switches); DIR holds X.bin (B x m x n),
// W.bin (B x m x k), H.bin (B x k x n), float32. Writes W_out.bin, H_out.bin and out.txt (per
// problem: n_iter error_init error).
#define DFFKIT_EMULATE 1
#include "nmf_small_cols_kernel.cuh"
#include "nmf_small_kernel.cuh"

#include "emu_io.hpp"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

using namespace dffkit::cuda_detail;

namespace {

using emu_io::read_meta;

std::vector<float> read_f32(const std::string& path, std::size_t count) {
  return emu_io::read_bin<float>(path, count);
}
void write_f32(const std::string& path, const std::vector<float>& v) {
  emu_io::write_bin(path, v.data(), v.size());
}

template <bool BF16, int K, bool TC>
void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  const i64 B = std::stoll(meta["B"]), m = std::stoll(meta["m"]), n = std::stoll(meta["n"]);
  const int k = std::stoi(meta["k"]), C = std::stoi(meta["C"]);
  auto X = read_f32(dir + "/X.bin", std::size_t(B * m * n));
  auto W = read_f32(dir + "/W.bin", std::size_t(B * m * k));
  auto H = read_f32(dir + "/H.bin", std::size_t(B * k * n));
  KParams q;
  q.max_iter = std::stoi(meta["max_iter"]);
  q.tol = std::stod(meta["tol"]);
  q.l1_W = std::stod(meta["l1_W"]); q.l2_W = std::stod(meta["l2_W"]);
  q.l1_H = std::stod(meta["l1_H"]); q.l2_H = std::stod(meta["l2_H"]);
  q.mu = std::stod(meta["mu"]);
  q.update_H = std::stoi(meta["update_H"]);
  q.small_cols_gather = meta.count("gather") ? std::stoi(meta["gather"]) : 0;
  q.small_cols_vec = meta.count("vec") ? std::stoi(meta["vec"]) : 0;
  q.small_cols_push = meta.count("push") ? std::stoi(meta["push"]) : 0;
  std::vector<SmallDesc> descs(static_cast<std::size_t>(B));
  for (i64 b = 0; b < B; ++b)
    descs[std::size_t(b)] = SmallDesc{X.data() + b * m * n, W.data() + b * m * k, H.data() + b * k * n, m, n, k};
  std::vector<ResOut> outs(static_cast<std::size_t>(B), ResOut{-1, -1.0, -1.0});
  if (meta.count("cols") && std::stoi(meta["cols"]) != 0)
    dffkit_emu::launch_cluster(small_cols_kernel<BF16, K>, dim3(unsigned(B * C)), dim3(SNT),
                               small_cols_layout(m, n, K, C, q.small_cols_push != 0).used, unsigned(C),
                               static_cast<const SmallDesc*>(descs.data()), q, outs.data(), C);
  else
    dffkit_emu::launch_cluster(small_kernel<BF16, K, TC>, dim3(unsigned(B * C)), dim3(SNT),
                               small_layout(m, n, K, C, TC).used, unsigned(C),
                               static_cast<const SmallDesc*>(descs.data()), q, outs.data(), C);
  write_f32(dir + "/W_out.bin", W);
  write_f32(dir + "/H_out.bin", H);
  std::ofstream o(dir + "/out.txt");
  o.precision(17);
  for (const auto& r : outs) o << r.n_iter << " " << r.error_init << " " << r.error << "\n";
}

template <bool BF16, bool TC>
void dispatch(const std::string& dir, std::map<std::string, std::string>& meta) {
  switch (small_width(std::stoll(meta["k"]))) {
    case 4: run<BF16, 4, TC>(dir, meta); break;
    case 5: run<BF16, 5, TC>(dir, meta); break;
    case 8: run<BF16, 8, TC>(dir, meta); break;
    case 12: run<BF16, 12, TC>(dir, meta); break;
    case 16: run<BF16, 16, TC>(dir, meta); break;
    default: throw std::runtime_error("k > 16");
  }
}

}  // namespace

int main(int argc, char** argv) {
  return emu_io::run_main(argc, argv, "small_emu", [](const std::string& dir, std::map<std::string, std::string>& meta) {
    const bool bf16 = std::stoi(meta["bf16"]) != 0, tc = std::stoi(meta["tc"]) != 0;
    if (bf16 && tc) dispatch<true, true>(dir, meta);
    else if (bf16) dispatch<true, false>(dir, meta);
    else if (tc) dispatch<false, true>(dir, meta);
    else dispatch<false, false>(dir, meta);
  });
}
