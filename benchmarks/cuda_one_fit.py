"""One fit on the CUDA engine: the launches to look at under `ncu` (benchmarks/README.md shows the
command). Default: one image's activations (196 x 512, k = 5, 200 iterations, the fast path).

    python3 benchmarks/cuda_one_fit.py [M N K ITERS [PRECISION [ENGINE]]]
    e.g.  ncu --clock-control none -k regex:gemm_ -c 6 python3 benchmarks/cuda_one_fit.py 16384 16384 64 2 fp32 gemm
"""
import sys

import torch

from dffkit import _backends

args = sys.argv[1:]
m, n, k, iters = (int(a) for a in args[:4]) if len(args) >= 4 else (196, 512, 5, 200)
precision = args[4] if len(args) > 4 else "fp32"
engine = args[5] if len(args) > 5 else "auto"

cuda = _backends.cuda()
torch.manual_seed(0)
X = torch.rand((m, n), device="cuda")
s = float(X.mean() / k) ** 0.5
W = s * torch.rand((m, k), device="cuda")
H = s * torch.rand((k, n), device="cuda")
p = cuda.Params()
p.max_iter, p.tol, p.precision, p.engine = iters, 0.0, precision, engine
cuda.fit(X.data_ptr(), W.data_ptr(), H.data_ptr(), m, n, k, "float32", p, [],
         torch.cuda.current_stream().cuda_stream)
torch.cuda.synchronize()
print(f"fit done: {m}x{n} k={k} {iters} it {precision} engine={engine}")
