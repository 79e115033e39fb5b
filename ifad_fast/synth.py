"""Offline synthetic T2-weighted brains, healthy and with lesions (glioma-like, MS-like or stroke-like).

Built from the MNI152 (2009) template tissue maps that ship inside nilearn's wheel, so
nothing is downloaded. Each subject is the template anatomy, varied and re-imaged:

* anatomy: head size (isotropic scale 0.91-1.09, brain volume ×0.75-1.30, times a per-axis
  ±3 % shape), ventricle enlargement (a smooth pull of up to 8 mm toward the lateral
  ventricles), cortical atrophy (up to 85 % of the outer grey matter next to CSF, reaching
  15-35 mm deep, turned into CSF), a few small white-matter hyperintensities, and for lesion
  cases the mass effect of the tumour;
* pose: head tilt (rotation up to ±15° pitch, ±8° roll, ±10° yaw), shift ±8 mm in the field
  of view, and a smooth elastic deformation (a coarse random displacement field,
  cubic-spline interpolated);
* contrast: per-subject T2 intensities (CSF > GM > WM), partial volume from the tissue maps;
* lesion (glioma-like): oedema spreading preferentially along white matter around a solid or
  necrotic core, 1.5-9 % of the brain volume, with its binary mask (oedema + core);
* or, with `kind` (`generate_lesion(..., kind=)`, `ifad-fast synth --lesion-kind`), another lesion
  in the same subject, with no mass effect. `ms`: 5-20 T2-hyperintense ovoid plaques with soft
  edges (a 1-2 mm ramp, at least a voxel), 3-18 mm long axis (juxtacortical ones up to 9 mm),
  sized together to a total of 0.2-0.8 % of the brain (log-uniform; at least one plaque per 0.04 %),
  40-80 % of them periventricular (elongated, the long axis along the outward normal of the
  lateral ventricles, the inner tip 0-3 mm from them: Dawson's fingers), the rest in deep white
  matter or at the grey-white junction (juxtacortical), each 25-75 % of the way from GM to CSF
  intensity; mask = the union of the plaques less CSF. `stroke`: a territorial infarct, a cone
  from a deep apex through the white and grey matter of one hemisphere out to the cortex, in
  one of four vascular-like territories (MCA superior or inferior division, ACA, PCA), 1-6 % of
  the brain (log-uniform), 25-60 % of the way from GM to CSF intensity; mask = the infarct's
  grey and white matter;
* acquisition: a smooth multiplicative bias field (2nd-order polynomial in the log), Rician
  noise at a random SNR, skull-stripped (zero outside the deformed brain mask) and sampled
  on an MNI-aligned grid of `voxel_mm` isotropic voxels (121 x 145 x 121 at 1.5 mm).

`anatomy="mni"` (the default) is the above: every subject has the template's smooth, averaged
cortex. `anatomy="folded"` (opt-in; `ifad-fast synth --anatomy folded`) gives each subject,
on top of all the above, an individual cortex and hemispheric asymmetry:

* cortical folding: in the cortical ribbon (fading out 20-30 mm below the brain surface and
  within 6-12 mm of the lateral ventricles, so deep structures and the ventricles stay put)
  the template's GM/CSF and GM/WM edges are sharpened (gain 2.5 about 0.5), then both
  surfaces are moved along the cortex's outward normal: sulci open as CSF clefts along the
  zero set of band-limited noise (a spectral shell at half over the gyral width, 4-8 mm
  sulcus to sulcus), 2-4 mm wide at the surface, 3-8 mm deep, U-shaped, the white surface
  following them down 2.5 mm wider so grey matter lines their walls; plus a shift of the
  whole surface (sd 0.5-1.5 mm, 2.5x the gyral scale) and of the cortical thickness (sd
  0.3-0.8 mm, 25 mm scale). The brain mask is not moved, so new sulci fill with CSF;
* asymmetry: petalia, the right frontal pole pushed forward and the left occipital pole
  backward by -1 to 4 mm each (ramped in from the brain's centre, crossing over within a few
  mm of the midline), and a right/left ratio of the ventricle pull of 0.7-1.4 (log-uniform).

Every case is a pure function of (set, index, seed, voxel size, anatomy, lesion kind): the stream of
healthy subject i is `SeedSequence([seed, 0, i])` and that of lesion case j
`SeedSequence([seed, 1, j])`, so the two sets never share a stream and the same arguments give
bit-identical output. The folded anatomy draws its parameters and noise from a stream of its
own, `SeedSequence([seed, set, index, 3])`, so a folded subject has the pose, size, contrast,
ventricles, atrophy and lesion of its mni twin, and `mni` output is what it was before
`anatomy` existed. Lesion kinds other than `glioma` draw their lesion from a stream of their
own, `SeedSequence([seed, 1, index, K])` (K = 4 for ms, 5 for stroke), and everything else from
the main stream exactly as their glioma twin does (the glioma's draws are made and left unused;
the image box is the twin's), so ms and stroke cases are the glioma case's subject, pose,
contrast, bias field and noise (its sd follows the mean brain intensity) without the glioma and
its mass effect (which also moves the twin's small white-matter spots), ms and stroke the same
brain exactly, and `glioma` output is what it was before `kind` existed.
Generator version 2 (wider head size, tilt, ventricle and atrophy ranges) draws different
subjects from the same seeds than version 1 did: images made by version 1 are not reproduced.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .config import SYNTH_ANATOMIES
from .errors import IfadError

__all__ = [
    "SynthCase",
    "acquisition_grid",
    "generate_healthy",
    "generate_lesion",
    "mni_reference",
    "write_set",
    "LESION_KINDS",
    "TISSUE_LABELS",
]

#: The kinds of lesion `generate_lesion` draws.
LESION_KINDS = ("glioma", "ms", "stroke")
#: Labels of `SynthCase.tissue`.
TISSUE_LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}

# Acquisition field of view in MNI millimetres (the standard MNI152 box: 181 x 217 x 181 at 1 mm).
_FOV_LO = np.array([-90.0, -126.0, -72.0])
_FOV_HI = np.array([90.0, 90.0, 108.0])
_VOXEL_RANGE = (0.75, 8.0)
_INTENSITY_SCALE = 1000.0   # relative intensities are multiplied by this
_FLOOR = 0.02               # relative floor of brain intensities (zero means background downstream)
_HEALTHY_STREAM, _LESION_STREAM, _REFERENCE = 0, 1, -1
_VERSION = 2                # bump when the generator's output changes for the same arguments
_GENERATOR = "ifad_fast.synth"
_MANIFEST = "manifest.json"

# Anatomical variety drawn per subject (version 2 widened all of these, so that a voxel-wise
# baseline cannot win by the subjects' alignment alone):
_TILT_DEG = np.array([15.0, 8.0, 10.0])  # ± rotation about x (pitch), y (roll), z (yaw)
_HEAD_SCALE = (0.91, 1.09)               # isotropic head size, log-uniform (brain volume ×0.75-1.30)
_ANISO = 0.03                            # ± per-axis shape on top of the head size
_SHIFT_MM = 8.0                          # ± position in the MNI field of view, per axis
_VENTRICLE_MM = 8.0                      # pull toward the lateral ventricles (85 % of subjects 0-8 mm)
_ATROPHY = 0.85                          # largest share of outer cortex turned into CSF
_ATROPHY_DEPTH_MM = (15.0, 35.0)         # how deep below the surface atrophy reaches

# The `folded` anatomy (drawn from its own stream, SeedSequence([seed, set, index, 3])):
_FOLD_STREAM = 3
_GYRAL_WIDTH_MM = (4.0, 8.0)             # sulcus to sulcus: half the dominant wavelength of the pattern
_SULCAL_DEPTH_MM = (3.0, 8.0)            # how far a sulcus cuts in below the template's surface
_SULCAL_WIDTH_MM = (2.0, 4.0)            # opening of a sulcus at the surface
_PIAL_SHIFT_MM = (0.5, 1.5)              # sd of the surface's shift at 2.5x the gyral scale
_THICKNESS_MM = (0.3, 0.8)               # sd of the cortical thickness change at a 25 mm scale
_PETALIA_MM = (-1.0, 4.0)                # right frontal / left occipital protrusion
_VENTRICLE_RATIO = (0.7, 1.4)            # right/left ventricle pull, log-uniform
_GM_LINING_MM = 2.5                      # grey matter lining the walls of a sulcus
_SHARPEN = 2.5                           # contrast gain on the template's GM/CSF and GM/WM edges
_RIBBON_DEPTH_MM = (20.0, 30.0)          # folding fades out between these depths below the surface
_RIBBON_VENTRICLE_MM = (6.0, 12.0)       # ... and fades in between these distances from the ventricles
# The `aged` anatomy: the folded one with sulci and ventricles past every range above (a held-out
# family: no training set draws it); each range is the folded draw's mapped linearly onto these.
_AGED_SULCAL_WIDTH_MM = (4.0, 7.0)
_AGED_SULCAL_DEPTH_MM = (6.0, 12.0)
_AGED_VENTRICLE_MM = (9.0, 13.0)
# Lesion kinds other than the glioma (each drawn from its own stream, SeedSequence([seed, 1, index, K])):
_KIND_STREAM = {"ms": 4, "stroke": 5}
_GLIOMA_KEYS = ("lesion_fraction_target", "core_share", "necrotic", "necrotic_share", "edema_int", "solid_int",
                "necrosis_int", "wm_preference", "mass_effect", "mass_decay")   # main-stream draws a glioma uses
_MS_PLAQUES = (5, 20)                    # number of plaques (inclusive)
_MS_FRACTION = (0.002, 0.008)            # target total volume over the brain's, log-uniform
_MS_FRACTION_PER_PLAQUE = 0.0004         # at least one plaque per this much of the target
_MS_LENGTH_MM = (3.0, 18.0)              # long axis of a plaque (sizes are scaled to the target, then clipped)
_MS_ASPECT = ((0.35, 0.65), (0.6, 0.95)) # short / long axis: periventricular (elongated), other plaques
_MS_PERIVENTRICULAR = (0.4, 0.8)         # share of plaques at the lateral ventricles
_MS_GAP_MM = (0.0, 3.0)                  # from a periventricular plaque's inner tip to the ventricle
_MS_EDGE_MM = (1.0, 2.0)                 # width of a plaque's soft edge (at least one voxel)
_MS_INTENSITY = (0.25, 0.75)             # plaque intensity: this far from GM to CSF intensity
_STROKE_FRACTION = (0.01, 0.06)          # infarct volume over the brain's, log-uniform
_STROKE_INTENSITY = (0.25, 0.6)          # infarct intensity: this far from GM to CSF intensity
# Vascular-like territories in the right hemisphere (template mm; mirrored for the left): the
# cone's apex (deep) and a point on the cortex its axis passes through, and how often each is drawn.
_TERRITORIES = {"MCA superior": ((24.0, 0.0, 12.0), (50.0, 10.0, 40.0), 0.35),
                "MCA inferior": ((28.0, -15.0, 5.0), (60.0, -40.0, 5.0), 0.3),
                "ACA": ((10.0, 15.0, 20.0), (8.0, 0.0, 70.0), 0.15),
                "PCA": ((20.0, -45.0, 5.0), (18.0, -95.0, 5.0), 0.2)}


@dataclass
class SynthCase:
    """One synthetic subject.

    image: float32 (X, Y, Z), zero outside the brain; mask: uint8 lesion mask (a glioma's oedema +
    core, MS plaques, an infarct) or None for healthy subjects; brain_mask: uint8; affine: 4x4
    voxel-to-world (MNI mm); tissue: uint8 label map (0 background, 1 CSF, 2 GM, 3 WM, 4 lesion);
    info: the subject's random parameters and measured results (JSON-serialisable; lesion cases:
    `lesion_kind`, `lesion_fraction`, and for ms `n_plaques`, `n_components`, `plaques`).
    """

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    brain_mask: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def lesion_fraction(self) -> float:
        """Lesion voxels over brain voxels (0.0 for healthy subjects)."""
        if self.mask is None:
            return 0.0
        return float(np.count_nonzero(self.mask)) / max(1, int(np.count_nonzero(self.brain_mask)))


# --------------------------------------------------------------------------------------------
# grid and templates


def _check_voxel(voxel_mm) -> float:
    try:
        v = float(voxel_mm)
    except (TypeError, ValueError):
        raise IfadError(f"voxel size {voxel_mm!r} is not a number; pass millimetres, e.g. 1.5") from None
    lo, hi = _VOXEL_RANGE
    if not (math.isfinite(v) and lo <= v <= hi):
        raise IfadError(f"voxel size {voxel_mm!r} mm is out of range; pass {lo} to {hi} mm (e.g. 1.5)")
    return v


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise IfadError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def acquisition_grid(voxel_mm: float = 1.5) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the output grid: MNI-aligned, `voxel_mm` isotropic voxels."""
    v = _check_voxel(voxel_mm)
    shape = tuple(int(math.floor((hi - lo) / v + 1e-6)) + 1 for lo, hi in zip(_FOV_LO, _FOV_HI))
    affine = np.eye(4)
    affine[:3, :3] *= v
    affine[:3, 3] = _FOV_LO
    return shape, affine


