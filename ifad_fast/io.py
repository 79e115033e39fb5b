"""NIfTI in and out through nibabel: headers checked before voxels are read, atomic writes.

Reading: `open_nifti` checks a file from its header alone (readable, 3D, real-valued, a finite
non-singular affine, at most `max_voxels` voxels, enough memory to read it); `load_scan` then
reads the voxels as float32 and checks them (finite, not all zero, skull-stripped).

Writing: a file is written under a hidden temporary name in its own folder,
`.<name>.<pid>-<random>.part<suffix>`, and renamed onto its name only when complete
(`atomic_path`). `OutputSet` does the same for files that belong together (a case's maps and its
JSON): all are written under temporary names, then renamed in the order they were added, so the
last one (the JSON) marks the set complete. Temporaries whose writing process is gone are removed
by `clean_stale_temporaries`, and `find_scans` never lists them (nor any hidden file).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import IfadError, IfadWarning
from .limits import GB, check_memory, check_voxels
from .locks import pid_alive

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Name endings (before .nii/.nii.gz) of ground-truth label maps (what `evaluate` pairs as masks).
GROUND_TRUTH_SUFFIXES = ("_mask", "_seg", "_dseg", "_label", "_labels", "_lesion", "_truth")
#: Name endings of files that are not scans: ifad-fast's outputs and ground-truth label maps.
#: Every search for scans skips them.
NON_SCAN_SUFFIXES = ("_anomaly", "_restoration", "_pred-mask", "_classes", "_ifad-classes",
                     "_ifad-brainmask", "_desc-anomaly_map", "_desc-restoration_map") + GROUND_TRUTH_SUFFIXES
#: Output name endings of a restored case, <case><suffix> (written by api.py, paired back by
#: pairing.py); the JSON is written last.
OUTPUT_FILES = dict(anomaly="_anomaly.nii.gz", restoration="_restoration.nii.gz", mask="_pred-mask.nii.gz",
                    figure="_figure.png", summary="_restore.json")
#: The same with `bids=True`: BIDS-derivative names (the source's name kept whole, a desc entity and a
#: suffix) in the source's sub-<label>[/ses-<label>]/anat folder; the JSON is the map's sidecar.
BIDS_OUTPUT_FILES = dict(anomaly="_desc-anomaly_map.nii.gz", restoration="_desc-restoration_map.nii.gz",
                         mask="_desc-anomaly_mask.nii.gz", figure="_desc-anomaly_figure.png",
                         summary="_desc-anomaly_map.json")

_TEMPORARY = re.compile(r"^\..+\.part(\.[A-Za-z0-9]+)*$")
_TEMPORARY_PID = re.compile(r"\.(\d+)-[a-z0-9_]+\.part(\.[A-Za-z0-9]+)*$")


@dataclass
class Scan:
    """A 3D scan: `data` float32 (X, Y, Z) in the file's voxel order, with its space."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def name(self) -> str:
        """The case name: the file name without its NIfTI suffix (`case_name`); 'scan' without a path."""
        return case_name(self.path) if self.path is not None else "scan"


def is_nifti(path: str | os.PathLike) -> bool:
    """True for names ending in .nii or .nii.gz (any letter case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def case_name(path: str | os.PathLike) -> str:
    """`/a/b/sub-01.nii.gz` (or `.NII.GZ`) -> `sub-01`."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------- temporaries


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the hidden `.<name>....part<suffix>` files that writes go through."""
    return bool(_TEMPORARY.match(Path(path).name))


def final_path(path: str | os.PathLike) -> Path:
    """The file a temporary stands for (`.<name>.<pid>-<random>.part<suffix>` -> `<name>`, also for a
    temporary of a temporary); any other path unchanged."""
    path = Path(path)
    while is_temporary(path) and _TEMPORARY_PID.search(path.name):
        path = path.with_name(_TEMPORARY_PID.sub("", path.name)[1:])
    return path


def _writer_alive(path: Path) -> bool:
    m = _TEMPORARY_PID.search(path.name)
    if not m:
        return False                    # written by an older ifad-fast (no pid in the name)
    return pid_alive(int(m.group(1)))


def clean_stale_temporaries(folder) -> list[Path]:
    """Remove the temporaries in `folder` whose writing process has ended (killed or crashed)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if is_temporary(p) and p.is_file() and not _writer_alive(p):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _new_temporary(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".part{suffix}", dir=path.parent)
    except OSError as exc:
        raise IfadError(describe_os_error(exc, path)) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # mkstemp creates 0600; give it a normal file's mode
    return Path(tmp)


