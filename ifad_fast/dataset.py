"""Folders of scans <-> encoded model-grid volumes (the output of `ifad-fast prepare`).

A prepared folder holds `<case>_ifad-classes.nii.gz` (uint8, resolution³, with the model grid's
world affine), `<case>_ifad-brainmask.nii.gz` (uint8, the scan's non-zero support on the model grid:
class 0 can hold brain voxels after min-max normalisation) and `manifest.json` (the preprocess
settings, frame included, centres, and per case its source, files, native shape, affine, model
affine and percentiles). The names carry `ifad` so that they never meet a scan's (FSL bet writes
`<case>_brain.nii.gz`); folders prepared before are read under their old names. The files are
written as one set (io.OutputSet): class files under temporary names, renamed at the end, the
manifest last, so an interrupted prepare leaves no class files without a manifest.
`volumes.npy` and `brains.npy` hold the same classes and brain masks stacked ((N, R, R, R)
uint8) for training. `intensities.npy` ((N, R, R, R) float16) holds the normalised intensity
on the model grid that each case's classes were encoded from (preprocess.to_model_grid's
volume: clipped, min-max normalised, resampled to the grid, in [0, 1]; the classes are
mode_pool(encode(it)), the mode pool filtering on the same grid, so no averaging is needed; a
float16 rounding of at most 2⁻¹² can move a voxel that lies within it of a class boundary);
training's contrast, bias and noise augmentations (augment.py) re-encode it, and only they read
it. Folders prepared before it existed train as before; such an augmentation on them is refused
with a request to prepare again. `train` reads such a folder, or prepares raw scans into a cache.

Training memory-maps the stacks read-only: the volumes are stored once, in the OS page cache,
shared by every training process, and paged in and out when they do not fit in RAM. A folder
prepared without stacks (older versions) gets them built once in the run's cache. The stacks'
disk space is checked and allocated before they are mapped: a memory map over a sparse file
dies of SIGBUS when the disk fills, an allocation fails with a one-line error.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from . import config as cfg
from .errors import IfadError
from .io import (OutputSet, atomic_path, case_name, check_folder, clean_stale_temporaries, describe_os_error,
                 find_scans, header_shape, load_scan, save_json, save_volume)
from .limits import check_memory, check_resolution, prepare_bytes
from .preprocess import IntensityEncoder, fit_landmarks, mode_pool3d, scan_landmarks, to_model_grid
from .progress import progress_bar
from .register import registration_of

MANIFEST = "manifest.json"
STACKS = {"classes": "volumes.npy", "brains": "brains.npy"}      # (N, R, R, R) uint8 each
INTENSITIES = "intensities.npy"                                   # (N, R, R, R) float16: the intensities encoded
#: A case's files after its name; io.NON_SCAN_SUFFIXES keeps them from being read as scans.
CASE_FILES = {"classes": "_ifad-classes.nii.gz", "brain": "_ifad-brainmask.nii.gz"}
LEGACY_CASE_FILES = {"classes": "_classes.nii.gz", "brain": "_brain.nii.gz"}    # manifests without "files"
FIT_VOLUMES = 32


def _planned_files(paths, out_dir: Path, overwrite: bool):
    """The files prepare will write per scan ({path: {key: file}}) and the inputs ({resolved: path});
    IfadError if one of ours is an input, or already exists without `overwrite`."""
    files = {p: {key: out_dir / f"{case_name(p)}{suffix}" for key, suffix in CASE_FILES.items()} for p in paths}
    ours = [out_dir / MANIFEST, *(out_dir / name for name in STACKS.values()), out_dir / INTENSITIES,
            *(f for case in files.values() for f in case.values())]
    inputs = {p.resolve(): p for p in paths}
    for f in ours:
        if f.resolve() in inputs:
            raise IfadError(f"{f} would overwrite the input {inputs[f.resolve()]}; choose another -o")
    existing = [f for f in ours if os.path.lexists(f)]
    if existing and not overwrite:
        raise IfadError(f"{out_dir} already holds prepared outputs ({existing[0].name}"
                        f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}); "
                        "pass --overwrite to replace them or choose another -o")
    return files, inputs


def _unusable_headers(paths, pc: cfg.PreprocessConfig, max_voxels) -> dict[Path, str]:
    """{path: why} for the scans whose header is unreadable, too large, or needs more memory than
    this machine has to prepare (read from the headers only)."""
    failed: dict[Path, str] = {}
    for path in paths:
        try:
            shape = header_shape(path, max_voxels, "scan")
            check_memory(prepare_bytes(pc.resolution, int(np.prod(shape)), max(shape) ** 3),
                         f"preparing {path} {shape}", "use a smaller --resolution or a machine with more memory")
        except IfadError as exc:
            failed[path] = str(exc)
    return failed


def _manifest_case(name: str, path: Path, files: dict, scan, classes, placement, percentiles) -> dict:
    """A prepared case's entry in manifest.json."""
    case = dict(name=name, source=str(path.resolve()), files={k: f.name for k, f in files.items()},
                native_shape=list(scan.data.shape), model_shape=list(classes.shape), affine=scan.affine.tolist(),
                model_affine=placement.model_affine.tolist(), percentiles=list(percentiles))
    if placement.grid is not None:
        case.update(cube=placement.grid.cube, offset=list(placement.grid.offset))
    registration = registration_of(placement.native_affine, scan.affine)
    if registration is not None:
        case["registration"] = registration
    return case


