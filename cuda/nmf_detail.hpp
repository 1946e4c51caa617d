#pragma once
// Host-side helpers shared by the CUDA translation units: the workspace cache, the device guard,
// and launchers defined in one .cu and used in another.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "cuda_check.hpp"
#include "nmf_cuda.hpp"

namespace dffkit {
namespace cuda_detail {

/// Makes the device that owns the data current for the duration of a call, and restores the
/// caller's current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DFFKIT_CUDA_TRY(cudaGetDevice(&previous_));
    if (device >= 0 && device != previous_) {
      DFFKIT_CUDA_TRY(cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

/// A device block from the workspace cache, returned to the cache when destroyed. Blocks are
/// pooled per (device, size): a steady stream of calls of one shape allocates nothing after the
/// first, and concurrent calls (several threads) each get their own block.
class Workspace {
 public:
  Workspace(int device, std::size_t bytes);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  unsigned char* data() const { return data_; }

 private:
  int device_;
  std::size_t bytes_;
  unsigned char* data_ = nullptr;
};

/// Carves aligned pieces out of a byte range (first pass: count; second pass: hand out).
struct Carver {
  unsigned char* base = nullptr;
  std::size_t offset = 0;
  template <class U>
  U* take(std::int64_t count) {
    offset = (offset + 255) & ~std::size_t(255);
    U* p = base ? reinterpret_cast<U*>(base + offset) : nullptr;
    offset += std::size_t(count > 0 ? count : 0) * sizeof(U);
    return p;
  }
};

/// One problem for the engines: device pointers and its shape.
struct Item {
  std::uintptr_t X, W, H;
  std::int64_t m, n, k;
};

/// The engines of one precision mode (nmf_mu_<mode>.cu) and its element sizes.
struct Engines {
  std::vector<cuda::FitResult> (*resident)(const std::vector<Item>& items, const Problem& p,
                                           const Options& o, int device, cudaStream_t stream);
  cuda::FitResult (*sweep)(const Item& item, const Problem& p, const Options& o, int device,
                           cudaStream_t stream);
  /// the sweep engine's driver with the gemm engine's products (nmf_gemm.cuh)
  cuda::FitResult (*gemm)(const Item& item, const Problem& p, const Options& o, int device,
                          cudaStream_t stream);
  int esz, xsz;  // bytes of a factor element, of an element of X as the kernels read it
};
Engines engines_f32();
Engines engines_tf32();
Engines engines_bf16x();
Engines engines_f64();

struct KParams;  // nmf_kernels.cuh

/// The resident engine's fast path (nmf_small.cuh), compiled once in nmf_small_{f32,bf16x}.cu:
/// float32 X as is, or rounded to bfloat16 as it is staged (bf16x). For the items that
/// small_cluster() accepts; results in the items' order.
std::vector<cuda::FitResult> small_solve_f32(const std::vector<Item>& items, const KParams& q,
                                             int device, cudaStream_t stream);
std::vector<cuda::FitResult> small_solve_bf16x(const std::vector<Item>& items, const KParams& q,
                                               int device, cudaStream_t stream);

/// Device that owns ptr (throws invalid_argument when it is not device memory).
int require_device_pointer(std::uintptr_t ptr, const char* name);

/// sum over chunks of 4096 consecutive elements (each summed in order in float64), then the
/// chunk sums in order, of x (square = false) or x^2 (square = true); result in *out (device).
/// scratch: ceil(count / 4096) doubles.
void launch_fixed_order_sum(const void* X, std::int64_t count, cuda::DType dt, bool square,
                            double* scratch, double* out, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace dffkit
