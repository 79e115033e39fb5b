"""The one restoration core of IF 3D and IF 2D: a batch of scans as rows of latents (a row plan).

restore_rows(backend, model, classes, plan) -> DeviceMaps: the plan's initial latents for its B
rows -> optimise_latents over the rows with the plan's draws -> each scan's score grid, as the
plan scores it -> anomaly_map -> DeviceMaps. A row plan says what a row is:

- IF 3D (`volume.ScanRows`): a scan is one row; its points are PointSampler draws over the scan
  (`search.ScanDraws`, one generator for the batch); its grid is the brain region of the scan
  (full or adaptive, on the model grid or another score grid);
- IF 2D (`slices.SliceRows`): a scan is one row per restored axial slice; each row draws inside
  its slice from its own generator (`slices.SliceDraws`); the scores of a scan's slices fill
  their blocks of the volume, and its loss is the mean over its rows.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .. import config as cfg
from ..model import Model
from .scoring import DeviceMaps, StageTimes, anomaly_map
from .search import optimise_latents


class RowPlan(ABC):
    """What restore_rows asks of a row plan (IF 3D: volume.ScanRows; IF 2D: slices.SliceRows).

    Attributes: `rc` the search's RestoreConfig (its phases' K are points per row); `post` the
    RestoreConfig of the pooling (its min_pool / avg_pool on the score grid); `brain` bool
    (N, X, Y, Z) on the score grid, where the map is kept with region 'brain'; `region`;
    `n_scans` N; `slices` DeviceMaps.slices (None: one row per scan).
    """

    rc: cfg.RestoreConfig
    post: cfg.RestoreConfig
    brain: torch.Tensor
    region: str = "brain"
    n_scans: int = 0
    slices: list | None = None

    @abstractmethod
    def start(self, model: Model):
        """The search's start: (z0 (B, D) float32 on any device, points: K -> (idx (B, K, 3) long,
        targets (B, K) long) on the classes' device), in the order the random numbers are drawn."""

    @abstractmethod
    def score(self, backend, z: torch.Tensor, i: int, progress: bool = False):
        """Scan i's grid from the searched z (B, D) float32: (score float32 (X, Y, Z), restored
        classes uint8 (X, Y, Z), decoder evaluations: int or int64 tensor)."""

    def losses(self, trace: torch.Tensor) -> torch.Tensor:
        """The per-step data loss per scan (steps, N) float32 from the rows' trace (steps, B)."""
        return trace


def search_rows(backend, model: Model, classes: torch.Tensor, plan: RowPlan, progress: bool = False, *,
                adam: str = "default", graphs: bool = False, checked: bool = True):
    """The latent search of a plan's rows, as one batch: z (B, D) float32 and the per-step mean
    data loss (steps, B) float32, on the classes' device (`optimise_latents`; classes (N, X, Y, Z)
    uint8 give the grid and the device, range-checked unless `checked`)."""
    z0, points = plan.start(model)
    return optimise_latents(backend, classes, z0, plan.rc, None, progress, adam=adam, graphs=graphs,
                            checked=checked, points=points)


def restore_rows(backend, model: Model, classes: torch.Tensor, plan: RowPlan, *, progress: bool = False,
                 adam: str = "default", graphs: bool = False, stages=None) -> DeviceMaps:
    """Restore a batch as the plan's rows: search, score each scan, pool; all on the device.

    classes: (N, X, Y, Z) uint8 on the model grid, range-checked by the caller. stages: a
    `StageTimes` to record search / grid / post, or None. Returns DeviceMaps (anomaly, score
    float32 and classes uint8 (N, ...) on the score grid, z (B, D), losses (steps, N), scored (N,)
    int64, the plan's region and slices); nothing is copied to the host.
    """
    stage = stages or StageTimes(enabled=False)
    with stage("search"):
        z, trace = search_rows(backend, model, classes, plan, progress, adam=adam, graphs=graphs)
    scores, anomalies, predicted, scored = [], [], [], []
    for i in range(plan.n_scans):
        with stage("grid"):
            score, cls, n = plan.score(backend, z, i, progress)
        with stage("post"):
            anomaly = anomaly_map(score, plan.brain[i], plan.post, plan.region)
        scores.append(score)
        anomalies.append(anomaly)
        predicted.append(cls)
        scored.append(torch.as_tensor(n, device=score.device))
    return DeviceMaps(anomaly=torch.stack(anomalies), score=torch.stack(scores), classes=torch.stack(predicted),
                      z=z, losses=plan.losses(trace), scored=torch.stack(scored), region=plan.region,
                      slices=plan.slices)
