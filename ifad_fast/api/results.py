"""What a restoration returns: the maps on the scan's own grid (`NativeResult`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..preprocess import Placement
from ..restore.scoring import Restoration


@dataclass
class NativeResult:
    """Outputs in the scan's own grid (X, Y, Z)."""

    anomaly: np.ndarray          # float32
    restoration: np.ndarray      # float32 intensities (normalised units) of the restored classes
    classes: np.ndarray          # uint8 restored classes
    model_grid: Restoration      # everything on the score grid (the model grid, or N³ with resolution=N)
    seconds: float
    placement: Placement | None = None   # how the scan sits in the score grid (model_affine, brain, to_native)
    stages: dict | None = None           # seconds per stage for the batch (Restorer(time_stages=True))
