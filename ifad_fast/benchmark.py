"""`ifad-fast bench accuracy` and `ifad-fast bench speed`.

Accuracy: held-out glioma-like cases synthesised from the MNI152 maps (validation set: lesion
seed 1; test set: lesion seed 2; the bundled model trained on healthy seed 0), scored by the
model and by the voxel-wise mean-image baseline, in the paper's Table 1 columns.
"""
from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

VAL_SEED, TEST_SEED, TRAIN_SEED = 1, 2, 0


def machine() -> str:
    import os
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def mean_image(pc, n_healthy: int, progress=True) -> np.ndarray:
    """Mean normalised model-grid image of the healthy training subjects (each placed by the model's frame)."""
    from .preprocess import to_model_grid
    from .synth import generate_healthy

    total = None
    for i in tqdm(range(n_healthy), desc="mean image", unit="scan", disable=None if progress else True):
        case = generate_healthy(i, seed=TRAIN_SEED)
        vol = to_model_grid(case.image, case.affine, pc)[0]
        total = vol.astype(np.float64) if total is None else total + vol
    return (total / n_healthy).astype(np.float32)


def baseline_map(image: np.ndarray, mean: np.ndarray, pc, rc, affine=None) -> np.ndarray:
    """|scan − mean healthy image| on the model grid, the same post-processing, back to native."""
    from .preprocess import to_model_grid
    from .restore import postprocess

    vol, placement, _ = to_model_grid(image, affine, pc)
    score = postprocess(np.abs(vol - mean), rc.min_pool, rc.avg_pool)
    score[~placement.brain] = 0.0
    return placement.to_native(score)


def accuracy(quick=False, backend="auto", device="auto", out_dir=None, model=None, schedule="fast",
             n_test=None, n_val=None, report=print) -> dict:
    from .api import default_model, restore_array, restore_config
    from .backends import resolve_device
    from .metrics import evaluate, format_table
    from .synth import generate_lesion

    device = resolve_device(device)
    model = model or default_model(device)
    n_test = n_test or (4 if quick else 24)
    n_val = n_val or (2 if quick else 6)
    n_healthy = len(model.latents) if model.latents.numel() else 16
    rc = restore_config(model, schedule)
    mean = mean_image(model.preprocess, min(n_healthy, 8 if quick else n_healthy))

    def score_set(seed, n, label):
        maps, base, masks, names, seconds = [], [], [], [], []
        for j in tqdm(range(n), desc=label, unit="case"):
            case = generate_lesion(j, seed=seed)
            t0 = time.perf_counter()
            res = restore_array(model, case.image, case.affine, rc=rc, backend=backend, device=device)
            seconds.append(time.perf_counter() - t0)
            maps.append(res.anomaly)
            base.append(baseline_map(case.image, mean, model.preprocess, rc, case.affine))
            masks.append(case.mask > 0)
            names.append(case.name)
        return maps, base, masks, names, seconds

    vm, vb, vmask, _, _ = score_set(VAL_SEED, n_val, "validation")
    tm, tb, tmask, names, seconds = score_set(TEST_SEED, n_test, "test")
    ours = evaluate(tm, tmask, vm, vmask, names=names)
    ours["seconds_per_case"] = float(np.mean(seconds))
    base = evaluate(tb, tmask, vb, vmask, names=names)
    table = "\n".join([format_table(ours, f"IF 3D, bundled model ({schedule})"),
                       format_table(base, "mean-image baseline").splitlines()[-1]])
    result = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(),
                  schedule=schedule, backend=backend, n_test=n_test, n_val=n_val, model=ours, baseline=base,
                  restore=dict(phases=[list(p) for p in rc.phases], init=rc.init, lr=rc.lr, prior=rc.prior))
    report(table)
    report("per-case Dice (model / baseline): " + ", ".join(
        f"{a['name']} {a['dice']:.2f}/{b['dice']:.2f}" for a, b in zip(ours["per_case"], base["per_case"])))
    if out_dir:
        from .io import save_json
        save_json(Path(out_dir) / "accuracy.json", result)
        (Path(out_dir) / "accuracy.md").write_text(table + "\n")
    return result


def speed(quick=False, backend="auto", device="auto", out_dir=None, report=print) -> dict:
    """Times the restoration pieces for the paper-sized model on one volume (ifad_fast/speed.py);
    writes speed.json into out_dir when given. Returns the numbers as a dict."""
    from .speed import run
    result = run(quick=quick, backend=backend, device=device, report=report)
    if out_dir:
        from .io import save_json
        save_json(Path(out_dir) / "speed.json", result)
    return result


def calibrate_and_bundle(model_path, out_path, n_val: int = 6, schedule: str = "fast", report=print):
    """Store the validation set's best-Dice threshold (lesion seed 1) in the model's info and save it."""
    from .api import restore_array, restore_config
    from .metrics import curve_metrics
    from .model import load_model, save_model
    from .synth import generate_lesion

    model = load_model(model_path)
    rc = restore_config(model, schedule)
    maps, masks = [], []
    for j in tqdm(range(n_val), desc="calibrate", unit="case"):
        case = generate_lesion(j, seed=VAL_SEED)
        maps.append(restore_array(model, case.image, case.affine, rc=rc, backend="auto", device="cpu").anomaly.ravel())
        masks.append(case.mask.ravel() > 0)
    curve = curve_metrics(np.concatenate(maps), np.concatenate(masks))
    model.info = dict(model.info or {}, threshold=float(curve["threshold"]), threshold_schedule=schedule,
                      threshold_set=f"synthetic lesions, seed {VAL_SEED}, {n_val} cases",
                      trained_on="synthetic MNI152 healthy brains (ifad-fast synth --healthy 48 --seed 0)",
                      reproduce="bash bench/bundle_model.sh")
    save_model(model, out_path)
    report(f"threshold {curve['threshold']:.4g} (validation [DICE] {curve['dice_best']:.3f}) -> {out_path}")
    return model
