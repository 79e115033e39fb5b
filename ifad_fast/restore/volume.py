"""IF 3D: search the latent that best explains a scan, score every voxel, post-process.

restore_classes(model, classes) -> Restoration; the anomaly score of a voxel is
-log P(t = t_scan | z, p), min-pooled (3) then average-pooled (15). IF 3D is a row plan of the
one restoration core (core.py): `ScanRows`, one row (latent) per scan, its points drawn over the
scan (`ScanDraws`), its grid the scan's region; `restore_batch` builds it and runs
`core.restore_rows` (a 2D model's batch goes to slices.restore_slices, the other row plan).

Scoring at another resolution (the paper's IF 3D*): the latent is searched on the model grid
(R³) and the field is then evaluated on an N³ grid of the same frame (`score_classes`): the
decoder is continuous, and voxel i of an S-grid is at -1 + 2i/(S - 1) for any S. The pooling
windows are in voxels of the grid they run on; at N the min-pool stays 3 (it removes single-voxel
speckle, which lives at the score grid's own voxel scale) and the average pool keeps its physical
size: avg_pool · (N - 1)/(R - 1), rounded to the nearest odd size (`pools_at`).

Where it runs: `restore_batch` keeps everything on the class volumes' device -- the latent
search (points drawn where the generator lives), the score grid, the brain region (`dilate`)
and the pooling (`postprocess`) -- and copies nothing to the host until the caller asks
(`DeviceMaps.to_host`). The class volumes are validated once (`backends.check_classes`), so
every backend call passes checked=True and a step never waits for the host; the loss trace is
kept on the device. On CUDA, `optimise_latents(graphs=True)` replays each phase's step from a
CUDA graph. `restore_classes` is the NumPy-in, NumPy-out entry on top of it.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import config as cfg
from ..backends.base import check_classes
from ..backends.factory import resolve_backend
from ..errors import IfadError
from ..model import Model
from .core import RowPlan, restore_rows
from .local import fit_local_latents, fit_region, score_grid_local
# the search and the scoring live in their own modules (core.py and slices.py use them too); their
# names stay importable from here
from .scoring import (DeviceMaps, Restoration, StageTimes, anomaly_map, dilate, interpolated_log_probs,  # noqa: F401
                      lattice_axis, pool_reach, pools_at, postprocess, refine_near, score_grid, score_grid_adaptive,
                      score_points)
from .search import (ADAM, GraphedStep, LatentAdam, ScanDraws, _adam, converged, initial_latents,  # noqa: F401
                     optimise_latents, prior_weight)

__all__ = ["restore_batch", "restore_classes", "DeviceMaps", "Restoration", "StageTimes", "anomaly_map", "dilate",
           "interpolated_log_probs", "lattice_axis", "pool_reach", "pools_at", "postprocess", "refine_near",
           "score_grid", "score_grid_adaptive", "score_points", "ADAM", "GraphedStep", "LatentAdam", "_adam",
           "converged", "initial_latents", "optimise_latents", "prior_weight"]


class ScanRows(RowPlan):
    """IF 3D's row plan: a scan is one row, searched over the model grid and scored over its region.

    classes: (N, R, R, R) uint8 on the model grid (range-checked here); brain: bool like it
    (default classes != 0), where rc.brain_fraction of the points are drawn; score_classes /
    score_brain: the same scans on the score grid (default the model grid; pools scaled by
    `pools_at`). The rows draw from `generator` (`ScanDraws`): z0 first, then the points.
    threshold: with rc.grid 'adaptive', on a backend with `log_probs`, the grid is scored by
    `score_grid_adaptive`; otherwise every voxel of the region (`dilate`d brain, or 'full').
    fit_threshold: with rc.local_grid, the threshold of the one-latent map that decides the local
    fit region (default `threshold`).
    """

    def __init__(self, backend, classes: torch.Tensor, rc: cfg.RestoreConfig, generator: torch.Generator, *,
                 brain: torch.Tensor | None = None, region: str = "brain", score_classes: torch.Tensor | None = None,
                 score_brain: torch.Tensor | None = None, threshold: float | None = None,
                 fit_threshold: float | None = None):
        n_classes = backend.config.n_classes
        check_classes(classes, n_classes)
        self.classes, self.rc, self.generator, self.region = classes, rc, generator, region
        self.search_brain = classes != 0 if brain is None else brain.to(torch.bool)
        if score_classes is None:
            self.score_classes, self.brain, self.post = classes, self.search_brain, rc
        else:
            check_classes(score_classes, n_classes, "score classes")
            self.score_classes = score_classes
            self.brain = score_classes != 0 if score_brain is None else score_brain.to(torch.bool)
            self.post = pools_at(rc, classes.shape[1], score_classes.shape[1])
        self.n_scans, self.threshold = classes.shape[0], threshold
        self.fit_threshold = threshold if fit_threshold is None else fit_threshold
        self.adaptive = rc.grid == "adaptive" and threshold is not None and backend.has_log_probs
        if rc.local_grid and self.fit_threshold is None:
            raise IfadError("local latents leave out of their fit what the global restoration finds anomalous, "
                            "judged by the decision threshold; this model stores none: pass --threshold T "
                            "(API: restore_files(threshold=T), or set model.info['threshold']) or use another schedule")
        self.field = None           # the plain decoder of the local stage, set by start()

    def start(self, model: Model):
        """z0 (N, D) float32 from the generator, then the draws (`ScanDraws`)."""
        z0 = initial_latents(model, self.n_scans, self.rc, self.generator)
        if self.rc.local_grid:
            self.field = model.decoder.folded().to(self.classes.device)
        return z0, ScanDraws(self.classes, self.search_brain, self.rc.brain_fraction, self.generator)

    def score(self, backend, z: torch.Tensor, i: int, progress: bool = False):
        """Scan i's region scored with z[i]: (score float32, classes uint8 on the score grid, evaluations)."""
        brain, cls = self.brain[i], self.score_classes[i]
        keep = dilate(brain, pool_reach(self.post)) if self.region == "brain" else None
        if self.rc.local_grid:
            return self._score_local(backend, z[i], i, keep, progress)
        return self._score_global(backend, z[i], cls, brain, keep, self.post, self.threshold, progress)

    def _score_global(self, backend, z: torch.Tensor, cls: torch.Tensor, brain: torch.Tensor, keep, post,
                      threshold: float | None, progress: bool = False):
        """One latent z (D,) over a grid's region `keep` (None: all), adaptive where the plan allows
        (exact wherever the map can reach `threshold`); post: that grid's pools."""
        if self.adaptive:
            within = keep if keep is not None else torch.ones_like(brain)
            return score_grid_adaptive(backend, z, cls, within, refine_near(brain, post, threshold, self.region),
                                       self.rc.chunk, progress)
        score, restored = score_grid(backend, z, cls, keep, self.rc.chunk, progress, checked=True)
        return score, restored, keep.sum() if keep is not None else score.numel()

    def _score_local(self, backend, z: torch.Tensor, i: int, keep, progress: bool = False):
        """Scan i scored with local latents (restore/local.py): the one-latent map on the model grid
        gives the fit region, the latents are fitted there, then the score grid's region is scored."""
        brain = self.search_brain[i]
        region = dilate(brain, pool_reach(self.rc)) if self.region == "brain" else None
        score, _, n = self._score_global(backend, z, self.classes[i], brain, region, self.rc, self.fit_threshold,
                                         progress)
        fit = fit_region(score, brain, self.rc, self.fit_threshold, self.region)
        grid = fit_local_latents(self.field, z, self.classes[i], fit, self.rc, self.generator)
        score, restored, m = score_grid_local(self.field, grid, self.score_classes[i], keep, self.rc.chunk)
        return score, restored, n + m


