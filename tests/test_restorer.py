"""The Restorer (ifad_fast/api.py): one object resolves the device, backend and schedule once;
the module-level restore_array/restore_arrays/restore_files are thin wrappers around it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import AFFINE, base_seed, random_model, toy_scans

from ifad_fast import config as cfg
from ifad_fast.api import Restorer, restore_array, restore_arrays, restore_config, restore_files
from ifad_fast.backends import TorchBackend
from ifad_fast.errors import IfadError
from ifad_fast.backends.fast import FastBackend

SCHEDULE = "5x300,2x600"


@pytest.fixture(scope="module")
def model():
    return random_model(base_seed())


def same(a, b):
    """Two NativeResults equal bit for bit (native maps, classes, latent, loss trace)."""
    for name in ("anomaly", "restoration", "classes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.model_grid.z, b.model_grid.z)
    assert a.model_grid.losses == b.model_grid.losses


def test_restorer_resolves_once_and_the_wrappers_call_it(model):
    img = toy_scans(1)[0]
    r = Restorer(model, "auto", "cpu", schedule=SCHEDULE, seed=3)
    assert isinstance(r.engine, FastBackend) and r.backend == "cpu" and r.device == torch.device("cpu")
    assert r.rc == restore_config(model, SCHEDULE, seed=3) and r.precision == "float32"
    one = r.restore_array(img, AFFINE)
    same(one, r.restore_array(img, AFFINE))                                 # built once, reusable
    same(one, restore_array(model, img, AFFINE, rc=r.rc, backend="cpu", device="cpu"))
    two = restore_arrays(model, [img, img[::-1]], [AFFINE, AFFINE], rc=r.rc, backend="cpu", device="cpu")
    same(two[1], r.restore_arrays([img, img[::-1]], [AFFINE, AFFINE])[1])
    # a flipped view (negative strides) goes through the device pipeline too
    same(two[1], Restorer(model, "cpu", "cpu", schedule=r.rc, pipeline="device").restore_arrays(
        [img, img[::-1]], [AFFINE, AFFINE])[1])
    # a RestoreConfig is a schedule too; seed and overrides replace its fields
    r2 = Restorer(model, "torch", "cpu", schedule=r.rc, seed=4, lr=0.5)
    assert r2.rc.seed == 4 and r2.rc.lr == 0.5 and r2.rc.phases == r.rc.phases and r2.backend == "torch"


def test_restorer_takes_a_backend_object_on_its_own_device(model):
    engine = TorchBackend(model.decoder, "cpu")
    r = Restorer(model, engine, schedule=SCHEDULE)
    assert r.engine is engine and r.device == torch.device("cpu")
    if torch.cuda.is_available():
        with pytest.raises(IfadError, match="runs on cpu"):
            Restorer(model, engine, "cuda", schedule=SCHEDULE)


@pytest.mark.parametrize("kwargs, message", [
    (dict(region="skull"), "region must be brain or full"),
    (dict(resolution=3), "at least 4"),
    (dict(resolution=True), "at least 4"),
    (dict(schedule="fastest"), "unknown schedule"),
    (dict(seed=-1), "seed must be"),
    (dict(backend="fortran"), "unknown backend"),
    (dict(precision="half"), "unknown precision"),
])
def test_restorer_refuses_bad_settings_before_any_work(model, kwargs, message):
    with pytest.raises(IfadError, match=message):
        Restorer(model, **{"device": "cpu", **kwargs})


def test_restore_files_wrapper_writes_what_the_restorer_writes(model, tmp_path):
    import nibabel as nib

    src = tmp_path / "in"
    src.mkdir()
    for i, img in enumerate(toy_scans(2, offset=10)):
        nib.save(nib.Nifti1Image(img, AFFINE), str(src / f"c{i}.nii.gz"))
    rc = restore_config(model, SCHEDULE, seed=1)
    a = restore_files(model, [src], tmp_path / "a", rc, "cpu", "cpu", batch=2, progress=False, report=lambda s: None)
    b = Restorer(model, "cpu", "cpu", schedule=rc).restore_files([src], tmp_path / "b", batch=2, report=lambda s: None)
    assert [s["case"] for s in a] == [s["case"] for s in b] == ["c0", "c1"]
    for s in a:
        for key in ("anomaly", "restoration"):
            x = nib.load(str(tmp_path / "a" / s["files"][key])).get_fdata()
            y = nib.load(str(tmp_path / "b" / s["files"][key])).get_fdata()
            np.testing.assert_array_equal(x, y)
    with pytest.raises(IfadError, match="--batch must be at least 1"):
        restore_files(model, [src], tmp_path / "c", rc, "cpu", "cpu", batch=0)


def test_stage_times_name_every_stage_of_a_restore_and_fit_in_its_wall_time(model):
    """time_stages=True records the five stages `ifad-fast bench speed` reports, in the order they
    run; they are disjoint intervals of the restore, so they sum to at most its wall time (the
    result's `seconds`, and a clock around the call), and the restoration itself (search) takes
    time."""
    import time

    from ifad_fast.benchmarks.speed import STAGES

    img = toy_scans(1, offset=40)[0]
    restorer = Restorer(model, "cpu", "cpu", schedule=SCHEDULE, time_stages=True)
    t0 = time.perf_counter()
    timed = restorer.restore_array(img, AFFINE)
    wall = time.perf_counter() - t0
    assert tuple(timed.stages) == STAGES
    assert all(v >= 0 for v in timed.stages.values()) and timed.stages["search"] > 0, timed.stages
    assert sum(timed.stages.values()) <= timed.seconds <= wall, (timed.stages, timed.seconds, wall)
    assert Restorer(model, "cpu", "cpu", schedule=SCHEDULE).restore_array(img, AFFINE).stages is None


@pytest.mark.parametrize("trained,restoring", [("paper", "paper"), ("reference", "paper"), ("none", "none")])
def test_restoring_prior_follows_the_training_prior(trained, restoring):
    """Paper-trained: the paper's prior at its training sigma. Reference-trained (DeepSDF's penalty sets no
    sigma): the paper's prior at the per-dimension RMS of the training latents. No prior: none."""
    from types import SimpleNamespace

    latents = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * 0.3
    model = SimpleNamespace(train=cfg.TrainConfig(prior=trained, sigma=0.05), latents=latents,
                            preprocess=cfg.get_preset("paper").preprocess)
    rc = restore_config(model, "fast")
    rms = float(np.sqrt(np.mean(latents.double().numpy() ** 2)))
    assert rc.prior == restoring
    assert rc.sigma == pytest.approx(rms if trained == "reference" else 0.05, rel=1e-12)
    assert 0.29 < rms < 0.31
    assert restore_config(model, "reference").prior == "none"          # the notebook's schedule has none
    assert restore_config(model, "fast", sigma=0.2).sigma == 0.2       # an explicit sigma wins


