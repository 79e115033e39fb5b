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

Restoration (`restore_slices`, called by restore.restore_classes for 2D models): IF 2D is a row
plan of the one restoration core (core.py), `SliceRows`: a scan is one row per restored slice.
The axial axis is cut into blocks of `slice_step` consecutive slices (`blocks`; the paper: 4, i.e.
40 of 160), each restored at one slice with its own latent: its default slice, or, when that holds
no brain, the block's brain slice nearest to it (`restored_blocks`), so a brain few slices thick
still gets a map. The restored slices of all scans are ONE batch of latents through
core.restore_rows (restore.optimise_latents and the backend), whose rows draw their points inside
their own slice (`SliceDraws`; training's `SliceSampler` shares its in-slice draws, one generator
for a batch instead of one per row). A phase's K stays the points per scan and step: it is spread
over the blocks, each slice drawing ceil(K / blocks) points (`points_per_slice`; the paper's
700 × 16,200 at 160³ and step 4: 405 per slice), so a 2D step costs what a 3D step does. Row r
draws from its own generator, seeded from (seed, slice index) (`slice_seed`), its initial latent
first: a slice's latent does not depend on which other slices are restored with it. Each slice is
scored with its latent, the score fills its block (replicated `slice_step` times along the axial
axis) and the usual 3D post-processing (min-pool 3, average-pool 15) runs on the whole volume; a
scan's loss is the mean over its slices' rows. A block without brain is not searched: it scores 0
(and restores class 0). The restoration (classes) is replicated like the score.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .. import config as cfg
from ..backends.base import check_classes
from ..errors import IfadError
from ..model import Model
from .core import RowPlan, restore_rows, search_rows
from .scoring import DeviceMaps, dilate, pool_reach, score_points
from .search import initial_latents


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


def slice_uniforms(rand, k: int, fraction: float):
    """The random numbers of K in-slice points, in the order they are drawn: (u (B, K), u_focus
    (B, F) or None), F = round(fraction·K), from rand(n) -> (B, n) float64 (one generator for the
    batch in training, one per row in restoration)."""
    n_focus = int(round(fraction * k))
    u = rand(k)
    return u, (rand(n_focus) if n_focus else None)


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


