"""Straightforward baselines that the fast kernels are benchmarked (and checked) against."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def assign_nearest_broadcast(volume: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Nearest centre by an (…, C) broadcast and argmin (ties -> lower index), as uint8."""
    return np.argmin(np.abs(volume[..., None] - centres), axis=-1).astype(np.uint8)


def mode_pool3d_onehot_torch(classes: np.ndarray, window: int, n_classes: int) -> np.ndarray:
    """Stride-1 3D mode filter the one-hot way in PyTorch.

    one-hot (X,Y,Z,C) -> (1,C,X,Y,Z) float -> zero-pad ``-lo`` before and ``hi`` after on each
    axis with ``(lo, hi) = (-(w//2), (w-1)//2)`` (window 3: 1/1; window 2: 1/0, looking back as
    the paper's reference code) -> ``avg_pool3d(w, stride=1)`` -> argmax over C.
    Padded voxels are zero in every channel so they vote for no class; the average is the
    count / w**3 (exact small integers scaled by one constant), so argmax picks the same
    class as on the counts, the first (lowest id) on ties.
    """
    lo, hi = -(window // 2), (window - 1) // 2
    with torch.no_grad():
        k = torch.from_numpy(np.ascontiguousarray(classes)).long()
        onehot = F.one_hot(k, n_classes).permute(3, 0, 1, 2).unsqueeze(0).float()
        pad = (-lo, hi) * 3  # (z_before, z_after, y_before, y_after, x_before, x_after)
        onehot = F.pad(onehot, pad)
        counts = F.avg_pool3d(onehot, kernel_size=window, stride=1)
        return counts.argmax(dim=1)[0].to(torch.uint8).numpy()
