"""Local latents (ifad_fast/restore/local.py, the `local` schedule): the latent field against a plain
trilinear reference, the field's scores against the one-latent scores, the fit region, and that
what is left out of the fit cannot move it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import AFFINE, RANDOM_MC, base_seed, random_decoder, random_model, seed_note, toy_scans

from ifad_fast import config as cfg
from ifad_fast.api import Restorer
from ifad_fast.backends import TorchBackend
from ifad_fast.errors import IfadError
from ifad_fast.model import voxel_coords
from ifad_fast.restore.local import fit_local_latents, fit_region, latent_field, score_grid_local
from ifad_fast.restore.scoring import anomaly_map, score_grid


def trilinear_reference(grid: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Plain trilinear interpolation: grid (D, G, G, G) with node j of an axis at -1 + 2j/(G-1), p (N, 3)."""
    g = grid.shape[1]
    out = np.zeros((len(p), grid.shape[0]))
    for n, point in enumerate(p):
        u = (point + 1.0) / 2.0 * (g - 1)
        lo = np.clip(np.floor(u).astype(int), 0, g - 2)
        t = u - lo
        for corner in np.ndindex(2, 2, 2):
            w = np.prod([t[a] if corner[a] else 1.0 - t[a] for a in range(3)])
            out[n] += w * grid[:, lo[0] + corner[0], lo[1] + corner[1], lo[2] + corner[2]]
    return out


@pytest.mark.parametrize("g", [2, 3, 6])
def test_latent_field_is_trilinear_interpolation(g):
    gen = torch.Generator().manual_seed(base_seed() + g)
    grid = torch.randn(5, g, g, g, generator=gen)
    p = torch.rand(200, 3, generator=gen) * 2 - 1
    p[:3] = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 0.0]])      # corners and a face
    ref = trilinear_reference(grid.double().numpy(), p.double().numpy())
    np.testing.assert_allclose(latent_field(grid, p).numpy(), ref, rtol=0, atol=1e-5, err_msg=seed_note())


def test_a_constant_field_scores_as_the_one_latent():
    """Every cell at z: the field's scores and classes are the one-latent restoration's (tol 1e-5)."""
    dec = random_decoder(RANDOM_MC, base_seed())
    gen = torch.Generator().manual_seed(base_seed() + 1)
    classes = torch.randint(0, RANDOM_MC.n_classes, (9, 10, 11), generator=gen, dtype=torch.uint8)
    region = torch.rand(classes.shape, generator=gen) < 0.6
    z = torch.randn(RANDOM_MC.latent_dim, generator=gen) * 0.5
    ref_score, ref_cls = score_grid(TorchBackend(dec), z, classes, region)
    grid = z.reshape(-1, 1, 1, 1).expand(-1, 4, 4, 4).contiguous()
    score, cls, n = score_grid_local(dec.folded(), grid, classes, region, chunk=97)
    assert n == int(region.sum())
    np.testing.assert_allclose(score.numpy(), ref_score.numpy(), rtol=1e-5, atol=1e-5, err_msg=seed_note())
    assert (cls == ref_cls).float().mean() > 0.999
    assert (score[~region] == 0).all()


def test_fit_region_leaves_out_what_the_global_map_finds():
    rc = cfg.RestoreConfig(local_grid=4, local_exclude=0.5, local_margin=0, min_pool=1, avg_pool=1)
    brain = torch.zeros(12, 12, 12, dtype=torch.bool)
    brain[1:11, 1:11, 1:11] = True
    score = torch.full(brain.shape, 0.2)
    score[5:7, 5:7, 5:7] = 3.0                           # a 'lesion'
    fit = fit_region(score, brain, rc, threshold=2.0)
    assert torch.equal(fit, brain & (score < 1.0))
    wide = fit_region(score, brain, cfg.replace(rc, local_margin=2), threshold=2.0)
    assert not wide[3:9, 3:9, 3:9].any() and int(wide.sum()) == int(brain.sum()) - 6 ** 3
    # with the protocol's pools the rule reads the post-processed map
    rc15 = cfg.replace(rc, min_pool=3, avg_pool=15)
    hot = anomaly_map(score, brain, rc15, "brain") >= 0.5 * 2.0
    assert torch.equal(fit_region(score, brain, rc15, 2.0), brain & ~hot)


