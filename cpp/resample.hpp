#pragma once
/// Bilinear resampling of stacks of float32 planes on the host, for the heat maps: separable,
/// two taps per output sample and axis, from index and weight tables the caller computes
/// (dffkit.deep_feature_factorization.bilinear_taps). No BLAS: a BLAS product here left
/// OpenBLAS's worker threads spinning after it, on the cores the next image's CNN wanted.
#include <cstdint>

namespace dffkit {

/// out (planes, H, W) from in (planes, h, w): out[p, y, x] = sum over the two taps of each axis
/// wy[t][y] wx[s][x] in[p, iy[t][y], ix[s][x]], computed as rows first (each input row
/// resampled to W samples), then columns. iy*/wy* have H entries, ix*/wx* W entries.
void resample_bilinear(const float* in, std::int64_t planes, std::int64_t h, std::int64_t w,
                       float* out, std::int64_t H, std::int64_t W, const std::int64_t* iy0,
                       const std::int64_t* iy1, const float* wy0, const float* wy1,
                       const std::int64_t* ix0, const std::int64_t* ix1, const float* wx0,
                       const float* wx1, int num_threads);

}  // namespace dffkit
