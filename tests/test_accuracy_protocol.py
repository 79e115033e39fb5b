"""`ifad-fast bench accuracy` end to end in quick mode on a tiny model trained here."""
import json
import math

import pytest

from ifad_fast.acquisition import ACQUISITIONS
from ifad_fast.benchmarks.accuracy import IF3D, MEAN, THRESHOLD, VAE, ZSCORE, accuracy, metrics_table
from ifad_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
METRICS = ("dice_best", "dice_mean", "dice_std", "ap", "ap_per_volume", "auroc", "fpr95", "lesion_precision",
           "lesion_recall", "lesion_f1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """IF 3D trained here (tiny preset, 2 epochs on 3 healthy 3 mm scans), one validation and one
    test case (synthesised at 3 mm: small, fast), every acquisition, one healthy test scan, a
    10-step VAE."""
    import torch

    out = tmp_path_factory.mktemp("accuracy")
    lines = []
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = accuracy(quick=True, train="tiny", epochs=2, n_healthy=3, n_val=1, n_test=1, source_mm=3.0,
                          healthy_mm=3.0, vae_steps=10, schedule="2x256", device="cpu", out_dir=out,
                          progress=False, report=lines.append)
    finally:
        torch.set_num_threads(n)
    return result, out, lines


def test_finite_metrics_for_every_acquisition_and_method(run):
    result, _, _ = run
    assert set(result["methods"]) == {IF3D, THRESHOLD, ZSCORE, MEAN, VAE}
    for method, r in result["methods"].items():
        assert list(r["acquisitions"]) == list(ACQUISITIONS)
        for acq, m in [*r["acquisitions"].items(), ("pooled", r["pooled"])]:
            for key in METRICS:
                if key == "lesion_precision" and m[key] is None:       # nothing at or above the threshold
                    assert m["lesion_counts"]["found"] + m["lesion_counts"]["false_positive"] == 0
                    continue
                assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (method, acq, key, m[key])
            assert m["threshold_source"] == "validation"
        assert r["pooled"]["n_cases"] == len(ACQUISITIONS)
        assert r["pooled"]["n_voxels"] == sum(m["n_voxels"] for m in r["acquisitions"].values())
        assert r["seconds_per_scan"] > 0


def test_same_anatomy_in_every_acquisition(run):
    """Metrics count the brain voxels of each acquisition: the same brain, so the same volume in mm³,
    and the same lesion volume among the acquisitions of one lesion kind (within 2 % and 3 %;
    measured ≤ 0.4 % and ≤ 1 %). The ms and stroke cases are the glioma case's subject without the
    glioma's mass effect, which adds a few % to the brain (1.7 % in this case)."""
    result, _, _ = run
    r = result["methods"][IF3D]["acquisitions"]
    brain = {a: r[a]["n_voxels"] * math.prod(ACQUISITIONS[a].voxel_mm) for a in r}
    lesion = {a: r[a]["n_positive"] * math.prod(ACQUISITIONS[a].voxel_mm) for a in r}
    first = {}                                          # lesion kind -> its first acquisition
    for a in r:
        ref = first.setdefault(ACQUISITIONS[a].lesion, a)
        assert brain[a] == pytest.approx(brain[ref], rel=0.02), a
        assert brain[a] == pytest.approx(brain["1.5mm"], rel=0.04), a
        assert lesion[a] == pytest.approx(lesion[ref], rel=0.03), a
    assert set(first) == {"glioma", "ms", "stroke"}


def test_reports_written(run):
    result, out, lines = run
    on_disk = json.loads((out / "accuracy.json").read_text())
    assert on_disk["methods"][IF3D]["pooled"]["dice_best"] == pytest.approx(result["methods"][IF3D]["pooled"]["dice_best"])
    assert on_disk["setup"]["acquisitions"] == list(ACQUISITIONS) and on_disk["setup"]["n_test"] == 1
    md = (out / "accuracy.md").read_text()
    assert md.strip() == lines[0].strip()
    for name in [*ACQUISITIONS, IF3D, THRESHOLD, ZSCORE, MEAN, VAE, "pooled", "spread"]:
        assert name in md


@pytest.mark.parametrize("args", [
    ["--acquisitions", "1mm,nope"],
    ["--schedule", "bogus"],
    ["--n-test", "0"],
    ["--model", "x.pt", "--train", "tiny"],
    ["--epochs", "3"],
    ["--train", "huge"],
], ids=["acquisition", "schedule", "n-test", "model-and-train", "epochs-alone", "preset"])
def test_user_errors_exit_2_before_work(tmp_path, capsys, args):
    out = tmp_path / "o"
    code = main(["bench", "accuracy", "--quick", "--device", "cpu", "-o", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_speed_rejects_accuracy_options(capsys):
    assert main(["bench", "speed", "--quick", "--n-test", "3"]) == 2
    assert "bench accuracy" in capsys.readouterr().err


def test_restoration_fit_on_training_and_unseen_healthy_subjects(run):
    """The fit section: one training and one unseen healthy subject in quick mode, shares in [0, 1]
    with exact <= within one, a positive mean cross-entropy, and its table in the report."""
    result, out, _ = run
    fit = result["fit"][IF3D]
    assert set(fit) == {"training subjects", "unseen subjects"}
    assert list(fit["training subjects"]["subjects"]) == ["healthy_0000"]
    assert list(fit["unseen subjects"]["subjects"]) == ["healthy_0003"]          # n_healthy = 3
    for group in fit.values():
        assert 0.0 <= group["exact"] <= group["within_one"] <= 1.0 and group["mean_ce"] > 0
    assert "within one of the scan's" in (out / "accuracy.md").read_text()


def test_healthy_test_scan_counts_false_positives_in_its_acquisition_and_pooled(run):
    """The unseen healthy subject (healthy_0003, in the validation acquisition) is a healthy case of
    that acquisition's row and of the pooled one, for every method; no other row has one."""
    result, _, _ = run
    for method, r in result["methods"].items():
        pooled = r["pooled"]
        assert pooled["n_healthy"] == 1 and [h["name"] for h in pooled["per_healthy"]] == ["healthy_0003@1.5mm"]
        assert pooled["fp_voxels_per_healthy"] == pooled["per_healthy"][0]["fp_voxels"] >= 0, method
        assert r["acquisitions"]["1.5mm"]["fp_voxels_per_healthy"] == pooled["fp_voxels_per_healthy"]
        assert all(m["fp_voxels_per_healthy"] is None for a, m in r["acquisitions"].items() if a != "1.5mm")
        assert pooled["lesion_size_unit"] == "mL" and pooled["lesion_counts"]["lesions"] >= len(ACQUISITIONS)
        curve = pooled["pr_curve"]
        assert len(curve["recall"]) == len(curve["precision"]) > 1 and curve["recall"][-1] == 1.0


def test_figure_and_tables_written(run):
    """accuracy.png beside accuracy.json (a PNG); accuracy.md: one table per test set (pooled, each
    acquisition) with a column per metric, the best in bold."""
    _, out, _ = run
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "accuracy.md").read_text()
    assert md.count("| Method | [DICE] |") == 1 + len(ACQUISITIONS) and "**" in md
    for header in ("AP per volume", "lesion F1", "FP voxels / healthy scan", "by size"):
        assert header in md


def test_metrics_table_bolds_the_best_of_each_column():
    """Higher is better but for FPR@95R and false positives, compared to the digits shown (a tie is
    bold twice); a missing value is '-' and never bold."""
    a = dict(dice_best=0.5, dice_mean=0.4, dice_std=0.1, ap=0.30, ap_per_volume=0.2, auroc=0.9, fpr95=0.1,
             lesion_precision=0.5, lesion_recall=0.5, lesion_f1=0.5, fp_voxels_per_healthy=10.0)
    b = dict(a, dice_best=0.6, ap=0.3001, fpr95=0.2, lesion_f1=None, fp_voxels_per_healthy=3.0)
    header, _, row_a, row_b = metrics_table({"a": a, "b": b})
    cells_a, cells_b = row_a.split(" | ")[1:], row_b.split(" | ")[1:]
    assert cells_a[0] == "0.500" and cells_b[0] == "**0.600**"
    assert cells_a[2] == cells_b[2] == "**0.300**"                   # AP ties to 3 digits
    assert cells_a[5] == "**0.1000**" and cells_b[5] == "0.2000"     # FPR@95R: lower is better
    assert cells_a[8] == "**0.500**" and cells_b[8] == "-"           # F1 missing for b
    assert cells_a[9].rstrip(" |") == "10" and cells_b[9].rstrip(" |") == "**3**"
    assert cells_a[1] == "**0.400 ± 0.100**"


def test_held_out_styles_pooled_apart_with_their_gap(run):
    """Every method: the standard acquisitions and the held-out styles pooled apart (their voxels add
    up to the whole test set's), the gap their difference, the spread over the standard ones only."""
    from ifad_fast.acquisition import HELD_OUT

    result, out, _ = run
    for r in result["methods"].values():
        st, ho = r["pooled_standard"], r["pooled_held_out"]
        assert st["n_voxels"] + ho["n_voxels"] == r["pooled"]["n_voxels"]
        assert r["gap"]["dice_best"] == pytest.approx(st["dice_best"] - ho["dice_best"])
        standard = [m["dice_best"] for a, m in r["acquisitions"].items() if a not in HELD_OUT]
        assert r["dice_best_spread"] == pytest.approx(max(standard) - min(standard))
    assert "Generalisation: standard acquisitions vs held-out styles" in (out / "accuracy.md").read_text()
