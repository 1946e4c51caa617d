#pragma once
/// The CUDA engine's host API, in plain C++ types (no CUDA headers), so that the pybind11 module
/// is compiled by the host compiler. Pointers are device addresses passed as integers; `stream`
/// is a cudaStream_t as an integer (0: the legacy default stream). Every call returns only when
/// its work on `stream` is complete (results are read back to the host).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "nmf_types.hpp"

namespace dffkit {
namespace cuda {

enum class DType : int { f32 = 0, f64 = 1 };
/// fp32: CUDA cores, float32 everywhere. bf16x: X stored as bfloat16 in a workspace copy made
/// once per fit (half the bytes per pass), products accumulated in float32.
/// tf32: the products with X on tensor cores (not implemented yet: rejected with a ValueError).
enum class Precision : int { fp32 = 0, tf32 = 1, bf16x = 2 };

struct DeviceInfo {
  std::string name;
  int cc_major = 0, cc_minor = 0, sm_count = 0;
  std::int64_t mem_bytes = 0, l2_bytes = 0, smem_per_block_optin = 0;
};

/// Whether a driver and a device are usable, and if not, why (never throws).
std::pair<bool, std::string> probe();
int device_count();
DeviceInfo device_info(int device);

struct FitResult {
  int n_iter = 0;
  double error_init = 0, error = 0;
  std::vector<double> objective;  // filled when Options::record_objective
  // the kernels that ran: "resident", "resident-fast", "sweep", "gemm" (two passes over X per
  // iteration) or "gemm-fused" (one pass)
  std::string kernel;
};

/// Which engine fit() uses: chosen from the shape, or forced (tests, sanitizer runs).
enum class Engine : int { automatic = 0, resident = 1, sweep = 2, gemm = 3 };

/// Fit in place: X (m x n), W (m x k), H (k x n), row-major device memory of dtype dt, all on
/// one device. W and H hold the initial factors on entry and the result on exit.
FitResult fit(std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, const Problem& p,
              const Options& o, DType dt, Precision prec, std::uintptr_t stream,
              Engine engine = Engine::automatic);

/// One problem of a batch (pointers into device memory).
struct BatchItem {
  std::uintptr_t X = 0, W = 0, H = 0;
  std::int64_t m = 0, n = 0, k = 0;
};
/// Independent problems with the loss and penalties of `common` (its shapes and groups are
/// ignored), one thread block each, all iterations in one launch; each problem gets exactly the
/// result fit() gives it alone (same kernel, same order).
std::vector<FitResult> fit_batched(const std::vector<BatchItem>& items, const Problem& common,
                                   const Options& o, DType dt, Precision prec,
                                   std::uintptr_t stream);

/// init="random", bit-identical to random_init_cpu.
void random_init(std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, std::int64_t m,
                 std::int64_t n, std::int64_t k, DType dt, std::uint64_t seed,
                 std::uintptr_t stream);

/// init="random" for B problems of one shape stored back to back; problem b uses seed + b.
void random_init_strided(std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, std::int64_t B,
                         std::int64_t m, std::int64_t n, std::int64_t k, DType dt,
                         std::uint64_t seed, std::uintptr_t stream);

/// Sum of count elements (or of their squares) in the fixed chunked order of mean_fixed_order.
double fixed_order_sum(std::uintptr_t X, std::int64_t count, DType dt, bool square,
                       std::uintptr_t stream);

/// One pass over count elements: the minimum of the finite values, whether any value is NaN
/// or +-inf, and the sum of the finite values' squares (float64; a fixed tree order).
struct ValueStats {
  double min;
  bool nonfinite;
  double sum_sq;
};
ValueStats check_values(std::uintptr_t X, std::int64_t count, DType dt, std::uintptr_t stream);

/// Device memory for the Python device buffer.
std::uintptr_t device_malloc(std::int64_t bytes, int device);
void device_free(std::uintptr_t ptr, int device) noexcept;
void memcpy_async(std::uintptr_t dst, std::uintptr_t src, std::int64_t bytes,
                  std::uintptr_t stream);
void memcpy_to_host(void* dst, std::uintptr_t src, std::int64_t bytes, std::uintptr_t stream);
void memcpy_from_host(std::uintptr_t dst, const void* src, std::int64_t bytes,
                      std::uintptr_t stream);
void stream_synchronize(std::uintptr_t stream);
/// The device that owns ptr, or -1 when ptr is not device (or managed) memory.
int pointer_device(std::uintptr_t ptr);
int current_device();
/// The largest n_components fit (engine "auto"; batched: fit_batched) serves for X with n columns
/// of dt in precision mode prec (kl: the Kullback-Leibler loss) with `limit` bytes of shared
/// memory per block: the limit of the on-chip statistics, from the engines' layouts.
int max_components(std::int64_t n, DType dt, Precision prec, bool kl, std::size_t limit,
                   bool batched);
/// Bytes held by the workspace cache (for the tests of steady-state allocation).
std::int64_t workspace_bytes();
void release_workspaces();

/// DFF's heat maps (cuda/dff_maps.cu), asynchronous on `stream` (unlike the calls above: the
/// caller's library reads the results back on that stream). maps: one device address per image,
/// its h*w x k block of W (float32, row-major, row y*w + x); taps_y / taps_x: int32 device arrays
/// [i0, i1, bits of w0, bits of w1] of H / W entries each (bilinear_taps(H, h), (W, w)); fused:
/// blend the taps as fma(w0, a0, w1*a1) instead of two rounded products and a rounded sum (the
/// arithmetic of the host's resample_bilinear as compiled). Bad arguments throw invalid_argument.
/// parts (float32, maps.size() x k x blocks_per_map): block b's maximum of concept j's map of
/// image t at [t][j][b].
void dff_map_peaks(const std::vector<std::uintptr_t>& maps, std::int64_t k, std::int64_t h,
                   std::int64_t w, std::int64_t H, std::int64_t W, std::uintptr_t taps_y,
                   std::uintptr_t taps_x, std::int64_t blocks_per_map, std::uintptr_t parts,
                   bool fused, std::uintptr_t stream);
/// DFF heat maps, between the two steps: the heat step's params (float32, n x 2k: each image's
/// k divisors, then its k strengths) from the peaks step's partial maxima parts (float32,
/// n x k x nb) on the device, as the host computes them (cuda/dff_maps.cuh,
/// dff_params_kernel); joint: strengths relative to each concept's largest maximum over the n
/// images, else to the image's own. Asynchronous on `stream`.
void dff_map_params(std::uintptr_t parts, std::int64_t n, std::int64_t k, std::int64_t nb,
                    bool joint, float threshold, std::uintptr_t params, std::uintptr_t stream);
/// params: float32 (maps.size(), 2k), each image's divisors then its strengths. heat: float32
/// (maps.size(), k, H, W) = clip(upsampled / divisor, 0, 1); labels: int16 (maps.size(), H, W),
/// the first j of the largest heat * strength, -1 below threshold.
void dff_heat_labels(const std::vector<std::uintptr_t>& maps, std::int64_t k, std::int64_t h,
                     std::int64_t w, std::int64_t H, std::int64_t W, std::uintptr_t taps_y,
                     std::uintptr_t taps_x, std::uintptr_t params, float threshold,
                     std::uintptr_t heat, std::uintptr_t labels, bool fused,
                     std::uintptr_t stream);

}  // namespace cuda
}  // namespace dffkit
