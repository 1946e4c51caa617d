#pragma once
// Multiplicative-update NMF on the GPU: the same contract as cpp/nmf_mu_cpu.cpp. This header
// holds the kernels and the host drivers as templates; nmf_mu_<mode>.cu instantiate one
// precision mode each (so the modes compile in parallel) and nmf_mu.cu dispatches.
//
// Two engines, one tile routine (nmf_kernels.cuh):
//  * resident: one thread block per problem runs the whole solve in one launch (all iterations,
//    the stopping rule, the error) with X rows, H, P and the k x k statistics in shared memory
//    where they fit. Used for batches (one block per problem) and for small single problems.
//  * sweep: for large problems, per iteration a persistent grid of NB blocks sweeps X once in
//    row tiles (block b takes tiles b, b + NB, ...), each block keeping its partial P = W^T X,
//    G_W = W^T W (KL: column sums of W) on chip; small kernels then add the NB partials in block
//    order, update H column by column, refresh H H^T and evaluate the error and the stopping rule
//    on the device. The host reads the stop flag only every 10 iterations (when tol > 0).
// NB depends on the shape only, so results do not depend on the device or on timing.
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "nmf_detail.hpp"
#include "nmf_fused.cuh"
#include "nmf_engine_kernels.cuh"
#include "nmf_kernels.cuh"
#include "nmf_small_kernel.cuh"
#include "nmf_small_cols_kernel.cuh"

namespace dffkit {
namespace cuda_detail {
namespace {

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// ---------------------------------------------------------------------------------------------
// Host side

std::size_t smem_optin(int device) {
  int v = 0;
  DFFKIT_CUDA_TRY(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return std::size_t(v);
}

/// An empty kernel, compiled for the same architectures as every other kernel here.
__global__ void arch_probe_kernel() {}

/// The major compute capability the kernels may count on: the device's, capped by the virtual
/// architecture the module's code for this device came from. The fast path's and the single
/// pass's kernel bodies compile for sm_90 only (empty below it): a module built for 80 alone runs
/// on a Hopper from compute_80 PTX, and must not take them.
int code_major(int device) {
  int cc_major = 0;
  DFFKIT_CUDA_TRY(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes a{};
  DFFKIT_CUDA_TRY(cudaFuncGetAttributes(&a, arch_probe_kernel));
  return std::min(cc_major, a.ptxVersion / 10);
}

KParams make_kparams(const Problem& p, const Options& o) {
  KParams q;
  q.kl = p.loss == Loss::kullback_leibler;
  q.l1_W = p.l1_W; q.l2_W = p.l2_W; q.l1_H = p.l1_H; q.l2_H = p.l2_H;
  q.lam = p.lam; q.mu = p.mu;
  q.groups = p.group_offsets != nullptr && p.lam > 0;
  q.update_H = o.update_H; q.max_iter = o.max_iter; q.record_obj = o.record_objective;
  q.tol = o.tol;
  const char* prof = std::getenv("DFFKIT_CUDA_PROFILE");
  q.profile = prof && *prof && *prof != '0';
  // the fast path's switches, read once per call so that choosing the problems it takes and
  // laying them out agree (nmf_small.cuh)
  const char* tc = std::getenv("DFFKIT_CUDA_SMALL_TC");
  q.small_tc = tc && tc[0] == '1';
  const char* one = std::getenv("DFFKIT_CUDA_SMALL_ONE_PER_SM");
  q.small_one_per_sm = one && one[0] == '1';
  const char* regs = std::getenv("DFFKIT_CUDA_SMALL_REGS");
  q.small_regs = regs && (regs[0] == '1' || regs[0] == '2') && regs[1] == 0 ? regs[0] - '0' : 0;
  // the column-split kernel by default (run 6 on the H200: the 4096-image batch 122.6 against
  // 154.4 ms, one image 1.442 against 1.438); DFFKIT_CUDA_SMALL_COLS=0, or any switch of the
  // row-split kernel above, gives the row split
  const char* cols = std::getenv("DFFKIT_CUDA_SMALL_COLS");
  q.small_cols = cols && *cols ? cols[0] == '1'
                               : !(q.small_tc || q.small_one_per_sm || q.small_regs);
  const char* gather = std::getenv("DFFKIT_CUDA_SMALL_COLS_GATHER");
  q.small_cols_gather = gather && gather[0] == '1';
  const char* vec = std::getenv("DFFKIT_CUDA_SMALL_COLS_VEC");
  q.small_cols_vec = vec && vec[0] == '1';
  const char* push = std::getenv("DFFKIT_CUDA_SMALL_COLS_PUSH");
  q.small_cols_push = push && push[0] == '1';
  if (const char* cc = std::getenv("DFFKIT_CUDA_SMALL_COLS_C"); cc && *cc) {
    const int v = std::atoi(cc);
    q.small_cols_c = v == 1 || v == 2 || v == 4 || v == 8 || v == 16 ? v : 0;
  }
  return q;
}

/// Launches kern on problems x C blocks of `threads`, each C consecutive blocks one thread-block
/// cluster (sm_90; C = 1 is a plain launch). The caller checks the launch.
template <class... KArgs, class... Args>
void launch_clusters(void (*kern)(KArgs...), std::size_t problems, int C, int threads,
                     std::size_t smem, cudaStream_t s, Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(problems * C));
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  DFFKIT_CUDA_TRY(cudaLaunchKernelEx(&cfg, kern, args...));
}

template <class T, class XS, int KC, int MODE>
void launch_resident(const ResDesc<T, XS>* descs, std::size_t count, const KParams& q,
                     ResOut* d_out, ResDesc<T, XS>* d_descs, std::size_t limit, int C,
                     cudaStream_t s) {
  auto kern = resident_kernel<T, XS, KC, MODE>;
  DFFKIT_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit)));
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(d_descs, descs, count * sizeof(descs[0]),
                                  cudaMemcpyHostToDevice, s));
  if (C == 1) {
    kern<<<unsigned(count), NT, limit, s>>>(d_descs, q, d_out, limit, 1);
    DFFKIT_CUDA_CHECK_LAUNCH("resident_kernel");
    return;
  }
  launch_clusters(kern, count, C, NT, limit, s, static_cast<const ResDesc<T, XS>*>(d_descs), q,
                  d_out, limit, C);
  DFFKIT_CUDA_CHECK_LAUNCH("resident_kernel (cluster)");
}

