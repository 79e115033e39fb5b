"""The opt-in `folded` anatomy of the synthetic brains: `mni` stays bit-for-bit what it was,
`folded` is reproducible, changes the cortex (not deep white matter), differs between subjects
more than `mni` does, and is left/right asymmetric (petalia, ventricle ratio); `aged` is folded with
sulci and ventricles past folded's ranges; `mixed` alternates mni and folded subjects."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from ifad_fast import synth
from ifad_fast.errors import IfadError

COARSE = 3.0  # mm: a subject in a fraction of a second

def _same(a: synth.SynthCase, b: synth.SynthCase) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.brain_mask, b.brain_mask)
            and np.array_equal(a.tissue, b.tissue)
            and ((a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)))


def _gm_disagreement(a: np.ndarray, b: np.ndarray) -> float:
    """1 - Jaccard of the GM labels of two tissue maps."""
    ga, gb = a == 2, b == 2
    return np.count_nonzero(ga ^ gb) / np.count_nonzero(ga | gb)


@pytest.fixture
def zero_pose(monkeypatch):
    """Every subject drawn in the template's pose and size (no tilt, shift or scaling); the rest
    of its draws (elastic field, ventricles, atrophy, contrast, noise) as usual."""
    draw = synth._draw_params

    def posed(rng, lesion, reference=False):
        p = draw(rng, lesion, reference)
        p.update(rot_deg=[0.0] * 3, head_scale=1.0, scale=[1.0] * 3, shift_mm=[0.0] * 3)
        return p

    monkeypatch.setattr(synth, "_draw_params", posed)


def _fold_params(monkeypatch, **fixed):
    """Draw folded subjects with these folded-anatomy parameters fixed."""
    draw = synth._draw_fold_params
    monkeypatch.setattr(synth, "_draw_fold_params", lambda rng: {**draw(rng), **fixed})


def test_mni_never_draws_or_builds_the_folded_anatomy(monkeypatch):
    """The default anatomy is the generator as it was: the same arrays with or without the argument,
    and none of the folded anatomy's draws or maps is touched (its stream and code are apart).
    (Bit-identity with the code before the argument existed was checked once by hash on one machine;
    a stored hash would not hold across CPUs.)"""
    expected = {kind: fn(1, seed=1, voxel_mm=4.0) for kind, fn in
                (("healthy", synth.generate_healthy), ("lesion", synth.generate_lesion))}

    def refuse(*args, **kwargs):
        raise AssertionError("the mni anatomy reached the folded anatomy's code")

    for name in ("_draw_fold_params", "_fold_maps"):
        monkeypatch.setattr(synth, name, refuse)
    monkeypatch.setattr(synth._Folding, "draw", refuse)
    assert _same(synth.generate_healthy(1, seed=1, voxel_mm=4.0, anatomy="mni"), expected["healthy"])
    assert _same(synth.generate_lesion(1, seed=1, voxel_mm=4.0, anatomy="mni"), expected["lesion"])
    assert expected["healthy"].info["anatomy"] == "mni"


def test_folded_is_deterministic_and_its_own():
    a = synth.generate_healthy(1, seed=2, voxel_mm=COARSE, anatomy="folded")
    assert _same(a, synth.generate_healthy(1, seed=2, voxel_mm=COARSE, anatomy="folded"))
    assert a.info["anatomy"] == "folded" and 4.0 <= a.info["gyral_width_mm"] <= 8.0
    assert not np.array_equal(a.tissue, synth.generate_healthy(2, seed=2, voxel_mm=COARSE, anatomy="folded").tissue)
    m = synth.generate_healthy(1, seed=2, voxel_mm=COARSE)
    assert m.info["anatomy"] == "mni" and "gyral_width_mm" not in m.info
    # the main stream's parameters are shared: same pose, contrast, ventricles and atrophy (the
    # white-matter spots are drawn among the subject's own white-matter voxels)
    assert {k: v for k, v in m.info.items() if k not in ("anatomy", "seconds", "wm_spots")}.items() <= a.info.items()
    assert not np.array_equal(a.tissue, m.tissue)
    la = synth.generate_lesion(0, seed=2, voxel_mm=COARSE, anatomy="folded")
    assert _same(la, synth.generate_lesion(0, seed=2, voxel_mm=COARSE, anatomy="folded"))
    with pytest.raises(IfadError, match="unknown anatomy"):
        synth.generate_healthy(0, voxel_mm=COARSE, anatomy="mni152")
    with pytest.raises(IfadError, match="unknown anatomy"):
        synth.write_set("unused", 1, 0, anatomy=None)


def test_folding_changes_the_cortex_not_deep_white_matter():
    """Against the same subject's mni anatomy, folding relabels a fifth of the cortical ribbon
    and no deep white matter, opens sulci (CSF in the ribbon) and makes the GM/CSF boundary
    larger (more GM-CSF voxel faces per GM voxel)."""
    for i in range(3):
        m = synth.generate_healthy(i, seed=0, voxel_mm=COARSE)
        f = synth.generate_healthy(i, seed=0, voxel_mm=COARSE, anatomy="folded")
        ribbon = ndi.binary_dilation(m.tissue == 2) & (m.brain_mask > 0)
        deep = ndi.binary_erosion(m.tissue == 3, iterations=2)
        changed = m.tissue != f.tissue
        assert changed[ribbon].mean() > 0.12 and changed[deep].mean() < 0.01, (i, changed[ribbon].mean())
        assert (f.tissue[ribbon] == 1).mean() > (m.tissue[ribbon] == 1).mean() + 0.05, i
        assert _gm_csf_faces(f.tissue) > 1.3 * _gm_csf_faces(m.tissue), i


def _gm_csf_faces(t: np.ndarray) -> float:
    """Voxel faces between GM and CSF labels per GM voxel: the GM/CSF boundary's area."""
    n = 0
    for axis in range(3):
        a = np.moveaxis(t, axis, 0)
        n += np.count_nonzero((a[1:] == 2) & (a[:-1] == 1)) + np.count_nonzero((a[1:] == 1) & (a[:-1] == 2))
    return n / np.count_nonzero(t == 2)


