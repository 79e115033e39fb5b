"""Scoring a restored latent: per-voxel cross-entropy on a grid (full or adaptive), the scored region,
the post-processing into an anomaly map, and the containers of the maps (`DeviceMaps`, `Restoration`).

score_grid / score_grid_adaptive(backend, z, classes, region) -> scores, classes; anomaly_map(score,
brain, rc, region) = postprocess (min-pool then average-pool, prefix sums) zeroed outside the brain.
Used by core.py (the restoration of IF 3D and IF 2D) and by the row plans, volume.py (IF 3D) and
slices.py (IF 2D).
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import config as cfg
from ..backends.base import check_classes
from ..progress import progress_bar


@dataclass
class Restoration:
    """Outputs on the model grid (R, R, R)."""

    anomaly: np.ndarray          # float32, post-processed anomaly score
    score: np.ndarray            # float32, raw per-voxel cross-entropy (0 where not scored)
    classes: np.ndarray          # uint8, the restoration: most likely class per voxel
    z: np.ndarray                # float32 (D,)
    losses: list = field(default_factory=list)   # mean data loss per step
    scored_voxels: int = 0
    region: str = "brain"
    slices: np.ndarray | None = None     # 2D models: the restored axial slices (S,) int; z is then (S, D)


def pool_reach(rc: cfg.RestoreConfig) -> int:
    """How far (in voxels, Chebyshev) a raw score can move the post-processed map."""
    return (rc.min_pool - 1) // 2 + (rc.avg_pool - 1) // 2


def pools_at(rc: cfg.RestoreConfig, model_resolution: int, score_resolution: int) -> cfg.RestoreConfig:
    """rc with the average-pool window scaled from the model grid to a score grid of another
    resolution (same physical size, nearest odd window, at least 1); the min-pool is kept."""
    if score_resolution == model_resolution:
        return rc
    scaled = rc.avg_pool * (score_resolution - 1) / max(model_resolution - 1, 1)
    return dataclasses.replace(rc, avg_pool=cfg.odd_window(scaled))


def postprocess(score, min_pool: int = 3, avg_pool: int = 15):
    """3D min-pool then average-pool, stride 1, same size; zero padding counts in the average.

    score: (X, Y, Z) float. A NumPy array (or array-like) gives a float32 array (computed with
    torch on the CPU); a tensor gives a float32 tensor on its own device. The average pool is
    three 1-D box sums from float64 prefix sums: the numbers of avg_pool3d(k, padding=k//2,
    count_include_pad=True) at O(1) work per voxel, any volume size.
    """
    on_device = isinstance(score, torch.Tensor)
    x = score.to(torch.float32) if on_device else torch.as_tensor(np.asarray(score, dtype=np.float32))
    x = x[None, None]
    if min_pool > 1:
        x = -F.max_pool3d(-x, min_pool, stride=1, padding=min_pool // 2)
    x = x[0, 0].double()
    if avg_pool > 1:
        for axis in range(3):
            x = _box_sum(x, avg_pool, axis) / avg_pool
    x = x.float()
    return x if on_device else x.numpy()


def _box_sum(x: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """Sum over a centred window of k along `axis`, zeros beyond the edges (prefix sums; integer
    inputs are summed in int64, exactly)."""
    n = x.shape[axis]
    pad = [0, 0] * 3
    pad[2 * (2 - axis)] = k // 2 + 1           # F.pad counts axes from the last
    pad[2 * (2 - axis) + 1] = k // 2
    c = F.pad(x, pad).cumsum(axis)
    return c.narrow(axis, k, n) - c.narrow(axis, 0, n)


def dilate(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """Voxels within Chebyshev distance `reach` of a bool (X, Y, Z) mask, on its device: bool
    (X, Y, Z), equal to SciPy's maximum filter of that size bit for bit (tests/test_device_pipeline.py)."""
    if reach <= 0:
        return mask.to(torch.bool)
    x = mask.to(torch.int32)
    for axis in range(3):
        x = _box_sum(x, 2 * reach + 1, axis)
    return x > 0