def test_check_job_resolves_the_threshold_once_and_refuses_a_set_with_outputs(model, tmp_path):
    """The check of a run shared by processes (`api.check_job`, what `ifad-fast restore --nproc N`
    calls before starting them): the threshold resolved as restore_files resolves it, and outputs of
    any case of the whole set refused with restore_files' message."""
    import dataclasses

    import nibabel as nib

    from ifad_fast.api import RestoreJob, check_job, resolve_threshold

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for i, img in enumerate(toy_scans(2, offset=10)):
        nib.save(nib.Nifti1Image(img, AFFINE), str(src / f"c{i}.nii.gz"))
    job = RestoreJob(model=None, inputs=(str(src),), out_dir=str(out), rc=restore_config(model, SCHEDULE),
                     threshold="model")
    with pytest.raises(IfadError, match="stores no threshold"):
        check_job(model, job)
    stored = dataclasses.replace(model, info={**(model.info or {}), "threshold": 0.25})
    assert check_job(stored, job).threshold == resolve_threshold(stored, "model") == 0.25
    assert check_job(model, dataclasses.replace(job, threshold=0.5)).threshold == 0.5
    (out / "c1_anomaly.nii.gz").write_bytes(b"")
    with pytest.raises(IfadError, match=r"already holds outputs of c1; pass --continue"):
        check_job(model, dataclasses.replace(job, threshold=None))
    assert check_job(model, dataclasses.replace(job, threshold=None), whole_set=False).threshold is None
    assert check_job(model, dataclasses.replace(job, threshold=None, existing="continue")).threshold is None


def test_restore_classes_resolves_as_the_restorer_and_gives_its_numbers(model):
    """restore.restore_classes (encoded classes in, NumPy out) resolves backend, device, precision
    and region as the Restorer does and gives its host pipeline's model-grid maps bit for bit."""
    from ifad_fast.preprocess import prepare
    from ifad_fast.restore import restore_classes

    img = toy_scans(1, offset=30)[0]
    r = Restorer(model, "auto", "cpu", schedule=SCHEDULE, seed=5, pipeline="host", grid="adaptive")
    got = r.restore_array(img, AFFINE).model_grid
    pc = model.preprocess
    p = prepare(img, r.encoder, pc, pc.test_mode_pool, AFFINE)
    ref = restore_classes(model, p.classes, r.rc, "auto", "cpu", brain=p.brain, threshold=r.decision)[0]
    for name in ("anomaly", "score", "classes", "z"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    assert got.losses == ref.losses and got.scored_voxels == ref.scored_voxels
    with pytest.raises(IfadError, match="region must be brain or full, got 'skull'"):
        restore_classes(model, p.classes, r.rc, "auto", "cpu", region="skull")


def test_a_score_resolution_prepares_the_scan_once_for_both_grids(model, monkeypatch):
    """With resolution=N the scan is normalised (and bias-corrected, registered) once, then placed
    on the model grid and on N³; each grid as `prepare` alone gives it."""
    from ifad_fast import preprocess

    calls = []
    real = preprocess._normalised
    monkeypatch.setattr(preprocess, "_normalised", lambda *a: calls.append(1) or real(*a))
    scan = toy_scans(1)[0]
    res = Restorer(model, "cpu", "cpu", schedule="3x256", resolution=14).restore_array(scan, AFFINE)
    assert len(calls) == 1
    pc, encoder = model.preprocess, preprocess.IntensityEncoder(model.centres.numpy())
    grids = preprocess.prepare_grids(scan, encoder, pc, pc.test_mode_pool, AFFINE, (None, 14))
    for grid, size in zip(grids, (None, 14)):
        alone = preprocess.prepare(scan, encoder, pc, pc.test_mode_pool, AFFINE, size)
        assert np.array_equal(grid.classes, alone.classes) and np.array_equal(grid.normalised, alone.normalised)
        assert np.array_equal(grid.brain, alone.brain)
    assert res.model_grid.score.shape == (14, 14, 14)
