// Whole solves with the sweep and gemm engines' kernels on the CPU emulator, for
// tests/test_cuda_emu.py: the kernels of nmf_engine_kernels.cuh and nmf_gemm.cuh launched in the
// order of sweep_solve in nmf_engine.cuh (engine "sweep": the row-tile sweep; "gemm": GEMM =
// true; "fused": GEMM = true with the single-pass kernel of nmf_fused.cuh; keep the two in
// step). It checks that the kernels compose into the engine's contract
// (partials and their fixed-order sums, the statistics, the first iteration's error terms, KL's
// full-pass error, the stopping rule, the objective); the host driver itself runs on a GPU only.
// Usage: driver_emu DIR. DIR/meta.txt: engine m n k dtype (f32, tf32, f32split, f64, bf16x,
// bf16xsplit) beta limit max_iter tol l1_W l2_W l1_H l2_H lam mu update_H record ngroups
// max_slices; DIR: X.bin, W.bin, H.bin, goff.bin. Writes W_out.bin, H_out.bin, objective.bin,
// out.txt.
#define DFFKIT_EMULATE 1
#include "nmf_engine_kernels.cuh"
#include "nmf_fused.cuh"

#include <algorithm>
#include <type_traits>
#include <iostream>
#include <string>
#include <vector>

#include "emu_io.hpp"
#include "emu_solve.hpp"

using namespace dffkit::cuda_detail;
using dffkit_emu::launch;

namespace {

/// sweep_solve's loop: the row-tile sweep (GEMM = false, both losses) or the gemm engine's
/// products (GEMM = true, Frobenius; KP its column width), then the shared statistics, H update,
/// objective, error and stopping rule.
template <class T, class XS, int MODE, bool GEMM, int KP = 16>
void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  const i64 m = std::stoll(meta["m"]), n = std::stoll(meta["n"]);
  const int k = std::stoi(meta["k"]);
  const i64 ng = std::stoll(meta["ngroups"]);
  const std::size_t limit = std::stoull(meta["limit"]);
  auto X = emu_io::read_bin<XS>(dir + "/X.bin", std::size_t(m * n));
  auto W = emu_io::read_bin<T>(dir + "/W.bin", std::size_t(m * k));
  auto H = emu_io::read_bin<T>(dir + "/H.bin", std::size_t(k * n));
  auto goff = emu_io::read_bin<i64>(dir + "/goff.bin", ng ? std::size_t(ng + 1) : 0);
  const KParams q = emu_solve::params(meta);
  const bool kl = q.kl != 0, record = q.record_obj != 0;
  const bool direct = kl || std::is_same<T, float>::value;  // the error from a full pass
  if (GEMM && kl) throw std::runtime_error("the gemm engine serves the Frobenius loss");
  const SweepLayout L = sweep_layout(n, k, kl, int(sizeof(T)), int(sizeof(XS)), limit);
  if (!GEMM && L.used > limit) throw std::runtime_error("the sweep layout does not fit the given limit");
  const GemmPlan plan = GEMM ? gemm_plan(m, n, k, std::stoll(meta["max_slices"])) : GemmPlan{};
  constexpr bool FUSABLE = GEMM && MODE != 0 && std::is_same<T, float>::value && sizeof(XS) <= 4;
  const FusedPlan fp = FUSABLE && meta["engine"] == "fused"
                           ? fused_plan(m, n, k, std::stoll(meta["max_slices"]), limit, int(sizeof(XS)),
                                        meta.count("max_stages") ? std::stoi(meta["max_stages"]) : FSTAGES)
                           : FusedPlan{};
  if (meta["engine"] == "fused" && (!fp.use || q.groups)) throw std::runtime_error("the single-pass kernel does not serve this case");
  const i64 tiles = (m + TM - 1) / TM, kn = i64(k) * n;
  // nb: partials of P and G_W; nbd: of the first iteration's error terms
  const i64 nb = fp.use ? fp.blocks : GEMM ? plan.slices : std::max<i64>(1, std::min<i64>(tiles, 264));
  const i64 nbd = fp.use ? fp.blocks : GEMM ? plan.n_blocks : nb, nbh = (n + NT - 1) / NT,
            nbe = error_blocks(m, n);
  const auto z = [](i64 v) { return static_cast<std::size_t>(v); };
  std::vector<State> st(1, State{});
  std::vector<T> GH(z((GEMM ? plan.h_slices : 1) * k * k)), GW(z(k * k)), rs(z(k)), colsum(z(k)),
      Gpart(z(nb * k * k)), cspart(z(nb * k)), Ppart(z(nb * kn)), gR(z(kl && !L.R_s ? nb * TM * n : 1));
  std::vector<double> d0p(z(nbd)), ggp(z(nbd)), php(z(nbh)), sp(z(nbe)),
      gnorm(z(std::max<i64>(ng * k, 1))), obj(z(std::max(q.max_iter, 1)), -7.0);
  double xx = 0;  // ||X||^2 of the values the kernels read (the engine: a fixed-order device sum)
  for (i64 e = 0; e < m * n; ++e) {
    const double v = double(xget<T>(X.data() + e));
    xx += v * v;
  }
  st[0].xx = direct ? 0.0 : xx;
  State* s = st.data();
  const int* stop = &s->stopped;

