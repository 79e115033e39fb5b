"""Numba CPU kernels for the intensity encoding: nearest-centre assignment and 3D mode-pooling.

Leaf module: imports only NumPy and Numba, nothing of ``ifad_fast``.

Both kernels are parallel (``prange``), build no one-hot or (N, C) tensors, and are compiled
lazily with ``cache=True`` (the first call in a fresh environment compiles, for a few seconds
per kernel; later processes load the cached machine code). Their results are bit-for-bit
those of the plain NumPy definitions:

* ``assign_nearest(v, c) == np.argmin(np.abs(v[..., None] - c), axis=-1)`` (ties -> lower index)
* ``mode_pool3d(k, w, C) == argmax_C(box_sum_w(one_hot(k, C)))`` (ties -> lower class id),
  with the boundary rule documented on :func:`mode_pool3d`.

``assign_nearest`` is one pass over the voxels. ``mode_pool3d`` packs the per-class counts
of a voxel into one uint64 (``bits`` bits per class) when they fit (up to 12 classes at
window 3, 16 at window 2), so the counts are a separable box sum of words (two passes, one
uint64 scratch volume: 8 bytes per voxel, 33 MB at 160^3) and the argmax a vectorised max
over (count, class) keys; otherwise it slides a per-row histogram of ``n_classes`` counters
along the last axis (one pass, no scratch).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

__all__ = ["assign_nearest", "mode_pool3d", "window_offsets"]


# --------------------------------------------------------------------------- nearest centre


_ASSIGN_BLOCK = 1024


@numba.njit(parallel=True, cache=True, nogil=True)
def _assign_nearest_kernel(v, c, out):  # pragma: no cover - compiled
    # The reference's own computation, |v - c_j| in v's dtype and a strict '<' scan over j
    # (first minimum wins, NaN never wins, so a NaN voxel stays at 0 as in np.argmin), done
    # one block of voxels at a time so that the loop over voxels vectorises (no branches).
    n = v.shape[0]
    n_c = c.shape[0]
    n_blocks = (n + _ASSIGN_BLOCK - 1) // _ASSIGN_BLOCK
    for blk in prange(n_blocks):
        start = blk * _ASSIGN_BLOCK
        stop = min(n, start + _ASSIGN_BLOCK)
        m = stop - start
        vb = v[start:stop]
        ob = out[start:stop]
        best_d = np.empty(_ASSIGN_BLOCK, dtype=v.dtype)
        best_i = np.empty(_ASSIGN_BLOCK, dtype=np.int32)
        c0 = c[0]
        for t in range(m):
            best_d[t] = abs(vb[t] - c0)
            best_i[t] = 0
        for j in range(1, n_c):
            cj = c[j]
            jj = np.int32(j)
            for t in range(m):
                d = abs(vb[t] - cj)
                b = best_d[t]
                g = d < b
                best_d[t] = d if g else b
                best_i[t] = jj if g else best_i[t]
        for t in range(m):
            ob[t] = best_i[t]


def _common_float_dtype(a: np.dtype, b: np.dtype) -> np.dtype:
    dt = np.result_type(a, b)
    if dt == np.float32 or dt == np.float64:
        return dt
    if np.issubdtype(dt, np.floating) and dt.itemsize < 4:  # float16 -> float32
        return np.dtype(np.float32)
    return np.dtype(np.float64)  # integers, bools, longdouble


def assign_nearest(volume: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for every voxel.

    Parameters
    ----------
    volume : array of any shape, float32 or float64 (other real dtypes are promoted; a
        non-contiguous array is copied).
    centres : 1-D array of 1 <= C <= 255 finite centres, sorted ascending
        (the kernel itself does not need the order; the check guards the class-id contract:
        class ids increase with intensity).

    Returns
    -------
    uint8 array of ``volume.shape``: ``argmin_i |v - centres[i]|``, the lower index on ties.
    Distances are computed in ``np.result_type(volume, centres)`` (float16 -> float32,
    integers -> float64), so the result equals
    ``np.argmin(np.abs(volume[..., None] - centres), axis=-1)`` exactly (it is the same
    computation: a strict '<' scan over the centres, vectorised over blocks of voxels),
    including values exactly at midpoints, values outside the centre range, and +/-inf or NaN
    voxels (-> 0, as the reference).
    """
    volume = np.asarray(volume)
    centres = np.asarray(centres)
    if centres.ndim != 1 or centres.shape[0] == 0:
        raise ValueError(f"centres must be a non-empty 1-D array, got shape {centres.shape}")
    if centres.shape[0] > 255:
        raise ValueError(f"at most 255 centres are supported, got {centres.shape[0]}")
    dt = _common_float_dtype(volume.dtype, centres.dtype)
    c = np.ascontiguousarray(centres, dtype=dt)
    if not np.isfinite(c).all():
        raise ValueError("centres must be finite")
    if c.shape[0] > 1 and np.any(c[1:] < c[:-1]):
        raise ValueError("centres must be sorted ascending")
    v = np.ascontiguousarray(volume, dtype=dt).reshape(-1)
    out = np.empty(v.shape[0], dtype=np.uint8)
    if v.shape[0]:
        _assign_nearest_kernel(v, c, out)
    return out.reshape(volume.shape)


