"""Synthetic MNI152-based brains: determinism, lesion size and placement, T2 contrast, files."""
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.stats import spearmanr

from ifad_fast import synth
from ifad_fast.errors import IfadError

COARSE = 3.0  # mm: fast cases for the determinism and file tests


@pytest.fixture(scope="module")
def lesion_cases():
    return [synth.generate_lesion(j, seed=0) for j in range(3)]


@pytest.fixture(scope="module")
def healthy_case():
    return synth.generate_healthy(0, seed=0)


def _same(a: synth.SynthCase, b: synth.SynthCase) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.brain_mask, b.brain_mask)
            and np.array_equal(a.tissue, b.tissue) and np.array_equal(a.affine, b.affine)
            and ((a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)))


def test_grid_and_types(healthy_case):
    shape, affine = synth.acquisition_grid(1.5)
    assert shape == (121, 145, 121)
    assert np.allclose(np.diag(affine)[:3], 1.5) and np.allclose(affine[:3, 3], [-90, -126, -72])
    c = healthy_case
    assert c.name == "healthy_0000" and c.mask is None
    assert c.image.shape == shape and c.image.dtype == np.float32
    assert c.brain_mask.dtype == np.uint8 and c.tissue.dtype == np.uint8
    assert c.affine.shape == (4, 4) and c.affine.dtype == np.float64 and np.array_equal(c.affine, affine)
    brain = c.brain_mask > 0
    assert 1.2e6 < brain.sum() * 1.5 ** 3 < 2.8e6          # a brain-sized volume, in mm^3
    assert np.all(c.image[~brain] == 0)
    assert c.image[brain].min() >= 0.02 * 1000 * 0.999     # no zeros inside the brain
    assert np.isfinite(c.image).all()
    assert set(np.unique(c.tissue[brain])) <= {1, 2, 3} and np.all(c.tissue[~brain] == 0)


def test_deterministic_per_seed_and_index():
    a = synth.generate_healthy(3, seed=5, voxel_mm=COARSE)
    b = synth.generate_healthy(3, seed=5, voxel_mm=COARSE)
    assert _same(a, b)
    assert not np.array_equal(a.image, synth.generate_healthy(4, seed=5, voxel_mm=COARSE).image)
    assert not np.array_equal(a.image, synth.generate_healthy(3, seed=6, voxel_mm=COARSE).image)
    la = synth.generate_lesion(3, seed=5, voxel_mm=COARSE)
    lb = synth.generate_lesion(3, seed=5, voxel_mm=COARSE)
    assert _same(la, lb) and la.name == "lesion_0003"
    assert not np.array_equal(la.mask, synth.generate_lesion(4, seed=5, voxel_mm=COARSE).mask)
    # healthy and lesion sets never share a stream: another subject, not the same one with a
    # lesion painted on
    outside = (la.mask == 0) & (a.brain_mask > 0) & (la.brain_mask > 0)
    assert not np.array_equal(a.brain_mask, la.brain_mask)
    assert not np.allclose(a.image[outside], la.image[outside])
    assert a.info["rot_deg"] != la.info["rot_deg"]


def test_lesion_size_and_placement(lesion_cases):
    fractions = []
    for c in lesion_cases:
        assert c.mask is not None and c.mask.dtype == np.uint8 and c.mask.shape == c.image.shape
        assert set(np.unique(c.mask)) == {0, 1}
        brain = c.brain_mask > 0
        les = c.mask > 0
        assert np.all(brain[les]), "lesion voxels outside the brain mask"
        frac = les.sum() / brain.sum()
        assert 0.01 <= frac <= 0.10, (c.name, frac)
        assert abs(frac - c.lesion_fraction) < 1e-12
        assert np.all(c.tissue[les] == 4) and not np.any(c.tissue[~les] == 4)
        # T2-hyperintense on average against the white matter it grows in
        assert c.image[les].mean() > 1.3 * c.image[c.tissue == 3].mean()
        fractions.append(frac)
    assert len({round(f, 4) for f in fractions}) == len(fractions)


def test_t2_contrast_order(healthy_case, lesion_cases):
    for c in [healthy_case, *lesion_cases[:2]]:
        means = [c.image[c.tissue == k].mean() for k in (1, 2, 3)]
        assert means[0] > means[1] > means[2], (c.name, means)