@dataclass(frozen=True)
class _Templates:
    fine: torch.Tensor          # (1, 3, I, J, K) float32 at 1 mm: GM, WM, brain mask
    origin: np.ndarray          # world mm of fine[..., 0, 0, 0]; axes along +x, +y, +z
    smooth: torch.Tensor        # (1, 6, i, j, k) float32 at 2 mm: smoothed CSF, depth (mm), brain mask,
                                # pull toward the lateral ventricles (3, max norm 1)
    smooth_step: float          # mm; smooth[..., 0, 0, 0] is at `origin`
    centres: np.ndarray         # (N, 3) candidate lesion centres (world mm): deep white matter
    brain_ml: float             # volume of the brain mask (mL)
    brain_centre: np.ndarray    # (3,) centre of mass of the brain mask (world mm)
    ventricles: np.ndarray      # (i, j, k) bool on the smooth grid: the lateral ventricles


_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, brain mask (1 mm) and affine, exactly as `nilearn.datasets.load_mni152_*(resolution=1)`
    return them (each map divided by its maximum; mask = T1 template / max > 0.2).

    The files are read straight from nilearn's package data with nibabel: importing
    `nilearn.datasets` costs seconds and these loaders only read and rescale the files.
    Falls back to nilearn's loaders where the files are not where this nilearn keeps them.
    """
    import nibabel as nib

    from .extras import require

    spec = require("nilearn")
    data_dir = Path(list(spec.submodule_search_locations or ["."])[0]) / "datasets" / "data"
    paths = {k: data_dir / f for k, f in _MNI_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        imgs = {k: nib.load(str(p)) for k, p in paths.items()}
        arrs = {}
        for k, img in imgs.items():
            a = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
            arrs[k] = a / a.max()
        affine = np.asarray(imgs["gm"].affine, dtype=np.float64)
        return arrs["gm"], arrs["wm"], arrs["t1"] > 0.2, affine
    from nilearn import datasets  # pragma: no cover - other nilearn layouts

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    gm = np.asarray(gm_img.get_fdata(dtype=np.float32))
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    return gm, wm, mask, np.asarray(gm_img.affine, dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _templates() -> _Templates:
    """Load the MNI152 maps once per process and derive the helper maps."""
    gm, wm, brain, aff = _load_mni152()
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise IfadError("unexpected MNI152 template orientation in this nilearn version")
    gm = np.clip(gm, 0.0, 1.0) * brain
    wm = np.clip(wm, 0.0, 1.0) * brain
    # crop to the brain with a margin
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - 6, 0)
    hi = np.minimum(idx.max(0) + 7, brain.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    gm, wm, brain = gm[sl], wm[sl], brain[sl]
    origin = aff[:3, 3] + lo
    maskf = brain.astype(np.float32)
    csf = np.clip(maskf - gm - wm, 0.0, 1.0)
    # smooth helper maps at 2 mm
    step = 2
    sub = (slice(None, None, step),) * 3
    csf_s = ndi.gaussian_filter(csf, 1.5, truncate=3.0)[sub]
    depth = ndi.distance_transform_edt(brain[sub], sampling=step).astype(np.float32)
    # lateral ventricles: the largest CSF component in a central box
    ii, jj, kk = (np.arange(n, dtype=np.float64) + o for n, o in zip(brain.shape, origin))
    box = ((np.abs(ii) < 32)[:, None, None] & ((jj > -60) & (jj < 40))[None, :, None]
           & ((kk > -10) & (kk < 40))[None, None, :])
    lab, n = ndi.label(((csf > 0.5) & box)[sub])
    sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    vent = (lab == 1 + int(np.argmax(sizes))).astype(np.float32)
    vent_s = ndi.gaussian_filter(vent, 5.0 / step, truncate=3.0)
    grad = np.stack(np.gradient(vent_s))
    grad = (grad / np.sqrt((grad ** 2).sum(0)).max()).astype(np.float32)
    # lesion centres: deep, supratentorial, off-midline white matter, away from the ventricles
    ii, jj, kk = (a[::step] for a in (ii, jj, kk))
    cand = (wm[sub] > 0.85) & (depth >= 18) & (vent_s < 0.05)
    cand &= (np.abs(ii) >= 10)[:, None, None] & ((jj > -95) & (jj < 60))[None, :, None]
    cand &= ((kk > -15) & (kk < 60))[None, None, :]
    centres = np.argwhere(cand) * step + origin
    smooth = np.concatenate([csf_s[None], depth[None], maskf[sub][None], grad])
    return _Templates(
        fine=torch.from_numpy(np.ascontiguousarray(np.stack([gm, wm, maskf])[None])),
        origin=origin,
        smooth=torch.from_numpy(np.ascontiguousarray(smooth[None])),
        smooth_step=float(step),
        centres=centres.astype(np.float64),
        brain_ml=float(brain.sum()) * float(abs(np.linalg.det(aff[:3, :3]))) / 1000.0,
        brain_centre=np.argwhere(brain).mean(0) + origin,
        ventricles=vent > 0,
    )


@functools.lru_cache(maxsize=4)
def _fine_maps(voxel_mm: float) -> torch.Tensor:
    """The 1 mm GM, WM and mask maps blurred for `voxel_mm` voxels: a voxel integrates over its
    width (box profile, variance v^2/12), the 1 mm maps already over 1 mm; the difference is
    made up with a Gaussian of variance (v^2 - 1)/12 mm^2."""
    tpl = _templates()
    var = (voxel_mm ** 2 - 1.0) / 12.0
    if var <= 0.01:
        return tpl.fine
    sigma = math.sqrt(var)
    maps = tpl.fine[0].numpy()
    out = np.stack([ndi.gaussian_filter(m, sigma, truncate=3.0) for m in maps])
    return torch.from_numpy(out[None])


def _grid_coords(points: np.ndarray, origin: np.ndarray, step: float, shape) -> np.ndarray:
    """World mm (..., 3) -> grid_sample's normalised (..., 3) coordinates, (k, j, i) order."""
    size = np.asarray(shape, dtype=np.float64)
    nrm = (points - origin) / step / (size - 1) * 2.0 - 1.0
    return nrm[..., ::-1]


def _sample(vol: torch.Tensor, nrm: np.ndarray) -> np.ndarray:
    """Trilinear samples of vol (1, C, I, J, K) at normalised coords (a, b, c, 3) -> (C, a, b, c)."""
    grid = torch.from_numpy(np.ascontiguousarray(nrm, dtype=np.float32))[None]
    with torch.no_grad():
        out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].numpy()


def _spline_weights(lo: float, hi: float, n: int, q: np.ndarray) -> np.ndarray:
    """(len(q), n) weights of cubic-spline interpolation through n equispaced nodes on [lo, hi]."""
    from scipy.interpolate import make_interp_spline

    nodes = np.linspace(lo, hi, n)
    spl = make_interp_spline(nodes, np.eye(n), k=3)
    return spl(np.clip(q, lo, hi))


def _noise_on_grid(rng: np.random.Generator, nodes, shape) -> np.ndarray:
    """A smooth random field on a grid of `shape` spanning the node box: cubic spline through
    N(0, 1) node values, rescaled to unit standard deviation (float32)."""
    return _spline_field(_noise_nodes(rng, nodes), shape)


