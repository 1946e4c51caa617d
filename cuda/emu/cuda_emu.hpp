#pragma once
// A CPU emulator for the kernels written against cuda/nmf_device_common.cuh, for the tests on
// machines without a GPU (CI): each CUDA thread of a block is a std::thread, __syncthreads is a
// std::barrier, the blocks of a launch run one after another, each with its own shared memory
// (filled with a garbage pattern, so a kernel that reads shared memory it did not write gives
// garbage here too). It checks what a kernel computes and where its barriers are (run under
// ThreadSanitizer it reports shared-memory races between barriers), not how fast it is.
// Warp-level operations: __shfl_xor_sync and __shfl_sync (full mask) and the tensor-core product
// mma.sync.m16n8k8 (tf32), the warp's 32 threads exchanging values through a per-warp buffer
// between two warp barriers; votes and other shuffles are not emulated. Thread-block clusters
// (sm_90): launch_cluster runs the C blocks of a cluster together, with a cluster barrier and
// map_shared_rank into the peers' shared memory (distributed shared memory). cp.async
// (__pipeline_memcpy_async / _commit / _wait_prior) keeps its semantics: a copy lands only when
// a wait covers its group, so a kernel that reads staged data before waiting reads garbage.
// Statically sized shared arrays are declared with DFFKIT_SHARED (nmf_device_common.cuh).
#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
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
struct alignas(8) float2 { float x, y; };
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
  unsigned char shfl[32][8];
};

struct PendingCopy {
  void* dst;
  const void* src;
  std::size_t bytes;
};

/// A block's statically sized shared arrays: one slot per declaration, the same for every thread.
struct StaticArena {
  std::mutex mu;
  std::map<const void*, std::size_t> offsets;
  std::size_t used = 0;
  std::vector<unsigned char> bytes = std::vector<unsigned char>(std::size_t(64) << 10);
};

struct ThreadState {
  std::vector<std::vector<PendingCopy>> copy_groups;  // committed cp.async groups, oldest first
  std::vector<PendingCopy> open_copies;               // issued, not yet committed
  StaticArena* arena = nullptr;
  dim3 thread, block;
  std::barrier<>* bar = nullptr;
  std::barrier<>* warp_bar = nullptr;
  WarpExchange* wx = nullptr;
  unsigned lane = 0;
  unsigned char* smem = nullptr;
  std::size_t smem_bytes = 0;
  std::barrier<>* cluster_bar = nullptr;
  unsigned cluster_rank = 0;
  unsigned char* const* cluster_smem = nullptr;  // the cluster's blocks' shared memory, by rank
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

/// The block's copy of the shared array declared at `key` (bytes long).
inline void* static_smem(const void* key, std::size_t bytes) {
  StaticArena& a = *tls.arena;
  std::lock_guard<std::mutex> lock(a.mu);
  auto it = a.offsets.find(key);
  if (it == a.offsets.end()) {
    const std::size_t at = (a.used + 15) & ~std::size_t(15);
    if (at + bytes > a.bytes.size()) {
      std::fprintf(stderr, "emu: static shared arrays exceed the emulator's 64 KB\n");
      std::abort();
    }
    std::memset(a.bytes.data() + at, 0xA5, bytes);
    a.used = at + bytes;
    it = a.offsets.emplace(key, at).first;
  }
  return a.bytes.data() + it->second;
}

inline void pipeline_copy(void* dst, const void* src, std::size_t bytes) {
  tls.open_copies.push_back(PendingCopy{dst, src, bytes});
}
inline void pipeline_commit() {
  tls.copy_groups.push_back(std::move(tls.open_copies));
  tls.open_copies.clear();
}
/// Completes every committed group but the newest `prior` ones.
inline void pipeline_wait_prior(std::size_t prior) {
  while (tls.copy_groups.size() > prior) {
    for (const PendingCopy& c : tls.copy_groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    tls.copy_groups.erase(tls.copy_groups.begin());
  }
}
inline unsigned cluster_rank() { return tls.cluster_rank; }
/// DFFKIT_EMU_CLUSTER_SKEW_US=N: after each cluster barrier, block `rank` waits rank x N
/// microseconds before going on, so that the lower ranks run ahead into the next phase while the
/// higher ones still read their peers' shared memory: a buffer that a block overwrites before its
/// peers are done with it then gives wrong numbers (ThreadSanitizer did not report such a race
/// in the column-split kernel's one-buffer mutation; why, we did not establish).
inline long cluster_skew_us() {
  static const long v = [] {
    const char* e = std::getenv("DFFKIT_EMU_CLUSTER_SKEW_US");
    return e && *e ? std::atol(e) : 0L;
  }();
  return v;
}
inline void cluster_sync() {
  tls.cluster_bar->arrive_and_wait();
  if (const long us = cluster_skew_us(); us > 0 && tls.cluster_rank > 0)
    std::this_thread::sleep_for(std::chrono::microseconds(us * long(tls.cluster_rank)));
}
/// p (in this block's shared memory) mapped into block `rank` of the cluster.
template <class U>
U* map_shared_rank(U* p, int rank) {
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  if (b < tls.smem || b >= tls.smem + tls.smem_bytes) {
    std::fprintf(stderr, "emu: map_shared_rank of a pointer outside shared memory\n");
    std::abort();
  }
  return reinterpret_cast<U*>(tls.cluster_smem[rank] + (b - tls.smem));
}

/// A full-warp shuffle of values of up to 8 bytes: this lane gets lane src(lane)'s v.
template <class V, class Src>
V shfl_exchange(unsigned mask, V v, Src src) {
  static_assert(sizeof(V) <= 8, "emu: shuffles of up to 8 bytes");
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "emu: only full-warp shuffles are emulated\n");
    std::abort();
  }
  WarpExchange& x = *tls.wx;
  std::memcpy(x.shfl[tls.lane], &v, sizeof(V));
  tls.warp_bar->arrive_and_wait();
  V r;
  std::memcpy(&r, x.shfl[src(tls.lane) & 31u], sizeof(V));
  tls.warp_bar->arrive_and_wait();
  return r;
}

