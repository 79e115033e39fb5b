"""Lesion kinds of the synthetic brains: `glioma` stays bit-for-bit what it was, `ms` (small
white-matter plaques) and `stroke` (a territorial infarct) are reproducible, drawn in the glioma
case's subject, of the stated sizes, places and intensities; the held-out acquisitions `ms` and
`stroke` take only cases of their kind."""
import hashlib
import json

import numpy as np
import pytest
import scipy
import torch
from scipy import ndimage as ndi

from ifad_fast import synth
from ifad_fast.acquisition import ACQUISITIONS, HELD_OUT, Acquisition, reacquire
from ifad_fast.errors import IfadError

COARSE = 3.0  # mm: a subject in a fraction of a second
KINDS = ("ms", "stroke")
# SHA-256 of (image, mask, brain mask, tissue, info less `seconds` and `lesion_kind`) of glioma cases
# (index, seed, voxel_mm, anatomy), computed from the generator before lesion kinds existed
# (numpy 2.4.6, torch 2.13.0+cpu, scipy 1.17.1, x86-64); other versions may round differently.
GLIOMA_SHA256 = {(1, 1, 4.0, "mni"): "ea2ce422ff683d2587cb5a58344133bc48cb2ae9ff7c6994d02eb32a52394ea9",
                 (2, 0, 3.0, "mni"): "7e39417cc9c2e8b5e8662709363349784593cdf18555a1ac46e93a31d0de111d",
                 (0, 2, 3.0, "folded"): "88010cab5b37e4473b526fedabbfdd2ea4bc14023a8141a27bebda6a940c5004"}
RECORDED_WITH = ("2.4.6", "2.13.0+cpu", "1.17.1")
# the main stream's subject parameters, which every kind shares with its glioma twin
SUBJECT = ("rot_deg", "head_scale", "scale", "shift_mm", "elastic_mm", "ventricle_mm", "atrophy", "atrophy_depth_mm",
           "c_csf", "c_gm", "c_wm", "n_wm_spots", "bias_sd", "snr", "texture", "anatomy")


def _same(a: synth.SynthCase, b: synth.SynthCase) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.brain_mask, b.brain_mask)
            and np.array_equal(a.tissue, b.tissue) and np.array_equal(a.mask, b.mask))