def restore_batch(backend, model: Model, classes: torch.Tensor, rc: cfg.RestoreConfig, generator: torch.Generator,
                  *, brain: torch.Tensor | None = None, region: str = "brain", progress: bool = False,
                  score_classes: torch.Tensor | None = None, score_brain: torch.Tensor | None = None,
                  adam: str = "default", graphs: bool = False, stages=None,
                  threshold: float | None = None, fit_threshold: float | None = None) -> DeviceMaps:
    """Restore a batch of encoded scans on the classes' device (the backend's): search, score, pool.

    classes: (B, R, R, R) uint8 on the model grid; brain: bool like it (default classes != 0);
    score_classes / score_brain: the same scans on another grid of the same frame, where the
    scores are computed (see `restore_classes`). generator: draws z0 and the points (on its own
    device, see `optimise_latents`, with `adam` and `graphs`). stages: a `StageTimes` to record
    search / grid / post, or None. threshold: the decision threshold of the maps; with
    rc.grid 'adaptive' the grid is then scored by `score_grid_adaptive` (exact wherever the map can
    reach (1 - rc.refine_margin) * threshold), on backends that have `log_probs`; otherwise, and
    without a threshold, every voxel of the region is scored. fit_threshold: the one-latent map's
    threshold that bounds rc.local_grid's fit region (default `threshold`). Returns DeviceMaps (nothing copied
    to the host); its `scored` counts the decoder evaluations of the grid. A 2D model's scans are
    rows of slices (`slices.restore_slices`), a 3D model's one row each (`ScanRows`), through
    the same core (`core.restore_rows`).
    """
    if model.config.variant == "2d":            # IF 2D: one latent per restored axial slice
        from .slices import restore_slices
        if score_classes is not None:
            raise IfadError("a 2D model scores the slices it restores, on its own grid: drop --resolution")
        if rc.local_grid:
            raise IfadError("local latents are an IF 3D stage; a 2D model restores with one latent per slice: "
                            "use the fast or paper schedule")
        return restore_slices(backend, model, classes, rc, generator, brain=brain, region=region, progress=progress,
                              adam=adam, graphs=graphs, stages=stages)
    plan = ScanRows(backend, classes, rc, generator, brain=brain, region=region, score_classes=score_classes,
                    score_brain=score_brain, threshold=threshold, fit_threshold=fit_threshold)
    return restore_rows(backend, model, classes, plan, progress=progress, adam=adam, graphs=graphs, stages=stages)


