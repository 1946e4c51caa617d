// The CUDA engine's entry points: input checks, then the engine (resident or sweep) of the
// precision mode, instantiated in nmf_mu_{f32,tf32,bf16x,f64}.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "nmf_detail.hpp"
#include "nmf_engine.cuh"

namespace dffkit {
namespace cuda {
using namespace cuda_detail;

namespace {

int check_shapes_and_device(const std::vector<Item>& items, DType dt, Precision prec) {
  if (prec != Precision::fp32 && dt != DType::f32)
    throw invalid_argument("dffkit._cuda: precision='tf32' and 'bf16x' need float32 data");
  int dev = -1;
  for (const auto& it : items) {
    Problem p;
    p.m = it.m; p.n = it.n; p.k = it.k;
    check_problem(p);
    if (it.m > (i64(1) << 40) / std::max<i64>(1, it.n))
      throw invalid_argument("dffkit._cuda: X is too large");
    const int dx = require_device_pointer(it.X, "X");
    const int dw = require_device_pointer(it.W, "W");
    const int dh = require_device_pointer(it.H, "H");
    if (dx != dw || dx != dh || (dev >= 0 && dx != dev))
      throw invalid_argument("dffkit._cuda: X, W and H must live on one device");
    dev = dx;
  }
  return dev;
}

Engines pick_engines(DType dt, Precision prec) {
  if (dt == DType::f64) return engines_f64();
  if (prec == Precision::bf16x) return engines_bf16x();
  if (prec == Precision::tf32) return engines_tf32();
  return engines_f32();
}

}  // namespace

int max_components(std::int64_t n, DType dt, Precision prec, bool kl, std::size_t limit,
                   bool batched) {
  if (n < 1) throw invalid_argument("dffkit._cuda.max_components: n must be >= 1");
  const Engines E = pick_engines(dt, prec);  // the mode's element sizes, as fit() lays them out
  return cuda_detail::max_components(n, kl, E.esz, E.xsz, limit, !batched && gemm_in_auto());
}

FitResult fit(std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, const Problem& p,
              const Options& o, DType dt, Precision prec, std::uintptr_t stream, Engine engine) {
  check_problem(p);
  const std::vector<Item> items{Item{X, W, H, p.m, p.n, p.k}};
  const int dev = check_shapes_and_device(items, dt, prec);
  DeviceGuard guard(dev);
  cudaStream_t s = as_stream(stream);
  const std::size_t limit = smem_optin(dev);
  const bool kl = p.loss == Loss::kullback_leibler;
  const Engines E = pick_engines(dt, prec);
  const ResLayout L = res_layout(p.m, p.n, int(p.k), kl, E.esz, E.xsz, limit);
  const bool fits = fixed_smem(int(p.k), E.esz) <= limit && L.used <= limit;
  if (engine == Engine::resident && !fits)
    throw invalid_argument("dffkit._cuda: n_components is too large for the resident engine");
  if (engine == Engine::resident ||
      (engine == Engine::automatic && fits && prefer_resident(p.m, p.n, p.k)))
    return E.resident(items, p, o, dev, s)[0];
  if (engine == Engine::gemm || (engine == Engine::automatic && gemm_in_auto() &&
                                 gemm_fits(kl, p.k, E.esz, limit)))
    return E.gemm(items[0], p, o, dev, s);
  return E.sweep(items[0], p, o, dev, s);
}

std::vector<FitResult> fit_batched(const std::vector<BatchItem>& batch, const Problem& common,
                                   const Options& o, DType dt, Precision prec,
                                   std::uintptr_t stream) {
  if (batch.empty()) return {};
  std::vector<Item> items;
  items.reserve(batch.size());
  for (const auto& b : batch) items.push_back(Item{b.X, b.W, b.H, b.m, b.n, b.k});
  const int dev = check_shapes_and_device(items, dt, prec);
  Problem p = common;
  p.group_offsets = nullptr;
  p.n_groups = 0;
  p.m = items[0].m; p.n = items[0].n; p.k = items[0].k;
  check_problem(p);
  DeviceGuard guard(dev);
  cudaStream_t s = as_stream(stream);
  const std::size_t limit = smem_optin(dev);
  i64 kmax = 0;
  for (const auto& it : items) kmax = std::max(kmax, it.k);
  const Engines E = pick_engines(dt, prec);
  std::vector<FitResult> out;
  if (fixed_smem(int(kmax), E.esz) <= limit) {
    // one launch for the whole batch, in chunks that keep the descriptor upload small
    const std::size_t chunk = 65536;
    for (std::size_t b0 = 0; b0 < items.size(); b0 += chunk) {
      std::vector<Item> part(items.begin() + b0,
                             items.begin() + std::min(items.size(), b0 + chunk));
      auto r = E.resident(part, p, o, dev, s);
      out.insert(out.end(), r.begin(), r.end());
    }
    return out;
  }
  for (const auto& it : items) {
    Problem pi = p;
    pi.m = it.m; pi.n = it.n; pi.k = it.k;
    out.push_back(E.sweep(it, pi, o, dev, s));
  }
  return out;
}

}  // namespace cuda
}  // namespace dffkit
