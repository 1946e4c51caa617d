// The resident fast path (nmf_small.cuh) for float32 X: its kernels compile here
// once (the fp32 and tf32 engines call the same entry point), beside the other modes.
#include "nmf_engine.cuh"

namespace dffkit {
namespace cuda_detail {

std::vector<cuda::FitResult> small_solve_f32(const std::vector<Item>& items, const KParams& q,
                                               int device, cudaStream_t stream) {
  return small_solve<false>(items, q, device, stream);
}

}  // namespace cuda_detail
}  // namespace dffkit