/// Blocks per problem for the resident engine, from the shape only (so that a problem gets the
/// same bits alone and in a batch): 1 when X fits in one block's shared memory or the problem
/// needs what the cluster path does not do (KL, groups, the objective, max_iter < 1, pre-Hopper);
/// else the smallest cluster (2, 4, 8) whose blocks each hold their rows of X, H and P on chip.
int cluster_size(i64 m, i64 n, i64 k, const KParams& q, int esz, int xsz, std::size_t limit,
                 int cc_major) {
  if (cc_major < 9 || q.kl || q.groups || q.record_obj || q.max_iter < 1) return 1;
  if (const char* off = std::getenv("DFFKIT_CUDA_NO_CLUSTER"); off && *off && *off != '0') return 1;
  const ResLayout L1 = res_layout(m, n, int(k), false, esz, xsz, limit, 1);
  if (L1.xs_rows >= m) return 1;
  for (int C = 2; C <= 8; C *= 2) {
    const i64 ml = (m + C - 1) / C;
    const ResLayout L = res_layout(ml, n, int(k), false, esz, xsz, limit, C);
    if (L.H_s && L.P_s && L.xs_rows >= ml && L.used <= limit) return C;
  }
  return 1;
}

/// Fixed part of the shared memory both engines need (k x k statistics and tile buffers).
std::size_t fixed_smem(int k, int esz) {
  return NT * sizeof(double) + 3 * std::size_t(k) * k * esz + 4 * std::size_t(TM) * k * esz +
         8 * std::size_t(k) * esz + 256;
}

/// Whether one problem takes the resident engine (one block, one launch).
bool prefer_resident(i64 m, i64 n, i64 k) { return m * n * k <= (i64(1) << 22) && m <= 8192; }

template <class T, class XS>
const XS* prepare_x(std::uintptr_t X, i64 count, Carver& c, __nv_bfloat16** conv) {
  if constexpr (std::is_same<XS, T>::value) {
    (void)count; (void)c; *conv = nullptr;
    return reinterpret_cast<const XS*>(X);
  } else {
    *conv = c.take<__nv_bfloat16>(count);
    return reinterpret_cast<const XS*>(*conv);
  }
}

template <class T, class XS>
void convert_x(std::uintptr_t X, __nv_bfloat16* dst, i64 count, cudaStream_t s) {
  if constexpr (!std::is_same<XS, T>::value) {
    const i64 blocks = std::min<i64>((count + 255) / 256, 8192);
    to_bf16_kernel<T><<<unsigned(blocks), 256, 0, s>>>(reinterpret_cast<const T*>(X), dst, count);
    DFFKIT_CUDA_CHECK_LAUNCH("to_bf16_kernel");
  } else {
    (void)X; (void)dst; (void)count; (void)s;
  }
}

#include "nmf_small.cuh"

