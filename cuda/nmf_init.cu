// Device queries, memory helpers, the workspace cache, init="random" (Philox, bit-identical to
// the CPU engine) and the value checks of device inputs.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "nmf_detail.hpp"
#include "nmf_sums.cuh"
#include "philox.hpp"

namespace dffkit {
namespace cuda_detail {
namespace {

using i64 = std::int64_t;

struct Pool {
  std::mutex mutex;
  std::map<std::pair<int, std::size_t>, std::vector<unsigned char*>> free_blocks;
  std::int64_t held = 0;
};
Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: blocks may be returned during interpreter exit
  return *p;
}

/// out[b, i] = sqrt(mean(X_b) / k) |N(0,1)| of element i of stream `stream_id` under seed + b.
template <class T>
__global__ void random_fill_kernel(T* out, i64 B, i64 per, const double* totals, i64 mn, i64 k,
                                   std::uint64_t seed, std::uint32_t stream_id) {
  for (i64 idx = i64(blockIdx.x) * blockDim.x + threadIdx.x; idx < B * per;
       idx += i64(gridDim.x) * blockDim.x) {
    const i64 b = idx / per, i = idx - b * per;
    const double scale = std::sqrt(totals[b] / double(mn) / double(k));
    out[idx] = T(scale * philox_half_normal(seed + std::uint64_t(b), stream_id, std::uint64_t(i)));
  }
}

/// The block's (256 threads) minimum of mn, "or" of bad and sum of sq, in smin[0], sbad[0] and
/// ssq[0] on return (the sums in a fixed tree order).
__device__ void block_stats(double mn, int bad, double sq, double* smin, int* sbad, double* ssq) {
  smin[threadIdx.x] = mn;
  sbad[threadIdx.x] = bad;
  ssq[threadIdx.x] = sq;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      smin[threadIdx.x] = fmin(smin[threadIdx.x], smin[threadIdx.x + s]);
      sbad[threadIdx.x] |= sbad[threadIdx.x + s];
      ssq[threadIdx.x] += ssq[threadIdx.x + s];
    }
    __syncthreads();
  }
}

/// Per block: the minimum of the finite values, whether any is not finite, the sum of the finite
/// values' squares (partials: mins, nonfinite, sqs at blockIdx.x).
template <class T>
__global__ void check_values_kernel(const T* X, i64 count, double* mins, int* nonfinite, double* sqs) {
  __shared__ double smin[256];
  __shared__ int sbad[256];
  __shared__ double ssq[256];
  double mn = INFINITY, sq = 0;
  int bad = 0;
  for (i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += i64(gridDim.x) * blockDim.x) {
    const double v = double(X[i]);
    if (!isfinite(v)) {
      bad = 1;
    } else {
      if (v < mn) mn = v;
      sq += v * v;
    }
  }
  block_stats(mn, bad, sq, smin, sbad, ssq);
  if (threadIdx.x == 0) {
    mins[blockIdx.x] = smin[0];
    nonfinite[blockIdx.x] = sbad[0];
    sqs[blockIdx.x] = ssq[0];
  }
}