# ----------------------------------------------------------------------------- errors


def describe_os_error(exc: OSError, path=None) -> str:
    """One line for an operating-system error on `path`: what went wrong and what to do.

    A temporary (see `atomic_path`) is named by the file it stands for.
    """
    where = final_path(path if path is not None else (exc.filename or "?"))
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on the device; free some space or write elsewhere"
    if code == errno.EROFS:
        return f"{where}: the file system is read-only; write elsewhere (e.g. another -o)"
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; check its permissions or use another folder"
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        blocked = final_path(exc.filename) if exc.filename else where
        return f"{blocked}: a file is in the way where a folder is needed; choose another path"
    return f"{where}: {exc.strerror or exc}"


def _write_error(exc: BaseException, path: Path) -> IfadError | None:
    """An IfadError for a failed write, or None to let the exception through unchanged."""
    path = final_path(path)
    if isinstance(exc, OSError):
        return IfadError(describe_os_error(exc, path))
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("unexpected pos", "PytorchStreamWriter",
                                                                       "file write failed")):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path.parent).free < 256 * 1024 ** 2:
                return IfadError(f"{path}: no space left on the device; free some space or write elsewhere")
        return IfadError(f"{path}: the write failed ({str(exc).splitlines()[0]}); check free space and permissions")
    return None


# ----------------------------------------------------------------------------- finding inputs


def bids_scans(root: Path) -> list[Path]:
    """The T2-weighted scans of a BIDS data set: sub-*/[ses-*/]anat/*_T2w.nii[.gz], sorted."""
    anat = [*root.glob("sub-*/anat"), *root.glob("sub-*/ses-*/anat")]
    return sorted(q for folder in anat for q in folder.iterdir() if case_name(q).endswith("_T2w"))


