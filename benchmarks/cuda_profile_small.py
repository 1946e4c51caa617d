"""Phase times of the resident fast path (cuda/nmf_small.cuh; its row-split and column-split
kernels) as block 0 sees them (clock64, DFFKIT_CUDA_PROFILE=1), for the shapes of issue 5's small
cases. Prints the kernels' own lines; needs a build with -DDFFKIT_SMALL_PROFILE (the "prof"
variant of gpu_final.sh --prepare, run through gpu_variants.sh).

    python3 benchmarks/cuda_profile_small.py
"""
from __future__ import annotations

import os

os.environ["DFFKIT_CUDA_PROFILE"] = "1"

import torch  # noqa: E402

from dffkit import _backends  # noqa: E402

cuda = _backends.cuda()


def problem(B, m, n, k):
    torch.manual_seed(0)
    X = torch.rand((B, m, n), device="cuda")
    return X, 0.1 * torch.rand((B, m, k), device="cuda"), 0.1 * torch.rand((B, k, n), device="cuda")


def solve(X, W, H, iters):
    """One batched solve (a lone problem takes the same kernel as in a batch)."""
    B, m, n = X.shape
    p = cuda.Params()
    p.max_iter, p.tol = iters, 0.0
    cuda.fit_batched_strided(X.data_ptr(), W.data_ptr(), H.data_ptr(), B, m, n, W.shape[2],
                             "float32", p, torch.cuda.current_stream().cuda_stream)


SHAPES = [(1, 196, 512, 5, 200), (1, 196, 512, 5, 200), (528, 196, 512, 5, 100),
          (1, 196, 512, 8, 200), (1, 196, 512, 16, 200), (1, 784, 512, 5, 100)]
# the row-split kernel (DFFKIT_CUDA_SMALL_COLS=0), then the column-split one (the default since
# session 15; clusters of 16 too; "gather": its W update split over the cluster,
# DFFKIT_CUDA_SMALL_COLS_GATHER=1, session 16, timed slower in session 17; "vec": the shares of
# X H^T read four floats a request, DFFKIT_CUDA_SMALL_COLS_VEC=1; "push": the shares stored into
# every block, DFFKIT_CUDA_SMALL_COLS_PUSH=1; both session 19, not yet timed)
MODES = {"gather": "DFFKIT_CUDA_SMALL_COLS_GATHER", "vec": "DFFKIT_CUDA_SMALL_COLS_VEC",
         "push": "DFFKIT_CUDA_SMALL_COLS_PUSH"}


def set_cols(cols):
    """The switches of one row: None (row split), "auto" / "16" (cluster size), then a mode."""
    os.environ["DFFKIT_CUDA_SMALL_COLS"] = "1" if cols else "0"
    for key in ("DFFKIT_CUDA_SMALL_COLS_C", *MODES.values()):
        os.environ.pop(key, None)
    if cols:
        size, _, mode = cols.partition(" ")
        if size != "auto":
            os.environ["DFFKIT_CUDA_SMALL_COLS_C"] = size
        if mode:
            os.environ[MODES[mode]] = "1"


for cols in (None, "auto", "16", "auto gather", "16 gather", "auto vec", "16 vec", "auto push", "16 push"):
    set_cols(cols)
    for B, m, n, k, iters in SHAPES[:3] if cols else SHAPES:
        print(f"-- {'cols ' + cols if cols else 'rows'} B={B} {m}x{n} k={k} {iters} it", flush=True)
        solve(*problem(B, m, n, k), iters)
        torch.cuda.synchronize()
set_cols(None)

# timing with the phase clock off (same build)
os.environ["DFFKIT_CUDA_PROFILE"] = "0"


def timed(B, m, n, k, iters, reps):
    X, W0, H0 = problem(B, m, n, k)
    ts = []
    for _ in range(reps + 1):
        W, H = W0.clone(), H0.clone()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        solve(X, W, H, iters)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts = sorted(ts[1:])
    print(f"time B={B} {m}x{n} k={k} {iters} it: median {ts[len(ts) // 2]:.3f} ms", flush=True)


for cols, title in ((None, "row-split kernel"), ("auto", "column-split kernel"),
                    ("auto gather", "column-split kernel, W update gathered"),
                    ("auto vec", "column-split kernel, shares read four floats a request"),
                    ("auto push", "column-split kernel, shares stored into every block")):
    set_cols(cols)
    print(f"{title}:", flush=True)
    timed(1, 196, 512, 5, 200, 9)
    timed(4096, 196, 512, 5, 100, 3)
set_cols(None)
