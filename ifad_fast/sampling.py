"""Random voxel draws for training and restoration, optionally weighted towards the brain."""
from __future__ import annotations

import torch


class PointSampler:
    """Draws K voxels per volume: a fraction from each volume's `focus` voxels, the rest uniformly.

    focus: bool (N, X, Y, Z) (e.g. the brain) or None for uniform draws over the whole grid.
    Draws are made on the CPU from `generator`, so they are repeatable on any device.
    """

    def __init__(self, shape, focus: torch.Tensor | None = None, fraction: float = 0.0):
        self.shape = tuple(int(s) for s in shape)
        self.fraction = float(fraction) if focus is not None else 0.0
        if self.fraction > 0:
            flat = focus.reshape(focus.shape[0], -1).cpu()
            self.counts = flat.sum(1)
            if (self.counts == 0).any():
                self.fraction = 0.0
            else:
                self.lists = torch.zeros(flat.shape[0], int(self.counts.max()), dtype=torch.long)
                for i, row in enumerate(flat):
                    where = row.nonzero().squeeze(1)
                    self.lists[i, : where.numel()] = where

    def draw(self, rows: torch.Tensor, k: int, generator: torch.Generator):
        """rows: (B,) volume ids -> (idx (B, K, 3) long, lin (B, K) long) on the CPU."""
        b, (sx, sy, sz) = rows.numel(), self.shape
        lin = (torch.rand(b, k, generator=generator, dtype=torch.float64) * (sx * sy * sz)).long()
        n_focus = int(round(self.fraction * k))
        if n_focus:
            pick = (torch.rand(b, n_focus, generator=generator, dtype=torch.float64)
                    * self.counts[rows][:, None]).long()
            lin[:, :n_focus] = self.lists[rows].gather(1, pick)
        idx = torch.stack((lin // (sy * sz), (lin // sz) % sy, lin % sz), dim=-1)
        return idx, lin
