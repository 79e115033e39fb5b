"""Scan -> model input: clip, normalise, pad to a cube, resample, encode as intensity classes.

And back: `GridMap.to_native` maps a model-grid volume onto the scan's own voxel grid.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config as cfg
from .errors import IfadError
from .kernels.numba_ops import assign_nearest, mode_pool3d


def normalise(data: np.ndarray, percentiles=(2.0, 98.0)) -> tuple[np.ndarray, tuple[float, float]]:
    """Clip non-zero voxels to their percentiles and scale them into (0, 1]; zero stays zero.

    Positive scans are divided by the upper percentile, so the darkest tissue stays well
    above the background (0) and never shares its intensity class. Scans with negative
    values are min-max scaled into [0.05, 1]. Returns float32 (X, Y, Z) and (lo, hi).
    """
    brain = data != 0
    values = data[brain].astype(np.float64)
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        raise IfadError(f"the scan's brain intensities are constant ({hi:g}); pass a real MR scan")
    clipped = np.clip(values, lo, hi)
    out = np.zeros(data.shape, np.float32)
    out[brain] = clipped / hi if lo > 0 else 0.05 + 0.95 * (clipped - lo) / (hi - lo)
    return out, (float(lo), float(hi))


@dataclass(frozen=True)
class GridMap:
    """How a native (X, Y, Z) grid sits in the model's resolution³ cube.

    The native volume is zero-padded (centred) to a cube of side `cube`, which is resampled
    linearly (corners aligned) to resolution³.
    """

    native_shape: tuple
    cube: int
    offset: tuple
    resolution: int

    @classmethod
    def for_shape(cls, shape, resolution: int) -> "GridMap":
        cube = max(shape)
        offset = tuple((cube - s) // 2 for s in shape)
        return cls(tuple(int(s) for s in shape), int(cube), offset, int(resolution))

    def to_model(self, volume: np.ndarray) -> np.ndarray:
        """Native (X, Y, Z) float -> model grid (R, R, R) float32 (linear)."""
        cube = np.zeros((self.cube,) * 3, np.float32)
        cube[self._native_slices()] = volume
        return _resample(cube, self.resolution, "trilinear")

    def to_native(self, volume: np.ndarray, mode: str = "linear") -> np.ndarray:
        """Model grid (R, R, R) -> native (X, Y, Z); mode 'linear' (scores) or 'nearest' (classes)."""
        dtype = volume.dtype
        out = _resample(volume.astype(np.float32), self.cube, "trilinear" if mode == "linear" else "nearest")
        return out[self._native_slices()].astype(dtype, copy=False)

    def _native_slices(self):
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.native_shape))


def _resample(volume: np.ndarray, size: int, mode: str) -> np.ndarray:
    if volume.shape == (size,) * 3:
        return volume.astype(np.float32, copy=True)
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if mode == "nearest":
        # exact nearest sample under the corner-aligned convention used for coordinates
        idx = [torch.round(torch.linspace(0, s - 1, size)).long() for s in volume.shape]
        out = t[0, 0][idx[0]][:, idx[1]][:, :, idx[2]]
        return out.numpy()
    return F.interpolate(t, size=(size,) * 3, mode=mode, align_corners=True)[0, 0].numpy()


class IntensityEncoder:
    """Intensity -> class id by the nearest k-means centre. Centre 0 is the background (0.0)."""

    def __init__(self, centres):
        centres = np.sort(np.asarray(centres, dtype=np.float64).ravel())
        if centres.size < 2 or centres.size > 255 or not np.isfinite(centres).all():
            raise IfadError("intensity centres must be 2 to 255 finite numbers")
        self.centres = centres

    @property
    def n_classes(self) -> int:
        return self.centres.size

    @classmethod
    def preset(cls, name: str) -> "IntensityEncoder":
        if name == "hcp-t2":
            return cls(cfg.HCP_T2_CENTRES)
        raise IfadError(f"unknown centre preset {name!r}; use hcp-t2 or a JSON file of centres")

    @classmethod
    def fit(cls, volumes, k: int = 10, n_samples: int = 2_000_000, seed: int = 0) -> "IntensityEncoder":
        """k-means (scikit-learn) on a seeded sample of non-zero voxels of normalised volumes.

        One centre is fixed at 0.0 for the background, the other k-1 are fitted on brain voxels,
        so the background never shares a class with the darkest tissue.
        """
        from sklearn.cluster import KMeans

        rng = np.random.default_rng(seed)
        brains = [v[v > 0] for v in volumes]
        total = sum(b.size for b in brains)
        if total < k:
            raise IfadError("too few brain voxels to fit intensity centres; pass more scans or use --centres hcp-t2")
        per_volume = [min(b.size, int(np.ceil(n_samples * b.size / total))) for b in brains]
        sample = np.concatenate([rng.choice(b, n, replace=False) for b, n in zip(brains, per_volume)])
        km = KMeans(n_clusters=k - 1, n_init=3, random_state=seed).fit(sample.reshape(-1, 1).astype(np.float64))
        return cls(np.concatenate([[0.0], km.cluster_centers_.ravel()]))

    def encode(self, volume: np.ndarray) -> np.ndarray:
        """Normalised float volume (X, Y, Z) -> uint8 class ids."""
        return assign_nearest(np.ascontiguousarray(volume, dtype=np.float32), self.centres)

    def decode(self, classes: np.ndarray) -> np.ndarray:
        return self.centres[classes].astype(np.float32)

    def save(self, path) -> Path:
        from .io import save_json
        return save_json(path, {"centres": self.centres.tolist()})

    @classmethod
    def load(cls, spec: str) -> "IntensityEncoder":
        """A preset name (hcp-t2) or a JSON file with {"centres": [...]} or a plain list."""
        path = Path(spec)
        if not path.is_file():
            return cls.preset(spec) if spec == "hcp-t2" else _raise_missing(spec)
        try:
            data = json.loads(path.read_text())
            centres = data["centres"] if isinstance(data, dict) else data
            return cls(centres)
        except IfadError:
            raise
        except Exception:
            raise IfadError(f"{path}: not a centres file; expected JSON like {{\"centres\": [0.0, 0.2, ...]}}") from None


def _raise_missing(spec):
    raise IfadError(f"{spec}: no such centres file or preset; pass a JSON file or hcp-t2")


@dataclass
class Prepared:
    """A scan on the model grid: `normalised` float32 (R,R,R), `classes` uint8 (R,R,R)."""

    normalised: np.ndarray
    classes: np.ndarray
    grid: GridMap
    percentiles: tuple


def to_model_grid(data: np.ndarray, pc: cfg.PreprocessConfig) -> tuple[np.ndarray, GridMap, tuple]:
    """Native scan -> normalised model-grid volume (R, R, R) float32, its GridMap, percentiles."""
    normalised, percentiles = normalise(data, pc.clip_percentiles)
    grid = GridMap.for_shape(data.shape, pc.resolution)
    return np.clip(grid.to_model(normalised), 0.0, 1.0), grid, percentiles


def prepare(data: np.ndarray, encoder: IntensityEncoder, pc: cfg.PreprocessConfig, mode_pool: int) -> Prepared:
    """Native scan -> model input: normalise, cube, resample, encode, mode-pool (1 = none)."""
    volume, grid, percentiles = to_model_grid(data, pc)
    classes = encoder.encode(volume)
    if mode_pool > 1:
        classes = mode_pool3d(classes, mode_pool, encoder.n_classes)
    return Prepared(volume, classes, grid, percentiles)


def brain_region(normalised: np.ndarray, reach: int) -> np.ndarray:
    """Voxels within Chebyshev distance `reach` of the brain (normalised > 0): bool (R, R, R)."""
    from scipy.ndimage import maximum_filter

    brain = normalised > 0
    if reach <= 0:
        return brain
    return maximum_filter(brain, size=2 * reach + 1, mode="constant", cval=False)


def model_affine(grid: GridMap, affine: np.ndarray) -> np.ndarray:
    """The world affine of the model grid: model voxel -> cube voxel -> native voxel -> world."""
    s = (grid.cube - 1) / max(grid.resolution - 1, 1)
    to_native = np.diag([s, s, s, 1.0])
    to_native[:3, 3] = -np.asarray(grid.offset, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ to_native