def _fit_setup():
    dec = random_decoder(RANDOM_MC, base_seed()).folded()
    gen = torch.Generator().manual_seed(base_seed() + 2)
    classes = torch.randint(1, RANDOM_MC.n_classes, (10, 10, 10), generator=gen, dtype=torch.uint8)
    fit = torch.zeros(classes.shape, dtype=torch.bool)
    fit[:, :, :6] = True
    z = torch.randn(RANDOM_MC.latent_dim, generator=gen) * 0.3
    rc = cfg.RestoreConfig(local_grid=3, local_steps=30, local_points=256, local_lr=0.05, local_sigma=1.0)
    return dec, classes, fit, z, rc


def _mean_ce(dec, grid, classes, fit):
    score, _, _ = score_grid_local(dec, grid, classes, fit)
    return float(score[fit].mean())


def test_the_fit_lowers_the_loss_is_seeded_and_ignores_what_it_leaves_out():
    dec, classes, fit, z, rc = _fit_setup()
    start = z.reshape(-1, 1, 1, 1).expand(-1, 3, 3, 3)
    grid = fit_local_latents(dec, z, classes, fit, rc, torch.Generator().manual_seed(7))
    assert grid.shape == (RANDOM_MC.latent_dim, 3, 3, 3)
    assert _mean_ce(dec, grid, classes, fit) < _mean_ce(dec, start, classes, fit) - 0.01, seed_note()
    again = fit_local_latents(dec, z, classes, fit, rc, torch.Generator().manual_seed(7))
    assert torch.equal(grid, again)
    # a 'lesion' outside the fit region is never read: the same latents bit for bit
    lesioned = classes.clone()
    lesioned[:, :, 6:] = 0
    assert torch.equal(grid, fit_local_latents(dec, z, lesioned, fit, rc, torch.Generator().manual_seed(7)))
    # a tighter tie keeps the cells nearer z
    tight = fit_local_latents(dec, z, classes, fit, cfg.replace(rc, local_sigma=0.01), torch.Generator().manual_seed(7))
    assert (tight - start).norm() < 0.5 * (grid - start).norm()


def test_nothing_to_fit_keeps_the_global_latent():
    dec, classes, fit, z, rc = _fit_setup()
    start = z.reshape(-1, 1, 1, 1).expand(-1, 3, 3, 3)
    assert torch.equal(fit_local_latents(dec, z, classes, torch.zeros_like(fit), rc, torch.Generator()), start)
    assert torch.equal(fit_local_latents(dec, z, classes, fit, cfg.replace(rc, local_steps=0), torch.Generator()),
                       start)


def test_the_local_schedule_restores_and_is_reproducible():
    model = random_model(base_seed())
    model.info = dict(threshold=0.8)
    img = toy_scans(1)[0]
    rc = cfg.replace(Restorer(model, "cpu", "cpu", schedule="local").rc, phases=((5, 300), (2, 600)),
                     local_steps=5, local_points=300, local_grid=3)
    one = Restorer(model, "cpu", "cpu", schedule=rc).restore_array(img, AFFINE)
    two = Restorer(model, "torch", "cpu", schedule=rc).restore_array(img, AFFINE)
    np.testing.assert_array_equal(one.anomaly, Restorer(model, "cpu", "cpu", schedule=rc).restore_array(
        img, AFFINE).anomaly)
    np.testing.assert_allclose(one.model_grid.z, two.model_grid.z, rtol=1e-4, atol=1e-5)
    assert one.anomaly.shape == img.shape and np.isfinite(one.anomaly).all()
    plain = Restorer(model, "cpu", "cpu", schedule=cfg.replace(rc, local_grid=0)).restore_array(img, AFFINE)
    np.testing.assert_array_equal(plain.model_grid.z, one.model_grid.z)     # same global search
    assert not np.array_equal(plain.model_grid.score, one.model_grid.score)


