"""Folders of scans <-> encoded model-grid volumes (the output of `ifad-fast prepare`).

A prepared folder holds `<case>_classes.nii.gz` (uint8, resolution³, with the model grid's
world affine) and `manifest.json` (settings, centres, and per case its source, native shape,
affine and percentiles). `train` reads such a folder, or prepares raw scans into a cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import config as cfg
from .errors import IfadError
from .io import case_name, find_scans, load_scan, save_json, save_volume
from .preprocess import IntensityEncoder, mode_pool3d, model_affine, to_model_grid

MANIFEST = "manifest.json"
FIT_VOLUMES = 32


def prepare_scans(inputs, out_dir, pc: cfg.PreprocessConfig, mode_pool: int,
                  encoder: IntensityEncoder | None = None, k: int = 10, seed: int = 0,
                  progress: bool = True) -> dict:
    """Encode scans onto the model grid; fit the centres on them when `encoder` is None."""
    paths = find_scans(inputs, exclude_suffixes=("_mask", "_seg", "_anomaly", "_restoration"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cached: dict[int, tuple] = {}
    if encoder is None:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(paths), min(len(paths), FIT_VOLUMES), replace=False))
        for i in tqdm(chosen, desc="fit centres", unit="scan", disable=None if progress else True):
            cached[i] = _to_grid(paths[i], pc)
        encoder = IntensityEncoder.fit([cached[i][0] for i in chosen], k=k, seed=seed)
    cases = []
    for i, path in enumerate(tqdm(paths, desc="prepare", unit="scan", disable=None if progress else True)):
        volume, grid, percentiles, scan = cached.pop(i, None) or _to_grid(path, pc)
        classes = encoder.encode(volume)
        if mode_pool > 1:
            classes = mode_pool3d(classes, mode_pool, encoder.n_classes)
        name = case_name(path)
        save_volume(out_dir / f"{name}_classes.nii.gz", classes, model_affine(grid, scan.affine), dtype=np.uint8)
        cases.append(dict(name=name, source=str(path.resolve()), native_shape=list(scan.data.shape),
                          model_shape=list(classes.shape), affine=scan.affine.tolist(),
                          percentiles=list(percentiles), cube=grid.cube, offset=list(grid.offset)))
    manifest = dict(resolution=pc.resolution, clip_percentiles=list(pc.clip_percentiles),
                    mode_pool=mode_pool, centres=encoder.centres.tolist(), cases=cases)
    save_json(out_dir / MANIFEST, manifest)
    return manifest


def _to_grid(path, pc):
    scan = load_scan(path)
    volume, grid, percentiles = to_model_grid(scan.data, pc)
    return volume, grid, percentiles, scan


def load_prepared(folder) -> tuple[np.ndarray, list[str], dict]:
    """A prepared folder -> (classes (N, R, R, R) uint8, case names, manifest)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise IfadError(f"{folder}: no readable {MANIFEST}; run 'ifad-fast prepare' on the scans first") from None
    import nibabel as nib
    volumes, names = [], []
    for case in manifest["cases"]:
        path = folder / f"{case['name']}_classes.nii.gz"
        if not path.is_file():
            raise IfadError(f"{path}: listed in the manifest but missing; run 'ifad-fast prepare' again")
        volumes.append(np.asarray(nib.load(str(path)).dataobj, dtype=np.uint8))
        names.append(case["name"])
    if not volumes:
        raise IfadError(f"{folder}: the manifest lists no cases; prepare some scans first")
    return np.stack(volumes), names, manifest


def training_volumes(data_dir, pc: cfg.PreprocessConfig, centres: str | None, cache_dir,
                     k: int = 10, seed: int = 0, progress: bool = True):
    """Training data from a prepared folder, or from raw scans prepared into `cache_dir` once.

    Returns (classes (N, R, R, R) uint8, names, centres (C,) float64).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise IfadError(f"{data_dir}: no such folder; pass a folder of healthy scans or a prepared folder")
    if (data_dir / MANIFEST).is_file():
        volumes, names, manifest = load_prepared(data_dir)
        if manifest["resolution"] != pc.resolution:
            raise IfadError(f"{data_dir} was prepared at {manifest['resolution']}³ but the model needs "
                            f"{pc.resolution}³; prepare again with --resolution {pc.resolution}")
        return volumes, names, np.asarray(manifest["centres"])
    cache_dir = Path(cache_dir)
    sources = sorted(str(p.resolve()) for p in find_scans([data_dir], exclude_suffixes=("_mask", "_seg")))
    key = dict(resolution=pc.resolution, clip=list(pc.clip_percentiles), mode_pool=pc.train_mode_pool,
               centres=centres, k=k, seed=seed, sources=sources)
    key_file = cache_dir / "cache_key.json"
    if not (key_file.is_file() and json.loads(key_file.read_text()) == key):
        encoder = IntensityEncoder.load(centres) if centres else None
        prepare_scans([data_dir], cache_dir, pc, pc.train_mode_pool, encoder, k=k, seed=seed, progress=progress)
        save_json(key_file, key)
    volumes, names, manifest = load_prepared(cache_dir)
    return volumes, names, np.asarray(manifest["centres"])
