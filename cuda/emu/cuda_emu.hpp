#pragma once
// A CPU emulator for the kernels written against cuda/nmf_device_common.cuh, for the tests on
// machines without a GPU (CI): each CUDA thread of a block is a std::thread, __syncthreads is a
// std::barrier, the blocks of a launch run one after another, each with its own shared memory
// (filled with a garbage pattern, so a kernel that reads shared memory it did not write gives
// garbage here too). It checks what a kernel computes and where its barriers are (run under
// ThreadSanitizer it reports shared-memory races between barriers), not how fast it is.
// Warp-level intrinsics are not emulated: kernels meant for the emulator do not use them.
#include <barrier>
#include <cstdint>
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

struct ThreadState {
  dim3 thread, block;
  std::barrier<>* bar = nullptr;
  unsigned char* smem = nullptr;
};
inline thread_local ThreadState tls;
inline dim3 grid_dim, block_dim;

inline unsigned char* block_smem() { return tls.smem; }
inline void sync_block() { tls.bar->arrive_and_wait(); }

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
        std::vector<std::thread> threads;
        threads.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          threads.emplace_back([&, t] {
            tls.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            tls.block = dim3(bx, by, bz);
            tls.bar = &bar;
            tls.smem = base;
            kern(args...);
            bar.arrive_and_drop();  // an exited thread no longer holds the barrier up
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
