// Host launchers of DFF's heat-map kernels (cuda/dff_maps.cuh): argument checks, launch
// geometry, launch checks. Both calls are asynchronous on `stream` (the caller's library reads
// the results back on that stream); launch failures throw at once, faults at the caller's next
// synchronisation.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <string>

#include "dff_maps.cuh"
#include "nmf_detail.hpp"

namespace dffkit {
namespace cuda_detail {
namespace {

[[noreturn]] void bad(const char* fn, const std::string& what) {
  throw invalid_argument(std::string("dffkit._cuda.") + fn + ": " + what);
}

void check_extent(const char* fn, const char* name, i64 v, i64 hi) {
  if (v < 1 || v > hi)
    bad(fn, std::string(name) + " must be in [1, " + std::to_string(hi) + "], got " +
                std::to_string(v));
}

/// The device of `ptr` (device memory, aligned to `align` bytes), which must be `device` unless
/// that is -1.
int device_of(const char* fn, std::uintptr_t ptr, const std::string& name, std::size_t align,
              int device) {
  const int d = require_device_pointer(ptr, name.c_str());
  if (ptr % align != 0)
    bad(fn, name + " must be aligned to " + std::to_string(align) +
                " bytes (pass the array itself or a view starting at an element)");
  if (device >= 0 && d != device)
    bad(fn, name + " is on device " + std::to_string(d) + ", the maps on device " +
                std::to_string(device) + "; pass arrays of one device");
  return d;
}

struct Checked {
  MapsShape shape;
  int device;
};

Checked check_common(const char* fn, const std::vector<std::uintptr_t>& maps, i64 k, i64 h,
                     i64 w, i64 H, i64 W, std::uintptr_t taps_y, std::uintptr_t taps_x) {
  if (maps.empty()) bad(fn, "maps is empty; pass one (h*w, k) block of W per image");
  check_extent(fn, "k", k, 65535);
  check_extent(fn, "h", h, INT_MAX);
  check_extent(fn, "w", w, INT_MAX);
  check_extent(fn, "H", H, INT_MAX);
  check_extent(fn, "W", W, INT_MAX);
  const int dev = device_of(fn, maps[0], "maps[0]", 4, -1);
  for (std::size_t t = 1; t < maps.size(); ++t)
    device_of(fn, maps[t], "maps[" + std::to_string(t) + "]", 4, dev);
  device_of(fn, taps_y, "taps_y", 4, dev);
  device_of(fn, taps_x, "taps_x", 4, dev);
  return {MapsShape{int(k), int(h), int(w), int(H), int(W)}, dev};
}

/// The images [first, first + n) of `maps` as one launch's batch.
MapsBatch batch_of(const std::vector<std::uintptr_t>& maps, std::size_t first, int n) {
  MapsBatch b{};
  b.n = n;
  for (int t = 0; t < n; ++t) b.maps[t] = reinterpret_cast<const float*>(maps[first + t]);
  return b;
}

}  // namespace
}  // namespace cuda_detail

namespace cuda {

using cuda_detail::kMapsMaxImages;
using cuda_detail::kMapsThreads;
using i64 = std::int64_t;

void dff_map_peaks(const std::vector<std::uintptr_t>& maps, i64 k, i64 h, i64 w, i64 H, i64 W,
                   std::uintptr_t taps_y, std::uintptr_t taps_x, i64 blocks_per_map,
                   std::uintptr_t parts, bool fused, std::uintptr_t stream) {
  const char* fn = "dff_map_peaks";
  const auto c = cuda_detail::check_common(fn, maps, k, h, w, H, W, taps_y, taps_x);
  cuda_detail::check_extent(fn, "blocks_per_map", blocks_per_map, 65535);
  cuda_detail::device_of(fn, parts, "parts", 4, c.device);
  cuda_detail::DeviceGuard guard(c.device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int* ty = reinterpret_cast<const int*>(taps_y);
  const int* tx = reinterpret_cast<const int*>(taps_x);
  for (std::size_t first = 0; first < maps.size(); first += kMapsMaxImages) {
    const int n = int(std::min<std::size_t>(kMapsMaxImages, maps.size() - first));
    float* out = reinterpret_cast<float*>(parts) + i64(first) * k * blocks_per_map;
    const dim3 grid{unsigned(blocks_per_map), unsigned(k), unsigned(n)};
    const auto batch = cuda_detail::batch_of(maps, first, n);
    if (fused)
      cuda_detail::dff_peaks_kernel<true><<<grid, kMapsThreads, 0, s>>>(batch, c.shape, ty, tx,
                                                                      int(blocks_per_map), out);
    else
      cuda_detail::dff_peaks_kernel<false><<<grid, kMapsThreads, 0, s>>>(batch, c.shape, ty, tx,
                                                                       int(blocks_per_map), out);
    DFFKIT_CUDA_CHECK_LAUNCH("dff_peaks_kernel");
  }
}

void dff_map_params(std::uintptr_t parts, i64 n, i64 k, i64 nb, bool joint, float threshold,
                    std::uintptr_t params, std::uintptr_t stream) {
  const char* fn = "dff_map_params";
  cuda_detail::check_extent(fn, "n", n, INT_MAX);
  cuda_detail::check_extent(fn, "k", k, 65535);
  cuda_detail::check_extent(fn, "nb", nb, 65535);
  const int dev = cuda_detail::device_of(fn, parts, "parts", 4, -1);
  cuda_detail::device_of(fn, params, "params", 4, dev);
  cuda_detail::DeviceGuard guard(dev);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cuda_detail::dff_params_kernel<<<1, kMapsThreads, 0, s>>>(
      reinterpret_cast<const float*>(parts), int(n), int(k), int(nb), joint, threshold,
      reinterpret_cast<float*>(params));
  DFFKIT_CUDA_CHECK_LAUNCH("dff_params_kernel");
}

void dff_heat_labels(const std::vector<std::uintptr_t>& maps, i64 k, i64 h, i64 w, i64 H, i64 W,
                     std::uintptr_t taps_y, std::uintptr_t taps_x, std::uintptr_t params,
                     float threshold, std::uintptr_t heat, std::uintptr_t labels, bool fused,
                     std::uintptr_t stream) {
  const char* fn = "dff_heat_labels";
  const auto c = cuda_detail::check_common(fn, maps, k, h, w, H, W, taps_y, taps_x);
  cuda_detail::device_of(fn, params, "params", 4, c.device);
  cuda_detail::device_of(fn, heat, "heat", 4, c.device);
  cuda_detail::device_of(fn, labels, "labels", 2, c.device);
  cuda_detail::DeviceGuard guard(c.device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int* ty = reinterpret_cast<const int*>(taps_y);
  const int* tx = reinterpret_cast<const int*>(taps_x);
  const i64 HW = H * W;
  for (std::size_t first = 0; first < maps.size(); first += kMapsMaxImages) {
    const int n = int(std::min<std::size_t>(kMapsMaxImages, maps.size() - first));
    const auto batch = cuda_detail::batch_of(maps, first, n);
    const float* par = reinterpret_cast<const float*>(params) + i64(first) * 2 * k;
    float* ht = reinterpret_cast<float*>(heat) + i64(first) * k * HW;
    std::int16_t* lb = reinterpret_cast<std::int16_t*>(labels) + i64(first) * HW;
    const unsigned grid = cuda_detail::maps_grid(i64(n) * HW);
    if (fused)
      cuda_detail::dff_heat_labels_kernel<true><<<grid, kMapsThreads, 0, s>>>(
          batch, c.shape, ty, tx, par, threshold, ht, lb);
    else
      cuda_detail::dff_heat_labels_kernel<false><<<grid, kMapsThreads, 0, s>>>(
          batch, c.shape, ty, tx, par, threshold, ht, lb);
    DFFKIT_CUDA_CHECK_LAUNCH("dff_heat_labels_kernel");
  }
}

}  // namespace cuda
}  // namespace dffkit
