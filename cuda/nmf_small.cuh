// The host side of the resident engine's fast path (kernel: nmf_small_kernel.cuh): which
// problems it takes, the cluster size, the launch. This header lives inside namespace
// dffkit::cuda_detail::{anonymous} (nmf_engine.cuh).

int small_cols_cluster(i64 m, i64 n, int K, std::size_t limit, const KParams& q);

/// Whether a fast-path problem takes the column-split kernel: with q.small_cols, where it fits
/// (all of W is replicated on every block: problems with many rows keep the row split).
bool small_uses_cols(i64 m, i64 n, i64 k, std::size_t limit, const KParams& q) {
  const int K = small_width(k);
  return q.small_cols && K != 0 && m >= 1 && n >= 1 && small_cols_cluster(m, n, K, limit, q) > 0;
}

/// Blocks per problem for the fast path, 0 where it does not apply. From the shape and the
/// call's switches (q.small_tc: the tensor-core kernel's layout; q.small_one_per_sm: the fewest
/// blocks that fit one to an SM instead of two; q.small_cols: the column-split kernel's).
int small_cluster(i64 m, i64 n, i64 k, std::size_t limit, const KParams& q) {
  const int K = small_width(k);
  if (K == 0 || m < 1 || n < 1) return 0;
  if (small_uses_cols(m, n, k, limit, q)) return small_cols_cluster(m, n, K, limit, q);
  const std::size_t two = (limit + 1024) / 2 - 1024;  // two blocks per SM
  for (std::size_t cap : {two, limit}) {
    if (q.small_one_per_sm && cap == two) continue;
    for (int C = 1; C <= 8; C *= 2)
      if (m >= C && small_layout(m, n, K, C, q.small_tc != 0).used <= cap) return C;
  }
  return 0;
}

/// Blocks per problem for the column-split kernel (q.small_cols), 0 where it does not apply:
/// the smallest C in {1, 2, 4, 8, 16} whose blocks fit two to an SM (else one), each with at least
/// one quad of columns and at most SNT; q.small_cols_c = C takes C instead where the problem
/// fits it (side-by-side timings; from the shape and the switch only, as every choice here).
int small_cols_cluster(i64 m, i64 n, int K, std::size_t limit, const KParams& q) {
  const std::size_t two = (limit + 1024) / 2 - 1024;
  const i64 Q = (n + 3) / 4;
  auto fits = [&](int C, std::size_t cap) {
    return C <= Q && (Q + C - 1) / C <= SNT && small_cols_layout(m, n, K, C).used <= cap;
  };
  if (q.small_cols_c && fits(q.small_cols_c, limit)) return q.small_cols_c;
  for (std::size_t cap : {two, limit})
    for (int C = 1; C <= SC_MAX_C; C *= 2)
      if (fits(C, cap)) return C;
  return 0;
}

/// Whether the options allow the fast path (Frobenius, no groups, no objective, iterations).
bool small_options_ok(const KParams& q, int cc_major) {
  if (cc_major < 9 || q.kl || q.groups || q.record_obj || q.max_iter < 1) return false;
  const char* off = std::getenv("DFFKIT_CUDA_SMALL");
  return !(off && *off == '0');
}

template <bool BF16, int K, bool TC, int MINB = DFFKIT_SMALL_MINB>
void launch_small(const SmallDesc* d_descs, std::size_t count, const KParams& q, ResOut* d_out,
                  std::size_t smem, int C, cudaStream_t s) {
  auto kern = small_kernel<BF16, K, TC, MINB>;
  DFFKIT_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  launch_clusters(kern, count, C, SNT, smem, s, d_descs, q, d_out, C);
  DFFKIT_CUDA_CHECK_LAUNCH("small_kernel");
}

template <bool BF16, int K>
void launch_small_cols(const SmallDesc* d_descs, std::size_t count, const KParams& q, ResOut* d_out,
                       std::size_t smem, int C, cudaStream_t s) {
  auto kern = small_cols_kernel<BF16, K>;
  DFFKIT_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  if (C > 8) DFFKIT_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  launch_clusters(kern, count, C, SNT, smem, s, d_descs, q, d_out, C);
  DFFKIT_CUDA_CHECK_LAUNCH("small_cols_kernel");
}

template <class F>
void with_small_width(int K, F&& f) {
  switch (K) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 12: f(std::integral_constant<int, 12>{}); break;
    default: f(std::integral_constant<int, 16>{}); break;
  }
}

/// Whether the CUDA-core kernels are launched with the register budget of one block per SM
/// (MINB = 1: 255 registers, no spills) rather than two (128 registers, 220-460 bytes of spills
/// per thread): when every block of the call fits one to an SM at once (H200, session 3, the
/// same run: one image 1.84 -> 1.48 ms with 1; the 4096 batch 173 -> 207 ms, so 2 there).
/// DFFKIT_CUDA_SMALL_REGS=1 or 2 forces one (side-by-side timings).
template <class Groups>
bool small_one_block_per_sm(const Groups& groups, const KParams& q, int dev) {
  if (q.small_regs == 1 || q.small_regs == 2) return q.small_regs == 1;
  i64 blocks = 0;
  for (const auto& g : groups) blocks += i64(g.count) * g.C;
  int sms = 0;
  DFFKIT_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return blocks <= sms;
}

