"""Re-acquire a scan as another acquisition of the same anatomy.

A scan here is an image, a lesion mask (or None), a brain mask and a voxel-to-world affine
(e.g. a `synth.SynthCase`). An `Acquisition` names a voxel size per stored axis, an
orientation (nibabel axis codes: ``RAS``, ``LPS``, ``ASR`` ...) and a field of view (the
source's box or the brain's bounding box, each widened or narrowed per side, which also puts
the brain off centre). `reacquire` builds that grid in world millimetres and resamples onto
it, so world positions are preserved: the same world point shows the same anatomy in every
acquisition, and each output's affine says where its voxels are.

Resampling (target voxel -> source voxel through ``inv(A_src) @ A_tgt``, one trilinear
interpolation by `preprocess.resample`, the model frame's own):

* the image is interpolated linearly, after a Gaussian pre-filter along each source axis whose
  target voxel is larger (slice profile: a voxel integrates over its width, a box of variance
  v²/12, so the source is blurred by the missing variance (v_t² − v_s²)/12 mm²);
* masks get the same pre-filter, linear interpolation and ``> 0.5`` (a voxel belongs to the
  mask when more than half of it does; exact ties, common where grids align, are broken by a
  0.001-voxel shift), so their volumes in mm³ are kept (to about 1 % for brains and gliomas
  from 1 mm sources; finer targets than the source round a staircase's corners off);
* the brain is skull-stripped again on the new grid (image zero outside the new brain mask)
  and the lesion mask is kept inside it; `linear-1x1x3mm` skips the pre-filter and the second
  stripping, as resampling a stripped scan with a registration tool does (its brain mask, the one
  the metrics use, is still the resampled mask).

`ACQUISITIONS` is the registry of named acquisitions used by `ifad-fast bench accuracy`; those in
`HELD_OUT` render the scan in a style training never shows (a soft rim, other contrast, a strong bias
field, low SNR), take a case of an anatomy it never shows (`aged`) or a lesion kind that validation
never shows (`ms`: small MS-like white-matter plaques, `stroke`: a territorial infarct, instead of
the glioma), for the protocol's generalisation test.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from . import preprocess
from .errors import IfadError
from .synth import LESION_KINDS

__all__ = ["ACQUISITIONS", "HELD_OUT", "Acquired", "Acquisition", "get_acquisitions", "reacquire", "resample", "target_grid"]

_AXIS_OF = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass(frozen=True)
class Acquisition:
    """How to re-acquire: `voxel_mm` per stored axis (in `orientation`'s axis order),
    `orientation` as three nibabel axis codes, `fov` 'source' (the source grid's box) or
    'brain' (the brain's bounding box), widened by `pad_lo_mm` / `pad_hi_mm` on the low / high
    side of each world axis (R, A, S; negative values narrow it). `prefilter`: the slice-profile
    blur before interpolation (a scanner's acquisition); without it and without `restrip`, the
    skull-stripped source is resampled as a registration tool does, plain trilinear with its zero
    background, which leaves a soft partial-volume rim around the brain. Rendering (on the brain,
    after resampling): `gamma` (x -> m·(x/m)^gamma, m the brain's 99th percentile: other tissue
    contrasts), `bias_sd` (a smooth multiplicative field exp(quadratic), coefficients N(0, bias_sd²),
    over the brain's box), `snr` (Rician noise of sd mean brain intensity / snr). `held_out`: a style
    outside what training scans show (`ifad-fast synth`: bias sd 0.03-0.10, SNR 15-40, its own tissue
    contrasts, hard brain edges), reported apart from the others by the accuracy protocol. `anatomy`:
    the `synth` anatomy the protocol draws the case with for this acquisition ('folded': individual
    cortical folding and asymmetry, as half the protocol's training subjects; 'aged': folded with
    wider, deeper sulci and larger ventricles than any training subject); `lesion`: the `synth`
    lesion kind the protocol draws the case with ('glioma', as the validation cases; 'ms'; 'stroke');
    `reacquire` refuses a synthetic case of another anatomy or lesion kind."""

    name: str
    description: str
    voxel_mm: tuple = (1.5, 1.5, 1.5)
    orientation: str = "RAS"
    fov: str = "source"
    pad_lo_mm: tuple = (0.0, 0.0, 0.0)
    pad_hi_mm: tuple = (0.0, 0.0, 0.0)
    prefilter: bool = True
    restrip: bool = True
    gamma: float = 1.0
    bias_sd: float = 0.0
    snr: float | None = None
    held_out: bool = False
    anatomy: str = "mni"
    lesion: str = "glioma"

    def __post_init__(self):
        codes = self.orientation.upper()
        if len(codes) != 3 or sorted(_AXIS_OF[c][0] for c in codes if c in _AXIS_OF) != [0, 1, 2]:
            raise IfadError(f"orientation {self.orientation!r}: pass three axis codes covering R/L, A/P, S/I")
        if len(self.voxel_mm) != 3 or not all(0.1 <= float(v) <= 20.0 for v in self.voxel_mm):
            raise IfadError(f"voxel size {self.voxel_mm!r}: pass three sizes of 0.1 to 20 mm")
        if self.fov not in ("source", "brain"):
            raise IfadError(f"field of view {self.fov!r}: use 'source' or 'brain'")
        if self.lesion not in LESION_KINDS:
            raise IfadError(f"lesion kind {self.lesion!r}: use one of {', '.join(LESION_KINDS)}")


ACQUISITIONS = {a.name: a for a in (
    Acquisition("1.5mm", "1.5 mm isotropic, RAS, the source's field of view (the reference)"),
    Acquisition("1mm", "1 mm isotropic, RAS", voxel_mm=(1.0, 1.0, 1.0)),
    Acquisition("2mm", "2 mm isotropic, RAS", voxel_mm=(2.0, 2.0, 2.0)),
    Acquisition("1x1x3mm", "1 x 1 mm in plane, 3 mm axial slices, RAS", voxel_mm=(1.0, 1.0, 3.0)),
    Acquisition("lps", "1.5 mm, LPS (DICOM order: x and y flipped)", orientation="LPS"),
    Acquisition("permuted", "1.5 mm, axes stored A, S, R (permuted)", orientation="ASR"),
    Acquisition("off-centre", "1.5 mm, RAS, brain off centre (field of view 5 mm past the brain on one "
                "side, 45-60 mm on the other)", fov="brain", pad_lo_mm=(5.0, 60.0, 5.0),
                pad_hi_mm=(60.0, 5.0, 45.0)),
    Acquisition("cropped", "1.5 mm, RAS, cropped to the brain's bounding box + 4 mm", fov="brain",
                pad_lo_mm=(4.0, 4.0, 4.0), pad_hi_mm=(4.0, 4.0, 4.0)),
    Acquisition("enlarged", "1.5 mm, RAS, field of view enlarged by 40 mm on every side",
                pad_lo_mm=(40.0, 40.0, 40.0), pad_hi_mm=(40.0, 40.0, 40.0)),
    Acquisition("linear-1x1x3mm", "1 x 1 x 3 mm by plain trilinear resampling of the skull-stripped scan "
                "(no slice profile, not stripped again: a soft partial-volume rim)", voxel_mm=(1.0, 1.0, 3.0),
                prefilter=False, restrip=False, held_out=True),
    Acquisition("contrast", "1.5 mm, tissue contrast changed by a gamma of 1.6", gamma=1.6, held_out=True),
    Acquisition("bias", "1.5 mm, a strong bias field (log-field sd 0.25)", bias_sd=0.25, held_out=True),
    Acquisition("noise", "1.5 mm, Rician noise at SNR 8", snr=8.0, held_out=True),
    Acquisition("folded", "1.5 mm, RAS, the case drawn with synth's folded anatomy (individual cortical folding, "
                "hemispheric asymmetry; half the protocol's training subjects have it)", anatomy="folded"),
    Acquisition("aged", "1.5 mm, RAS, the case drawn with synth's aged anatomy (folded, with wider and deeper "
                "sulci and larger ventricles than any training subject)", anatomy="aged", held_out=True),
    Acquisition("ms", "1.5 mm, RAS, the case's subject with multiple small MS-like white-matter plaques instead "
                "of the glioma (synth's ms lesion kind)", lesion="ms", held_out=True),
    Acquisition("stroke", "1.5 mm, RAS, the case's subject with a territorial infarct (cortex and white matter "
                "of one hemisphere) instead of the glioma (synth's stroke lesion kind)", lesion="stroke",
                held_out=True),
)}
HELD_OUT = tuple(name for name, a in ACQUISITIONS.items() if a.held_out)


def get_acquisitions(names) -> list[Acquisition]:
    """Acquisitions by name: a list or a comma-separated string ('all' or None: every one)."""
    if names is None or names == "all":
        return list(ACQUISITIONS.values())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in ACQUISITIONS]
    if unknown or not names:
        raise IfadError(f"unknown acquisition {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(ACQUISITIONS)}")
    return [ACQUISITIONS[n] for n in dict.fromkeys(names)]


@dataclass
class Acquired:
    """A scan in one acquisition: image float32 (X, Y, Z), mask uint8 or None, brain_mask uint8,
    affine float64 4x4 (voxel -> world mm)."""

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    brain_mask: np.ndarray
    affine: np.ndarray
    acquisition: str


def _world_box(shape, affine: np.ndarray, where: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (lo, hi) of the voxel centres of a grid, or of the voxels in `where`."""
    if where is None:
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1).T
    else:
        idx = np.argwhere(where)
        if idx.size == 0:
            raise IfadError("the brain mask is empty; cannot place a field of view around the brain")
        corners = np.array(np.meshgrid(*zip(idx.min(0), idx.max(0)), indexing="ij")).reshape(3, -1).T
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(0), world.max(0)


def target_grid(acq: Acquisition, shape, affine: np.ndarray, brain: np.ndarray | None = None):
    """Shape and affine of `acq`'s grid for a source grid (`shape`, `affine`, brain mask).

    The grid covers the world box with voxel centres from one face of it, so the reference
    acquisition of a source on the same voxel size and orientation is the source grid itself.
    """
    lo, hi = _world_box(shape, affine, brain > 0 if acq.fov == "brain" else None)
    lo = lo - np.asarray(acq.pad_lo_mm, dtype=np.float64)
    hi = hi + np.asarray(acq.pad_hi_mm, dtype=np.float64)
    if np.any(hi <= lo):
        raise IfadError(f"acquisition {acq.name}: the field of view is empty")
    out = np.eye(4)
    out_shape = []
    for i, code in enumerate(acq.orientation.upper()):
        w, sign = _AXIS_OF[code]
        v = float(acq.voxel_mm[i])
        out_shape.append(int(np.ceil((hi[w] - lo[w]) / v - 1e-6)) + 1)
        out[:3, i] = 0.0
        out[w, i] = sign * v
        out[w, 3] = lo[w] if sign > 0 else hi[w]
    return tuple(out_shape), out


def _antialias_sigmas(src_affine: np.ndarray, dst_affine: np.ndarray) -> list[float]:
    """Gaussian sigma (source voxels) along each source axis: the slice-profile variance that
    the target voxel adds over the source voxel along that axis, (v_t² − v_s²)/12 mm²."""
    sigmas = []
    dst_dirs = dst_affine[:3, :3] / np.linalg.norm(dst_affine[:3, :3], axis=0)
    for j in range(3):
        col = src_affine[:3, j]
        v_s = float(np.linalg.norm(col))
        i = int(np.argmax(np.abs(dst_dirs.T @ (col / v_s))))   # the target axis most parallel
        v_t = float(np.linalg.norm(dst_affine[:3, i]))
        sigmas.append(np.sqrt(max(v_t ** 2 - v_s ** 2, 0.0) / 12.0) / v_s)
    return sigmas


def resample(volume: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine: np.ndarray,
             antialias: bool = True, shift_vox: float = 0.0) -> np.ndarray:
    """Linear resampling of a (X, Y, Z) volume onto another grid by world position.

    Returns float32 `dst_shape`; zero outside the source grid. With `antialias`, the source is
    first blurred along the axes whose target voxels are larger (see the module docstring).
    shift_vox: sample this far (source voxels) further along every source axis (tie-breaking).
    """
    src = np.asarray(volume, dtype=np.float32)
    if antialias:
        sigmas = _antialias_sigmas(np.asarray(src_affine, float), np.asarray(dst_affine, float))
        if max(sigmas) > 0.05:
            src = ndi.gaussian_filter(src, [s if s > 0.05 else 0.0 for s in sigmas], mode="constant", truncate=3.0)
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    m[:3, 3] += shift_vox
    return preprocess.resample(torch.from_numpy(np.ascontiguousarray(src)), m, dst_shape).numpy()


def _resample_mask(mask: np.ndarray, src_affine, shape, affine) -> np.ndarray:
    """A mask (non-zero = in) on another grid: pre-filtered, linear, > 0.5. Where grids align, a
    target voxel centre can sit exactly on a face between an in and an out source voxel (value
    0.5): sampling 0.001 voxel further along each source axis keeps such faces on one side of an
    object and drops them on the other, so its volume is kept instead of shrunk."""
    return resample(np.asarray(mask) > 0, src_affine, shape, affine, shift_vox=1e-3) > 0.5


def _render(image: np.ndarray, brain: np.ndarray, acq: Acquisition, affine: np.ndarray, key: str) -> np.ndarray:
    """`acq`'s gamma, bias field and Rician noise on the brain voxels of `image` (float32, in
    place; the background stays 0). Random parts are drawn from a generator seeded by `key`."""
    if acq.gamma == 1.0 and acq.bias_sd == 0.0 and acq.snr is None:
        return image
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    values = image[brain].astype(np.float64)
    if acq.gamma != 1.0:
        top = np.percentile(values, 99)
        values = top * (np.maximum(values, 0.0) / top) ** acq.gamma
    if acq.bias_sd > 0:
        idx = np.argwhere(brain)
        world = idx @ affine[:3, :3].T + affine[:3, 3]
        lo, hi = world.min(0), world.max(0)
        x, y, z = (2.0 * (world - lo) / np.maximum(hi - lo, 1e-6) - 1.0).T
        c = rng.standard_normal(9) * acq.bias_sd
        values = values * np.exp(c[0] * x + c[1] * y + c[2] * z + c[3] * (x * x - 1 / 3) + c[4] * (y * y - 1 / 3)
                                 + c[5] * (z * z - 1 / 3) + c[6] * x * y + c[7] * x * z + c[8] * y * z)
    if acq.snr is not None:
        sigma = values.mean() / acq.snr
        values = np.hypot(values + rng.normal(0.0, sigma, values.size), rng.normal(0.0, sigma, values.size))
    image[brain] = np.maximum(values, 1e-3 * values.max()).astype(np.float32)   # brain voxels stay non-zero
    return image


def reacquire(case, acq: Acquisition | str) -> Acquired:
    """The scan `case` (attributes image, mask, brain_mask, affine, name) acquired as `acq`."""
    acq = ACQUISITIONS[acq] if isinstance(acq, str) and acq in ACQUISITIONS else acq
    if not isinstance(acq, Acquisition):
        get_acquisitions([acq])                               # raises the user error
    drawn = (getattr(case, "info", None) or {}).get("anatomy", acq.anatomy)
    if drawn != acq.anatomy:
        raise IfadError(f"{case.name}: the {acq.name} acquisition needs a case drawn with the {acq.anatomy} "
                        f"anatomy, got {drawn} (synth's generate_lesion(..., anatomy={acq.anatomy!r}))")
    kind = (getattr(case, "info", None) or {}).get("lesion_kind", acq.lesion)
    if kind != acq.lesion:
        raise IfadError(f"{case.name}: the {acq.name} acquisition needs a case with a lesion of kind {acq.lesion}, "
                        f"got {kind} (synth's generate_lesion(..., kind={acq.lesion!r}))")
    image = np.asarray(case.image)
    if image.ndim != 3:
        raise IfadError(f"{case.name}: a 3D scan is needed, got shape {image.shape}")
    shape, affine = target_grid(acq, image.shape, case.affine, case.brain_mask)
    brain = _resample_mask(case.brain_mask, case.affine, shape, affine)
    out = resample(image, case.affine, shape, affine, antialias=acq.prefilter)
    if acq.restrip:
        out *= brain
    out = _render(out, out != 0, acq, affine, f"{case.name}/{acq.name}")
    mask = None
    if case.mask is not None:
        mask = (_resample_mask(case.mask, case.affine, shape, affine) & brain).astype(np.uint8)
    return Acquired(name=case.name, image=out, mask=mask, brain_mask=brain.astype(np.uint8), affine=affine,
                    acquisition=acq.name)
