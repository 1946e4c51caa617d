#pragma once
// Pieces the whole-solve harnesses (resident_emu.cpp, gemm_solve_emu.cpp) share: the options
// from meta.txt, the results to files.
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "emu_io.hpp"
#include "nmf_device_common.cuh"

namespace emu_solve {

/// Loss, penalties and options from meta.txt (beta, l1_W, l2_W, l1_H, l2_H, lam, mu, update_H,
/// max_iter, record, tol; groups when ngroups > 0 and lam > 0).
inline dffkit::cuda_detail::KParams params(std::map<std::string, std::string>& meta) {
  dffkit::cuda_detail::KParams q;
  q.kl = meta.count("beta") && std::stoi(meta["beta"]) == 1;
  q.l1_W = std::stod(meta["l1_W"]); q.l2_W = std::stod(meta["l2_W"]);
  q.l1_H = std::stod(meta["l1_H"]); q.l2_H = std::stod(meta["l2_H"]);
  q.lam = std::stod(meta["lam"]); q.mu = std::stod(meta["mu"]);
  q.groups = std::stoll(meta["ngroups"]) > 0 && q.lam > 0;
  q.update_H = std::stoi(meta["update_H"]);
  q.max_iter = std::stoi(meta["max_iter"]);
  q.record_obj = std::stoi(meta["record"]);
  q.tol = std::stod(meta["tol"]);
  return q;
}

/// W_out.bin, H_out.bin, objective.bin and out.txt (n_iter error_init error).
template <class T>
void write_results(const std::string& dir, const std::vector<T>& W, const std::vector<T>& H,
                   const std::vector<double>& objective, int n_iter, double error_init, double error) {
  emu_io::write_bin(dir + "/W_out.bin", W.data(), W.size());
  emu_io::write_bin(dir + "/H_out.bin", H.data(), H.size());
  emu_io::write_bin(dir + "/objective.bin", objective.data(), objective.size());
  std::ofstream o(dir + "/out.txt");
  o.precision(17);
  o << n_iter << " " << error_init << " " << error << "\n";
}

}  // namespace emu_solve
