"""Does a Numba parallel call slow the torch work right after it (OpenMP/TBB workers spinning)?

    python bench/omp_spin.py

Times 30 float32 4096×512·512×512 matmuls quiet, right after a 160³ mode_pool3d and 3 s after one.
"""
import time

import numba
import numpy as np
import torch

from ifad_fast.kernels.numba_ops import mode_pool3d


def torch_work(a: torch.Tensor, b: torch.Tensor, n: int = 30) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    return time.perf_counter() - t0


def main() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4096, 512), torch.randn(512, 512)
    cls = np.random.default_rng(0).integers(0, 10, (160, 160, 160)).astype(np.uint8)
    mode_pool3d(cls, 3, 10)                                     # compile, start the workers
    print("threading layer:", numba.threading_layer(), "torch threads:", torch.get_num_threads())
    torch_work(a, b)
    for _ in range(3):
        quiet = torch_work(a, b)
        mode_pool3d(cls, 3, 10)
        right_after = torch_work(a, b)
        mode_pool3d(cls, 3, 10)
        time.sleep(3)
        later = torch_work(a, b)
        print(f"torch 30 matmuls: quiet {quiet:.3f} s, right after numba {right_after:.3f} s, "
              f"3 s after numba {later:.3f} s")


if __name__ == "__main__":
    main()
