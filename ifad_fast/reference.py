"""The straightforward restoration step and score grid, written the way the paper's public code does it,
and the relative error every fast path is judged by.

The paper-style code is the baseline the fast backends are timed against (`ifad-fast bench
speed`, bench/test_bench_fast.py, bench/test_bench_gpu.py), not the correctness reference of
the package (that is `ifad_fast.backends.TorchBackend`); tests check that both compute the
same function. Style of the public code (a DeepSDF decoder):

- weight normalisation recomputed from (g, v) on every forward (torch's weight-norm
  parametrisation, uncached), dropout disabled (p = 0 at test time),
- every point's input is the concatenation [z, γ(p)] (D + 6L = 316 wide for the paper's model),
  re-concatenated at the latent_in layer ([h, z, γ(p)], 512 wide),
- positional encoding recomputed from the coordinates every call,
- the latent and *all weights* require gradients: `loss.backward()` computes dL/dz and every
  weight gradient (accumulated into .grad and never used), float32, no chunking in a step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import Decoder, positional_encoding, voxel_coords


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (float64, whole tensors); inf when the shapes differ or anything is not
    finite, so NaN never passes a tolerance."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape or not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _forward(decoder: Decoder, x: torch.Tensor) -> torch.Tensor:
    """DeepSDF-style forward over the decoder's weight-normed layers, no dropout: (N, D+6L) -> (N, C)."""
    mc = decoder.config
    h = x
    for i, layer in enumerate(decoder.layers[:-1]):
        if i == mc.latent_in:
            h = torch.cat((h, x), dim=1)
        h = F.relu(layer(h))          # layer.weight = g * v / ‖v‖, recomputed on this access
    return decoder.layers[-1](h)


def _inputs(decoder: Decoder, z: torch.Tensor, idx: torch.Tensor, shape) -> torch.Tensor:
    """[z, γ(p)] for every point: z (B, D), idx (B, K, 3) -> (B*K, D + 6L)."""
    B, K = idx.shape[:2]
    enc = positional_encoding(voxel_coords(idx, shape), decoder.config.n_freqs)     # (B, K, 6L)
    return torch.cat((z[:, None, :].expand(B, K, z.shape[1]), enc), dim=-1).reshape(B * K, -1)


def reference_step(decoder: Decoder, z: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, shape):
    """One (Adam-free) restoration step: forward and full backward of the per-scan mean loss.

    z (B, D); idx (B, K, 3) voxel indices; targets (B, K). Returns (loss (B,), dL/dz (B, D)), where
    L = Σ_b loss_b. Weight gradients are computed (and accumulated) as in the public code.
    """
    decoder.train()
    decoder.requires_grad_(True)
    z = z.detach().clone().requires_grad_(True)
    B, K = idx.shape[:2]
    logits = _forward(decoder, _inputs(decoder, z, idx, shape))
    loss = F.cross_entropy(logits, targets.reshape(-1).long(), reduction="none").view(B, K).mean(dim=1)
    loss.sum().backward()
    return loss.detach(), z.grad


@torch.no_grad()
def reference_score(decoder: Decoder, z: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, shape):
    """-log P(t | z, p) of M voxels of one scan: z (D,), idx (M, 3), targets (M,) -> (M,) float32."""
    decoder.eval()
    logits = _forward(decoder, _inputs(decoder, z[None], idx[None], shape))
    return F.cross_entropy(logits, targets.reshape(-1).long(), reduction="none")


@torch.no_grad()
def reference_grid(decoder: Decoder, z: torch.Tensor, classes: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Score every voxel of a class volume (X, Y, Z) for latent z (D,), in chunks -> (X, Y, Z) float32."""
    shape = tuple(classes.shape)
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, device=classes.device) for s in shape),
                                      indexing="ij"), dim=-1).reshape(-1, 3)
    flat = classes.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.float32, device=classes.device)
    for s in range(0, flat.numel(), chunk):
        out[s:s + chunk] = reference_score(decoder, z, grid[s:s + chunk], flat[s:s + chunk], shape)
    return out.view(shape)