/// check_values_kernel's `blocks` partials into out[0] (the minimum), out[1] (the sum of
/// squares) and the int at out + 2 (any non-finite): one block of 256, one copy to the host.
__global__ void check_values_final_kernel(const double* mins, const int* nonfinite, const double* sqs,
                                          int blocks, double* out) {
  __shared__ double smin[256];
  __shared__ int sbad[256];
  __shared__ double ssq[256];
  double mn = INFINITY, sq = 0;
  int bad = 0;
  for (int b = int(threadIdx.x); b < blocks; b += int(blockDim.x)) {
    mn = fmin(mn, mins[b]);
    bad |= nonfinite[b];
    sq += sqs[b];
  }
  block_stats(mn, bad, sq, smin, sbad, ssq);
  if (threadIdx.x == 0) {
    out[0] = smin[0];
    out[1] = ssq[0];
    reinterpret_cast<int*>(out + 2)[0] = sbad[0];
  }
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

Workspace::Workspace(int device, std::size_t bytes) : device_(device), bytes_(bytes) {
  if (bytes_ == 0) bytes_ = 256;
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_blocks.find({device_, bytes_});
    if (it != p.free_blocks.end() && !it->second.empty()) {
      data_ = it->second.back();
      it->second.pop_back();
      return;
    }
  }
  void* ptr = nullptr;
  cudaError_t e = cudaMalloc(&ptr, bytes_);
  if (e == cudaErrorMemoryAllocation) {
    // Give the cached blocks of this device back and try once more.
    cudaGetLastError();
    std::vector<unsigned char*> release;
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      for (auto& kv : p.free_blocks)
        if (kv.first.first == device_) {
          for (auto* b : kv.second) { release.push_back(b); p.held -= std::int64_t(kv.first.second); }
          kv.second.clear();
        }
    }
    for (auto* b : release) cudaFree(b);
    e = cudaMalloc(&ptr, bytes_);
  }
  if (e != cudaSuccess) throw_cuda(e, "cudaMalloc (workspace)", __FILE__, __LINE__);
  data_ = static_cast<unsigned char*>(ptr);
  std::lock_guard<std::mutex> lock(p.mutex);
  p.held += std::int64_t(bytes_);
}

Workspace::~Workspace() {
  if (!data_) return;
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.free_blocks[{device_, bytes_}].push_back(data_);
}

int require_device_pointer(std::uintptr_t ptr, const char* name) {
  if (ptr == 0) throw invalid_argument(std::string("dffkit._cuda: ") + name + " is a null pointer");
  cudaPointerAttributes attr{};
  cudaError_t e = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (e == cudaErrorInvalidValue)
      throw invalid_argument(std::string("dffkit._cuda: ") + name + " is not a device pointer");
    throw_cuda(e, "cudaPointerGetAttributes", __FILE__, __LINE__);
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw invalid_argument(std::string("dffkit._cuda: ") + name +
                           " is not device memory (pass a device array, or numpy through the "
                           "Python layer)");
  return attr.device;
}

void launch_fixed_order_sum(const void* X, i64 count, cuda::DType dt, bool square,
                            double* scratch, double* out, cudaStream_t stream) {
  const i64 nc = (count + kChunk - 1) / kChunk;
  const unsigned blocks = sum_blocks(nc), threads = 32 * kSumWarps;
  auto go = [&](auto kern, const auto* x) { kern<<<blocks, threads, 0, stream>>>(x, i64(1), count, scratch); };
  if (dt == cuda::DType::f32) {
    const auto* x = static_cast<const float*>(X);
    if (square) go(chunk_sum_kernel<float, true>, x); else go(chunk_sum_kernel<float, false>, x);
  } else {
    const auto* x = static_cast<const double*>(X);
    if (square) go(chunk_sum_kernel<double, true>, x); else go(chunk_sum_kernel<double, false>, x);
  }
  DFFKIT_CUDA_CHECK_LAUNCH("chunk_sum_kernel");
  ordered_total_kernel<<<1, 32, 0, stream>>>(scratch, 1, nc, out);
  DFFKIT_CUDA_CHECK_LAUNCH("ordered_total_kernel");
}

}  // namespace cuda_detail

namespace cuda {
using namespace cuda_detail;

std::pair<bool, std::string> probe() {
  // no driver at all (a machine with nvcc but no GPU): the runtime says "driver version is
  // insufficient", which sends people looking for a driver update; say what it is
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver == 0) {
    cudaGetLastError();
    return {false, "no NVIDIA driver is installed (no GPU, or its driver is missing)"};
  }
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return {false, std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e)};
  }
  if (count < 1) return {false, "no CUDA device found"};
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  if (driver < runtime) {
    return {false, "the CUDA driver (" + std::to_string(driver) + ") is older than the runtime "
                   "dffkit was built with (" + std::to_string(runtime) + ")"};
  }
  cudaDeviceProp prop{};
  e = cudaGetDeviceProperties(&prop, 0);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return {false, std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e)};
  }
  if (prop.major < 8)
    return {false, std::string("device 0 (") + prop.name + ") has compute capability " +
                       std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                       "; dffkit needs 8.0 or newer"};
  return {true, ""};
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

