#pragma once
/// Philox4x32-10 (Salmon et al., SC 2011) and the half-normal draws of init="random", written
/// once for both backends so that one seed gives the same initial factors bit for bit on every
/// backend. Only IEEE-exact operations are used (+ - * / sqrt, fma, frexp/ldexp): no libm
/// transcendental whose last bit could differ between the host and the device.
#include <cstdint>
#include <cmath>
#include "hostdevice.hpp"

namespace dffkit {

struct philox_u32x4 { std::uint32_t v[4]; };

DFFKIT_HD std::uint32_t philox_mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t* hi) {
  std::uint64_t p = std::uint64_t(a) * std::uint64_t(b);
  *hi = std::uint32_t(p >> 32);
  return std::uint32_t(p);
}

/// Philox4x32 with 10 rounds: counter c, key (k0, k1).
DFFKIT_HD philox_u32x4 philox4x32(philox_u32x4 c, std::uint32_t k0, std::uint32_t k1) {
  const std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    std::uint32_t hi0, hi1;
    std::uint32_t lo0 = philox_mulhilo(M0, c.v[0], &hi0);
    std::uint32_t lo1 = philox_mulhilo(M1, c.v[2], &hi1);
    philox_u32x4 n;
    n.v[0] = hi1 ^ c.v[1] ^ k0;
    n.v[1] = lo1;
    n.v[2] = hi0 ^ c.v[3] ^ k1;
    n.v[3] = lo0;
    c = n;
    k0 += W0;
    k1 += W1;
  }
  return c;
}

/// Uniform in (-1, 1) from 32 random bits, exact: (2u + 1) / 2^32 - 1.
DFFKIT_HD double philox_signed_unit(std::uint32_t u) {
  return (2.0 * double(u) + 1.0) * (1.0 / 4294967296.0) - 1.0;
}

/// Natural logarithm of x > 0 from IEEE-exact operations only (frexp range reduction and an
/// atanh series evaluated with fma), so host and device agree to the bit. Accurate to ~1 ulp.
DFFKIT_HD double portable_log(double x) {
  int e;
  double m = std::frexp(x, &e);  // x = m 2^e, m in [0.5, 1)
  if (m < 0.70710678118654752440) { m *= 2.0; e -= 1; }
  const double f = (m - 1.0) / (m + 1.0);  // |f| <= 0.1716
  const double f2 = f * f;
  // 2 atanh(f) = 2 f (1 + f^2/3 + f^4/5 + ...); 12 terms reach below 1e-19 relative
  double s = 1.0 / 23.0;
  s = std::fma(s, f2, 1.0 / 21.0);
  s = std::fma(s, f2, 1.0 / 19.0);
  s = std::fma(s, f2, 1.0 / 17.0);
  s = std::fma(s, f2, 1.0 / 15.0);
  s = std::fma(s, f2, 1.0 / 13.0);
  s = std::fma(s, f2, 1.0 / 11.0);
  s = std::fma(s, f2, 1.0 / 9.0);
  s = std::fma(s, f2, 1.0 / 7.0);
  s = std::fma(s, f2, 1.0 / 5.0);
  s = std::fma(s, f2, 1.0 / 3.0);
  s = std::fma(s, f2, 1.0);
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  return std::fma(double(e), ln2_hi, std::fma(double(e), ln2_lo, 2.0 * f * s));
}

/// |N(0, 1)| for element `index` of the stream `stream` under `seed` (Marsaglia's polar
/// method; each element owns its counter, so any element can be drawn alone, in any order,
/// on any backend). Streams: 0 = W, 1 = H of init="random".
DFFKIT_HD double philox_half_normal(std::uint64_t seed, std::uint32_t stream, std::uint64_t index) {
  const std::uint32_t k0 = std::uint32_t(seed), k1 = std::uint32_t(seed >> 32);
  for (std::uint32_t attempt = 0;; ++attempt) {
    philox_u32x4 c{{std::uint32_t(index), std::uint32_t(index >> 32), stream, attempt}};
    philox_u32x4 r = philox4x32(c, k0, k1);
    for (int p = 0; p < 4; p += 2) {
      const double u = philox_signed_unit(r.v[p]), v = philox_signed_unit(r.v[p + 1]);
      const double s = std::fma(u, u, v * v);
      if (s > 0.0 && s < 1.0) {
        const double z = u * std::sqrt(-2.0 * portable_log(s) / s);
        return z < 0 ? -z : z;
      }
    }
  }
}

/// Fill out[0..count) with scale * |N(0,1)| of the given stream (host loop; the CUDA backend
/// runs the same function per element on the device).
template <class T>
inline void philox_fill_half_normal(T* out, std::int64_t count, double scale, std::uint64_t seed,
                                    std::uint32_t stream) {
  for (std::int64_t i = 0; i < count; ++i)
    out[i] = T(scale * philox_half_normal(seed, stream, std::uint64_t(i)));
}

}  // namespace dffkit