def _noise_nodes(rng: np.random.Generator, nodes) -> np.ndarray:
    """The N(0, 1) node values of `_noise_on_grid` (at least 4 per axis: cubic splines need 4)."""
    return rng.standard_normal(tuple(max(4, int(n)) for n in nodes))


def _spline_field(lr: np.ndarray, shape) -> np.ndarray:
    """Node values (a, b, c) -> a field of `shape` spanning them (cubic spline), unit sd, float32."""
    out = lr
    for axis, m in enumerate(shape):
        w = _spline_weights(0.0, 1.0, lr.shape[axis], np.linspace(0.0, 1.0, m))
        out = np.moveaxis(np.tensordot(out, w, axes=([axis], [1])), -1, axis)
    out = out.astype(np.float32)
    return out / max(float(out.std()), 1e-6)


class _Spline3:
    """A random 3-vector field: cubic-spline interpolation of N(0, amp^2) values on a node grid
    spanning the box [lo, hi]. Evaluated on tensor-product grids with separable weight matrices."""

    def __init__(self, rng: np.random.Generator, lo, hi, spacing_mm: float, amp: float):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.hi = np.asarray(hi, dtype=np.float64)
        self.n = np.maximum(np.ceil((self.hi - self.lo) / spacing_mm).astype(int) + 1, 4)
        self.ctrl = rng.standard_normal((3, *self.n)) * amp

    def _weights(self, axis: int, q: np.ndarray) -> np.ndarray:
        return _spline_weights(self.lo[axis], self.hi[axis], int(self.n[axis]), q)

    def on_grid(self, xs, ys, zs) -> np.ndarray:
        """Field (3, len(xs), len(ys), len(zs)) at the tensor grid of axis coordinates (mm)."""
        wx, wy, wz = (self._weights(a, np.atleast_1d(np.asarray(q, dtype=np.float64)))
                      for a, q in enumerate((xs, ys, zs)))
        out = np.tensordot(self.ctrl, wx, axes=([1], [1]))      # (3, ny, nz, X)
        out = np.tensordot(out, wy, axes=([1], [1]))            # (3, nz, X, Y)
        out = np.tensordot(out, wz, axes=([1], [1]))            # (3, X, Y, Z)
        return out

    def at(self, point) -> np.ndarray:
        return self.on_grid(*([c] for c in point))[:, 0, 0, 0]


# --------------------------------------------------------------------------------------------
# random helpers


def _rng(stream: int, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index)]))


def _rotation(angles_rad) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _upsample(field_lr: np.ndarray, shape) -> np.ndarray:
    """Trilinear upsampling (corners aligned) of a (C, a, b, c) or (a, b, c) array to `shape`."""
    arr = np.asarray(field_lr, dtype=np.float32)
    squeeze = arr.ndim == 3
    t = torch.from_numpy(np.ascontiguousarray(arr[None] if squeeze else arr))[None]
    out = F.interpolate(t, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)[0]
    out = out.numpy()
    return out[0] if squeeze else out


