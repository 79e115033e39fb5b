"""NIfTI in and out through nibabel, with the affine and header kept and atomic writes."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import IfadError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Scan:
    """A 3D scan: `data` float32 (X, Y, Z) in the file's voxel order, with its space."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def name(self) -> str:
        return case_name(self.path) if self.path is not None else "scan"


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def case_name(path: str | os.PathLike) -> str:
    """`/a/b/sub-01.nii.gz` -> `sub-01`."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_scans(inputs, exclude_suffixes=()) -> list[Path]:
    """Expand files and folders into a sorted list of NIfTI paths.

    Raises IfadError when an input does not exist or nothing is found.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.is_file() and is_nifti(q)))
        elif p.is_file():
            found.append(p)
        else:
            raise IfadError(f"{p}: no such file or folder; check the path")
    found = [p for p in found if not case_name(p).endswith(tuple(exclude_suffixes))]
    if not found:
        raise IfadError(f"no NIfTI scans (.nii, .nii.gz) found in {', '.join(map(str, inputs))}; "
                        "pass scan files or a folder that holds them")
    return found


def load_scan(path: str | os.PathLike) -> Scan:
    """Read a 3D NIfTI (or 4D with one volume) as float32, checking it is usable."""
    path = Path(path)
    if not path.is_file():
        raise IfadError(f"{path}: no such file; check the path")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for foreign files
        raise IfadError(f"{path}: not a readable NIfTI file ({type(exc).__name__}); "
                        "pass a .nii or .nii.gz scan") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise IfadError(f"{path}: not a NIfTI image; convert it to .nii.gz first")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise IfadError(f"{path}: expected a 3D volume, got shape {img.shape}; "
                        "pass a single 3D scan (split 4D series first)")
    if min(shape) < 2:
        raise IfadError(f"{path}: volume shape {shape} is too thin; pass a 3D scan")
    if not np.issubdtype(img.get_data_dtype(), np.number) or np.issubdtype(img.get_data_dtype(), np.complexfloating):
        raise IfadError(f"{path}: voxel type {img.get_data_dtype()} is not real-valued; "
                        "convert the scan to a numeric type")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise IfadError(f"{path}: could not read the voxel data ({type(exc).__name__}: the file "
                        "looks truncated or corrupt); re-export the scan") from None
    if not np.isfinite(data).all():
        raise IfadError(f"{path}: contains NaN or Inf values; replace them (e.g. with 0) first")
    if not data.any():
        raise IfadError(f"{path}: all voxels are zero; pass a skull-stripped scan with brain voxels")
    header = img.header.copy()
    return Scan(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=header, path=path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp creates 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_volume(path, data: np.ndarray, affine: np.ndarray, header=None, dtype=np.float32) -> Path:
    """Write `data` (X, Y, Z) as NIfTI with `affine` (and the source header's metadata), atomically.

    dtype is np.float32 (scores, intensities) or np.uint8 (classes, masks).
    """
    path = Path(path)
    data = np.asarray(data).astype(dtype, copy=False)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:
        img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
        img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def save_json(path, obj) -> Path:
    """Write JSON atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
