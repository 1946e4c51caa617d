// Runs the CUDA engine's fixed-order sums (cuda/nmf_sums.cuh: chunk_sum_kernel, then
// ordered_total_kernel, as init="random" and _cuda.fixed_order_sum launch them) on the CPU
// emulator for tests/test_sums_emu.py. Usage: sums_emu DIR. DIR/meta.txt holds "key value"
// lines: dtype (f32 or f64), B, count, square (0/1), step (chunks: both kernels over X.bin, B x
// count values; total: ordered_total_kernel alone over X.bin read as B x count float64 chunk
// sums). Writes totals.bin (float64 B) and, for chunks, parts.bin (float64 B x chunks).
#define DFFKIT_EMULATE 1
#include "nmf_sums.cuh"

#include <string>
#include <vector>

#include "emu_io.hpp"

using namespace dffkit::cuda_detail;

namespace {

template <class T>
void chunks(const std::string& dir, i64 B, i64 count, bool square) {
  auto X = emu_io::read_bin<T>(dir + "/X.bin", std::size_t(B * count));
  const i64 nc = (count + kChunk - 1) / kChunk;
  std::vector<double> part(std::size_t(B * nc), 12345.0), totals(std::size_t(B), 12345.0);
  auto kern = square ? chunk_sum_kernel<T, true> : chunk_sum_kernel<T, false>;
  dffkit_emu::launch(kern, dim3(sum_blocks(B * nc)), dim3(32 * kSumWarps), 0,
                     static_cast<const T*>(X.data()), B, count, part.data());
  dffkit_emu::launch(ordered_total_kernel, dim3(sum_blocks(B)), dim3(32 * kSumWarps), 0,
                     static_cast<const double*>(part.data()), B, nc, totals.data());
  emu_io::write_bin(dir + "/parts.bin", part.data(), part.size());
  emu_io::write_bin(dir + "/totals.bin", totals.data(), totals.size());
}

void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  const i64 B = std::stoll(meta["B"]), count = std::stoll(meta["count"]);
  const bool square = std::stoi(meta["square"]) != 0;
  if (meta["step"] == "total") {
    auto part = emu_io::read_bin<double>(dir + "/X.bin", std::size_t(B * count));
    std::vector<double> totals(std::size_t(B), 12345.0);
    dffkit_emu::launch(ordered_total_kernel, dim3(sum_blocks(B)), dim3(32 * kSumWarps), 0,
                       static_cast<const double*>(part.data()), B, count, totals.data());
    emu_io::write_bin(dir + "/totals.bin", totals.data(), totals.size());
  } else if (meta["dtype"] == "f32") {
    chunks<float>(dir, B, count, square);
  } else {
    chunks<double>(dir, B, count, square);
  }
}

}  // namespace

int main(int argc, char** argv) { return emu_io::run_main(argc, argv, "sums_emu", run); }