/// Resident engine for one or many problems (one block each). groups/objective: single only.
template <class T, class XS, int MODE>
std::vector<cuda::FitResult> resident_solve_general(const std::vector<Item>& items, const Problem& p,
                                            const Options& o, int dev, cudaStream_t s) {
  const KParams q = make_kparams(p, o);
  const bool kl = q.kl != 0;
  const std::size_t limit = smem_optin(dev);
  const std::size_t B = items.size();
  i64 kmax = 0;
  for (const auto& it : items) kmax = std::max(kmax, it.k);
  // workspace: descriptors, outputs, and per problem what does not fit on chip
  auto carve = [&](Carver& c, std::vector<ResDesc<T, XS>>* descs, ResDesc<T, XS>** d_descs,
                   ResOut** d_out, i64** d_goff, std::vector<__nv_bfloat16*>* convs) {
    *d_descs = c.take<ResDesc<T, XS>>(i64(B));
    *d_out = c.take<ResOut>(i64(B));
    *d_goff = c.take<i64>(p.group_offsets ? p.n_groups + 1 : 0);
    for (std::size_t b = 0; b < B; ++b) {
      const Item& it = items[b];
      const ResLayout L = res_layout(it.m, it.n, int(it.k), kl, sizeof(T), sizeof(XS), limit);
      ResDesc<T, XS> d{};
      __nv_bfloat16* conv = nullptr;
      d.X = prepare_x<T, XS>(it.X, it.m * it.n, c, &conv);
      d.W = reinterpret_cast<T*>(it.W);
      d.H = reinterpret_cast<T*>(it.H);
      d.m = it.m; d.n = it.n; d.k = int(it.k);
      d.goff = p.group_offsets ? *d_goff : nullptr;
      d.ngroups = p.group_offsets ? p.n_groups : 0;
      d.gnorm = q.groups ? c.take<double>(d.ngroups * it.k) : nullptr;
      d.gP = L.P_s ? nullptr : c.take<T>(it.k * it.n);
      d.gR = (kl && !L.R_s) ? c.take<T>(i64(TM) * it.n) : nullptr;
      d.objective = o.record_objective ? c.take<double>(std::max(o.max_iter, 1)) : nullptr;
      if (descs) descs->push_back(d);
      if (convs) convs->push_back(conv);
    }
  };
  Carver count;
  {
    ResDesc<T, XS>* a; ResOut* b; i64* g;
    carve(count, nullptr, &a, &b, &g, nullptr);
  }
  Workspace ws(dev, count.offset + 256);
  try {
  Carver c;
  c.base = ws.data();
  std::vector<ResDesc<T, XS>> descs;
  std::vector<__nv_bfloat16*> convs;
  ResDesc<T, XS>* d_descs; ResOut* d_out; i64* d_goff;
  carve(c, &descs, &d_descs, &d_out, &d_goff, &convs);
  if (p.group_offsets)
    DFFKIT_CUDA_TRY(cudaMemcpyAsync(d_goff, p.group_offsets, (p.n_groups + 1) * sizeof(i64),
                                    cudaMemcpyHostToDevice, s));
  for (std::size_t b = 0; b < B; ++b)
    convert_x<T, XS>(items[b].X, convs[b], items[b].m * items[b].n, s);
  // problems grouped by cluster size (one launch per size), in their order within a group
  const int cc_major = code_major(dev);  // clusters: sm_90 code on an sm_90 device
  std::vector<int> csize(B);
  for (std::size_t b = 0; b < B; ++b)
    csize[b] = cluster_size(items[b].m, items[b].n, items[b].k, q, sizeof(T), sizeof(XS), limit,
                            cc_major);
  std::vector<std::size_t> order;  // position in the launch -> problem
  std::vector<ResDesc<T, XS>> sorted;
  std::size_t off = 0;
  for (int C = 1; C <= 8; C *= 2) {
    const std::size_t start = sorted.size();
    for (std::size_t b = 0; b < B; ++b)
      if (csize[b] == C) { order.push_back(b); sorted.push_back(descs[b]); }
    const std::size_t count = sorted.size() - start;
    if (count == 0) continue;
    with_kc<MODE>(int(kmax), [&](auto kc) {
      launch_resident<T, XS, decltype(kc)::value, MODE>(sorted.data() + start, count, q,
                                                        d_out + off, d_descs + off, limit, C, s);
    });
    off += count;
  }
  std::vector<ResOut> sorted_out(B), outs(B);
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(sorted_out.data(), d_out, B * sizeof(ResOut),
                                  cudaMemcpyDeviceToHost, s));
  std::vector<cuda::FitResult> res(B);
  std::vector<std::vector<double>> objs(B);
  if (o.record_objective)
    for (std::size_t b = 0; b < B; ++b) {
      objs[b].resize(std::max(o.max_iter, 1));
      DFFKIT_CUDA_TRY(cudaMemcpyAsync(objs[b].data(), descs[b].objective,
                                      objs[b].size() * sizeof(double), cudaMemcpyDeviceToHost, s));
    }
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
  for (std::size_t j = 0; j < B; ++j) outs[order[j]] = sorted_out[j];
  for (std::size_t b = 0; b < B; ++b) {
    res[b].n_iter = outs[b].n_iter;
    res[b].error_init = outs[b].error_init;
    res[b].error = outs[b].error;
    res[b].kernel = "resident";
    if (o.record_objective) {
      objs[b].resize(std::max(outs[b].n_iter, 0));
      res[b].objective = std::move(objs[b]);
    }
  }
  return res;
  } catch (...) {
    // let the work in flight finish before the workspace can be handed to another call
    cudaStreamSynchronize(s);
    cudaGetLastError();
    throw;
  }
}

/// Resident engine: float32 problems the fast path takes (nmf_small.cuh) go there, the rest to
/// the general resident kernel; results in the items' order.
template <class T, class XS, int MODE>
std::vector<cuda::FitResult> resident_solve(const std::vector<Item>& items, const Problem& p,
                                            const Options& o, int dev, cudaStream_t s) {
  // tf32 too: at k <= 16 the fast path's fp32 arithmetic beats the general kernel's tensor
  // cores (H200, one image: fp32 fast path 1.71 ms, general tf32 kernel 8.48 ms), and is exact
  // where tf32 may round
  if constexpr (std::is_same<T, float>::value) {
    const KParams q = make_kparams(p, o);
    if (small_options_ok(q, code_major(dev))) {
      const std::size_t limit = smem_optin(dev);
      std::vector<Item> fast, rest;
      std::vector<std::size_t> fast_at, rest_at;
      for (std::size_t b = 0; b < items.size(); ++b) {
        const Item& it = items[b];
        if (small_cluster(it.m, it.n, it.k, limit, q) > 0) {
          fast.push_back(it);
          fast_at.push_back(b);
        } else {
          rest.push_back(it);
          rest_at.push_back(b);
        }
      }
      if (!fast.empty()) {
        std::vector<cuda::FitResult> res(items.size());
        auto rf = std::is_same<XS, T>::value ? small_solve_f32(fast, q, dev, s)
                                             : small_solve_bf16x(fast, q, dev, s);
        for (std::size_t j = 0; j < rf.size(); ++j) res[fast_at[j]] = std::move(rf[j]);
        if (!rest.empty()) {
          auto rr = resident_solve_general<T, XS, MODE>(rest, p, o, dev, s);
          for (std::size_t j = 0; j < rr.size(); ++j) res[rest_at[j]] = std::move(rr[j]);
        }
        return res;
      }
    }
  }
  return resident_solve_general<T, XS, MODE>(items, p, o, dev, s);
}

