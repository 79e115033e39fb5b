"""Torch versions of the intensity-encoding kernels, for scans that live on a GPU (or any device).

Leaf module: imports torch and this package's ``numba_ops.window_offsets`` (the one boundary
rule of the mode filter), nothing of ``ifad_fast``.

Both functions equal their Numba counterparts in ``numba_ops`` bit for bit:

* ``assign_nearest_torch(v, c)``: ``argmin_i |v - c_i|`` computed in float64 (the Numba kernel
  promotes float32 voxels against float64 centres the same way), a strict ``<`` scan over the
  centres so the lower index wins ties; NaN voxels stay at 0.
* ``mode_pool3d_torch(k, w, C)``: per class, the window count as three 1-D box sums of the
  class indicator (exact small integers in float32), then a running strict ``>`` so that ties
  keep the lower class id. Memory: three volumes of float32/uint8 scratch, never (C, X, Y, Z).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .numba_ops import window_offsets

__all__ = ["assign_nearest_torch", "mode_pool3d_torch"]


def assign_nearest_torch(volume: torch.Tensor, centres) -> torch.Tensor:
    """volume: float tensor of any shape; centres: (C,) sorted ascending, 1 <= C <= 255.

    Returns uint8 class ids of volume.shape, on volume's device.
    """
    c = torch.as_tensor(centres, dtype=torch.float64, device=volume.device).reshape(-1)
    if not 1 <= c.numel() <= 255:
        raise ValueError(f"1 to 255 centres are supported, got {c.numel()}")
    if c.numel() > 1 and bool((c[1:] < c[:-1]).any()):
        raise ValueError("centres must be sorted ascending")
    v = volume.to(torch.float64)
    best_d = (v - c[0]).abs()
    best_i = torch.zeros(volume.shape, dtype=torch.uint8, device=volume.device)
    for j in range(1, c.numel()):
        d = (v - c[j]).abs()
        closer = d < best_d
        best_d = torch.where(closer, d, best_d)
        best_i.masked_fill_(closer, j)
    return best_i


def _box_sum(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Sum of x[i+lo .. i+hi] along each of the three axes of x (X, Y, Z), zeros beyond the edges."""
    n = hi - lo + 1
    for axis in range(3):
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = -lo                   # F.pad counts axes from the last
        pad[2 * (2 - axis) + 1] = hi
        p = F.pad(x, pad)
        x = sum(p.narrow(axis, d, x.shape[axis]) for d in range(n))
    return x


def mode_pool3d_torch(classes: torch.Tensor, window: int, n_classes: int) -> torch.Tensor:
    """Stride-1 3D mode filter of a class volume (X, Y, Z) integer -> uint8, same shape.

    The neighbourhood of index i along each axis is i+lo .. i+hi with
    (lo, hi) = numba_ops.window_offsets(window); voxels outside the volume vote for no class;
    ties go to the lower class id.
    """
    if classes.ndim != 3:
        raise ValueError(f"classes must be a 3-D tensor, got shape {tuple(classes.shape)}")
    if window < 1 or not 1 <= n_classes <= 256:
        raise ValueError(f"window must be >= 1 and n_classes in [1, 256], got {window}, {n_classes}")
    lo, hi = window_offsets(int(window))
    best_count = torch.full(classes.shape, -1.0, device=classes.device)
    best = torch.zeros(classes.shape, dtype=torch.uint8, device=classes.device)
    for k in range(n_classes):
        count = _box_sum((classes == k).to(torch.float32), lo, hi)
        more = count > best_count
        best_count = torch.where(more, count, best_count)
        best.masked_fill_(more, k)
    return best
