// A whole Frobenius solve with the gemm engine's kernels on the CPU emulator, for
// tests/test_cuda_emu.py: the kernels of nmf_gemm.cuh and the sweep driver's small kernels
// (nmf_engine_kernels.cuh) launched in the order of sweep_solve<..., GEMM = true> in
// nmf_engine.cuh (keep the two in step). It checks that the kernels compose into the engine's
// contract (partials, their fixed-order sums, G_H from the H slices, the first iteration's
// error terms, the stopping rule, the objective); the host driver itself runs on a GPU only.
// Usage: gemm_solve_emu DIR. DIR/meta.txt: m n k dtype (f32, tf32, f32split, f64, bf16xsplit)
// max_iter tol l1_W l2_W l1_H l2_H lam mu update_H record ngroups max_slices; DIR: X.bin, W.bin,
// H.bin, goff.bin. Writes W_out.bin, H_out.bin, objective.bin, out.txt.
#define DFFKIT_EMULATE 1
#include "nmf_engine_kernels.cuh"
#include "nmf_gemm.cuh"

#include <algorithm>
#include <iostream>
#include <string>
#include <vector>

#include "emu_io.hpp"
#include "emu_solve.hpp"

using namespace dffkit::cuda_detail;
using dffkit_emu::launch;

namespace {

template <class T, class XS, int KP, int MODE>
void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  const i64 m = std::stoll(meta["m"]), n = std::stoll(meta["n"]);
  const int k = std::stoi(meta["k"]);
  const i64 ng = std::stoll(meta["ngroups"]);
  auto X = emu_io::read_bin<XS>(dir + "/X.bin", std::size_t(m * n));
  auto W = emu_io::read_bin<T>(dir + "/W.bin", std::size_t(m * k));
  auto H = emu_io::read_bin<T>(dir + "/H.bin", std::size_t(k * n));
  auto goff = emu_io::read_bin<i64>(dir + "/goff.bin", ng ? std::size_t(ng + 1) : 0);
  const KParams q = emu_solve::params(meta);
  const bool record = q.record_obj != 0;

  const GemmPlan plan = gemm_plan(m, n, k, std::stoll(meta["max_slices"]));
  const i64 nb = plan.slices, nbd = plan.n_blocks, kn = i64(k) * n, nbh = (n + NT - 1) / NT;
  std::vector<State> st(1, State{});
  std::vector<T> GH(static_cast<std::size_t>(plan.h_slices * k * k)), GW(static_cast<std::size_t>(k * k)), colsum(static_cast<std::size_t>(k)),
      Gpart(static_cast<std::size_t>(nb * k * k)), cspart(static_cast<std::size_t>(nb * k)), Ppart(static_cast<std::size_t>(nb * kn));
  std::vector<double> d0p(static_cast<std::size_t>(nbd)), ggp(static_cast<std::size_t>(nbd)), php(static_cast<std::size_t>(nbh)), rsd(static_cast<std::size_t>(k)),
      gnorm(static_cast<std::size_t>(std::max<i64>(ng * k, 1))), obj(static_cast<std::size_t>(std::max(q.max_iter, 1)), -7.0), sp(1), sxp(1),
      cwp(1);
  double xx = 0;  // ||X||^2 of the values the kernels read (the engine: a fixed-order device sum)
  for (i64 e = 0; e < m * n; ++e) {
    const double v = double(xget<T>(X.data() + e));
    xx += v * v;
  }
  st[0].xx = xx;
  State* s = st.data();
  const int* stop = &s->stopped;

  GemmArgs<T, XS> g{};
  g.X = X.data(); g.W = W.data(); g.H = H.data(); g.GH = GH.data(); g.m = m; g.n = n; g.k = k;
  g.vec = n % 4 == 0;
  g.goff = ng ? goff.data() : nullptr; g.ngroups = ng; g.gnorm = gnorm.data();
  g.Ppart = Ppart.data(); g.Gpart = Gpart.data(); g.d0part = d0p.data(); g.ggpart = ggp.data();
  g.slice_rows = plan.slice_rows;

