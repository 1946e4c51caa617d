#pragma once
/// Error handling of the CUDA backend: one macro checks every runtime call and launch and throws
/// a typed exception with file:line and the CUDA error name. Out of memory is a std::bad_alloc
/// (pybind11 maps it to MemoryError); every other CUDA failure is a cuda_error (RuntimeError);
/// bad input is dffkit::invalid_argument (ValueError). Nothing aborts.
#include <cuda_runtime.h>

#include <new>
#include <stdexcept>
#include <string>

namespace dffkit {

struct cuda_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct cuda_out_of_memory : std::bad_alloc {
  explicit cuda_out_of_memory(std::string msg) : msg_(std::move(msg)) {}
  const char* what() const noexcept override { return msg_.c_str(); }

 private:
  std::string msg_;
};

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  // Clear the non-sticky error so that the next call starts clean.
  cudaGetLastError();
  std::string msg = std::string("dffkit CUDA: ") + what + " failed at " + file + ":" +
                    std::to_string(line) + ": " + cudaGetErrorName(e) + " (" +
                    cudaGetErrorString(e) + ")";
  if (e == cudaErrorMemoryAllocation) throw cuda_out_of_memory(msg);
  throw cuda_error(msg);
}

}  // namespace dffkit

/// Check a CUDA runtime call.
#define DFFKIT_CUDA_TRY(call)                                                  \
  do {                                                                         \
    cudaError_t dffkit_err_ = (call);                                          \
    if (dffkit_err_ != cudaSuccess)                                            \
      ::dffkit::throw_cuda(dffkit_err_, #call, __FILE__, __LINE__);            \
  } while (0)

/// Check the launch just made (configuration errors surface here, faults at the next sync).
#define DFFKIT_CUDA_CHECK_LAUNCH(name)                                         \
  do {                                                                         \
    cudaError_t dffkit_err_ = cudaGetLastError();                              \
    if (dffkit_err_ != cudaSuccess)                                            \
      ::dffkit::throw_cuda(dffkit_err_, "launch of " name, __FILE__, __LINE__); \
  } while (0)
