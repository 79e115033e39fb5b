"""`ifad-fast demo`: synthesise a lesion case, restore it with the bundled model, show the result."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run_demo(out_dir="ifad_demo", seed: int = 0, backend="auto", device="auto", report=print) -> dict:
    """Synthesise a lesion case, restore it with the bundled model, write maps, a figure and demo.json.

    Returns the case's metrics (Dice at the model's stored threshold, best Dice, AP, AUROC).
    """
    from .api.restorer import Restorer, default_model
    from .backends.factory import resolve_device
    from .figures import slices_figure
    from .io import save_json, save_volume
    from .metrics import curve_metrics, dice
    from .progress import say
    from .synth import generate_lesion

    t0 = time.perf_counter()
    out = Path(out_dir)
    device = resolve_device(device)
    model = default_model(device)
    say("synthesising a glioma-like lesion case from the MNI152 maps ...")
    case = generate_lesion(0, seed=seed)
    restorer = Restorer(model, backend, device, schedule="fast", seed=seed, progress=True)
    res = restorer.restore_array(case.image, case.affine)
    threshold = float((model.info or {}).get("threshold", np.percentile(res.anomaly[case.brain_mask > 0], 95)))
    predicted = res.anomaly >= threshold

    name = case.name
    files = {
        "scan": save_volume(out / f"{name}.nii.gz", case.image, case.affine),
        "truth": save_volume(out / f"{name}_mask.nii.gz", case.mask, case.affine, dtype=np.uint8),
        "anomaly": save_volume(out / f"{name}_anomaly.nii.gz", res.anomaly, case.affine),
        "restoration": save_volume(out / f"{name}_restoration.nii.gz", res.restoration, case.affine),
        "mask": save_volume(out / f"{name}_pred-mask.nii.gz", predicted, case.affine, dtype=np.uint8),
    }
    curves = curve_metrics(res.anomaly.ravel(), case.mask.ravel() > 0)
    metrics = dict(case=name, dice=dice(predicted, case.mask > 0), threshold=threshold,
                   dice_best=curves["dice_best"], ap=curves["ap"], auroc=curves["auroc"],
                   lesion_fraction=float(case.mask.sum() / case.brain_mask.sum()),
                   restore_seconds=res.seconds)
    scan = case.image / np.percentile(case.image[case.brain_mask > 0], 99)
    files["figure"] = slices_figure(out / f"{name}.png", scan, res.restoration, res.anomaly, case.mask > 0,
                                    affine=case.affine, threshold=threshold, predicted=predicted,
                                    title=f"{name}: Dice {metrics['dice']:.2f} at threshold {threshold:.3g}")
    metrics["seconds"] = time.perf_counter() - t0
    save_json(out / "demo.json", dict(metrics, files={k: str(v) for k, v in files.items()}))
    report(f"{name}: Dice {metrics['dice']:.3f} (best {metrics['dice_best']:.3f}), AP {metrics['ap']:.3f}, "
           f"AUROC {metrics['auroc']:.3f}; restored in {res.seconds:.1f} s, total {metrics['seconds']:.1f} s")
    report(f"wrote {', '.join(Path(p).name for p in files.values())} -> {out}")
    return metrics
