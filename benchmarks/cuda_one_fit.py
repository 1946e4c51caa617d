"""One fit of one image's activations (196 x 512, k = 5, 200 iterations) on the CUDA engine: the
launch to look at under `ncu` (benchmarks/README.md shows the command)."""
import torch

from dffkit import _backends

cuda = _backends.cuda()
torch.manual_seed(0)
X = torch.rand((196, 512), device="cuda")
W = 0.1 * torch.rand((196, 5), device="cuda")
H = 0.1 * torch.rand((5, 512), device="cuda")
p = cuda.Params()
p.max_iter, p.tol = 200, 0.0
cuda.fit(X.data_ptr(), W.data_ptr(), H.data_ptr(), 196, 512, 5, "float32", p, [],
         torch.cuda.current_stream().cuda_stream)
torch.cuda.synchronize()
print("fit done")