  auto reduce_parts = [&](T* part, i64 count, i64 parts) {
    if (parts < 2) return;
    launch(reduce_partials_kernel<T>, dim3(unsigned((count + 31) / 32)), dim3(256), 0,
           static_cast<const State*>(s), part, count, int(parts), count);
  };
  auto stats = [&]() {
    if constexpr (GEMM) {
      launch(gemm_gram_kernel<T, KP>, dim3(unsigned(plan.h_slices)), dim3(NT), gemm_gram_smem<T>(KP),
             static_cast<const T*>(H.data()), n, k, i64(1), n, plan.h_slice_cols, GH.data(), stop);
      reduce_parts(GH.data(), i64(k) * k, plan.h_slices);
    } else {
      launch(h_stats_kernel<T>, dim3(unsigned(kl ? k : k * k)), dim3(NT), 0, static_cast<const State*>(s),
             static_cast<const T*>(H.data()), n, k, int(kl), GH.data(), rs.data());
    }
  };
  auto finalize = [&](int it, int need, int check, int mode) {
    launch(finalize_kernel<T>, dim3(1), dim3(32), 0, s, it, need, check, mode, int(kl), q.tol,
           mode == 0 ? int(nbh) : 0, static_cast<const double*>(php.data()), static_cast<const T*>(GW.data()),
           static_cast<const T*>(GH.data()), k, mode == 1 ? int(nbe) : 0, static_cast<const double*>(sp.data()),
           obj.data(), int(record));
  };
  auto full_error = [&](int it, int need, int check) {
    launch(error_kernel<T, XS>, dim3(unsigned(nbe)), dim3(NT), 0, static_cast<const State*>(s),
           static_cast<const XS*>(X.data()), static_cast<const T*>(W.data()), static_cast<const T*>(H.data()), m,
           n, k, int(kl), sp.data());
    finalize(it, need, check, 1);
  };
  auto group_norms = [&]() {
    launch(group_norm_kernel<T>, dim3(unsigned((ng * k + 255) / 256)), dim3(256), 0,
           static_cast<const State*>(s), static_cast<const T*>(W.data()), static_cast<const i64*>(goff.data()),
           ng, k, gnorm.data());
  };
  stats();
  if (direct || q.max_iter < 1) full_error(0, 1, 0);
  SweepArgs<T, XS> a{};
  a.X = X.data(); a.W = W.data(); a.H = H.data(); a.m = m; a.n = n; a.k = k; a.GH = GH.data(); a.rs = rs.data();
  a.goff = ng ? goff.data() : nullptr; a.ngroups = ng; a.gnorm = gnorm.data();
  a.Ppart = Ppart.data(); a.Gpart = Gpart.data(); a.cspart = cspart.data(); a.d0part = d0p.data();
  a.ggpart = ggp.data(); a.gR = gR.data();
  GemmArgs<T, XS> g{};
  g.X = X.data(); g.W = W.data(); g.H = H.data(); g.GH = GH.data(); g.m = m; g.n = n; g.k = k;
  g.vec = n % 4 == 0;
  g.goff = ng ? goff.data() : nullptr; g.ngroups = ng; g.gnorm = gnorm.data();
  g.Ppart = Ppart.data(); g.Gpart = Gpart.data(); g.d0part = d0p.data(); g.ggpart = ggp.data();
  g.slice_rows = plan.slice_rows;
  FusedArgs<XS> fa{};
  if constexpr (FUSABLE) {
    fa.X = X.data(); fa.W = W.data(); fa.H = H.data(); fa.GH = GH.data(); fa.m = m; fa.n = n; fa.k = k;
    fa.kp = fp.kp; fa.np = fp.np; fa.stages = fp.stages; fa.tiles = fp.tiles;
    fa.Ppart = Ppart.data(); fa.Gpart = Gpart.data(); fa.d0part = d0p.data(); fa.ggpart = ggp.data();
  }
  for (int it = 1; it <= q.max_iter; ++it) {
    const bool check = q.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == q.max_iter || record;
    const bool first = it == 1 && !direct;
    const bool want_P = q.update_H || (need_err && !direct);
    if (q.groups) group_norms();
    if (fp.use) {
      if constexpr (FUSABLE) {
        auto go = [&](auto kern) {
          launch(kern, dim3(unsigned(fp.blocks)), dim3(NT), fp.smem, fa, q, stop, int(first), int(want_P));
        };
        if (fp.pm == 2) go(gemm_fused_kernel<XS, 2, MODE>);
        else go(gemm_fused_kernel<XS, 4, MODE>);
      }
    } else if constexpr (GEMM) {
      launch(gemm_n_kernel<T, XS, KP, MODE>, dim3(unsigned(plan.n_blocks)), dim3(NT), gemm_n_smem<T>(KP, MODE), g,
             q, stop, int(first));
      if (want_P)
        launch(gemm_p_kernel<T, XS, KP, MODE>, dim3(unsigned(plan.col_blocks), unsigned(plan.slices)), dim3(NT),
               gemm_p_smem<T>(KP), g, stop);
      launch(gemm_gram_kernel<T, KP>, dim3(unsigned(plan.slices)), dim3(NT), gemm_gram_smem<T>(KP),
             static_cast<const T*>(W.data()), m, k, i64(k), i64(1), plan.slice_rows, Gpart.data(), stop);
    } else {
      with_kc<MODE>(k, [&](auto kc) {
        launch(sweep_kernel<T, XS, decltype(kc)::value, MODE>, dim3(unsigned(nb)), dim3(NT), L.used, a, q,
               static_cast<const State*>(s), int(first), int(want_P), L.used);
      });
    }
    if (kl) reduce_parts(cspart.data(), k, nb); else reduce_parts(Gpart.data(), i64(k) * k, nb);
    if (want_P) reduce_parts(Ppart.data(), kn, nb);
    launch(reduce_kernel<T>, dim3(1), dim3(NT), 0, s, int(nbd), k, static_cast<const T*>(Gpart.data()),
           static_cast<const T*>(cspart.data()), static_cast<const double*>(d0p.data()),
           static_cast<const double*>(ggp.data()), GW.data(), colsum.data(), int(kl), int(first));
    if (q.update_H || (need_err && !direct))
      launch(h_update_kernel<T>, dim3(unsigned(nbh)), dim3(NT), 0, static_cast<const State*>(s), q, 1, n, k,
             Ppart.data(), H.data(), static_cast<const T*>(GW.data()), static_cast<const T*>(colsum.data()),
             int(q.update_H), php.data());
    if (q.update_H) stats();
    if (record) {
      if (q.groups) group_norms();
      launch(penalty_kernel<T>, dim3(1), dim3(NT), 0, s, q, static_cast<const T*>(W.data()),
             static_cast<const T*>(H.data()), m, n, k, static_cast<const double*>(gnorm.data()), ng);
    }
    if (direct && need_err) full_error(it, 1, int(check));
    else finalize(it, int(need_err), int(check), 0);
    if (check && s->stopped) break;
  }
  emu_solve::write_results(dir, W, H, obj, q.max_iter < 1 ? 0 : s->n_iter, s->error_init, s->err);
  std::ofstream l(dir + "/layout.txt");
  l << "H_s " << L.H_s << "\nP_s " << L.P_s << "\nR_s " << L.R_s << "\nnbuf " << L.nbuf << "\n";
  if (fp.use) l << "stages " << fp.stages << "\nblocks " << fp.blocks << "\n";
}

