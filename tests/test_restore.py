import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ifad_fast import config as cfg
from ifad_fast.backends import TorchBackend
from ifad_fast.restore import initial_latents, optimise_latents, postprocess, restore_classes, score_grid
from helpers import tiny_trainer, toy_class_volumes


@pytest.fixture(scope="module")
def trained():
    """A tiny model fitted to three toy volumes (module-scoped: trained once)."""
    vols = toy_class_volumes(3, size=12, seed=1)
    t = tiny_trainer(vols, epochs=100, lr_step_epochs=1000, points_per_volume=1728, prior="none", lr_latents=2e-2)
    t.run(100, progress=False)
    return t.model(), vols.numpy()


def test_postprocess_equals_direct_pooling():
    x = torch.rand(19, 23, 17)
    ref = -F.max_pool3d(-x[None, None], 3, stride=1, padding=1)
    ref = F.avg_pool3d(ref, 15, stride=1, padding=7, count_include_pad=True)[0, 0]
    out = postprocess(x.numpy(), 3, 15)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-6)


def _mean_ce(model, z, vol):
    backend = TorchBackend(model.decoder)
    scores, _ = score_grid(backend, torch.as_tensor(z, dtype=torch.float32), torch.from_numpy(vol), None)
    return float(scores.mean())


@pytest.mark.slow
@pytest.mark.parametrize("case", [0, 1, 2])
def test_restoration_lowers_loss_and_recovers_training_latent(trained, case):
    model, vols = trained
    rc = cfg.RestoreConfig(phases=((150, 512),), lr=2e-2, prior="none", seed=3)
    res = restore_classes(model, vols[case], rc, backend="torch", region="full")[0]
    start = initial_latents(model, 1, rc, torch.Generator().manual_seed(rc.seed))[0]
    own = _mean_ce(model, model.latents[case], vols[case])
    assert _mean_ce(model, res.z, vols[case]) < _mean_ce(model, start, vols[case])
    restored = _mean_ce(model, res.z, vols[case])
    random = _mean_ce(model, torch.randn(model.config.latent_dim) / 4, vols[case])
    assert restored < random and restored < own + 0.5 * (random - own)
    assert res.anomaly.shape == vols[case].shape and res.classes.dtype == np.uint8
    assert (res.classes == vols[case]).mean() > 0.7


@pytest.mark.slow
def test_restoration_is_seeded(trained):
    model, vols = trained
    rc = cfg.RestoreConfig(phases=((5, 256),), prior="none", seed=7)
    a = restore_classes(model, vols[1], rc, backend="torch")[0]
    b = restore_classes(model, vols[1], rc, backend="torch")[0]
    np.testing.assert_array_equal(a.anomaly, b.anomaly)
    c = restore_classes(model, vols[1], dataclasses.replace(rc, seed=8), backend="torch")[0]
    assert not np.array_equal(a.z, c.z)


@pytest.mark.slow
def test_batched_restoration_equals_one_at_a_time(trained):
    model, vols = trained
    rc = cfg.RestoreConfig(phases=((6, 200), (2, 300)), prior="paper", sigma=0.5, seed=2, lr_decay=0.5)
    backend = TorchBackend(model.decoder)
    z0 = torch.randn(2, model.config.latent_dim)
    both, _ = optimise_latents(backend, torch.from_numpy(vols[:2]), z0, rc, torch.Generator().manual_seed(0))
    # the same point draws, one scan at a time: Adam is element-wise, so the scans do not interact
    for i in range(2):
        g = torch.Generator().manual_seed(0)
        batch_draws = [torch.rand(2, k, generator=g, dtype=torch.float64)[i:i + 1]
                       for steps, k in rc.phases for _ in range(steps)]
        one = _replay(backend, vols[i], z0[i:i + 1], rc, batch_draws)
        torch.testing.assert_close(one, both[i:i + 1], rtol=1e-5, atol=1e-6)


def _replay(backend, vol, z0, rc, draws):
    classes = torch.from_numpy(vol)[None]
    shape = vol.shape
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=rc.lr)
    step = 0
    for phase, (steps, k) in enumerate(rc.phases):
        if phase:
            opt.param_groups[0]["lr"] *= rc.lr_decay
        for _ in range(steps):
            lin = (draws[step] * vol.size).long()
            step += 1
            idx = torch.stack((lin // (shape[1] * shape[2]), (lin // shape[2]) % shape[1], lin % shape[2]), -1)
            targets = classes.reshape(1, -1).long().gather(1, lin)
            loss = backend.mean_loss(z, idx, targets, shape).sum() + (z * z).sum() / (rc.sigma ** 2 * k)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return z.detach()


@pytest.mark.slow
def test_brain_region_scoring_equals_full_grid_inside_brain(trained):
    model, vols = trained
    vol = np.zeros((20, 20, 20), np.uint8)
    vol[4:16, 4:16, 4:16] = vols[2]
    rc = cfg.RestoreConfig(phases=((3, 256),), prior="none", avg_pool=5)
    brain = vol != 0
    full = restore_classes(model, vol, rc, backend="torch", region="full", brain=brain)[0]
    masked = restore_classes(model, vol, rc, backend="torch", region="brain", brain=brain)[0]
    assert masked.scored_voxels < full.scored_voxels
    np.testing.assert_allclose(masked.anomaly[brain], full.anomaly[brain], rtol=1e-6, atol=1e-6)
    assert (masked.anomaly[~brain] == 0).all()


def test_point_sampler_focus_fraction():
    from ifad_fast.sampling import PointSampler

    focus = torch.zeros(2, 10, 11, 12, dtype=torch.bool)
    focus[0, 2:5, 3:6, 4:9] = True
    focus[1, 7:, :, :2] = True
    s = PointSampler((10, 11, 12), focus, fraction=0.75)
    idx, lin = s.draw(torch.tensor([1, 0]), 400, torch.Generator().manual_seed(0))
    assert idx.shape == (2, 400, 3) and (idx >= 0).all() and (idx < torch.tensor([10, 11, 12])).all()
    assert torch.equal((idx[..., 0] * 11 + idx[..., 1]) * 12 + idx[..., 2], lin)
    inside = focus.reshape(2, -1)[torch.tensor([1, 0])[:, None], lin]
    assert inside[:, :300].all()
    assert inside[:, 300:].float().mean() < 0.5
