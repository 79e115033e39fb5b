"""Affine registration of a skull-stripped scan to the MNI152 brain (`pip install 'ifad-fast[register]'`).

`register(data, affine)` returns M, a 4x4 float64 world-to-world matrix (scan world mm -> MNI world
mm, RAS+). The frame then places the scan by the affine `M @ affine` (`registered_affine`): the
model grid is laid out in MNI space, and the frame's one resampling (model voxel -> MNI world ->
scan voxel) and the one back (`Placement.to_native`) are unchanged, so the maps come back on the
scan's own grid, written with its own affine and header (never resampled twice).

The fixed image is the MNI152 2009c T1 template (nilearn's wheel, read offline; its brain, as
`synth._load_mni152` masks it) block-averaged to TEMPLATE_MM voxels; the moving image is the scan.
The metric is Mattes mutual information (any contrast: our scans are T2-like, the template T1),
sampled on the template's brain. The search is SimpleITK's: the brains' centres of mass and
volumes give the start (shift, one scale), then a similarity transform (rotation, scale, shift)
and a full affine (12 dof) are each fitted over a coarse pyramid (LEVELS): a few seconds on two
CPU cores.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

import numpy as np

from .errors import IfadError

TEMPLATE_MM = 2                               # the fixed image's voxel size (block average of the 1 mm template)
LEVELS = ((2, 2.0), (1, 1.0))                 # (shrink factor of the 2 mm template, smoothing sigma in mm)
SAMPLING = 0.1                                # share of the 2 mm template's brain voxels the metric reads (the
                                              # same number at a coarser level: a smooth metric where steps are large)
BINS = 32                                     # Mattes histogram bins
STEP = 4.0                                    # first step of the regular-step gradient descent (physical shift scales)
ITERATIONS = 100                              # gradient steps per level, at most
THREADS = 1                                   # ITK's threads: more sum the metric in a varying order (not reproducible)
INSTALL = "pip install 'ifad-fast[register]'"
_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"   # in nilearn/datasets/data


def require_simpleitk():
    """The SimpleITK module, or a one-line IfadError naming the extra (imported lazily: registration
    is optional)."""
    try:
        return importlib.import_module("SimpleITK")
    except ImportError:
        raise IfadError(f"registration (--register) needs SimpleITK: {INSTALL}") from None


def _image(sitk, data: np.ndarray, affine: np.ndarray):
    """An (X, Y, Z) array and its voxel -> world affine as a SimpleITK image whose physical space is
    that world (RAS mm as it is: the template and the scan share the convention, so no LPS flip).
    Spacing: the affine's column norms; direction: its unit columns."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    return image