template <class T, class XS, int MODE>
void dispatch(const std::string& dir, std::map<std::string, std::string>& meta) {
  if (meta["engine"] == "sweep") {
    run<T, XS, MODE == 2 ? 0 : MODE, false>(dir, meta);  // the sweep has no split-tf32 mode
    return;
  }
  switch (gemm_kp(std::stoll(meta["k"]))) {
    case 16: run<T, XS, MODE, true, 16>(dir, meta); break;
    case 32: run<T, XS, MODE, true, 32>(dir, meta); break;
    case 64: run<T, XS, MODE, true, 64>(dir, meta); break;
    default: throw std::runtime_error("k > 64");
  }
}

}  // namespace

int main(int argc, char** argv) {
  return emu_io::run_main(argc, argv, "driver_emu", [](const std::string& dir, std::map<std::string, std::string>& meta) {
    const std::string dt = meta["dtype"];
    if (dt == "f32") dispatch<float, float, 0>(dir, meta);
    else if (dt == "tf32") dispatch<float, float, 1>(dir, meta);
    else if (dt == "f32split") dispatch<float, float, 2>(dir, meta);
    else if (dt == "f64") dispatch<double, double, 0>(dir, meta);
    else if (dt == "bf16xsplit") dispatch<float, __nv_bfloat16, 2>(dir, meta);
    else if (dt == "bf16x") dispatch<float, __nv_bfloat16, 0>(dir, meta);
    else throw std::runtime_error("dtype must be f32, tf32, f32split, f64, bf16x or bf16xsplit");
  });
}