template <class T, class XS, int KC, int MODE>
void launch_sweep(const SweepArgs<T, XS>& a, const KParams& q, const State* st, int first,
                  int want_P, int nb, std::size_t smem, cudaStream_t s) {
  sweep_kernel<T, XS, KC, MODE><<<unsigned(nb), NT, smem, s>>>(a, q, st, first, want_P, smem);
  DFFKIT_CUDA_CHECK_LAUNCH("sweep_kernel");
}

/// Calls f with the gemm kernels' column width KP (16, 32 or 64).
template <class F>
void with_kp(int kp, F&& f) {
  if (kp == 16) f(std::integral_constant<int, 16>{});
  else if (kp == 32) f(std::integral_constant<int, 32>{});
  else f(std::integral_constant<int, 64>{});
}

/// How the gemm kernels multiply (nmf_gemm.cuh's MODE): float64 on CUDA cores (0); the tf32 mode
/// on tensor cores (1); bf16x, and float32 X at 32 < k <= 64, on tensor cores with float32
/// accuracy (split tf32, 2); float32 X at 16 < k <= 32 on CUDA cores (0), where they were faster
/// on the H200 (session 15 run 6, cuda_bench.py --large, 200000 x 512, k = 20, 100 iterations:
/// 62.1 ms against split tf32's 70.0; at 16384^2, k = 64 split tf32 stays: 307.6 against 313.7;
/// k <= 16 not timed, left on split tf32). DFFKIT_CUDA_GEMM_SIMT=1 puts every float32 case on
/// CUDA cores, =0 every one on split tf32 (for side-by-side timings).
template <class T, class XS, int MODE>
int gemm_mode(int k) {
  if constexpr (!std::is_same<T, float>::value) return 0;
  if constexpr (MODE == 1) return 1;
  const char* v = std::getenv("DFFKIT_CUDA_GEMM_SIMT");
  if (v && v[0] == '1') return 0;
  if (v && v[0] == '0') return 2;
  return std::is_same<XS, float>::value && gemm_kp(k) == 32 ? 0 : 2;
}

/// Calls f with the gemm MODE gm as a constant (only the modes the precision mode can take).
template <class T, int MODE, class F>
void with_gm(int gm, F&& f) {
  if constexpr (!std::is_same<T, float>::value) {
    (void)gm;
    f(std::integral_constant<int, 0>{});
  } else if constexpr (MODE == 1) {
    (void)gm;
    f(std::integral_constant<int, 1>{});
  } else {
    if (gm == 2) f(std::integral_constant<int, 2>{});
    else f(std::integral_constant<int, 0>{});
  }
}

/// Whether the gemm engine serves a problem: Frobenius, k <= 64, its kernels' shared memory
/// within the device's limit.
bool gemm_fits(bool kl, i64 k, int esz, std::size_t limit) {
  const int kp = gemm_kp(k);
  if (kl || kp == 0) return false;
  const std::size_t need = std::max(esz == 8 ? gemm_n_smem<double>(kp) : gemm_n_smem<float>(kp, 1),
                                    esz == 8 ? gemm_p_smem<double>(kp) : gemm_p_smem<float>(kp));
  return need <= limit;
}

/// The gemm engine's products for one iteration (nmf_gemm.cuh): N and the W update, then the
/// P and G_W partials over the plan's row slices.
template <class T, class XS, int GM>
void launch_gemm(const GemmArgs<T, XS>& g, const GemmPlan& plan, const KParams& q,
                 const int* stop, int first, int want_P, cudaStream_t s) {
  with_kp(plan.kp, [&](auto kpc) {
    constexpr int KP = decltype(kpc)::value;
    gemm_n_kernel<T, XS, KP, GM><<<unsigned(plan.n_blocks), NT, gemm_n_smem<T>(KP, GM), s>>>(
        g, q, stop, first);
    DFFKIT_CUDA_CHECK_LAUNCH("gemm_n_kernel");
    if (want_P) {
      gemm_p_kernel<T, XS, KP, GM><<<dim3(unsigned(plan.col_blocks), unsigned(plan.slices)), NT,
                                 gemm_p_smem<T>(KP), s>>>(g, stop);
      DFFKIT_CUDA_CHECK_LAUNCH("gemm_p_kernel");
    }
    gemm_gram_kernel<T, KP><<<unsigned(plan.slices), NT, gemm_gram_smem<T>(KP), s>>>(
        g.W, g.m, g.k, i64(g.k), i64(1), g.slice_rows, g.Gpart, stop);
    DFFKIT_CUDA_CHECK_LAUNCH("gemm_gram_kernel");
  });
}

