"""Baselines of the accuracy benchmark: thresholding, the z-score, the mean image and the dense VAE."""
import numpy as np
import pytest
import torch

from ifad_fast import config as cfg
from ifad_fast.baselines import (DenseVAE, MeanImage, Thresholding, VAEConfig, ZScore, anomaly_map, equalise,
                                 make_baseline, vae_loss)
from ifad_fast.errors import IfadError
from helpers import AFFINE, base_seed, numpy_rng, seed_note, toy_brain

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_VAE = VAEConfig(channels=(4, 8), steps=60, batch=8, lr=3e-3, seed=0)


def toy_images(n, size=16, offset=0):
    """n model-grid-like volumes (size³) in [0, 1]: ellipsoid brains with three tissues."""
    rng = numpy_rng(offset)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    out = []
    for _ in range(n):
        r = np.sqrt((((g.T - rng.normal(0, 0.03, 3)) / rng.uniform(0.6, 0.8, 3)) ** 2).sum(-1)).T
        v = np.where(r < 1, 0.3 + 0.4 * (r > 0.5) + 0.3 * (r < 0.2), 0.0) + rng.normal(0, 0.02, r.shape) * (r < 1)
        out.append(np.clip(v, 0, 1).astype(np.float32))
    return out


def test_mean_image_against_numpy():
    vols = toy_images(4)
    b = MeanImage().fit(iter(vols))
    mean = np.mean(np.stack(vols).astype(np.float64), axis=0)
    assert np.abs(b.mean - mean).max() < 1e-6
    x = toy_images(1, offset=9)[0]
    assert np.abs(b.score(x) - np.abs(x - mean)).max() < 1e-6
    with pytest.raises(IfadError):
        b.score(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(IfadError):
        MeanImage().fit([])


def test_z_score_against_numpy():
    """|x − mean| / max(std (ddof 0), floor) voxel by voxel; a voxel equal in every healthy volume
    (σ = 0) is divided by the floor."""
    vols = toy_images(5)
    vols[2][3, 4, 5] = vols[0][3, 4, 5]                       # outside the brains every volume is 0: σ = 0
    b = ZScore(min_sigma=0.03).fit(iter(vols))
    stack = np.stack(vols).astype(np.float64)
    sigma = np.maximum(stack.std(axis=0), 0.03)
    x = toy_images(1, offset=9)[0]
    want = np.abs(x - stack.mean(axis=0)) / sigma
    assert np.abs(b.score(x) - want).max() < 1e-5 * want.max()
    assert b.sigma[0, 0, 0] == np.float32(0.03) and b.score(x).dtype == np.float32
    with pytest.raises(IfadError):
        b.score(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(IfadError):
        ZScore().fit([])
    with pytest.raises(IfadError):
        ZScore(min_sigma=0.0)


def test_thresholding_is_the_equalised_intensity():
    """Each non-zero voxel becomes the share of non-zero voxels at or below its intensity (ties
    included), zero stays zero; nothing is learnt. Checked voxel by voxel against a plain loop."""
    rng = numpy_rng(3)
    x = np.round(rng.random((6, 5, 4)), 1).astype(np.float32)      # ties, and some zeros
    x[0] = 0.0
    values = x[x != 0]
    want = np.zeros_like(x)
    for idx in zip(*np.nonzero(x)):
        want[idx] = np.mean(values <= x[idx])
    got = Thresholding().fit(toy_images(2)).score(x)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-6
    assert np.array_equal(equalise(x), got) and np.all(got[0] == 0) and got.max() == 1.0
    assert not equalise(np.zeros((3, 3, 3))).any()


def test_vae_loss_against_formula():
    """L1 summed over pixels plus KL(N(mu, exp(logvar)) ‖ N(0, I)), averaged over the batch; float64
    reference, tolerance 1e-4 relative."""
    g = torch.Generator().manual_seed(base_seed())
    x, recon = torch.rand(3, 1, 8, 8, generator=g), torch.rand(3, 1, 8, 8, generator=g)
    mu, logvar = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g) * 0.3
    xd, rd, md, lv = (t.double().numpy() for t in (x, recon, mu, logvar))
    kl = 0.5 * (md ** 2 + np.exp(lv) - 1.0 - lv).sum(1)
    want = (np.abs(xd - rd).reshape(3, -1).sum(1) + 0.5 * kl).mean()
    assert float(vae_loss(x, recon, mu, logvar, kl_weight=0.5)) == pytest.approx(want, rel=1e-4)


def test_vae_trains_and_scores():
    """A few steps on tiny volumes: the loss falls, the score map has the input's shape, and the
    same seed gives the same run (another seed another)."""
    vols = toy_images(3)
    vae = DenseVAE(TINY_VAE).fit(vols, progress=False)
    first, last = np.mean(vae.losses[:5]), np.mean(vae.losses[-5:])
    assert last < 0.7 * first, (first, last, seed_note())
    s = vae.score(vols[0])
    assert s.shape == vols[0].shape and s.dtype == np.float32 and np.isfinite(s).all() and s.min() >= 0
    again = DenseVAE(TINY_VAE).fit(vols, progress=False)
    assert again.losses == vae.losses and np.array_equal(again.score(vols[0]), s)
    other = DenseVAE(VAEConfig(**{**TINY_VAE.__dict__, "seed": 1})).fit(vols, progress=False)
    assert other.losses != vae.losses
    # a grid whose side is not a multiple of 2^levels is padded and cropped back
    odd = [v[:13, :13, :11] for v in vols]
    assert DenseVAE(VAEConfig(**{**TINY_VAE.__dict__, "steps": 2})).fit(odd, progress=False).score(odd[0]).shape \
        == (13, 13, 11)


def test_vae_user_errors():
    with pytest.raises(IfadError):
        DenseVAE(TINY_VAE).score(np.zeros((16, 16, 16), np.float32))     # not trained
    with pytest.raises(IfadError):
        DenseVAE(TINY_VAE).fit([np.zeros((16, 12, 16), np.float32)], progress=False)   # not square slices
    with pytest.raises(IfadError):
        DenseVAE(TINY_VAE).fit([np.zeros((16, 16, 16), np.float32)], progress=False)   # no brain
    with pytest.raises(IfadError):
        make_baseline("gan")


@pytest.mark.parametrize("baseline", [MeanImage, ZScore, Thresholding])
def test_anomaly_map_on_the_scan_grid(baseline):
    """Through the model's frame and post-processing back to the scan's grid: the scan's shape,
    finite, zero far from the brain, and a bright lesion scores above the healthy brain."""
    pc = cfg.PreprocessConfig(resolution=24, extent_mm=48.0)
    rc = cfg.RestoreConfig()
    from ifad_fast.preprocess import to_model_grid

    healthy = [to_model_grid(toy_brain(i)[0], AFFINE, pc)[0] for i in range(4)]
    image, mask = toy_brain(11, lesion=True)
    out = anomaly_map(baseline().fit(healthy), image, AFFINE, pc, rc)
    assert out.shape == image.shape and out.dtype == np.float32 and np.isfinite(out).all()
    brain = image != 0
    from scipy.ndimage import binary_dilation
    assert np.all(out[~binary_dilation(brain, iterations=3)] == 0)
    assert out[mask > 0].mean() > 2 * out[brain & (mask == 0)].mean()
