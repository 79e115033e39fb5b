"""The model frame: scans of the same anatomy from any acquisition reach the same model grid, and
outputs return exactly to each scan's own grid; format-1 models keep their cube behaviour."""
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ifad_fast import config as cfg
from ifad_fast.api import model_grid_maps, restore_array, restore_config
from ifad_fast.errors import IfadError
from ifad_fast.model import FORMAT_VERSION, load_model, save_model
from ifad_fast.preprocess import (GridMap, IntensityEncoder, mode_pool3d, normalise, prepare, resample,
                                  to_model_grid)
from ifad_fast.restore import optimise_latents, restore_classes
from helpers import (WORLD_CENTRE as CENTRE, WORLD_RADII as RADII, acquisition, brain_image, train_world_model,
                    world_of)

PC = cfg.PreprocessConfig(resolution=32, extent_mm=192.0)   # 6 mm model voxels


def linear_field(world):
    return 0.5 + 0.004 * world[..., 0] - 0.003 * world[..., 1] + 0.002 * world[..., 2]


def smooth_field(world):
    w = (world - CENTRE) / 60.0
    return np.sin(w[..., 0]) * np.cos(0.8 * w[..., 1]) + 0.5 * np.sin(w[..., 2] + 0.3)


# --------------------------------------------------------------------------- frame geometry


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "aniso"])
def test_frame_round_trip_returns_to_the_scans_grid(kind):
    shape, affine = acquisition(kind)
    world = world_of(shape, affine)
    brain = np.sqrt((((world - CENTRE) / RADII) ** 2).sum(-1)) < 1
    scan = np.where(brain, 1.0 + smooth_field(world) ** 2, 0.0).astype(np.float32)
    volume, placement, _ = to_model_grid(scan, affine, PC)
    assert volume.shape == (32, 32, 32) and volume.dtype == np.float32
    assert placement.native_shape == shape
    np.testing.assert_array_equal(placement.native_affine, affine)
    # the model grid: world RAS axes, 6 mm voxels, centred on the brain's centre of mass
    np.testing.assert_allclose(placement.model_affine[:3, :3], np.eye(3) * 6.0, atol=1e-12)
    centre = placement.model_affine @ [15.5, 15.5, 15.5, 1.0]
    np.testing.assert_allclose(centre[:3], CENTRE, atol=0.5)

    inside = placement.to_native(placement.to_model(np.ones(shape, np.float32))) > 1 - 1e-4
    assert inside[brain].all()      # the frame holds the whole brain: every brain voxel returns
    # a linear field is reproduced exactly by trilinear interpolation: tests the affine itself
    lin = linear_field(world).astype(np.float32)
    model_world = world_of((32,) * 3, placement.model_affine)
    on_model = placement.to_model(lin)
    covered = placement.to_model(np.ones(shape, np.float32)) > 1 - 1e-4
    np.testing.assert_allclose(on_model[covered], linear_field(model_world)[covered], atol=2e-4)
    back = placement.to_native(linear_field(model_world).astype(np.float32))
    np.testing.assert_allclose(back[inside], lin[inside], atol=2e-4)
    # a smooth field (wavelength ~ 380 mm) survives scan -> model -> scan to interpolation tolerance
    field = smooth_field(world).astype(np.float32)
    round_trip = placement.to_native(placement.to_model(field))
    assert round_trip.shape == shape and round_trip.dtype == np.float32
    assert np.abs(round_trip - field)[inside].max() < 0.01
    # classes go back by nearest neighbour, keep their dtype, and voxels outside the frame get 0
    classes = placement.to_native(np.full((32,) * 3, 7, np.uint8), mode="nearest")
    assert classes.dtype == np.uint8 and set(np.unique(classes)) <= {0, 7} and (classes[brain] == 7).all()
    far = world_of(shape, affine) - placement.model_affine[:3, 3]
    outside = ((far < -7.0) | (far > 31 * 6.0 + 7.0)).any(-1)
    assert (placement.to_native(np.ones((32,) * 3, np.float32))[outside] == 0).all()


def test_acquisitions_of_one_anatomy_reach_the_same_model_grid():
    vols = {}
    for kind in ("ras", "lps", "oblique", "aniso"):
        shape, affine = acquisition(kind)
        img, _ = brain_image(world_of(shape, affine), np.random.default_rng(0), noise=0.0)
        vols[kind], placement, _ = to_model_grid(img, affine, PC)
        vols[kind + "_brain"] = placement.brain
    brain = vols["ras_brain"]
    for kind in ("lps", "oblique", "aniso"):
        # same anatomy, other voxel grids: the same model-grid volume up to resampling (edges blur)
        assert np.corrcoef(vols[kind][brain], vols["ras"][brain])[0, 1] > 0.97, kind
        assert (vols[kind + "_brain"] == brain).mean() > 0.98, kind


