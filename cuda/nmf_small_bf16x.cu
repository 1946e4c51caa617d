// The resident fast path (nmf_small.cuh) for X rounded to bfloat16 as it is staged (bf16x): its kernels compile here
// once (the fp32 and tf32 engines call the same entry point), beside the other modes.
#include "nmf_engine.cuh"

namespace dffkit {
namespace cuda_detail {

std::vector<cuda::FitResult> small_solve_bf16x(const std::vector<Item>& items, const KParams& q,
                                               int device, cudaStream_t stream) {
  return small_solve<true>(items, q, device, stream);
}

}  // namespace cuda_detail
}  // namespace dffkit