def test_write_set_round_trip(tmp_path):
    manifest = synth.write_set(tmp_path, n_healthy=1, n_lesions=1, seed=7, voxel_mm=COARSE, progress=False)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["seed"] == 7 and on_disk["voxel_mm"] == COARSE
    assert on_disk["healthy"] == ["healthy_0000"] and on_disk["lesion"] == ["lesion_0000"]
    assert on_disk["lesion_fractions"] == manifest["lesion_fractions"]
    les = synth.generate_lesion(0, seed=7, voxel_mm=COARSE)
    img = nib.load(tmp_path / "lesion" / "lesion_0000.nii.gz")
    assert np.array_equal(img.affine, les.affine)
    assert np.array_equal(np.asarray(img.dataobj, dtype=np.float32), les.image)
    m = nib.load(tmp_path / "lesion" / "lesion_0000_mask.nii.gz")
    assert m.get_data_dtype() == np.uint8 and np.array_equal(m.affine, les.affine)
    assert np.array_equal(np.asarray(m.dataobj), les.mask)
    assert on_disk["lesion_fractions"]["lesion_0000"] == pytest.approx(les.lesion_fraction, abs=1e-5)
    img = nib.load(tmp_path / "healthy" / "healthy_0000.nii.gz")
    assert np.array_equal(img.affine, synth.acquisition_grid(COARSE)[1])
    data = np.asarray(img.dataobj, dtype=np.float32)
    assert data.shape == les.image.shape and data.min() == 0 and data.max() > 500


def test_bad_arguments():
    with pytest.raises(IfadError):
        synth.generate_healthy(0, voxel_mm=0.0)
    with pytest.raises(IfadError):
        synth.generate_lesion(-1)
    with pytest.raises(IfadError):
        synth.acquisition_grid(float("nan"))


@pytest.fixture(scope="module")
def varied_subjects():
    return [synth.generate_healthy(i, seed=3, voxel_mm=COARSE) for i in range(8)]


def test_anatomical_variety_drawn_per_subject(varied_subjects):
    """Head size, tilt, ventricles and atrophy vary across subjects, within their stated ranges,
    and the same seed draws the same parameters again."""
    info = [c.info for c in varied_subjects]
    for key, spread in (("head_scale", 0.06), ("ventricle_mm", 3.0), ("atrophy", 0.3), ("atrophy_depth_mm", 5.0)):
        values = np.array([i[key] for i in info])
        assert np.ptp(values) > spread, (key, values)
    assert all(0.91 <= i["head_scale"] <= 1.09 for i in info)
    assert all(0.0 <= i["ventricle_mm"] <= 8.0 and 0.0 <= i["atrophy"] <= 0.85 for i in info)
    rot = np.array([i["rot_deg"] for i in info])
    assert np.all(np.abs(rot) <= [15.0, 8.0, 10.0]) and np.abs(rot[:, 0]).max() > 8.0   # beyond v1's ±8°
    scale = np.array([i["scale"] for i in info]) / np.array([i["head_scale"] for i in info])[:, None]
    assert np.all(np.abs(scale - 1.0) <= 0.03 + 1e-12)
    again = synth.generate_healthy(5, seed=3, voxel_mm=COARSE)
    assert {k: v for k, v in again.info.items() if k != "seconds"} == \
        {k: v for k, v in info[5].items() if k != "seconds"}
    other = synth.generate_healthy(5, seed=4, voxel_mm=COARSE).info
    assert other["head_scale"] != info[5]["head_scale"] and other["rot_deg"] != info[5]["rot_deg"]


def test_anatomical_variety_is_realised(varied_subjects):
    """The drawn parameters show in the images: brain volume follows the head size (within 3 %),
    CSF near the brain's centre follows the ventricle pull, CSF in the outer 9 mm follows atrophy
    (Spearman rank correlation ≥ 0.8 over 8 subjects)."""
    vox = COARSE ** 3
    ventricles, outer_csf = [], []
    for c in varied_subjects:
        brain = c.brain_mask > 0
        expected = synth._templates().brain_ml * 1000.0 * float(np.prod(c.info["scale"]))
        assert brain.sum() * vox == pytest.approx(expected, rel=0.03), c.name
        centre = np.argwhere(brain).mean(0)
        r = np.linalg.norm((np.indices(brain.shape) - centre[:, None, None, None]) * COARSE, axis=0)
        ventricles.append(np.count_nonzero((c.tissue == 1) & (r < 25.0)))
        depth = ndi.distance_transform_edt(brain, sampling=COARSE)
        outer = brain & (depth <= 9.0)
        outer_csf.append(np.count_nonzero((c.tissue == 1) & outer) / np.count_nonzero(outer))
    info = [c.info for c in varied_subjects]
    assert spearmanr([i["ventricle_mm"] for i in info], ventricles).statistic >= 0.8
    assert spearmanr([i["atrophy"] for i in info], outer_csf).statistic >= 0.8
