"""Baselines for the accuracy benchmark, trained on the same healthy scans as the model.

Each baseline sees a scan exactly as the model does (`preprocess.to_model_grid`: the model
frame, clipped and scaled intensities on the (R, R, R) model grid), gives a raw voxel-wise score
there, and goes through the model's own post-processing (`restore.postprocess`: min-pool 3,
average-pool 15), is zeroed outside the brain (as the model's `brain` region is) and mapped
back to the scan's own grid (`placement.to_native`). See `anomaly_map`.

* `MeanImage`: |x − mean of the healthy training volumes|, voxel-wise.
* `ZScore` (after Saase et al. 2020, "Simple statistical methods for unsupervised brain anomaly
  detection on MRI are competitive to deep learning methods", their voxel-wise "baseline" model):
  |x − μ| / max(σ, min_sigma), μ and σ the voxel-wise mean and (population) standard deviation of
  the healthy training volumes on the model grid. Two-sided, as the paper's (its score is z²
  summed over sequences, hyperintense and hypointense alike; with one sequence z² ranks voxels
  as |z| does, and |z| keeps the average pool summing a deviation, as for the mean image). The
  floor (default 0.05 of the [0, 1] intensity range, about the 5th percentile of σ inside the
  brain with 8 healthy scans) keeps a voxel that a few scans happen to agree on from dominating.
* `Thresholding` (after Meissen et al. 2021, "Challenging current semi-supervised anomaly
  segmentation methods for brain MRI"): no training; the score is the scan's histogram-equalised
  intensity on the model grid (`equalise`: each non-zero voxel's share of the non-zero voxels at
  or below its intensity, the exact empirical CDF; their code uses skimage's 256-bin
  `equalize_hist` over the non-zero voxels, of which this is the limit): a monotone map of the
  intensity that puts every scan on one scale. The model's clipping ties the brightest 2 % of
  the brain at 1 (and the darkest 2 % at 0, outside the equalised voxels); equalising on the
  scan's own grid before clipping gave the same numbers on 3 validation cases (pooled AP 0.742
  there, 0.743 on the model grid; small preset).
* `DenseVAE`: the paper's Table 1 "VAE (1)" (after Baur et al.'s dense VAE): a 2D VAE on
  axial slices of the model grid (axis 2, inferior -> superior in the RAS model frame), a
  convolutional encoder and decoder around a dense bottleneck of 10 latent dimensions, trained
  with an L1 reconstruction loss plus the KL term; score |x − decoder(mean of q(z | x))| on
  every slice. Differences from the paper's set-up: no augmentation, inputs in the model's
  [0, 1] scaling (not zero mean / unit variance), every axial slice scored (not 1 in 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import config as cfg
from .errors import IfadError
from .progress import progress_bar

__all__ = ["BASELINES", "DenseVAE", "MeanImage", "Thresholding", "VAEConfig", "ZScore", "anomaly_map", "equalise",
           "make_baseline"]


def _check_volumes(volumes) -> np.ndarray:
    vols = [np.asarray(v, dtype=np.float32) for v in volumes]
    if not vols or any(v.ndim != 3 or v.shape != vols[0].shape for v in vols):
        raise IfadError("baselines train on one or more model-grid volumes of one (R, R, R) shape")
    return np.stack(vols)


def _voxel_sums(volumes, powers) -> tuple[int, list[np.ndarray]]:
    """(number of volumes, voxel-wise float64 sums of volume**p for p in powers), streamed over an
    iterable of model-grid volumes (R, R, R) of one shape."""
    sums, count = None, 0
    for v in volumes:
        v = np.asarray(v, dtype=np.float64)
        if v.ndim != 3 or (sums is not None and v.shape != sums[0].shape):
            raise IfadError("baselines train on model-grid volumes of one (R, R, R) shape")
        sums = [v ** p for p in powers] if sums is None else [s + v ** p for s, p in zip(sums, powers)]
        count += 1
    if sums is None:
        raise IfadError("this baseline needs at least one healthy volume")
    return count, sums


class MeanImage:
    """Voxel-wise |x − mean healthy image| on the model grid."""

    name = "mean-image"

    def __init__(self):
        self.mean: np.ndarray | None = None

    def fit(self, volumes) -> "MeanImage":
        """volumes: an iterable of model-grid volumes (R, R, R) of healthy scans."""
        count, (total,) = _voxel_sums(volumes, (1,))
        self.mean = (total / count).astype(np.float32)
        return self

    def score(self, volume: np.ndarray) -> np.ndarray:
        """Raw score (R, R, R) float32 of one model-grid volume."""
        if self.mean is None or volume.shape != self.mean.shape:
            raise IfadError("score a model-grid volume of the shape the baseline was fitted on")
        return np.abs(np.asarray(volume, dtype=np.float32) - self.mean)


class ZScore:
    """Voxel-wise |x − μ| / max(σ, min_sigma) against the healthy volumes (Saase et al. 2020)."""

    name = "z-score"

    def __init__(self, min_sigma: float = 0.05):
        if not (np.isfinite(min_sigma) and min_sigma > 0):
            raise IfadError(f"the z-score baseline's sigma floor must be positive, got {min_sigma!r}")
        self.min_sigma = float(min_sigma)
        self.mean: np.ndarray | None = None
        self.sigma: np.ndarray | None = None

    def fit(self, volumes) -> "ZScore":
        """volumes: an iterable of model-grid volumes (R, R, R) of healthy scans; σ is the
        population standard deviation (ddof 0), floored at min_sigma."""
        count, (total, squares) = _voxel_sums(volumes, (1, 2))
        mean = total / count
        self.mean = mean.astype(np.float32)
        self.sigma = np.maximum(np.sqrt(np.maximum(squares / count - mean ** 2, 0.0)), self.min_sigma).astype(np.float32)
        return self

    def score(self, volume: np.ndarray) -> np.ndarray:
        """Raw score (R, R, R) float32 of one model-grid volume."""
        if self.mean is None or volume.shape != self.mean.shape:
            raise IfadError("score a model-grid volume of the shape the baseline was fitted on")
        return np.abs(np.asarray(volume, dtype=np.float32) - self.mean) / self.sigma


def equalise(volume: np.ndarray) -> np.ndarray:
    """Histogram equalisation over the non-zero voxels of a volume: each becomes the share of them
    whose intensity is at most its own (in (0, 1]; equal intensities, equal values), every other
    voxel stays 0. float32, the volume's shape."""
    volume = np.asarray(volume)
    inside = volume != 0
    values = volume[inside]
    out = np.zeros(volume.shape, np.float32)
    out[inside] = np.searchsorted(np.sort(values), values, side="right") / max(values.size, 1)
    return out