def slice_voxels(lin2d: torch.Tensor, slices: torch.Tensor, sy: int) -> torch.Tensor:
    """(B, P, 3) long voxel indices (x, y, z) of in-slice linear indices lin2d (B, P) long (x·Y + y)
    in the axial slices `slices` (B,) long."""
    return torch.stack((lin2d // sy, lin2d % sy, slices[:, None].expand_as(lin2d)), dim=-1)


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
        u, u_focus = slice_uniforms(lambda n: torch.rand(b, n, generator=generator, dtype=torch.float64), k,
                                    self.fraction)
        vols, sl = self.table[rows].unbind(1)
        cum = _focus_slices(self.focus, vols, sl).reshape(b, -1).cumsum(1) if u_focus is not None else None
        lin2d = points_in_slices(u, u_focus, cum, sx * sy)
        if part is not None:
            lin2d = lin2d[:, part]
        idx = slice_voxels(lin2d, sl, sy)
        return idx, lin2d * sz + idx[..., 2]


class SliceDraws:
    """IF 2D's draws in restoration (optimise_latents' `points`): row r draws inside its slice from
    its own generator (uniform numbers first, then the brain ones), so rows never share random
    numbers. classes2d: (B, X, Y) uint8 and brain2d: bool (B, X, Y), the rows' slices; slices:
    (B,) long. The draws run on the generators' device (like IF 3D's); a call k returns (idx
    (B, k, 3) long, targets (B, k) long) on `device`."""

    def __init__(self, classes2d: torch.Tensor, brain2d: torch.Tensor, slices: torch.Tensor, fraction: float,
                 generators: list[torch.Generator], device):
        b, self.sx, self.sy = classes2d.shape
        here = generators[0].device
        self.targets = classes2d.reshape(b, -1).long().to(device)
        self.cum = brain2d.reshape(b, -1).long().cumsum(1).to(here)
        self.slices = slices.to(here)
        self.fraction, self.generators, self.device, self.here = fraction, generators, device, here

    def _rand(self, n: int) -> torch.Tensor:
        """(B, n) float64: n uniform numbers from each row's generator, row after row."""
        return torch.stack([torch.rand(n, generator=g, dtype=torch.float64, device=self.here)
                            for g in self.generators])

    def __call__(self, k: int):
        u, u_focus = slice_uniforms(self._rand, k, self.fraction)
        lin2d = points_in_slices(u, u_focus, self.cum, self.sx * self.sy)
        idx = slice_voxels(lin2d, self.slices, self.sy)
        return idx.to(self.device), self.targets.gather(1, lin2d.to(self.device))


def scan_blocks(brain: torch.Tensor, step: int) -> list[list[tuple[int, int, int]]]:
    """Per scan of brain (N, X, Y, Z) bool, its `restored_blocks` (one read from the device);
    IfadError for a scan without brain."""
    has_brain = brain.any(2).any(1).cpu().numpy()                       # (N, Z)
    where = []
    for i in range(brain.shape[0]):
        mine = restored_blocks(has_brain[i], step)
        if not mine:
            raise IfadError(f"scan {i} holds no brain voxel on the model grid; pass a skull-stripped scan of a brain")
        where.append(mine)
    return where


class SliceRows(RowPlan):
    """IF 2D's row plan: a scan is one row per restored axial slice (see the module docstring).

    classes: (N, X, Y, Z) uint8 on the backend's device; brain: bool (N, X, Y, Z), a tensor or an
    array. rows: the (scan, axial slice) pairs to search, for a search alone (`search_slices`);
    default: each scan's restored blocks (`scan_blocks`), scan after scan, which `score` fills.
    The search's K are per slice (`points_per_slice`); each row draws from its own generator on
    `draws_on` (default the CPU), seeded from (rc.seed, slice): z0 first, then the points.
    """

    def __init__(self, classes: torch.Tensor, brain, rc: cfg.RestoreConfig, *, rows=None, region: str = "brain",
                 draws_on=None):
        device = classes.device
        self.classes, self.post, self.region, self.n_scans = classes, rc, region, classes.shape[0]
        self.brain = torch.as_tensor(brain).to(device)
        self.where = None
        if rows is None:
            self.where = scan_blocks(self.brain, rc.slice_step)
            rows = [(i, s) for i, w in enumerate(self.where) for s, _, _ in w]
            self.slices = [np.array([s for s, _, _ in w], dtype=np.int64) for w in self.where]
            self.first = [0, *np.cumsum([len(w) for w in self.where]).tolist()]
        depth = classes.shape[-1]
        self.rc = dataclasses.replace(rc, phases=tuple((steps, points_per_slice(k, depth, rc.slice_step))
                                                       for steps, k in rc.phases))
        self.rows = rows
        self.draws_on = torch.device("cpu" if draws_on is None else draws_on)

    def start(self, model: Model):
        """z0 (B, D) float32, row r's from its own generator, then the rows' `SliceDraws`."""
        device = self.classes.device
        scan = torch.tensor([i for i, _ in self.rows], dtype=torch.long, device=device)
        slices = torch.tensor([s for _, s in self.rows], dtype=torch.long, device=device)
        generators = [torch.Generator(self.draws_on).manual_seed(slice_seed(self.post.seed, s)) for _, s in self.rows]
        z0 = torch.cat([initial_latents(model, 1, self.post, g).to(device) for g in generators]).float()
        draws = SliceDraws(self.classes[scan, :, :, slices], self.brain[scan, :, :, slices], slices,
                           self.post.brain_fraction, generators, device)
        return z0, draws

    def score(self, backend, z: torch.Tensor, i: int, progress: bool = False):
        """Scan i: each restored slice scored with its latent where its block column meets the region,
        the score (float32) and classes (uint8) replicated over the block; (score, classes, evaluations)."""
        shape, device = tuple(int(s) for s in self.classes.shape[1:]), self.classes.device
        keep = dilate(self.brain[i], pool_reach(self.post)) if self.region == "brain" else None
        score = torch.zeros(shape, dtype=torch.float32, device=device)
        cls = torch.zeros(shape, dtype=torch.uint8, device=device)
        count = 0
        for r, (s, a, b) in enumerate(self.where[i], start=self.first[i]):
            # the restored slice's voxels whose block column meets the scored region
            column = torch.ones(shape[:2], dtype=torch.bool, device=device) if keep is None else keep[:, :, a:b].any(2)
            xy = column.reshape(-1).nonzero().squeeze(1)
            ce, best = score_points(backend, z[r], self.classes[i], xy * shape[2] + s, self.post.chunk, progress)
            score[:, :, a:b] = _plane(xy, ce, shape)[:, :, None]
            cls[:, :, a:b] = _plane(xy, best, shape)[:, :, None]
            count += xy.numel()
        return score, cls, count

    def losses(self, trace: torch.Tensor) -> torch.Tensor:
        """(steps, N) float32: each scan's per-step data loss, the mean over its slices' rows."""
        return torch.stack([trace[:, self.first[i]:self.first[i + 1]].mean(1) for i in range(self.n_scans)], 1)


def search_slices(model: Model, engine, classes: torch.Tensor, brain: torch.Tensor, rows, rc: cfg.RestoreConfig,
                  progress: bool = False, *, draws_on=None, adam: str = "default", graphs: bool = False):
    """The latent search of restored slices, one latent each, as one batch (`SliceRows` with these rows).

    classes: (N, X, Y, Z) uint8 on the backend's device; brain: bool (N, X, Y, Z) (tensor or
    array); rows: (scan, axial slice) pairs. rc.phases' K are points per scan (see the module
    docstring). draws_on: the device of the per-row generators (default the CPU, as the host
    pipeline); adam, graphs: as for optimise_latents. Returns z (B, D) float32 and the per-step
    mean data loss (steps, B) float32 on the classes' device, as optimise_latents.
    """
    plan = SliceRows(classes, brain, rc, rows=rows, draws_on=draws_on)
    return search_rows(engine, model, classes, plan, progress, adam=adam, graphs=graphs, checked=False)


def _plane(xy: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """(X, Y) of values' dtype: `values` (P,) at the in-slice linear indices xy (P,), 0 elsewhere."""
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    out[xy] = values
    return out.reshape(shape[0], shape[1])


def restore_slices(backend, model: Model, classes: torch.Tensor, rc: cfg.RestoreConfig, generator: torch.Generator,
                   *, brain: torch.Tensor | None = None, region: str = "brain", progress: bool = False,
                   adam: str = "default", graphs: bool = False, stages=None) -> DeviceMaps:
    """IF 2D restoration of a batch of scans on the classes' device (see the module docstring); the
    2D branch of restore.restore_batch, with its arguments: `SliceRows` through core.restore_rows.

    classes: (N, X, Y, Z) uint8 on the backend's device, the axial axis last; brain: bool like it
    (default classes != 0). generator: only its device is used (each restored slice draws from its
    own generator, seeded from rc.seed and the slice). Returns restore.DeviceMaps: the anomaly
    map and the raw score (replicated from the restored slices), the classes, the per-step data
    loss averaged over each scan's slices, z (sum S_i, D) and per scan `slices` (S_i,): the
    restored slices holding brain, whose latents z holds scan after scan.
    """
    check_classes(classes, backend.config.n_classes)
    brain = classes != 0 if brain is None else brain.to(torch.bool)
    plan = SliceRows(classes, brain, rc, region=region, draws_on=generator.device)
    return restore_rows(backend, model, classes, plan, progress=progress, adam=adam, graphs=graphs, stages=stages)