def _fit_encoder(paths, chosen, pc, k: int, seed: int, cached: dict, failed: dict, force, max_voxels,
                 progress) -> IntensityEncoder:
    """k-means centres fitted on the scans paths[i], i in `chosen`, on the model grid; each one read
    is kept in `cached` (i -> _to_grid's result), each that fails goes into `failed`."""
    for i in progress_bar(chosen, desc="fit centres", unit="scan", disable=None if progress else True):
        try:
            cached[i] = _to_grid(paths[i], pc, force, max_voxels)
        except IfadError as exc:
            failed[paths[i]] = str(exc)
    if not cached:
        raise IfadError(_failures(failed) if len(paths) == 1 else
                        f"no scan could be read to fit the intensity centres: {_failures(failed)}")
    return IntensityEncoder.fit([c[0] for c in cached.values()], k=k, seed=seed,
                                brains=[c[1].brain for c in cached.values()])


def prepare_scans(inputs, out_dir, pc: cfg.PreprocessConfig, mode_pool: int,
                  encoder: IntensityEncoder | None = None, k: int = 10, seed: int = 0,
                  progress: bool = True, overwrite: bool = False, force: bool = False,
                  max_voxels: int | None = None, report=None) -> dict:
    """Encode scans onto the model grid; fit the centres on them when `encoder` is None.

    Never replaces an input; refuses a folder that already holds any file it would write unless
    `overwrite`, which also removes the files of the folder's previous set that the new one does
    not list. A scan that cannot be read does not stop the others: the set is written without it
    and an IfadError naming every failed scan is raised at the end.
    force: go on with scans that do not look skull-stripped (with a warning).
    """
    check_resolution(pc.resolution, "prepare")
    if not 2 <= k <= 255:
        raise IfadError(f"--classes must be from 2 to 255 (background + tissue classes), got {k}")
    paths = find_scans(inputs)
    out_dir = Path(out_dir)
    files, inputs = _planned_files(paths, out_dir, overwrite)
    clean_stale_temporaries(out_dir)
    previous = _listed_files(out_dir) if overwrite else []
    failed = _unusable_headers(paths, pc, max_voxels)     # sizes, readability, memory before any work
    if len(failed) < len(paths):
        _check_room(out_dir, (len(paths) - len(failed),) + (pc.resolution,) * 3, intensities=True)
    cached: dict[int, tuple] = {}
    rng = np.random.default_rng(seed)
    readable = [i for i, p in enumerate(paths) if p not in failed]
    chosen = sorted(rng.choice(readable, min(len(readable), FIT_VOLUMES), replace=False)) if readable else []
    if pc.standardise and not pc.landmarks:
        pc = cfg.replace(pc, landmarks=_fit_landmarks([paths[i] for i in chosen], pc, failed, force, max_voxels,
                                                      progress))
    if encoder is None:
        encoder = _fit_encoder(paths, chosen, pc, k, seed, cached, failed, force, max_voxels, progress)
    cases = []
    with OutputSet() as outputs:
        stacks = _StackWriter(outputs, out_dir, len(paths) - len(failed))
        shown = progress_bar(paths, desc="prepare", unit="scan", disable=None if progress else True)
        for i, path in enumerate(shown):
            if path in failed:
                continue
            try:
                volume, placement, percentiles, scan = cached.pop(i, None) or _to_grid(path, pc, force, max_voxels)
            except IfadError as exc:
                failed[path] = str(exc)
                if report and len(paths) > 1:          # one scan: its error line says it
                    report(f"{i + 1}/{len(paths)} {case_name(path)}: failed: {exc}")
                continue
            classes = encoder.encode(volume)
            if mode_pool > 1:
                classes = mode_pool3d(classes, mode_pool, encoder.n_classes)
            name = case_name(path)
            save_volume(outputs.add(files[path]["classes"]), classes, placement.model_affine, dtype=np.uint8)
            save_volume(outputs.add(files[path]["brain"]), placement.brain, placement.model_affine, dtype=np.uint8)
            stacks.add(len(cases), classes=classes, brains=placement.brain, intensities=volume)
            cases.append(_manifest_case(name, path, files[path], scan, classes, placement, percentiles))
        stacks.close(len(cases))
        manifest = dict(resolution=pc.resolution, clip_percentiles=list(pc.clip_percentiles),
                        frame=pc.frame, extent_mm=pc.extent_mm, normalisation=pc.normalisation,
                        percentile_region=pc.percentile_region, bias_correction=pc.bias_correction,
                        standardise=pc.standardise, **({"register": True} if pc.register else {}),
                        landmarks=list(pc.landmarks), mode_pool=mode_pool,
                        centres=encoder.centres.tolist(), cases=cases,
                        failed={str(p): why for p, why in failed.items()}, stacks=STACKS, intensities=INTENSITIES)
        if cases:
            save_json(outputs.add(out_dir / MANIFEST), manifest)
    listed = {out_dir / name for case in cases for name in case["files"].values()}
    for old in previous if cases else ():
        if old not in listed and old.resolve() not in inputs:
            old.unlink(missing_ok=True)
    if failed:
        if len(paths) == 1:
            raise IfadError(_failures(failed))
        done = f"the other {len(cases)} were written to {out_dir}" if cases else "nothing was written"
        raise IfadError(f"{len(failed)} of {len(paths)} scans failed ({done}): {_failures(failed)}")
    return manifest