@torch.no_grad()
def score_points(backend, z: torch.Tensor, classes: torch.Tensor, lin: torch.Tensor, chunk: int = 65536,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and most likely class of the voxels `lin` of one scan, `chunk` voxels a call.

    classes: (X, Y, Z) uint8 (range-checked by the caller); lin: (P,) long linear indices into it.
    Returns (ce float32 (P,), classes uint8 (P,)) on the classes' device.
    """
    shape = tuple(int(s) for s in classes.shape)
    device = classes.device
    flat_cls = classes.reshape(-1)
    ce_out = torch.empty(lin.numel(), dtype=torch.float32, device=device)
    cls_out = torch.empty(lin.numel(), dtype=torch.uint8, device=device)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    sizes = torch.tensor(shape, device=device)
    for start in progress_bar(range(0, lin.numel(), chunk), desc="score", unit="chunk",
                              disable=None if progress else True, leave=False):
        part = lin[start:start + chunk]
        idx = (part[:, None] // strides) % sizes
        ce, cls = backend.score_and_classes(z, idx, flat_cls[part].long(), shape, checked=True)
        ce_out[start:start + part.numel()] = ce.float()
        cls_out[start:start + part.numel()] = cls.to(torch.uint8)
    return ce_out, cls_out


def score_grid(backend, z: torch.Tensor, classes: torch.Tensor, region: torch.Tensor | None,
               chunk: int = 65536, progress: bool = False, *, checked: bool = False):
    """Per-voxel cross-entropy of one scan. classes: (X, Y, Z) uint8; region: bool (X, Y, Z) or None.

    Returns (scores float32 (X, Y, Z), 0 outside the region; most likely classes uint8 (X, Y, Z)),
    on the classes' device. The classes are range-checked once (unless `checked`), the backend
    then runs with checked=True.
    """
    if not checked:
        check_classes(classes, backend.config.n_classes)
    n = classes.numel()
    lin = region.reshape(-1).nonzero().squeeze(1) if region is not None else torch.arange(n, device=classes.device)
    ce, cls = score_points(backend, z, classes, lin, chunk, progress)
    scores = torch.zeros(n, dtype=torch.float32, device=classes.device)
    predicted = torch.zeros(n, dtype=torch.uint8, device=classes.device)
    scores[lin] = ce
    predicted[lin] = cls
    return scores.reshape(classes.shape), predicted.reshape(classes.shape)


def lattice_axis(n: int, device=None) -> torch.Tensor:
    """(L,) int64 coarse-lattice positions along an axis of n voxels: every 2nd voxel and the last,
    so that every voxel lies on or between two lattice positions at most 2 apart."""
    ax = torch.arange(0, n, 2, device=device)
    return ax if (n - 1) % 2 == 0 else torch.cat((ax, torch.tensor([n - 1], device=device)))


def _cell(coord: torch.Tensor, n: int):
    """For voxel coordinates (P,) along an axis of n: the lower lattice index j (P,) int64 (into
    lattice_axis(n)) and the weight t (P,) float32 of the upper one (0 on the lower, 1 on the upper)."""
    top = (n - 1) // 2 + (0 if (n - 1) % 2 == 0 else 1)          # last lattice index
    j = (coord // 2).clamp(max=max(top - 1, 0))
    lo = 2 * j
    hi = torch.where(j + 1 == top, torch.full_like(j, n - 1), lo + 2) if top else lo
    t = ((coord - lo).float() / (hi - lo).clamp(min=1).float()) if top else torch.zeros_like(coord, dtype=torch.float32)
    return j, t


@torch.no_grad()
def interpolated_log_probs(lattice_lp: torch.Tensor, coords: torch.Tensor, shape) -> torch.Tensor:
    """Trilinear interpolation of per-class log-probabilities from the coarse lattice.

    lattice_lp: (Lx, Ly, Lz, C) float32 at the positions lattice_axis(X) x lattice_axis(Y) x
    lattice_axis(Z); coords: (P, 3) int64 voxel indices of a grid `shape`. Returns (P, C) float32.
    """
    lx, ly, lz, c = lattice_lp.shape
    flat = lattice_lp.reshape(-1, c)
    (jx, tx), (jy, ty), (jz, tz) = (_cell(coords[:, a], int(shape[a])) for a in range(3))
    out = torch.zeros(coords.shape[0], c, dtype=torch.float32, device=lattice_lp.device)
    for dx, wx in ((0, 1 - tx), (1, tx)):
        for dy, wy in ((0, 1 - ty), (1, ty)):
            for dz, wz in ((0, 1 - tz), (1, tz)):
                w = wx * wy * wz
                corner = ((jx + dx).clamp(max=lx - 1) * ly + (jy + dy).clamp(max=ly - 1)) * lz + \
                    (jz + dz).clamp(max=lz - 1)
                out.addcmul_(flat[corner], w[:, None])
    return out


@torch.no_grad()
def score_grid_adaptive(backend, z: torch.Tensor, classes: torch.Tensor, region: torch.Tensor,
                        refine: "callable", chunk: int = 65536, progress: bool = False):
    """score_grid at a fraction of the decoder evaluations, exact where the decision is made.

    1. The decoder gives every class's log-probability on the coarse lattice (every 2nd voxel per
       axis, `lattice_axis`) wherever a lattice point is a corner of a cell touching the region.
    2. Every region voxel gets its cross-entropy and restored class from the trilinear
       interpolation of those log-probabilities (the decoder is a continuous field; IF 3D*).
    3. refine(scores) -> bool (X, Y, Z): the voxels whose post-processed value must be exact; every
       region voxel within the pooling reach of them is scored exactly (`score_points`).

    classes: (X, Y, Z) uint8 (checked by the caller); region: bool (X, Y, Z). Returns (scores
    float32 (X, Y, Z), 0 outside the region; classes uint8 (X, Y, Z); decoder evaluations int).
    """
    shape = tuple(int(s) for s in classes.shape)
    device = classes.device
    axes = [lattice_axis(s, device) for s in shape]
    near = dilate(region, 1)[axes[0]][:, axes[1]][:, :, axes[2]]              # lattice points needed
    pick = near.nonzero()
    coords = torch.stack([axes[a][pick[:, a]] for a in range(3)], 1)
    lattice = torch.zeros(*near.shape, backend.config.n_classes, dtype=torch.float32, device=device)
    for start in range(0, coords.shape[0], chunk):
        part = pick[start:start + chunk]
        lattice[part[:, 0], part[:, 1], part[:, 2]] = backend.log_probs(z, coords[start:start + chunk], shape,
                                                                         checked=True)
    lin = region.reshape(-1).nonzero().squeeze(1)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    sizes = torch.tensor(shape, device=device)
    flat_cls = classes.reshape(-1)
    scores = torch.zeros(classes.numel(), dtype=torch.float32, device=device)
    predicted = torch.zeros(classes.numel(), dtype=torch.uint8, device=device)
    for start in range(0, lin.numel(), chunk):
        part = lin[start:start + chunk]
        lp = interpolated_log_probs(lattice, (part[:, None] // strides) % sizes, shape)
        scores[part] = -lp.gather(1, flat_cls[part].long()[:, None])[:, 0]
        predicted[part] = lp.argmax(1).to(torch.uint8)
    scores, predicted = scores.reshape(shape), predicted.reshape(shape)
    exact = refine(scores) & region
    on_lattice = torch.zeros(shape, dtype=torch.bool, device=device)
    on_lattice[axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]] = True
    redo = (exact & ~on_lattice).reshape(-1).nonzero().squeeze(1)
    if redo.numel():
        ce, cls = score_points(backend, z, classes, redo, chunk, progress)
        scores.view(-1)[redo] = ce
        predicted.view(-1)[redo] = cls
    return scores, predicted, int(coords.shape[0] + redo.numel())


def refine_near(brain: torch.Tensor, rc: cfg.RestoreConfig, threshold: float, region: str):
    """The refine rule of score_grid_adaptive: voxels within the pooling reach of those whose
    post-processed map (of the interpolated scores) reaches (1 - rc.refine_margin) * threshold."""
    def refine(scores: torch.Tensor) -> torch.Tensor:
        near = anomaly_map(scores, brain, rc, region) >= (1.0 - rc.refine_margin) * threshold
        return dilate(near, pool_reach(rc))
    return refine


def anomaly_map(score: torch.Tensor, brain: torch.Tensor, rc: cfg.RestoreConfig, region: str) -> torch.Tensor:
    """The anomaly map of one raw score (X, Y, Z) float32: min-pool then average-pool (rc's sizes),
    zeroed outside the bool `brain` when region is 'brain'."""
    anomaly = postprocess(score, rc.min_pool, rc.avg_pool)
    if region == "brain":
        anomaly.masked_fill_(~brain, 0.0)
    return anomaly


class StageTimes:
    """Wall seconds per named stage of a restoration: `with times("grid"): ...` adds the block's
    time, after waiting for `device` (so the GPU work queued in the block counts). `seconds` maps
    stage -> seconds in first-seen order. Disabled (enabled=False), it times and waits for nothing."""

    def __init__(self, device=None, enabled: bool = True):
        self.device = None if device is None else torch.device(device)
        self.enabled = bool(enabled)
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class DeviceMaps:
    """A batch restored on the device: anomaly, score float32 and classes uint8 (B, N, N, N) on the
    score grid, z (B, D) float32, losses (steps, B) float32, scored voxels (B,) int64; all on the
    device until `to_host`."""

    anomaly: torch.Tensor
    score: torch.Tensor
    classes: torch.Tensor
    z: torch.Tensor
    losses: torch.Tensor
    scored: torch.Tensor
    region: str = "brain"
    slices: list | None = None        # 2D models: per scan, its restored axial slices (S_i,) int64;
                                      # z then holds their latents, scan after scan (sum S_i, D)

    def to_host(self) -> list[Restoration]:
        """One Restoration (NumPy) per scan; each array crosses to the host once, for the batch."""
        anomaly, score, classes = self.anomaly.cpu().numpy(), self.score.cpu().numpy(), self.classes.cpu().numpy()
        z, losses, scored = self.z.cpu().numpy(), self.losses.cpu(), self.scored.tolist()
        if self.slices is None:
            zs, slices = z, [None] * len(anomaly)
        else:
            zs, slices = np.split(z, np.cumsum([len(s) for s in self.slices])[:-1]), self.slices
        return [Restoration(anomaly=anomaly[i], score=score[i], classes=classes[i], z=zs[i],
                            losses=losses[:, i].tolist(), scored_voxels=int(scored[i]), region=self.region,
                            slices=slices[i])
                for i in range(anomaly.shape[0])]
