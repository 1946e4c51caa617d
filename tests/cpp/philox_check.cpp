// init="random"'s host fill (cpp/philox_fill.hpp: a machine vector of draws at a time where the
// build has vector FMA) against philox_half_normal one element at a time, bit for bit, in
// float64 and float32, over seeds, both streams, offsets (counters above 2^32 included) and
// lengths with tails (tests/test_nmf.py::test_random_fill_is_the_scalar_draws_in_every_build
// builds it with the package's flags and the portable ones). Prints "checked N fallback F
// simd S": F elements whose first counter gave no accepted pair, S 1 where the vector path
// was compiled. Exit status 1 on the first mismatch.
#include <cstdio>
#include <cstring>
#include <vector>

#include "philox_fill.hpp"

template <class T>
bool check(std::uint64_t seed, std::uint32_t stream, std::uint64_t first, std::int64_t count,
           double scale, long* checked, long* fallback) {
  std::vector<T> out(count + 1);
  out[count] = T(-7);  // the fill must stop at count
  dffkit::philox_fill_scaled(out.data(), count, scale, seed, stream, first);
  for (std::int64_t i = 0; i < count; ++i) {
    const T want = T(scale * dffkit::philox_half_normal(seed, stream, first + std::uint64_t(i)));
    if (std::memcmp(&want, &out[i], sizeof(T)) != 0) {
      std::printf("mismatch: seed %llu stream %u index %llu: %.17g != %.17g\n",
                  (unsigned long long)seed, stream, (unsigned long long)(first + i), double(out[i]),
                  double(want));
      return false;
    }
    // an element whose first counter has no accepted pair (the vector path's fallback)
    dffkit::philox_u32x4 c{{std::uint32_t(first + i), std::uint32_t((first + i) >> 32), stream, 0}};
    const dffkit::philox_u32x4 r =
        dffkit::philox4x32(c, std::uint32_t(seed), std::uint32_t(seed >> 32));
    bool any = false;
    for (int p = 0; p < 4; p += 2) {
      const double u = dffkit::philox_signed_unit(r.v[p]), v = dffkit::philox_signed_unit(r.v[p + 1]);
      const double s = u * u + v * v;
      any |= s > 0.0 && s < 1.0;
    }
    *fallback += !any;
  }
  ++*checked;
  if (out[count] != T(-7)) {
    std::printf("wrote past the end: count %lld\n", (long long)count);
    return false;
  }
  *checked += count - 1;
  return true;
}

int main() {
  long checked = 0, fallback = 0;
  const std::uint64_t seeds[] = {0, 1, 12345, 0xFFFFFFFFFFFFFFFFull, (1ull << 40) + 5};
  const std::uint64_t firsts[] = {0, 3, (1ull << 32) - 5, (1ull << 40) + 1};
  const std::int64_t counts[] = {1, 7, 8, 9, 17, 4096, 20011};
  for (std::uint64_t seed : seeds)
    for (std::uint32_t stream : {0u, 1u})
      for (std::uint64_t first : firsts)
        for (std::int64_t count : counts) {
          if (!check<double>(seed, stream, first, count, 1.0, &checked, &fallback)) return 1;
          if (!check<float>(seed, stream, first, count, 0.3721, &checked, &fallback)) return 1;
        }
#ifdef DFFKIT_PHILOX_SIMD
  const int simd = 1;
#else
  const int simd = 0;
#endif
  std::printf("checked %ld fallback %ld simd %d\n", checked, fallback, simd);
  return 0;
}