class _StackWriter:
    """The set's classes and brains stacked into STACKS and its intensities into INTENSITIES (float16),
    written through `outputs` (so renamed with the set, before its manifest) case by case;
    `close(n)` trims them to the n cases written."""

    NAMES = {**STACKS, "intensities": INTENSITIES}
    DTYPES = {"intensities": np.float16}

    def __init__(self, outputs: OutputSet, out_dir: Path, capacity: int):
        self.outputs, self.out_dir, self.capacity, self.arrays = outputs, Path(out_dir), capacity, None

    def _open(self, n: int, shape) -> dict:
        return {key: _new_stack(self.outputs.add(self.out_dir / name), self.out_dir / name, (n,) + tuple(shape),
                                self.DTYPES.get(key, np.uint8))
                for key, name in self.NAMES.items()}

    def add(self, row: int, **volumes):
        if self.arrays is None:
            self.arrays = self._open(self.capacity, volumes["classes"].shape)
        for key, volume in volumes.items():
            self.arrays[key][row] = volume

    def close(self, n: int):
        if self.arrays is None:
            return
        if n < self.capacity:              # a scan failed while reading: shorter stacks, renamed after
            full, self.arrays = self.arrays, self._open(n, self.arrays["classes"].shape[1:])
            for key in full:
                for row in range(n):
                    self.arrays[key][row] = full[key][row]
        for array in self.arrays.values():
            array.flush()
        self.arrays = None


def _check_room(folder: Path, shape, intensities: bool = False):
    """IfadError unless the disk of `folder` has room for both STACKS of `shape` (uint8) and, with
    `intensities`, the INTENSITIES stack (float16)."""
    need, probe = (len(STACKS) + 2 * intensities) * math.prod(shape), folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        also = f"{STACKS['brains']}{f' and {INTENSITIES}' if intensities else ''}"
        raise IfadError(f"{folder / STACKS['classes']}: no space left on the device (it and {also} "
                        f"need {need / 2 ** 20:.3g} MB, {free / 2 ** 20:.3g} MB are free); "
                        "free some space or write elsewhere")


