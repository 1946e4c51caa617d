// The full-pass error kernel (error_kernel, cuda/nmf_engine_kernels.cuh) on the CPU emulator, for
// tests/test_cuda_emu.py: one launch, its per-block partials out.
// Usage: error_emu DIR. DIR/meta.txt: m n k dtype (f32, f64, bf16x: float with X as bfloat16)
// kl blocks (0: error_blocks(m, n), as the engines launch it) stopped (1: the launch must return
// at once); DIR: X.bin (T, or bfloat16 bits), W.bin, H.bin. Writes spart.bin (float64, one per
// block; -7 where a block wrote nothing) and blocks.txt (the engines' block count).
#define DFFKIT_EMULATE 1
#include "nmf_engine_kernels.cuh"

#include <fstream>
#include <string>
#include <vector>

#include "emu_io.hpp"

using namespace dffkit::cuda_detail;

namespace {

template <class T, class XS>
void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  const i64 m = std::stoll(meta["m"]), n = std::stoll(meta["n"]);
  const int k = std::stoi(meta["k"]);
  const auto X = emu_io::read_bin<XS>(dir + "/X.bin", std::size_t(m * n));
  const auto W = emu_io::read_bin<T>(dir + "/W.bin", std::size_t(m * k));
  const auto H = emu_io::read_bin<T>(dir + "/H.bin", std::size_t(i64(k) * n));
  const i64 engine_blocks = error_blocks(m, n);
  const i64 blocks = std::stoll(meta["blocks"]) > 0 ? std::stoll(meta["blocks"]) : engine_blocks;
  State st{};
  st.stopped = std::stoi(meta["stopped"]);
  std::vector<double> sp(std::size_t(blocks), -7.0);
  dffkit_emu::launch(error_kernel<T, XS>, dim3(unsigned(blocks)), dim3(NT), 0, static_cast<const State*>(&st),
                     X.data(), W.data(), H.data(), m, n, k, std::stoi(meta["kl"]), sp.data());
  emu_io::write_bin(dir + "/spart.bin", sp.data(), sp.size());
  std::ofstream(dir + "/blocks.txt") << engine_blocks << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  return emu_io::run_main(argc, argv, "error_emu", [](const std::string& dir, std::map<std::string, std::string>& meta) {
    const std::string dt = meta["dtype"];
    if (dt == "f32") run<float, float>(dir, meta);
    else if (dt == "f64") run<double, double>(dir, meta);
    else if (dt == "bf16x") run<float, __nv_bfloat16>(dir, meta);
    else throw std::runtime_error("dtype must be f32, f64 or bf16x");
  });
}
