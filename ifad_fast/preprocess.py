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

One pipeline, two sets of kernels. Every function here is one implementation, written on arrays
with the operators and methods NumPy arrays and torch tensors share; what differs by device is
the kernel table `_kernels` picks: `_HostKernels` (NumPy, the Numba kernels of
kernels/numba_ops.py) for a NumPy array or a tensor on torch's CPU device (computed on its
zero-copy NumPy view), `_TorchKernels` (torch, `percentiles_torch`, kernels/torch_ops.py) for a
tensor on any other device, where it stays. The frame's resampling is torch on both (`resample`;
zero-copy from and back to NumPy on the host). Each public function returns the kind it was
given: arrays for arrays, tensors on the input's device for tensors. Torch's own CPU operations
are not used for CPU tensors because on volumes they are many times slower than NumPy's (masked
gathers, reductions, percentiles by a full sort); `CPU_TENSOR_KERNELS = "torch"` forces the
device kernels onto CPU tensors, where they give the host's numbers bit for bit
(tests/test_device_pipeline.py): that is how CI checks the device code without a GPU.
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

# ---------------------------------------------------------------------- arrays and their kernels

#: How a tensor on torch's CPU device is computed: "numpy" (on its zero-copy NumPy view, by the host
#: kernels; the fast way) or "torch" (by the device kernels, run on the CPU: how the tests check
#: them against the host without a GPU).
CPU_TENSOR_KERNELS = "numpy"


