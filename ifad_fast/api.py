"""The Python API: load a model, restore arrays or files, evaluate score folders.

    import ifad_fast as ifad
    model = ifad.load_model("run/model.pt")          # or ifad.default_model()
    result = ifad.restore_array(model, volume)        # numpy (X, Y, Z) in, numpy maps out
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config as cfg
from .backends import make_backend, resolve_device
from .errors import IfadError
from .io import Scan, case_name, find_scans, load_scan, save_json, save_volume
from .model import Model, bundled_model_path, load_model
from .preprocess import IntensityEncoder, prepare
from .restore import Restoration, restore_classes

OUTPUT_SUFFIXES = ("_anomaly", "_restoration", "_mask", "_seg", "_classes")


def default_model(device="cpu") -> Model:
    """The bundled model (small preset, trained on synthetic brains)."""
    path = bundled_model_path()
    if not path.is_file():
        raise IfadError("no bundled default model in this install; pass -m MODEL (train one with 'ifad-fast train')")
    return load_model(path, device)


def restore_config(model: Model, schedule: str = "fast", **overrides) -> cfg.RestoreConfig:
    """The RestoreConfig of a named schedule (or 'STEPSxK[,STEPSxK...]'), with the model's training prior."""
    base = dict(prior=model.train.prior if model.train and model.train.prior == "paper" else "none",
                sigma=model.train.sigma if model.train else 0.01)
    base.update(cfg.SCHEDULES[schedule] if schedule in cfg.SCHEDULES else dict(phases=parse_phases(schedule)))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return cfg.RestoreConfig(**base)


def parse_phases(text: str) -> tuple:
    """'200x8192,30x32768' -> ((200, 8192), (30, 32768))."""
    try:
        phases = tuple(tuple(int(v) for v in part.split("x")) for part in text.split(","))
        if phases and all(len(p) == 2 and p[0] > 0 and p[1] > 0 for p in phases):
            return phases
    except ValueError:
        pass
    raise IfadError(f"unknown schedule {text!r}; use {', '.join(cfg.SCHEDULES)} or STEPSxPOINTS[,STEPSxPOINTS...]")


@dataclass
class NativeResult:
    """Outputs in the scan's own grid (X, Y, Z)."""

    anomaly: np.ndarray          # float32
    restoration: np.ndarray      # float32 intensities (normalised units) of the restored classes
    classes: np.ndarray          # uint8 restored classes
    model_grid: Restoration      # everything on the model grid
    seconds: float


def restore_arrays(model: Model, volumes: list[np.ndarray], rc: cfg.RestoreConfig | None = None,
                   backend="auto", device="cpu", precision="float32", region="brain",
                   progress=False) -> list[NativeResult]:
    """Restore native scans (each (X, Y, Z), skull-stripped, background 0) together."""
    rc = rc or restore_config(model)
    t0 = time.perf_counter()
    encoder = IntensityEncoder(model.centres.numpy())
    prepared = [prepare(np.asarray(v, dtype=np.float32), encoder, model.preprocess,
                        model.preprocess.test_mode_pool) for v in volumes]
    device = resolve_device(device) if isinstance(device, str) else device
    engine = make_backend(backend, model.decoder, device, precision) if isinstance(backend, str) else backend
    results = restore_classes(model, np.stack([p.classes for p in prepared]), rc, engine, device, precision,
                              brain=np.stack([p.normalised > 0 for p in prepared]), region=region,
                              progress=progress)
    seconds = (time.perf_counter() - t0) / len(volumes)
    out = []
    for p, r in zip(prepared, results):
        classes = p.grid.to_native(r.classes, mode="nearest")
        out.append(NativeResult(anomaly=p.grid.to_native(r.anomaly), restoration=encoder.decode(classes),
                                classes=classes, model_grid=r, seconds=seconds))
    return out


def restore_array(model: Model, volume: np.ndarray, **kwargs) -> NativeResult:
    return restore_arrays(model, [volume], **kwargs)[0]