def _new_stack(tmp: Path, final: Path, shape, dtype=np.uint8) -> np.memmap:
    """A zeroed .npy of `shape` and `dtype` (uint8 by default) at `tmp`, memory-mapped for writing, its
    disk blocks allocated first (so a full disk is an IfadError naming `final`, not a SIGBUS in the map)."""
    dtype = np.dtype(dtype)
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, dict(descr=np.lib.format.dtype_to_descr(dtype),
                                                         fortran_order=False, shape=tuple(shape)))
            _allocate(f, f.tell() + math.prod(shape) * dtype.itemsize)
        return np.lib.format.open_memmap(tmp, mode="r+")
    except OSError as exc:
        raise IfadError(describe_os_error(exc, final)) from None


def _allocate(f, size: int):
    """Extend the open file `f` to `size` bytes of real (not sparse) disk blocks, from its end."""
    f.flush()
    try:
        os.posix_fallocate(f.fileno(), 0, size)
        return
    except AttributeError:                                   # no fallocate on this system (macOS)
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):    # else: not on this file system
            raise
    zeros = bytes(1 << 20)
    while f.tell() < size:
        f.write(zeros[:size - f.tell()])


def _failures(failed: dict) -> str:
    return "; ".join(f"{why}" for why in failed.values())


def _case_files(folder: Path, case: dict) -> dict[str, Path]:
    """A listed case's class volume and brain mask (by their old names in folders prepared before
    the manifest named them). ValueError, KeyError or TypeError for a malformed entry."""
    names = case.get("files") or {key: f"{case['name']}{suffix}" for key, suffix in LEGACY_CASE_FILES.items()}
    paths = {key: folder / names[key] for key in CASE_FILES}
    if any(p.parent != folder or p.name in ("", ".", "..") for p in paths.values()):
        raise ValueError("a case file outside the folder")
    return paths