def _topk_mask(score: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """The `k` highest-scoring voxels of `valid` (ties broken by np.partition, deterministic)."""
    vals = score[valid]
    k = int(min(max(k, 1), vals.size))
    thr = np.partition(vals, vals.size - k)[vals.size - k]
    return valid & (score >= thr)


# --------------------------------------------------------------------------------------------
# the generator


def _draw_params(rng: np.random.Generator, lesion: bool, reference: bool = False) -> dict:
    """The subject's scalar random parameters, drawn in a fixed order."""
    if reference:
        return dict(rot_deg=[0.0] * 3, head_scale=1.0, scale=[1.0] * 3, shift_mm=[0.0] * 3, elastic_mm=0.0,
                    ventricle_mm=0.0, atrophy=0.0, atrophy_depth_mm=25.0, c_csf=0.92, c_gm=0.52, c_wm=0.31,
                    n_wm_spots=0, bias_sd=0.0, snr=None, texture=0.0)
    p = {}
    p["rot_deg"] = (rng.uniform(-1.0, 1.0, 3) * _TILT_DEG).tolist()
    p["head_scale"] = float(math.exp(rng.uniform(*np.log(_HEAD_SCALE))))
    p["scale"] = (p["head_scale"] * rng.uniform(1.0 - _ANISO, 1.0 + _ANISO, 3)).tolist()
    p["shift_mm"] = rng.uniform(-_SHIFT_MM, _SHIFT_MM, 3).tolist()
    p["elastic_mm"] = float(rng.uniform(1.0, 2.5))
    p["ventricle_mm"] = float(rng.uniform(0.0, _VENTRICLE_MM) if rng.random() < 0.85 else rng.uniform(0.0, 1.0))
    p["atrophy"] = float(rng.uniform(0.0, _ATROPHY))
    p["atrophy_depth_mm"] = float(rng.uniform(*_ATROPHY_DEPTH_MM))
    p["c_csf"] = float(rng.uniform(0.85, 1.0))
    p["c_gm"] = float(rng.uniform(0.45, 0.60))
    p["c_wm"] = float(rng.uniform(0.25, 0.38))
    p["n_wm_spots"] = int(rng.integers(2, 7))
    p["bias_sd"] = float(rng.uniform(0.03, 0.10))
    p["snr"] = float(rng.uniform(15.0, 40.0))
    p["texture"] = float(rng.uniform(0.01, 0.03))
    if lesion:
        p["lesion_fraction_target"] = float(math.exp(rng.uniform(math.log(0.015), math.log(0.09))))
        p["core_share"] = float(rng.uniform(0.15, 0.5))
        p["necrotic"] = bool(rng.random() < 0.55)
        p["necrotic_share"] = float(rng.uniform(0.3, 0.6))
        p["edema_int"] = float(rng.uniform(0.70, 0.86))
        p["solid_int"] = float(rng.uniform(0.50, 0.66))
        p["necrosis_int"] = float(rng.uniform(0.85, 1.0))
        p["wm_preference"] = float(rng.uniform(0.5, 1.0))
        p["mass_effect"] = float(rng.uniform(0.3, 0.6))
        p["mass_decay"] = float(rng.uniform(0.8, 1.5))
    return p


@dataclass(frozen=True)
class _Grid:
    """The output grid (`shape`, MNI-aligned `affine`, `v` mm voxels) and the coarse lattice of
    the pull-back map: nodes every `step` voxels from voxel 0 (the last node may lie past the
    grid), so that a block of nodes upsamples exactly onto the voxels it spans."""

    shape: tuple
    affine: np.ndarray
    v: float
    step: int
    n_nodes: tuple

    @classmethod
    def make(cls, v: float) -> "_Grid":
        shape, affine = acquisition_grid(v)
        step = max(1, int(round(3.0 / v)))
        return cls(shape, affine, v, step, tuple(int(math.ceil((n - 1) / step)) + 1 for n in shape))

    def node_axes(self) -> list[np.ndarray]:
        """World mm of the nodes along each axis."""
        return [np.arange(m) * self.step * self.v + o for m, o in zip(self.n_nodes, self.affine[:3, 3])]


@dataclass(frozen=True)
class _Pose:
    """x (output world) = c0 + t + A (u - c0), u in subject-anatomy space, A = R S."""

    c0: np.ndarray
    A: np.ndarray
    t: np.ndarray

    @classmethod
    def from_params(cls, p: dict, tpl: _Templates) -> "_Pose":
        A = _rotation(np.deg2rad(p["rot_deg"])) @ np.diag(p["scale"])
        return cls(tpl.brain_centre, A, np.asarray(p["shift_mm"], dtype=np.float64))

    def forward(self, u: np.ndarray) -> np.ndarray:
        """Subject anatomy (..., 3) mm -> output world (..., 3) mm."""
        return self.c0 + self.t + (u - self.c0) @ self.A.T

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Output world (..., 3) mm -> subject anatomy (..., 3) mm."""
        return (x - self.c0 - self.t) @ np.linalg.inv(self.A).T + self.c0


@dataclass(frozen=True)
class _LesionGeometry:
    """Where the tumour sits and how far its mass effect reaches (all in mm)."""

    centre_u: np.ndarray    # in subject-anatomy space
    centre: np.ndarray      # in the output world
    radius: float           # of the sphere with the target lesion volume
    core_radius: float
    mass_mm: float          # largest displacement of the mass effect
    mass_decay_mm: float    # its e-folding length outside the core


@dataclass(frozen=True)
class _PullBack:
    """The pull-back map sampled at the coarse nodes (a, b, c)."""

    nrm: np.ndarray         # (3, a, b, c) float32 grid_sample coordinates into the 1 mm templates
    csf: np.ndarray         # (a, b, c) smoothed CSF share
    depth: np.ndarray       # (a, b, c) depth below the brain surface (mm)
    mask: np.ndarray        # (a, b, c) brain mask, linearly interpolated


@dataclass(frozen=True)
class _Crop:
    """The voxels of the coarse cells that touch the brain: nodes nlo..nhi (inclusive),
    voxels lo..hi (exclusive)."""

    nlo: np.ndarray
    nhi: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @property
    def slices(self) -> tuple:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    @property
    def shape(self) -> tuple:
        return tuple(int(b - a) for a, b in zip(self.lo, self.hi))

    def nodes(self, a: np.ndarray) -> np.ndarray:
        """The crop's nodes of a coarse (..., a, b, c) array."""
        return a[..., self.nlo[0]:self.nhi[0] + 1, self.nlo[1]:self.nhi[1] + 1, self.nlo[2]:self.nhi[2] + 1]

    def upsample(self, coarse: np.ndarray, step: int) -> np.ndarray:
        """(C, a, b, c) coarse nodes -> (C, *shape) voxels of the crop (trilinear)."""
        up = _upsample(self.nodes(coarse), (self.nhi - self.nlo) * step + 1)
        return up[:, :self.shape[0], :self.shape[1], :self.shape[2]]


@dataclass
class _Tissue:
    """Partial-volume tissue fractions (float32, crop shape) and the brain mask (bool)."""

    f_csf: np.ndarray
    f_gm: np.ndarray
    f_wm: np.ndarray
    brain: np.ndarray

    def labels(self) -> np.ndarray:
        """uint8 label map: the largest fraction (1 CSF, 2 GM, 3 WM), 0 outside the brain."""
        out = np.where(self.f_csf >= np.maximum(self.f_gm, self.f_wm), 1,
                       np.where(self.f_gm >= self.f_wm, 2, 3)).astype(np.uint8)
        out *= self.brain
        return out


def _lesion_geometry(rng: np.random.Generator, tpl: _Templates, p: dict, pose: _Pose,
                     elastic: _Spline3 | None, fold: dict | None = None) -> _LesionGeometry:
    """Tumour centre (a deep white-matter candidate, jittered) and size; drawn before the
    anatomy is sampled because its mass effect moves the anatomy."""
    k = int(rng.integers(len(tpl.centres)))
    c_t = tpl.centres[k] + rng.uniform(-1.0, 1.0, 3)
    c_u = c_t.copy()
    for _ in range(3):  # solve c_u + e(forward(c_u)) = c_t
        c_u = c_t - (elastic.at(pose.forward(c_u)) if elastic is not None else 0.0)
    if fold is not None:  # ... and through the petalia: petalia(c_u + e(forward(c_u))) = c_t
        for _ in range(3):
            e = elastic.at(pose.forward(c_u)) if elastic is not None else 0.0
            c_u = c_u + (c_t - _petalia(fold, c_u + e))
    lesion_ml = p["lesion_fraction_target"] * tpl.brain_ml * float(np.prod(p["scale"]))
    r_lesion = (3.0 * lesion_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    r_core = r_lesion * p["core_share"] ** (1.0 / 3.0)
    return _LesionGeometry(centre_u=c_u, centre=pose.forward(c_u), radius=r_lesion, core_radius=r_core,
                           mass_mm=min(p["mass_effect"] * r_core, 8.0), mass_decay_mm=p["mass_decay"] * r_core)


def _pull_back(tpl: _Templates, grid: _Grid, pose: _Pose, elastic: _Spline3 | None,
               lesion: _LesionGeometry | None, p: dict, fold: dict | None = None) -> _PullBack:
    """Output world -> template mm at the coarse nodes: inverse pose, mass effect, elastic
    displacement, (folded: petalia,) ventricle enlargement (folded: right/left in the ratio
    `ventricle_ratio`); then the smooth template maps sampled there."""
    coarse = grid.node_axes()
    x = np.stack(np.meshgrid(*coarse, indexing="ij"), -1)                  # (a, b, c, 3)
    u = pose.inverse(x)
    if lesion is not None:  # mass effect: sample closer to the tumour centre, pushing tissue outward
        d = u - lesion.centre_u
        r = np.sqrt((d ** 2).sum(-1))
        r_core = lesion.core_radius
        delta = np.where(r <= r_core, lesion.mass_mm * r / max(r_core, 1e-6),
                         lesion.mass_mm * np.exp(-(r - r_core) / max(lesion.mass_decay_mm, 1e-6)))
        u = u - d * (delta / np.maximum(r, 1e-6))[..., None]
    p0 = u if elastic is None else u + np.moveaxis(elastic.on_grid(*coarse), 0, -1)
    if fold is not None:
        p0 = _petalia(fold, p0)
    sm_shape = tpl.smooth.shape[2:]
    if p["ventricle_mm"] > 0:  # ventricle enlargement: pull toward the lateral ventricles
        g = _sample(tpl.smooth[:, 3:], _grid_coords(p0, tpl.origin, tpl.smooth_step, sm_shape))
        if fold is None:
            p0 = p0 + p["ventricle_mm"] * np.moveaxis(g, 0, -1)
        else:  # right/left pull ratio, crossing over at the midline
            side = np.exp(0.5 * math.log(fold["ventricle_ratio"]) * np.tanh(p0[..., 0] / 4.0))
            p0 = p0 + (p["ventricle_mm"] * side)[..., None] * np.moveaxis(g, 0, -1)
    csf_s, depth, mask = _sample(tpl.smooth[:, :3], _grid_coords(p0, tpl.origin, tpl.smooth_step, sm_shape))
    nrm = np.moveaxis(_grid_coords(p0, tpl.origin, 1.0, tpl.fine.shape[2:]), -1, 0).astype(np.float32)
    return _PullBack(nrm=nrm, csf=csf_s, depth=depth, mask=mask)


def _smooth_fields(rng: np.random.Generator, p: dict, pb: _PullBack, n_nodes) -> list[np.ndarray]:
    """Coarse (1, a, b, c) fields, smooth enough to upsample: the share of GM turned into CSF by
    cortical atrophy (regionally varying, outer cortex beside CSF) and the texture gain."""
    fields = []
    if p["atrophy"] > 0:
        region = np.clip(1.0 + 0.5 * _noise_on_grid(rng, (3, 4, 3), n_nodes), 0.0, 2.0)
        outer = np.clip(1.0 - pb.depth / p["atrophy_depth_mm"], 0.0, 1.0)
        fields.append(np.clip(p["atrophy"] * region * outer * np.clip(2.5 * pb.csf, 0.0, 1.0), 0.0, 0.9)[None])
    if p["texture"] > 0:
        fields.append((1.0 + p["texture"] * _noise_on_grid(rng, (6, 7, 6), n_nodes))[None])
    return fields


# --------------------------------------------------------------------------------------------
# the folded anatomy


def _check_anatomy(anatomy) -> str:
    if anatomy not in SYNTH_ANATOMIES:
        raise IfadError(f"unknown anatomy {anatomy!r}; pass one of {', '.join(SYNTH_ANATOMIES)}")
    return anatomy


def subject_anatomy(anatomy: str, index: int) -> str:
    """The anatomy subject `index` is drawn with: `mixed` alternates mni (even) and folded (odd)."""
    if _check_anatomy(anatomy) == "mixed":
        return "folded" if index % 2 else "mni"
    return anatomy


def _remap(x: float, lo: float, hi: float, to: tuple) -> float:
    """x in [lo, hi] mapped linearly onto [to[0], to[1]]."""
    return float(to[0] + (to[1] - to[0]) * min(max((x - lo) / (hi - lo), 0.0), 1.0))


def _aged(p: dict, fold: dict) -> tuple[dict, dict]:
    """The aged anatomy's parameters from the folded ones: wider, deeper sulci and larger ventricles."""
    fold = dict(fold, sulcal_width_mm=_remap(fold["sulcal_width_mm"], *_SULCAL_WIDTH_MM, _AGED_SULCAL_WIDTH_MM),
                sulcal_depth_mm=_remap(fold["sulcal_depth_mm"], *_SULCAL_DEPTH_MM, _AGED_SULCAL_DEPTH_MM))
    p = dict(p, ventricle_mm=_remap(p["ventricle_mm"], 0.0, _VENTRICLE_MM, _AGED_VENTRICLE_MM))
    return p, fold


def _draw_fold_params(rng: np.random.Generator) -> dict:
    """The folded anatomy's scalar parameters, drawn in a fixed order from its own stream."""
    p = {}
    p["gyral_width_mm"] = float(rng.uniform(*_GYRAL_WIDTH_MM))
    p["sulcal_depth_mm"] = float(rng.uniform(*_SULCAL_DEPTH_MM))
    p["sulcal_width_mm"] = float(rng.uniform(*_SULCAL_WIDTH_MM))
    p["pial_shift_mm"] = float(rng.uniform(*_PIAL_SHIFT_MM))
    p["thickness_mm"] = float(rng.uniform(*_THICKNESS_MM))
    p["petalia_frontal_mm"] = float(rng.uniform(*_PETALIA_MM))
    p["petalia_occipital_mm"] = float(rng.uniform(*_PETALIA_MM))
    p["ventricle_ratio"] = float(math.exp(rng.uniform(*np.log(_VENTRICLE_RATIO))))
    return p


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below lo, 1 above hi, linear in between."""
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


@dataclass(frozen=True)
class _FoldMaps:
    """Template maps of the folded anatomy. The fold grid has the smooth grid's node counts
    spread over the 1 mm maps' box (so the fine maps' grid_sample coordinates address it too)."""

    normal: np.ndarray      # (3, i, j, k) float32: outward normal of the cortex times the ribbon
                            # weight, in the fine maps' normalised units per mm, (k, j, i) order
    spacing: np.ndarray     # (3,) mm between fold-grid nodes along x, y, z (2 mm)
    tissue: np.ndarray      # (I, J, K) float32 at 1 mm: GM + WM, edges sharpened in the ribbon
    white: np.ndarray       # (I, J, K) float32 at 1 mm: WM, edges sharpened in the ribbon


@functools.lru_cache(maxsize=1)
def _fold_maps() -> _FoldMaps:
    """Derive the folded anatomy's template maps once per process."""
    tpl = _templates()
    gm, wm = (m.numpy() for m in tpl.fine[0, :2])
    fine_shape = np.asarray(gm.shape)
    shape = tuple(tpl.smooth.shape[2:])
    spacing = (fine_shape - 1) / (np.asarray(shape) - 1)
    tissue = gm + wm
    # the ribbon: within 20-30 mm of the brain surface, 6-12 mm away from the lateral ventricles
    depth = tpl.smooth[0, 1].numpy()
    to_vent = ndi.distance_transform_edt(~tpl.ventricles, sampling=spacing)
    ribbon = (1.0 - _ramp(depth, *_RIBBON_DEPTH_MM)) * _ramp(to_vent, *_RIBBON_VENTRICLE_MM)
    # outward normal: down the gradient of the smoothed tissue share, faded where it is flat
    t_lr = _upsample(tissue, shape)
    t_lr = ndi.gaussian_filter(t_lr, 3.0 / spacing, truncate=3.0)
    g = -np.stack(np.gradient(t_lr, *spacing))
    normal = g / np.sqrt((g ** 2).sum(0) + 0.03 ** 2) * ribbon
    normal = normal * (2.0 / (fine_shape - 1))[:, None, None, None]
    # sharpen the template's blurred edges in the ribbon (it is an average of 152 brains)
    rib = _upsample(ribbon.astype(np.float32), tuple(fine_shape))

    def sharpen(m):
        return m + rib * (np.clip(0.5 + _SHARPEN * (m - 0.5), 0.0, 1.0) - m)

    return _FoldMaps(normal=np.ascontiguousarray(normal[::-1], dtype=np.float32), spacing=spacing,
                     tissue=sharpen(tissue).astype(np.float32), white=sharpen(wm).astype(np.float32))


@functools.lru_cache(maxsize=4)
def _fold_fine(voxel_mm: float) -> torch.Tensor:
    """(1, 3, I, J, K) float32: the folded anatomy's 1 mm tissue and WM maps, blurred for
    `voxel_mm` voxels as `_fine_maps` blurs the template's, and the template's brain mask."""
    fm = _fold_maps()
    var = (voxel_mm ** 2 - 1.0) / 12.0
    maps = [fm.tissue, fm.white]
    if var > 0.01:
        maps = [ndi.gaussian_filter(m, math.sqrt(var), truncate=3.0) for m in maps]
    mask = _fine_maps(voxel_mm)[0, 2].numpy()
    return torch.from_numpy(np.stack([*maps, mask])[None])


@functools.lru_cache(maxsize=2)
def _frequencies(shape: tuple, spacing: tuple) -> tuple[tuple, np.ndarray]:
    """The FFT box for a field of `shape` (each side a fast length, >= shape) and its
    frequency magnitudes in cycles/mm, float32 (rfftn layout)."""
    import scipy.fft as sfft

    big = tuple(sfft.next_fast_len(int(n), real=True) for n in shape)
    k = np.meshgrid(*(sfft.fftfreq(n, d) for n, d in zip(big[:2], spacing[:2])),
                    sfft.rfftfreq(big[2], spacing[2]), indexing="ij")
    return big, np.sqrt(sum(a ** 2 for a in k)).astype(np.float32)


def _band_noise(rng: np.random.Generator, shape, spacing, k0: float) -> np.ndarray:
    """A random field (float32, `shape`, unit sd) whose spectrum is a shell at k0 cycles/mm
    (Gaussian profile, sd 0.25 k0): isotropic band-limited noise, periodic over a box a little
    larger than `shape` and cropped to it."""
    import scipy.fft as sfft

    big, kr = _frequencies(tuple(int(n) for n in shape), tuple(float(d) for d in spacing))
    gain = np.exp(np.float32(-0.5) * ((kr - np.float32(k0)) / np.float32(0.25 * k0)) ** 2)
    spec = rng.standard_normal((2, *kr.shape), dtype=np.float32)
    out = sfft.irfftn((spec[0] + np.complex64(1j) * spec[1]) * gain, s=big, workers=1)
    out = np.ascontiguousarray(out[:shape[0], :shape[1], :shape[2]], dtype=np.float32)
    return out / max(float(out.std()), 1e-12)


@dataclass(frozen=True)
class _Folding:
    """One subject's folding on the fold grid, applied per voxel by `sample`."""

    fields: torch.Tensor    # (1, 6, i, j, k) float32: sulcal pattern (unit sd), pial and white
                            # surface shifts (mm), ribbon-weighted outward normal (3)
    depth: float            # mm, sulcal depth
    w_sulcus: float         # |pattern| below which a sulcus opens
    w_lining: float         # |pattern| below which the white surface follows it down

    @classmethod
    def draw(cls, rng: np.random.Generator, fp: dict) -> "_Folding":
        fm = _fold_maps()
        shape = fm.normal.shape[1:]
        k0 = 0.5 / fp["gyral_width_mm"]
        grad = 2.0 * math.pi * k0   # about |grad pattern| where the pattern crosses zero
        pattern = _band_noise(rng, shape, fm.spacing, k0)
        pial = fp["pial_shift_mm"] * _band_noise(rng, shape, fm.spacing, k0 / 2.5)
        thick = fp["thickness_mm"] * _band_noise(rng, shape, fm.spacing, 1.0 / 25.0)
        fields = np.concatenate([pattern[None], pial[None], (pial + thick)[None], fm.normal])
        return cls(fields=torch.from_numpy(fields[None]), depth=fp["sulcal_depth_mm"],
                   w_sulcus=0.5 * fp["sulcal_width_mm"] * grad,
                   w_lining=(0.5 * fp["sulcal_width_mm"] + _GM_LINING_MM) * grad)

    def sample(self, voxel_mm: float, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """GM, WM and brain-mask fractions (each float32, q's shape less the last axis) at the
        fine maps' normalised coordinates q (..., 3): the brain mask where it is, the pial
        surface moved in along the normal by the sulcal cleft plus its shift, the white surface
        by the (wider) cleft plus its shift."""
        maps = _fold_fine(voxel_mm)
        tissue, wm, maskf = _sample(maps, q)
        brain = maskf > 0.0     # only here can folding change anything
        qb = np.ascontiguousarray(q[brain], dtype=np.float32)[:, None, None]       # (n, 1, 1, 3)
        pattern, pial, white, *normal = _sample(self.fields, qb)
        normal = np.stack(normal, -1)
        a = np.abs(pattern)
        # U-shaped clefts: full depth over the inner half of the opening
        pial += np.float32(self.depth) * np.clip(2.0 - 2.0 * a / np.float32(self.w_sulcus), 0.0, 1.0)
        white += np.float32(self.depth) * np.clip(2.0 - 2.0 * a / np.float32(self.w_lining), 0.0, 1.0)
        tissue[brain] = _sample(maps[:, :1], qb + pial[..., None] * normal)[0, :, 0, 0]
        wm[brain] = _sample(maps[:, 1:2], qb + white[..., None] * normal)[0, :, 0, 0]
        np.minimum(wm, tissue, out=wm)
        return tissue - wm, wm, maskf


def _petalia(fp: dict, p0: np.ndarray) -> np.ndarray:
    """Template mm (..., 3) -> the same with the right frontal pole pushed forward and the left
    occipital pole backward (by the petalia parameters at the poles, ramped in from the brain's
    centre; the hemispheres cross over within a few mm of the midline)."""
    tpl = _templates()
    x, y = p0[..., 0], p0[..., 1]
    right = 0.5 * (1.0 + np.tanh(x / 4.0))
    yc = tpl.brain_centre[1]
    front = _ramp(y, yc, 70.0) ** 2
    back = _ramp(-y, -yc, 105.0) ** 2
    shift = fp["petalia_frontal_mm"] * right * front - fp["petalia_occipital_mm"] * (1.0 - right) * back
    out = p0.copy()
    out[..., 1] -= shift   # pull-back: sample behind the point to push tissue forward
    return out


def _crop_box(grid: _Grid, mask: np.ndarray) -> _Crop:
    """The crop: the coarse cells that touch the brain, one node of margin."""
    occ = np.argwhere(mask > 0.0)
    nlo = np.maximum(occ.min(0) - 1, 0)
    nhi = np.minimum(occ.max(0) + 1, np.asarray(grid.n_nodes) - 1)
    lo = nlo * grid.step
    return _Crop(nlo=nlo, nhi=nhi, lo=lo, hi=np.minimum(nhi * grid.step + 1, grid.shape))


def _tissue(p: dict, grid: _Grid, crop: _Crop, pb: _PullBack, fields: list[np.ndarray],
            folding: _Folding | None = None) -> tuple[_Tissue, list]:
    """Sample the 1 mm GM/WM/mask maps through the pull-back (folded: through the subject's
    folding), normalise the fractions, apply atrophy. Returns the tissue and the remaining
    upsampled fields (texture)."""
    up = crop.upsample(np.concatenate([pb.nrm, *fields]), grid.step)
    if folding is None:
        gm, wm, maskf = _sample(_fine_maps(round(grid.v, 4)), np.moveaxis(up[:3], 0, -1))
    else:
        gm, wm, maskf = folding.sample(round(grid.v, 4), np.moveaxis(up[:3], 0, -1))
    rest = list(up[3:])
    del up
    csf = np.clip(maskf - gm - wm, 0.0, 1.0)
    inv = 1.0 / np.maximum(gm + wm + csf, np.float32(1e-3))
    t = _Tissue(f_csf=csf * inv, f_gm=gm * inv, f_wm=wm * inv, brain=maskf > 0.5)
    del gm, wm, csf, inv
    if p["atrophy"] > 0:
        conv = rest.pop(0) * t.f_gm
        t.f_gm -= conv
        t.f_csf += conv
    return t, rest


def _t2_image(p: dict, t: _Tissue, texture: list[np.ndarray]) -> np.ndarray:
    """T2 contrast (CSF > GM > WM) with partial volume and texture: float32, crop shape."""
    f32 = np.float32
    img = f32(p["c_csf"]) * t.f_csf + f32(p["c_gm"]) * t.f_gm + f32(p["c_wm"]) * t.f_wm
    if p["texture"] > 0:
        img *= texture.pop(0)
    return img


def _wm_spots(rng: np.random.Generator, p: dict, img: np.ndarray, t: _Tissue, pb: _PullBack,
              grid: _Grid, crop: _Crop) -> list[dict]:
    """Add small Gaussian white-matter hyperintensities to `img` in place; returns their record."""
    if not p["n_wm_spots"]:
        return []
    f32, v, cshape, step = np.float32, grid.v, crop.shape, grid.step
    deep = crop.nodes(pb.depth) > 8.0
    deep = np.repeat(np.repeat(np.repeat(deep, step, 0), step, 1), step, 2)[:cshape[0], :cshape[1], :cshape[2]]
    cand = np.flatnonzero((t.f_wm > 0.9) & t.brain & deep)
    spots = []
    for _ in range(p["n_wm_spots"]):
        ci = np.array(np.unravel_index(cand[int(rng.integers(cand.size))], cshape))
        sig = float(rng.uniform(1.0, 2.5)) / v
        amp = float(rng.uniform(0.04, 0.15))
        rad = int(math.ceil(3 * sig))
        slo = np.maximum(ci - rad, 0)
        shi = np.minimum(ci + rad + 1, cshape)
        sl = tuple(slice(a, b) for a, b in zip(slo, shi))
        ax = [(np.arange(a, b) - c).astype(f32) for a, b, c in zip(slo, shi, ci)]
        r2 = ax[0][:, None, None] ** 2 + ax[1][None, :, None] ** 2 + ax[2][None, None, :] ** 2
        img[sl] += f32(amp) * np.exp(f32(-0.5 / sig ** 2) * r2) * t.f_wm[sl]
        spots.append({"voxel": (ci + crop.lo).tolist(), "sigma_mm": round(sig * v, 2), "amp": round(amp, 3)})
    return spots


def _lesion_mask(p: dict, score: np.ndarray, brain: np.ndarray, n_brain: int) -> np.ndarray:
    """The top-scoring brain voxels as one filled component of about the target size (1-10 %)."""
    target_frac = p["lesion_fraction_target"]
    target = int(round(target_frac * n_brain))
    for _ in range(4):  # keep the largest component, fill holes, hit the target size
        raw = _topk_mask(score, brain, target)
        lab, n = ndi.label(raw)
        if n > 1:
            sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
            raw = lab == 1 + int(np.argmax(sizes))
        les = ndi.binary_fill_holes(raw) & brain
        frac = les.sum() / n_brain
        if 0.8 * target_frac <= frac <= 1.25 * target_frac:
            break
        target = int(round(target * target_frac * n_brain / max(int(les.sum()), 1)))
    if les.sum() > 0.10 * n_brain:  # guarantee the 1-10 % range (never needed in practice)
        les = _topk_mask(score, les, int(0.10 * n_brain))
    elif les.sum() < 0.01 * n_brain:
        les = les | _topk_mask(score, brain, int(math.ceil(0.01 * n_brain)))
    return les


def _soft(m: np.ndarray) -> np.ndarray:
    """A binary mask softened to partial volume (Gaussian of 0.6 voxel), float32."""
    return ndi.gaussian_filter(m.astype(np.float32), 0.6, truncate=3.0)


def _brighten(local: np.ndarray, s: np.ndarray, level) -> np.ndarray:
    """`local` raised toward `level` with weight `s` (where it is darker): a hyperintense lesion."""
    return local * (1 - s) + s * np.maximum(local, level)


def _paint_lesion(p: dict, local: np.ndarray, les, core, nec, r_c, n2, n3) -> np.ndarray:
    """Lesion intensities over `local` (a box of the image): oedema (brightest near the centre),
    then the solid core, then necrosis, each blended through a softened mask."""
    s_les, s_core, s_nec = _soft(les), _soft(core), _soft(nec)
    e_int = p["edema_int"] + 0.05 * np.clip(1.0 - r_c, 0.0, 1.0) + 0.025 * n3
    local = _brighten(local, s_les, e_int)
    local = local * (1 - s_core) + s_core * (p["solid_int"] + 0.04 * n3)
    return local * (1 - s_nec) + s_nec * (p["necrosis_int"] + 0.02 * n2)


def _glioma_draws(rng: np.random.Generator) -> tuple:
    """The glioma's draws from the main stream, in order: a matrix to orthogonalise, axis ratios,
    a centre offset (N(0, 1)) and the node values of its three noise fields. Lesions of other
    kinds draw them too and leave them unused, so that the bias field and noise drawn after them
    are their glioma twin's."""
    q = rng.standard_normal((3, 3))
    radii = rng.uniform(0.75, 1.3, 3)
    offset = rng.standard_normal(3)
    return q, radii, offset, [_noise_nodes(rng, n) for n in ((4, 4, 4), (4, 4, 4), (5, 5, 5))]


def _insert_lesion(rng: np.random.Generator, p: dict, geom: _LesionGeometry, img: np.ndarray, t: _Tissue,
                   grid: _Grid, crop: _Crop) -> tuple[np.ndarray, dict]:
    """Paint oedema (along white matter) around a solid or necrotic core into `img` in place.

    Returns the lesion mask (uint8, crop shape) and its measured fractions."""
    v = grid.v
    n_brain = int(t.brain.sum())
    r_lesion = geom.radius
    # a box around the centre in full-grid voxels (its size fixes the random fields, so the
    # result does not depend on the crop), intersected with the crop
    ci = (geom.centre - grid.affine[:3, 3]) / v
    rad = int(math.ceil(3.0 * r_lesion / v)) + 2
    box_lo = np.floor(ci).astype(int) - rad
    bshape = (2 * rad + 1,) * 3
    blo = np.maximum(box_lo, crop.lo)
    bhi = np.minimum(box_lo + 2 * rad + 1, crop.hi)
    sl = tuple(slice(a - o, b - o) for a, b, o in zip(blo, bhi, crop.lo))        # in the crop
    bsl = tuple(slice(a - o, b - o) for a, b, o in zip(blo, bhi, box_lo))       # in the box
    axes = [(np.arange(a, b) - ci[k]) * v for k, (a, b) in enumerate(zip(blo, bhi))]
    d = np.stack(np.meshgrid(*axes, indexing="ij"), -1)                       # (..., 3) mm
    q, radii, offset, nodes = _glioma_draws(rng)
    Q, _ = np.linalg.qr(q)
    radii /= np.prod(radii) ** (1.0 / 3.0)
    offset = offset * 0.15 * r_lesion
    r_e = np.sqrt(((((d - offset) @ Q) / radii) ** 2).sum(-1)) / r_lesion
    n1, n2, n3 = (_spline_field(lr, bshape)[bsl] for lr in nodes)
    les = _lesion_mask(p, -r_e + 0.25 * n1 + p["wm_preference"] * (t.f_wm[sl] - 0.5), t.brain[sl], n_brain)
    # core: rounder, centred on the tumour centre
    r_c = np.sqrt((d ** 2).sum(-1)) / r_lesion
    core_score = -r_c + 0.2 * n2
    core = _topk_mask(core_score, les, int(round(p["core_share"] * les.sum())))
    nec = (_topk_mask(core_score, core, int(round(p["necrotic_share"] * core.sum())))
           if p["necrotic"] else np.zeros_like(core))
    img[sl] = _paint_lesion(p, img[sl], les, core, nec, r_c, n2, n3)
    mask = np.zeros(crop.shape, np.uint8)
    mask[sl] = les
    return mask, dict(lesion_fraction=round(float(les.sum()) / n_brain, 5),
                      core_fraction_of_lesion=round(float(core.sum()) / max(1, int(les.sum())), 4))


# --------------------------------------------------------------------------------------------
# other lesion kinds


def _check_kind(kind) -> str:
    if kind not in LESION_KINDS:
        raise IfadError(f"unknown lesion kind {kind!r}; pass one of {', '.join(LESION_KINDS)}")
    return kind


def _draw_kind_params(rng: np.random.Generator, kind: str) -> dict:
    """A lesion kind's scalar parameters, drawn first from its own stream."""
    if kind == "ms":
        frac = float(math.exp(rng.uniform(*np.log(_MS_FRACTION))))
        fewest = min(max(_MS_PLAQUES[0], math.ceil(frac / _MS_FRACTION_PER_PLAQUE)), _MS_PLAQUES[1])
        return dict(lesion_fraction_target=frac, n_plaques=int(rng.integers(fewest, _MS_PLAQUES[1] + 1)),
                    periventricular_share=float(rng.uniform(*_MS_PERIVENTRICULAR)),
                    edge_mm=float(rng.uniform(*_MS_EDGE_MM)))
    names = list(_TERRITORIES)
    return dict(territory=names[int(rng.choice(len(names), p=[_TERRITORIES[n][2] for n in names]))],
                hemisphere="right" if rng.random() < 0.5 else "left",
                lesion_fraction_target=float(math.exp(rng.uniform(*np.log(_STROKE_FRACTION)))),
                intensity=float(rng.uniform(*_STROKE_INTENSITY)))


def _crop_axes(grid: _Grid, crop: _Crop) -> list[np.ndarray]:
    """World mm of the crop's voxels along x, y, z (float32), shaped to broadcast to the crop."""
    out = []
    for k, (a, b) in enumerate(zip(crop.lo, crop.hi)):
        shape = [1, 1, 1]
        shape[k] = int(b - a)
        out.append((np.arange(a, b) * grid.v + grid.affine[k, 3]).astype(np.float32).reshape(shape))
    return out


def _ventricle_distance(pb: _PullBack, grid: _Grid, crop: _Crop, labels: np.ndarray) -> np.ndarray:
    """Distance (mm, float32, crop shape; inf far away) to the subject's lateral ventricles: the
    template's, sampled through the pull-back, where the voxel is CSF."""
    tpl = _templates()
    fine = np.asarray(tpl.fine.shape[2:], dtype=np.float64)[::-1]            # (k, j, i) like the coordinates
    small = np.asarray(tpl.ventricles.shape, dtype=np.float64)[::-1]
    q = crop.upsample(pb.nrm, grid.step)                                     # the fine maps' coordinates
    q = (q + 1.0) * ((fine - 1.0) / (tpl.smooth_step * (small - 1.0)))[:, None, None, None] - 1.0
    vent = torch.from_numpy(tpl.ventricles.astype(np.float32)[None, None])
    vent = (_sample(vent, np.moveaxis(q, 0, -1))[0] > 0.5) & (labels == 1)
    dist = np.full(labels.shape, np.inf, np.float32)
    if vent.any():  # within 30 mm of them
        idx = np.argwhere(vent)
        margin = int(math.ceil(30.0 / grid.v))
        sl = tuple(slice(max(a - margin, 0), min(b + margin + 1, n))
                   for a, b, n in zip(idx.min(0), idx.max(0), labels.shape))
        dist[sl] = ndi.distance_transform_edt(~vent[sl], sampling=grid.v)
    return dist


def _ms_plaques(rng: np.random.Generator, kp: dict, p: dict, img: np.ndarray, t: _Tissue, labels: np.ndarray,
                pb: _PullBack, grid: _Grid, crop: _Crop) -> tuple[np.ndarray, dict]:
    """Paint MS-like plaques into `img` in place: ovoids with soft edges, most at the lateral
    ventricles (long axis along the ventricles' outward normal), the others in deep white matter or
    at the grey-white junction. Returns the mask (uint8, crop shape: the plaques less CSF) and stats."""
    v, n = grid.v, kp["n_plaques"]
    n_brain = int(t.brain.sum())
    wm = labels == 3
    dist_v = _ventricle_distance(pb, grid, crop, labels)
    depth = crop.upsample(pb.depth[None], grid.step)[0]
    sites = {"periventricular": np.flatnonzero(wm & (dist_v <= 25.0)),
             "deep": np.flatnonzero(wm & (t.f_wm > 0.8) & (dist_v > 8.0) & (depth > 15.0)),
             "juxtacortical": np.flatnonzero(wm & (t.f_gm >= 0.25) & (dist_v > 8.0) & (depth < 20.0))}
    # sites, then sizes: relative sizes (juxtacortical plaques half as long) scaled together to the
    # target volume within the length range (juxtacortical ones up to half the longest); the
    # largest placed first
    share = kp["periventricular_share"]
    site_of = rng.choice(list(sites), n, p=[share, 0.5 * (1.0 - share), 0.5 * (1.0 - share)])
    peri, juxta = site_of == "periventricular", site_of == "juxtacortical"
    aspect = np.where(peri, rng.uniform(*_MS_ASPECT[0], n), rng.uniform(*_MS_ASPECT[1], n))
    rel = np.exp(0.5 * rng.standard_normal(n)) * np.where(juxta, 0.5, 1.0)
    target_mm3 = kp["lesion_fraction_target"] * n_brain * v ** 3
    longest = np.where(juxta, 0.5, 1.0) * _MS_LENGTH_MM[1]
    length, scale = rel, 1.0
    for _ in range(8):  # the volume of ellipsoids: pi/6 length width^2
        scale *= (target_mm3 / (math.pi / 6.0 * float((length ** 3 * aspect ** 2).sum()))) ** (1.0 / 3.0)
        length = np.clip(rel * scale, _MS_LENGTH_MM[0], longest)
    level = p["c_gm"] + rng.uniform(*_MS_INTENSITY, n) * (p["c_csf"] - p["c_gm"])
    edge = max(kp["edge_mm"], v)
    s_all = np.zeros(crop.shape, np.float32)
    lev = np.zeros(crop.shape, np.float32)
    mask = np.zeros(crop.shape, bool)
    placed, record = [], []
    for k in np.argsort(-length, kind="stable"):
        a = 0.5 * float(length[k])
        site = str(site_of[k])
        cand = sites[site]
        if site == "periventricular":  # the inner tip 0-3 mm from the ventricle
            near = np.abs(dist_v.flat[cand] - (a + rng.uniform(*_MS_GAP_MM))) <= max(v, 1.0)
            cand = cand[near]
        if cand.size == 0:
            site, cand = "deep", sites["deep"]
        if cand.size == 0:
            continue
        best, best_clear = None, -np.inf   # the first of 30 tries clear of the others by a voxel + 1 mm
        for _ in range(30):
            ci = np.array(np.unravel_index(cand[int(rng.integers(cand.size))], crop.shape))
            clear = min((float(np.linalg.norm(ci - cj)) * v - a - aj for cj, aj in placed), default=np.inf)
            if clear > best_clear:
                best, best_clear = ci, clear
            if clear >= v + 1.0:
                break
        ci = best
        u = rng.standard_normal(3)         # the long axis: random, or for periventricular plaques
        if site == "periventricular":      # along the gradient of the distance to the ventricles
            for ax in range(3):
                lo, hi = ci.copy(), ci.copy()
                lo[ax], hi[ax] = max(ci[ax] - 1, 0), min(ci[ax] + 1, crop.shape[ax] - 1)
                u[ax] = dist_v[tuple(hi)] - dist_v[tuple(lo)]
        if not (np.all(np.isfinite(u)) and np.linalg.norm(u) > 0):
            u = np.array([1.0, 0.0, 0.0])
        u /= np.linalg.norm(u)
        b = aspect[k] * a
        # the plaque's box; r: normalised ellipsoid radius; s: partial volume over a soft edge
        rad = int(math.ceil((a + edge) / v)) + 1
        slo, shi = np.maximum(ci - rad, 0), np.minimum(ci + rad + 1, crop.shape)
        sl = tuple(slice(x, y) for x, y in zip(slo, shi))
        ax = [((np.arange(x, y) - c) * v).astype(np.float32) for x, y, c in zip(slo, shi, ci)]
        along = ax[0][:, None, None] * u[0] + ax[1][None, :, None] * u[1] + ax[2][None, None, :] * u[2]
        d2 = ax[0][:, None, None] ** 2 + ax[1][None, :, None] ** 2 + ax[2][None, None, :] ** 2
        r = np.sqrt(along ** 2 / a ** 2 + np.maximum(d2 - along ** 2, 0.0) / b ** 2)
        s = np.clip(0.5 + (1.0 - r) * (b / edge), 0.0, 1.0).astype(np.float32)
        lev[sl] = np.where(s > s_all[sl], np.float32(level[k]), lev[sl])
        s_all[sl] = np.maximum(s_all[sl], s)
        mask[sl] |= r <= 1.0
        placed.append((ci, a))
        record.append({"site": site, "voxel": (ci + crop.lo).tolist(), "length_mm": round(2 * a, 2),
                       "width_mm": round(2 * b, 2), "level": round(float(level[k]), 3)})
    mask &= t.brain & (labels != 1)
    img[...] = _brighten(img, s_all * t.brain, lev)
    n_comp = ndi.label(mask)[1]
    return mask.astype(np.uint8), dict(lesion_fraction=round(float(mask.sum()) / n_brain, 5), n_components=int(n_comp),
                                       plaques=record)


def _stroke(rng: np.random.Generator, kp: dict, p: dict, img: np.ndarray, t: _Tissue, labels: np.ndarray,
            pose: _Pose, grid: _Grid, crop: _Crop) -> tuple[np.ndarray, dict]:
    """Paint a territorial infarct into `img` in place: the grey and white matter of one
    hemisphere within a cone from a deep apex out to the cortex (sized to the target by its
    angle, border roughened by noise). Returns the mask (uint8, crop shape) and stats."""
    f32 = np.float32
    n_brain = int(t.brain.sum())
    side = 1.0 if kp["hemisphere"] == "right" else -1.0
    apex_t, target_t, _ = _TERRITORIES[kp["territory"]]
    flip = np.array([side, 1.0, 1.0])
    apex = pose.forward(np.asarray(apex_t) * flip + rng.uniform(-5.0, 5.0, 3))
    axis = pose.forward(np.asarray(target_t) * flip + rng.uniform(-10.0, 10.0, 3)) - apex
    axis /= np.linalg.norm(axis)
    x = _crop_axes(grid, crop)
    # subject-anatomy coordinates: one hemisphere, above the posterior fossa
    inv = np.linalg.inv(pose.A)
    d0 = [xk - f32(pose.c0[k] + pose.t[k]) for k, xk in enumerate(x)]
    u = [f32(pose.c0[c]) + sum(f32(inv[c, k]) * d0[k] for k in range(3)) for c in range(3)]
    valid = t.brain & ((labels == 2) | (labels == 3)) & (side * u[0] > 2.0) & ~((u[2] < -8.0) & (u[1] < -35.0))
    d = [xk - f32(apex[k]) for k, xk in enumerate(x)]
    proj = sum(f32(axis[k]) * d[k] for k in range(3))
    cos = proj / np.sqrt(np.maximum(sum(dk ** 2 for dk in d), f32(1e-6)))
    valid &= proj > 5.0
    score = cos + f32(0.04) * _noise_on_grid(rng, (6, 7, 6), crop.shape)
    les = _lesion_mask(kp, score, valid, n_brain)
    level = f32(p["c_gm"] + kp["intensity"] * (p["c_csf"] - p["c_gm"]))
    level = level + f32(0.02) * _noise_on_grid(rng, (8, 9, 8), crop.shape)
    idx = np.argwhere(les)
    sl = tuple(slice(max(a - 3, 0), min(b + 4, n)) for a, b, n in zip(idx.min(0), idx.max(0), crop.shape))
    img[sl] = _brighten(img[sl], _soft(les[sl]), level[sl])
    return les.astype(np.uint8), dict(lesion_fraction=round(float(les.sum()) / n_brain, 5),
                                      apex_mm=apex.round(2).tolist(), axis=axis.round(3).tolist())


def _tissue_share(mask: np.ndarray, labels: np.ndarray) -> dict:
    """The share of a lesion's voxels by the tissue label they had (CSF, GM, WM)."""
    n = max(int(mask.sum()), 1)
    return {name: round(float(np.count_nonzero(labels[mask > 0] == k)) / n, 4)
            for k, name in ((1, "CSF"), (2, "GM"), (3, "WM"))}


def _acquire(rng: np.random.Generator, p: dict, img: np.ndarray, brain: np.ndarray, grid: _Grid,
             crop: _Crop) -> np.ndarray:
    """Bias field, Rician noise, intensity floor and scale, skull stripping (crop shape, float32)."""
    f32 = np.float32
    if p["bias_sd"] > 0:
        coef = [float(c) for c in rng.standard_normal(9) * p["bias_sd"]]
        X, Y, Z = (np.linspace(-1.0, 1.0, n, dtype=f32)[c] for n, c in zip(grid.shape, crop.slices))
        X, Y, Z = X[:, None, None], Y[None, :, None], Z[None, None, :]
        logb = (coef[0] * X + coef[1] * Y + coef[2] * Z + coef[3] * (X * X - f32(1 / 3))
                + coef[4] * (Y * Y - f32(1 / 3)) + coef[5] * (Z * Z - f32(1 / 3))
                + coef[6] * X * Y + coef[7] * X * Z + coef[8] * Y * Z)
        img *= np.exp(logb)
        del logb
    if p["snr"] is not None:
        sigma = f32(float(img[brain].mean()) / p["snr"])
        n_re = rng.standard_normal(crop.shape, dtype=f32)
        n_re *= sigma
        n_re += img
        n_im = rng.standard_normal(crop.shape, dtype=f32)
        n_im *= sigma
        n_re *= n_re
        n_im *= n_im
        n_re += n_im
        img = np.sqrt(n_re)
        del n_im
    np.maximum(img, f32(_FLOOR), out=img)
    img *= f32(_INTENSITY_SCALE)
    img *= brain
    return img


def _render(name: str, stream: int, index: int, seed: int, voxel_mm: float, anatomy: str = "mni",
            kind: str = "glioma") -> SynthCase:
    """One subject: draw its parameters, then pose -> lesion geometry -> pull-back -> tissue ->
    T2 image -> spots -> lesion -> acquisition. `info` = drawn parameters + measured results.
    The folded anatomy draws its own parameters and fields from SeedSequence([seed, stream,
    index, 3]), so every draw of the main stream stays what it is for `mni`; so does a lesion
    `kind` other than glioma (from SeedSequence([seed, stream, index, K])), which makes the
    glioma's main-stream draws and leaves them unused (no mass effect, nothing painted)."""
    t0 = time.perf_counter()
    grid = _Grid.make(_check_voxel(voxel_mm))
    anatomy = subject_anatomy(anatomy, index)
    tpl = _templates()
    lesion = stream == _LESION_STREAM
    reference = stream == _REFERENCE
    rng = _rng(max(stream, 0), index, seed) if not reference else np.random.default_rng(0)
    p = _draw_params(rng, lesion, reference)         # read only from here on
    fold, folding = None, None
    if anatomy in ("folded", "aged"):
        frng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index), _FOLD_STREAM]))
        fold = _draw_fold_params(frng)
        if anatomy == "aged":
            p, fold = _aged(p, fold)
        folding = _Folding.draw(frng, fold)
    pose = _Pose.from_params(p, tpl)
    # elastic displacement, a function of output position: cubic spline of ~25 mm nodes
    elastic = (_Spline3(rng, _FOV_LO - 10.0, _FOV_HI + 10.0, 25.0, p["elastic_mm"])
               if p["elastic_mm"] > 0 else None)
    geom = _lesion_geometry(rng, tpl, p, pose, elastic, fold) if lesion else None
    pb = _pull_back(tpl, grid, pose, elastic, geom if kind == "glioma" else None, p, fold)
    fields = _smooth_fields(rng, p, pb, grid.n_nodes)
    if geom is None or kind == "glioma":
        crop = _crop_box(grid, pb.mask)
    else:  # also over the glioma twin's brain (its mass effect can widen the box): the twin's noise field
        crop = _crop_box(grid, np.maximum(pb.mask, _pull_back(tpl, grid, pose, elastic, geom, p, fold).mask))
    tissue, texture = _tissue(p, grid, crop, pb, fields, folding)
    img = _t2_image(p, tissue, texture)
    spots = _wm_spots(rng, p, img, tissue, pb, grid, crop)
    labels = tissue.labels()
    result: dict = {}
    mask = None
    kp: dict = {}
    if geom is not None and kind == "glioma":
        mask, stats = _insert_lesion(rng, p, geom, img, tissue, grid, crop)
        labels[mask > 0] = 4
        result.update(centre_mm=geom.centre.round(2).tolist(), **stats)
    elif geom is not None:
        _glioma_draws(rng)
        krng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index), _KIND_STREAM[kind]]))
        kp = _draw_kind_params(krng, kind)
        if kind == "ms":
            mask, stats = _ms_plaques(krng, kp, p, img, tissue, labels, pb, grid, crop)
        else:
            mask, stats = _stroke(krng, kp, p, img, tissue, labels, pose, grid, crop)
        result.update(lesion_tissue=_tissue_share(mask, labels), **stats)
        labels[mask > 0] = 4
    img = _acquire(rng, p, img, tissue.brain, grid, crop)
    result.update(wm_spots=spots, shape=list(grid.shape), voxel_mm=grid.v,
                  seconds=round(time.perf_counter() - t0, 3))

    def full(a, dtype):
        out = np.zeros(grid.shape, dtype)
        out[crop.slices] = a
        return out

    return SynthCase(name=name, image=full(img, np.float32), mask=None if mask is None else full(mask, np.uint8),
                     brain_mask=full(tissue.brain, np.uint8), affine=grid.affine,
                     tissue=full(labels, np.uint8),
                     info={**{k: val for k, val in p.items() if kind == "glioma" or k not in _GLIOMA_KEYS},
                           "anatomy": anatomy, **(fold or {}), **({"lesion_kind": kind} if lesion else {}),
                           **kp, **result})