# --------------------------------------------------------------------------- mode pool


def window_offsets(window: int) -> tuple[int, int]:
    """Inclusive neighbour offsets ``(lo, hi)`` of a stride-1 'same' window of this size.

    ``lo = -(window // 2)``, ``hi = (window - 1) // 2``: centred for odd windows (3 -> -1..+1),
    the extra voxel at the start for even ones (2 -> -1..0, 4 -> -2..+1): window 2 looks back,
    as the paper's reference code pools (pad one zero before, then a stride-1 2x2x2 window).
    """
    return -(window // 2), (window - 1) // 2


@numba.njit(inline="always", cache=True)
def _argmax_first(hist):  # pragma: no cover - compiled
    best = 0
    best_count = hist[0]
    for k in range(1, hist.shape[0]):
        if hist[k] > best_count:  # strict: ties keep the lower class id
            best_count = hist[k]
            best = k
    return best


@numba.njit(parallel=True, cache=True, nogil=True)
def _mode_pool_kernel(cls, lo, hi, n_classes, out):  # pragma: no cover - compiled
    nx, ny, nz = cls.shape
    for x in prange(nx):
        hist = np.zeros(n_classes, dtype=np.int32)
        x0 = max(x + lo, 0)
        x1 = min(x + hi, nx - 1)
        for y in range(ny):
            y0 = max(y + lo, 0)
            y1 = min(y + hi, ny - 1)
            for k in range(n_classes):
                hist[k] = 0
            # Window of z = 0 covers z' in [max(lo, 0), min(hi, nz - 1)] = [0, min(hi, nz - 1)].
            for zz in range(0, min(hi, nz - 1) + 1):
                for a in range(x0, x1 + 1):
                    for b in range(y0, y1 + 1):
                        hist[cls[a, b, zz]] += 1
            out[x, y, 0] = _argmax_first(hist)
            # Slide along z: the plane z + hi enters, the plane z + lo - 1 leaves.
            for z in range(1, nz):
                z_in = z + hi
                if z_in < nz:
                    for a in range(x0, x1 + 1):
                        for b in range(y0, y1 + 1):
                            hist[cls[a, b, z_in]] += 1
                z_out = z + lo - 1
                if z_out >= 0:
                    for a in range(x0, x1 + 1):
                        for b in range(y0, y1 + 1):
                            hist[cls[a, b, z_out]] -= 1
                out[x, y, z] = _argmax_first(hist)


@numba.njit(parallel=True, cache=True, nogil=True)
def _mode_pool_packed_kernel(cls, lo, hi, bits, n_classes, out, s):  # pragma: no cover
    # Counts of all classes packed into one uint64 per voxel, ``bits`` bits per class
    # (n_classes * bits <= 64, bits <= 16, and bits holds window**3): a voxel of class k is
    # the word 1 << (bits * k), and the per-class window counts are a plain separable box sum
    # of these words (no subtractions). Fields never carry: every partial sum of a field is a
    # count of at most window**3 < 2**bits.
    nx, ny, nz = cls.shape
    one = np.uint64(1)
    ubits = np.uint64(bits)
    mask = (one << ubits) - one
    # Pass 1 (parallel over x): box sums along z, then along y, into s[x].
    for x in prange(nx):
        p = np.empty(nz, dtype=np.uint64)
        t = np.empty((ny, nz), dtype=np.uint64)
        for y in range(ny):
            for z in range(nz):
                p[z] = one << (ubits * np.uint64(cls[x, y, z]))
            for z in range(nz):
                t[y, z] = 0
            for d in range(lo, hi + 1):
                for z in range(max(0, -d), min(nz, nz - d)):
                    t[y, z] += p[z + d]
        for y in range(ny):
            for z in range(nz):
                s[x, y, z] = 0
            for d in range(lo, hi + 1):
                yy = y + d
                if 0 <= yy < ny:
                    for z in range(nz):
                        s[x, y, z] += t[yy, z]
    # Pass 2 (parallel over x): box sum along x, then the first argmax of the packed fields.
    for x in prange(nx):
        acc = np.empty(nz, dtype=np.uint64)
        best = np.empty(nz, dtype=np.int32)
        for y in range(ny):
            for z in range(nz):
                acc[z] = 0
            for d in range(lo, hi + 1):
                xx = x + d
                if 0 <= xx < nx:
                    for z in range(nz):
                        acc[z] += s[xx, y, z]
            # First argmax over the fields as a max over keys (count << 8) | (255 - k):
            # the highest count wins, and among equal counts the lowest k. Branch-free, so
            # the loop over z vectorises.
            for z in range(nz):
                best[z] = (np.int32(acc[z] & mask) << 8) | 255
            for k in range(1, n_classes):
                sh = ubits * np.uint64(k)
                low_k = np.int32(255 - k)
                for z in range(nz):
                    key = (np.int32((acc[z] >> sh) & mask) << 8) | low_k
                    best[z] = max(best[z], key)
            for z in range(nz):
                out[x, y, z] = np.uint8(255 - (best[z] & 255))


def mode_pool3d(classes: np.ndarray, window: int, n_classes: int) -> np.ndarray:
    """Stride-1 3D mode filter of a class volume ('same' output shape).

    For every voxel, the most common class id among the voxels of its
    ``window x window x window`` neighbourhood; ties go to the lower class id.

    Boundary rule: along each axis the neighbourhood of index ``i`` is
    ``i + lo .. i + hi`` (inclusive) with ``(lo, hi) = window_offsets(window)``, i.e.
    ``-(window//2) .. (window-1)//2``: window 3 is centred (-1..+1); window 2 covers the voxel
    and its backward neighbour (-1..0), as the paper's reference code (zero padding before).
    Neighbours outside the volume are not counted (equivalently: zero-padding of a one-hot
    encoding, where padded voxels vote for no class). Every window holds the voxel itself.

    Parameters
    ----------
    classes : 3-D integer array of class ids in ``[0, n_classes)`` (uint8 preferred; other
        integer dtypes and non-contiguous arrays are copied).
    window : positive int (the paper uses 2 for training volumes, 3 for test volumes).
    n_classes : number of classes, 1..256.

    Returns
    -------
    uint8 array of ``classes.shape``.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
        raise ValueError(f"n_classes must be an integer, got {n_classes!r}")
    if not 1 <= n_classes <= 256:
        raise ValueError(f"n_classes must be in [1, 256], got {n_classes}")
    classes = np.asarray(classes)
    if classes.ndim != 3:
        raise ValueError(f"classes must be a 3-D array, got shape {classes.shape}")
    if not (np.issubdtype(classes.dtype, np.integer) or classes.dtype == np.bool_):
        raise ValueError(f"classes must hold integer class ids, got dtype {classes.dtype}")
    out = np.empty(classes.shape, dtype=np.uint8)
    if classes.size == 0:
        return out
    # Range check: an out-of-range id would index past the histogram.
    if classes.dtype != np.uint8 and classes.min() < 0:
        raise ValueError("class ids must be >= 0")
    if int(classes.max()) >= n_classes:
        raise ValueError(f"class ids must be < n_classes={n_classes}, got {int(classes.max())}")
    cls = np.ascontiguousarray(classes, dtype=np.uint8)
    lo, hi = window_offsets(int(window))
    bits = (int(window) ** 3).bit_length()
    if bits * n_classes <= 64 and bits <= 16:
        scratch = np.empty(cls.shape, dtype=np.uint64)
        _mode_pool_packed_kernel(cls, lo, hi, bits, int(n_classes), out, scratch)
    else:
        _mode_pool_kernel(cls, lo, hi, int(n_classes), out)
    return out
