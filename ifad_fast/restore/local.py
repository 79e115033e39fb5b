"""Local latents: a restoration that follows its own subject (the `local` schedule, IF 3D).

The paper restores a scan with one latent z (D,) for the whole brain. The decoder then draws the
healthy brain of its latent space nearest to the scan, but one latent of a few dozen numbers cannot
draw an unseen subject's own ventricles and sulci: on healthy test brains about a quarter of the
restored classes lie more than one class from the scan's, and every one of those voxels is a false
alarm's raw material.

After the global search, the local stage spreads z over a coarse grid of G³ latents Z (D, G, G, G)
that start at z; the latent of a point p in [-1, 1]³ is Z interpolated trilinearly at p
(`latent_field`), so the restoration may take its ventricles from one healthy brain and its
temporal lobes from another. Z is fitted by Adam (rc.local_steps steps of rc.local_points points)
to minimise

    mean CE over the points  +  mean_c ‖Z_c - z‖² / (σ² · K)          σ = rc.local_sigma

(the second term: a Gaussian tie of every cell to the global latent, scaled like the paper's prior),
on the brain voxels that the global restoration already explains: a voxel whose global anomaly map
reaches rc.local_exclude × the decision threshold, or lies within rc.local_margin voxels of one, is
left out of the fit (`fit_region`). A lesion therefore cannot pull the cells around it towards
itself, and the decoder, which only knows healthy anatomy, draws healthy tissue there from the
cells' fit to the healthy tissue around it. The score of a voxel is then -log P(t | Z(p), p).

Every function runs on the device of its inputs with the plain float32 decoder (`Decoder.folded`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import config as cfg
from ..model import Decoder, positional_encoding, voxel_coords
from .scoring import anomaly_map, score_grid


def latent_field(grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear latents: grid (D, G, G, G) float32 over the axes (X, Y, Z) of [-1, 1]³ (corners
    on the cube's corners), coords (N, 3) float32 in [-1, 1] -> (N, D) float32."""
    d = grid.shape[0]
    # grid_sample reads the last coordinate along the first spatial axis
    where = coords[:, [2, 1, 0]].reshape(1, 1, 1, -1, 3)
    return F.grid_sample(grid[None], where, mode="bilinear", align_corners=True).reshape(d, -1).t()


def field_logits(decoder: Decoder, grid: torch.Tensor, idx: torch.Tensor, shape) -> torch.Tensor:
    """(M, C) float32 logits at voxels idx (M, 3) long of a grid `shape`, each with its own latent."""
    coords = voxel_coords(idx, shape)
    return decoder(latent_field(grid, coords), positional_encoding(coords, decoder.config.n_freqs))


def fit_region(global_score: torch.Tensor, brain: torch.Tensor, rc: cfg.RestoreConfig, threshold: float,
               region: str = "brain") -> torch.Tensor:
    """bool (X, Y, Z): the brain voxels the local latents are fitted on, from the global restoration's
    raw score (X, Y, Z) float32: those where its anomaly map stays below rc.local_exclude × threshold
    and no voxel within rc.local_margin of them reaches it."""
    hot = (anomaly_map(global_score, brain, rc, region) >= rc.local_exclude * threshold).float()
    m = rc.local_margin
    if m > 0:
        hot = F.max_pool3d(hot[None, None], 2 * m + 1, stride=1, padding=m)[0, 0]
    return brain & (hot == 0)


def fit_local_latents(decoder: Decoder, z: torch.Tensor, classes: torch.Tensor, fit: torch.Tensor,
                      rc: cfg.RestoreConfig, generator: torch.Generator) -> torch.Tensor:
    """The local stage's search: grid (D, G, G, G) float32, G = rc.local_grid, each cell started at z.

    decoder: folded, on the classes' device; z (D,) float32, the global latent; classes (X, Y, Z)
    uint8; fit: bool (X, Y, Z), the voxels drawn (uniformly, rc.local_points a step, from `generator`
    on its own device). With no voxel to fit, every cell keeps z.
    """
    g, device = rc.local_grid, classes.device
    base = z.detach().to(device, torch.float32).reshape(-1, 1, 1, 1).expand(-1, g, g, g)
    delta = torch.zeros_like(base, requires_grad=True)
    voxels = fit.reshape(-1).nonzero().squeeze(1)
    if voxels.numel() == 0 or rc.local_steps == 0:
        return base.contiguous()
    shape = tuple(int(s) for s in classes.shape)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    sizes = torch.tensor(shape, device=device)
    flat = classes.reshape(-1).long()
    k = rc.local_points
    tie = 1.0 / (rc.local_sigma ** 2 * k)
    opt = torch.optim.Adam([delta], lr=rc.local_lr)
    with torch.enable_grad():
        for _ in range(rc.local_steps):
            pick = torch.randint(voxels.numel(), (k,), generator=generator, device=generator.device).to(device)
            lin = voxels[pick]
            idx = (lin[:, None] // strides) % sizes
            ce = F.cross_entropy(field_logits(decoder, base + delta, idx, shape), flat[lin])
            loss = ce + tie * delta.square().sum(0).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (base + delta).detach()


class _FieldScorer:
    """What `scoring.score_points` asks of a backend, for the latent field: each voxel decoded with
    its own latent (the z it is passed is not used)."""

    def __init__(self, decoder: Decoder, grid: torch.Tensor):
        self.decoder, self.grid = decoder, grid

    def score_and_classes(self, z, idx: torch.Tensor, targets: torch.Tensor, shape, checked: bool = True):
        logp = torch.log_softmax(field_logits(self.decoder, self.grid, idx, shape), dim=1)
        return -logp.gather(1, targets[:, None])[:, 0], logp.argmax(1)


@torch.no_grad()
def score_grid_local(decoder: Decoder, grid: torch.Tensor, classes: torch.Tensor, region: torch.Tensor | None,
                     chunk: int = 65536):
    """`scoring.score_grid` with the latent field: classes (X, Y, Z) uint8 (range-checked by the
    caller), region bool (X, Y, Z) or None (all).

    Returns (scores float32 (X, Y, Z), 0 outside the region; most likely classes uint8 (X, Y, Z);
    decoder evaluations int), on the classes' device.
    """
    scores, predicted = score_grid(_FieldScorer(decoder, grid), None, classes, region, chunk, checked=True)
    return scores, predicted, int(region.sum()) if region is not None else classes.numel()
