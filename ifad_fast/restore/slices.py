"""IF 2D, the paper's slice variant, on the 3D engine: one latent per axial slice.

The paper's 2D experiments assign a latent code to each axial slice instead of the whole volume,
the prediction also conditioned on the axial coordinate. Here the decoder is unchanged: γ(p)
encodes all three coordinates of a voxel, so a slice latent's field is the decoder evaluated at
that slice's axial coordinate. A 2D model differs from a 3D one only in what its latents stand
for (`ModelConfig.variant`), so training and restoration run on the same code and backends.

Axial axis: the model grid's last axis. In the physical frame the grid's axes are world R, A, S,
so it is the superior axis whatever the scan's voxel order (LPS, permuted axes, oblique); in the
cube frame it is the scan's own last axis, taken as acquired.

Training (`SliceSampler`, used by train.Trainer): the samples are the (volume, axial slice) pairs
whose slice holds brain (at least one brain voxel; the other slices would only teach background).
The latent table has one row per such slice, volume-major, each volume's brain slices in
increasing order (`slice_table`); it is recomputed from the training data, so a resumed run
checks that it has as many rows. An epoch visits every row once; a batch is `volumes_per_batch`
slices of `points_per_volume` points drawn inside each slice, `brain_fraction` of them among the
slice's brain voxels, the rest uniformly over the slice.

Restoration (`restore_slices`, called by restore.restore_classes for 2D models): the axial axis is
cut into blocks of `slice_step` consecutive slices (`blocks`; the paper: 4, i.e. 40 of 160), each
restored at one slice with its own latent: its default slice, or, when that holds no brain, the
block's brain slice nearest to it (`restored_blocks`), so a brain few slices thick still gets a
map. The restored slices of all scans are ONE batch of latents through restore.optimise_latents
and the backend, whose rows draw their points inside their own slice. A phase's K stays the points
per scan and step: it is spread over the blocks, each slice drawing ceil(K / blocks) points
(`points_per_slice`; the paper's 700 × 16,200 at 160³ and step 4: 405 per slice), so a 2D step
costs what a 3D step does. Row r draws from its own generator, seeded
from (seed, slice index) (`slice_seed`), its initial latent first: a slice's latent does not depend
on which other slices are restored with it. Each slice is scored with its latent, the score fills
its block (replicated `slice_step` times along the axial axis) and the usual 3D post-processing
(min-pool 3, average-pool 15) runs on the whole volume. A block without brain is not searched:
it scores 0 (and restores class 0). The restoration (classes) is replicated like the score.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .. import config as cfg
from ..errors import IfadError
from ..model import Model
from .scoring import DeviceMaps, StageTimes, anomaly_map, dilate, pool_reach, score_points
from .search import initial_latents, optimise_latents


def blocks(depth: int, step: int) -> list[tuple[int, int, int]]:
    """The axial axis of `depth` slices in blocks of `step`: (default slice, start, stop) per block.

    Block j covers slices [j·step, min((j+1)·step, depth)); its default slice, where it is restored
    when that holds brain (`restored_blocks`), is j·step + (step - 1)//2 (the last, shorter block:
    at most its last slice).
    """
    if step < 1:
        raise IfadError(f"the slice step must be at least 1, got {step}")
    out = []
    for start in range(0, depth, step):
        stop = min(start + step, depth)
        out.append((min(start + (step - 1) // 2, stop - 1), start, stop))
    return out


def restored_blocks(has_brain: np.ndarray, step: int) -> list[tuple[int, int, int]]:
    """The blocks (see `blocks`) of an axial axis that hold brain, each with the slice it is restored at.

    has_brain: (Z,) bool, whether each axial slice holds brain. A block is restored at its default
    slice when that holds brain, else at its brain slice nearest to it (the lower of two as near);
    a block without brain is left out.
    """
    out = []
    for s, a, b in blocks(len(has_brain), step):
        held = np.flatnonzero(has_brain[a:b]) + a
        if held.size:
            out.append((int(held[np.argmin(np.abs(held - s))]), a, b))
    return out


def points_per_slice(k: int, depth: int, step: int) -> int:
    """Points each restored slice draws per step when a scan's budget is K: ceil(K / blocks)."""
    return -(-int(k) // len(blocks(depth, step)))


def slice_seed(seed: int, index: int) -> int:
    """The 64-bit seed of the generator of slice `index` under restoration seed `seed`."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0])


def points_in_slices(u: torch.Tensor, u_focus: torch.Tensor | None, cum: torch.Tensor | None,
                     area: int) -> torch.Tensor:
    """In-slice linear indices (x·Y + y) from uniform random numbers.

    u: (B, K) float64 in [0, 1): uniform over the slice's `area` = X·Y voxels. u_focus: (B, F)
    float64 or None: the first F points are the floor(u·count)-th focus voxel of each slice
    instead (rows with no focus voxel keep their uniform points). cum: (B, X·Y) the cumulative
    focus count of each slice in linear order. Returns (B, K) long.
    """
    lin = (u * area).long()
    if u_focus is not None and u_focus.shape[1]:
        counts = cum[:, -1:]
        pick = (u_focus * counts).long()
        found = torch.searchsorted(cum, pick, right=True).clamp_(max=area - 1)
        f = u_focus.shape[1]
        lin[:, :f] = torch.where(counts > 0, found, lin[:, :f])
    return lin


def _focus_slices(focus, vols: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
    """Bool (B, X, Y): the axial slice slices[b] of volume vols[b] of `focus` (tensor or array)."""
    if isinstance(focus, torch.Tensor):
        return focus[vols.to(focus.device), :, :, slices.to(focus.device)].cpu() != 0
    return torch.from_numpy(np.stack([np.asarray(focus[int(v), :, :, int(s)]) != 0
                                      for v, s in zip(vols, slices)]))


def slice_table(focus) -> torch.Tensor:
    """(M, 2) long: (volume, axial slice) of every slice of `focus` (N, X, Y, Z; nonzero = brain,
    a tensor or an array, read one volume at a time) that holds at least one focus voxel;
    volume-major, slices in increasing order."""
    rows = []
    for v in range(focus.shape[0]):
        f = focus[v]
        f = f.cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
        has = (f != 0).reshape(-1, f.shape[-1]).any(0)
        rows.extend((v, int(s)) for s in np.flatnonzero(has))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


class SliceSampler:
    """Training draws of the 2D variant: K points per (volume, axial slice) sample.

    focus: (N, X, Y, Z) tensor or array, nonzero = brain (kept by reference, read a batch of
    slices at a time). `table` (M, 2): the samples (see slice_table); fraction: share of each
    slice's points drawn among its focus voxels. Random numbers come from the caller's generator
    on the CPU.
    """

    def __init__(self, focus, fraction: float = 0.0):
        self.focus = focus
        self.shape = tuple(int(s) for s in focus.shape[1:])
        self.fraction = float(fraction)
        self.table = slice_table(focus)
        if len(self.table) == 0:
            raise IfadError("no training volume holds brain voxels; pass skull-stripped scans")

    def __len__(self) -> int:
        return len(self.table)

    def volumes_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The volume of each sample in `rows` ((B,) long, on rows' device)."""
        return self.table.to(rows.device)[rows, 0]

    def slices_per_volume(self, n_volumes: int) -> list[int]:
        """How many samples (latents) each of the n_volumes training volumes has."""
        return torch.bincount(self.table[:, 0], minlength=n_volumes).tolist()

    def draw(self, rows: torch.Tensor, k: int, generator: torch.Generator, part: slice | None = None):
        """rows: (B,) sample ids -> (idx (B, P, 3) long, lin (B, P) long indices into the flattened
        grid of each sample's volume, `volumes_of(rows)`), on the CPU, as PointSampler.draw.

        Every random number of the K points is drawn (uniform ones, then the focus ones), so the
        generator advances the same whatever `part` is; `part` (a slice of range(K)) returns only
        those points.
        """
        sx, sy, sz = self.shape
        b = rows.numel()
        u = torch.rand(b, k, generator=generator, dtype=torch.float64)
        n_focus = int(round(self.fraction * k))
        u_focus = torch.rand(b, n_focus, generator=generator, dtype=torch.float64) if n_focus else None
        vols, sl = self.table[rows].unbind(1)
        cum = _focus_slices(self.focus, vols, sl).reshape(b, -1).cumsum(1) if n_focus else None
        lin2d = points_in_slices(u, u_focus, cum, sx * sy)
        if part is not None:
            lin2d = lin2d[:, part]
        z = sl[:, None].expand_as(lin2d)
        idx = torch.stack((lin2d // sy, lin2d % sy, z), dim=-1)
        return idx, lin2d * sz + z


class _RowDraws:
    """optimise_latents' `points` for restored slices: row r draws inside its slice from its own
    generator (uniform numbers first, then the brain ones), so rows never share random numbers.
    The draws run on the generators' device (like the 3D path's), targets are gathered on `device`."""

    def __init__(self, classes2d: torch.Tensor, brain2d: torch.Tensor, slices: torch.Tensor, fraction: float,
                 generators: list[torch.Generator], device):
        b, self.sx, self.sy = classes2d.shape
        here = generators[0].device
        self.targets = classes2d.reshape(b, -1).long().to(device)
        self.cum = brain2d.reshape(b, -1).long().cumsum(1).to(here)
        self.slices = slices.to(here)
        self.fraction, self.generators, self.device, self.here = fraction, generators, device, here

    def __call__(self, k: int):
        n_focus = int(round(self.fraction * k))
        u = torch.stack([torch.rand(k, generator=g, dtype=torch.float64, device=self.here) for g in self.generators])
        u_focus = None
        if n_focus:
            u_focus = torch.stack([torch.rand(n_focus, generator=g, dtype=torch.float64, device=self.here)
                                   for g in self.generators])
        lin2d = points_in_slices(u, u_focus, self.cum, self.sx * self.sy)
        idx = torch.stack((lin2d // self.sy, lin2d % self.sy, self.slices[:, None].expand_as(lin2d)), dim=-1)
        return idx.to(self.device), self.targets.gather(1, lin2d.to(self.device))


def search_slices(model: Model, engine, classes: torch.Tensor, brain: torch.Tensor, rows, rc: cfg.RestoreConfig,
                  progress: bool = False, *, draws_on=None, adam: str = "default", graphs: bool = False):
    """The latent search of restored slices, one latent each, as one batch.

    classes: (N, X, Y, Z) uint8 on the backend's device; brain: bool (N, X, Y, Z) (tensor or
    array); rows: (scan, axial slice) pairs. rc.phases' K are points per scan (see the module
    docstring). draws_on: the device of the per-row generators (default the CPU, as the host
    pipeline); adam, graphs: as for optimise_latents. Returns z (B, D) float32 and the per-step
    mean data loss (steps, B) float32 on the classes' device, as optimise_latents.
    """

    depth = classes.shape[-1]
    per_slice = tuple((steps, points_per_slice(k, depth, rc.slice_step)) for steps, k in rc.phases)
    rc_rows = dataclasses.replace(rc, phases=per_slice)
    device = classes.device
    scan = torch.tensor([i for i, _ in rows], dtype=torch.long, device=device)
    slices = torch.tensor([s for _, s in rows], dtype=torch.long, device=device)
    draws_on = torch.device("cpu" if draws_on is None else draws_on)
    generators = [torch.Generator(draws_on).manual_seed(slice_seed(rc.seed, s)) for _, s in rows]
    z0 = torch.cat([initial_latents(model, 1, rc, g).to(device) for g in generators]).float()
    brain = torch.as_tensor(brain).to(device)
    draws = _RowDraws(classes[scan, :, :, slices], brain[scan, :, :, slices], slices, rc.brain_fraction,
                      generators, device)
    return optimise_latents(engine, classes, z0, rc_rows, None, progress, adam=adam, graphs=graphs, points=draws)


def _plane(xy: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """(X, Y) of values' dtype: `values` (P,) at the in-slice linear indices xy (P,), 0 elsewhere."""
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    out[xy] = values
    return out.reshape(shape[0], shape[1])


def restore_slices(backend, model: Model, classes: torch.Tensor, rc: cfg.RestoreConfig, generator: torch.Generator,
                   *, brain: torch.Tensor | None = None, region: str = "brain", progress: bool = False,
                   adam: str = "default", graphs: bool = False, stages=None):
    """IF 2D restoration of a batch of scans on the classes' device (see the module docstring); the
    2D branch of restore.restore_batch, with its arguments.

    classes: (N, X, Y, Z) uint8 on the backend's device, the axial axis last; brain: bool like it
    (default classes != 0). generator: only its device is used (each restored slice draws from its
    own generator, seeded from rc.seed and the slice). Returns restore.DeviceMaps: the anomaly
    map and the raw score (replicated from the restored slices), the classes, the per-step data
    loss averaged over each scan's slices, z (sum S_i, D) and per scan `slices` (S_i,): the
    restored slices holding brain, whose latents z holds scan after scan.
    """
    from ..backends.base import check_classes

    stage = stages or StageTimes(enabled=False)
    check_classes(classes, backend.config.n_classes)
    brain = classes != 0 if brain is None else brain.to(torch.bool)
    n, shape = classes.shape[0], tuple(int(s) for s in classes.shape[1:])
    has_brain = brain.any(2).any(1).cpu().numpy()                       # (N, Z): one read from the device
    rows, where = [], []
    for i in range(n):
        mine = restored_blocks(has_brain[i], rc.slice_step)
        if not mine:
            raise IfadError(f"scan {i} holds no brain voxel on the model grid; pass a skull-stripped scan of a brain")
        where.append(mine)
        rows.extend((i, s) for s, _, _ in mine)
    with stage("search"):
        z, trace = search_slices(model, backend, classes, brain, rows, rc, progress, draws_on=generator.device,
                                 adam=adam, graphs=graphs)

    device = classes.device
    scores, anomalies, predicted, scored, losses = [], [], [], [], []
    r = 0
    for i in range(n):
        with stage("grid"):
            keep = dilate(brain[i], pool_reach(rc)) if region == "brain" else None
            score = torch.zeros(shape, dtype=torch.float32, device=device)
            cls = torch.zeros(shape, dtype=torch.uint8, device=device)
            count, first = 0, r
            for s, a, b in where[i]:
                # the restored slice's voxels whose block column meets the scored region
                column = torch.ones(shape[:2], dtype=torch.bool, device=device) if keep is None else keep[:, :, a:b].any(2)
                xy = column.reshape(-1).nonzero().squeeze(1)
                ce, best = score_points(backend, z[r], classes[i], xy * shape[2] + s, rc.chunk, progress)
                score[:, :, a:b] = _plane(xy, ce, shape)[:, :, None]
                cls[:, :, a:b] = _plane(xy, best, shape)[:, :, None]
                count += xy.numel()
                r += 1
        with stage("post"):
            anomaly = anomaly_map(score, brain[i], rc, region)
        scores.append(score)
        anomalies.append(anomaly)
        predicted.append(cls)
        scored.append(torch.tensor(count, dtype=torch.int64, device=device))
        losses.append(trace[:, first:r].mean(1))
    return DeviceMaps(anomaly=torch.stack(anomalies), score=torch.stack(scores), classes=torch.stack(predicted),
                      z=z, losses=torch.stack(losses, 1), scored=torch.stack(scored), region=region,
                      slices=[np.array([s for s, _, _ in w], dtype=np.int64) for w in where])