DeviceInfo device_info(int device) {
  const int count = device_count();
  if (device < 0 || device >= count)
    throw invalid_argument("dffkit._cuda.device_info: device " + std::to_string(device) +
                           " does not exist (" + std::to_string(count) + " devices)");
  cudaDeviceProp prop{};
  DFFKIT_CUDA_TRY(cudaGetDeviceProperties(&prop, device));
  DeviceInfo d;
  d.name = prop.name;
  d.cc_major = prop.major;
  d.cc_minor = prop.minor;
  d.sm_count = prop.multiProcessorCount;
  d.mem_bytes = std::int64_t(prop.totalGlobalMem);
  d.l2_bytes = prop.l2CacheSize;
  d.smem_per_block_optin = std::int64_t(prop.sharedMemPerBlockOptin);
  return d;
}

void random_init_strided(std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, i64 B, i64 m,
                         i64 n, i64 k, DType dt, std::uint64_t seed, std::uintptr_t stream) {
  if (B < 1 || m < 1 || n < 1 || k < 1)
    throw invalid_argument("dffkit._cuda.random_init: B, m, n, k must be >= 1");
  const int dev = require_device_pointer(X, "X");
  if (require_device_pointer(W, "W") != dev || require_device_pointer(H, "H") != dev)
    throw invalid_argument("dffkit._cuda.random_init: X, W and H must live on one device");
  DeviceGuard guard(dev);
  cudaStream_t s = as_stream(stream);
  const i64 nc = (m * n + kChunk - 1) / kChunk;
  Workspace ws(dev, std::size_t(B * nc + B) * sizeof(double));
  double* part = reinterpret_cast<double*>(ws.data());
  double* totals = part + B * nc;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    chunk_sum_kernel<T, false><<<sum_blocks(B * nc), 32 * kSumWarps, 0, s>>>(
        reinterpret_cast<const T*>(X), B, m * n, part);
    DFFKIT_CUDA_CHECK_LAUNCH("chunk_sum_kernel");
    ordered_total_kernel<<<sum_blocks(B), 32 * kSumWarps, 0, s>>>(part, B, nc, totals);
    DFFKIT_CUDA_CHECK_LAUNCH("ordered_total_kernel");
    auto fill = [&](T* out, i64 per, std::uint32_t id) {
      const i64 blocks = std::min<i64>((B * per + 255) / 256, 8192);
      random_fill_kernel<T><<<unsigned(blocks), 256, 0, s>>>(out, B, per, totals, m * n, k, seed, id);
      DFFKIT_CUDA_CHECK_LAUNCH("random_fill_kernel");
    };
    fill(reinterpret_cast<T*>(W), m * k, 0);
    fill(reinterpret_cast<T*>(H), k * n, 1);
  };
  if (dt == DType::f32) run(float{}); else run(double{});
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
}

void random_init(std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, i64 m, i64 n, i64 k,
                 DType dt, std::uint64_t seed, std::uintptr_t stream) {
  random_init_strided(X, W, H, 1, m, n, k, dt, seed, stream);
}

double fixed_order_sum(std::uintptr_t X, i64 count, DType dt, bool square, std::uintptr_t stream) {
  if (count < 1) throw invalid_argument("dffkit._cuda.fixed_order_sum: count must be >= 1");
  const int dev = require_device_pointer(X, "X");
  DeviceGuard guard(dev);
  cudaStream_t s = as_stream(stream);
  const i64 nc = (count + kChunk - 1) / kChunk;
  Workspace ws(dev, std::size_t(nc + 1) * sizeof(double));
  double* part = reinterpret_cast<double*>(ws.data());
  launch_fixed_order_sum(reinterpret_cast<const void*>(X), count, dt, square, part, part + nc, s);
  double total = 0;
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(&total, part + nc, sizeof(double), cudaMemcpyDeviceToHost, s));
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
  return total;
}