/// __shfl_xor_sync(0xffffffff, v, lane_mask)
template <class V>
V shfl_xor(unsigned mask, V v, int lane_mask) {
  return shfl_exchange(mask, v, [lane_mask](unsigned lane) { return lane ^ unsigned(lane_mask & 31); });
}

/// __shfl_sync(0xffffffff, v, src_lane)
template <class V>
V shfl_idx(unsigned mask, V v, int src_lane) {
  return shfl_exchange(mask, v, [src_lane](unsigned) { return unsigned(src_lane); });
}

/// cvt.rna.tf32.f32: round to 10 mantissa bits, nearest, ties away from zero (finite inputs).
inline std::uint32_t to_tf32(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u + 0x1000u) & 0xffffe000u;
}

/// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, d for the calling warp (all 32
/// lanes call it). Fragment layout of the PTX ISA (g = lane / 4, t = lane % 4): a0 (g, t),
/// a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); b0 (t, g), b1 (t + 4, g); c0 (g, 2t),
/// c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1). Operands as tf32 (low 13 bits dropped),
/// products and c summed in float64, the sum truncated (rounded toward zero) to float32: the H200
/// showed the tensor cores' sum biased toward zero (session 6: long chains of split-tf32 mma put
/// the initial error 2.2e-5 relative off the CPU engine's and the factors up to 1e-3 off after
/// 100 iterations, where rounding to nearest, as this emulator did before, stays near 1e-7).
/// Not the hardware's exact bits (it aligns the addends and drops their low bits before adding);
/// the same direction of error.
inline void mma_m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  WarpExchange& x = *tls.wx;
  const unsigned lane = tls.lane;
  // the tensor cores read a .tf32 operand's upper 19 bits: the low 13 are ignored
  auto f = [](std::uint32_t u) { u &= 0xffffe000u; float v; std::memcpy(&v, &u, 4); return v; };
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
    float v = float(s);
    if (std::fabs(double(v)) > std::fabs(s)) v = std::nextafter(v, 0.0f);  // toward zero
    d[e] = v;
  }
  tls.warp_bar->arrive_and_wait();  // every lane has read the buffer before the next mma
}