def restore_classes(model: Model, classes: np.ndarray, rc: cfg.RestoreConfig = cfg.RestoreConfig(),
                    backend="auto", device="auto", precision="float32", brain: np.ndarray | None = None,
                    region: cfg.Region = "brain", progress: bool = False, score_classes: np.ndarray | None = None,
                    score_brain: np.ndarray | None = None, threshold: float | None = None) -> list[Restoration]:
    """Restore one or several encoded scans at once.

    classes: (X, Y, Z) or (B, X, Y, Z) uint8 on the model grid, where the latent is searched.
    brain: bool mask of the same shape (default: classes != 0; pass the scan's own support when
    class 0 can hold brain voxels, as after min-max normalisation). region 'brain' scores only
    voxels within the pooling reach of the brain and zeroes the map outside the brain; 'full'
    scores and keeps every voxel. score_classes / score_brain: the same scans encoded on another
    grid of the same frame (e.g. N³), where the scores, the restoration and the pooling are then
    computed (pools scaled by `pools_at`); default: the search grid. backend, device, precision and
    region are resolved as the `api.Restorer` resolves them (`engines.resolve_backend`: a Backend
    object, or names, 'auto' by default; `config.check_region`): the same numbers as its host pipeline.
    The points are drawn from a CPU generator seeded with rc.seed (the same draws on any device);
    the work runs on the backend's device (`restore_batch`) and the results come back as NumPy.
    threshold: the maps' decision threshold, for rc.grid 'adaptive' (see `restore_batch`).
    """
    cfg.check_region(region)
    engine = resolve_backend(backend, model.decoder, device, precision)
    device = engine.device

    def batch(a, dtype):
        if a is None:
            return None
        a = np.asarray(a, dtype=dtype)
        return torch.from_numpy(a[None] if a.ndim == 3 else a).to(device)

    maps = restore_batch(engine, model, batch(classes, np.uint8), rc, torch.Generator().manual_seed(rc.seed),
                         brain=batch(brain, bool), region=region, progress=progress,
                         score_classes=batch(score_classes, np.uint8), score_brain=batch(score_brain, bool),
                         threshold=threshold)
    return maps.to_host()