# --------------------------------------------------------------------------------------------
# public API


def generate_healthy(index: int, seed: int = 0, voxel_mm: float = 1.5, anatomy: str = "mni") -> SynthCase:
    """Healthy subject `index` of the set drawn with `seed` (stream SeedSequence([seed, 0, index]));
    anatomy "mni" (the template's), "folded" (individual folding and asymmetry on top), "aged"
    (folded, with sulci and ventricles past folded's ranges) or "mixed" (folded if index is odd, else mni)."""
    index, seed = _check_count(index, "index"), _check_count(seed, "seed")
    return _render(_case_name("healthy", index), _HEALTHY_STREAM, index, seed, voxel_mm, anatomy)


def generate_lesion(index: int, seed: int = 0, voxel_mm: float = 1.5, anatomy: str = "mni",
                    kind: str = "glioma") -> SynthCase:
    """Lesion case `index` of the set drawn with `seed` (SeedSequence([seed, 1, index])); anatomy
    as for `generate_healthy`; kind "glioma" (glioma-like), "ms" (MS-like white-matter plaques) or
    "stroke" (a territorial infarct): the same subject, pose, contrast, bias and noise for every kind."""
    index, seed, kind = _check_count(index, "index"), _check_count(seed, "seed"), _check_kind(kind)
    return _render(_case_name("lesion", index), _LESION_STREAM, index, seed, voxel_mm, anatomy, kind)