def _array(x):
    """What preprocessing computes on: a tensor on another device than the CPU (or any tensor, with
    CPU_TENSOR_KERNELS = "torch") as it is, a CPU tensor as its zero-copy NumPy view, anything else
    as a NumPy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().numpy() if x.device.type == "cpu" and CPU_TENSOR_KERNELS == "numpy" else x
    return np.asarray(x)


def _like(result, given):
    """`result` (from `_array`'s kinds) in the kind of what the caller gave: a tensor for a tensor
    (zero-copy from a NumPy result), an array for anything else."""
    return torch.as_tensor(result) if isinstance(given, torch.Tensor) else result


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


class _HostKernels:
    """The host's kernels, on NumPy arrays: NumPy, and the Numba kernels of kernels/numba_ops.py.
    `like` (an array of this kind) says where a new array lives; the host has one place."""

    @staticmethod
    def astype(x, dtype):
        """x as `dtype` (a name such as "float32", or an array's dtype); x itself when it is one."""
        return x.astype(dtype, copy=False)

    @staticmethod
    def zeros(shape, dtype: str, like):
        return np.zeros(shape, dtype)

    @staticmethod
    def constant(values, like):
        """Numbers (a sequence) as a float64 1-D array."""
        return np.asarray(values, dtype=np.float64)

    @staticmethod
    def concat(arrays):
        return np.concatenate(arrays)

    @staticmethod
    def searchsorted(knots, values):
        """int64 indices: where values go among sorted knots, after equal ones."""
        return np.searchsorted(knots, values, side="right")

    @staticmethod
    def percentiles(values, q):
        """NumPy's linear percentiles, float64 (len(q),), of float64 values (a selection, no sort)."""
        return np.percentile(values, q)

    @staticmethod
    def take(table, index):
        """table[index] for integer ids of any integer dtype."""
        return table[index]

    @staticmethod
    def nearest_centre(volume, centres):
        """uint8 ids of the nearest centre (Numba; float32 voxels against float64 centres)."""
        return assign_nearest(np.ascontiguousarray(volume, dtype=np.float32), centres)

    @staticmethod
    def mode_pool(classes, window: int, n_classes: int):
        return mode_pool3d(classes, window, n_classes)

    @staticmethod
    def to_torch(x) -> torch.Tensor:
        """x as a float32 CPU tensor for `resample` (zero-copy when it is a contiguous float32 array)."""
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    @staticmethod
    def from_torch(t: torch.Tensor, like):
        return t.numpy()

    @staticmethod
    def to_host(x) -> np.ndarray:
        return x

    @staticmethod
    def from_host(a: np.ndarray, like):
        return a


class _TorchKernels:
    """The device's kernels, on torch tensors, each on its tensor's device: torch, `percentiles_torch`
    and kernels/torch_ops.py. Each gives `_HostKernels`' numbers bit for bit."""

    @staticmethod
    def astype(x, dtype):
        return x.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)

    @staticmethod
    def zeros(shape, dtype: str, like):
        return torch.zeros(shape, dtype=getattr(torch, dtype), device=like.device)

    @staticmethod
    def constant(values, like):
        return torch.as_tensor(values, dtype=torch.float64, device=like.device)

    @staticmethod
    def concat(arrays):
        return torch.cat(arrays)

    @staticmethod
    def searchsorted(knots, values):
        return torch.searchsorted(knots, values, right=True)

    @staticmethod
    def percentiles(values, q):
        return percentiles_torch(values, q)

    @staticmethod
    def take(table, index):
        return table[index.long()]

    @staticmethod
    def nearest_centre(volume, centres):
        return assign_nearest_torch(volume, centres)

    @staticmethod
    def mode_pool(classes, window: int, n_classes: int):
        return mode_pool3d_torch(classes, window, n_classes)

    @staticmethod
    def to_torch(x) -> torch.Tensor:
        return x.to(torch.float32)

    @staticmethod
    def from_torch(t: torch.Tensor, like):
        return t

    @staticmethod
    def to_host(x) -> np.ndarray:
        return x.detach().cpu().numpy()

    @staticmethod
    def from_host(a: np.ndarray, like):
        return torch.from_numpy(a).to(like.device)


def _kernels(x):
    """The kernel table of an array from `_array`: `_TorchKernels` for a tensor, else `_HostKernels`."""
    return _TorchKernels if isinstance(x, torch.Tensor) else _HostKernels


# ---------------------------------------------------------------------------- intensities

def normalise(data, percentiles=(2.0, 98.0), method: str = "minmax", brain=None, region: str = "brain",
              landmarks=()) -> tuple:
    """Clip the brain's voxels to their percentiles and scale them; everything else is 0.

    data: (X, Y, Z), an array or a tensor (then computed on its device); brain: bool of the same
    shape and kind (default data != 0). region: where the percentiles are taken, 'brain' (every
    brain voxel, the paper's) or 'interior' (the brain less its partial-volume rim,
    `_percentile_set`, so a resampled scan's rim cannot drag them). method 'minmax':
    (x - lo) / (hi - lo) into [0, 1]. 'upper' (format-version-1 models): positive scans divided
    by the upper percentile, into (0, 1]; scans with negative values min-max scaled into
    [0.05, 1]. landmarks: a standard scale (config.LANDMARK_PERCENTILES); when given, the min-max
    values are mapped piecewise-linearly so that the scan's own landmarks land on it
    (`standardise`). Returns float32 (X, Y, Z) of data's kind and (lo, hi) as Python floats.
    """
    scan = _array(data)
    mask = scan != 0 if brain is None else _array(brain)
    kernels = _kernels(scan)
    values, reference, lo, hi = _clip_range(scan, mask, percentiles, region)
    scaled = _scale(values.clip(lo, hi), lo, hi, method)
    if len(landmarks):
        own = kernels.percentiles(_scale(reference.clip(lo, hi), lo, hi, method), cfg.LANDMARK_PERCENTILES)
        scaled = standardise(scaled, own.tolist(), landmarks)
    out = kernels.zeros(scan.shape, "float32", scan)
    out[mask] = kernels.astype(scaled, "float32")
    return _like(out, data), (lo, hi)


def standardise(values, own, standard):
    """Nyúl-Udupa histogram standardisation of min-max values (float64 array or tensor in [0, 1]):
    the piecewise-linear map through (0, 0), (own[i], standard[i]) and (1, 1). own: the scan's
    landmarks, standard: the model's (Python floats, increasing). A landmark that does not rise
    above the previous knot (many clipped voxels share a value) is dropped. Returns float64 of
    values' kind; arrays and tensors run the same float64 operations, so they agree bit for bit."""
    xs, ys = [0.0], [0.0]
    for x, y in zip([*own, 1.0], [*standard, 1.0]):
        if x > xs[-1] and y > ys[-1]:
            xs.append(float(x))
            ys.append(float(y))
    if xs[-1] < 1.0:
        xs[-1], ys[-1] = 1.0, 1.0
    v = _array(values)
    kernels = _kernels(v)
    knots, levels = kernels.constant(xs, v), kernels.constant(ys, v)
    seg = (kernels.searchsorted(knots, v) - 1).clip(0, len(xs) - 2)
    x0, x1, y0, y1 = knots[seg], knots[seg + 1], levels[seg], levels[seg + 1]
    return _like(y0 + (v - x0) / (x1 - x0) * (y1 - y0), values)


def scan_landmarks(data, pc: cfg.PreprocessConfig, brain=None) -> np.ndarray:
    """A native scan's own landmarks: its min-max values (pc's percentiles and region) at
    config.LANDMARK_PERCENTILES, float64 (9,). The mean over training scans is the standard scale."""
    scan = _array(as_scan(data)[0])
    mask = scan != 0 if brain is None else _array(brain)
    if pc.bias_correction:
        scan = correct_bias(scan, mask)
    _, reference, lo, hi = _clip_range(scan, mask, pc.clip_percentiles, pc.percentile_region)
    own = _kernels(scan).percentiles(_scale(reference.clip(lo, hi), lo, hi, "minmax"), cfg.LANDMARK_PERCENTILES)
    return np.asarray(own.tolist(), dtype=np.float64)


def fit_landmarks(own: list) -> tuple:
    """The standard scale: the mean of the training scans' own landmarks (`scan_landmarks`), made
    strictly increasing inside (0, 1)."""
    mean = np.clip(np.mean(np.asarray(own, dtype=np.float64), axis=0), 1e-4, 1 - 1e-4)
    for i in range(1, len(mean)):
        mean[i] = max(mean[i], mean[i - 1] + 1e-4)
    return tuple(float(v) for v in mean)


def _clip_range(data, brain, percentiles, region: str) -> tuple:
    """The start of `normalise` and `scan_landmarks` on arrays from `_array`: (the brain's values
    float64 (N,), the values the percentiles are taken of (`_percentile_set`), lo, hi)."""
    kernels = _kernels(data)
    values = kernels.astype(data[brain], "float64")
    _check_brain_values(values.shape[0])
    reference = _percentile_set(data, brain, values, percentiles, region)
    lo, hi = kernels.percentiles(reference, percentiles).tolist()
    _check_range(lo, hi)
    return values, reference, lo, hi


def _percentile_set(data, brain, values, percentiles, region: str):
    """The brain values (float64 (M,), of data's kind) that the percentiles are taken of.

    'brain': every one (`values`). 'interior': the brain less its partial-volume rim, i.e. less the
    voxels of its outer layer (brain, not `interior`) that are darker than the interior's lower
    percentile. A resampled scan's rim, tissue blended with the zero background, goes; a sharp
    edge's real tissue stays, so a scan with a hard edge keeps nearly the paper's percentiles.
    """
    if region == "brain":
        return values
    kernels = _kernels(data)
    inner = interior(brain)
    inside = kernels.astype(data[inner], "float64")
    lo = kernels.percentiles(inside, percentiles[:1]).tolist()[0]
    edge = kernels.astype(data[brain & ~inner], "float64")
    return kernels.concat([inside, edge[edge >= lo]])


# Below this share of the brain (or this many voxels) the interior is too thin to stand for it.
INTERIOR_MIN_SHARE, INTERIOR_MIN_VOXELS = 0.25, 1000


def interior(brain):
    """The brain less its outer layer: voxels whose 26 neighbours (on the scan's own grid) are all
    brain, outside the array counting as background. Falls back to the whole brain when that
    leaves under INTERIOR_MIN_SHARE of it or INTERIOR_MIN_VOXELS voxels (a thin or tiny brain).

    brain: bool (X, Y, Z), an array or a tensor (stays on its device); returns the same kind.
    """
    mask = _array(brain)
    inner = _erode(mask)
    kept, total = int(inner.sum()), int(mask.sum())
    return _like(inner if kept >= max(INTERIOR_MIN_VOXELS, INTERIOR_MIN_SHARE * total) else mask, brain)


def _erode(mask):
    """A bool (X, Y, Z) array (from `_array`) eroded by a 3×3×3 cube, outside the array counting as
    background: three 1-D erosions, a voxel kept when it and both its neighbours along the axis are."""
    kernels = _kernels(mask)
    for axis in range(3):
        n = mask.shape[axis]

        def span(start, stop, axis=axis):
            return (slice(None),) * axis + (slice(start, stop),)
        eroded = kernels.zeros(mask.shape, "bool", mask)
        eroded[span(1, n - 1)] = mask[span(0, n - 2)] & mask[span(1, n - 1)] & mask[span(2, n)]
        mask = eroded
    return mask


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
    array or tensor (fitted on the host, returned in data's kind and on its device); float32,
    background kept 0."""
    scan = _array(data)
    kernels = _kernels(scan)
    host = _bias_corrected(kernels.to_host(scan), None if brain is None else kernels.to_host(_array(brain)))
    return _like(kernels.from_host(host, scan), data)


def _bias_corrected(data: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
    """`correct_bias` on the host: float32 (X, Y, Z) NumPy array in, float32 out."""
    from scipy.optimize import minimize

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


# ---------------------------------------------------------------------------- the frame

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
        """Native (X, Y, Z) float or bool -> model grid (R, R, R) float32 (linear); an array gives an
        array, a tensor a tensor on its device."""
        v = _array(volume)
        kernels = _kernels(v)
        cube = kernels.zeros((self.cube,) * 3, "float32", v)
        cube[self._native_slices()] = v
        out = _resample_tensor(kernels.to_torch(cube), self.resolution, "trilinear")
        return _like(kernels.from_torch(out, v), volume)

    def to_native(self, volume, mode: str = "linear"):
        """Model grid (R, R, R) -> native (X, Y, Z), dtype kept; mode 'linear' (scores) or 'nearest'
        (classes); an array gives an array, a tensor a tensor on its device."""
        v = _array(volume)
        kernels = _kernels(v)
        out = _resample_tensor(kernels.to_torch(v), self.cube, "trilinear" if mode == "linear" else "nearest")
        return _like(kernels.astype(kernels.from_torch(out, v)[self._native_slices()], v.dtype), volume)

    def _native_slices(self):
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.native_shape))


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
        """Normalised float volume (X, Y, Z) -> uint8 class ids of the nearest centre (the kernel of
        volume's device: Numba on the host, kernels/torch_ops.py elsewhere; the same ids bit for bit);
        an array gives an array, a tensor a tensor on its device."""
        v = _array(volume)
        return _like(_kernels(v).nearest_centre(v, self.centres), volume)

    def decode(self, classes):
        """uint8 class ids -> float32 intensities (the centres), of classes' kind and device."""
        ids = _array(classes)
        kernels = _kernels(ids)
        return _like(kernels.astype(kernels.take(kernels.constant(self.centres, ids), ids), "float32"), classes)

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
        """Native (X, Y, Z) float or bool -> model grid (R, R, R) float32; mode 'linear' or 'nearest'
        (physical frame). An array gives an array; a tensor a tensor on its device."""
        v = _array(volume)
        if tuple(v.shape) != self.native_shape:
            raise IfadError(f"volume shape {tuple(v.shape)} is not the scan's {self.native_shape}")
        if self.grid is not None:
            return _like(self.grid.to_model(v), volume)
        kernels = _kernels(v)
        out = resample(kernels.to_torch(v), self.model_to_native, self.shape, mode)
        return _like(kernels.from_torch(out, v), volume)

    def to_native(self, volume, mode: str = "linear"):
        """Model grid (R, R, R) -> native (X, Y, Z), dtype kept; mode 'linear' (scores) or 'nearest'
        (classes). Every native voxel gets a value; those outside the frame get 0. An array gives
        an array; a tensor a tensor on its device."""
        v = _array(volume)
        if self.grid is not None:
            return _like(self.grid.to_native(v, mode), volume)
        kernels = _kernels(v)
        out = resample(kernels.to_torch(v), np.linalg.inv(self.model_to_native), self.native_shape, mode)
        return _like(kernels.astype(kernels.from_torch(out, v), v.dtype), volume)

    def label_to_model(self, label: np.ndarray) -> np.ndarray:
        """A native label map -> bool (R, R, R): label != 0 resampled linearly (order 1), then > 0,
        as the paper evaluates on its model grid."""
        return self.to_model((np.asarray(label) != 0).astype(np.float32)) > 0


def brain_centre(brain, affine: np.ndarray) -> np.ndarray:
    """World position (3,) float64 of the centre of mass of a bool (X, Y, Z) mask (unweighted);
    `brain` an array or a tensor (counted on its device, read back once: exact integer sums)."""
    mask = _array(brain)
    counts = _kernels(mask).concat([mask.sum(tuple(a for a in range(3) if a != axis)) for axis in range(3)]).tolist()
    starts = np.cumsum([0, *mask.shape])
    per_axis = [counts[a:b] for a, b in zip(starts[:-1], starts[1:])]
    total = sum(per_axis[0])
    moments = [sum(i * c for i, c in enumerate(axis_counts)) for axis_counts in per_axis]
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
    The returned Placement carries the brain resampled to the model grid, bool (R, R, R) of brain's
    kind (a tensor on brain's device for a tensor).
    """
    mask = _array(brain)
    shape = tuple(int(s) for s in mask.shape)
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
        placement = Placement("physical", shape, affine, frame_affine(brain_centre(mask, affine), pc, n), n)
    placed = placement.to_model(mask) > 0
    _check_brain_span(placed)
    return replace(placement, brain=_like(placed, brain))


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
                  resolution: int | None = None) -> tuple:
    """Native scan -> (normalised model-grid volume (R, R, R) float32 in [0, 1], Placement, percentiles).

    data: (X, Y, Z) array, skull-stripped (background 0), or a nibabel image (its affine is used
    when `affine` is None), or a tensor (then the volume and placement.brain are tensors on its
    device). resolution: the grid size (default pc.resolution; another N keeps the frame's extent).
    The brain is the scan's non-zero support (placement.brain on the model grid). With pc.register
    the scan is placed by `register.registered_affine` (scan voxel -> MNI world; registered on the
    host), which becomes placement.native_affine: the frame's resampling and `Placement.to_native`
    are unchanged.
    """
    data, affine = as_scan(data, affine)
    volume, placement, percentiles = _to_model_grid(_array(data), affine, pc, resolution)
    return _like(volume, data), replace(placement, brain=_like(placement.brain, data)), percentiles


def _to_model_grid(scan, affine, pc: cfg.PreprocessConfig, resolution: int | None) -> tuple:
    """`to_model_grid` on an array from `_array` (float32 (X, Y, Z)): its results of the same kind."""
    normalised, brain, affine, percentiles = _normalised(scan, affine, pc)
    return (*_placed(normalised, brain, affine, pc, resolution), percentiles)


def _normalised(scan, affine, pc: cfg.PreprocessConfig) -> tuple:
    """What does not depend on the grid: (the normalised scan, its brain, the affine it is placed by
    (registered with pc.register), the percentiles)."""
    if scan.ndim != 3:
        raise IfadError(f"scan shape {tuple(scan.shape)} is not a 3D volume; pass a 3D scan")
    brain = scan != 0
    if pc.bias_correction:
        scan = correct_bias(scan, brain)
    if pc.standardise and not pc.landmarks:
        raise IfadError("this preprocessing standardises intensities but holds no landmarks; fit them on the "
                        "training scans first (ifad-fast prepare / train do)")
    normalised, percentiles = normalise(scan, pc.clip_percentiles, pc.normalisation, brain, pc.percentile_region,
                                        pc.landmarks if pc.standardise else ())
    if pc.register and affine is not None:        # the frame laid out in MNI space: scan voxel -> MNI world
        from .register import registered_affine
        affine = registered_affine(scan, affine)
    return normalised, brain, affine, percentiles


def _placed(normalised, brain, affine, pc: cfg.PreprocessConfig, resolution: int | None) -> tuple:
    """(the model-grid volume clipped to [0, 1], its Placement) at `resolution` (None: pc's)."""
    placement = place(brain, affine, pc, resolution)
    return placement.to_model(normalised).clip(0.0, 1.0), placement


def prepare(data, encoder: IntensityEncoder, pc: cfg.PreprocessConfig, mode_pool: int,
            affine: np.ndarray | None = None, resolution: int | None = None) -> Prepared:
    """Native scan -> model input: normalise, place in the frame, encode, mode-pool (1 = none).
    A NumPy scan (or nibabel image) gives arrays; a tensor gives tensors on its device."""
    return prepare_grids(data, encoder, pc, mode_pool, affine, (resolution,))[0]


def prepare_grids(data, encoder: IntensityEncoder, pc: cfg.PreprocessConfig, mode_pool: int,
                  affine: np.ndarray | None = None, resolutions=(None,)) -> list[Prepared]:
    """`prepare` at each grid size of `resolutions` (None: pc.resolution), the scan's normalisation,
    bias correction and registration done once for all of them: one Prepared per size."""
    data, affine = as_scan(data, affine)
    normalised, brain, affine, percentiles = _normalised(_array(data), affine, pc)
    out = []
    for resolution in resolutions:
        volume, placement = _placed(normalised, brain, affine, pc, resolution)
        classes = encoder.encode(volume)
        if mode_pool > 1:
            classes = _kernels(classes).mode_pool(classes, mode_pool, encoder.n_classes)
        out.append(Prepared(_like(volume, data), _like(classes, data),
                            replace(placement, brain=_like(placement.brain, data)), percentiles))
    return out


def model_affine(grid: GridMap, affine: np.ndarray) -> np.ndarray:
    """The cube frame's world affine of the model grid: model voxel -> cube voxel -> native voxel -> world."""
    s = (grid.cube - 1) / max(grid.resolution - 1, 1)
    to_native = np.diag([s, s, s, 1.0])
    to_native[:3, 3] = -np.asarray(grid.offset, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ to_native