def _sha256(case: synth.SynthCase) -> str:
    h = hashlib.sha256()
    for a in (case.image, case.mask, case.brain_mask, case.tissue):
        h.update(np.ascontiguousarray(a).tobytes())
    info = {k: v for k, v in case.info.items() if k not in ("seconds", "lesion_kind")}
    h.update(json.dumps(info, sort_keys=True).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def twins():
    """Lesion cases 0 and 3 of seed 2 (the protocol's test cases) in every kind, at 3 mm."""
    return {j: {k: synth.generate_lesion(j, seed=2, voxel_mm=COARSE, kind=k) for k in synth.LESION_KINDS}
            for j in (0, 3)}


def test_glioma_is_what_it_was():
    if (np.__version__, torch.__version__, scipy.__version__) != RECORDED_WITH:
        pytest.skip(f"the hashes were recorded with numpy, torch, scipy {', '.join(RECORDED_WITH)}; this run has "
                    f"{np.__version__}, {torch.__version__}, {scipy.__version__}, which may round differently")
    for (j, seed, v, anatomy), digest in GLIOMA_SHA256.items():
        case = synth.generate_lesion(j, seed=seed, voxel_mm=v, anatomy=anatomy)
        assert case.info["lesion_kind"] == "glioma"
        assert _sha256(case) == digest, (j, seed, v, anatomy)


def test_glioma_never_reaches_the_other_kinds(monkeypatch):
    """kind="glioma" is the default, and none of the other kinds' code runs for it."""
    expected = synth.generate_lesion(1, seed=1, voxel_mm=4.0)

    def refuse(*args, **kwargs):
        raise AssertionError("a glioma case reached another kind's code")

    for name in ("_draw_kind_params", "_ms_plaques", "_stroke", "_ventricle_distance"):
        monkeypatch.setattr(synth, name, refuse)
    assert _same(synth.generate_lesion(1, seed=1, voxel_mm=4.0, kind="glioma"), expected)
    with pytest.raises(IfadError, match="unknown lesion kind"):
        synth.generate_lesion(0, voxel_mm=4.0, kind="cyst")


def test_kinds_are_deterministic_and_their_own(twins):
    for kind in KINDS:
        a = twins[0][kind]
        assert _same(a, synth.generate_lesion(0, seed=2, voxel_mm=COARSE, kind=kind))
        assert a.name == "lesion_0000" and a.info["lesion_kind"] == kind
        assert a.info["lesion_fraction"] == pytest.approx(a.lesion_fraction, abs=1e-5)
        assert "core_share" not in a.info and "edema_int" not in a.info      # the glioma's, unused
        assert not np.array_equal(a.mask, twins[3][kind].mask)


def test_same_subject_as_the_glioma_twin(twins):
    """Every kind has its glioma twin's subject parameters; ms and stroke (no mass effect) are the
    same brain exactly outside their lesions, with the same noise (rescaled with the mean
    intensity); the glioma's mass effect moves the anatomy around it a little."""
    for cases in twins.values():
        g, m, s = (cases[k] for k in ("glioma", "ms", "stroke"))
        for c in (m, s):
            assert {k: c.info[k] for k in SUBJECT} == {k: g.info[k] for k in SUBJECT}
        assert np.array_equal(m.brain_mask, s.brain_mask) and m.info["wm_spots"] == s.info["wm_spots"]
        away = ~ndi.binary_dilation((m.mask > 0) | (s.mask > 0), iterations=2)
        assert np.array_equal(m.tissue[away], s.tissue[away])
        brain = away & (m.brain_mask > 0)
        rel = np.abs(m.image[brain] - s.image[brain]) / m.image[brain]
        assert np.percentile(rel, 99) < 0.01, np.percentile(rel, 99)
        dice = 2 * np.count_nonzero(g.brain_mask & m.brain_mask) / (g.brain_mask.sum() + m.brain_mask.sum())
        assert dice > 0.97


def test_ms_plaques(twins):
    """Several separate small plaques, mostly in white matter (of the tissue before painting, and the
    stroke twin's tissue there), brighter than white and grey matter, darker than CSF."""
    for cases in twins.values():
        c, other = cases["ms"], cases["stroke"]
        n = c.info["n_plaques"]
        assert 5 <= n <= 20 and len(c.info["plaques"]) == n
        n_comp = ndi.label(c.mask)[1]
        assert n_comp == c.info["n_components"] and n - 2 <= n_comp <= n + 4, (n, n_comp)
        assert 0.0015 <= c.lesion_fraction <= 0.01
        assert all(3.0 <= p["length_mm"] <= 18.0 and p["width_mm"] <= p["length_mm"] for p in c.info["plaques"])
        sites = [p["site"] for p in c.info["plaques"]]
        assert set(sites) <= {"periventricular", "deep", "juxtacortical"}
        assert c.info["lesion_tissue"]["WM"] >= 0.55 and c.info["lesion_tissue"]["CSF"] == 0.0
        before = other.tissue[(c.mask > 0) & (other.mask == 0)]
        assert np.mean(before == 3) >= 0.55
        med = {t: np.median(c.image[c.tissue == t]) for t in (1, 2, 3)}
        les = np.median(c.image[c.mask > 0])
        assert med[2] < les < med[1], (med, les)


def test_stroke_infarct(twins):
    """One connected infarct of 1-6 % of the brain, grey and white matter reaching the cortex
    (within two voxels of the brain's edge), brighter than grey matter, darker than CSF."""
    for cases in twins.values():
        c = cases["stroke"]
        assert ndi.label(c.mask)[1] == 1
        assert 0.008 <= c.lesion_fraction <= 0.07
        assert c.info["territory"] in ("MCA superior", "MCA inferior", "ACA", "PCA")
        share = c.info["lesion_tissue"]
        assert share["CSF"] == 0.0 and share["GM"] >= 0.2 and share["WM"] >= 0.2
        depth = ndi.distance_transform_edt(c.brain_mask)
        assert depth[c.mask > 0].min() <= 2.0
        med = {t: np.median(c.image[c.tissue == t]) for t in (1, 2, 3)}
        les = np.median(c.image[c.mask > 0])
        assert med[2] < les < med[1], (med, les)


def test_held_out_acquisitions_take_their_kind_only(twins):
    for kind in KINDS:
        acq = ACQUISITIONS[kind]
        assert acq.lesion == kind and acq.held_out and kind in HELD_OUT and acq.anatomy == "mni"
        scan = reacquire(twins[0][kind], kind)
        assert scan.acquisition == kind and scan.mask.any()
        with pytest.raises(IfadError, match=f"kind {kind}"):
            reacquire(twins[0]["glioma"], kind)
    with pytest.raises(IfadError, match="kind glioma"):
        reacquire(twins[0]["ms"], "1.5mm")
    with pytest.raises(IfadError, match="lesion kind"):
        Acquisition("x", "a tumour of another kind", lesion="tumour")
    assert reacquire(synth.generate_healthy(0, voxel_mm=4.0), "ms").mask is None   # nothing to mismatch


def test_write_set_and_cli_lesion_kind(tmp_path, capsys):
    from ifad_fast.cli import main

    manifest = synth.write_set(tmp_path / "a", 0, 1, seed=2, voxel_mm=4.0, progress=False, lesion_kind="stroke")
    assert manifest["lesion_kind"] == "stroke" and manifest["cases"]["lesion_0000"]["lesion_kind"] == "stroke"
    assert main(["synth", "-o", str(tmp_path / "b"), "--healthy", "0", "--lesions", "1", "--voxel-mm", "4",
                 "--lesion-kind", "ms"]) == 0
    on_disk = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert on_disk["lesion_kind"] == "ms" and on_disk["cases"]["lesion_0000"]["n_plaques"] >= 5
    assert (tmp_path / "b" / "lesion" / "lesion_0000_mask.nii.gz").is_file()
    assert main(["synth", "-o", str(tmp_path / "c"), "--lesions", "1", "--lesion-kind", "cyst"]) == 2
    with pytest.raises(IfadError, match="unknown lesion kind"):
        synth.write_set(tmp_path / "d", 0, 1, voxel_mm=4.0, progress=False, lesion_kind="cyst")