ValueStats check_values(std::uintptr_t X, i64 count, DType dt, std::uintptr_t stream) {
  if (count < 1) throw invalid_argument("dffkit._cuda.check_values: count must be >= 1");
  const int dev = require_device_pointer(X, "X");
  DeviceGuard guard(dev);
  cudaStream_t s = as_stream(stream);
  const int blocks = int(std::min<i64>((count + 255) / 256, 1024));
  // out (three doubles' room: the minimum, the sum of squares, then the flag), the blocks'
  // minima and sums of squares, their flags
  Workspace ws(dev, std::size_t(3 + 2 * blocks) * sizeof(double) + std::size_t(blocks) * sizeof(int));
  double* out = reinterpret_cast<double*>(ws.data());
  double* mins = out + 3;
  double* sqs = mins + blocks;
  int* bad = reinterpret_cast<int*>(sqs + blocks);
  if (dt == DType::f32)
    check_values_kernel<float><<<blocks, 256, 0, s>>>(reinterpret_cast<const float*>(X), count,
                                                      mins, bad, sqs);
  else
    check_values_kernel<double><<<blocks, 256, 0, s>>>(reinterpret_cast<const double*>(X), count,
                                                       mins, bad, sqs);
  DFFKIT_CUDA_CHECK_LAUNCH("check_values_kernel");
  check_values_final_kernel<<<1, 256, 0, s>>>(mins, bad, sqs, blocks, out);
  DFFKIT_CUDA_CHECK_LAUNCH("check_values_final_kernel");
  double host[3];
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(host, out, sizeof(host), cudaMemcpyDeviceToHost, s));
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
  int any_bad = 0;
  std::memcpy(&any_bad, &host[2], sizeof(int));
  return {host[0], any_bad != 0, host[1]};
}

std::uintptr_t device_malloc(i64 bytes, int device) {
  if (bytes < 0) throw invalid_argument("dffkit._cuda.device_malloc: negative size");
  DeviceGuard guard(device);
  void* p = nullptr;
  DFFKIT_CUDA_TRY(cudaMalloc(&p, std::size_t(bytes > 0 ? bytes : 1)));
  return reinterpret_cast<std::uintptr_t>(p);
}

void device_free(std::uintptr_t ptr, int device) noexcept {
  if (!ptr) return;
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) { cudaGetLastError(); return; }
  if (device >= 0 && device != prev) cudaSetDevice(device);
  cudaFree(reinterpret_cast<void*>(ptr));
  if (device >= 0 && device != prev) cudaSetDevice(prev);
  cudaGetLastError();
}

void memcpy_async(std::uintptr_t dst, std::uintptr_t src, i64 bytes, std::uintptr_t stream) {
  if (bytes <= 0) return;
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                                  std::size_t(bytes), cudaMemcpyDefault, as_stream(stream)));
}

void memcpy_to_host(void* dst, std::uintptr_t src, i64 bytes, std::uintptr_t stream) {
  if (bytes <= 0) return;
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(dst, reinterpret_cast<const void*>(src), std::size_t(bytes),
                                  cudaMemcpyDeviceToHost, as_stream(stream)));
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(as_stream(stream)));
}

void memcpy_from_host(std::uintptr_t dst, const void* src, i64 bytes, std::uintptr_t stream) {
  if (bytes <= 0) return;
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(reinterpret_cast<void*>(dst), src, std::size_t(bytes),
                                  cudaMemcpyHostToDevice, as_stream(stream)));
  // the host buffer may be freed as soon as we return
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(as_stream(stream)));
}

void stream_synchronize(std::uintptr_t stream) {
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(as_stream(stream)));
}

int pointer_device(std::uintptr_t ptr) {
  if (!ptr) return -1;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return -1;
  return attr.device;
}

int current_device() {
  int d = 0;
  DFFKIT_CUDA_TRY(cudaGetDevice(&d));
  return d;
}

std::int64_t workspace_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return p.held;
}

void release_workspaces() {
  Pool& p = pool();
  std::vector<std::pair<int, unsigned char*>> release;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    for (auto& kv : p.free_blocks) {
      for (auto* b : kv.second) {
        release.push_back({kv.first.first, b});
        p.held -= std::int64_t(kv.first.second);
      }
      kv.second.clear();
    }
  }
  for (auto& r : release) device_free(reinterpret_cast<std::uintptr_t>(r.second), r.first);
}

}  // namespace cuda
}  // namespace dffkit