@functools.lru_cache(maxsize=1)
def template() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 brain at TEMPLATE_MM voxels: float32 (X, Y, Z) in [0, 1] (0 outside the brain:
    T1 / max > 0.2, synth's mask) and its float64 4x4 affine (MNI world mm)."""
    import nibabel as nib

    from .extras import require

    path = Path(list(require("nilearn").submodule_search_locations or ["."])[0]) / "datasets" / "data" / _T1
    if path.is_file():
        img = nib.load(str(path))
    else:  # pragma: no cover - other nilearn layouts
        from nilearn import datasets
        img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(img.get_fdata(dtype=np.float32))
    t1 = t1 / t1.max()
    t1 = t1 * (t1 > 0.2)
    k = TEMPLATE_MM
    x, y, z = (s // k for s in t1.shape)
    blocks = t1[:x * k, :y * k, :z * k].reshape(x, k, y, k, z, k).mean((1, 3, 5), dtype=np.float64)
    shrink = np.diag([k, k, k, 1.0])
    shrink[:3, 3] = (k - 1) / 2.0                  # a block's centre, in 1 mm voxels
    return blocks.astype(np.float32), np.asarray(img.affine, dtype=np.float64) @ shrink


def _block_mean(data: np.ndarray, affine: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The scan averaged over blocks of f_i voxels along axis i, f_i = round(voxel_mm / its voxel
    size) (at least 1): float32 and its affine, the blocks' centres. Anti-aliased and small, so the
    registration pyramid's smoothing and shrinking of the moving image cost little."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    f = np.maximum(1, np.round(voxel_mm / spacing)).astype(int)
    if (f == 1).all():
        return data, affine
    n = [s // k for s, k in zip(data.shape, f)]
    cut = data[:n[0] * f[0], :n[1] * f[1], :n[2] * f[2]]
    out = cut.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean((1, 3, 5), dtype=np.float64).astype(np.float32)
    shrink = np.diag([*f, 1.0])
    shrink[:3, 3] = (f - 1) / 2.0
    return out, affine @ shrink


def _centre_and_volume(brain: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
    """World centre of mass (3,) of a bool mask and its volume in mm³."""
    idx = np.argwhere(brain)
    if len(idx) == 0:
        raise IfadError("the scan has no non-zero (brain) voxels; pass a skull-stripped scan")
    centre = affine[:3, :3] @ idx.mean(0) + affine[:3, 3]
    return centre, len(idx) * abs(float(np.linalg.det(affine[:3, :3])))


def _matrix(transform) -> np.ndarray:
    """A SimpleITK matrix-offset transform (x -> A (x - c) + c + t) as a 4x4 float64."""
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), dtype=np.float64)
    t = np.asarray(transform.GetTranslation(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = c + t - a @ c
    return out


def _fit(sitk, fixed, moving, mask, transform, seed: int):
    """One stage: Mattes MI on a seeded random sample of the fixed mask's voxels (as many at every
    level), regular-step gradient descent over LEVELS; returns the fitted transform (fixed world ->
    moving world), the same for the same inputs (one thread)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=BINS)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel([min(1.0, SAMPLING * s ** 3) for s, _ in LEVELS], seed)
    reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=STEP, minStep=1e-3, numberOfIterations=ITERATIONS,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([s for s, _ in LEVELS])
    reg.SetSmoothingSigmasPerLevel([s for _, s in LEVELS])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return transform


def register(data, affine) -> np.ndarray:
    """The affine M (4x4 float64) taking the scan's world (mm) to MNI152 world (mm).

    data: skull-stripped (X, Y, Z) array (background 0, any contrast) or tensor (copied to the
    host); affine: its 4x4 voxel -> world matrix. Deterministic (a fixed sampling seed).
    """
    sitk = require_simpleitk()
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    data = np.asarray(data, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    tpl, tpl_affine = template()
    (c_tpl, v_tpl), (c_scan, v_scan) = _centre_and_volume(tpl > 0, tpl_affine), _centre_and_volume(data != 0, affine)
    fixed, moving = _image(sitk, tpl, tpl_affine), _image(sitk, *_block_mean(data, affine, TEMPLATE_MM))
    mask = _image(sitk, (tpl > 0).astype(np.uint8), tpl_affine)
    start = sitk.Similarity3DTransform()
    start.SetCenter(c_tpl.tolist())
    start.SetTranslation((c_scan - c_tpl).tolist())
    start.SetScale((v_scan / v_tpl) ** (1 / 3))
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)      # ITK's metric threads are created from it
    try:
        similarity = _fit(sitk, fixed, moving, mask, start, seed=1)
        full = sitk.AffineTransform(3)
        full.SetCenter(similarity.GetCenter())
        full.SetMatrix(similarity.GetMatrix())
        full.SetTranslation(similarity.GetTranslation())
        full = _fit(sitk, fixed, moving, mask, full, seed=2)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return np.linalg.inv(_matrix(full))


def registered_affine(data, affine) -> np.ndarray:
    """The scan's voxel -> MNI world affine, `register(data, affine) @ affine` (4x4 float64)."""
    return register(data, affine) @ np.asarray(affine, dtype=np.float64)


def registration_of(native_affine: np.ndarray, scan_affine: np.ndarray) -> list | None:
    """The registration a placement used, M = native_affine @ scan_affine⁻¹ (scan world -> MNI world mm) as a
    4x4 nested list for JSON, or None when the scan was placed by its own affine (not registered)."""
    if np.array_equal(native_affine, scan_affine):
        return None
    return (np.asarray(native_affine, dtype=np.float64) @ np.linalg.inv(scan_affine)).tolist()
