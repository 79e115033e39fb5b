"""Decision thresholds per schedule: a model stores one per kind of map (info["thresholds"]), the Restorer
and `--threshold model` take the one of the schedule that runs, and the local stage judges its fit region
by the one-latent (fast) map's threshold whatever the local maps' threshold is."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import AFFINE, base_seed, random_model, toy_scans

from ifad_fast import config as cfg
from ifad_fast.api import Restorer, restore_config
from ifad_fast.api.restorer import resolve_threshold
from ifad_fast.errors import IfadError
from ifad_fast.model import load_model, save_model, stored_threshold


def _local_rc(model):
    """The local schedule, small enough for a test."""
    return cfg.replace(restore_config(model, "local"), phases=((5, 300), (2, 600)), local_steps=5,
                       local_points=300, local_grid=3)


def test_schedule_name_names_the_maps_a_search_makes():
    model = random_model(base_seed())
    for name in cfg.SCHEDULES:
        assert cfg.schedule_name(restore_config(model, name)) == name
        assert cfg.schedule_name(restore_config(model, name, seed=7, grid="full")) == name
    assert cfg.schedule_name(restore_config(model, "local", local_grid=8)) == "local"
    assert cfg.schedule_name(restore_config(model, "fast", lr=0.5)) is None
    assert cfg.schedule_name(restore_config(model, "100x300")) is None


def test_stored_threshold_prefers_the_schedule_and_falls_back_to_the_one():
    model = random_model(base_seed())
    model.info = {}
    assert stored_threshold(model, "fast") is None
    model.info = dict(threshold=0.8)
    assert stored_threshold(model, "local") == stored_threshold(model, None) == 0.8
    model.info = dict(threshold=0.8, thresholds=dict(fast=0.8, local=1.3))
    assert stored_threshold(model, "local") == 1.3 and stored_threshold(model, "fast") == 0.8
    assert stored_threshold(model, "paper") == 0.8
    assert resolve_threshold(model, "model", "local") == 1.3 and resolve_threshold(model, "model") == 0.8
    assert resolve_threshold(model, 0.4, "local") == 0.4


def test_the_restorer_decides_by_its_schedule_and_fits_by_the_fast_map():
    model = random_model(base_seed())
    model.info = dict(threshold=0.8, thresholds=dict(fast=0.8, local=1.3))
    local = Restorer(model, "cpu", "cpu", schedule=_local_rc(model))
    assert local.decision == 1.3 and local.fit_threshold == 0.8
    assert Restorer(model, "cpu", "cpu", schedule="fast").decision == 0.8


def test_the_local_maps_follow_the_fast_threshold_not_their_own():
    """The local maps' own threshold only marks them; the fit region is the fast map's business: a local
    threshold of 5 leaves the maps bit for bit equal, a fast threshold of 1e6 (nothing left out) moves them."""
    model = random_model(base_seed())
    img = toy_scans(1)[0]
    rc = _local_rc(model)

    def anomaly(info):
        model.info = info
        return Restorer(model, "cpu", "cpu", schedule=rc).restore_array(img, AFFINE).anomaly

    base = anomaly(dict(threshold=0.8))
    np.testing.assert_array_equal(base, anomaly(dict(threshold=0.8, thresholds=dict(fast=0.8, local=5.0))))
    assert not np.array_equal(base, anomaly(dict(threshold=0.8, thresholds=dict(fast=1e6))))


def test_restore_files_marks_local_maps_at_the_local_threshold(tmp_path):
    import nibabel as nib

    model = random_model(base_seed())
    model.info = dict(threshold=0.8, thresholds=dict(fast=0.8, local=1.3))
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(toy_scans(1)[0], AFFINE), str(src / "c0.nii.gz"))
    restorer = Restorer(model, "cpu", "cpu", schedule=_local_rc(model))
    restorer.restore_files([src], tmp_path / "out", threshold="model", report=lambda *a: None)
    summary = json.loads((tmp_path / "out" / "c0_restore.json").read_text())
    assert summary["threshold"] == 1.3
    mask = np.asarray(nib.load(str(tmp_path / "out" / "c0_pred-mask.nii.gz")).dataobj)
    anomaly = np.asarray(nib.load(str(tmp_path / "out" / "c0_anomaly.nii.gz")).dataobj)
    np.testing.assert_array_equal(mask > 0, anomaly >= np.float32(1.3))


@pytest.mark.parametrize("thresholds, message", [
    ([1.0], "not a dict"),
    ({"local": float("nan")}, "not a finite number"),
    ({"local": True}, "not a finite number"),
])
def test_a_damaged_thresholds_entry_is_refused(tmp_path, thresholds, message):
    model = random_model(base_seed())
    model.info = dict(threshold=0.8)
    path = save_model(model, tmp_path / "m.pt")
    assert load_model(path).info == dict(threshold=0.8)
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    meta["info"]["thresholds"] = thresholds
    payload["meta"] = json.dumps(meta)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(IfadError, match=message):
        load_model(tmp_path / "bad.pt")


def test_the_bundled_model_stores_a_threshold_for_each_schedule_it_ships():
    from ifad_fast.api import default_model

    info = default_model().info
    assert set(info["thresholds"]) >= {"fast", "local"} and info["thresholds"]["fast"] == info["threshold"]
    assert all(np.isfinite(t) and t > 0 for t in info["thresholds"].values())


def test_cli_calibrate_stores_each_schedules_best_dice_threshold(tmp_path, capsys):
    """`ifad-fast calibrate`: the thresholds stored are the pooled best-Dice thresholds of each schedule's
    maps over the validation brains, recomputed here from maps restored through the API; the input model
    file is left as it was, and `restore --threshold` alone then takes the local one under --schedule local."""
    from helpers import cli, scan

    from ifad_fast.metrics import curve_metrics

    model = random_model(base_seed())
    model.info = {}
    path = save_model(model, tmp_path / "model.pt")
    before = path.read_bytes()
    val = tmp_path / "val"
    sources = [scan(val, f"case{i}", seed=i, lesion=True) for i in range(2)]
    engine = ["--backend", "torch", "--device", "cpu"]
    code, out, err = cli(capsys, "calibrate", val, "-m", path, "-o", tmp_path / "cal.pt", *engine, "-q")
    assert code == 0, err
    assert path.read_bytes() == before
    calibrated = load_model(tmp_path / "cal.pt")
    thresholds = calibrated.info["thresholds"]
    assert set(thresholds) == {"fast", "local"} and calibrated.info["threshold"] == thresholds["fast"]
    import nibabel as nib

    for schedule in ("fast", "local"):
        reference = dict(model.info or {}, **({"threshold": thresholds["fast"]} if schedule == "local" else {}))
        model.info = reference
        restorer = Restorer(model, "torch", "cpu", schedule=schedule)
        scores, truth = [], []
        for src in sources:
            img = nib.load(str(src))
            data = np.asarray(img.dataobj, dtype=np.float32)
            mask = np.asarray(nib.load(str(src).replace(".nii.gz", "_mask.nii.gz")).dataobj)
            scores.append(restorer.restore_array(img).anomaly[data != 0])
            truth.append(mask[data != 0] > 0)
        assert thresholds[schedule] == curve_metrics(np.concatenate(scores), np.concatenate(truth))["threshold"]
        assert f"{schedule}: threshold" in out
    code, _, err = cli(capsys, "restore", sources[0], "-m", tmp_path / "cal.pt", "-o", tmp_path / "out",
                       "--schedule", "local", "--threshold", *engine, "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "case0_restore.json").read_text())["threshold"] == thresholds["local"]


def test_cli_calibrate_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    from helpers import cli, one_error_line, scan

    model = random_model(base_seed())
    model.info = {}
    path = save_model(model, tmp_path / "model.pt")
    val = tmp_path / "val"
    scan(val, "case0", lesion=True)
    engine = ["--backend", "torch", "--device", "cpu", "-q"]
    out = tmp_path / "cal.pt"
    for extra, message in ((["--schedule", "local"], "calibrate fast first"),
                           (["--schedule", "fast,slow"], "schedules to calibrate"),
                           (["--schedule", "local,fast"], "calibrate fast first")):
        code, _, err = cli(capsys, "calibrate", val, "-m", path, "-o", out, *extra, *engine)
        assert code == 2 and message in one_error_line(err, "calibrate")
        assert not out.exists()
    code, _, err = cli(capsys, "calibrate", val, "-m", path, "-o", tmp_path, *engine)
    assert code == 2 and "is a folder" in one_error_line(err, "calibrate")
    out.write_bytes(b"keep")
    code, _, err = cli(capsys, "calibrate", val, "-m", path, "-o", out, *engine)
    assert code == 2 and "--overwrite" in one_error_line(err, "calibrate") and out.read_bytes() == b"keep"
    healthy = tmp_path / "healthy"
    scan(healthy, "case0")
    code, _, err = cli(capsys, "calibrate", healthy, "-m", path, "-o", tmp_path / "x.pt", *engine)
    assert code == 2 and one_error_line(err, "calibrate") and not (tmp_path / "x.pt").exists()


def test_thresholds_apply_only_to_maps_pooled_as_they_were_chosen_on(tmp_path, capsys):
    """Calibration records the pools; maps pooled otherwise (`restore --pools`) get no stored threshold:
    `--threshold` alone is refused with one line, and the Restorer's decision is None."""
    from helpers import cli, one_error_line, scan

    model = random_model(base_seed())
    rc = restore_config(model, "fast")
    pools = [rc.min_pool, rc.avg_pool]
    model.info = dict(threshold=0.8, thresholds=dict(fast=0.8), threshold_pools=pools)
    assert Restorer(model, "cpu", "cpu", schedule="fast").decision == 0.8
    other = (3, 15) if tuple(pools) != (3, 15) else (1, 9)
    moved = Restorer(model, "cpu", "cpu", schedule="fast", min_pool=other[0], avg_pool=other[1])
    assert moved.decision is None and moved.fit_threshold is None
    with pytest.raises(IfadError, match="drop --pools"):
        resolve_threshold(model, "model", "fast", other)
    path = save_model(model, tmp_path / "m.pt")
    src = scan(tmp_path / "in", "case")
    code, _, err = cli(capsys, "restore", src, "-m", path, "-o", tmp_path / "out", "--pools", f"{other[0]}x{other[1]}",
                       "--threshold", "--backend", "torch", "--device", "cpu", "-q")
    assert code == 2 and "drop --pools" in one_error_line(err, "restore") and not (tmp_path / "out").exists()
