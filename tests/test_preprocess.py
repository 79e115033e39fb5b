import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ifad_fast import config as cfg
from ifad_fast.cli import main
from ifad_fast.errors import IfadError
from ifad_fast.preprocess import GridMap, IntensityEncoder, model_affine, normalise, prepare
from ifad_fast.restore.scoring import dilate
from helpers import AFFINE, base_seed, toy_brain


def test_normalise_minmax_is_the_papers():
    img, _ = toy_brain(3)
    out, (lo, hi) = normalise(img)
    brain = img != 0
    np.testing.assert_allclose((lo, hi), np.percentile(img[brain], [2, 98]))
    assert out[~brain].max() == 0.0
    want = (np.clip(img[brain].astype(np.float64), lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(out[brain], want, rtol=1e-6, atol=1e-7)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    # the darkest 2 % of the brain is 0 like the background: the brain must come from the support
    assert (out[brain] == 0.0).mean() == pytest.approx(0.02, abs=0.02)


def test_normalise_upper_keeps_background_apart():
    img, _ = toy_brain(3)
    out, (lo, hi) = normalise(img, method="upper")
    brain = img != 0
    assert out[~brain].max() == 0.0
    assert out[brain].min() >= lo / hi - 1e-6 and out[brain].min() > 0.1
    assert out.max() == pytest.approx(1.0)
    assert (out[brain] == 1.0).mean() == pytest.approx(0.02, abs=0.02)


def test_gridmap_round_trip_keeps_shape():
    rng = np.random.default_rng(base_seed())
    shape = (21, 30, 17)
    g = GridMap.for_shape(shape, 16)
    vol = rng.random(shape).astype(np.float32)
    model = g.to_model(vol)
    assert model.shape == (16, 16, 16)
    back = g.to_native(model)
    assert back.shape == shape
    classes = g.to_native((model * 9).astype(np.uint8), mode="nearest")
    assert classes.shape == shape and classes.dtype == np.uint8
    # identity when the cube already has the model's size: exact round trip
    same = GridMap.for_shape((16, 16, 16), 16)
    np.testing.assert_array_equal(same.to_native(same.to_model(vol[:16, :16, :16])), vol[:16, :16, :16])


def test_model_affine_maps_corners_to_native_world():
    g = GridMap.for_shape((20, 30, 10), 16)
    A = model_affine(g, AFFINE)
    # model voxel 0 is cube voxel 0, which is native voxel -offset
    native0 = -np.array(g.offset, float)
    np.testing.assert_allclose(A @ [0, 0, 0, 1], AFFINE @ [*native0, 1])
    last = np.array([15, 15, 15, 1.0])
    np.testing.assert_allclose(A @ last, AFFINE @ [*(np.full(3, g.cube - 1.0) - g.offset), 1])


def test_encoder_fit_has_background_class_and_sorted_centres():
    vols = [normalise(toy_brain(i)[0], method="upper")[0] for i in range(3)]
    enc = IntensityEncoder.fit(vols, k=5, n_samples=20000, seed=0)
    assert enc.centres[0] == 0.0 and np.all(np.diff(enc.centres) > 0)
    classes = enc.encode(vols[0])
    assert classes.dtype == np.uint8
    assert (classes[vols[0] == 0] == 0).all() and (classes[vols[0] > 0] > 0).all()


def test_encoder_presets_and_files(tmp_path):
    enc = IntensityEncoder.preset("hcp-t2")
    assert enc.n_classes == 10 and enc.centres[0] == pytest.approx(0.00834)
    enc.save(tmp_path / "c.json")
    np.testing.assert_array_equal(IntensityEncoder.load(str(tmp_path / "c.json")).centres, enc.centres)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(IfadError):
        IntensityEncoder.load(str(tmp_path / "bad.json"))
    with pytest.raises(IfadError):
        IntensityEncoder.load("nope")


def test_prepare_mode_pool_and_brain_region():
    img, _ = toy_brain(4)
    p = prepare(img, IntensityEncoder.preset("hcp-t2"), cfg.PreprocessConfig(resolution=20), 3, AFFINE)
    assert p.classes.shape == (20, 20, 20) and p.classes.max() < 10
    # the brain is the resampled support, not the intensities (min-max puts brain voxels at 0)
    assert p.brain.dtype == np.bool_ and p.brain[p.normalised > 0].all()
    np.testing.assert_array_equal(p.brain, p.placement.to_model((img != 0).astype(np.float32)) > 0)
    region = dilate(torch.from_numpy(p.brain), 2).numpy()
    assert region.sum() > p.brain.sum()
    assert region[p.brain].all()


def test_prepare_cli_writes_classes_and_manifest(tmp_path, scan_dir):
    out = tmp_path / "prep"
    assert main(["prepare", str(scan_dir), "-o", str(out), "--preset", "tiny", "--resolution", "16",
                 "--classes", "6"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["cases"]) == 4 and len(manifest["centres"]) == 6
    assert manifest["frame"] == "physical" and manifest["extent_mm"] == 192.0
    for case in manifest["cases"]:
        img = nib.load(str(out / case["files"]["classes"]))
        data = np.asarray(img.dataobj)
        assert data.shape == (16, 16, 16) and data.dtype == np.uint8 and 0 < data.max() < 6
        assert case["native_shape"] == [30, 34, 28]
        # RAS axes, the tiny preset's 192 mm box at 16³: 12 mm voxels
        np.testing.assert_allclose(img.affine[:3, :3], np.eye(3) * 12.0)
        np.testing.assert_allclose(img.affine, case["model_affine"])
        np.testing.assert_allclose(case["affine"], AFFINE)
        brain = np.asarray(nib.load(str(out / case["files"]["brain"])).dataobj)
        # mode pooling (window 2) may carry a class into the background's edge; the brain holds the rest
        assert brain.shape == (16, 16, 16) and brain[data > 0].mean() > 0.9


def test_prepare_cli_cube_frame(tmp_path, scan_dir):
    out = tmp_path / "prep"
    assert main(["prepare", str(scan_dir), "-o", str(out), "--resolution", "16", "--classes", "6",
                 "--frame", "cube"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frame"] == "cube"
    for case in manifest["cases"]:
        img = nib.load(str(out / case["files"]["classes"]))
        g = GridMap(tuple(case["native_shape"]), case["cube"], tuple(case["offset"]), 16)
        np.testing.assert_allclose(img.affine, model_affine(g, np.array(case["affine"])))
