"""`ifad-fast bench accuracy --healthy DIR --test DIR [--validation DIR]`: the accuracy protocol on
the user's own data, read in the layouts of common data sets (tiny synthetic stand-ins here)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ifad_fast.benchmarks.accuracy import IF3D, MEAN, THRESHOLD, VAE, ZSCORE
from ifad_fast.errors import IfadError
from ifad_fast.layouts import find_cases
from helpers import cli, leftovers, one_error_line, toy_brain, write_nifti

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = np.zeros((4, 4, 4), np.float32)
FAST = ["--train", "tiny", "--epochs", "2", "--schedule", "2x256", "--vae-steps", "5", "--backend", "torch",
        "--device", "cpu"]


def touch(path: Path, data=TINY) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, data)


def brats(root: Path, cases: dict, full: bool = False) -> Path:
    """A BraTS folder: a folder per case with _t1, _t2, _flair and _seg (labels 1/2/4 in the lesion);
    cases: {name: (seed, has a lesion)}; full: toy brains, else tiny placeholders."""
    for name, (seed, lesion) in cases.items():
        image, mask = toy_brain(seed, lesion=True) if full else (TINY, np.zeros((4, 4, 4), np.uint8))
        labels = (mask * 2).astype(np.uint8) if lesion else np.zeros_like(mask, np.uint8)
        for modality, scale in (("t1", 0.5), ("t2", 1.0), ("flair", 0.8)):
            touch(root / name / f"{name}_{modality}.nii.gz", (image * scale).astype(np.float32))
        touch(root / name / f"{name}_seg.nii.gz", labels)
    return root


def hcp(root: Path, subjects, full: bool = False) -> Path:
    """An HCP folder: <subject>/T1w/T2w_acpc_dc_restore_brain.nii.gz beside T1w's and a label map."""
    for i, subject in enumerate(subjects):
        image = toy_brain(i)[0] if full else TINY
        touch(root / subject / "T1w" / "T2w_acpc_dc_restore_brain.nii.gz", image)
        touch(root / subject / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz", image * 0.5)
        touch(root / subject / "T1w" / "aparc+aseg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    return root


def names(cases):
    return [(c.name, c.scan.name, c.mask.name if c.mask else None) for c in cases]


def test_layouts_read_without_help(tmp_path):
    """BraTS (a folder per case, modality chosen), HCP (the subject folder names the case), BIDS
    (sub-XX/anat, a desc-lesion mask), ours (<case> + <case>_mask) and a CSV of scan,mask."""
    root = brats(tmp_path / "brats", {"BraTS_001": (0, True), "BraTS_002": (1, False)})
    assert names(find_cases(root)) == [("BraTS_001", "BraTS_001_t2.nii.gz", "BraTS_001_seg.nii.gz"),
                                       ("BraTS_002", "BraTS_002_t2.nii.gz", "BraTS_002_seg.nii.gz")]
    assert [c.scan.name for c in find_cases(root, "flair")] == ["BraTS_001_flair.nii.gz", "BraTS_002_flair.nii.gz"]

    root = hcp(tmp_path / "hcp", ["100307", "100408"])
    assert names(find_cases(root, masks=False)) == [("100307", "T2w_acpc_dc_restore_brain.nii.gz", None),
                                                    ("100408", "T2w_acpc_dc_restore_brain.nii.gz", None)]
    assert [c.scan.name for c in find_cases(root, "t1", masks=False)] == ["T1w_acpc_dc_restore_brain.nii.gz"] * 2

    bids = tmp_path / "bids"
    for sub in ("sub-01", "sub-02"):
        touch(bids / sub / "anat" / f"{sub}_T2w.nii.gz")
        touch(bids / sub / "anat" / f"{sub}_T1w.nii.gz")
        touch(bids / sub / "anat" / f"{sub}_desc-lesion_mask.nii.gz")
    assert names(find_cases(bids)) == [("sub-01", "sub-01_T2w.nii.gz", "sub-01_desc-lesion_mask.nii.gz"),
                                       ("sub-02", "sub-02_T2w.nii.gz", "sub-02_desc-lesion_mask.nii.gz")]

    ours = tmp_path / "ours"
    for case in ("p1", "p2"):
        touch(ours / f"{case}.nii.gz")
        touch(ours / f"{case}_mask.nii.gz")
    touch(ours / "p1_anomaly.nii.gz")                                     # an output, never a scan
    assert names(find_cases(ours)) == [("p1", "p1.nii.gz", "p1_mask.nii.gz"), ("p2", "p2.nii.gz", "p2_mask.nii.gz")]

    listed = tmp_path / "cases.csv"
    listed.write_text("scan,mask\nours/p2.nii.gz,ours/p2_mask.nii.gz\nbids/sub-01/anat/sub-01_T2w.nii.gz,"
                      "ours/p1_mask.nii.gz\n")
    assert names(find_cases(listed)) == [("p2", "p2.nii.gz", "p2_mask.nii.gz"),
                                         ("sub-01", "sub-01_T2w.nii.gz", "p1_mask.nii.gz")]


def test_layouts_refuse_what_they_cannot_pair(tmp_path):
    """A scan without ground truth, two candidate masks, no scan of the modality, a CSV line without
    a mask: each one IfadError naming what to do."""
    root = brats(tmp_path / "brats", {"BraTS_001": (0, True)})
    (root / "BraTS_001" / "BraTS_001_seg.nii.gz").unlink()
    with pytest.raises(IfadError, match="no ground truth for BraTS_001"):
        find_cases(root)
    assert [c.mask for c in find_cases(root, masks=False)] == [None]
    touch(root / "BraTS_001" / "BraTS_001_seg.nii.gz")
    touch(root / "BraTS_001" / "BraTS_001_mask.nii.gz")
    with pytest.raises(IfadError, match="2 candidate masks for BraTS_001"):
        find_cases(root)
    with pytest.raises(IfadError, match="no t1ce scan"):
        find_cases(root, "t1ce")
    listed = tmp_path / "cases.csv"
    listed.write_text("scan,mask\nbrats/BraTS_001/BraTS_001_t2.nii.gz,\n")
    with pytest.raises(IfadError, match="expected SCAN,MASK"):
        find_cases(listed)
    assert [c.mask for c in find_cases(listed, masks=False)] == [None]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Healthy toy brains in the HCP layout; test (2 lesion cases, 1 healthy: a seg of zeros) and
    validation (1 lesion case) in the BraTS layout."""
    root = tmp_path_factory.mktemp("data")
    hcp(root / "HCP", ["100307", "100408", "101107"], full=True)
    brats(root / "BraTS", {"BraTS_001": (11, True), "BraTS_002": (12, True), "BraTS_003": (13, False)}, full=True)
    brats(root / "BraTS-val", {"BraTS_101": (14, True)}, full=True)
    return root


def test_accuracy_on_data_in_the_brats_and_hcp_layouts(data, tmp_path, capsys):
    """Trained on the HCP scans, scored on the BraTS t2 scans: every method, every metric, the healthy
    BraTS case's false positives; thresholds from the test set itself without --validation (and
    the report says so), from the validation set with it; nothing written to the data folders."""
    before = leftovers(data)
    code, _, err = cli(capsys, "bench", "accuracy", "--healthy", data / "HCP", "--test", data / "BraTS",
                       "-o", tmp_path / "own", *FAST)
    assert code == 0, err
    result = json.loads((tmp_path / "own" / "accuracy.json").read_text())
    assert set(result["methods"]) == {IF3D, THRESHOLD, ZSCORE, MEAN, VAE}
    for method, r in result["methods"].items():
        pooled = r["pooled"]
        assert pooled["threshold_source"] == "test (no validation set given)", method
        assert pooled["n_cases"] == 2 and [h["name"] for h in pooled["per_healthy"]] == ["BraTS_003"]
        assert pooled["fp_voxels_per_healthy"] is not None and pooled["lesion_recall"] is not None
    assert result["setup"]["n_healthy"] == 3 and result["setup"]["data"]["modality"] == "t2"
    md = (tmp_path / "own" / "accuracy.md").read_text()
    assert md.count("| Method | [DICE] |") == 1 and "the test scans themselves" in md
    assert "| IF 3D (paper) | 0.681 | 0.640 ± 0.177 | 0.733 | 0.992 | 0.0462 |" in md     # beside, for comparison
    assert (tmp_path / "own" / "accuracy.png").is_file()

    code, _, err = cli(capsys, "bench", "accuracy", "--healthy", data / "HCP", "--test", data / "BraTS",
                       "--validation", data / "BraTS-val", "-o", tmp_path / "val", *FAST)
    assert code == 0, err
    result = json.loads((tmp_path / "val" / "accuracy.json").read_text())
    assert {r["pooled"]["threshold_source"] for r in result["methods"].values()} == {"validation"}
    assert leftovers(data) == before


@pytest.mark.parametrize("args, expect", [
    (["--healthy", "HCP"], "go together"),
    (["--healthy", "HCP", "--test", "BraTS", "--n-test", "3"], "--n-test is for the synthetic protocol"),
    (["--healthy", "HCP", "--test", "nowhere"], "nowhere: no such folder"),
    (["--healthy", "HCP", "--test", "HCP"], "no ground truth for 100307"),
], ids=["test-missing", "synthetic-option", "no-folder", "no-masks"])
def test_accuracy_on_data_refuses_in_one_line_before_work(data, tmp_path, capsys, args, expect):
    out = tmp_path / "o"
    args = [str(data / a) if a in ("HCP", "BraTS", "nowhere") else a for a in args]
    code, _, err = cli(capsys, "bench", "accuracy", *args, "-o", out, *FAST)
    assert code == 2 and expect in one_error_line(err, "bench"), err
    assert not out.exists()


def test_accuracy_on_data_needs_matplotlib_up_front_but_not_nilearn(data, tmp_path, capsys, monkeypatch):
    """Nothing is synthesised, so nilearn may be missing (the run gets as far as reading the folders);
    accuracy.png is written last, so a missing matplotlib is refused before any work."""
    monkeypatch.setitem(sys.modules, "nilearn", None)                    # as if not installed
    args = ["bench", "accuracy", "--healthy", data / "HCP", "--test", data / "HCP", "-o", tmp_path / "o", *FAST]
    code, _, err = cli(capsys, *args)
    assert code == 2 and "no ground truth for 100307" in one_error_line(err, "bench")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = cli(capsys, *args)
    assert code == 2 and one_error_line(err, "bench").endswith('this needs matplotlib: pip install "ifad-fast[figures]"')
    assert not (tmp_path / "o").exists()