def find_scans(inputs, exclude_suffixes=NON_SCAN_SUFFIXES) -> list[Path]:
    """Expand files and folders into a list of NIfTI scan paths (folders sorted, in input order;
    a BIDS root, one holding dataset_description.json, gives its T2w scans, see `bids_scans`).

    Hidden files (temporaries included) and names ending in `exclude_suffixes` (outputs and
    masks) are skipped. Raises IfadError when an input does not exist or cannot be read, when
    nothing is found, or when two scans would get the same case name.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        try:
            if p.is_dir():
                files = bids_scans(p) if (p / "dataset_description.json").is_file() else sorted(p.iterdir())
                found.extend(q for q in files if is_nifti(q) and not q.name.startswith(".") and q.is_file())
            elif p.is_file():
                if is_temporary(p):
                    raise IfadError(f"{p}: a temporary left by an interrupted write, not a scan; delete it")
                found.append(p)
            else:
                raise IfadError(f"{p}: no such file or folder; check the path")
        except OSError as exc:
            raise IfadError(describe_os_error(exc, p)) from None
    kept = [p for p in found if not case_name(p).endswith(tuple(exclude_suffixes))]
    if not kept:
        raise IfadError(f"no NIfTI scans (.nii, .nii.gz) found in {', '.join(map(str, inputs))} (names ending "
                        f"in {', '.join(exclude_suffixes)} are taken for masks or outputs); "
                        "pass scan files or a folder that holds them")
    unique: list[Path] = []
    by_name: dict[str, Path] = {}
    for p in kept:
        name = case_name(p)
        if name in by_name:
            if by_name[name].resolve() == p.resolve():
                continue                                     # the same file given twice
            raise IfadError(f"two inputs would both be named {name!r}: {by_name[name]} and {p}; rename one "
                            "(e.g. sub-01_T2w.nii.gz) or process them separately into different -o folders")
        by_name[name] = p
        unique.append(p)
    return unique


def check_folder(path, what: str) -> Path:
    """`path` when it is a folder; else IfadError saying it is missing or a file, and to pass `what`."""
    path = Path(path)
    if not path.is_dir():
        raise IfadError(f"{path}: {'is a file, not a folder' if path.exists() else 'no such folder'}; pass {what}")
    return path


def check_output_folder(path, option: str = "-o") -> Path:
    """Check that `path` can be a writable output folder, creating nothing.

    Raises IfadError when it (or a parent) is a file, or the nearest existing folder is not
    writable.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise IfadError(f"{option} {path}: {what}; name a folder (it is created if missing)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise IfadError(f"{option} {path}: permission denied writing in {probe}; choose a folder you can write to")
    return path


# ----------------------------------------------------------------------------- reading


def open_nifti(path, max_voxels: int | None = None, what: str = "scan"):
    """Open a NIfTI file lazily and check its header: (image, 3D shape). No voxel is read.

    Raises IfadError when the file is missing, unreadable, not NIfTI, not 3D (or 4D with one
    volume), not real-valued, larger than `max_voxels` (None: limits.DEFAULT_MAX_VOXELS),
    truncated (uncompressed files), or its affine is singular or not finite, or comes from voxel
    sizes (pixdim, no sform) that are not positive. nibabel's notes on headers it fixes become
    warnings (the CLI prints them only after success), not log lines on stderr.
    """
    path = Path(path)
    if not path.is_file():
        raise IfadError(f"{path}: no such file; check the path")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise IfadError(describe_os_error(exc, path)) from None
    try:
        with _nibabel_notes_as_warnings():
            img = nib.load(str(path))
    except MemoryError:
        raise IfadError(f"{path}: not enough memory to open the file; free memory first") from None
    except Exception as exc:  # nibabel raises many types for foreign files
        raise IfadError(f"{path}: not a readable NIfTI file ({type(exc).__name__}); "
                        f"pass a .nii or .nii.gz {what}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise IfadError(f"{path}: not a NIfTI image; convert it to .nii.gz first")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise IfadError(f"{path}: expected a 3D volume, got shape {img.shape}; "
                        f"pass a single 3D {what} (split 4D series first)")
    if min(shape) < 2:
        raise IfadError(f"{path}: volume shape {shape} is too thin; pass a 3D {what}")
    dtype = img.get_data_dtype()
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise IfadError(f"{path}: voxel type {dtype} is not real-valued; convert the {what} to a numeric type")
    n = check_voxels(shape, max_voxels, str(path))
    if not path.name.lower().endswith(".gz"):
        need = int(img.header.get_data_offset()) + n * dtype.itemsize
        if path.stat().st_size < need:
            raise IfadError(f"{path}: the file is truncated ({path.stat().st_size:,} of {need:,} bytes); "
                            "re-export the scan")
    _check_voxel_sizes(img, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise IfadError(f"{path}: the header's voxel-to-world affine is singular or not finite; fix its "
                        "qform/sform (voxel sizes and orientation), e.g. with nibabel or fslorient")
    return img, shape


@contextlib.contextmanager
def _nibabel_notes_as_warnings():
    """nibabel's notes on the headers it fixes (logged to `nibabel.global`, straight to stderr)
    become warnings, so the CLI holds them until the command succeeds."""
    def divert(record):
        warnings.warn(f"nibabel: {record.getMessage()}", UserWarning, stacklevel=2)
        return False
    logger = logging.getLogger("nibabel.global")
    logger.addFilter(divert)
    try:
        yield
    finally:
        logger.removeFilter(divert)


def _check_voxel_sizes(img, path: Path) -> None:
    """IfadError when the geometry comes from pixdim (no sform) and its voxel sizes are not
    positive: nibabel would quietly read them as 1 mm. Read from the raw header, before its fixes."""
    hdr = img.header
    qform, sform = int(hdr["qform_code"]), int(hdr["sform_code"])
    if sform:
        return
    with nib.openers.ImageOpener(str(path)) as f:
        sizes = np.asarray(type(hdr).from_fileobj(f, check=False)["pixdim"][1:4], dtype=np.float64)
    if qform:
        sizes = np.abs(sizes)                  # with a qform a negative size is taken as its magnitude
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        orientation = "a qform" if qform else "no qform or sform"
        raise IfadError(f"{path}: the header's voxel sizes (pixdim) are {tuple(sizes.tolist())} with {orientation}; "
                        "set the real voxel sizes or an sform (e.g. with nibabel or fslorient)")


def _read_voxels(img, path: Path, shape) -> np.ndarray:
    """All voxels as float32 (X, Y, Z), with memory checked first and errors named."""
    n = int(np.prod(shape))
    itemsize = img.get_data_dtype().itemsize
    check_memory(n * (4 + itemsize), f"reading {path} ({shape})", "free memory or use a machine with more")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except MemoryError:
        raise IfadError(f"{path}: not enough memory to read {shape} ({n * 4 / GB:.1f} GB as float32); "
                        "free memory or use a machine with more") from None
    except Exception as exc:
        raise IfadError(f"{path}: could not read the voxel data ({type(exc).__name__}: the file "
                        "looks truncated or corrupt); re-export it") from None
    if not np.isfinite(data).all():
        with np.errstate(over="ignore", invalid="ignore"):
            raw = np.asanyarray(img.dataobj)
            finite_raw = bool(np.isfinite(raw).all())
            peak = float(np.abs(raw).max()) if finite_raw else 0.0
        del raw
        if finite_raw:
            raise IfadError(f"{path}: values up to {peak:.3g} are beyond float32's range "
                            f"(±{np.finfo(np.float32).max:.3g}); rescale the scan (e.g. to 0..1000) first")
        raise IfadError(f"{path}: contains NaN or Inf values; replace them (e.g. with 0) first")
    return data


def check_volume(data, label: str = "volume") -> np.ndarray:
    """Check an in-memory scan: a real, finite, 3D (X, Y, Z) array, not all zero. Returns it."""
    a = np.asarray(data)
    if a.ndim != 3:
        hint = " (drop the leading axis, e.g. volume[0])" if a.ndim == 4 and a.shape[0] == 1 else \
               " (drop the last axis, e.g. volume[..., 0])" if a.ndim == 4 and a.shape[-1] == 1 else ""
        raise IfadError(f"{label}: expected a 3D array (X, Y, Z), got shape {a.shape}{hint}")
    if min(a.shape) < 2:
        raise IfadError(f"{label}: volume shape {a.shape} is too thin; pass a 3D scan")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating) or a.dtype == np.bool_:
        raise IfadError(f"{label}: voxel type {a.dtype} is not real-valued intensities; pass a numeric array")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise IfadError(f"{label}: contains NaN or Inf values; replace them (e.g. with 0) first")
    if not a.any():
        raise IfadError(f"{label}: all voxels are zero; pass a skull-stripped scan with brain voxels")
    return a


def background_problem(data: np.ndarray, voxel_ml: float | None = None, voxel_mm=None) -> str | None:
    """Why `data` does not look skull-stripped with a zero background, or None when it does.

    A skull-stripped brain leaves most of the volume's border at 0 (more than half of the border
    voxels non-zero means a head, or noise, reaches the edges), fills at most ~55 % of its box
    even when cropped tightly (more than 85 % non-zero means no background), is smaller than
    3 L (when the voxel volume in mL is known) and has no bright shell of scalp around it (when
    the voxel sizes in mm are known, see `bright_shell`).
    """
    nz = data != 0
    faces = (nz[0], nz[-1], nz[:, 0], nz[:, -1], nz[:, :, 0], nz[:, :, -1])
    border = sum(int(f.sum()) for f in faces) / sum(f.size for f in faces)
    if border > 0.5:
        return f"{border:.0%} of the voxels on the volume's border are non-zero"
    field = float(nz.mean())
    if field > 0.85:
        return f"{field:.0%} of the field of view is non-zero"
    if voxel_ml is not None:
        litres = float(nz.sum()) * voxel_ml / 1000.0
        if litres > 3.0:
            return f"its non-zero region is {litres:.1f} L, larger than any brain"
    return None if voxel_mm is None else bright_shell(data, voxel_mm)


#: bright_shell's outer layer and the depth where the brain beneath it starts (mm)
SHELL_MM, DEEP_MM = 3.0, 15.0


def bright_shell(data: np.ndarray, voxel_mm) -> str | None:
    """Why the surface of `data`'s non-zero region looks like scalp left by a bad skull-strip, or None.

    Scalp is a shell brighter than the brain it wraps: more than 75 % of the outer SHELL_MM (at
    least a voxel) brighter than 95 % of the voxels deeper than DEEP_MM. A brain's own surface
    (cortex, CSF, partial volume) is darker than its brightest deep tissue over most of its area.
    """
    from scipy import ndimage

    nz = data != 0
    box = ndimage.find_objects(nz.astype(np.uint8))[0]
    sizes = np.asarray(voxel_mm, dtype=np.float64)
    depth = ndimage.distance_transform_edt(np.pad(nz[box], 1), sampling=sizes)[1:-1, 1:-1, 1:-1]
    values = data[box]
    shell = values[(depth > 0) & (depth <= max(SHELL_MM, sizes.max()))]
    deep = values[depth >= DEEP_MM]
    if deep.size < 1000 or shell.size == 0:              # too small to tell
        return None
    bright = float((shell > np.percentile(deep, 95)).mean())
    if bright > 0.75:
        return (f"{bright:.0%} of its outer {SHELL_MM:g} mm is brighter than 95% of the brain beneath it: "
                "scalp left around the brain")
    return None


def check_scan(data, affine=None, label: str = "volume", force: bool = False, voxel_ml: float | None = None,
               notes: list | None = None):
    """The input check of every scan, read by the CLI or passed to the API: `check_volume` (a 4D
    array with one volume taken as 3D) and `background_problem` (refused, or with `force` an
    IfadWarning, appended to `notes` instead of issued when a list is given). affine: voxel -> world
    in mm (voxel sizes, and volume unless `voxel_ml` is given). Returns the 3D array."""
    a = np.asarray(data)
    if a.ndim == 4 and a.shape[3] == 1:                  # NIfTI's 4D with one volume
        a = a[..., 0]
    check_volume(a, label)
    sizes = None if affine is None else np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))
    if voxel_ml is None and sizes is not None:
        voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    problem = background_problem(a, voxel_ml, sizes)
    if problem:
        message = f"{label}: does not look skull-stripped ({problem})"
        if not force:
            raise IfadError(f"{message}; the model needs the brain alone with background exactly 0: skull-strip "
                            "it first (e.g. SynthStrip, HD-BET or FSL bet), or pass --force to go on anyway")
        warning = IfadWarning(f"{message}; going on because of --force, but its anomaly map is likely meaningless")
        if notes is None:
            warnings.warn(warning, stacklevel=3)
        else:
            notes.append(warning)
    return a


