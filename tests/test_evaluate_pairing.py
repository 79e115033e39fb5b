"""`ifad-fast evaluate` pairs each anomaly map with its ground truth, or refuses in one line.

Ground truth is recognised by name (`<case>_seg`, BIDS `_dseg`/`_mask`, ...) with the scan's
modality or BIDS suffix stripped, or named in a --pairs CSV; a scan is never taken for a mask.
The maps here are written directly (no restore), so every metric can be recomputed with
`metrics.evaluate` on the binarised masks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ifad_fast.metrics import evaluate
from helpers import cli, digests, leftovers, numpy_rng, one_error_line, toy_brain, write_nifti

KEYS = ("dice_best", "dice_mean", "dice_std", "ap", "auroc", "fpr95", "threshold", "threshold_source", "n_cases",
        "n_positive", "per_case")


def lesion_case(seed: int):
    """(int16 scan as BraTS stores it, labels 1/2/4 inside the lesion, a float32 anomaly map)."""
    image, lesion = toy_brain(seed, lesion=True)
    rng = numpy_rng(seed)
    labels = (lesion * rng.choice(np.array([1, 2, 4], np.uint8), lesion.shape)).astype(np.uint8)
    score = (lesion + rng.normal(0, 0.6, lesion.shape)).astype(np.float32)
    return np.round(image).astype(np.int16), labels, score


def expected(pairs, val=None) -> dict:
    """metrics.evaluate on (name, map, label map) triples, the label maps binarised (> 0)."""
    kw = {}
    if val:
        kw = dict(val_scores=[s for _, s, _ in val], val_masks=[m > 0 for _, _, m in val])
    return evaluate([s for _, s, _ in pairs], [m > 0 for _, _, m in pairs], names=[n for n, _, _ in pairs], **kw)


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def same_metrics(got: dict, want: dict):
    assert {k: got[k] for k in KEYS} == json.loads(json.dumps({k: want[k] for k in KEYS}))


def refused(capsys, args, out: Path, *expect: str) -> str:
    """Run evaluate; assert exit 2, one error line holding `expect`, and nothing written to `out`."""
    code, stdout, err = cli(capsys, "evaluate", *args, "-o", out)
    line = one_error_line(err, "evaluate")
    assert code == 2 and not out.exists() and "[DICE]" not in stdout, err
    for text in expect:
        assert text in line, line
    return line


def test_brats_folder_pairs_seg_labels_with_the_t2_maps(tmp_path, capsys):
    """BraTS layout in one folder: <case>_t2 and _flair scans, <case>_seg (labels 1/2/4) and the maps
    <case>_t2_anomaly: each map pairs with its _seg, never with a scan, and the metrics are those of
    the binarised labels."""
    data, want = tmp_path / "BraTS", []
    data.mkdir()
    for i in range(2):
        case = f"BraTS_00{i + 1}"
        image, labels, score = lesion_case(10 + i)
        write_nifti(data / f"{case}_t2.nii.gz", image)
        write_nifti(data / f"{case}_flair.nii.gz", (image // 2).astype(np.int16))
        write_nifti(data / f"{case}_seg.nii.gz", labels)
        write_nifti(data / f"{case}_t2_anomaly.nii.gz", score)
        want.append((f"{case}_t2", score, labels))
    before = digests(data)
    code, stdout, err = cli(capsys, "evaluate", "--scores", data, "--masks", data, "-o", tmp_path / "out")
    assert code == 0, err
    same_metrics(metrics_of(tmp_path / "out"), expected(want))
    assert "[DICE]" in stdout and digests(data) == before
    # the same folder as the validation set: the threshold is chosen there
    code, _, err = cli(capsys, "evaluate", "--scores", data, "--masks", data, "--val-scores", data, "--val-masks",
                       data, "-o", tmp_path / "val")
    assert code == 0, err
    same_metrics(metrics_of(tmp_path / "val"), expected(want, want))
    refused(capsys, ["--scores", data, "--masks", data, "--val-scores", data], tmp_path / "o1",
            "--val-scores and --val-masks")


def test_scans_in_the_masks_folder_are_never_taken_for_masks(tmp_path, capsys):
    """Masks folder holding only the (integer-valued) scans <case>.nii.gz: refused in one line naming
    the cases, no metrics.json; the same when maps, scans and nothing else share one folder."""
    maps, scans = tmp_path / "maps", tmp_path / "scans"
    maps.mkdir(), scans.mkdir()
    for i in range(2):
        image, _, score = lesion_case(20 + i)
        write_nifti(scans / f"case{i}.nii.gz", image)
        write_nifti(maps / f"case{i}_anomaly.nii.gz", score)
    before = digests(tmp_path)
    line = refused(capsys, ["--scores", maps, "--masks", scans], tmp_path / "out", "no mask for case0, case1",
                   "--pairs")
    assert "_seg" in line
    for p in maps.iterdir():
        (scans / p.name).write_bytes(p.read_bytes())
    refused(capsys, ["--scores", scans, "--masks", scans], tmp_path / "out2", "no mask for case0, case1")
    assert {p: h for p, h in digests(tmp_path).items() if p in before} == before


def test_two_candidate_masks_for_a_case_are_refused_naming_both(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    image, labels, score = lesion_case(30)
    write_nifti(data / "case_t2_anomaly.nii.gz", score)
    write_nifti(data / "case_t2_mask.nii.gz", labels)
    write_nifti(data / "case_seg.nii.gz", labels)
    line = refused(capsys, ["--scores", data, "--masks", data], tmp_path / "out", "case_t2_mask.nii.gz",
                   "case_seg.nii.gz", "--pairs")
    assert "case_t2" in line


def test_a_scan_named_as_a_mask_is_refused_as_not_a_label_map(tmp_path, capsys):
    """A <case>_mask that is really an int16 scan (many distinct values) is refused, folders or --pairs."""
    data = tmp_path / "data"
    data.mkdir()
    image, _, score = lesion_case(40)
    write_nifti(data / "case_anomaly.nii.gz", score)
    write_nifti(data / "case_mask.nii.gz", image)
    n = len(np.unique(image))
    refused(capsys, ["--scores", data, "--masks", data], tmp_path / "out",
            "case_mask.nii.gz does not look like a label map", f"({n} distinct values)", "--pairs")
    (data / "pairs.csv").write_text("map,mask\ncase_anomaly.nii.gz,case_mask.nii.gz\n")
    refused(capsys, ["--pairs", data / "pairs.csv"], tmp_path / "out", "does not look like a label map")


def test_pairs_csv_names_each_map_and_mask(tmp_path, capsys):
    """--pairs / --val-pairs: CSV `map,mask` with paths relative to the CSV's folder (or absolute);
    the metrics equal metrics.evaluate's. Mixing --pairs with folders, or a pairs file that names a
    missing file, is refused in one line."""
    (tmp_path / "maps").mkdir(), (tmp_path / "truth").mkdir()
    rows, want, val = {"test": [], "val": []}, [], []
    for i in range(4):
        _, labels, score = lesion_case(50 + i)
        which = "test" if i < 3 else "val"
        write_nifti(tmp_path / "maps" / f"p{i}_anomaly.nii.gz", score)
        mask = write_nifti(tmp_path / "truth" / f"lesions of patient {i}.nii", labels)
        rows[which].append(f"maps/p{i}_anomaly.nii.gz,{mask if i == 2 else 'truth/' + mask.name}")
        (want if which == "test" else val).append((f"p{i}", score, labels))
    for which, lines in rows.items():
        (tmp_path / f"{which}.csv").write_text("map,mask\n" + "\n".join(lines) + "\n")
    code, _, err = cli(capsys, "evaluate", "--pairs", tmp_path / "test.csv", "--val-pairs", tmp_path / "val.csv",
                       "-o", tmp_path / "out")
    assert code == 0, err
    got = metrics_of(tmp_path / "out")
    same_metrics(got, expected(want, val))
    assert got["threshold_source"] == "validation"

    refused(capsys, ["--pairs", tmp_path / "test.csv", "--masks", tmp_path / "truth"], tmp_path / "o1",
            "--pairs", "--masks")
    (tmp_path / "bad.csv").write_text("map,mask\nmaps/p0_anomaly.nii.gz,truth/nothing.nii.gz\n")
    refused(capsys, ["--pairs", tmp_path / "bad.csv"], tmp_path / "o2", "nothing.nii.gz", "bad.csv")
    (tmp_path / "noheader.csv").write_text("maps/p0_anomaly.nii.gz,truth/lesions of patient 0.nii\n")
    refused(capsys, ["--pairs", tmp_path / "noheader.csv"], tmp_path / "o3", "map,mask")


def test_bids_masks_pair_with_their_scans_maps(tmp_path, capsys):
    """BIDS names: sub-01_desc-lesion_mask, sub-02_dseg (upper-case extension) and sub-03_T2w_mask
    each pair with the map of their sub-XX_T2w scan."""
    data, want = tmp_path / "bids", []
    data.mkdir()
    masks = {"sub-01": "sub-01_desc-lesion_mask.nii.gz", "sub-02": "sub-02_dseg.NII.GZ",
             "sub-03": "sub-03_T2w_mask.nii"}
    for i, (sub, mask) in enumerate(masks.items()):
        image, labels, score = lesion_case(60 + i)
        write_nifti(data / f"{sub}_T2w.nii.gz", image)
        write_nifti(data / mask, labels)
        write_nifti(data / f"{sub}_T2w_anomaly.nii.gz", score)
        want.append((f"{sub}_T2w", score, labels))
    code, _, err = cli(capsys, "evaluate", "--scores", data, "--masks", data, "-o", tmp_path / "out")
    assert code == 0, err
    same_metrics(metrics_of(tmp_path / "out"), expected(want))
    assert not [n for n in leftovers(data) if n.startswith(".")]


def test_ground_truth_names_are_never_taken_for_scans(tmp_path):
    """restore and prepare (find_scans) skip every name evaluate takes for ground truth, so a BIDS or
    BraTS folder can be restored in place."""
    from ifad_fast.io import find_scans

    image, labels, _ = lesion_case(70)
    write_nifti(tmp_path / "sub-01_T2w.nii.gz", image)
    for name in ("sub-01_dseg", "sub-01_desc-lesion_mask", "BraTS_001_seg", "case_label", "case_labels",
                 "case_lesion"):
        write_nifti(tmp_path / f"{name}.nii.gz", labels)
    assert find_scans([tmp_path]) == [tmp_path / "sub-01_T2w.nii.gz"]
