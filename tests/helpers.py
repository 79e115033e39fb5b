"""What the tests share: the random seed, random decoders and batches, relative errors.

Seed: every test that draws random inputs derives them from `base_seed()`, which is
IFAD_TEST_SEED when set and DEFAULT_SEED otherwise, so a CI run is reproducible and
`IFAD_TEST_SEED=<int> pytest ...` replays (or varies) one. conftest.py also seeds torch's and
NumPy's global generators with it before every test, prints it in the session header, and adds
it to the report of every failed test.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ifad_fast import config as cfg
from ifad_fast.model import Decoder
from ifad_fast.reference import rel_error as rel  # noqa: F401  (‖out − ref‖ / ‖ref‖; NaN -> inf)

SEED_ENV = "IFAD_TEST_SEED"
DEFAULT_SEED = 20210927          # fixed, so CI is reproducible


def base_seed() -> int:
    """IFAD_TEST_SEED when set (any int), else DEFAULT_SEED."""
    return int(os.environ.get(SEED_ENV) or DEFAULT_SEED)


def seed_note(seed: int | None = None) -> str:
    """'IFAD_TEST_SEED=<seed>': what to put in an assertion message to replay a failure."""
    return f"{SEED_ENV}={base_seed() if seed is None else seed}"


def numpy_rng(offset: int = 0) -> np.random.Generator:
    """A NumPy generator seeded with base_seed() + offset."""
    return np.random.default_rng(base_seed() + offset)


def random_decoder(mc: cfg.ModelConfig, seed: int) -> Decoder:
    """A decoder (eval mode) with random weights and randomised weight-norm magnitudes g and
    directions v (so that folding matters), biases N(0, 0.2²); deterministic in `seed`, global
    RNG untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dec = Decoder(mc)
        with torch.no_grad():
            for layer in dec.layers:
                p = layer.parametrizations.weight
                p.original0.mul_(torch.empty_like(p.original0).uniform_(0.3, 2.5))       # g
                p.original1.mul_(torch.empty_like(p.original1).uniform_(0.5, 1.5))       # v
                layer.bias.normal_(0.0, 0.2)
    return dec.eval()


def random_batch(mc: cfg.ModelConfig, shape, B: int, K: int, seed: int):
    """(z (B, D) float32 N(0, 0.5²), idx (B, K, 3) int64 voxel indices into `shape`, targets (B, K)
    int64 class ids), deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.stack([torch.randint(0, s, (B, K), generator=g) for s in shape], dim=-1)
    targets = torch.randint(0, mc.n_classes, (B, K), generator=g)
    z = torch.randn(B, mc.latent_dim, generator=g) * 0.5
    return z, idx, targets


def grid_indices(shape) -> torch.Tensor:
    """Every voxel of `shape` in C order: (X*Y*Z, 3) int64."""
    return torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3)


def rel_max(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / |ref| elementwise (|ref| floored at 1e-12); inf when `out` is not finite."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()


def rel_rows(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ per row (last dim), the worst row; inf when `out` is not finite."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()
