#pragma once
// A CPU emulator for the kernels written against cuda/nmf_device_common.cuh, for the tests on
// machines without a GPU (CI): each CUDA thread of a block is a std::thread, __syncthreads is a
// std::barrier, the blocks of a launch run one after another, each with its own shared memory
// (filled with a garbage pattern, so a kernel that reads shared memory it did not write gives
// garbage here too). It checks what a kernel computes and where its barriers are (run under
// ThreadSanitizer it reports shared-memory races between barriers), not how fast it is.
// Of the warp-level operations only the tensor-core product mma.sync.m16n8k8 (tf32) is
// emulated (the warp's 32 threads exchange their fragments through a per-warp buffer between two
// warp barriers); shuffles and votes are not: kernels meant for the emulator do not use them.
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = std::uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
/// Round to nearest even (NaN kept quiet), as __float2bfloat16_rn.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = std::uint16_t((u >> 16) | 0x40u);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = std::uint16_t(u >> 16);
  }
  return b;
}

namespace dffkit_emu {

/// The fragments of one warp's mma, by lane.
struct WarpExchange {
  float a[32][4], b[32][2], c[32][4];
};

struct ThreadState {
  dim3 thread, block;
  std::barrier<>* bar = nullptr;
  std::barrier<>* warp_bar = nullptr;
  WarpExchange* wx = nullptr;
  unsigned lane = 0;
  unsigned char* smem = nullptr;
};
inline thread_local ThreadState tls;
inline dim3 grid_dim, block_dim;

inline unsigned char* block_smem() { return tls.smem; }

inline void check_aligned(const void* p, std::size_t bytes, const char* file, int line) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "emu: misaligned %zu-byte access at %p (%s:%d)\n", bytes, p, file, line);
    std::abort();
  }
}
inline void sync_block() { tls.bar->arrive_and_wait(); }

/// cvt.rna.tf32.f32: round to 10 mantissa bits, nearest, ties away from zero (finite inputs).
inline std::uint32_t to_tf32(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u + 0x1000u) & 0xffffe000u;
}

/// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, d for the calling warp (all 32
/// lanes call it). Fragment layout of the PTX ISA (g = lane / 4, t = lane % 4): a0 (g, t),
/// a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); b0 (t, g), b1 (t + 4, g); c0 (g, 2t),
/// c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1). Products summed in float64, rounded once.
inline void mma_m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  WarpExchange& x = *tls.wx;
  const unsigned lane = tls.lane;
  auto f = [](std::uint32_t u) { float v; std::memcpy(&v, &u, 4); return v; };
  for (int e = 0; e < 4; ++e) { x.a[lane][e] = f(a[e]); x.c[lane][e] = d[e]; }
  for (int e = 0; e < 2; ++e) x.b[lane][e] = f(b[e]);
  tls.warp_bar->arrive_and_wait();
  float A[16][8], B[8][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned g = l / 4, t = l % 4;
    A[g][t] = x.a[l][0]; A[g + 8][t] = x.a[l][1]; A[g][t + 4] = x.a[l][2]; A[g + 8][t + 4] = x.a[l][3];
    B[t][g] = x.b[l][0]; B[t + 4][g] = x.b[l][1];
  }
  const unsigned g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const unsigned r = g + (e >= 2 ? 8 : 0), c = 2 * t + (e & 1);
    double s = x.c[lane][e];
    for (int kk = 0; kk < 8; ++kk) s += double(A[r][kk]) * double(B[kk][c]);
    d[e] = float(s);
  }
  tls.warp_bar->arrive_and_wait();  // every lane has read the buffer before the next mma
}

/// kern<<<grid, block, smem>>>(args...), synchronously.
template <class... KArgs, class... Args>
void launch(void (*kern)(KArgs...), dim3 grid, dim3 block, std::size_t smem, Args... args) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt > 1024) throw std::invalid_argument("emu: bad block size");
  grid_dim = grid;
  block_dim = block;
  std::vector<unsigned char> pool(smem + 64);
  unsigned char* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<std::uintptr_t>(pool.data()) + 63) & ~std::uintptr_t(63));
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(base, 0xA5, smem);  // not zero: kernels must write what they read
        std::barrier<> bar(static_cast<std::ptrdiff_t>(nt));
        const unsigned nw = (nt + 31) / 32;
        std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
        for (unsigned w = 0; w < nw; ++w)
          warp_bars.push_back(std::make_unique<std::barrier<>>(std::ptrdiff_t(std::min(32u, nt - 32 * w))));
        std::vector<WarpExchange> exchange(nw);
        std::vector<std::thread> threads;
        threads.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          threads.emplace_back([&, t] {
            tls.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            tls.block = dim3(bx, by, bz);
            tls.bar = &bar;
            tls.warp_bar = warp_bars[t / 32].get();
            tls.wx = &exchange[t / 32];
            tls.lane = t % 32;
            tls.smem = base;
            kern(args...);
            bar.arrive_and_drop();  // an exited thread no longer holds the barriers up
            tls.warp_bar->arrive_and_drop();
          });
        for (auto& th : threads) th.join();
      }
}

}  // namespace dffkit_emu

#define threadIdx (::dffkit_emu::tls.thread)
#define blockIdx (::dffkit_emu::tls.block)
#define blockDim (::dffkit_emu::block_dim)
#define gridDim (::dffkit_emu::grid_dim)
inline void __syncthreads() { ::dffkit_emu::sync_block(); }
