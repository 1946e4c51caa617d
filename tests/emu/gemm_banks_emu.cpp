// Shared-memory bank conflicts of the gemm engine's two-pass kernels (nmf_gemm.cuh), counted by
// enumeration from the kernels' own geometry (NGeom, PGeom, stage_group), for
// tests/test_cuda_emu.py. For every warp-wide access of one reduction step (GBK = 16) it counts
// the wavefronts the hardware needs: for 32-bit accesses the most distinct words any bank holds;
// for 16-byte accesses the same per quarter warp (8 lanes, 128 bytes), summed. Prints one line
// per access pattern and KP: "name KP requests wavefronts".
//
// The fragment addresses follow the mma.m16n8k8 layout as mma_step16 reads it (gq = lane / 4,
// tq = lane % 4): A(l, r) at a[l * lda + r] for rows r0 + mt * 16 + gq (+ 8), l = ks + tq (+ 4);
// B(l, c) at b[l * ldb + c] for columns c0 + nt * 8 + gq.
#define DFFKIT_EMULATE 1
#include "nmf_gemm.cuh"

#include <cstdio>
#include <map>
#include <set>
#include <vector>

using namespace dffkit::cuda_detail;

namespace {

struct Count {
  long requests = 0, wavefronts = 0;
};

/// One warp access of 32-bit words (one address per lane; equal addresses are one word).
void words(Count& c, const std::vector<long>& addr) {
  std::map<int, std::set<long>> banks;
  for (long a : addr) banks[int(a % 32)].insert(a);
  std::size_t most = 0;
  for (auto& [b, s] : banks) most = s.size() > most ? s.size() : most;
  c.requests += 1;
  c.wavefronts += long(most);
}

/// One warp access of 16 bytes per lane (addr: the first word, 4-word aligned): per quarter warp.
void quads(Count& c, const std::vector<long>& addr) {
  c.requests += 1;
  for (int q = 0; q < 4; ++q) {
    std::map<int, std::set<long>> banks;
    for (int l = 8 * q; l < 8 * q + 8; ++l)
      for (int w = 0; w < 4; ++w) banks[int((addr[l] + w) % 32)].insert(addr[l] + w);
    std::size_t most = 0;
    for (auto& [b, s] : banks) most = s.size() > most ? s.size() : most;
    c.wavefronts += long(most);
  }
}

/// One warp's mma fragment reads over a reduction step of GBK, as mma_step16 makes them: A rows
/// r0 + mt * 16 + gq (+ 8) at a[l * lda + row], B columns c0 + nt * 8 + gq at b[l * ldb + col].
void fragment_reads(Count& fa, Count& fb, int lda, int r0, int mts, int ldb, int c0, int n8s) {
  for (int ks = 0; ks < GBK; ks += 8) {
    for (int mt = 0; mt < mts; ++mt)
      for (int e = 0; e < 4; ++e) {  // a0..a3
        std::vector<long> addr;
        for (int lane = 0; lane < 32; ++lane) {
          const int gq = lane / 4, tq = lane % 4;
          addr.push_back(long(ks + tq + (e >> 1) * 4) * lda + r0 + mt * 16 + gq + (e & 1) * 8);
        }
        words(fa, addr);
      }
    for (int nt = 0; nt < n8s; ++nt)
      for (int e = 0; e < 2; ++e) {  // b0, b1
        std::vector<long> addr;
        for (int lane = 0; lane < 32; ++lane) {
          const int gq = lane / 4, tq = lane % 4;
          addr.push_back(long(ks + tq + e * 4) * ldb + c0 + nt * 8 + gq);
        }
        words(fb, addr);
      }
  }
}

void print(const char* name, int KP, const Count& c) {
  std::printf("%s %d %ld %ld\n", name, KP, c.requests, c.wavefronts);
}

template <int KP>
void n_kernel() {
  using G = NGeom<KP>;
  Count fa, fb, sa, sb;
  for (int warp = 0; warp < NT / 32; ++warp) {
    const int m0 = (warp / G::CW) * G::WM, n0 = (warp % G::CW) * G::WN;
    fragment_reads(fa, fb, G::LDA, m0, G::MT, G::LDB, n0, G::N8);
    // staging stores: X transposed (a[(c4 + c) * LDA + row]), H (b[(c4 + c) * LDB + j])
    for (int u = 0; u < G::XG; ++u)
      for (int c = 0; c < 4; ++c) {
        std::vector<long> addr;
        for (int lane = 0; lane < 32; ++lane) {
          int row, c4;
          stage_group<G::BM>(warp * 32 + lane + u * NT, row, c4);
          addr.push_back(long(c4 + c) * G::LDA + row);
        }
        words(sa, addr);
      }
    if (warp * 32 < KP * GBK / 4)
      for (int c = 0; c < 4; ++c) {
        std::vector<long> addr;
        for (int lane = 0; lane < 32; ++lane) {
          int j, c4;
          stage_group<KP>(warp * 32 + lane, j, c4);
          addr.push_back(long(c4 + c) * G::LDB + j);
        }
        words(sb, addr);
      }
  }
  print("n_frag_a", KP, fa);
  print("n_frag_b", KP, fb);
  print("n_store_x", KP, sa);
  print("n_store_h", KP, sb);
}

template <int KP>
void p_kernel() {
  using G = PGeom<KP>;
  Count fa, fb, sx, sw;
  for (int warp = 0; warp < NT / 32; ++warp) {
    const int j0 = (warp / G::CW) * G::WM, c0 = (warp % G::CW) * G::WN;
    fragment_reads(fa, fb, G::LDW, j0, G::MT, G::LDX, c0, G::N8);
    // staging stores: X row-major, 16 bytes a lane (x[row * LDX + c4]); W (w[(e / KP) * LDW + e % KP])
    for (int u = 0; u < G::XG; ++u) {
      std::vector<long> addr;
      for (int lane = 0; lane < 32; ++lane) {
        const int e = warp * 32 + lane + u * NT, row = e / (G::BN / 4), c4 = (e % (G::BN / 4)) * 4;
        addr.push_back(long(row) * G::LDX + c4);
      }
      quads(sx, addr);
    }
    for (int u = 0; u < G::WG; ++u) {
      std::vector<long> addr;
      for (int lane = 0; lane < 32; ++lane) {
        const int e = warp * 32 + lane + u * NT;
        if (e < GBK * KP) addr.push_back(long(e / KP) * G::LDW + e % KP);
      }
      if (!addr.empty()) words(sw, addr);
    }
  }
  print("p_frag_a", KP, fa);
  print("p_frag_b", KP, fb);
  print("p_store_x", KP, sx);
  print("p_store_w", KP, sw);
}

}  // namespace

int main() {
  std::printf("pad %d\n", GPAD);
  n_kernel<16>();
  n_kernel<32>();
  n_kernel<64>();
  p_kernel<16>();
  p_kernel<32>();
  p_kernel<64>();
  return 0;
}
