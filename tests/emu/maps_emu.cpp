// Runs DFF's heat-map kernels (cuda/dff_maps.cuh) on the CPU emulator for
// tests/test_dff_maps_emu.py. Usage: maps_emu DIR. DIR/meta.txt holds "key value" lines: step
// (peaks, params or heat), n k h w H W, fused (0/1), nb (peaks, params: blocks per map), grid
// (heat: blocks), threshold_bits (heat, params: the float32 threshold's bits), joint (params: 0/1),
// rows (rows of W.bin). DIR holds W.bin (float32 rows x k), offsets.bin (int64, image t's first
// row), ty.bin, tx.bin (int32 taps), for heat params.bin (float32 n x 2k), for params parts.bin
// (float32 n x k x nb). Writes parts.bin (peaks: float32 n x k x nb), params.bin (params) or
// heat.bin (float32 n x k x H x W) and labels.bin (int16 n x H x W).
#define DFFKIT_EMULATE 1
#include "dff_maps.cuh"

#include <cstring>
#include <string>
#include <vector>

#include "emu_io.hpp"

using namespace dffkit::cuda_detail;

namespace {

void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  const int n = std::stoi(meta["n"]);
  const MapsShape s{std::stoi(meta["k"]), std::stoi(meta["h"]), std::stoi(meta["w"]),
                    std::stoi(meta["H"]), std::stoi(meta["W"])};
  const bool fused = std::stoi(meta["fused"]) != 0;
  const i64 rows = std::stoll(meta["rows"]);
  if (n < 1 || n > kMapsMaxImages) throw std::runtime_error("n must be in [1, 32] (one launch)");
  auto W = emu_io::read_bin<float>(dir + "/W.bin", std::size_t(rows * s.k));
  auto offsets = emu_io::read_bin<i64>(dir + "/offsets.bin", std::size_t(n));
  auto ty = emu_io::read_bin<int>(dir + "/ty.bin", std::size_t(4 * s.H));
  auto tx = emu_io::read_bin<int>(dir + "/tx.bin", std::size_t(4 * s.W));
  MapsBatch batch{};
  batch.n = n;
  for (int t = 0; t < n; ++t) {
    if (offsets[t] < 0 || offsets[t] + i64(s.h) * s.w > rows)
      throw std::runtime_error("an image's rows lie outside W");
    batch.maps[t] = W.data() + offsets[t] * s.k;
  }
  const i64 HW = i64(s.H) * s.W;
  if (meta["step"] == "peaks") {
    const int nb = std::stoi(meta["nb"]);
    std::vector<float> parts(std::size_t(n) * s.k * nb, 12345.f);
    auto kern = fused ? dff_peaks_kernel<true> : dff_peaks_kernel<false>;
    dffkit_emu::launch(kern, dim3(unsigned(nb), unsigned(s.k), unsigned(n)), dim3(kMapsThreads), 0,
                       batch, s, static_cast<const int*>(ty.data()), static_cast<const int*>(tx.data()),
                       nb, parts.data());
    emu_io::write_bin(dir + "/parts.bin", parts.data(), parts.size());
  } else if (meta["step"] == "heat") {
    const unsigned grid = unsigned(std::stoul(meta["grid"]));
    const std::uint32_t bits = std::uint32_t(std::stoul(meta["threshold_bits"]));
    float threshold;
    std::memcpy(&threshold, &bits, 4);
    auto params = emu_io::read_bin<float>(dir + "/params.bin", std::size_t(n) * 2 * s.k);
    std::vector<float> heat(std::size_t(n * s.k * HW), -7.f);
    std::vector<std::int16_t> labels(std::size_t(n * HW), -7);
    auto kern = fused ? dff_heat_labels_kernel<true> : dff_heat_labels_kernel<false>;
    dffkit_emu::launch(kern, dim3(grid), dim3(kMapsThreads), 0, batch, s,
                       static_cast<const int*>(ty.data()), static_cast<const int*>(tx.data()),
                       static_cast<const float*>(params.data()), threshold, heat.data(), labels.data());
    emu_io::write_bin(dir + "/heat.bin", heat.data(), heat.size());
    emu_io::write_bin(dir + "/labels.bin", labels.data(), labels.size());
  } else if (meta["step"] == "params") {
    const int nb = std::stoi(meta["nb"]);
    const std::uint32_t bits = std::uint32_t(std::stoul(meta["threshold_bits"]));
    float threshold;
    std::memcpy(&threshold, &bits, 4);
    auto parts = emu_io::read_bin<float>(dir + "/parts.bin", std::size_t(n) * s.k * nb);
    std::vector<float> params(std::size_t(n) * 2 * s.k, -7.f);
    dffkit_emu::launch(dff_params_kernel, dim3(1), dim3(kMapsThreads), 0,
                       static_cast<const float*>(parts.data()), n, s.k, nb, std::stoi(meta["joint"]) != 0,
                       threshold, params.data());
    emu_io::write_bin(dir + "/params.bin", params.data(), params.size());
  } else {
    throw std::runtime_error("step must be peaks, params or heat");
  }
}

}  // namespace

int main(int argc, char** argv) { return emu_io::run_main(argc, argv, "maps_emu", run); }