def test_folded_subjects_differ_more_and_are_asymmetric(zero_pose):
    """In the same pose, two folded subjects' GM maps disagree more than the same two mni
    subjects', and a folded subject's GM disagrees more with its left/right mirror image."""
    cases = {(a, i): synth.generate_healthy(i, seed=0, voxel_mm=COARSE, anatomy=a)
             for a in ("mni", "folded") for i in range(3)}
    for i in range(2):
        assert (_gm_disagreement(cases["folded", i].tissue, cases["folded", i + 1].tissue)
                > _gm_disagreement(cases["mni", i].tissue, cases["mni", i + 1].tissue) + 0.02), i
    for i in range(3):   # the grid is symmetric about x = 0, so a flip mirrors about the midline
        mirror = {a: _gm_disagreement(cases[a, i].tissue, np.flip(cases[a, i].tissue, 0)) for a in ("mni", "folded")}
        assert mirror["folded"] > mirror["mni"] + 0.02, (i, mirror)


def test_petalia_and_ventricle_ratio(zero_pose, monkeypatch):
    """Right frontal petalia grows the brain forward on the right, left occipital petalia
    backward on the left; a right/left ventricle ratio makes the right ventricle larger."""
    def brain(**fixed):
        _fold_params(monkeypatch, **fixed)
        return synth.generate_healthy(0, seed=0, voxel_mm=COARSE, anatomy="folded")

    base = dict(petalia_frontal_mm=0.0, petalia_occipital_mm=0.0, ventricle_ratio=1.0)
    ref = brain(**base)
    shape = ref.brain_mask.shape
    mid = shape[0] // 2                                           # x = 0 mm
    yc = int(round((synth._templates().brain_centre[1] + 126.0) / COARSE))

    def grown(case):   # brain voxels gained minus lost: right front, left front, right back, left back
        d = case.brain_mask.astype(int) - ref.brain_mask.astype(int)
        return (d[mid + 1:, yc:].sum(), d[:mid, yc:].sum(), d[mid + 1:, :yc].sum(), d[:mid, :yc].sum())

    rf, lf, rb, lb = grown(brain(**{**base, "petalia_frontal_mm": 4.0}))
    assert rf > 100 and abs(lf) < 0.2 * rf and abs(rb) + abs(lb) < 0.2 * rf, (rf, lf, rb, lb)
    rf, lf, rb, lb = grown(brain(**{**base, "petalia_occipital_mm": 4.0}))
    assert lb > 100 and abs(rb) < 0.2 * lb and abs(rf) + abs(lf) < 0.2 * lb, (rf, lf, rb, lb)

    def ventricles(ratio):
        draw = synth._draw_params   # large ventricles, so that the ratio shows
        monkeypatch.setattr(synth, "_draw_params", lambda *a: {**draw(*a), "ventricle_mm": 8.0})
        c = brain(**{**base, "ventricle_ratio": ratio})
        monkeypatch.setattr(synth, "_draw_params", draw)
        centre = np.zeros(shape, bool)   # 30 mm either side, ±36 mm front-back, z -6 to 33 mm
        centre[mid - 10:mid + 11, yc - 12:yc + 13, 22:36] = True
        csf = (c.tissue == 1) & centre
        return csf[mid + 1:].sum() / max(1, csf[:mid].sum())  # right / left

    right_left = [ventricles(r) for r in (1.4, 1.0, 1 / 1.4)]
    assert right_left[0] > 1.07 * right_left[1] and right_left[1] > 1.07 * right_left[2], right_left