class Thresholding:
    """The histogram-equalised intensity itself (Meissen et al. 2021); nothing to train."""

    name = "thresholding"

    def fit(self, volumes=None) -> "Thresholding":
        """Nothing to learn: returns self (`volumes` is ignored; the same call as the other baselines)."""
        return self

    def score(self, volume: np.ndarray) -> np.ndarray:
        """Raw score (R, R, R) float32 of one model-grid volume: `equalise(volume)`."""
        return equalise(volume)


@dataclass(frozen=True)
class VAEConfig:
    """The dense VAE: `latent` dims, conv `channels` per stride-2 level, Adam `steps` of `batch`
    slices at `lr`, `kl_weight` on the KL term, `seed` for weights, batches and noise."""

    latent: int = 10
    channels: tuple = (8, 16, 32, 64)
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-3
    kl_weight: float = 1.0
    min_brain_fraction: float = 0.02      # training slices hold at least this share of brain pixels
    seed: int = 0


class _VAENet(nn.Module):
    """(N, 1, S, S) -> reconstruction (N, 1, S, S), mu (N, L), logvar (N, L); S divisible by
    2^len(channels)."""

    def __init__(self, size: int, vc: VAEConfig):
        super().__init__()
        ch = (1, *vc.channels)
        self.bottom = size // 2 ** len(vc.channels)
        flat = ch[-1] * self.bottom ** 2
        enc = []
        for a, b in zip(ch[:-1], ch[1:]):
            enc += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, 2 * vc.latent))
        self.expand = nn.Sequential(nn.Linear(vc.latent, flat), nn.LeakyReLU(0.2))
        dec = []
        for a, b in zip(ch[:0:-1], ch[-2::-1]):
            dec += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        dec[-1] = nn.Sigmoid()       # the last level outputs intensities in [0, 1]
        self.decoder = nn.Sequential(*dec)
        self.channels = ch[-1]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.expand(z).view(-1, self.channels, self.bottom, self.bottom)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu if noise is None else mu + noise * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float = 1.0) -> torch.Tensor:
    """Mean over the batch of the per-slice L1 reconstruction error (summed over pixels) plus
    kl_weight × KL(q(z | x) ‖ N(0, I))."""
    l1 = (recon - x).abs().flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu * mu - logvar.exp()).sum(1)
    return (l1 + kl_weight * kl).mean()