/// G_H = H H^T through the slice kernel: partials over slices of H's columns, added in the fixed
/// order; the total is left in partial 0 (GHpart, which the gemm engine uses as G_H).
template <class T>
void launch_gemm_gh(const T* H, i64 n, int k, const GemmPlan& plan, T* GHpart, const int* stop,
                    cudaStream_t s) {
  with_kp(plan.kp, [&](auto kpc) {
    constexpr int KP = decltype(kpc)::value;
    gemm_gram_kernel<T, KP><<<unsigned(plan.h_slices), NT, gemm_gram_smem<T>(KP), s>>>(
        H, n, k, i64(1), n, plan.h_slice_cols, GHpart, stop);
    DFFKIT_CUDA_CHECK_LAUNCH("gemm_gram_kernel (H)");
  });
}

/// Whether the gemm engine's single-pass kernel (nmf_fused.cuh) may serve a problem, apart from its
/// shape: float32 factors on tensor cores (gm != 0; X float32 or bfloat16), no group term, X
/// 16-byte aligned, a device of compute capability 9 or newer (its kernel body compiles for sm_90
/// only). By default it serves the tf32 mode and bfloat16 X, where it beats the two passes on the
/// H200 (session 6 run 5, 200000 x 512, k = 20, 100 iterations: tf32 46.2 ms against 53.0,
/// bf16x 54.6 against 57.9), and not float32 X at float32 accuracy (three mma per product: 65.7
/// ms against 57.2 in run 4; 69.0 against 70.6 in run 5, after the per-step accumulation of
/// mma_tf32x3: a tie, left as run 5's tests checked it). DFFKIT_CUDA_GEMM_FUSED=1 makes it
/// serve every case it can, =0 none (for side-by-side timings).
template <class T, class XS>
bool fused_allowed(int gm, const KParams& q, int cc_major, std::uintptr_t X) {
  if (!std::is_same<T, float>::value || sizeof(XS) > 4) return false;
  if (gm == 0 || q.groups || cc_major < 9 || X % 16 != 0) return false;
  const char* v = std::getenv("DFFKIT_CUDA_GEMM_FUSED");
  if (v && v[0] == '0') return false;
  if (v && v[0] == '1') return true;
  return gm == 1 || sizeof(XS) == 2;
}

template <class XS, int GM>
void launch_fused(const FusedArgs<XS>& a, const FusedPlan& fp, const KParams& q, const int* stop, int first,
                  int want_P, bool set_smem, cudaStream_t s) {
  auto go = [&](auto kern) {
    if (set_smem)
      DFFKIT_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(fp.smem)));
    else
      kern<<<unsigned(fp.blocks), NT, fp.smem, s>>>(a, q, stop, first, want_P);
  };
  if (fp.pm == 2) go(gemm_fused_kernel<XS, 2, GM>);
  else go(gemm_fused_kernel<XS, 4, GM>);
  if (!set_smem) DFFKIT_CUDA_CHECK_LAUNCH("gemm_fused_kernel");
}

/// Whether engine "auto" of fit() serves n_components k for X with n columns (element sizes esz,
/// xsz) in `limit` bytes of shared memory per block: the sweep engine holds its fixed part on chip
/// (the k x k statistics and three TM x k tiles; H, the X tiles, P and R only where they fit), or,
/// with `gemm` (a single problem, the gemm engine on by default: DFFKIT_CUDA_GEMM), the gemm
/// engine's kernels fit. The resident engine needs more than the sweep (fixed_smem) and takes
/// nothing the sweep does not.
bool engines_serve(i64 n, int k, bool kl, int esz, int xsz, std::size_t limit, bool gemm) {
  return sweep_layout(n, k, kl, esz, xsz, limit).used <= limit ||
         (gemm && gemm_fits(kl, k, esz, limit));
}

/// Whether engine "auto" takes the gemm engine instead of the sweep where it serves the problem
/// (fit() in nmf_mu.cu, and max_components below): on the H200 (session 6 run 5, cuda_bench.py
/// --ab, float32) it took 64-71 ms against the sweep's 159 ms at 200000 x 512, k = 20, and 194 ms
/// against 1828 ms at 16384^2, k = 64 (5 iterations scaled to 50; tf32 and bf16x alike).
/// DFFKIT_CUDA_GEMM=0 gives the sweep back (for side-by-side timings).
bool gemm_in_auto() {
  const char* v = std::getenv("DFFKIT_CUDA_GEMM");
  return !(v && v[0] == '0');
}

/// The largest n_components up to which every k is served (engines_serve), from the layouts
/// themselves: 146 for float32 and 97 for float64 on an H100 or H200 (232448 bytes per block),
/// either loss, any n. 0 when not even k = 1 fits.
int max_components(i64 n, bool kl, int esz, int xsz, std::size_t limit, bool gemm) {
  int k = 0;
  while (k < (1 << 16) && engines_serve(n, k + 1, kl, esz, xsz, limit, gemm)) ++k;
  return k;
}

