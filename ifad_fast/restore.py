"""Restoration: search the latent that best explains a scan, score every voxel, post-process.

restore_classes(model, classes) -> Restoration; the anomaly score of a voxel is
-log P(t = t_scan | z, p), min-pooled (3) then average-pooled (15).

Scoring at another resolution (the paper's IF 3D*): the latent is searched on the model grid
(R³) and the field is then evaluated on an N³ grid of the same frame (`score_classes`): the
decoder is continuous, and voxel i of an S-grid is at -1 + 2i/(S - 1) for any S. The pooling
windows are in voxels of the grid they run on; at N the min-pool stays 3 (it removes single-voxel
speckle, which lives at the score grid's own voxel scale) and the average pool keeps its physical
size: avg_pool · (N - 1)/(R - 1), rounded to the nearest odd size (`pools_at`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import config as cfg
from .backends import resolve_backend
from .model import Model
from .sampling import PointSampler


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


def pool_reach(rc: cfg.RestoreConfig) -> int:
    """How far (in voxels, Chebyshev) a raw score can move the post-processed map."""
    return (rc.min_pool - 1) // 2 + (rc.avg_pool - 1) // 2


def pools_at(rc: cfg.RestoreConfig, model_resolution: int, score_resolution: int) -> cfg.RestoreConfig:
    """rc with the average-pool window scaled from the model grid to a score grid of another
    resolution (same physical size, nearest odd window, at least 1); the min-pool is kept."""
    if score_resolution == model_resolution:
        return rc
    scaled = rc.avg_pool * (score_resolution - 1) / max(model_resolution - 1, 1)
    odd = max(1, 2 * int(math.floor((scaled - 1) / 2 + 0.5)) + 1)
    return dataclasses.replace(rc, avg_pool=odd)


def postprocess(score: torch.Tensor | np.ndarray, min_pool: int = 3, avg_pool: int = 15) -> np.ndarray:
    """3D min-pool then average-pool, stride 1, same size; zero padding counts in the average.

    The average pool is three 1-D box sums from float64 prefix sums: the numbers of
    avg_pool3d(k, padding=k//2, count_include_pad=True) at O(1) work per voxel, any volume size.
    """
    x = torch.as_tensor(np.asarray(score, dtype=np.float32))[None, None]
    if min_pool > 1:
        x = -F.max_pool3d(-x, min_pool, stride=1, padding=min_pool // 2)
    x = x[0, 0].double()
    if avg_pool > 1:
        for axis in range(3):
            x = _box_mean(x, avg_pool, axis)
    return x.float().numpy()


def _box_mean(x: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """Mean over a centred window of k along `axis`, zeros beyond the edges, divisor k."""
    n = x.shape[axis]
    pad = [0, 0] * 3
    pad[2 * (2 - axis)] = k // 2 + 1           # F.pad counts axes from the last
    pad[2 * (2 - axis) + 1] = k // 2
    c = F.pad(x, pad).cumsum(axis)
    return (c.narrow(axis, k, n) - c.narrow(axis, 0, n)) / k


def initial_latents(model: Model, n: int, rc: cfg.RestoreConfig, generator: torch.Generator) -> torch.Tensor:
    d = model.config.latent_dim
    if rc.init == "mean" and model.latents.numel():
        return model.latents.mean(0, keepdim=True).repeat(n, 1).float()
    return torch.randn(n, d, generator=generator) / math.sqrt(d)


def prior_weight(rc: cfg.RestoreConfig, k: int) -> float:
    """Weight of ‖z‖² next to the mean data loss: eq. (4) of the paper divided by K."""
    return 1.0 / (rc.sigma ** 2 * k) if rc.prior == "paper" else 0.0


def optimise_latents(backend, classes: torch.Tensor, z0: torch.Tensor, rc: cfg.RestoreConfig,
                     generator: torch.Generator, progress: bool = False, brain: torch.Tensor | None = None):
    """Adam on z over rc.phases of (steps, K). classes: (B, X, Y, Z) uint8 on the backend's device;
    brain: bool (B, X, Y, Z), where rc.brain_fraction of the points are drawn (default classes != 0).
    rc.restart_per_phase: a new Adam (fresh moment estimates) at each phase, as the reference notebook;
    otherwise one Adam throughout, its learning rate multiplied by rc.lr_decay at each new phase.

    Returns z (B, D) float32 and the per-step mean data loss (steps, B).
    """
    device = classes.device
    b, shape = classes.shape[0], tuple(classes.shape[1:])
    flat = classes.reshape(b, -1).long()
    z = z0.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=rc.lr)
    sampler = PointSampler(shape, brain if brain is not None else classes != 0, rc.brain_fraction)
    rows = torch.arange(b)
    trace = []
    total = sum(steps for steps, _ in rc.phases)
    bar = tqdm(total=total, desc="restore", unit="step", disable=None if progress else True, leave=False)
    for phase, (steps, k) in enumerate(rc.phases):
        if phase and rc.restart_per_phase:
            opt = torch.optim.Adam([z], lr=rc.lr * rc.lr_decay ** phase)
        elif phase and rc.lr_decay != 1.0:
            for group in opt.param_groups:
                group["lr"] *= rc.lr_decay
        reg = prior_weight(rc, k)
        for _ in range(steps):
            idx, lin = sampler.draw(rows, k, generator)
            idx, lin = idx.to(device), lin.to(device)
            targets = flat.gather(1, lin)
            data_loss = backend.mean_loss(z, idx, targets, shape)
            loss = data_loss.sum() + reg * (z * z).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trace.append(data_loss.detach().cpu())
            bar.update(1)
    bar.close()
    return z.detach(), torch.stack(trace) if trace else torch.zeros(0, b)


@torch.no_grad()
def score_grid(backend, z: torch.Tensor, classes: torch.Tensor, region: torch.Tensor | None,
               chunk: int = 65536, progress: bool = False):
    """Per-voxel cross-entropy of one scan. classes: (X, Y, Z) uint8; region: bool (X, Y, Z) or None.

    Returns (scores float32 (X, Y, Z), 0 outside the region; most likely classes uint8 (X, Y, Z)).
    """
    shape = tuple(classes.shape)
    device = classes.device
    flat_cls = classes.reshape(-1).long()
    lin = region.reshape(-1).nonzero().squeeze(1) if region is not None else torch.arange(flat_cls.numel(), device=device)
    scores = torch.zeros(flat_cls.numel(), dtype=torch.float32, device=device)
    predicted = torch.zeros(flat_cls.numel(), dtype=torch.uint8, device=device)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    for start in tqdm(range(0, lin.numel(), chunk), desc="score", unit="chunk", disable=None if progress else True, leave=False):
        part = lin[start:start + chunk]
        idx = (part[:, None] // strides) % torch.tensor(shape, device=device)
        ce, cls = backend.score_and_classes(z, idx, flat_cls[part], shape)
        scores[part] = ce.float()
        predicted[part] = cls.to(torch.uint8)
    return scores.reshape(shape), predicted.reshape(shape)


def restore_classes(model: Model, classes: np.ndarray, rc: cfg.RestoreConfig = cfg.RestoreConfig(),
                    backend="auto", device="auto", precision="float32", brain: np.ndarray | None = None,
                    region: str = "brain", progress: bool = False, score_classes: np.ndarray | None = None,
                    score_brain: np.ndarray | None = None) -> list[Restoration]:
    """Restore one or several encoded scans at once.

    classes: (X, Y, Z) or (B, X, Y, Z) uint8 on the model grid, where the latent is searched.
    brain: bool mask of the same shape (default: classes != 0; pass the scan's own support when
    class 0 can hold brain voxels, as after min-max normalisation). region 'brain' scores only
    voxels within the pooling reach of the brain and zeroes the map outside the brain; 'full'
    scores and keeps every voxel. score_classes / score_brain: the same scans encoded on another
    grid of the same frame (e.g. N³), where the scores, the restoration and the pooling are then
    computed (pools scaled by `pools_at`); default: the search grid. backend, device and precision
    are resolved by `backends.resolve_backend` (a Backend object, or names; 'auto' by default).
    """
    classes = np.asarray(classes, dtype=np.uint8)
    single = classes.ndim == 3
    if single:
        classes = classes[None]
        brain = None if brain is None else np.asarray(brain)[None]
        score_classes = None if score_classes is None else np.asarray(score_classes)[None]
        score_brain = None if score_brain is None else np.asarray(score_brain)[None]
    if brain is None:
        brain = classes != 0
    brain = np.asarray(brain, dtype=bool)
    engine = resolve_backend(backend, model.decoder, device, precision)
    device = engine.device
    gen = torch.Generator().manual_seed(rc.seed)
    z0 = initial_latents(model, classes.shape[0], rc, gen)
    cls_t = torch.from_numpy(classes).to(device)
    z, trace = optimise_latents(engine, cls_t, z0, rc, gen, progress, torch.from_numpy(brain))
    if score_classes is None:
        score_cls, score_brain, src = cls_t, brain, rc
    else:
        score_cls = torch.from_numpy(np.asarray(score_classes, dtype=np.uint8)).to(device)
        score_brain = score_cls.cpu().numpy() != 0 if score_brain is None else np.asarray(score_brain, dtype=bool)
        src = pools_at(rc, classes.shape[1], score_cls.shape[1])
    out = []
    for i in range(classes.shape[0]):
        keep = torch.from_numpy(_dilate(score_brain[i], pool_reach(src))).to(device) if region == "brain" else None
        score, predicted = score_grid(engine, z[i], score_cls[i], keep, rc.chunk, progress)
        anomaly = postprocess(score.cpu().numpy(), src.min_pool, src.avg_pool)
        if region == "brain":
            anomaly[~score_brain[i]] = 0.0
        out.append(Restoration(anomaly=anomaly, score=score.cpu().numpy(), classes=predicted.cpu().numpy(),
                               z=z[i].cpu().numpy(), losses=trace[:, i].tolist(),
                               scored_voxels=int(keep.sum()) if keep is not None else score.numel(),
                               region=region))
    return out


def _dilate(mask: np.ndarray, reach: int) -> np.ndarray:
    from .preprocess import brain_region
    return brain_region(mask, reach)