def test_the_local_schedule_refuses_what_it_cannot_do():
    model = random_model(base_seed())
    model.info = {}
    with pytest.raises(IfadError, match="threshold"):
        Restorer(model, "cpu", "cpu", schedule="local").restore_array(toy_scans(1)[0], AFFINE)
    for bad in (dict(local_grid=1), dict(local_grid=-1), dict(local_sigma=0.0), dict(local_points=0),
                dict(local_exclude=float("nan")), dict(local_margin=True)):
        with pytest.raises(IfadError, match="local_"):
            cfg.RestoreConfig(**bad)
    assert dataclasses.replace(cfg.RestoreConfig(), local_grid=0).local_grid == 0      # the paper's default
    assert cfg.RestoreConfig().local_grid == 0 and cfg.SCHEDULES["paper"].get("local_grid", 0) == 0


def test_voxel_coords_corner_convention_matches_the_field():
    """The field's corners sit on the grid's corner voxels (align_corners), as voxel_coords puts them."""
    shape = (7, 9, 5)
    corners = torch.tensor([[0, 0, 0], [6, 8, 4]])
    p = voxel_coords(corners, shape)
    grid = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert latent_field(grid, p)[:, 0].tolist() == [0.0, 7.0]


def test_cli_local_schedule_without_a_threshold_is_one_line_and_writes_nothing(tmp_path, capsys):
    from helpers import cli, one_error_line, outputs_of, scan

    from ifad_fast.model import save_model

    model = random_model(base_seed())
    model.info = {}
    path = save_model(model, tmp_path / "model.pt")
    src = scan(tmp_path / "in", "case", lesion=True)
    code, _, err = cli(capsys, "restore", src, "-m", path, "-o", tmp_path / "out", "--schedule", "local", "-q")
    assert code != 0 and "--threshold" in one_error_line(err, "restore")
    assert outputs_of(tmp_path / "out") == []
    code, _, err = cli(capsys, "restore", src, "-m", path, "-o", tmp_path / "out2", "--schedule", "local",
                       "--threshold", "0.9", "-q", "--force")
    assert code == 0, err
    assert any(n.endswith("_anomaly.nii.gz") for n in outputs_of(tmp_path / "out2"))


def test_the_local_schedule_scores_at_another_resolution():
    """IF 3D*: the local latents are fitted on the model grid (20³) and scored on a 26³ grid."""
    model = random_model(base_seed())
    model.info = dict(threshold=0.8)
    rc = cfg.replace(Restorer(model, "cpu", "cpu", schedule="local").rc, phases=((5, 300),), local_steps=5,
                     local_points=300, local_grid=3)
    out = Restorer(model, "cpu", "cpu", schedule=rc, resolution=26).restore_array(toy_scans(1)[0], AFFINE)
    assert out.model_grid.score.shape == (26, 26, 26) and np.isfinite(out.anomaly).all()
    assert (out.model_grid.score > 0).any()


def test_a_2d_model_refuses_local_latents():
    from ifad_fast.model import Model
    from ifad_fast.restore.volume import restore_batch

    mc = dataclasses.replace(RANDOM_MC, variant="2d")
    base = random_model(base_seed())
    model = Model(decoder=random_decoder(mc, base_seed()), centres=base.centres, preprocess=base.preprocess,
                  latents=base.latents)
    classes = torch.ones(1, 8, 8, 8, dtype=torch.uint8)
    with pytest.raises(IfadError, match="IF 3D"):
        restore_batch(TorchBackend(model.decoder), model, classes, cfg.RestoreConfig(local_grid=3),
                      torch.Generator(), threshold=1.0)