/// The fast path for the problems the caller found eligible (small_cluster > 0): one launch per
/// (cluster size, width) group, in the items' order within a group.
template <bool BF16>
std::vector<cuda::FitResult> small_solve(const std::vector<Item>& items, const KParams& q,
                                         int dev, cudaStream_t s) {
  const std::size_t limit = smem_optin(dev);
  const std::size_t B = items.size();
  const bool tc = q.small_tc != 0;
  Carver count;
  count.take<SmallDesc>(i64(B));
  count.take<ResOut>(i64(B));
  Workspace ws(dev, count.offset + 256);
  try {
    Carver c;
    c.base = ws.data();
    SmallDesc* d_descs = c.take<SmallDesc>(i64(B));
    ResOut* d_out = c.take<ResOut>(i64(B));
    std::vector<int> cs(B), ks(B), cols(B);
    for (std::size_t b = 0; b < B; ++b) {
      cs[b] = small_cluster(items[b].m, items[b].n, items[b].k, limit, q);
      ks[b] = small_width(items[b].k);
      cols[b] = small_uses_cols(items[b].m, items[b].n, items[b].k, limit, q);
    }
    std::vector<std::size_t> order;
    std::vector<SmallDesc> sorted;
    struct Group { std::size_t start, count, smem; int C, K, cols; };
    std::vector<Group> groups;
    for (int cl : {0, 1})
      for (int C = 1; C <= SC_MAX_C; C *= 2)
        for (int K : {4, 5, 8, 12, 16}) {
          Group g{sorted.size(), 0, 0, C, K, cl};
          for (std::size_t b = 0; b < B; ++b)
            if (cs[b] == C && ks[b] == K && cols[b] == cl) {
              const Item& it = items[b];
              order.push_back(b);
              sorted.push_back(SmallDesc{reinterpret_cast<const float*>(it.X),
                                         reinterpret_cast<float*>(it.W),
                                         reinterpret_cast<float*>(it.H), it.m, it.n, int(it.k)});
              g.smem = std::max(g.smem, cl ? small_cols_layout(it.m, it.n, K, C).used
                                           : small_layout(it.m, it.n, K, C, tc).used);
            }
          g.count = sorted.size() - g.start;
          if (g.count) groups.push_back(g);
        }
    DFFKIT_CUDA_TRY(cudaMemcpyAsync(d_descs, sorted.data(), B * sizeof(SmallDesc),
                                    cudaMemcpyHostToDevice, s));
    const bool one_per_sm = small_one_block_per_sm(groups, q, dev);
    for (const Group& g : groups)
      with_small_width(g.K, [&](auto kw) {
        constexpr int K = decltype(kw)::value;
        if (g.cols) {
          // q.small_cols_push where the group's larger layout fits (C from the shape either way)
          KParams qc = q;
          std::size_t smem = g.smem;
          if (q.small_cols_push) {
            std::size_t wide = 0;
            for (std::size_t j = g.start; j < g.start + g.count; ++j)
              wide = std::max(wide, small_cols_layout(sorted[j].m, sorted[j].n, K, g.C, true).used);
            qc.small_cols_push = wide <= limit;
            if (qc.small_cols_push) smem = wide;
          }
          launch_small_cols<BF16, K>(d_descs + g.start, g.count, qc, d_out + g.start, smem, g.C, s);
        }
        else if (tc)
          launch_small<BF16, K, true>(d_descs + g.start, g.count, q, d_out + g.start, g.smem, g.C, s);
        else if (one_per_sm)
          launch_small<BF16, K, false, 1>(d_descs + g.start, g.count, q, d_out + g.start, g.smem, g.C, s);
        else
          launch_small<BF16, K, false>(d_descs + g.start, g.count, q, d_out + g.start, g.smem, g.C, s);
      });
    std::vector<ResOut> sorted_out(B);
    DFFKIT_CUDA_TRY(cudaMemcpyAsync(sorted_out.data(), d_out, B * sizeof(ResOut),
                                    cudaMemcpyDeviceToHost, s));
    DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
    std::vector<cuda::FitResult> res(B);
    for (std::size_t j = 0; j < B; ++j) {
      cuda::FitResult& r = res[order[j]];
      r.n_iter = sorted_out[j].n_iter;
      r.error_init = sorted_out[j].error_init;
      r.error = sorted_out[j].error;
      r.kernel = cols[order[j]] ? "resident-fast-cols" : "resident-fast";
    }
    return res;
  } catch (...) {
    cudaStreamSynchronize(s);
    cudaGetLastError();
    throw;
  }
}