/// The error for n_components k beyond the sweep engine's on-chip statistics (the engine of
/// single problems where the gemm engine does not serve, and of batches whose k the resident
/// engine does not hold): the limit for this element size on this device, what float32 data
/// allows, and the fixes. The limits quoted are the sweep's (gemm = false): every path serves
/// them.
std::string too_many_components(int k, i64 n, bool kl, int esz, int xsz, std::size_t limit) {
  const int here = max_components(n, kl, esz, xsz, limit, false);
  const std::string dt = esz == 8 ? "float64" : "float32";
  std::string msg = "dffkit._cuda: n_components=" + std::to_string(k) +
                    " is too large for the CUDA engine: its per-block statistics (two k x k "
                    "matrices and three " + std::to_string(TM) + " x k tiles) live in shared "
                    "memory, " +
                    std::to_string(limit) + " bytes per block on this device, which holds " +
                    "n_components <= " + std::to_string(here) + " for " + dt + " data";
  if (esz == 8)
    msg += " (n_components <= " + std::to_string(max_components(n, kl, 4, 4, limit, false)) +
           " for float32 data)";
  msg += ". Use n_components <= " + std::to_string(here) + (esz == 8 ? ", float32 X," : "") +
         " or backend='cpu' (backend='auto' chooses the CPU for such a problem when X is on the "
         "host; X in GPU memory must be copied to the host first)";
  return msg;
}

