"""Affine registration to MNI152 (register.py, PreprocessConfig.register, `--register`).

The registration gives M (scan world -> MNI world); the frame places the scan by M @ affine, so its
resampling onto the model grid and back (`Placement.to_native`) are the unregistered code's: the maps
come back on the scan's grid, written with its affine and header. The registrations here run on the
coarse pyramid level only (4 mm: `coarse`; rougher still where only the plumbing is tested: `quick`) to
keep each test to a few seconds.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
from helpers import AFFINE, FAST, bad_model, cli, one_error_line, random_model, rotation, toy_brain, write_nifti

from ifad_fast import api, config as cfg, register
from ifad_fast.errors import IfadError
from ifad_fast.model import load_model, save_model

needs_simpleitk = pytest.mark.skipif(importlib.util.find_spec("SimpleITK") is None,
                                     reason="SimpleITK is not installed (pip install 'ifad-fast[register]')")


@pytest.fixture
def coarse(monkeypatch):
    """Registration on the 4 mm level only (the default adds a 2 mm one)."""
    monkeypatch.setattr(register, "LEVELS", ((2, 2.0),))


@pytest.fixture
def quick(monkeypatch):
    """A rough registration (4 mm, a fifth of the samples, 30 steps) for the tests of the plumbing."""
    monkeypatch.setattr(register, "LEVELS", ((2, 2.0),))
    monkeypatch.setattr(register, "SAMPLING", 0.02)
    monkeypatch.setattr(register, "ITERATIONS", 30)


def registering(model):
    """The model with PreprocessConfig.register set (as one trained with --register)."""
    return dataclasses.replace(model, preprocess=cfg.replace(model.preprocess, register=True))


def known_transform() -> np.ndarray:
    """K, world -> world: rotations of 10° (x) and 5° (z), scale 1.08, shift (6, -4, 3) mm."""
    k = np.eye(4)
    k[:3, :3] = 1.08 * rotation((10.0, 0.0, 5.0))
    k[:3, 3] = [6.0, -4.0, 3.0]
    return k


@pytest.fixture(scope="module")
def synthetic_case():
    """A 3 mm synthetic lesion case (MNI space with the subject's own pose and size)."""
    from ifad_fast.synth import generate_lesion

    return generate_lesion(0, seed=2, voxel_mm=3.0)


def rms_mm(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance (mm) between two (4, N) arrays of homogeneous points."""
    return float(np.sqrt(((a - b)[:3] ** 2).sum(0).mean()))


@needs_simpleitk
def test_registration_recovers_a_known_affine(synthetic_case, coarse):
    """The case, and the case moved by K through its affine (the same voxels, claimed K mm away):
    registered, the same anatomy lands within 2 mm RMS at the same MNI position. The plain case's M
    brings its brain's centre within 3 mm of the template brain's and its volume within 5 %."""
    case = synthetic_case
    k = known_transform()
    m1 = register.register(case.image, case.affine)
    m2 = register.register(case.image, k @ case.affine)
    assert m1.shape == (4, 4) and m1.dtype == np.float64 and np.array_equal(m1[3], [0, 0, 0, 1])
    voxels = np.argwhere(case.brain_mask > 0)
    world = case.affine @ np.c_[voxels, np.ones(len(voxels))].T
    assert rms_mm(m1 @ world, m2 @ k @ world) < 2.0
    assert rms_mm(m1 @ world, world) > 5.0                 # the subject's pose was undone, not left as it was
    tpl, tpl_affine = register.template()
    centre_tpl, volume_tpl = register._centre_and_volume(tpl > 0, tpl_affine)
    centre, volume = register._centre_and_volume(case.brain_mask > 0, m1 @ case.affine)
    assert np.linalg.norm(centre - centre_tpl) < 3.0 and abs(volume / volume_tpl - 1) < 0.05


@needs_simpleitk
def test_a_registered_restore_comes_back_in_the_scans_space(tmp_path, capsys, quick):
    """A model with register=True, a toy scan with an oblique LPS affine, through the CLI: the maps have
    the scan's shape, affine and header; the case's JSON records M and the frame's register; the map is
    the model grid's, taken back once by the placement whose native affine is M @ affine."""
    affine = np.eye(4)
    affine[:3, :3] = rotation((8.0, -5.0, 12.0)) @ np.diag([-6.0, -5.5, 6.5])
    affine[:3, 3] = [90.0, 95.0, -80.0]
    img, _ = toy_brain(3, lesion=True)
    path = write_nifti(tmp_path / "s.nii.gz", img, affine)
    save_model(registering(random_model(0)), tmp_path / "model.pt")
    code, _, err = cli(capsys, "restore", path, "-m", tmp_path / "model.pt", "-o", tmp_path / "out", *FAST)
    assert code == 0, err
    out = nib.load(str(tmp_path / "out" / "s_anomaly.nii.gz"))
    src = nib.load(str(path))
    assert out.shape == img.shape and np.array_equal(out.affine, src.affine)
    assert out.header.get_best_affine().tolist() == src.header.get_best_affine().tolist()
    summary = json.loads((tmp_path / "out" / "s_restore.json").read_text())
    m = np.asarray(summary["registration"])
    assert summary["frame"]["register"] and m.shape == (4, 4)
    np.testing.assert_allclose(m, register.register(src.get_fdata(dtype=np.float32), src.affine), atol=1e-9)
    res = api.Restorer(load_model(tmp_path / "model.pt"), "torch", "cpu", schedule="10x256").restore_array(src)
    np.testing.assert_allclose(res.placement.native_affine, m @ src.affine, atol=1e-9)
    assert res.anomaly.shape == img.shape
    np.testing.assert_array_equal(res.anomaly, res.placement.to_native(res.model_grid.anomaly))
    np.testing.assert_allclose(res.anomaly, out.get_fdata(dtype=np.float32), atol=1e-6)


def test_register_off_never_registers_and_identity_changes_nothing(monkeypatch):
    """register=False never calls the registration; register=True with M = I gives the same maps bit
    for bit (I @ affine is the affine exactly): the placement is the only thing registration touches."""
    img, _ = toy_brain(5, lesion=True)

    def refuse(data, affine):
        raise AssertionError("registered with register=False")

    monkeypatch.setattr(register, "register", refuse)
    plain = api.Restorer(random_model(1), "torch", "cpu", schedule="10x256").restore_array(img, AFFINE)
    monkeypatch.setattr(register, "register", lambda data, affine: np.eye(4))
    model = api.with_registration(random_model(1))
    assert model.preprocess.register
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # warn=False: no warning
        same = api.Restorer(model, "torch", "cpu", schedule="10x256").restore_array(img, AFFINE)
    for name in ("anomaly", "restoration", "classes"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(same, name))
    np.testing.assert_array_equal(plain.model_grid.anomaly, same.model_grid.anomaly)


def test_prepare_and_train_without_register_write_what_they_wrote_before(tmp_path, capsys, monkeypatch):
    """Without --register: no registration, and manifest.json gains no key (no 'register', no
    per-case 'registration'); the model file stores register: false and loads as before."""
    monkeypatch.setattr(register, "register", lambda data, affine: pytest.fail("registered without --register"))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        write_nifti(data / f"h{i}.nii.gz", toy_brain(i)[0])
    code, _, err = cli(capsys, "prepare", data, "-o", tmp_path / "prep", "--preset", "tiny")
    assert code == 0, err
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert "register" not in manifest and not any("registration" in c for c in manifest["cases"])


@needs_simpleitk
def test_prepare_and_train_with_register(tmp_path, capsys, quick):
    """prepare --register records it and each case's M in manifest.json; a model trained on the folder
    registers (its PreprocessConfig says so); train refuses --register on a prepared folder."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        write_nifti(data / f"h{i}.nii.gz", toy_brain(i)[0])
    code, _, err = cli(capsys, "prepare", data, "-o", tmp_path / "prep", "--preset", "tiny", "--register")
    assert code == 0, err
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert manifest["register"] is True
    assert all(np.asarray(case["registration"]).shape == (4, 4) for case in manifest["cases"])
    h0 = nib.load(str(data / "h0.nii.gz"))
    np.testing.assert_allclose(manifest["cases"][0]["registration"],
                               register.register(h0.get_fdata(dtype=np.float32), h0.affine), atol=1e-9)
    code, _, err = cli(capsys, "train", tmp_path / "prep", "-o", tmp_path / "run", "--preset", "tiny",
                       "--epochs", "1", "--device", "cpu")
    assert code == 0, err
    assert load_model(tmp_path / "run" / "model.pt").preprocess.register is True
    code, _, err = cli(capsys, "train", tmp_path / "prep", "-o", tmp_path / "again", "--preset", "tiny", "--register")
    assert code == 2 and "--register" in one_error_line(err, "train")


@needs_simpleitk
def test_restore_register_on_a_model_trained_without_it_warns(tmp_path, capsys, quick):
    """restore --register with a model trained without registration: allowed, with a warning; the
    case's JSON records the registration. --continue into that folder without --register is refused."""
    path = write_nifti(tmp_path / "s.nii.gz", toy_brain(2)[0])
    save_model(random_model(2), tmp_path / "model.pt")
    args = ("restore", path, "-m", tmp_path / "model.pt", "-o", tmp_path / "out", *FAST)
    code, _, err = cli(capsys, *args, "--register")
    assert code == 0 and "trained without --register" in err, err
    summary = json.loads((tmp_path / "out" / "s_restore.json").read_text())
    assert summary["frame"]["register"] and np.asarray(summary["registration"]).shape == (4, 4)
    code, _, err = cli(capsys, *args, "--continue")
    assert code == 2 and "register" in one_error_line(err, "restore")


def test_without_simpleitk_register_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """SimpleITK missing: prepare/train/restore --register and a registering model each fail with one
    line naming the extra; nothing is written."""
    monkeypatch.setitem(sys.modules, "SimpleITK", None)          # `import SimpleITK` raises ImportError
    path = write_nifti(tmp_path / "s.nii.gz", toy_brain(0)[0])
    for command, *rest in (("prepare", path, "-o", tmp_path / "prep", "--preset", "tiny", "--register"),
                           ("train", tmp_path, "-o", tmp_path / "run", "--preset", "tiny", "--register"),
                           ("restore", path, "-o", tmp_path / "out", *FAST, "--register")):
        code, _, err = cli(capsys, command, *rest)
        assert code == 2 and "pip install 'ifad-fast[register]'" in one_error_line(err, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.nii.gz"]
    with pytest.raises(IfadError, match=r"ifad-fast\[register\]"):
        api.Restorer(registering(random_model(0)), "torch", "cpu")


def test_the_register_key_round_trips_and_older_model_files_load_without_it(tmp_path):
    model = random_model(3)
    on = registering(model)
    assert load_model(save_model(on, tmp_path / "on.pt")).preprocess.register is True
    plain = save_model(model, tmp_path / "off.pt")
    assert load_model(plain).preprocess.register is False

    def drop(payload, meta):
        del meta["preprocess"]["register"]

    assert load_model(bad_model(plain, tmp_path / "older.pt", drop)).preprocess.register is False
    with pytest.raises(IfadError, match="register"):
        load_model(bad_model(plain, tmp_path / "bad.pt", lambda p, m: m["preprocess"].update(register="yes")))
    with pytest.raises(IfadError, match="physical frame"):
        cfg.PreprocessConfig(frame="cube", register=True)
