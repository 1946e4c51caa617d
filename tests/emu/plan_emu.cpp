// The single-pass kernel's plan over the whole range it is documented to serve, for
// tests/test_cuda_emu.py: every n (a multiple of 4, of 8 for bfloat16) up to 512 and every k up
// to 32 must fit the shared memory of an H100/H200 block (227 KB). Prints one line per refusal
// and, last, "stages S count" lines for the tile buffers chosen.
#define DFFKIT_EMULATE 1
#include "nmf_fused.cuh"

#include <cstdio>
#include <map>

using namespace dffkit::cuda_detail;

int main() {
  const std::size_t limit = 227 * 1024;
  std::map<int, int> stages;
  int refused = 0;
  for (int xsize : {4, 2})
    for (i64 n = 4; n <= FNMAX; n += 4) {
      if (n % (16 / xsize) != 0) continue;
      for (i64 k = 1; k <= FKMAX; ++k) {
        const FusedPlan p = fused_plan(100000, n, k, 1 << 30, limit, xsize);
        if (!p.use || p.smem > limit || p.np < n || p.np % (32 * (4 / xsize)) != 0 || p.kp < k) {
          std::printf("refused xsize=%d n=%lld k=%lld smem=%zu\n", xsize, (long long)n, (long long)k, p.smem);
          ++refused;
        } else {
          ++stages[p.stages];
        }
      }
    }
  for (auto [s, c] : stages) std::printf("stages %d %d\n", s, c);
  return refused != 0;
}
