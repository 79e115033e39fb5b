"""Restoration, the engine of IF 3D and IF 2D: search the latent that best explains a scan, score
every voxel, post-process.

- `volume`: IF 3D, a batch of scans (`restore_batch` on the device, `restore_classes` NumPy in and
  out): the row plan `ScanRows`, one row per scan; hands 2D models to `slices`;
- `slices`: IF 2D, a latent per axial slice (training samples; `restore_slices`: the row plan
  `SliceRows`, one row per restored slice);
- `core`: the one restoration core of both (`restore_rows`: a plan's initial latents, the search
  over its rows, each scan's score grid as the plan scores it, the anomaly map, `DeviceMaps`);
- `search`: the latent search (`optimise_latents`, `ScanDraws`, `LatentAdam`, CUDA graphs, stopping);
- `scoring`: score grids (full, adaptive), the brain region, post-processing, `DeviceMaps`.

`volume ─▶ slices ─▶ core ─▶ search, scoring`, one way. The names below are those `ifad_fast.restore`
offered when it was one module (restore.py); inside the package, modules import from the
defining module.
"""
from .scoring import (DeviceMaps, Restoration, StageTimes, anomaly_map, dilate, interpolated_log_probs, lattice_axis,
                      pool_reach, pools_at, postprocess, refine_near, score_grid, score_grid_adaptive, score_points)
from .search import ADAM, GraphedStep, LatentAdam, _adam, converged, initial_latents, optimise_latents, prior_weight
from .volume import restore_batch, restore_classes

__all__ = ["restore_batch", "restore_classes", "DeviceMaps", "Restoration", "StageTimes", "anomaly_map", "dilate",
           "interpolated_log_probs", "lattice_axis", "pool_reach", "pools_at", "postprocess", "refine_near",
           "score_grid", "score_grid_adaptive", "score_points", "ADAM", "GraphedStep", "LatentAdam", "_adam",
           "converged", "initial_latents", "optimise_latents", "prior_weight"]