def mni_reference(voxel_mm: float = 1.5) -> SynthCase:
    """The template itself as a noise-free T2 image on the acquisition grid (mean contrast,
    no warp, no bias, no noise): an atlas for baselines."""
    return _render("mni_reference", _REFERENCE, 0, 0, voxel_mm)


def _case_name(kind: str, index: int) -> str:
    return f"{kind}_{index:04d}"


def _set_files(out: Path, healthy, lesion) -> list[Path]:
    """The files of a set of these case names under `out`: its manifest, then the cases'."""
    return [out / _MANIFEST, *(out / "healthy" / f"{n}.nii.gz" for n in healthy),
            *(out / "lesion" / f"{n}{s}.nii.gz" for n in lesion for s in ("", "_mask"))]


def _listed_files(out: Path) -> list[Path]:
    """The files of the set whose synth manifest is in `out` (none without a readable one)."""
    try:
        manifest = json.loads((out / _MANIFEST).read_text())
        if manifest.get("generator") != _GENERATOR:
            return []
        names = {kind: [n for n in manifest[kind] if re.fullmatch(rf"{kind}_\d+", n)] for kind in ("healthy", "lesion")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return _set_files(out, names["healthy"], names["lesion"])


def write_set(out_dir, n_healthy: int, n_lesions: int, seed: int = 0, voxel_mm: float = 1.5,
              progress: bool = True, overwrite: bool = False, anatomy: str = "mni",
              lesion_kind: str = "glioma") -> dict:
    """Write `n_healthy` healthy and `n_lesions` lesion cases (of `lesion_kind`, see
    `generate_lesion`) of `anatomy` (see `generate_healthy`) as NIfTI under `out_dir`.

    Layout: out_dir/healthy/<name>.nii.gz, out_dir/lesion/<name>.nii.gz and
    out_dir/lesion/<name>_mask.nii.gz, and out_dir/manifest.json, written last. Returns the
    manifest. A folder that already holds any of these files is refused unless `overwrite`,
    which first removes the old manifest and the files of the old set (those its manifest
    lists, nothing else) that the new one does not write, so the folder matches the new manifest.
    """
    from .progress import progress_bar

    from .io import clean_stale_temporaries, save_json, save_volume

    n_healthy = _check_count(n_healthy, "n_healthy")
    n_lesions = _check_count(n_lesions, "n_lesions")
    seed = _check_count(seed, "seed")
    v = _check_voxel(voxel_mm)
    anatomy = _check_anatomy(anatomy)
    lesion_kind = _check_kind(lesion_kind)
    out = Path(out_dir)
    files = _set_files(out, [_case_name("healthy", i) for i in range(n_healthy)],
                       [_case_name("lesion", j) for j in range(n_lesions)])
    present = [f for f in files if os.path.lexists(f)]
    if present and not overwrite:
        raise IfadError(f"{out} already holds {present[0].relative_to(out)}"
                        f"{f' and {len(present) - 1} more files' if len(present) > 1 else ''} of a synthetic set; "
                        "pass --overwrite to replace it or choose another -o")
    if overwrite:
        ours = set(files)
        for old in [out / _MANIFEST, *(f for f in _listed_files(out) if f not in ours)]:
            old.unlink(missing_ok=True)
    for folder in (out, out / "healthy", out / "lesion"):
        clean_stale_temporaries(folder)
    shape, affine = acquisition_grid(v)
    manifest = {
        "generator": _GENERATOR,
        "version": _VERSION,
        "seed": seed,
        "voxel_mm": v,
        "anatomy": anatomy,
        "lesion_kind": lesion_kind,
        "shape": list(shape),
        "affine": affine.tolist(),
        "intensity_scale": _INTENSITY_SCALE,
        "healthy": [],
        "lesion": [],
        "lesion_fractions": {},
        "cases": {},
    }
    lesion = functools.partial(generate_lesion, kind=lesion_kind)
    jobs = [(generate_healthy, i) for i in range(n_healthy)] + [(lesion, j) for j in range(n_lesions)]
    bar = progress_bar(total=len(jobs), desc="synth", unit="case", disable=None if progress else True)
    try:
        for fn, i in jobs:
            case = fn(i, seed=seed, voxel_mm=v, anatomy=anatomy)
            kind = "lesion" if case.mask is not None else "healthy"
            save_volume(out / kind / f"{case.name}.nii.gz", case.image, case.affine, dtype=np.float32)
            if case.mask is not None:
                save_volume(out / kind / f"{case.name}_mask.nii.gz", case.mask, case.affine, dtype=np.uint8)
                manifest["lesion_fractions"][case.name] = round(case.lesion_fraction, 5)
            manifest[kind].append(case.name)
            manifest["cases"][case.name] = {k: case.info[k] for k in case.info if k != "seconds"}
            bar.update(1)
    finally:
        bar.close()
    save_json(out / _MANIFEST, manifest)
    return manifest
