"""`ifad-fast bench accuracy` end to end in quick mode on a tiny model trained here."""
import json
import math

import pytest

from ifad_fast.acquisition import ACQUISITIONS
from ifad_fast.benchmark import IF3D, MEAN, THRESHOLD, VAE, ZSCORE, accuracy
from ifad_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
METRICS = ("dice_best", "dice_mean", "dice_std", "ap", "auroc", "fpr95")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """IF 3D trained here (tiny preset, 2 epochs on 3 healthy 3 mm scans), one validation and one
    test case (synthesised at 3 mm: small, fast), every acquisition, a 10-step VAE."""
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
                assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (method, acq, key, m[key])
            assert m["threshold_source"] == "validation"
        dices = [m["dice_best"] for m in r["acquisitions"].values()]
        assert r["dice_best_spread"] == pytest.approx(max(dices) - min(dices))
        assert r["pooled"]["n_cases"] == len(ACQUISITIONS)
        assert r["pooled"]["n_voxels"] == sum(m["n_voxels"] for m in r["acquisitions"].values())
        assert r["seconds_per_scan"] > 0


def test_same_anatomy_in_every_acquisition(run):
    """Metrics count the brain voxels of each acquisition: the same brain, so the same volume in mm³,
    and the same lesion volume (within 2 % and 3 %; measured ≤ 0.4 % and ≤ 1 %)."""
    result, _, _ = run
    r = result["methods"][IF3D]["acquisitions"]
    brain = {a: r[a]["n_voxels"] * math.prod(ACQUISITIONS[a].voxel_mm) for a in r}
    lesion = {a: r[a]["n_positive"] * math.prod(ACQUISITIONS[a].voxel_mm) for a in r}
    for a in r:
        assert brain[a] == pytest.approx(brain["1.5mm"], rel=0.02), a
        assert lesion[a] == pytest.approx(lesion["1.5mm"], rel=0.03), a


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