def test_resample_is_one_affine_and_device_agnostic():
    rng = np.random.default_rng()
    vol = torch.from_numpy(rng.random((7, 9, 8), dtype=np.float32))
    # integer shifts and axis flips sample voxels exactly
    m = np.array([[-1, 0, 0, 6], [0, 1, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    out = resample(vol, m, (7, 9, 8))
    # output j reads input j + 2: the last two rows fall outside and get 0
    torch.testing.assert_close(out, torch.cat([vol.flip(0)[:, 2:], torch.zeros(7, 2, 8)], 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(resample(vol, m, (7, 9, 8), mode="nearest"), out, rtol=0, atol=1e-6)
    # trilinear at a general point equals its definition
    m = np.eye(4)
    m[:3, 3] = [0.25, 1.5, 0.75]
    out = resample(vol, m, (5, 6, 6), chunk_voxels=40)
    v = vol.double().numpy()
    i, j, k = 2 + 0.25, 3 + 1.5, 4 + 0.75
    want = sum(v[int(i) + a, int(j) + b, int(k) + c] * (1 - abs(i - int(i) - a)) * (1 - abs(j - int(j) - b))
               * (1 - abs(k - int(k) - c)) for a in (0, 1) for b in (0, 1) for c in (0, 1))
    assert out[2, 3, 4].item() == pytest.approx(want, abs=1e-5)
    if torch.cuda.is_available():
        torch.testing.assert_close(resample(vol.cuda(), m, (5, 6, 6)).cpu(), out)


def test_brain_larger_than_the_frame_is_cut():
    shape, affine = acquisition("ras")
    world = world_of(shape, affine)
    img, _ = brain_image(world, np.random.default_rng(1))
    small = dataclasses.replace(PC, extent_mm=120.0)   # smaller than the brain
    volume, placement, _ = to_model_grid(img, affine, small)
    back = placement.to_native(np.ones((32,) * 3, np.float32))
    assert back.shape == shape and (back[img != 0] == 0).any() and (back[img != 0] > 0).any()
    assert placement.brain[0].any()    # the brain reaches the faces of the box


def test_physical_frame_needs_an_affine_and_takes_nibabel_images():
    shape, affine = acquisition("ras", voxel=4.0)
    img, _ = brain_image(world_of(shape, affine), np.random.default_rng(2))
    with pytest.raises(IfadError, match="affine"):
        to_model_grid(img, None, PC)
    a, pa, _ = to_model_grid(nib.Nifti1Image(img, affine), None, PC)
    b, pb, _ = to_model_grid(img, affine, PC)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pa.model_affine, pb.model_affine)
    # the cube frame takes bare arrays, as format-1 models always did
    c, pc, _ = to_model_grid(img, None, dataclasses.replace(PC, frame="cube", normalisation="upper"))
    assert c.shape == (32, 32, 32) and pc.grid is not None


# --------------------------------------------------------------------------- model files


# The model bundled before the frame existed (small preset, format 1), kept as it was written.
FORMAT_1_MODEL = Path(__file__).parent / "fixtures" / "format1_small_model.pt"


def test_format_1_model_loads_as_cube_and_upper(tmp_path):
    payload = torch.load(FORMAT_1_MODEL, map_location="cpu", weights_only=True)
    meta = json.loads(payload["meta"])
    assert meta["format_version"] == 1 and "frame" not in meta["preprocess"]
    model = load_model(FORMAT_1_MODEL)
    assert model.preprocess.frame == "cube" and model.preprocess.normalisation == "upper"
    # saved again, it is a format-2 file that names its frame and loads the same
    save_model(model, tmp_path / "m.pt")
    meta2 = json.loads(torch.load(tmp_path / "m.pt", weights_only=True)["meta"])
    assert meta2["format_version"] == FORMAT_VERSION == 2 and meta2["preprocess"]["frame"] == "cube"
    assert load_model(tmp_path / "m.pt").preprocess == model.preprocess


# --------------------------------------------------------------------------- a tiny trained model


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny-preset model (24³, 192 mm frame) trained on eight world-space toy brains at 4 mm."""
    return train_world_model("tiny", epochs=40, volumes_per_batch=4, points_per_volume=1024)


def _restore(model, img, affine, **kwargs):
    rc = restore_config(model, "40x1024", lr=2e-2, seed=0)
    return restore_array(model, img, affine, rc=rc, backend="torch", device="cpu", **kwargs)


def _corr(a, b, where):
    return float(np.corrcoef(a[where], b[where])[0, 1])


@pytest.mark.slow
def test_same_brain_at_1mm_and_2mm_gives_the_same_map(tiny_model):
    shape2, affine2 = acquisition("ras", voxel=2.0)
    # the 1 mm grid holds the 2 mm grid's voxel centres at its even indices
    affine1 = affine2.copy()
    affine1[:3, :3] /= 2.0
    shape1 = tuple(2 * s - 1 for s in shape2)
    img1, _ = brain_image(world_of(shape1, affine1), np.random.default_rng(4), lesion=True)
    img2, _ = brain_image(world_of(shape2, affine2), np.random.default_rng(5), lesion=True)
    a = _restore(tiny_model, img1, affine1)
    b = _restore(tiny_model, img2, affine2)
    assert a.anomaly.shape == shape1 and b.anomaly.shape == shape2
    brain = img2 != 0
    assert _corr(a.anomaly[::2, ::2, ::2], b.anomaly, brain) >= 0.9


def _old_cube_path(img, model):
    """Format 1, step by step: divide by the upper percentile, pad to a cube, resample, encode,
    mode-pool 3; the brain is normalised > 0."""
    normalised, _ = normalise(img, (2.0, 98.0), method="upper")
    grid = GridMap.for_shape(img.shape, model.preprocess.resolution)
    volume = np.clip(grid.to_model(normalised), 0.0, 1.0)
    encoder = IntensityEncoder(model.centres.numpy())
    return grid, volume, mode_pool3d(encoder.encode(volume), 3, encoder.n_classes)


def test_format_1_model_prepares_scans_as_before():
    model = load_model(FORMAT_1_MODEL)
    shape, affine = acquisition("lps", voxel=4.0)
    img, _ = brain_image(world_of(shape, affine), np.random.default_rng(3), lesion=True)
    grid, volume, classes = _old_cube_path(img, model)
    encoder = IntensityEncoder(model.centres.numpy())
    for given in (None, affine):     # an affine changes nothing in the cube frame
        p = prepare(img, encoder, model.preprocess, 3, given)
        np.testing.assert_array_equal(p.normalised, volume)
        np.testing.assert_array_equal(p.classes, classes)
        np.testing.assert_array_equal(p.brain, volume > 0)
        assert p.placement.grid == grid


@pytest.mark.slow
def test_format_1_model_gives_the_cube_path_map(tiny_model, tmp_path):
    """A model file of format 1 restores through the API exactly as the cube path step by step."""
    payload = tiny_model.to_payload()
    meta = json.loads(payload["meta"])
    meta["format_version"] = 1
    for key in ("frame", "extent_mm", "normalisation"):
        del meta["preprocess"][key]
    payload["meta"] = json.dumps(meta)
    torch.save(payload, tmp_path / "v1.pt")
    model = load_model(tmp_path / "v1.pt")
    assert model.preprocess.frame == "cube" and model.preprocess.normalisation == "upper"
    shape, affine = acquisition("oblique", voxel=4.0)
    img, _ = brain_image(world_of(shape, affine), np.random.default_rng(9), lesion=True)
    rc = restore_config(model, "5x512", seed=0)
    got = restore_array(model, img, rc=rc, backend="torch", device="cpu")
    grid, volume, classes = _old_cube_path(img, model)
    ref = restore_classes(model, classes, rc, backend="torch", device="cpu", brain=volume > 0)[0]
    np.testing.assert_array_equal(got.anomaly, grid.to_native(ref.anomaly))
    np.testing.assert_array_equal(got.classes, grid.to_native(ref.classes, mode="nearest"))


@pytest.mark.slow
def test_lps_scan_gives_the_ras_map_flipped(tiny_model):
    shape, affine = acquisition("ras", voxel=3.0)
    img, _ = brain_image(world_of(shape, affine), np.random.default_rng(6), lesion=True)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
    ras = _restore(tiny_model, img, affine)
    lps = _restore(tiny_model, img[::-1, ::-1].copy(), affine @ flip)
    assert _corr(lps.anomaly[::-1, ::-1], ras.anomaly, img != 0) >= 0.99


@pytest.mark.slow
def test_scoring_at_another_resolution(tiny_model):
    shape, affine = acquisition("oblique", voxel=3.0)
    img, lesion = brain_image(world_of(shape, affine), np.random.default_rng(7), lesion=True)
    base = _restore(tiny_model, img, affine)
    fine = _restore(tiny_model, img, affine, resolution=40)
    assert fine.anomaly.shape == shape and fine.classes.shape == shape
    assert fine.model_grid.anomaly.shape == (40, 40, 40) and fine.placement.resolution == 40
    # the 40³ grid spans the model grid's box: same first and last voxel centres
    np.testing.assert_allclose(fine.placement.model_affine @ [39, 39, 39, 1], base.placement.model_affine @ [23, 23, 23, 1])
    np.testing.assert_allclose(fine.model_grid.z, base.model_grid.z)     # the latent search is the same
    assert _corr(fine.anomaly, base.anomaly, img != 0) >= 0.9
    # the paper's evaluation grid: maps, brain and the label resampled (order 1, > 0) on the score grid
    maps, brain, label = model_grid_maps(fine, lesion)
    assert maps.shape == brain.shape == label.shape == (40, 40, 40) and label.dtype == np.bool_
    assert 0 < label.sum() < brain.sum() and brain[label].mean() > 0.95


# --------------------------------------------------------------------------- reference schedule


@pytest.mark.slow
def test_reference_schedule_starts_a_new_adam_each_phase(tiny_model):
    """Adam's first step moves every coordinate by exactly lr (m/sqrt(v) = sign(g)); a continued
    Adam does not. So the step that opens phase 2 tells a fresh optimiser from a kept one."""
    rc = restore_config(tiny_model, "reference")
    assert rc.restart_per_phase and rc.prior == "none"
    shape, affine = acquisition("ras", voxel=4.0)
    img, _ = brain_image(world_of(shape, affine), np.random.default_rng(8))
    from ifad_fast.backends import TorchBackend
    p = prepare(img, IntensityEncoder(tiny_model.centres.numpy()), tiny_model.preprocess, 3, affine)
    cls = torch.from_numpy(p.classes)[None]
    backend = TorchBackend(tiny_model.decoder)
    z0 = torch.randn(1, tiny_model.config.latent_dim, generator=torch.Generator().manual_seed(0))
    lr = 0.01

    def run(phases, restart):
        r = dataclasses.replace(rc, phases=phases, lr=lr, restart_per_phase=restart)
        return optimise_latents(backend, cls, z0, r, torch.Generator().manual_seed(1))[0]

    first = run(((6, 256),), True)
    fresh = (run(((6, 256), (1, 256)), True) - first).abs()
    kept = (run(((6, 256), (1, 256)), False) - first).abs()
    torch.testing.assert_close(fresh, torch.full_like(fresh, lr), rtol=1e-3, atol=0)
    assert not torch.allclose(kept, torch.full_like(kept, lr), rtol=1e-2, atol=0)


# --------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_restore_cli_resolution_and_protocol(tiny_model, tmp_path, capsys, monkeypatch):
    from ifad_fast import api
    from ifad_fast.cli import main

    save_model(tiny_model, tmp_path / "model.pt")
    shape, affine = acquisition("lps", voxel=4.0)
    img, _ = brain_image(world_of(shape, affine), np.random.default_rng(10), lesion=True)
    nib.save(nib.Nifti1Image(img, affine), str(tmp_path / "case.nii.gz"))
    args = ["restore", str(tmp_path / "case.nii.gz"), "-m", str(tmp_path / "model.pt"), "--backend", "torch",
            "--device", "cpu", "--schedule", "5x256"]
    assert main(args + ["-o", str(tmp_path / "a"), "--resolution", "32"]) == 0
    out = nib.load(str(tmp_path / "a" / "case_anomaly.nii.gz"))
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, affine)
    # --protocol paper: schedule paper, region full; a conflicting --schedule is a one-line user error
    seen = {}
    monkeypatch.setattr(api.Restorer, "restore_files",
                        lambda self, *a, **k: seen.update(rc=self.rc, region=self.region) or [])
    assert main(args[:-2] + ["-o", str(tmp_path / "b"), "--protocol", "paper"]) == 0
    assert seen["rc"].phases == ((700, 16200),) and seen["region"] == "full"
    capsys.readouterr()
    assert main(args + ["-o", str(tmp_path / "c"), "--protocol", "paper"]) == 2
    assert "--protocol paper sets --schedule paper" in capsys.readouterr().err


def test_train_cli_cube_frame_is_stored_in_the_model(tmp_path, scan_dir):
    from ifad_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", str(scan_dir), "-o", str(run), "--preset", "tiny", "--epochs", "1", "--frame", "cube",
                 "--device", "cpu"]) == 0
    model = load_model(run / "model.pt")
    assert model.preprocess.frame == "cube" and model.preprocess.normalisation == "minmax"
    assert json.loads((run / "cache" / "manifest.json").read_text())["frame"] == "cube"