def _voxel_ml(img) -> float | None:
    unit = img.header.get_xyzt_units()[0]
    scale = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 1e-3}.get(unit)
    if scale is None:
        return None
    return abs(float(np.linalg.det(np.asarray(img.affine)[:3, :3]))) * scale ** 3 / 1000.0


def load_scan(path: str | os.PathLike, max_voxels: int | None = None, force: bool = False,
              notes: list | None = None) -> Scan:
    """Read a 3D NIfTI (or 4D with one volume) as float32, checking it is usable.

    A scan that does not look skull-stripped (see `background_problem`) is refused, or with
    `force` read with an IfadWarning (appended to `notes` when a list is given: a loading thread's
    warnings, issued later by the thread that reports).
    """
    path = Path(path)
    img, shape = open_nifti(path, max_voxels)
    data = check_scan(_read_voxels(img, path, shape), img.affine, str(path), force, _voxel_ml(img), notes)
    header = img.header.copy()
    return Scan(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=header, path=path)


def read_volume(path, max_voxels: int | None = None, what: str = "map") -> np.ndarray:
    """Read any 3D NIfTI (an anomaly map, a mask) as float32 (X, Y, Z), with checked errors."""
    path = Path(path)
    img, shape = open_nifti(path, max_voxels, what)
    return _read_voxels(img, path, shape)