/// Sweep engine for one large problem; GEMM: the gemm engine instead of the row-tile sweep for
/// the products (Frobenius, k <= 64; the statistics, H update and stopping rule are shared).
template <class T, class XS, int MODE, bool GEMM = false>
cuda::FitResult sweep_solve(const Item& item, const Problem& p, const Options& o, int dev,
                            cudaStream_t s) {
  const KParams q = make_kparams(p, o);
  const bool kl = q.kl != 0;
  const i64 m = item.m, n = item.n;
  const int k = int(item.k);
  const std::size_t limit = smem_optin(dev);
  const SweepLayout L = sweep_layout(n, k, kl, sizeof(T), sizeof(XS), limit);
  if (GEMM && !gemm_fits(kl, k, int(sizeof(T)), limit))
    throw invalid_argument("dffkit._cuda: the gemm engine serves the Frobenius loss with "
                           "n_components <= 64; use engine='auto' or 'sweep'");
  if (!GEMM && L.used > limit)
    throw invalid_argument(too_many_components(k, n, kl, int(sizeof(T)), int(sizeof(XS)), limit));
  const i64 tiles = (m + TM - 1) / TM;
  const i64 kn = i64(k) * n;
  const i64 max_parts = std::max<i64>(1, (i64(512) << 20) / std::max<i64>(1, kn * i64(sizeof(T))));
  const GemmPlan plan = GEMM ? gemm_plan(m, n, k, max_parts) : GemmPlan{};
  const int gm = GEMM ? gemm_mode<T, XS, MODE>(k) : 0;
  const int cc_major = GEMM ? code_major(dev) : 0;
  // (X converted to bfloat16 lives in the workspace, whose pieces are 256-byte aligned)
  const std::uintptr_t x_read = std::is_same<XS, T>::value ? item.X : 0;
  const FusedPlan fp = GEMM && fused_allowed<T, XS>(gm, q, cc_major, x_read)
                           ? fused_plan(m, n, k, max_parts, limit, int(sizeof(XS))) : FusedPlan{};
  // nb: partials of P and G_W; nbd: partials of the first iteration's error terms
  const i64 nb = fp.use ? fp.blocks
                 : GEMM ? plan.slices
                        : std::max<i64>(1, std::min<i64>(std::min<i64>(tiles, 264), max_parts));
  const i64 nbd = fp.use ? fp.blocks : GEMM ? plan.n_blocks : nb;
  const i64 nbh = (n + NT - 1) / NT;
  const i64 nbe = error_blocks(m, n);
  const i64 nchunks = (m * n + 4095) / 4096;

  State* st; T *GH, *GW, *rs, *colsum, *Gpart, *cspart, *Ppart, *gR; double *d0p, *ggp, *php,
      *sp, *gnorm, *obj, *chunks; i64* goff; __nv_bfloat16* conv;
  auto carve = [&](Carver& c) {
    st = c.take<State>(1);
    // gemm: G_H is partial 0 of the H-slice partials (the total after their reduction)
    GH = c.take<T>((GEMM ? plan.h_slices : 1) * i64(k) * k); GW = c.take<T>(i64(k) * k);
    rs = c.take<T>(k); colsum = c.take<T>(k);
    Gpart = c.take<T>(nb * k * k); cspart = c.take<T>(nb * k);
    d0p = c.take<double>(nbd); ggp = c.take<double>(nbd);
    Ppart = c.take<T>(nb * kn);
    gR = (kl && !L.R_s) ? c.take<T>(nb * TM * n) : nullptr;
    php = c.take<double>(nbh);
    sp = c.take<double>(nbe);
    goff = c.take<i64>(p.group_offsets ? p.n_groups + 1 : 0);
    gnorm = c.take<double>(p.group_offsets ? p.n_groups * k : 0);
    obj = c.take<double>(o.record_objective ? std::max(o.max_iter, 1) : 0);
    chunks = c.take<double>(nchunks + 1);
    const XS* xs = prepare_x<T, XS>(item.X, m * n, c, &conv);
    (void)xs;
  };
  Carver count;
  carve(count);
  Workspace ws(dev, count.offset + 256);
  try {
  Carver c;
  c.base = ws.data();
  carve(c);
  const XS* Xd = std::is_same<XS, T>::value ? reinterpret_cast<const XS*>(item.X)
                                             : reinterpret_cast<const XS*>(conv);
  convert_x<T, XS>(item.X, conv, m * n, s);
  T* W = reinterpret_cast<T*>(item.W);
  T* H = reinterpret_cast<T*>(item.H);

  State init{};
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(st, &init, sizeof(State), cudaMemcpyHostToDevice, s));
  if (p.group_offsets)
    DFFKIT_CUDA_TRY(cudaMemcpyAsync(goff, p.group_offsets, (p.n_groups + 1) * sizeof(i64),
                                    cudaMemcpyHostToDevice, s));
  // The error: KL and float32 (every mode of it) from one pass over X (error_kernel); float64
  // from the sweep's statistics (the trace identity, no extra pass). In float32 the identity's
  // terms, each about ||X||^2, cancel to rounding noise when the fit is good (cuda/NOTES.md).
  const bool direct = kl || std::is_same<T, float>::value;
  if (!direct) {
    // ||X||^2 in the fixed chunk order (float64 only: X is read as stored, no bf16 copy)
    launch_fixed_order_sum(Xd, m * n, cuda::DType::f64, true, chunks, &st->xx, s);
  }
  auto stats = [&]() {
    if constexpr (GEMM) {
      launch_gemm_gh<T>(H, n, k, plan, GH, &st->stopped, s);
      if (plan.h_slices > 1) {
        reduce_partials_kernel<T><<<unsigned((i64(k) * k + 31) / 32), 256, 0, s>>>(
            st, GH, i64(k) * k, int(plan.h_slices), i64(k) * k);
        DFFKIT_CUDA_CHECK_LAUNCH("reduce_partials_kernel (G_H)");
      }
      return;
    }
    h_stats_kernel<T><<<unsigned(kl ? k : k * k), NT, 0, s>>>(st, H, n, k, kl, GH, rs);
    DFFKIT_CUDA_CHECK_LAUNCH("h_stats_kernel");
  };
  auto full_error = [&](int it, int need, int check) {
    error_kernel<T, XS><<<unsigned(nbe), NT, 0, s>>>(st, Xd, W, H, m, n, k, kl, sp);
    DFFKIT_CUDA_CHECK_LAUNCH("error_kernel");
    finalize_kernel<T><<<1, 32, 0, s>>>(st, it, need, check, 1, kl, o.tol, 0, php, GW, GH, k,
                                        int(nbe), sp, obj, o.record_objective);
    DFFKIT_CUDA_CHECK_LAUNCH("finalize_kernel");
  };
  stats();
  if (direct || o.max_iter < 1) full_error(0, 1, 0);

  const std::size_t smem = L.used;
  if constexpr (!GEMM) {
    with_kc<MODE>(k, [&](auto kc) {
      DFFKIT_CUDA_TRY(cudaFuncSetAttribute(sweep_kernel<T, XS, decltype(kc)::value, MODE>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    });
  }
  GemmArgs<T, XS> g{};
  g.X = Xd; g.W = W; g.H = H; g.GH = GH; g.m = m; g.n = n; g.k = k;
  // 4-element loads: float4, two double2 or one uint2 (bfloat16)
  g.vec = n % 4 == 0 && reinterpret_cast<std::uintptr_t>(Xd) % std::min<std::size_t>(16, 4 * sizeof(XS)) == 0 &&
          reinterpret_cast<std::uintptr_t>(H) % 16 == 0;
  g.goff = p.group_offsets ? goff : nullptr;
  g.ngroups = p.group_offsets ? p.n_groups : 0;
  g.gnorm = gnorm; g.Ppart = Ppart; g.Gpart = Gpart; g.d0part = d0p; g.ggpart = ggp;
  g.slice_rows = plan.slice_rows;
  FusedArgs<XS> fa{};
  if constexpr (std::is_same<T, float>::value && sizeof(XS) <= 4) {
    fa.X = Xd; fa.W = reinterpret_cast<float*>(item.W); fa.H = reinterpret_cast<const float*>(item.H);
    fa.GH = GH; fa.m = m; fa.n = n; fa.k = k; fa.kp = fp.kp; fa.np = fp.np; fa.stages = fp.stages;
    fa.tiles = fp.tiles;
    fa.Ppart = Ppart; fa.Gpart = Gpart; fa.d0part = d0p; fa.ggpart = ggp;
  }
  // the single pass (fp.use) or the two-pass kernels, with a constant MODE
  auto products = [&](bool set_smem, int first, int want_P) {
    with_gm<T, MODE>(gm, [&](auto gmc) {
      constexpr int GM = decltype(gmc)::value;
      if constexpr (GM != 0) {
        if (fp.use) {
          launch_fused<XS, GM>(fa, fp, q, &st->stopped, first, want_P, set_smem, s);
          return;
        }
      }
      if (set_smem) {
        with_kp(plan.kp, [&](auto kpc) {
          constexpr int KP = decltype(kpc)::value;
          DFFKIT_CUDA_TRY(cudaFuncSetAttribute(gemm_n_kernel<T, XS, KP, GM>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               int(gemm_n_smem<T>(KP, GM))));
          DFFKIT_CUDA_TRY(cudaFuncSetAttribute(gemm_p_kernel<T, XS, KP, GM>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               int(gemm_p_smem<T>(KP))));
        });
      } else {
        launch_gemm<T, XS, GM>(g, plan, q, &st->stopped, first, want_P, s);
      }
    });
  };
  if constexpr (GEMM) products(true, 0, 0);
  SweepArgs<T, XS> a;
  a.X = Xd; a.W = W; a.H = H; a.m = m; a.n = n; a.k = k; a.GH = GH; a.rs = rs;
  a.goff = p.group_offsets ? goff : nullptr;
  a.ngroups = p.group_offsets ? p.n_groups : 0;
  a.gnorm = gnorm; a.Ppart = Ppart; a.Gpart = Gpart; a.cspart = cspart; a.d0part = d0p;
  a.ggpart = ggp; a.gR = gR;
  int host_stopped = 0;
  for (int it = 1; it <= o.max_iter; ++it) {
    const bool check = o.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == o.max_iter || o.record_objective;
    const bool first = it == 1 && !direct;
    const bool want_P = o.update_H || (need_err && !direct);
    if (q.groups) {
      group_norm_kernel<T><<<unsigned((p.n_groups * k + 255) / 256), 256, 0, s>>>(
          st, W, goff, p.n_groups, k, gnorm);
      DFFKIT_CUDA_CHECK_LAUNCH("group_norm_kernel");
    }
    if constexpr (GEMM) {
      products(false, int(first), int(want_P));
    } else {
      with_kc<MODE>(k, [&](auto kc) {
        launch_sweep<T, XS, decltype(kc)::value, MODE>(a, q, st, first, want_P, int(nb), smem, s);
      });
    }
    auto reduce_parts = [&](T* part, i64 count) {
      if (nb < 2) return;
      reduce_partials_kernel<T><<<unsigned((count + 31) / 32), 256, 0, s>>>(st, part, count,
                                                                           int(nb), count);
      DFFKIT_CUDA_CHECK_LAUNCH("reduce_partials_kernel");
    };
    if (kl) reduce_parts(cspart, k); else reduce_parts(Gpart, i64(k) * k);
    if (want_P) reduce_parts(Ppart, kn);
    reduce_kernel<T><<<1, NT, 0, s>>>(st, int(nbd), k, Gpart, cspart, d0p, ggp, GW, colsum, kl, first);
    DFFKIT_CUDA_CHECK_LAUNCH("reduce_kernel");
    if (o.update_H || (need_err && !direct)) {
      h_update_kernel<T><<<unsigned(nbh), NT, 0, s>>>(st, q, 1, n, k, Ppart, H, GW, colsum,
                                                       o.update_H, php);
      DFFKIT_CUDA_CHECK_LAUNCH("h_update_kernel");
    }
    if (o.update_H) stats();
    if (o.record_objective) {
      if (q.groups) {
        group_norm_kernel<T><<<unsigned((p.n_groups * k + 255) / 256), 256, 0, s>>>(
            st, W, goff, p.n_groups, k, gnorm);
        DFFKIT_CUDA_CHECK_LAUNCH("group_norm_kernel");
      }
      penalty_kernel<T><<<1, NT, 0, s>>>(st, q, W, H, m, n, k, gnorm, p.n_groups);
      DFFKIT_CUDA_CHECK_LAUNCH("penalty_kernel");
    }
    if (direct && need_err) {
      full_error(it, 1, check);
    } else {
      finalize_kernel<T><<<1, 32, 0, s>>>(st, it, need_err, check, 0, kl, o.tol, int(nbh), php,
                                          GW, GH, k, 0, sp, obj,
                                          o.record_objective);
      DFFKIT_CUDA_CHECK_LAUNCH("finalize_kernel");
    }
    if (check) {
      DFFKIT_CUDA_TRY(cudaMemcpyAsync(&host_stopped, &st->stopped, sizeof(int),
                                      cudaMemcpyDeviceToHost, s));
      DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
      if (host_stopped) break;
    }
  }
  State out{};
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(&out, st, sizeof(State), cudaMemcpyDeviceToHost, s));
  cuda::FitResult r;
  std::vector<double> objective;
  if (o.record_objective) {
    objective.resize(std::max(o.max_iter, 1));
    DFFKIT_CUDA_TRY(cudaMemcpyAsync(objective.data(), obj, objective.size() * sizeof(double),
                                    cudaMemcpyDeviceToHost, s));
  }
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
  r.n_iter = o.max_iter < 1 ? 0 : out.n_iter;
  r.error_init = out.error_init;
  r.error = out.err;
  r.kernel = !GEMM ? "sweep" : fp.use ? "gemm-fused" : "gemm";
  if (o.record_objective) {
    objective.resize(std::max(r.n_iter, 0));
    r.objective = std::move(objective);
  }
  return r;
  } catch (...) {
    cudaStreamSynchronize(s);
    cudaGetLastError();
    throw;
  }
}

}  // namespace
}  // namespace cuda_detail
}  // namespace dffkit

/// Defines cuda_detail::engines_<name>() for one precision mode (used by nmf_mu_<name>.cu).
#define DFFKIT_DEFINE_ENGINES(name, T, XS, MODE)                                              \
  namespace dffkit {                                                                           \
  namespace cuda_detail {                                                                      \
  Engines engines_##name() {                                                                   \
    return Engines{resident_solve<T, XS, MODE>, sweep_solve<T, XS, MODE>,                     \
                   sweep_solve<T, XS, MODE, true>, int(sizeof(T)), int(sizeof(XS))};           \
  }                                                                                            \
  }                                                                                            \
  }
