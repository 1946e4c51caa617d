// Runs the general resident kernel (cuda/nmf_engine_kernels.cuh: KL, groups, the objective,
// k > 16, rows of X staged through shared memory, P and R in global memory when they do not fit,
// clusters) on the CPU emulator for tests/test_cuda_emu.py. Usage: resident_emu DIR. DIR/meta.txt
// holds "key value" lines (m n k dtype beta C limit max_iter tol l1_W l2_W l1_H l2_H lam mu
// update_H record ngroups; dtype f32, tf32, f64 or bf16x; limit: the shared memory the layout
// may use); DIR holds X.bin (T, or bfloat16 bits for bf16x), W.bin, H.bin, goff.bin (int64).
// Writes W_out.bin, H_out.bin, objective.bin (float64) and out.txt (n_iter error_init error).
#define DFFKIT_EMULATE 1
#include "nmf_engine_kernels.cuh"

#include <algorithm>
#include <iostream>
#include <string>
#include <vector>

#include "emu_io.hpp"
#include "emu_solve.hpp"

using namespace dffkit::cuda_detail;

namespace {

template <class T, class XS, int MODE>
void run(const std::string& dir, std::map<std::string, std::string>& meta) {
  const i64 m = std::stoll(meta["m"]), n = std::stoll(meta["n"]);
  const int k = std::stoi(meta["k"]), C = std::stoi(meta["C"]);
  const std::size_t limit = std::stoull(meta["limit"]);
  const i64 ng = std::stoll(meta["ngroups"]);
  auto X = emu_io::read_bin<XS>(dir + "/X.bin", std::size_t(m * n));
  auto W = emu_io::read_bin<T>(dir + "/W.bin", std::size_t(m * k));
  auto H = emu_io::read_bin<T>(dir + "/H.bin", std::size_t(k * n));
  auto goff = emu_io::read_bin<i64>(dir + "/goff.bin", ng ? std::size_t(ng + 1) : 0);
  const KParams q = emu_solve::params(meta);
  const ResLayout L = res_layout(C > 1 ? (m + C - 1) / C : m, n, k, q.kl != 0, int(sizeof(T)),
                                 int(sizeof(XS)), limit, C);
  if (L.used > limit) throw std::runtime_error("the layout does not fit the given limit");
  std::vector<double> gnorm(std::size_t(std::max<i64>(ng * k, 1)));
  std::vector<T> gP(std::size_t(L.P_s ? 1 : k * n)), gR(std::size_t(q.kl && !L.R_s ? TM * n : 1));
  std::vector<double> objective(std::size_t(std::max(q.max_iter, 1)), -7.0);
  ResDesc<T, XS> d{};
  d.X = X.data(); d.W = W.data(); d.H = H.data(); d.m = m; d.n = n; d.k = k;
  d.goff = ng ? goff.data() : nullptr;
  d.ngroups = ng;
  d.gnorm = q.groups ? gnorm.data() : nullptr;
  d.gP = L.P_s ? nullptr : gP.data();
  d.gR = q.kl && !L.R_s ? gR.data() : nullptr;
  d.objective = q.record_obj ? objective.data() : nullptr;
  ResOut out{-1, -1.0, -1.0};
  with_kc<MODE>(k, [&](auto kc) {
    dffkit_emu::launch_cluster(resident_kernel<T, XS, decltype(kc)::value, MODE>, dim3(unsigned(C)),
                               dim3(NT), limit, unsigned(C), static_cast<const ResDesc<T, XS>*>(&d), q,
                               &out, limit, C);
  });
  emu_solve::write_results(dir, W, H, objective, out.n_iter, out.error_init, out.error);
  std::ofstream l(dir + "/layout.txt");
  l << "H_s " << L.H_s << "\nP_s " << L.P_s << "\nR_s " << L.R_s << "\nnbuf " << L.nbuf << "\nxs_rows "
    << L.xs_rows << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  return emu_io::run_main(argc, argv, "resident_emu", [](const std::string& dir, std::map<std::string, std::string>& meta) {
    const std::string dt = meta["dtype"];
    if (dt == "f32") run<float, float, 0>(dir, meta);
    else if (dt == "tf32") run<float, float, 1>(dir, meta);
    else if (dt == "f64") run<double, double, 0>(dir, meta);
    else if (dt == "bf16x") run<float, __nv_bfloat16, 0>(dir, meta);
    else throw std::runtime_error("dtype must be f32, tf32, f64 or bf16x");
  });
}