/// kern<<<grid, block, smem>>>(args...) with clusters of C blocks along x, synchronously: the
/// clusters one after another, the C blocks of a cluster together.
template <class... KArgs, class... Args>
void launch_cluster(void (*kern)(KArgs...), dim3 grid, dim3 block, std::size_t smem, unsigned C,
                    Args... args) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt > 1024) throw std::invalid_argument("emu: bad block size");
  if (C < 1 || grid.x % C != 0) throw std::invalid_argument("emu: grid.x must be a multiple of the cluster size");
  grid_dim = grid;
  block_dim = block;
  const std::size_t stride = (smem + 127) & ~std::size_t(63);
  std::vector<unsigned char> pool(stride * C + 64);
  unsigned char* base0 = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<std::uintptr_t>(pool.data()) + 63) & ~std::uintptr_t(63));
  std::vector<unsigned char*> bases(C);
  for (unsigned r = 0; r < C; ++r) bases[r] = base0 + r * stride;
  const unsigned nw = (nt + 31) / 32;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned cx = 0; cx < grid.x / C; ++cx) {
        std::memset(base0, 0xA5, stride * C);  // not zero: kernels must write what they read
        std::barrier<> cluster_bar(static_cast<std::ptrdiff_t>(nt * C));
        std::vector<std::unique_ptr<std::barrier<>>> block_bars, warp_bars;
        for (unsigned r = 0; r < C; ++r) {
          block_bars.push_back(std::make_unique<std::barrier<>>(std::ptrdiff_t(nt)));
          for (unsigned w = 0; w < nw; ++w)
            warp_bars.push_back(std::make_unique<std::barrier<>>(std::ptrdiff_t(std::min(32u, nt - 32 * w))));
        }
        std::vector<WarpExchange> exchange(std::size_t(nw) * C);
        std::vector<std::unique_ptr<StaticArena>> arenas;
        for (unsigned r = 0; r < C; ++r) arenas.push_back(std::make_unique<StaticArena>());
        std::vector<std::thread> threads;
        threads.reserve(std::size_t(nt) * C);
        for (unsigned r = 0; r < C; ++r)
          for (unsigned t = 0; t < nt; ++t)
            threads.emplace_back([&, r, t] {
              tls.copy_groups.clear();
              tls.open_copies.clear();
              tls.arena = arenas[r].get();
              tls.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
              tls.block = dim3(cx * C + r, by, bz);
              tls.bar = block_bars[r].get();
              tls.warp_bar = warp_bars[r * nw + t / 32].get();
              tls.wx = &exchange[r * nw + t / 32];
              tls.lane = t % 32;
              tls.smem = bases[r];
              tls.smem_bytes = smem;
              tls.cluster_bar = &cluster_bar;
              tls.cluster_rank = r;
              tls.cluster_smem = bases.data();
              kern(args...);
              // an exited thread no longer holds the barriers up
              tls.bar->arrive_and_drop();
              tls.warp_bar->arrive_and_drop();
              tls.cluster_bar->arrive_and_drop();
            });
        for (auto& th : threads) th.join();
      }
}

/// kern<<<grid, block, smem>>>(args...), synchronously.
template <class... KArgs, class... Args>
void launch(void (*kern)(KArgs...), dim3 grid, dim3 block, std::size_t smem, Args... args) {
  launch_cluster(kern, grid, block, smem, 1u, args...);
}

}  // namespace dffkit_emu

#define threadIdx (::dffkit_emu::tls.thread)
#define blockIdx (::dffkit_emu::tls.block)
#define blockDim (::dffkit_emu::block_dim)
#define gridDim (::dffkit_emu::grid_dim)
inline void __syncthreads() { ::dffkit_emu::sync_block(); }

template <class V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) { return ::dffkit_emu::shfl_xor(mask, v, lane_mask); }
template <class V>
inline V __shfl_sync(unsigned mask, V v, int src_lane) { return ::dffkit_emu::shfl_idx(mask, v, src_lane); }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline void __pipeline_memcpy_async(void* dst, const void* src, std::size_t bytes, std::size_t = 0) {
  ::dffkit_emu::pipeline_copy(dst, src, bytes);
}
inline void __pipeline_commit() { ::dffkit_emu::pipeline_commit(); }
inline void __pipeline_wait_prior(std::size_t prior) { ::dffkit_emu::pipeline_wait_prior(prior); }

// Rounded arithmetic intrinsics (cuda/dff_maps.cuh): each result is rounded to float32 on its
// own, whatever the harness's -ffp-contract (the volatile keeps the compiler from fusing a
// product into a following sum), as __fmul_rn / __fadd_rn are on the GPU.
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fdiv_rn(float a, float b) {
  volatile float r = a / b;
  return r;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
