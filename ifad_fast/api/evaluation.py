"""`evaluate_folders`: score maps (ours or anyone's) against lesion masks, with the method named in the report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io import OUTPUT_FILES, check_output_folder, save_json


def maps_method(scores_dir, names) -> str:
    """What made the maps of cases `names` in `scores_dir`, from their <case>_restore.json (see
    `summaries_method`)."""
    return summaries_method(Path(scores_dir) / f"{n}{OUTPUT_FILES['summary']}" for n in names)


def summaries_method(paths) -> str:
    """What made the maps whose <case>_restore.json files are `paths` (unreadable or missing ones
    are skipped): 'IF 3D (ifad-fast)', 'IF 2D (ifad-fast)', 'IF 3D + IF 2D (ifad-fast)' when
    mixed, or 'anomaly maps' when none is readable (maps from elsewhere)."""
    variants = set()
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict):
            variants.add(str(d.get("variant", "3d")).upper())
    if not variants:
        return "anomaly maps"
    return " + ".join(f"IF {v}" for v in sorted(variants, reverse=True)) + " (ifad-fast)"


def evaluate_folders(scores_dir=None, masks_dir=None, val_scores=None, val_masks=None, out_dir=None,
                     max_voxels: int | None = None, pairs=None, val_pairs=None) -> dict:
    """The paper's metrics and those beyond it (`metrics.evaluate`: per-volume AP, lesion-wise
    detection with lesion sizes in mL from the masks' voxel volumes, false positives per healthy
    case) for anomaly maps against their ground-truth masks (labels > 0 = lesion; a mask with no
    lesion voxel makes a healthy case), and under "method" what made the maps (`summaries_method`);
    with `out_dir`, also written to out_dir/metrics.json.

    The cases are the <case>_anomaly maps of `scores_dir`, each paired by name with its mask in
    `masks_dir` (<case>_mask, _seg, _label, BIDS _dseg, ...; see `ifad_fast.pairing`), or the
    lines of the CSV `pairs` (header map,mask); the validation cases likewise. A case without
    exactly one mask, or a mask that does not look like a label map, raises IfadError before
    anything is written.
    """
    from ..io import open_nifti
    from ..metrics import evaluate
    from ..pairing import case_pairs, load_cases

    if out_dir is not None:
        check_output_folder(out_dir)
    test = case_pairs(scores_dir, masks_dir, pairs)
    given = any(v is not None for v in (val_scores, val_masks, val_pairs))
    val = case_pairs(val_scores, val_masks, val_pairs, "val-") if given else None
    names, scores, masks = load_cases(test, max_voxels)
    _, val_s, val_m = load_cases(val, max_voxels) if val else (None, None, None)
    voxel_mm3 = [abs(float(np.linalg.det(open_nifti(p.mask, max_voxels, "mask")[0].affine[:3, :3]))) for p in test]
    result = evaluate(scores, masks, val_s, val_m, names=names, voxel_volumes=voxel_mm3)
    result["method"] = summaries_method(p.summary for p in test)
    if out_dir is not None:
        save_json(Path(out_dir) / "metrics.json", result)
    return result
