"""`ifad-fast evaluate` reports the metrics beyond the paper: per-volume AP, lesion-wise detection
(sizes in mL from the masks' voxel size) and false positives on healthy cases (a mask of zeros)."""
from __future__ import annotations

import json

import numpy as np

from ifad_fast.metrics import evaluate
from helpers import AFFINE, cli, numpy_rng, one_error_line, toy_brain, write_nifti

KEYS = ("dice_best", "dice_mean", "dice_std", "ap", "ap_per_volume", "auroc", "fpr95", "threshold",
        "lesion_precision", "lesion_recall", "lesion_f1", "fp_voxels_per_healthy")


def write_case(folder, name, seed, lesion=True):
    """A toy map (lesion + noise) and its mask (all zeros for a healthy case); returns both arrays."""
    _, mask = toy_brain(seed, lesion=True)
    mask = mask if lesion else np.zeros_like(mask)
    score = (mask + numpy_rng(seed).normal(0, 0.4, mask.shape)).astype(np.float32)
    write_nifti(folder / f"{name}_anomaly.nii.gz", score)
    write_nifti(folder / f"{name}_mask.nii.gz", mask)
    return score, mask


def test_evaluate_counts_an_all_zero_mask_as_a_healthy_case(tmp_path, capsys):
    """Two lesion cases and a healthy one (mask of zeros): the healthy case is left out of the lesion
    metrics and counted as voxels at or above the threshold; lesion sizes are in mL from the
    masks' 6 × 5.5 × 6.5 mm voxels; metrics.json holds every key and the table shows them."""
    data = tmp_path / "maps"
    data.mkdir()
    cases = [write_case(data, "a", 1), write_case(data, "b", 2), write_case(data, "h", 3, lesion=False)]
    code, out, err = cli(capsys, "evaluate", "--scores", data, "--masks", data, "-o", tmp_path / "out")
    assert code == 0, err
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert all(got[k] is not None for k in KEYS), {k: got.get(k) for k in KEYS}
    want = evaluate([s for s, _ in cases], [m > 0 for _, m in cases], names=["a", "b", "h"],
                    voxel_volumes=[abs(np.linalg.det(AFFINE[:3, :3]))] * 3)
    assert {k: got[k] for k in KEYS} == {k: want[k] for k in KEYS}
    assert got["n_cases"] == 2 and got["n_healthy"] == 1 and got["lesion_size_unit"] == "mL"
    healthy = cases[2][0]
    assert got["fp_voxels_per_healthy"] == np.count_nonzero(healthy >= np.float32(got["threshold"])) > 0
    assert sum(b["lesions"] for b in got["lesion_by_size"].values()) == got["lesion_counts"]["lesions"] == 2
    assert "AP per volume" in out and "FP voxels / healthy (1)" in out


def test_evaluate_refuses_healthy_cases_alone(tmp_path, capsys):
    """Only masks of zeros: no lesion to measure -> one error line, exit 2, nothing written."""
    data = tmp_path / "maps"
    data.mkdir()
    write_case(data, "h", 3, lesion=False)
    code, _, err = cli(capsys, "evaluate", "--scores", data, "--masks", data, "-o", tmp_path / "out")
    assert code == 2 and "no anomalous" in one_error_line(err, "evaluate")
    assert not (tmp_path / "out").exists()
