"""Random voxel draws for training and restoration, optionally weighted towards the brain.

A draw of K voxels in a volume: the first round(fraction·K) uniformly among the volume's focus
voxels (e.g. the brain), the rest uniformly over the whole grid. Focus draw j is the
`pick = floor(u·count)`-th focus voxel in linear (C) order, found without a per-voxel index
table: the sampler keeps, per volume, the cumulative focus count of every grid row (x, y)
(`starts`, N × (X·Y + 1) int32), so the row is a binary search, and the voxel is found by
scanning that one row of the focus volume itself (Z values), which the caller keeps anyway.
Memory: 4·N·(X·Y + 1) bytes (105 MB for 1,000 volumes of 160³) next to the focus volumes,
whatever the brain sizes; the old N × max-brain-voxels int64 table took ~12 GB there.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SEGMENT = 16    # voxels per row segment: the within-row search scans one segment


def sampler_bytes(n_volumes: int, shape) -> int:
    """Bytes of the sampler's own tables for n_volumes grids of `shape` (the focus volumes not counted)."""
    sx, sy, sz = (int(s) for s in shape)
    n_seg = -(-sz // SEGMENT)
    return n_volumes * (4 * (sx * sy + 1) + (1 if sz < 256 else 2) * sx * sy * (n_seg - 1))


def as_tensor(volumes) -> torch.Tensor:
    """A (N, ...) array or tensor (numpy memmaps included) as a CPU tensor sharing its memory (no copy)."""
    if isinstance(volumes, torch.Tensor):
        return volumes
    array = np.asarray(volumes)
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # a read-only memmap: nothing here writes to it
        return torch.from_numpy(array)


class PointSampler:
    """Draws K voxels per volume: a fraction from each volume's `focus` voxels, the rest uniformly.

    focus: (N, X, Y, Z) tensor or numpy array (a memmap is read in place, never copied) whose
    nonzero voxels are the focus (e.g. the brain mask, or the class volumes themselves), or None
    for uniform draws over the whole grid. Random numbers come from `generator`, on the
    generator's device: a CPU generator gives the same draws on any device; a generator on the
    focus's device draws there, with no host round trip (the device pipeline). The focus lookups
    run where `focus` lives, and the draws are returned there (on the generator's device when no
    point is drawn from a focus).
    """

    def __init__(self, shape, focus=None, fraction: float = 0.0):
        self.shape = tuple(int(s) for s in shape)
        self.fraction = float(fraction) if focus is not None else 0.0
        self.device = torch.device("cpu")
        if self.fraction > 0:
            focus = as_tensor(focus)
            self.device = focus.device
            n, (sx, sy, sz) = focus.shape[0], self.shape
            n_seg = -(-sz // SEGMENT)
            self.flat = focus.reshape(-1)                                   # a view: no copy
            dtype = torch.int32 if sx * sy * sz < 2 ** 31 else torch.int64
            self.starts = torch.zeros(n, sx * sy + 1, dtype=dtype, device=focus.device)
            self.seg = torch.zeros(n, sx * sy, n_seg - 1, dtype=torch.uint8 if sz < 256 else torch.int16,
                                   device=focus.device)
            for i in range(n):                                              # one volume at a time
                inside = F.pad((focus[i] != 0).reshape(sx * sy, sz), (0, n_seg * SEGMENT - sz))
                per_seg = inside.reshape(sx * sy, n_seg, SEGMENT).sum(2, dtype=dtype).cumsum(1)
                self.seg[i] = per_seg[:, :-1].to(self.seg.dtype)
                torch.cumsum(per_seg[:, -1], 0, out=self.starts[i, 1:])
            self.counts = self.starts[:, -1].cpu().long()
            self._counts = self.starts[:, -1].long()                       # where the lookups run
            if (self.counts == 0).any():
                self.fraction = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes held by the sampler's tables (the focus volumes are the caller's)."""
        if self.fraction == 0:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.starts, self.seg))

    def draw(self, rows: torch.Tensor, k: int, generator: torch.Generator, part: slice | None = None):
        """rows: (B,) volume ids -> (idx (B, P, 3) long, lin (B, P) long) on the focus's device, or on
        the generator's when no point is drawn from a focus.

        The random numbers of all K points are always drawn, so `generator` advances the same
        whatever `part` is; `part` (a slice of range(K)) returns only those points: the share of
        one process when several split a batch.
        """
        b, (sx, sy, sz), dev = rows.numel(), self.shape, generator.device
        p0, p1, _ = (part or slice(0, k)).indices(k)
        p1 = max(p0, p1)
        lin = (torch.rand(b, k, generator=generator, dtype=torch.float64, device=dev)[:, p0:p1]
               * (sx * sy * sz)).long()
        n_focus = int(round(self.fraction * k))
        if n_focus:
            lin = lin.to(self.device)
            u = torch.rand(b, n_focus, generator=generator, dtype=torch.float64, device=dev)
            f1 = min(p1, n_focus)
            if f1 > p0:
                rows_d = rows.to(self.device)
                pick = (u[:, p0:f1].to(self.device) * self._counts[rows_d][:, None]).long()
                lin[:, :f1 - p0] = self._locate(rows_d, pick)
        idx = torch.stack((lin // (sy * sz), (lin // sz) % sy, lin % sz), dim=-1)
        return idx, lin

    def _locate(self, rows: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """The pick-th (0-based, (B, P) long) focus voxel of each volume in `rows` -> linear index (B, P)."""
        dev, (sx, sy, sz) = self.starts.device, self.shape
        rows_d, pick_d = rows.to(dev), pick.to(dev, self.starts.dtype)
        starts = self.starts[rows_d]                                         # (B, X·Y + 1)
        row = torch.searchsorted(starts, pick_d, right=True) - 1             # grid row (x, y) of each pick
        rank = pick_d - starts.gather(1, row)                                # its rank in the row
        seg = self.seg[rows_d[:, None], row]                                 # (B, P, n_seg - 1) counts before
        j = (seg <= rank[..., None]).sum(2)                                  # segment holding it
        before = F.pad(seg, (1, 0)).gather(2, j[..., None])[..., 0]
        rank = rank - before                                                 # its rank in the segment
        first = (rows_d[:, None].long() * (sx * sy) + row) * sz + j * SEGMENT   # flat index of the segment
        window = (first[..., None] + torch.arange(SEGMENT, device=dev)).clamp_(max=self.flat.numel() - 1)
        seen = torch.cumsum(self.flat[window] != 0, 2, dtype=torch.int16)   # past the row's end: never reached
        z = j * SEGMENT + (seen <= rank[..., None]).sum(2)
        return row.long() * sz + z
