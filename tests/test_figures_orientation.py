"""Figures in one anatomical orientation with the voxels' physical shape, whatever the scan's voxel order."""
from __future__ import annotations

import numpy as np
import pytest

from ifad_fast.figures import draw, panels
from helpers import toy_brain


def _case(shape=(30, 34, 28)):
    scan, truth = toy_brain(3, shape=shape, lesion=True)
    anomaly = np.where(truth > 0, 3.0, 0.2).astype(np.float32) + np.linspace(0, 0.1, scan.size).reshape(shape)
    return dict(scan=scan, restoration=scan * 0.9, anomaly=anomaly, truth=truth > 0, predicted=anomaly > 1.0)


def _affine(sizes, flips=(1, 1, 1), order=(0, 1, 2)):
    """Voxel axis i runs along world axis order[i] (RAS), in the direction flips[i], sizes[i] mm."""
    a = np.zeros((4, 4))
    for i, (w, f, s) in enumerate(zip(order, flips, sizes)):
        a[w, i] = f * s
    a[:3, 3] = -50.0
    a[3, 3] = 1.0
    return a


def _assert_same(got, want):
    assert [p.view for p in got] == [p.view for p in want] == ["axial", "coronal", "sagittal"]
    for g, w in zip(got, want):
        assert g.aspect == pytest.approx(w.aspect) and g.edges == w.edges
        for key, image in w.images.items():
            np.testing.assert_array_equal(g.images[key], image, err_msg=f"{g.view} {key}")


def test_an_lps_scan_is_drawn_as_its_ras_copy():
    ras = _case()
    centre = (12, 20, 14)
    want = panels(**ras, affine=_affine((2, 2, 2)), centre=centre)
    lps = {k: v[::-1, ::-1, :] for k, v in ras.items()}
    lps_centre = (30 - 1 - centre[0], 34 - 1 - centre[1], centre[2])
    _assert_same(panels(**lps, affine=_affine((2, 2, 2), flips=(-1, -1, 1)), centre=lps_centre), want)


def test_an_anisotropic_permuted_scan_is_drawn_as_its_ras_copy_with_physical_aspect():
    ras = _case(shape=(30, 34, 12))                                # 1 x 1 x 3 mm voxels
    centre = (15, 17, 6)
    want = panels(**ras, affine=_affine((1, 1, 3)), centre=centre)
    assert [p.aspect for p in want] == pytest.approx([1.0, 3.0, 3.0])    # axial A/R, coronal S/R, sagittal S/A
    stored = {k: np.transpose(v, (2, 0, 1)) for k, v in ras.items()}    # stored S, R, A
    got = panels(**stored, affine=_affine((3, 1, 1), order=(2, 0, 1)), centre=(centre[2], centre[0], centre[1]))
    _assert_same(got, want)
    fig = draw(got)
    try:
        for row, panel in enumerate(got):
            for col in range(3):
                assert fig.axes[3 * row + col].get_aspect() == pytest.approx(panel.aspect)
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_neurological_puts_the_subjects_right_on_the_right_and_radiological_mirrors_it():
    case = _case()
    case["scan"] = np.zeros_like(case["scan"])
    case["scan"][25:, :, :] = 1.0                                   # the subject's right (high R index)
    lps = {k: v[::-1, ::-1, :] for k, v in case.items()}
    neuro = panels(**lps, affine=_affine((2, 2, 2), flips=(-1, -1, 1)), centre=(4, 17, 14))
    for panel in neuro[:2]:                                         # axial and coronal
        image = panel.images["scan"]
        assert image[:, -1].all() and not image[:, 0].any() and panel.edges[:2] == ("L", "R")
    radio = panels(**lps, affine=_affine((2, 2, 2), flips=(-1, -1, 1)), centre=(4, 17, 14),
                   convention="radiological")
    for n, r in zip(neuro[:2], radio[:2]):
        np.testing.assert_array_equal(r.images["scan"], n.images["scan"][:, ::-1])
        assert r.edges[:2] == ("R", "L")
    np.testing.assert_array_equal(radio[2].images["scan"], neuro[2].images["scan"])
    assert neuro[0].edges[2:] == ("P", "A") and neuro[2].edges == ("A", "P", "I", "S")


def test_colour_scale_is_fixed_across_cases_with_the_threshold_marked_and_a_legend():
    import matplotlib.pyplot as plt

    limits = []
    for scale in (1.0, 10.0):                                       # two cases, very different score ranges
        case = _case()
        case["anomaly"] = case["anomaly"] * scale
        fig = draw(panels(**case, affine=_affine((2, 2, 2))), threshold=1.5)
        overlay = fig.axes[2].images[1]
        limits.append(overlay.get_clim())
        bar = fig.axes[-1]
        assert any(np.allclose(line.get_ydata(), 1.5) for line in bar.lines)      # the threshold on the bar
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["ground truth", "predicted (score ≥ 1.5)"]
        plt.close(fig)
    assert limits == [(0.0, 3.0), (0.0, 3.0)]


def test_restore_figure_is_radiological_on_request_with_the_threshold_and_predicted_mask(capsys, tiny_run, tmp_path,
                                                                                         monkeypatch):
    from ifad_fast import figures
    from helpers import FAST, cli, scan

    drawn = []
    real = figures.slices_figure

    def spy(*args, **kwargs):
        drawn.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(figures, "slices_figure", spy)
    scan(tmp_path / "in", "a")
    code, _, err = cli(capsys, "restore", tmp_path / "in", "-m", tiny_run / "run", "-o", tmp_path / "out", *FAST,
                       "--figure", "--radiological", "--threshold", "0.5")
    assert code == 0, err
    assert (tmp_path / "out" / "a_figure.png").read_bytes()[:4] == b"\x89PNG"
    (kwargs,) = drawn
    assert kwargs["convention"] == "radiological" and kwargs["threshold"] == 0.5
    assert kwargs["predicted"] is not None and kwargs["predicted"].shape == (30, 34, 28)


def test_radiological_without_figure_is_refused(capsys, tmp_path):
    from helpers import cli, leftovers, one_error_line, scan

    scan(tmp_path / "in", "a")
    code, _, err = cli(capsys, "restore", tmp_path / "in", "-o", tmp_path / "out", "--radiological")
    assert code == 2 and "add --figure" in one_error_line(err, "restore")
    assert leftovers(tmp_path / "out") == []
