"""Does a Numba parallel call slow the torch work right after it? (OpenMP/TBB workers spinning.)"""
import time, sys
import numpy as np, torch, numba
from ifad_fast.kernels.numba_ops import mode_pool3d

torch.manual_seed(0)
a, b = torch.randn(4096, 512), torch.randn(512, 512)
cls = np.random.default_rng(0).integers(0, 10, (160, 160, 160)).astype(np.uint8)
mode_pool3d(cls, 3, 10)
print("threading layer:", numba.threading_layer(), "torch threads:", torch.get_num_threads())

def torch_work(n=30):
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    return time.perf_counter() - t0

torch_work()
for rep in range(3):
    base = torch_work()
    mode_pool3d(cls, 3, 10)
    right_after = torch_work()
    mode_pool3d(cls, 3, 10)
    time.sleep(3)
    after_sleep = torch_work()
    print(f"torch 30 matmuls: quiet {base:.3f} s, right after numba {right_after:.3f} s, 3 s after numba {after_sleep:.3f} s")