def header_shape(path, max_voxels: int | None = None, what: str = "map") -> tuple:
    """The 3D shape from a NIfTI header (checked as by `open_nifti`), without reading voxels."""
    return open_nifti(path, max_voxels, what)[1]


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Write failures (full disk, permission, read-only) become one-line IfadErrors naming `path`.
    """
    path = Path(path)
    tmp = _new_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = _write_error(exc, path)
        if err is not None:
            raise err from None
        raise


class OutputSet:
    """Files that appear together or not at all.

        with OutputSet() as outputs:
            save_volume(outputs.add(out / "a_anomaly.nii.gz"), ...)   # written under a temporary name
            save_json(outputs.add(out / "a_restore.json"), ...)       # added last: the completion marker

    When the block ends normally every temporary is renamed onto its final name, in the order
    they were added; on any exception (Ctrl-C, full disk) the temporaries are removed and the
    final names are left as they were.
    """

    def __init__(self):
        self._pairs: list[tuple[Path, Path]] = []

    def add(self, final) -> Path:
        """Reserve `final`; returns the temporary path to write it to."""
        final = Path(final)
        tmp = _new_temporary(final)
        self._pairs.append((tmp, final))
        return tmp

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                while self._pairs:
                    tmp, final = self._pairs[0]
                    try:
                        os.replace(tmp, final)
                    except OSError as err:
                        raise IfadError(describe_os_error(err, final)) from None
                    self._pairs.pop(0)
        finally:
            for tmp, _ in self._pairs:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self._pairs = []
        return False


def save_volume(path, data: np.ndarray, affine: np.ndarray, header=None, dtype=np.float32) -> Path:
    """Write `data` (X, Y, Z) as NIfTI with `affine` (and the source header's metadata), atomically.

    dtype is np.float32 (scores, intensities) or np.uint8 (classes, masks). When `affine` is the
    header's own, its qform and sform are kept exactly as given (codes included); otherwise both
    are set to `affine`.
    """
    path = Path(path)
    data = np.asarray(data).astype(dtype, copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    hdr = header.copy() if header is not None else None
    if hdr is not None and not isinstance(hdr, nib.Nifti1Header):
        hdr = nib.Nifti1Header.from_header(hdr)
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:
        img.header["cal_min"] = img.header["cal_max"] = 0    # the source's display range means nothing here
        if not np.allclose(hdr.get_best_affine(), affine, atol=1e-6):
            img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
            img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def _finite_json(obj):
    """`obj` with NaN and ±Inf floats replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def save_json(path, obj) -> Path:
    """Write JSON atomically; NaN and Inf become null, so the file is always valid JSON."""
    path = Path(path)
    text = json.dumps(_finite_json(json.loads(json.dumps(obj, default=_json_default))), indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
