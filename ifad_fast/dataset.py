"""Folders of scans <-> encoded model-grid volumes (the output of `ifad-fast prepare`).

A prepared folder holds `<case>_classes.nii.gz` (uint8, resolution³, with the model grid's
world affine), `<case>_brain.nii.gz` (uint8, the scan's non-zero support on the model grid: class 0
can hold brain voxels after min-max normalisation) and `manifest.json` (the preprocess settings,
frame included, centres, and per case its source, native shape, affine, model affine and
percentiles). The files are written as one set (io.OutputSet): class files under
temporary names, renamed at the end, the manifest last, so an interrupted prepare leaves no
class files without a manifest. `train` reads such a folder, or prepares raw scans into a cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import config as cfg
from .errors import IfadError
from .io import (OutputSet, case_name, clean_stale_temporaries, find_scans, header_shape, load_scan, save_json,
                 save_volume)
from .limits import check_memory, check_resolution, prepare_bytes
from .preprocess import IntensityEncoder, mode_pool3d, to_model_grid

MANIFEST = "manifest.json"
FIT_VOLUMES = 32


def prepare_scans(inputs, out_dir, pc: cfg.PreprocessConfig, mode_pool: int,
                  encoder: IntensityEncoder | None = None, k: int = 10, seed: int = 0,
                  progress: bool = True, overwrite: bool = False, force: bool = False,
                  max_voxels: int | None = None, report=None) -> dict:
    """Encode scans onto the model grid; fit the centres on them when `encoder` is None.

    Refuses a folder that already holds a prepared set (or any of the class files it would
    write) unless `overwrite`. A scan that cannot be read does not stop the others: the set is
    written without it and an IfadError naming every failed scan is raised at the end.
    force: go on with scans that do not look skull-stripped (with a warning).
    """
    check_resolution(pc.resolution, "prepare")
    if not 2 <= k <= 255:
        raise IfadError(f"--classes must be from 2 to 255 (background + tissue classes), got {k}")
    paths = find_scans(inputs)
    out_dir = Path(out_dir)
    targets = [out_dir / f"{case_name(p)}_classes.nii.gz" for p in paths]
    brain_targets = [out_dir / f"{case_name(p)}_brain.nii.gz" for p in paths]
    existing = [t for t in [out_dir / MANIFEST, *targets] if t.exists()]
    if existing and not overwrite:
        raise IfadError(f"{out_dir} already holds prepared outputs ({existing[0].name}"
                        f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}); "
                        "pass --overwrite to replace them or choose another -o")
    clean_stale_temporaries(out_dir)
    previous = _listed_class_files(out_dir) if overwrite else []
    failed: dict[Path, str] = {}
    for path in paths:                       # headers first: sizes, readability, memory before any work
        try:
            shape = header_shape(path, max_voxels, "scan")
            check_memory(prepare_bytes(pc.resolution, int(np.prod(shape)), max(shape) ** 3),
                         f"preparing {path} {shape}", "use a smaller --resolution or a machine with more memory")
        except IfadError as exc:
            failed[path] = str(exc)
    cached: dict[int, tuple] = {}
    if encoder is None:
        rng = np.random.default_rng(seed)
        readable = [i for i, p in enumerate(paths) if p not in failed]
        chosen = sorted(rng.choice(readable, min(len(readable), FIT_VOLUMES), replace=False)) if readable else []
        for i in tqdm(chosen, desc="fit centres", unit="scan", disable=None if progress else True):
            try:
                cached[i] = _to_grid(paths[i], pc, force, max_voxels)
            except IfadError as exc:
                failed[paths[i]] = str(exc)
        if not cached:
            raise IfadError(_failures(failed) if len(paths) == 1 else
                            f"no scan could be read to fit the intensity centres: {_failures(failed)}")
        encoder = IntensityEncoder.fit([c[0] for c in cached.values()], k=k, seed=seed,
                                       brains=[c[1].brain for c in cached.values()])
    cases = []
    with OutputSet() as outputs:
        for i, path in enumerate(tqdm(paths, desc="prepare", unit="scan", disable=None if progress else True)):
            if path in failed:
                continue
            try:
                volume, placement, percentiles, scan = cached.pop(i, None) or _to_grid(path, pc, force, max_voxels)
            except IfadError as exc:
                failed[path] = str(exc)
                if report:
                    report(f"{i + 1}/{len(paths)} {case_name(path)}: failed: {exc}")
                continue
            classes = encoder.encode(volume)
            if mode_pool > 1:
                classes = mode_pool3d(classes, mode_pool, encoder.n_classes)
            name = case_name(path)
            save_volume(outputs.add(targets[i]), classes, placement.model_affine, dtype=np.uint8)
            save_volume(outputs.add(brain_targets[i]), placement.brain, placement.model_affine, dtype=np.uint8)
            case = dict(name=name, source=str(path.resolve()), native_shape=list(scan.data.shape),
                        model_shape=list(classes.shape), affine=scan.affine.tolist(),
                        model_affine=placement.model_affine.tolist(), percentiles=list(percentiles))
            if placement.grid is not None:
                case.update(cube=placement.grid.cube, offset=list(placement.grid.offset))
            cases.append(case)
        manifest = dict(resolution=pc.resolution, clip_percentiles=list(pc.clip_percentiles),
                        frame=pc.frame, extent_mm=pc.extent_mm, normalisation=pc.normalisation,
                        mode_pool=mode_pool, centres=encoder.centres.tolist(), cases=cases,
                        failed={str(p): why for p, why in failed.items()})
        if cases:
            save_json(outputs.add(out_dir / MANIFEST), manifest)
    keep = {t.name for t in [*targets, *brain_targets]}
    for old in previous:
        if old.name not in keep:
            old.unlink(missing_ok=True)
    if failed:
        if len(paths) == 1:
            raise IfadError(_failures(failed))
        done = f"the other {len(cases)} were written to {out_dir}" if cases else "nothing was written"
        raise IfadError(f"{len(failed)} of {len(paths)} scans failed ({done}): {_failures(failed)}")
    return manifest


def _failures(failed: dict) -> str:
    return "; ".join(f"{why}" for why in failed.values())


def _listed_class_files(folder: Path) -> list[Path]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return [folder / f"{c['name']}{suffix}.nii.gz" for c in manifest["cases"] for suffix in ("_classes", "_brain")]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _to_grid(path, pc, force=False, max_voxels=None):
    scan = load_scan(path, max_voxels=max_voxels, force=force)
    volume, placement, percentiles = to_model_grid(scan.data, scan.affine, pc)
    return volume, placement, percentiles, scan


def manifest_preprocess(manifest: dict, pc: cfg.PreprocessConfig) -> cfg.PreprocessConfig:
    """pc with the frame and normalisation a prepared folder was made with (folders from before the
    physical frame: cube + upper)."""
    saved = {**cfg.LEGACY_PREPROCESS, **{k: manifest[k] for k in ("frame", "extent_mm", "normalisation")
                                          if k in manifest}}
    try:
        return cfg.replace(pc, clip_percentiles=tuple(manifest.get("clip_percentiles", pc.clip_percentiles)),
                           **saved)
    except (IfadError, TypeError) as exc:
        raise IfadError(f"{MANIFEST}: unusable preprocess settings ({exc}); run 'ifad-fast prepare' again") from None


def load_prepared(folder) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """A prepared folder -> (classes (N, R, R, R) uint8, brains (N, R, R, R) bool, case names, manifest).

    Folders from before brain masks were written get classes != 0 as their brains.
    """
    from .io import read_volume

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
    volumes, brains, names = [], [], []
    for case in manifest["cases"]:
        path = folder / f"{case['name']}_classes.nii.gz"
        if not path.is_file():
            raise IfadError(f"{path}: listed in the manifest but missing; run 'ifad-fast prepare' again")
        volume = read_volume(path, what="class volume")
        n_classes = len(manifest["centres"])
        if volume.shape != (manifest["resolution"],) * 3 or volume.min() < 0 or volume.max() >= n_classes:
            raise IfadError(f"{path}: not a class volume of this prepared set (shape or class ids); "
                            "run 'ifad-fast prepare' again")
        volumes.append(volume.astype(np.uint8))
        brain = folder / f"{case['name']}_brain.nii.gz"
        if brain.is_file():
            brain = read_volume(brain, what="brain mask")
            if brain.shape != volume.shape:
                raise IfadError(f"{folder / case['name']}_brain.nii.gz: not a brain mask of this prepared set "
                                "(shape); run 'ifad-fast prepare' again")
            brains.append(brain > 0)
        else:
            brains.append(volumes[-1] != 0)
        names.append(case["name"])
    if not volumes:
        raise IfadError(f"{folder}: the manifest lists no cases; prepare some scans first")
    return np.stack(volumes), np.stack(brains), names, manifest


def training_volumes(data_dir, pc: cfg.PreprocessConfig, centres: str | None, cache_dir,
                     k: int = 10, seed: int = 0, progress: bool = True, force: bool = False,
                     max_voxels: int | None = None):
    """Training data from a prepared folder, or from raw scans prepared into `cache_dir` once.

    Returns (classes (N, R, R, R) uint8, brains (N, R, R, R) bool, names, centres (C,) float64,
    the PreprocessConfig the volumes were made with: pc, or a prepared folder's frame and
    normalisation).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise IfadError(f"{data_dir}: no such folder; pass a folder of healthy scans or a prepared folder")
    if (data_dir / MANIFEST).is_file():
        volumes, brains, names, manifest = load_prepared(data_dir)
        if manifest["resolution"] != pc.resolution:
            raise IfadError(f"{data_dir} was prepared at {manifest['resolution']}³ but the model needs "
                            f"{pc.resolution}³; prepare again with --resolution {pc.resolution}")
        return volumes, brains, names, np.asarray(manifest["centres"]), manifest_preprocess(manifest, pc)
    cache_dir = Path(cache_dir)
    sources = sorted(str(p.resolve()) for p in find_scans([data_dir]))
    key = dict(resolution=pc.resolution, clip=list(pc.clip_percentiles), mode_pool=pc.train_mode_pool,
               frame=pc.frame, extent_mm=pc.extent_mm, normalisation=pc.normalisation,
               centres=centres, k=k, seed=seed, sources=sources)
    key_file = cache_dir / "cache_key.json"
    if not (key_file.is_file() and json.loads(key_file.read_text()) == key):
        encoder = IntensityEncoder.load(centres) if centres else None
        prepare_scans([data_dir], cache_dir, pc, pc.train_mode_pool, encoder, k=k, seed=seed, progress=progress,
                      overwrite=True, force=force, max_voxels=max_voxels)
        save_json(key_file, key)
    volumes, brains, names, manifest = load_prepared(cache_dir)
    return volumes, brains, names, np.asarray(manifest["centres"]), pc