  auto reduce_parts = [&](T* part, i64 count, i64 parts) {
    if (parts < 2) return;
    launch(reduce_partials_kernel<T>, dim3(unsigned((count + 31) / 32)), dim3(256), 0,
           static_cast<const State*>(s), part, count, int(parts), count);
  };
  auto stats = [&]() {
    launch(gemm_gram_kernel<T, KP>, dim3(unsigned(plan.h_slices)), dim3(NT), gemm_gram_smem<T>(KP),
           static_cast<const T*>(H.data()), n, k, i64(1), n, plan.h_slice_cols, GH.data(), stop);
    reduce_parts(GH.data(), i64(k) * k, plan.h_slices);
  };
  auto group_norms = [&]() {
    launch(group_norm_kernel<T>, dim3(unsigned((ng * k + 255) / 256)), dim3(256), 0,
           static_cast<const State*>(s), static_cast<const T*>(W.data()), static_cast<const i64*>(goff.data()),
           ng, k, gnorm.data());
  };
  stats();
  for (int it = 1; it <= q.max_iter; ++it) {
    const bool check = q.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == q.max_iter || record;
    const bool first = it == 1;
    const bool want_P = q.update_H || need_err;
    if (q.groups) group_norms();
    launch(gemm_n_kernel<T, XS, KP, MODE>, dim3(unsigned(plan.n_blocks)), dim3(NT), gemm_n_smem<T>(KP, MODE), g, q,
           stop, int(first));
    if (want_P)
      launch(gemm_p_kernel<T, XS, KP, MODE>, dim3(unsigned(plan.col_blocks), unsigned(plan.slices)), dim3(NT),
             gemm_p_smem<T>(KP), g, stop);
    launch(gemm_gram_kernel<T, KP>, dim3(unsigned(plan.slices)), dim3(NT), gemm_gram_smem<T>(KP),
           static_cast<const T*>(W.data()), m, k, i64(k), i64(1), plan.slice_rows, Gpart.data(), stop);
    reduce_parts(Gpart.data(), i64(k) * k, nb);
    if (want_P) reduce_parts(Ppart.data(), kn, nb);
    launch(reduce_kernel<T>, dim3(1), dim3(NT), 0, s, int(nbd), k, static_cast<const T*>(Gpart.data()),
           static_cast<const T*>(cspart.data()), static_cast<const double*>(d0p.data()),
           static_cast<const double*>(ggp.data()), GW.data(), colsum.data(), 0, int(first));
    if (q.update_H || need_err)
      launch(h_update_kernel<T>, dim3(unsigned(nbh)), dim3(NT), 0, static_cast<const State*>(s), q, 1, n, k,
             Ppart.data(), H.data(), static_cast<const T*>(GW.data()), static_cast<const T*>(colsum.data()),
             int(q.update_H), php.data());
    if (q.update_H) stats();
    if (record) {
      if (q.groups) group_norms();
      launch(penalty_kernel<T>, dim3(1), dim3(NT), 0, s, q, static_cast<const T*>(W.data()),
             static_cast<const T*>(H.data()), m, n, k, static_cast<const double*>(gnorm.data()), ng);
    }
    launch(finalize_kernel<T>, dim3(1), dim3(32), 0, s, it, int(need_err), int(check), 0, 0, q.tol, int(nbh),
           static_cast<const double*>(php.data()), static_cast<const T*>(GW.data()),
           static_cast<const T*>(GH.data()), k, 0, static_cast<const double*>(sp.data()),
           static_cast<const double*>(sxp.data()), static_cast<const double*>(cwp.data()),
           static_cast<const double*>(rsd.data()), obj.data(), int(record));
    if (check && s->stopped) break;
  }
  emu_solve::write_results(dir, W, H, obj, q.max_iter < 1 ? 0 : s->n_iter, s->error_init, s->err);
}

template <class T, class XS, int MODE>
void dispatch(const std::string& dir, std::map<std::string, std::string>& meta) {
  switch (gemm_kp(std::stoll(meta["k"]))) {
    case 16: run<T, XS, 16, MODE>(dir, meta); break;
    case 32: run<T, XS, 32, MODE>(dir, meta); break;
    case 64: run<T, XS, 64, MODE>(dir, meta); break;
    default: throw std::runtime_error("k > 64");
  }
}

}  // namespace

int main(int argc, char** argv) {
  return emu_io::run_main(argc, argv, "gemm_solve_emu", [](const std::string& dir, std::map<std::string, std::string>& meta) {
    const std::string dt = meta["dtype"];
    if (dt == "f32") dispatch<float, float, 0>(dir, meta);
    else if (dt == "tf32") dispatch<float, float, 1>(dir, meta);
    else if (dt == "f32split") dispatch<float, float, 2>(dir, meta);
    else if (dt == "f64") dispatch<double, double, 0>(dir, meta);
    else if (dt == "bf16xsplit") dispatch<float, __nv_bfloat16, 2>(dir, meta);
    else throw std::runtime_error("dtype must be f32, tf32, f32split, f64 or bf16xsplit");
  });
}