def _listed_files(folder: Path) -> list[Path]:
    """The case files listed by the manifest in `folder` (none when it has no readable one)."""
    try:
        return [f for case in json.loads((folder / MANIFEST).read_text())["cases"]
                for f in _case_files(folder, case).values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _fit_landmarks(paths, pc, failed: dict, force, max_voxels, progress) -> tuple:
    """The standard intensity scale of `paths` (preprocess.fit_landmarks); unreadable scans go to `failed`."""
    own = []
    for path in progress_bar(paths, desc="fit landmarks", unit="scan", disable=None if progress else True):
        try:
            own.append(scan_landmarks(load_scan(path, max_voxels=max_voxels, force=force).data, pc))
        except IfadError as exc:
            failed[path] = str(exc)
    if not own:
        raise IfadError(f"no scan could be read to fit the intensity landmarks: {_failures(failed)}")
    return fit_landmarks(own)


def _to_grid(path, pc, force=False, max_voxels=None):
    scan = load_scan(path, max_voxels=max_voxels, force=force)
    volume, placement, percentiles = to_model_grid(scan.data, scan.affine, pc)
    return volume, placement, percentiles, scan


def manifest_preprocess(manifest: dict, pc: cfg.PreprocessConfig) -> cfg.PreprocessConfig:
    """pc with the frame and normalisation a prepared folder was made with (folders from before the
    physical frame: cube + upper; from before percentile_region: brain)."""
    saved = {**cfg.LEGACY_PREPROCESS, "percentile_region": "brain", "bias_correction": False, "standardise": False,
             "register": False, "landmarks": (),
             **{k: manifest[k] for k in ("frame", "extent_mm", "normalisation", "percentile_region",
                                         "bias_correction", "standardise", "register") if k in manifest}}
    if "landmarks" in manifest:
        saved["landmarks"] = tuple(manifest["landmarks"])
    try:
        return cfg.replace(pc, clip_percentiles=tuple(manifest.get("clip_percentiles", pc.clip_percentiles)),
                           **saved)
    except (IfadError, TypeError) as exc:
        raise IfadError(f"{MANIFEST}: unusable preprocess settings ({exc}); run 'ifad-fast prepare' again") from None


def read_manifest(folder) -> dict:
    """The manifest of a prepared folder, checked (its fields, its class files present)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise IfadError(f"{folder}: no readable {MANIFEST}; run 'ifad-fast prepare' on the scans first") from None
    if isinstance(manifest, dict) and manifest.get("generator") == "ifad_fast.synth":
        raise IfadError(f"{folder} is the root of an 'ifad-fast synth' set, not a prepared folder; "
                        f"train on its healthy scans: {folder / 'healthy'}")
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), list)
            or not isinstance(manifest.get("resolution"), int) or not isinstance(manifest.get("centres"), list)
            or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in manifest["cases"])):
        raise IfadError(f"{folder / MANIFEST}: not a manifest written by 'ifad-fast prepare'; "
                        "pass a folder of scans or the output of 'ifad-fast prepare'")
    if not manifest["cases"]:
        raise IfadError(f"{folder}: the manifest lists no cases; prepare some scans first")
    for case in manifest["cases"]:
        try:
            path = _case_files(folder, case)["classes"]
        except (ValueError, KeyError, TypeError):
            raise IfadError(f"{folder / MANIFEST}: case {case['name']!r} names unusable files; "
                            "run 'ifad-fast prepare' again") from None
        if not path.is_file():
            raise IfadError(f"{path}: listed in the manifest but missing; run 'ifad-fast prepare' again")
    return manifest


def _read_cases(folder: Path, manifest: dict, classes_out: np.ndarray, brains_out: np.ndarray):
    """Every case's class volume and brain mask, checked, into the (N, R, R, R) outputs.

    Folders from before brain masks were written get classes != 0 as their brains.
    """
    from .io import read_volume

    n_classes = len(manifest["centres"])
    for i, case in enumerate(manifest["cases"]):
        files = _case_files(folder, case)
        path, brain = files["classes"], files["brain"]
        volume = read_volume(path, what="class volume")
        if volume.shape != (manifest["resolution"],) * 3 or volume.min() < 0 or volume.max() >= n_classes:
            raise IfadError(f"{path}: not a class volume of this prepared set (shape or class ids); "
                            "run 'ifad-fast prepare' again")
        classes_out[i] = volume
        if brain.is_file():
            mask = read_volume(brain, what="brain mask")
            if mask.shape != volume.shape:
                raise IfadError(f"{brain}: not a brain mask of this prepared set (shape); "
                                "run 'ifad-fast prepare' again")
            brains_out[i] = mask > 0
        else:
            brains_out[i] = volume != 0


def _stacks_fit(folder: Path, shape) -> bool:
    """Whether `folder` holds STACKS of `shape`, uint8."""
    for name in STACKS.values():
        try:
            stack = np.load(folder / name, mmap_mode="r")
        except (OSError, ValueError):
            return False
        if stack.dtype != np.uint8 or stack.shape != tuple(shape):
            return False
    return True


def _open_stacks(folder: Path):
    return tuple(np.load(folder / STACKS[key], mmap_mode="r") for key in ("classes", "brains"))


def load_intensities(volumes) -> tuple[np.ndarray | None, int | None]:
    """The INTENSITIES stack beside a training class stack (a memmap of a prepared folder's or cache's
    `volumes.npy`) and the mode pool its classes were made with: (float16 memmap (N, R, R, R), the
    manifest's mode_pool), or (None, None) where the folder has none (prepared by an older ifad-fast)."""
    filename = getattr(volumes, "filename", None)
    if filename is None:
        return None, None
    folder = Path(filename).parent
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        stack = np.load(folder / INTENSITIES, mmap_mode="r")
    except (OSError, ValueError):
        return None, None
    if (not isinstance(manifest, dict) or manifest.get("intensities") != INTENSITIES
            or stack.dtype != np.float16 or stack.shape != tuple(volumes.shape)):
        return None, None
    pool = manifest.get("mode_pool")
    return stack, pool if isinstance(pool, int) and not isinstance(pool, bool) and pool in (1, 2, 3) else None


def load_prepared(folder, cache_dir=None) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """A prepared folder -> (classes (N, R, R, R) uint8, brains (N, R, R, R) uint8 or bool, case names,
    manifest).

    The folder's stacks (`volumes.npy`, `brains.npy`) memory-mapped read-only when it has them;
    else, with `cache_dir`, stacks built there once (reused while the manifest is unchanged) and
    memory-mapped; else read into memory.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    names = [case["name"] for case in manifest["cases"]]
    shape = (len(names),) + (manifest["resolution"],) * 3
    if manifest.get("stacks") == STACKS and _stacks_fit(folder, shape):
        return (*_open_stacks(folder), names, manifest)
    if cache_dir is None:
        volumes, brains = np.empty(shape, dtype=np.uint8), np.empty(shape, dtype=bool)
        _read_cases(folder, manifest, volumes, brains)
        return volumes, brains, names, manifest
    cache_dir = Path(cache_dir)
    key = dict(folder=str(folder.resolve()), manifest=hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest())
    key_file = cache_dir / "stacks_key.json"
    if not (key_file.is_file() and json.loads(key_file.read_text()) == key and _stacks_fit(cache_dir, shape)):
        clean_stale_temporaries(cache_dir)
        _check_room(cache_dir, shape)
        with atomic_path(cache_dir / STACKS["classes"]) as classes_tmp, \
                atomic_path(cache_dir / STACKS["brains"]) as brains_tmp:
            stacks = [_new_stack(tmp, cache_dir / name, shape)
                      for tmp, name in ((classes_tmp, STACKS["classes"]), (brains_tmp, STACKS["brains"]))]
            _read_cases(folder, manifest, *stacks)
            for stack in stacks:
                stack.flush()
            del stacks
        save_json(key_file, key)
    return (*_open_stacks(cache_dir), names, manifest)


def _cached_classes(cache_dir: Path):
    """The class stack of a cache folder, memory-mapped (None when unreadable)."""
    try:
        return np.load(cache_dir / STACKS["classes"], mmap_mode="r")
    except (OSError, ValueError):
        return None


def training_volumes(data_dir, pc: cfg.PreprocessConfig, centres: str | None, cache_dir,
                     k: int = 10, seed: int = 0, progress: bool = True, force: bool = False,
                     max_voxels: int | None = None, intensities: bool = False):
    """Training data from a prepared folder, or from raw scans prepared into `cache_dir` once.

    intensities: the run reads the INTENSITIES stack (load_intensities): a cache prepared by an
    older ifad-fast without it is prepared again.

    Returns (classes (N, R, R, R) uint8, brains (N, R, R, R) uint8 -- both read-only memmaps --,
    names, centres (C,) float64, the PreprocessConfig the volumes were made with: pc, or a
    prepared folder's frame and normalisation).
    """
    data_dir = check_folder(data_dir, "a folder of healthy scans or a prepared folder")
    if (data_dir / MANIFEST).is_file():
        manifest = read_manifest(data_dir)
        if manifest["resolution"] != pc.resolution:
            raise IfadError(f"{data_dir} was prepared at {manifest['resolution']}³ but the model needs "
                            f"{pc.resolution}³; prepare again with --resolution {pc.resolution}")
        volumes, brains, names, manifest = load_prepared(data_dir, cache_dir)
        return volumes, brains, names, np.asarray(manifest["centres"]), manifest_preprocess(manifest, pc)
    cache_dir = Path(cache_dir)
    sources = sorted(str(p.resolve()) for p in find_scans([data_dir]))
    key = dict(resolution=pc.resolution, clip=list(pc.clip_percentiles), mode_pool=pc.train_mode_pool,
               frame=pc.frame, extent_mm=pc.extent_mm, normalisation=pc.normalisation,
               percentile_region=pc.percentile_region, bias_correction=pc.bias_correction,
               standardise=pc.standardise, landmarks=list(pc.landmarks),
               centres=centres, k=k, seed=seed, sources=sources, **({"register": True} if pc.register else {}))
    key_file = cache_dir / "cache_key.json"
    if not (key_file.is_file() and json.loads(key_file.read_text()) == key
            and not (intensities and load_intensities(_cached_classes(cache_dir))[0] is None)):
        encoder = IntensityEncoder.load(centres) if centres else None
        prepare_scans([data_dir], cache_dir, pc, pc.train_mode_pool, encoder, k=k, seed=seed, progress=progress,
                      overwrite=True, force=force, max_voxels=max_voxels)
        save_json(key_file, key)
    volumes, brains, names, manifest = load_prepared(cache_dir, cache_dir)
    return volumes, brains, names, np.asarray(manifest["centres"]), manifest_preprocess(manifest, pc)