class DenseVAE:
    """2D VAE on axial slices of the model grid with a dense 10-dim bottleneck, L1 loss."""

    name = "vae"

    def __init__(self, vc: VAEConfig = VAEConfig()):
        self.vc = vc
        self.net: _VAENet | None = None
        self.shape: tuple | None = None
        self.losses: list[float] = []

    def _pad(self, n: int) -> int:
        m = 2 ** len(self.vc.channels)
        return -(-n // m) * m

    def _slices(self, volumes: np.ndarray) -> torch.Tensor:
        """(N, R, R, R) -> (N·R, 1, S, S) axial slices, zero-padded to S."""
        n, r0, r1, r2 = volumes.shape
        sl = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volumes, 3, 1))).reshape(n * r2, 1, r0, r1)
        s0, s1 = self._pad(r0), self._pad(r1)
        return F.pad(sl, (0, s1 - r1, 0, s0 - r0))

    def fit(self, volumes, brains=None, progress: bool = True) -> "DenseVAE":
        """Train on the axial slices holding brain of healthy model-grid volumes (R, R, R) float32;
        brains: their brain masks (R, R, R) bool (default: the non-zero voxels)."""
        vols = _check_volumes(volumes)
        if vols.shape[1] != vols.shape[2]:
            raise IfadError("the VAE baseline needs square axial slices (a cubic model grid)")
        self.shape = vols.shape[1:]
        slices = self._slices(vols)
        inside = vols > 0 if brains is None else np.stack([np.asarray(b, dtype=bool) for b in brains])
        if inside.shape != vols.shape:
            raise IfadError("pass one brain mask of the volumes' shape per volume")
        share = inside.mean(axis=(1, 2)).reshape(-1)             # per axial slice, in _slices' order
        slices = slices[torch.from_numpy(share >= self.vc.min_brain_fraction)]
        if len(slices) == 0:
            raise IfadError("no axial slice holds brain; the VAE baseline has nothing to learn")
        gen = torch.Generator().manual_seed(self.vc.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.vc.seed)
            self.net = _VAENet(slices.shape[-1], self.vc)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.vc.lr)
        self.net.train()
        self.losses = []
        bar = progress_bar(range(self.vc.steps), desc="train VAE", unit="step", disable=None if progress else True)
        for _ in bar:
            x = slices[torch.randint(len(slices), (min(self.vc.batch, len(slices)),), generator=gen)]
            noise = torch.randn(len(x), self.vc.latent, generator=gen)
            loss = vae_loss(x, *self.net(x, noise), kl_weight=self.vc.kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.losses.append(loss.item())
        self.net.eval()
        return self

    @torch.no_grad()
    def score(self, volume: np.ndarray) -> np.ndarray:
        """Raw score |x − recon(x)| (R, R, R) float32 of one model-grid volume, slice by slice."""
        if self.net is None or tuple(volume.shape) != tuple(self.shape):
            raise IfadError("score a model-grid volume of the shape the VAE was trained on")
        vol = np.asarray(volume, dtype=np.float32)
        r0, r1, r2 = vol.shape
        x = self._slices(vol[None])
        recon = torch.cat([self.net(x[i:i + 64])[0] for i in range(0, len(x), 64)])
        err = (x - recon).abs()[:, 0, :r0, :r1]                 # (R2, R0, R1)
        return np.ascontiguousarray(np.moveaxis(err.numpy(), 0, 2))


BASELINES = {"thresholding": Thresholding, "z-score": ZScore, "mean-image": MeanImage, "vae": DenseVAE}


def make_baseline(name: str, **kwargs):
    """A new, untrained baseline by name (thresholding | z-score | mean-image | vae)."""
    try:
        return BASELINES[name](**kwargs)
    except KeyError:
        raise IfadError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None


def anomaly_map(baseline, image: np.ndarray, affine: np.ndarray, pc: cfg.PreprocessConfig,
                rc: cfg.RestoreConfig) -> np.ndarray:
    """A baseline's anomaly map of a native scan (X, Y, Z) -> float32 (X, Y, Z): the scan on the
    model grid as the model sees it, raw score, the model's post-processing, zero outside the
    brain, back to the scan's grid."""
    from .preprocess import to_model_grid
    from .restore.scoring import postprocess

    vol, placement, _ = to_model_grid(np.asarray(image, dtype=np.float32), affine, pc)
    score = postprocess(baseline.score(vol), rc.min_pool, rc.avg_pool)
    score[~placement.brain] = 0.0
    return placement.to_native(score)
