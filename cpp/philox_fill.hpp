#pragma once
/// The host's fill of init="random": scale * |N(0, 1)| of one Philox stream (philox.hpp), a
/// machine vector of elements at a time where the machine has vector FMA (AVX-512, or AVX with
/// FMA), one element at a time elsewhere. Both give philox_half_normal's bits: the same IEEE
/// operations in the same order (fma where it has fma; frexp by the exponent field, exact for
/// the normal numbers it meets), the rare element whose first counter gives no accepted pair
/// (4.6%) drawn by philox_half_normal itself. One element at a time cost 45-70 ns (ten Philox
/// rounds, a 12-term series, a division and a square root in one dependent chain).
#include <cstdint>
#include <cstring>

#include "philox.hpp"
#include "simd_kernels.hpp"

#if defined(__AVX512F__) || (defined(__AVX__) && defined(__FMA__))
#define DFFKIT_PHILOX_SIMD 1
#endif

namespace dffkit {

#if DFFKIT_PHILOX_SIMD
namespace philox_simd {

constexpr int L = DFFKIT_VEC_BYTES / 8;
typedef double vd __attribute__((vector_size(DFFKIT_VEC_BYTES)));
typedef std::uint64_t vu __attribute__((vector_size(DFFKIT_VEC_BYTES)));
typedef std::int64_t vi __attribute__((vector_size(DFFKIT_VEC_BYTES)));

#if DFFKIT_VEC_BYTES == 64
inline vd fma(vd a, vd b, vd c) { return (vd)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c); }
inline vd sqrt(vd a) { return (vd)_mm512_maskz_sqrt_pd(__mmask8(0xFF), (__m512d)a); }
#else
inline vd fma(vd a, vd b, vd c) { return (vd)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c); }
inline vd sqrt(vd a) { return (vd)_mm256_sqrt_pd((__m256d)a); }
#endif

inline vu splat_u(std::uint64_t x) { return x - vu{}; }
inline vd splat_d(double x) { return x - vd{}; }

/// Lanes holding integers below 2^52 as doubles, exactly (the exponent trick: no 64-bit integer
/// conversion instruction is needed).
inline vd to_double(vu x) {
  const std::uint64_t magic_bits = 0x4330000000000000ull;  // 2^52
  double magic;
  std::memcpy(&magic, &magic_bits, sizeof(magic));
  return (vd)(x | magic_bits) - splat_d(magic);
}

/// (2u + 1) / 2^32 - 1 of philox_signed_unit: each step exact.
inline vd signed_unit(vu u) {
  return (2.0 * to_double(u) + 1.0) * (1.0 / 4294967296.0) - 1.0;
}

/// portable_log of lanes x in (0, 1), all normal numbers.
inline vd log(vd x) {
  const vu bits = (vu)x;
  vd m = (vd)((bits & 0x000FFFFFFFFFFFFFull) | 0x3FE0000000000000ull);  // frexp: m in [0.5, 1)
  vd e = to_double((bits >> 52) & 0x7FFull) - 1022.0;
  const vi low = m < 0.70710678118654752440;
  m = low ? m * 2.0 : m;
  e = low ? e - 1.0 : e;
  const vd f = (m - 1.0) / (m + 1.0);
  const vd f2 = f * f;
  vd s = splat_d(1.0 / 23.0);
  s = fma(s, f2, splat_d(1.0 / 21.0));
  s = fma(s, f2, splat_d(1.0 / 19.0));
  s = fma(s, f2, splat_d(1.0 / 17.0));
  s = fma(s, f2, splat_d(1.0 / 15.0));
  s = fma(s, f2, splat_d(1.0 / 13.0));
  s = fma(s, f2, splat_d(1.0 / 11.0));
  s = fma(s, f2, splat_d(1.0 / 9.0));
  s = fma(s, f2, splat_d(1.0 / 7.0));
  s = fma(s, f2, splat_d(1.0 / 5.0));
  s = fma(s, f2, splat_d(1.0 / 3.0));
  s = fma(s, f2, splat_d(1.0));
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  const vd t = (2.0 * f) * s;
  return fma(e, splat_d(ln2_hi), fma(e, splat_d(ln2_lo), t));
}

/// |N(0, 1)| of elements first .. first + L - 1 of one stream; the lanes whose first counter
/// gives no accepted pair get NaN here and are drawn by the caller with philox_half_normal.
inline vd half_normal(std::uint64_t seed, std::uint32_t stream, std::uint64_t first) {
  vu idx;
  for (int j = 0; j < L; ++j) idx[j] = first + std::uint64_t(j);
  const vu lo32 = splat_u(0xFFFFFFFFull);
  vu c0 = idx & lo32, c1 = idx >> 32, c2 = splat_u(stream), c3 = splat_u(0);  // attempt 0
  std::uint32_t k0 = std::uint32_t(seed), k1 = std::uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const vu p0 = c0 * 0xD2511F53ull, p1 = c2 * 0xCD9E8D57ull;  // 32 x 32 -> 64 bits, exact
    const vu n0 = (p1 >> 32) ^ c1 ^ std::uint64_t(k0);
    const vu n2 = (p0 >> 32) ^ c3 ^ std::uint64_t(k1);
    c1 = p1 & lo32;
    c3 = p0 & lo32;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const vd u0 = signed_unit(c0), v0 = signed_unit(c1), u1 = signed_unit(c2), v1 = signed_unit(c3);
  const vd s0 = fma(u0, u0, v0 * v0), s1 = fma(u1, u1, v1 * v1);
  const vi ok0 = (s0 > 0.0) & (s0 < 1.0), ok1 = (s1 > 0.0) & (s1 < 1.0);
  const vd u = ok0 ? u0 : u1;
  const vd s = ok0 ? s0 : (ok1 ? s1 : splat_d(0.5));
  const vd z = u * sqrt(-2.0 * log(s) / s);
  const vd a = (vd)((vu)z & 0x7FFFFFFFFFFFFFFFull);  // |z|
  return (ok0 | ok1) ? a : splat_d(__builtin_nan(""));
}

}  // namespace philox_simd
#endif

/// out[i] = T(scale * philox_half_normal(seed, stream, first + i)) for i < count.
template <class T>
void philox_fill_scaled(T* out, std::int64_t count, double scale, std::uint64_t seed,
                        std::uint32_t stream, std::uint64_t first) {
  std::int64_t i = 0;
#if DFFKIT_PHILOX_SIMD
  using namespace philox_simd;
  typedef T vt __attribute__((vector_size(sizeof(T) * L)));
  for (; i + L <= count; i += L) {
    const vd z = half_normal(seed, stream, first + std::uint64_t(i));
    const vi valid = z == z;  // false where NaN: a lane to draw one by one
    bool all = true;
    for (int j = 0; j < L; ++j) all &= valid[j] != 0;
    if (all) {
      const vt o = __builtin_convertvector(scale * z, vt);
      std::memcpy(out + i, &o, sizeof(o));
      continue;
    }
    for (int j = 0; j < L; ++j) {
      const double zj = z[j] == z[j] ? z[j] : philox_half_normal(seed, stream, first + std::uint64_t(i + j));
      out[i + j] = T(scale * zj);
    }
  }
#endif
  for (; i < count; ++i) out[i] = T(scale * philox_half_normal(seed, stream, first + std::uint64_t(i)));
}

}  // namespace dffkit
