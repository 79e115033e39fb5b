"""Scan -> model input, and back: the model frame, normalisation, intensity classes.

A scan (X, Y, Z) with its affine (voxel -> world millimetres; NIfTI world axes are RAS+:
x to the subject's right, y anterior, z superior) enters the model through the frame stored in
the model's PreprocessConfig:

physical (new models)
    A cube of side `extent_mm` (paper preset 160 × 1.5 mm = 240 mm; `small` 96 × 2.33 mm = 224 mm,
    room for a large adult brain whose centre of mass is off its box centre; `tiny` 24 × 8 mm = 192 mm) whose axes are the world's R, A, S axes, so the
    scan's voxel order, flips (LPS, permuted axes) and obliquity all fall away. Its grid of
    R³ isotropic voxels (v = extent_mm / R) is centred on the brain's centre of mass (the scan's
    non-zero voxels, unweighted: robust to stray voxels and independent of intensities): model
    voxel i sits at centre + (i - (R - 1)/2)·v. Model voxel -> world -> scan voxel is ONE affine
    (`Placement.model_to_native`), evaluated by one trilinear interpolation in torch
    (`resample`: grid_sample, float32, any device), zero outside the scan. Back to the scan's
    grid through the inverse affine (trilinear for scores, nearest for classes); scan voxels
    outside the frame get 0. A brain larger than the box is cut at its faces: the model never
    sees the part outside, and that part gets 0 in every output.
    Scoring at another resolution N (IF 3D*) keeps the box: the N³ grid's first and last voxel
    centres are those of the R³ grid (voxel (R - 1)·v / (N - 1)), which matches the decoder's
    corner-aligned coordinates (voxel i of an S-grid at -1 + 2i/(S - 1)).
cube (model files of format version 1; `--frame cube` for scans that are already aligned)
    The scan is zero-padded (centred) to a cube of its own largest side, resampled linearly
    (corners aligned) to R³; orientation, voxel size and field of view are taken as they are.

Intensities (non-zero voxels only): clipped to their 2nd/98th percentiles, then 'minmax'
((x - p2)/(p98 - p2) into [0, 1], the paper's and its reference code's; new models) or 'upper'
(divided by p98; format-version-1 models). The percentiles are taken over every brain voxel (the
paper's) or, with `percentile_region='interior'`, over the brain less its partial-volume rim: a
skull-stripped scan resampled trilinearly (as registration does) gains a rim of tissue blended
with the zero background, ~2-3 % of its voxels, which drags p2 from ~0.6 to ~0.3 of the median (or
lower) and moves every tissue's class; the rim is the outer voxel layer's part that is darker than
the interior's p2. After min-max the darkest brain voxels are 0 like the
background, so the brain is never read back from intensities: it is the scan's non-zero support,
carried through resampling explicitly (`Placement.brain`: the resampled support, > 0).

Two paths, one set of functions: a NumPy array runs on the host (NumPy percentiles, the Numba
kernels of kernels/numba_ops.py), a torch tensor stays on its device (the percentiles by
`percentiles_torch`, the kernels of kernels/torch_ops.py, the frame's resampling in torch); on
torch's CPU device both give the same numbers bit for bit (tests/test_device_pipeline.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config as cfg
from .errors import IfadError
from .kernels.numba_ops import assign_nearest, mode_pool3d
from .kernels.torch_ops import assign_nearest_torch, mode_pool3d_torch


def normalise(data: np.ndarray, percentiles=(2.0, 98.0), method: str = "minmax",
              brain: np.ndarray | None = None, region: str = "brain",
              landmarks=()) -> tuple[np.ndarray, tuple[float, float]]:
    """Clip the brain's voxels to their percentiles and scale them; everything else is 0.

    data: (X, Y, Z); brain: bool of the same shape (default data != 0). region: where the
    percentiles are taken, 'brain' (every brain voxel, the paper's) or 'interior' (the brain less
    its partial-volume rim, `_percentile_set`, so a resampled scan's rim cannot drag them). method 'minmax':
    (x - lo) / (hi - lo) into [0, 1]. 'upper' (format-version-1 models): positive scans divided
    by the upper percentile, into (0, 1]; scans with negative values min-max scaled into
    [0.05, 1]. landmarks: a standard scale (config.LANDMARK_PERCENTILES); when given, the min-max
    values are mapped piecewise-linearly so that the scan's own landmarks land on it
    (`standardise`). Returns float32 (X, Y, Z) and (lo, hi).
    """
    if isinstance(data, torch.Tensor):
        return normalise_torch(data, percentiles, method, brain, region, landmarks)
    brain = data != 0 if brain is None else brain
    values = data[brain].astype(np.float64)
    _check_brain_values(values.size)
    reference = _percentile_set(data, brain, values, percentiles, region)
    lo, hi = np.percentile(reference, percentiles)
    _check_range(lo, hi)
    out = np.zeros(data.shape, np.float32)
    scaled = _scale(np.clip(values, lo, hi), lo, hi, method)
    if len(landmarks):
        own = np.percentile(_scale(np.clip(reference, lo, hi), lo, hi, method), cfg.LANDMARK_PERCENTILES)
        scaled = standardise(scaled, own.tolist(), landmarks)
    out[brain] = scaled
    return out, (float(lo), float(hi))


def normalise_torch(data: torch.Tensor, percentiles=(2.0, 98.0), method: str = "minmax",
                    brain: torch.Tensor | None = None, region: str = "brain",
                    landmarks=()) -> tuple[torch.Tensor, tuple[float, float]]:
    """`normalise` on a tensor, on its device: float32 (X, Y, Z) on data's device and (lo, hi);
    the same numbers as the NumPy version bit for bit (float64 values, `percentiles_torch`)."""
    brain = data != 0 if brain is None else brain
    values = data[brain].to(torch.float64)
    _check_brain_values(values.numel())
    reference = _percentile_set(data, brain, values, percentiles, region)
    lo, hi = percentiles_torch(reference, percentiles).tolist()
    _check_range(lo, hi)
    out = torch.zeros(data.shape, dtype=torch.float32, device=data.device)
    scaled = _scale(values.clamp(lo, hi), lo, hi, method)
    if len(landmarks):
        own = percentiles_torch(_scale(reference.clamp(lo, hi), lo, hi, method), cfg.LANDMARK_PERCENTILES)
        scaled = standardise(scaled, own.tolist(), landmarks)
    out[brain] = scaled.to(torch.float32)
    return out, (lo, hi)


def standardise(values, own, standard):
    """Nyúl-Udupa histogram standardisation of min-max values (float64 array or tensor in [0, 1]):
    the piecewise-linear map through (0, 0), (own[i], standard[i]) and (1, 1). own: the scan's
    landmarks, standard: the model's (Python floats, increasing). A landmark that does not rise
    above the previous knot (many clipped voxels share a value) is dropped. NumPy and torch run
    the same float64 operations, so they agree bit for bit."""
    xs, ys = [0.0], [0.0]
    for x, y in zip([*own, 1.0], [*standard, 1.0]):
        if x > xs[-1] and y > ys[-1]:
            xs.append(float(x))
            ys.append(float(y))
    if xs[-1] < 1.0:
        xs[-1], ys[-1] = 1.0, 1.0
    tensor = isinstance(values, torch.Tensor)
    knots = torch.tensor(xs, dtype=torch.float64, device=values.device) if tensor else np.asarray(xs)
    levels = torch.tensor(ys, dtype=torch.float64, device=values.device) if tensor else np.asarray(ys)
    seg = (torch.searchsorted(knots, values, right=True) if tensor
           else np.searchsorted(knots, values, side="right")) - 1
    seg = seg.clamp(0, len(xs) - 2) if tensor else np.clip(seg, 0, len(xs) - 2)
    x0, x1, y0, y1 = knots[seg], knots[seg + 1], levels[seg], levels[seg + 1]
    return y0 + (values - x0) / (x1 - x0) * (y1 - y0)


def scan_landmarks(data, pc: cfg.PreprocessConfig, brain=None) -> np.ndarray:
    """A native scan's own landmarks: its min-max values (pc's percentiles and region) at
    config.LANDMARK_PERCENTILES, float64 (9,). The mean over training scans is the standard scale."""
    data = np.asarray(data, dtype=np.float32)
    brain = data != 0 if brain is None else brain
    if pc.bias_correction:
        data = correct_bias(data, brain)
    values = data[brain].astype(np.float64)
    _check_brain_values(values.size)
    reference = _percentile_set(data, brain, values, pc.clip_percentiles, pc.percentile_region)
    lo, hi = np.percentile(reference, pc.clip_percentiles)
    _check_range(lo, hi)
    return np.percentile(_scale(np.clip(reference, lo, hi), lo, hi, "minmax"), cfg.LANDMARK_PERCENTILES)


def fit_landmarks(own: list) -> tuple:
    """The standard scale: the mean of the training scans' own landmarks (`scan_landmarks`), made
    strictly increasing inside (0, 1)."""
    mean = np.clip(np.mean(np.asarray(own, dtype=np.float64), axis=0), 1e-4, 1 - 1e-4)
    for i in range(1, len(mean)):
        mean[i] = max(mean[i], mean[i - 1] + 1e-4)
    return tuple(float(v) for v in mean)


def percentiles_torch(values: torch.Tensor, q) -> torch.Tensor:
    """NumPy's default ('linear') percentiles of a 1-D tensor, on its device: (len(q),) float64.

    The same arithmetic as np.percentile, so float64 results agree bit for bit: q / 100, the
    virtual index (n - 1)·q, its floor and the next order statistic (the last one past the end),
    and NumPy's two-sided lerp (a + (b - a)·t for t < 0.5, b - (b - a)·(1 - t) otherwise).
    """
    v = torch.sort(values.reshape(-1).to(torch.float64)).values
    n = v.numel()
    if n == 0:
        raise ValueError("percentiles of an empty tensor")
    out = []
    for p in q:
        virtual = (n - 1) * (float(p) / 100)
        below = math.floor(virtual)
        below = n - 1 if virtual >= n - 1 else max(below, 0)
        a, b = v[below], v[min(below + 1, n - 1)]
        t = virtual - below
        out.append(a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t))
    return torch.stack(out)


# Below this share of the brain (or this many voxels) the interior is too thin to stand for it.
INTERIOR_MIN_SHARE, INTERIOR_MIN_VOXELS = 0.25, 1000


def interior(brain):
    """The brain less its outer layer: voxels whose 26 neighbours (on the scan's own grid) are all
    brain, outside the array counting as background. Falls back to the whole brain when that
    leaves under INTERIOR_MIN_SHARE of it or INTERIOR_MIN_VOXELS voxels (a thin or tiny brain).

    brain: bool (X, Y, Z), NumPy or a tensor (stays on its device); returns the same kind. The two
    are the same mask: a binary erosion by a 3×3×3 cube, exact in either.
    """
    if isinstance(brain, torch.Tensor):
        outside = 1.0 - F.pad(brain.to(torch.float16 if brain.is_cuda else torch.float32), (1,) * 6)
        inner = F.max_pool3d(outside[None, None], 3, stride=1)[0, 0] == 0
        kept, total = int(inner.sum()), int(brain.sum())
    else:
        from scipy.ndimage import binary_erosion
        inner = binary_erosion(brain, np.ones((3, 3, 3), bool), border_value=0)
        kept, total = int(inner.sum()), int(brain.sum())
    return inner if kept >= max(INTERIOR_MIN_VOXELS, INTERIOR_MIN_SHARE * total) else brain


BIAS_SAMPLES, BIAS_BIN = 60_000, 0.02       # brain voxels the field is fitted on; log-histogram bin width


def _bias_terms(idx: np.ndarray, shape) -> np.ndarray:
    """The bias field's basis at voxel indices idx (N, 3): the 9 non-constant terms of a quadratic
    in coordinates scaled to [-1, 1] over the grid, float64 (N, 9)."""
    x, y, z = (2.0 * idx / np.maximum(np.asarray(shape) - 1, 1) - 1.0).T
    return np.stack([x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, x * z, y * z], 1)


def _log_entropy(log_values: np.ndarray) -> float:
    """Entropy of the histogram of log intensities in bins of BIAS_BIN (smoothed by one bin): a
    bias field spreads each tissue's peak and raises it."""
    from scipy.ndimage import gaussian_filter1d

    lo = log_values.min()
    bins = int(min(max((log_values.max() - lo) / BIAS_BIN, 8), 5000))
    counts, _ = np.histogram(log_values, bins=bins, range=(lo, lo + bins * BIAS_BIN))
    p = gaussian_filter1d(counts.astype(np.float64), 1.0)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def correct_bias(data, brain=None):
    """The scan divided by a smooth multiplicative bias field: exp(quadratic) over its grid, whose 9
    coefficients minimise the entropy of the brain's log-intensity histogram (the principle of N3),
    fitted by Powell's method on BIAS_SAMPLES brain voxels drawn with a fixed seed. data: (X, Y, Z)
    NumPy or tensor (corrected on the host, returned on its device); float32, background kept 0."""
    from scipy.optimize import minimize

    if isinstance(data, torch.Tensor):
        host = correct_bias(data.cpu().numpy(), None if brain is None else brain.cpu().numpy())
        return torch.from_numpy(host).to(data.device)
    data = np.asarray(data, dtype=np.float32)
    brain = data > 0 if brain is None else brain & (data > 0)
    idx = np.argwhere(brain)
    if len(idx) < 1000:
        return data
    pick = np.random.default_rng(0).choice(len(idx), min(BIAS_SAMPLES, len(idx)), replace=False)
    basis = _bias_terms(idx[pick], data.shape)
    logs = np.log(data[brain][pick].astype(np.float64))
    fit = minimize(lambda c: _log_entropy(logs - basis @ c), np.zeros(9), method="Powell",
                   options=dict(xtol=1e-3, ftol=1e-5, maxfev=4000))
    out = data.copy()
    out[brain] = (data[brain] / np.exp(_bias_terms(idx, data.shape) @ fit.x)).astype(np.float32)
    return out


def _percentile_set(data, brain, values, percentiles, region: str):
    """The brain values (float64, NumPy or tensor like `data`) that the percentiles are taken of.

    'brain': every one (`values`). 'interior': the brain less its partial-volume rim, i.e. less the
    voxels of its outer layer (brain, not `interior`) that are darker than the interior's lower
    percentile. A resampled scan's rim, tissue blended with the zero background, goes; a sharp
    edge's real tissue stays, so a scan with a hard edge keeps nearly the paper's percentiles.
    """
    if region == "brain":
        return values
    inner = interior(brain)
    tensor = isinstance(data, torch.Tensor)
    inside = data[inner].to(torch.float64) if tensor else data[inner].astype(np.float64)
    lo = percentiles_torch(inside, percentiles[:1])[0] if tensor else np.percentile(inside, percentiles[0])
    outer = brain & ~inner
    edge = data[outer].to(torch.float64) if tensor else data[outer].astype(np.float64)
    kept = edge[edge >= lo]
    return torch.cat([inside, kept]) if tensor else np.concatenate([inside, kept])


def _check_brain_values(n: int) -> None:
    if n == 0:
        raise IfadError("the scan has no non-zero (brain) voxels; pass a skull-stripped scan")


def _check_range(lo, hi) -> None:
    if not hi > lo:
        raise IfadError(f"the scan's brain intensities are constant ({hi:g}); pass a real MR scan")


def _scale(clipped, lo, hi, method: str):
    """Clipped brain values (float64 array or tensor) -> normalised (see `normalise`)."""
    if method == "minmax":
        return (clipped - lo) / (hi - lo)
    if method == "upper":
        return clipped / hi if lo > 0 else 0.05 + 0.95 * (clipped - lo) / (hi - lo)
    raise IfadError(f"unknown normalisation {method!r}; use minmax or upper")


def resample(volume: torch.Tensor, index_affine: np.ndarray, out_shape, mode: str = "linear",
             chunk_voxels: int = 1 << 22) -> torch.Tensor:
    """Sample `volume` at the points `index_affine` maps an output grid's voxels to.

    volume: (X, Y, Z) float32 tensor on any device; index_affine: 4x4, output voxel index ->
    input voxel index (one affine: the whole mapping, one interpolation); out_shape: (I, J, K).
    mode 'linear' (trilinear) or 'nearest'; zero outside the input (within one voxel of its
    outermost voxel centres the linear weights blend with that zero). Returns (I, J, K) float32 on
    volume's device, computed in slabs of about `chunk_voxels` output voxels.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    device = volume.device
    in_shape = tuple(volume.shape)
    if min(in_shape) < 2:
        raise IfadError(f"volume shape {in_shape} is too thin; pass a 3D scan")
    # fold grid_sample's normalisation (align_corners=True: index 0 -> -1, S-1 -> +1) into the
    # affine, and reverse the rows: grid_sample reads (z, y, x) for an (X, Y, Z) volume
    norm = np.diag([*(2.0 / (s - 1) for s in in_shape), 1.0])
    norm[:3, 3] = -1.0
    m = (norm @ np.asarray(index_affine, dtype=np.float64))[:3][::-1]
    m = torch.tensor(m.copy(), dtype=torch.float32, device=device)
    i_n, j_n, k_n = (int(s) for s in out_shape)
    j = torch.arange(j_n, device=device, dtype=torch.float32)
    k = torch.arange(k_n, device=device, dtype=torch.float32)
    base = m[:, 1, None, None] * j[None, :, None] + m[:, 2, None, None] * k[None, None, :] + m[:, 3, None, None]
    src = volume.to(torch.float32)[None, None]
    out = torch.empty((i_n, j_n, k_n), dtype=torch.float32, device=device)
    rows = max(1, chunk_voxels // max(j_n * k_n, 1))
    for a in range(0, i_n, rows):
        i = torch.arange(a, min(a + rows, i_n), device=device, dtype=torch.float32)
        grid = (m[:, 0, None, None, None] * i[None, :, None, None] + base[:, None]).permute(1, 2, 3, 0)
        out[a:a + i.numel()] = F.grid_sample(src, grid[None], mode="bilinear" if mode == "linear" else "nearest",
                                             padding_mode="zeros", align_corners=True)[0, 0]
    return out


@dataclass(frozen=True)
class GridMap:
    """The cube frame: how a native (X, Y, Z) grid sits in the model's resolution³ cube.

    The native volume is zero-padded (centred) to a cube of side `cube`, which is resampled
    linearly (corners aligned) to resolution³.
    """

    native_shape: tuple
    cube: int
    offset: tuple
    resolution: int

    @classmethod
    def for_shape(cls, shape, resolution: int) -> "GridMap":
        """The map of a native volume of `shape` (X, Y, Z): padded, centred, to a cube of its largest
        side, resampled to resolution³."""
        cube = max(shape)
        offset = tuple((cube - s) // 2 for s in shape)
        return cls(tuple(int(s) for s in shape), int(cube), offset, int(resolution))

    def to_model(self, volume):
        """Native (X, Y, Z) float -> model grid (R, R, R) float32 (linear); a tensor stays on its device."""
        if isinstance(volume, torch.Tensor):
            cube = torch.zeros((self.cube,) * 3, dtype=torch.float32, device=volume.device)
            cube[self._native_slices()] = volume
            return _resample_tensor(cube, self.resolution, "trilinear")
        cube = np.zeros((self.cube,) * 3, np.float32)
        cube[self._native_slices()] = volume
        return _resample(cube, self.resolution, "trilinear")

    def to_native(self, volume, mode: str = "linear"):
        """Model grid (R, R, R) -> native (X, Y, Z), dtype kept; mode 'linear' (scores) or 'nearest'
        (classes); a tensor stays on its device."""
        how = "trilinear" if mode == "linear" else "nearest"
        if isinstance(volume, torch.Tensor):
            out = _resample_tensor(volume.to(torch.float32), self.cube, how)
            return out[self._native_slices()].to(volume.dtype)
        dtype = volume.dtype
        out = _resample(volume.astype(np.float32), self.cube, how)
        return out[self._native_slices()].astype(dtype, copy=False)

    def _native_slices(self):
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.native_shape))


def _resample(volume: np.ndarray, size: int, mode: str) -> np.ndarray:
    return _resample_tensor(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)), size, mode).numpy()


def _resample_tensor(volume: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """A cube (S, S, S) float32 tensor -> (size, size, size) float32 on its device, corners aligned;
    mode 'trilinear' or 'nearest'."""
    if tuple(volume.shape) == (size,) * 3:
        return volume.to(torch.float32, copy=True)
    if mode == "nearest":
        # exact nearest sample under the corner-aligned convention used for coordinates (the
        # indices computed on the CPU, so every device samples the same voxels)
        idx = [torch.round(torch.linspace(0, s - 1, size)).long().to(volume.device) for s in volume.shape]
        return volume[idx[0]][:, idx[1]][:, :, idx[2]]
    return F.interpolate(volume[None, None], size=(size,) * 3, mode=mode, align_corners=True)[0, 0]


class IntensityEncoder:
    """Intensity -> class id by the nearest k-means centre. Centre 0 is the background (0.0)."""

    def __init__(self, centres):
        centres = np.sort(np.asarray(centres, dtype=np.float64).ravel())
        if centres.size < 2 or centres.size > 255 or not np.isfinite(centres).all():
            raise IfadError("intensity centres must be 2 to 255 finite numbers")
        self.centres = centres

    @property
    def n_classes(self) -> int:
        """The number of centres, C (class ids 0..C-1; 0 is the background)."""
        return self.centres.size

    @classmethod
    def preset(cls, name: str) -> "IntensityEncoder":
        """The encoder of a named set of centres ('hcp-t2': the paper's HCP T2 centres); IfadError otherwise."""
        if name == "hcp-t2":
            return cls(cfg.HCP_T2_CENTRES)
        raise IfadError(f"unknown centre preset {name!r}; use hcp-t2 or a JSON file of centres")

    @classmethod
    def fit(cls, volumes, k: int = 10, n_samples: int = 2_000_000, seed: int = 0,
            brains=None) -> "IntensityEncoder":
        """k-means (scikit-learn) on a seeded sample of brain voxels of normalised volumes.

        brains: bool masks like `volumes` (default: each volume's non-zero voxels; pass the masks
        for min-max normalised volumes, whose darkest brain voxels are 0). One centre is fixed at
        0.0 for the background, the other k-1 are fitted on the brain voxels.
        """
        from sklearn.cluster import KMeans

        rng = np.random.default_rng(seed)
        if brains is None:
            brains = [v > 0 for v in volumes]
        brains = [v[b] for v, b in zip(volumes, brains)]
        total = sum(b.size for b in brains)
        if total < k:
            raise IfadError("too few brain voxels to fit intensity centres; pass more scans or use --centres hcp-t2")
        per_volume = [min(b.size, int(np.ceil(n_samples * b.size / total))) for b in brains]
        sample = np.concatenate([rng.choice(b, n, replace=False) for b, n in zip(brains, per_volume)])
        km = KMeans(n_clusters=k - 1, n_init=3, random_state=seed).fit(sample.reshape(-1, 1).astype(np.float64))
        return cls(np.concatenate([[0.0], km.cluster_centers_.ravel()]))

    def encode(self, volume):
        """Normalised float volume (X, Y, Z) -> uint8 class ids (Numba for arrays; a tensor stays on
        its device, through kernels/torch_ops.py: the same ids bit for bit)."""
        if isinstance(volume, torch.Tensor):
            return assign_nearest_torch(volume, self.centres)
        return assign_nearest(np.ascontiguousarray(volume, dtype=np.float32), self.centres)

    def decode(self, classes):
        """uint8 class ids -> float32 intensities (the centres); a tensor stays on its device."""
        if isinstance(classes, torch.Tensor):
            return torch.as_tensor(self.centres, device=classes.device)[classes.long()].to(torch.float32)
        return self.centres[classes].astype(np.float32)

    def save(self, path) -> Path:
        """The centres as JSON {"centres": [...]} at `path` (what `load` reads back); returns the path."""
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


@dataclass(frozen=True, eq=False)
class Placement:
    """Where a scan's voxel grid sits in the model grid, and the scan's brain on that grid.

    native_shape (X, Y, Z); native_affine 4x4 (scan voxel -> world mm; the identity when a
    cube-frame scan came without one); model_affine 4x4 (model voxel -> world mm); resolution R;
    brain bool (R, R, R): the scan's non-zero support resampled linearly, > 0; grid: the cube
    frame's GridMap (None in the physical frame).
    """

    frame: str
    native_shape: tuple
    native_affine: np.ndarray
    model_affine: np.ndarray
    resolution: int
    brain: np.ndarray | None = None
    grid: GridMap | None = None

    @property
    def shape(self) -> tuple:
        """The score grid's shape, (resolution,) * 3."""
        return (self.resolution,) * 3

    @property
    def model_to_native(self) -> np.ndarray:
        """4x4: model voxel index -> native voxel index (one affine)."""
        return np.linalg.inv(self.native_affine) @ self.model_affine

    def to_model(self, volume, mode: str = "linear"):
        """Native (X, Y, Z) -> model grid (R, R, R) float32; mode 'linear' or 'nearest' (physical
        frame). A NumPy array gives an array; a tensor stays on its device."""
        on_device = isinstance(volume, torch.Tensor)
        volume = volume if on_device else np.asarray(volume)
        if tuple(volume.shape) != self.native_shape:
            raise IfadError(f"volume shape {tuple(volume.shape)} is not the scan's {self.native_shape}")
        if self.grid is not None:
            return self.grid.to_model(volume)
        if on_device:
            return resample(volume.to(torch.float32), self.model_to_native, self.shape, mode)
        src = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        return resample(src, self.model_to_native, self.shape, mode).numpy()

    def to_native(self, volume, mode: str = "linear"):
        """Model grid (R, R, R) -> native (X, Y, Z), dtype kept; mode 'linear' (scores) or 'nearest'
        (classes). Every native voxel gets a value; those outside the frame get 0. A NumPy array
        gives an array; a tensor stays on its device."""
        if isinstance(volume, torch.Tensor):
            if self.grid is not None:
                return self.grid.to_native(volume, mode)
            out = resample(volume.to(torch.float32), np.linalg.inv(self.model_to_native), self.native_shape, mode)
            return out.to(volume.dtype)
        volume = np.asarray(volume)
        if self.grid is not None:
            return self.grid.to_native(volume, mode)
        src = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        out = resample(src, np.linalg.inv(self.model_to_native), self.native_shape, mode).numpy()
        return out.astype(volume.dtype, copy=False)

    def label_to_model(self, label: np.ndarray) -> np.ndarray:
        """A native label map -> bool (R, R, R): label != 0 resampled linearly (order 1), then > 0,
        as the paper evaluates on its model grid."""
        return self.to_model((np.asarray(label) != 0).astype(np.float32)) > 0


def brain_centre(brain, affine: np.ndarray) -> np.ndarray:
    """World position (3,) float64 of the centre of mass of a bool (X, Y, Z) mask (unweighted);
    `brain` a NumPy array or a tensor (summed on its device: exact integer sums either way)."""
    if isinstance(brain, torch.Tensor):
        per_axis = [brain.sum(dim=tuple(a for a in range(3) if a != axis), dtype=torch.int64) for axis in range(3)]
        sums = [per_axis[0].sum()] + [(c * torch.arange(c.numel(), device=c.device)).sum() for c in per_axis]
        total, *moments = torch.stack(sums).tolist()
    else:
        total = int(np.count_nonzero(brain))
        moments = [(np.count_nonzero(brain, axis=tuple(a for a in range(3) if a != axis))
                    * np.arange(brain.shape[axis])).sum() for axis in range(3)]
    if total == 0:
        raise IfadError("the scan has no non-zero (brain) voxels; pass a skull-stripped scan")
    centre = [float(m) / total for m in moments]
    return (np.asarray(affine, dtype=np.float64) @ [*centre, 1.0])[:3]


def frame_affine(centre: np.ndarray, pc: cfg.PreprocessConfig, resolution: int | None = None) -> np.ndarray:
    """World affine (4x4) of the physical frame's grid at `resolution` (default pc.resolution).

    RAS axes, voxel pc.voxel_mm at pc.resolution, grid centre at `centre` (world mm). Another
    resolution N keeps the first and last voxel centres: voxel (R - 1)·v / (N - 1).
    """
    n = int(resolution or pc.resolution)
    if n < 2:
        raise IfadError(f"the score grid needs at least 2 voxels a side, got {n}")
    step = pc.voxel_mm * (pc.resolution - 1) / (n - 1)
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = np.asarray(centre, dtype=np.float64) - step * (n - 1) / 2.0
    return affine


def place(brain, affine: np.ndarray | None, pc: cfg.PreprocessConfig,
          resolution: int | None = None) -> Placement:
    """The frame's placement of a scan whose brain (non-zero support) is `brain` bool (X, Y, Z).

    affine: 4x4 voxel -> world mm; None is allowed in the cube frame only (identity assumed).
    The returned Placement carries the brain resampled to the model grid (a tensor on brain's
    device when `brain` is a tensor).
    """
    shape = tuple(int(s) for s in brain.shape)
    n = int(resolution or pc.resolution)
    if len(shape) != 3 or min(shape) < 2:
        raise IfadError(f"scan shape {shape} is not a 3D volume; pass a 3D scan")
    if affine is None:
        if pc.frame != "cube":
            raise IfadError("this model's frame is physical: pass the scan's affine (voxel -> world mm, "
                            "e.g. nibabel's img.affine) or the nibabel image itself")
        affine = np.eye(4)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise IfadError("the scan's affine must be a finite, invertible 4x4 voxel-to-world matrix")
    if pc.frame == "cube":
        grid = GridMap.for_shape(shape, n)
        placement = Placement("cube", shape, affine, model_affine(grid, affine), n, grid=grid)
    else:
        placement = Placement("physical", shape, affine, frame_affine(brain_centre(brain, affine), pc, n), n)
    weights = brain.to(torch.float32) if isinstance(brain, torch.Tensor) else brain.astype(np.float32)
    placement = replace(placement, brain=placement.to_model(weights) > 0)
    _check_brain_span(placement.brain)
    return placement


#: Fewest planes of the grid, along each axis, a placed brain must reach (the 3-voxel min-pool's
#: window); less means voxel sizes that are wrong by orders of magnitude, and an empty map.
MIN_BRAIN_SPAN = 3


def _check_brain_span(brain) -> None:
    """IfadError when the brain (bool (R, R, R), array or tensor) reaches fewer than MIN_BRAIN_SPAN
    planes of its grid along some axis."""
    spans = [int((brain.sum(tuple(b for b in range(3) if b != a)) > 0).sum()) for a in range(3)]
    if min(spans) < MIN_BRAIN_SPAN:
        raise IfadError(f"the brain covers {int(brain.sum())} voxels ({' x '.join(map(str, spans))}) of the "
                        f"{brain.shape[0]}³ model grid, too few to score; check the header's voxel sizes")


@dataclass
class Prepared:
    """A scan on the model grid: `normalised` float32 (R,R,R), `classes` uint8 (R,R,R), its placement.
    NumPy arrays, or tensors on the scan's device when the scan came as a tensor."""

    normalised: np.ndarray
    classes: np.ndarray
    placement: Placement
    percentiles: tuple

    @property
    def brain(self) -> np.ndarray:
        """bool (R, R, R): the scan's brain on the model grid."""
        return self.placement.brain


def as_scan(data, affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """An array or a nibabel image (its own affine used unless one is given) -> (float32 array, affine);
    a tensor stays a tensor (float32, on its device)."""
    if isinstance(data, torch.Tensor):
        return data.to(torch.float32), affine
    if hasattr(data, "dataobj") and hasattr(data, "affine"):
        return np.asarray(data.dataobj, dtype=np.float32), (data.affine if affine is None else affine)
    return np.asarray(data, dtype=np.float32), affine


def to_model_grid(data, affine: np.ndarray | None, pc: cfg.PreprocessConfig,
                  resolution: int | None = None) -> tuple[np.ndarray, Placement, tuple]:
    """Native scan -> (normalised model-grid volume (R, R, R) float32 in [0, 1], Placement, percentiles).

    data: (X, Y, Z) array, skull-stripped (background 0), or a nibabel image (its affine is used
    when `affine` is None), or a tensor (then everything stays on its device). resolution: the grid
    size (default pc.resolution; another N keeps the frame's extent). The brain is the scan's
    non-zero support (placement.brain on the model grid). With pc.register the scan is placed by
    `register.registered_affine` (scan voxel -> MNI world; registered on the host), which becomes
    placement.native_affine: the frame's resampling and `Placement.to_native` are unchanged.
    """
    data, affine = as_scan(data, affine)
    if data.ndim != 3:
        raise IfadError(f"scan shape {tuple(data.shape)} is not a 3D volume; pass a 3D scan")
    brain = data != 0
    if pc.bias_correction:
        data = correct_bias(data, brain)
    if pc.standardise and not pc.landmarks:
        raise IfadError("this preprocessing standardises intensities but holds no landmarks; fit them on the "
                        "training scans first (ifad-fast prepare / train do)")
    normalised, percentiles = normalise(data, pc.clip_percentiles, pc.normalisation, brain, pc.percentile_region,
                                        pc.landmarks if pc.standardise else ())
    if pc.register and affine is not None:        # the frame laid out in MNI space: scan voxel -> MNI world
        from .register import registered_affine
        affine = registered_affine(data, affine)
    placement = place(brain, affine, pc, resolution)
    volume = placement.to_model(normalised)
    if isinstance(volume, torch.Tensor):
        return volume.clamp_(0.0, 1.0), placement, percentiles
    return np.clip(volume, 0.0, 1.0), placement, percentiles


def prepare(data, encoder: IntensityEncoder, pc: cfg.PreprocessConfig, mode_pool: int,
            affine: np.ndarray | None = None, resolution: int | None = None) -> Prepared:
    """Native scan -> model input: normalise, place in the frame, encode, mode-pool (1 = none).
    A NumPy scan (or nibabel image) is prepared on the host; a tensor on its device."""
    volume, placement, percentiles = to_model_grid(data, affine, pc, resolution)
    classes = encoder.encode(volume)
    if mode_pool > 1:
        pool = mode_pool3d_torch if isinstance(classes, torch.Tensor) else mode_pool3d
        classes = pool(classes, mode_pool, encoder.n_classes)
    return Prepared(volume, classes, placement, percentiles)


def model_affine(grid: GridMap, affine: np.ndarray) -> np.ndarray:
    """The cube frame's world affine of the model grid: model voxel -> cube voxel -> native voxel -> world."""
    s = (grid.cube - 1) / max(grid.resolution - 1, 1)
    to_native = np.diag([s, s, s, 1.0])
    to_native[:3, 3] = -np.asarray(grid.offset, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ to_native
