// Separable bilinear resampling (see resample.hpp). Per plane: the h input rows resampled to W
// samples into a scratch (h x W), then each output row the blend of two scratch rows, a loop
// the compiler vectorises. Planes are independent: OpenMP over planes when there is enough work.
#include "resample.hpp"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "threads.hpp"

namespace dffkit {

void resample_bilinear(const float* in, std::int64_t planes, std::int64_t h, std::int64_t w,
                       float* out, std::int64_t H, std::int64_t W, const std::int64_t* iy0,
                       const std::int64_t* iy1, const float* wy0, const float* wy1,
                       const std::int64_t* ix0, const std::int64_t* ix1, const float* wx0,
                       const float* wx1, int num_threads) {
  using i64 = std::int64_t;
  const int nt = usable_threads(num_threads);
  const bool parallel = nt > 1 && planes > 1 && planes * H * W >= (i64(1) << 20);
#pragma omp parallel num_threads(nt) if (parallel)
  {
    std::vector<float> rows(std::size_t(h * W));
#pragma omp for schedule(static)
    for (i64 p = 0; p < planes; ++p) {
      const float* a = in + p * h * w;
      for (i64 y = 0; y < h; ++y) {
        const float* src = a + y * w;
        float* dst = rows.data() + y * W;
        for (i64 x = 0; x < W; ++x) dst[x] = wx0[x] * src[ix0[x]] + wx1[x] * src[ix1[x]];
      }
      float* o = out + p * H * W;
      for (i64 y = 0; y < H; ++y) {
        const float* r0 = rows.data() + iy0[y] * W;
        const float* r1 = rows.data() + iy1[y] * W;
        const float c0 = wy0[y], c1 = wy1[y];
        float* dst = o + y * W;
        for (i64 x = 0; x < W; ++x) dst[x] = c0 * r0[x] + c1 * r1[x];
      }
    }
  }
}

}  // namespace dffkit