def restore_files(model: Model, inputs, out_dir, rc: cfg.RestoreConfig | None = None, backend="auto",
                  device="cpu", precision="float32", region="brain", threshold=None, batch: int = 1,
                  progress=True, report=print) -> list[dict]:
    """Restore scans (files or folders) and write <case>_anomaly/_restoration[/_mask].nii.gz."""
    paths = find_scans(inputs, exclude_suffixes=OUTPUT_SUFFIXES)
    out_dir = Path(out_dir)
    rc = rc or restore_config(model)
    device = resolve_device(device) if isinstance(device, str) else device
    engine = make_backend(backend, model.decoder, device, precision) if isinstance(backend, str) else backend
    summaries = []
    for start in range(0, len(paths), max(batch, 1)):
        scans = [load_scan(p) for p in paths[start:start + max(batch, 1)]]
        results = restore_arrays(model, [s.data for s in scans], rc, engine, device, precision, region, progress)
        for scan, res in zip(scans, results):
            summaries.append(write_outputs(scan, res, out_dir, threshold, engine, rc, region))
            report(f"{scan.name}: {res.seconds:.1f} s, final loss {res.model_grid.losses[-1]:.4f}, "
                   f"max anomaly {res.anomaly.max():.3f} -> {out_dir}")
    return summaries


def write_outputs(scan: Scan, res: NativeResult, out_dir, threshold, engine, rc, region) -> dict:
    out_dir = Path(out_dir)
    name = scan.name
    files = dict(anomaly=save_volume(out_dir / f"{name}_anomaly.nii.gz", res.anomaly, scan.affine, scan.header),
                 restoration=save_volume(out_dir / f"{name}_restoration.nii.gz", res.restoration,
                                         scan.affine, scan.header))
    if threshold is not None:
        files["mask"] = save_volume(out_dir / f"{name}_mask.nii.gz", res.anomaly >= threshold,
                                    scan.affine, scan.header, dtype=np.uint8)
    summary = dict(case=name, source=str(scan.path), seconds=res.seconds, backend=getattr(engine, "name", "?"),
                   region=region, scored_voxels=res.model_grid.scored_voxels,
                   final_loss=res.model_grid.losses[-1] if res.model_grid.losses else None,
                   schedule=[list(p) for p in rc.phases], threshold=threshold,
                   files={k: str(v) for k, v in files.items()})
    save_json(out_dir / f"{name}_restore.json", summary)
    return summary


def read_case_maps(scores_dir, masks_dir) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Pair <case>_anomaly.nii.gz with <case>_mask.nii.gz or <case>.nii.gz; unpaired files are an error."""
    import nibabel as nib

    scores_dir, masks_dir = Path(scores_dir), Path(masks_dir)
    for d in (scores_dir, masks_dir):
        if not d.is_dir():
            raise IfadError(f"{d}: no such folder; pass folders of anomaly maps and masks")
    scores = {case_name(p)[: -len("_anomaly")]: p for p in scores_dir.iterdir() if case_name(p).endswith("_anomaly")}
    masks = {}
    for p in masks_dir.iterdir():
        if p.is_file() and p.name.endswith((".nii", ".nii.gz")):
            n = case_name(p)
            masks[n[: -len("_mask")] if n.endswith("_mask") else n] = p
    if not scores:
        raise IfadError(f"{scores_dir}: no <case>_anomaly.nii.gz files; run 'ifad-fast restore' first")
    unpaired = sorted(set(scores) - set(masks))
    if unpaired:
        raise IfadError(f"no mask for {', '.join(unpaired)} in {masks_dir}; "
                        "name masks <case>_mask.nii.gz or <case>.nii.gz")
    names = sorted(scores)
    s = [np.asarray(nib.load(str(scores[n])).dataobj, dtype=np.float32) for n in names]
    m = [np.asarray(nib.load(str(masks[n])).dataobj) > 0 for n in names]
    return names, s, m


def evaluate_folders(scores_dir, masks_dir, val_scores=None, val_masks=None, out_dir=None) -> dict:
    from .metrics import evaluate

    names, scores, masks = read_case_maps(scores_dir, masks_dir)
    val = read_case_maps(val_scores, val_masks) if val_scores else (None, None, None)
    result = evaluate(scores, masks, val[1], val[2], names=names)
    if out_dir is not None:
        save_json(Path(out_dir) / "metrics.json", result)
    return result