def test_folded_lesions_stay_in_place():
    """Lesion cases fold too; the lesion lands where the mni case's does, at the same size."""
    for j in range(2):
        m = synth.generate_lesion(j, seed=0, voxel_mm=COARSE)
        f = synth.generate_lesion(j, seed=0, voxel_mm=COARSE, anatomy="folded")
        a, b = m.mask > 0, f.mask > 0
        assert 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) > 0.85, j
        assert f.lesion_fraction == pytest.approx(m.lesion_fraction, rel=0.1)
        assert np.all(f.tissue[b] == 4) and np.all(f.brain_mask[b] > 0)
        assert not np.array_equal(m.tissue[~a], f.tissue[~a])


def test_aged_is_its_folded_twin_with_wider_sulci_and_larger_ventricles():
    """An aged subject has its folded twin's draws with the sulcal width, sulcal depth and
    ventricle pull mapped past folded's ranges (the same point of each range), and more CSF."""
    for i in range(2):
        f = synth.generate_healthy(i, seed=0, voxel_mm=COARSE, anatomy="folded")
        a = synth.generate_healthy(i, seed=0, voxel_mm=COARSE, anatomy="aged")
        assert _same(a, synth.generate_healthy(i, seed=0, voxel_mm=COARSE, anatomy="aged"))
        assert a.info["anatomy"] == "aged"
        for key, folded_range, aged_range in [("sulcal_width_mm", (2.0, 4.0), (4.0, 7.0)),
                                              ("sulcal_depth_mm", (3.0, 8.0), (6.0, 12.0)),
                                              ("ventricle_mm", (0.0, 8.0), (9.0, 13.0))]:
            u = (f.info[key] - folded_range[0]) / (folded_range[1] - folded_range[0])
            assert a.info[key] == pytest.approx(aged_range[0] + u * (aged_range[1] - aged_range[0])), key
        same = ("gyral_width_mm", "pial_shift_mm", "thickness_mm", "petalia_frontal_mm", "c_csf", "atrophy", "rot_deg")
        assert all(a.info[k] == f.info[k] for k in same)
        brain = f.brain_mask > 0
        csf = [np.count_nonzero(c.tissue[brain] == 1) / np.count_nonzero(brain) for c in (f, a)]
        assert csf[1] > csf[0] + 0.03, (i, csf)


def test_mixed_alternates_mni_and_folded_subjects():
    """`mixed` draws subject i as mni when i is even, folded when odd: the same images as asking
    for that anatomy, healthy and lesion alike."""
    for i, anatomy in enumerate(["mni", "folded", "mni"]):
        assert synth.subject_anatomy("mixed", i) == anatomy
        m = synth.generate_healthy(i, seed=4, voxel_mm=COARSE, anatomy="mixed")
        assert m.info["anatomy"] == anatomy
        assert _same(m, synth.generate_healthy(i, seed=4, voxel_mm=COARSE, anatomy=anatomy))
    assert _same(synth.generate_lesion(1, seed=4, voxel_mm=COARSE, anatomy="mixed"),
                 synth.generate_lesion(1, seed=4, voxel_mm=COARSE, anatomy="folded"))
    with pytest.raises(IfadError, match="unknown anatomy"):
        synth.subject_anatomy("average", 0)
