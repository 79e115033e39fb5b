"""Training targets that vary like real data (domain randomisation), opt-in, point-wise.

Off by default everywhere (`TrainConfig.augment = ()`): the Trainer then never builds an
`Augmenter` and draws exactly the random numbers it always did. With `augment` holding any of
KINDS, the target class of each point a training step draws is computed here instead of read
from the prepared class stack:

    target(p) = T_{e,v}(round(warp_{v,c}(p)))     (0, the background, where that leaves the grid)
    T_{e,v}   = mode_pool_w(encode_{centres'}(rician_σ(bias_b(x) · I_v ** γ)))

I_v: the volume's normalised model-grid intensities (the prepared `intensities.npy`, float16;
the classes of `volumes.npy` are mode_pool_w(encode(I_v)) up to that rounding); x: a voxel's
coordinate in [-1, 1]³ (model.voxel_coords); γ, b, σ, centres': the draw of (epoch e, volume v,
copy c); w: the mode pool the data was prepared with (2 for training: a voxel and its backward
neighbours, kernels/numba_ops.window_offsets). Only the drawn points are evaluated: each point
reads its w³ pooling neighbours (8 at w = 2), so a step costs O(points · w³) on the training
device, never a whole volume. With no intensity kind on, T is the stored class stack itself.

Kinds, and when each is drawn:
  contrast  γ with log γ ~ N(0, augment_gamma) on the intensity, and every tissue centre
            jittered by N(0, augment_centre_jitter) (kept within 0.45 of its gaps; the
            background centre stays) before the nearest-centre encoding (IntensityEncoder's
            rule: the lower class on ties). Per (epoch, volume, copy).
  bias      a multiplicative field exp(Σ_k a_k t_k(x)) over the 9 quadratic terms of x, each
            centred and scaled to unit variance over the grid (`bias_terms`; on a product grid
            they are orthogonal), a_k ~ N(0, augment_bias² / 9): the log-field's variance over
            the grid is augment_bias² in expectation. Per (epoch, volume, copy).
  noise     Rician noise of level σ ~ U(0, augment_noise): sqrt((I + σ n1)² + (σ n2)²) on brain
            voxels, n1, n2 standard normals of the (epoch, volume, copy, voxel) -- a counter-based
            hash (`hash_normals`), so it is one noisy volume per draw whichever points are read,
            identical on every device and process. Per (epoch, volume, copy).
  deform    the lookup coordinate moves (the decoder's input stays p): a global affine about the
            grid centre (rotations N(0, augment_rotate) degrees about each axis, log-scale
            N(0, augment_scale)) plus u(x), per axis a sum of DEFORM_MODES sine modes of
            frequencies in {0, 1, 2}·π/2 per coordinate with random phases and N(0, 1) amplitudes,
            scaled so that E|u|² = augment_deform² voxels²; the class is read at the nearest
            voxel. FIXED per (volume, copy), never redrawn: see below.

Why deformation is fixed and intensity changes are redrawn (an auto-decoder's constraint).
Each training volume owns one latent z. A deformation redrawn every epoch would ask that one
z to explain a different anatomy every time it is visited; the decoder can only answer with
the average of those anatomies -- a blur -- and the latent space would stop encoding anatomy.
So deformation makes *virtual subjects*: `augment_copies` M >= 2 lets each volume appear as M
training samples, each with its own latent; copy 0 is the volume itself, copies 1..M-1 carry a
deformation drawn once from (seed, volume, copy), the same in every epoch (deform without
copies is refused: it would only replace each volume by one warped version). Contrast, bias
and noise leave the anatomy alone: redrawn per (epoch, volume, copy) they act as label noise at
the class boundaries matched to real acquisition variation, which one latent can absorb (its
best answer is the anatomy's expected class), and they teach the decoder that class boundaries
shift with the scanner. They apply to copy 0 too.

Seeds: every draw comes from numpy's SeedSequence over (TrainConfig.seed, stream, [epoch,]
volume, copy) -- never from the Trainer's own generator -- so targets depend neither on the
batch a sample lands in, nor on the number of processes, nor on where a run was resumed. 2D
models (a latent per slice) take contrast, bias and noise per (epoch, volume), copy 0; deform
and copies are 3D only.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import AUGMENT_KINDS as KINDS

INTENSITY_KINDS = ("contrast", "bias", "noise")
DEFORM_MODES = 4            # sine modes per axis of a deformation
DEFORM_MAX_FREQ = 2         # each mode's frequency per coordinate: 0..DEFORM_MAX_FREQ (× π/2)
JITTER_GAP = 0.45           # a jittered centre stays within this share of its gaps to its neighbours
_M32 = 0xFFFFFFFF
# streams of the SeedSequence keys
_INTENSITY, _DEFORM = 0, 1

BIAS_TERMS = 9              # x, y, z, x², y², z², xy, xz, yz (bias_terms)


def parse_kinds(text) -> tuple:
    """'contrast,bias' | 'none' | '' | a sequence -> a tuple in KINDS order; ValueError for an unknown kind."""
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
    else:
        items = list(text)
    if items in (["none"], []):
        return ()
    unknown = [t for t in items if t not in KINDS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(KINDS)} or none")
    return tuple(k for k in KINDS if k in items)


def uses_intensities(kinds) -> bool:
    """Whether augmentations `kinds` read the intensity stack (contrast, bias or noise)."""
    return any(k in INTENSITY_KINDS for k in kinds)


def seed_of(*key: int) -> int:
    """A 63-bit torch seed from integers (numpy SeedSequence): unrelated keys give unrelated streams."""
    a, b = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32)
    return ((int(a) << 32) | int(b)) & (2 ** 63 - 1)


# ------------------------------------------------------------------------------------ formulas

def gamma_contrast(values: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """values (B, ...) float64 intensities >= 0, gamma (B,) float64 -> values ** gamma (per row)."""
    g = gamma.reshape((-1,) + (1,) * (values.ndim - 1))
    return values.clamp(min=0.0) ** g


def grid_moments(shape) -> tuple[list[float], list[float]]:
    """Per axis of a grid `shape`, the mean of x² and the variance of x² over its coordinates
    x_i = 2i/(n-1) - 1 (the mean of x is 0): the bias terms' normalisers."""
    m2, v2 = [], []
    for n in shape:
        x = [2.0 * i / max(n - 1, 1) - 1.0 for i in range(n)]
        a = sum(t * t for t in x) / n
        m2.append(a)
        v2.append(max(sum(t ** 4 for t in x) / n - a * a, 1e-12))
    return m2, v2


def bias_terms(coords: torch.Tensor, shape) -> torch.Tensor:
    """coords (..., 3) float64 in [-1, 1] on a grid `shape` -> (..., 9) float64: x, y, z, x², y², z²,
    xy, xz, yz, each centred and divided by its standard deviation over the grid (grid_moments):
    x / √E[x²], (x² - E[x²]) / √Var[x²], xy / √(E[x²]E[y²]), ...; orthonormal over the grid."""
    m2, v2 = grid_moments(shape)
    x, y, z = coords.unbind(-1)
    return torch.stack([x / math.sqrt(m2[0]), y / math.sqrt(m2[1]), z / math.sqrt(m2[2]),
                        (x * x - m2[0]) / math.sqrt(v2[0]), (y * y - m2[1]) / math.sqrt(v2[1]),
                        (z * z - m2[2]) / math.sqrt(v2[2]), x * y / math.sqrt(m2[0] * m2[1]),
                        x * z / math.sqrt(m2[0] * m2[2]), y * z / math.sqrt(m2[1] * m2[2])], dim=-1)


def bias_field(coords: torch.Tensor, coeffs: torch.Tensor, shape) -> torch.Tensor:
    """coords (B, ..., 3) float64 on a grid `shape`, coeffs (B, 9) float64 -> (B, ...) float64:
    exp(Σ_k a_k t_k(x)), t = bias_terms."""
    t = bias_terms(coords, shape)
    a = coeffs.reshape((coeffs.shape[0],) + (1,) * (t.ndim - 2) + (BIAS_TERMS,))
    return torch.exp((t * a).sum(-1))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 x in [0, 2³²), without int64 overflow."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 x in [0, 2³²) -> [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uniforms(key: torch.Tensor, lin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key (B, 2) int64 in [0, 2³²), lin (B, ...) int64 voxel indices < 2³² -> two (B, ...) float64
    uniforms in (0, 1): (mix32(mix32(lin ^ k_j) + k_j) + 0.5) / 2³² for j = 0, 1 (sums mod 2³²)."""
    shape = (key.shape[0],) + (1,) * (lin.ndim - 1)
    out = []
    for j in range(2):
        k = key[:, j].reshape(shape)
        h = _mix32((_mix32(lin ^ k) + k) & _M32)
        out.append((h.to(torch.float64) + 0.5) / 2.0 ** 32)
    return out[0], out[1]


def hash_normals(key: torch.Tensor, lin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent standard normals per voxel from hash_uniforms (Box-Muller): (B, ...) float64 each."""
    u1, u2 = hash_uniforms(key, lin)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)


def rician(values: torch.Tensor, sigma: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor) -> torch.Tensor:
    """values (B, ...) float64, sigma (B,), n1, n2 standard normals like values ->
    sqrt((v + σ n1)² + (σ n2)²): the magnitude of a complex signal v with Gaussian noise σ per channel."""
    s = sigma.reshape((-1,) + (1,) * (values.ndim - 1))
    return torch.sqrt((values + s * n1) ** 2 + (s * n2) ** 2)


def encode_nearest(values: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """values (B, ...) float64, centres (B, C) float64 -> (B, ...) long: argmin_i |v - c_i|, the lower
    index on ties (IntensityEncoder.encode's rule, with a row's own centres)."""
    c = centres.reshape((centres.shape[0],) + (1,) * (values.ndim - 1) + (centres.shape[1],))
    return torch.argmin((values[..., None] - c).abs(), dim=-1)


def window_offsets(window: int) -> torch.Tensor:
    """The (window³, 3) long offsets of a 'same' mode-pool window (numba_ops.window_offsets: lo = -(w//2))."""
    r = torch.arange(window) - window // 2
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def mode_of(classes: torch.Tensor, valid: torch.Tensor, n_classes: int) -> torch.Tensor:
    """classes (B, P, W) long, valid (B, P, W) bool -> (B, P) long: the most common valid class of each
    window, the lower class on ties (numba_ops.mode_pool3d's rule: neighbours off the grid do not vote)."""
    counts = torch.zeros(classes.shape[:2] + (n_classes,), dtype=torch.int32, device=classes.device)
    counts.scatter_add_(2, classes.clamp(0, n_classes - 1), valid.to(torch.int32))
    return torch.argmax(counts, dim=2)


def displacement(coords: torch.Tensor, freqs: torch.Tensor, phases: torch.Tensor,
                 amps: torch.Tensor) -> torch.Tensor:
    """coords (B, P, 3) float64 in [-1, 1]; freqs (B, 3, M, 3) float64 (axis, mode, frequency vector);
    phases, amps (B, 3, M) float64 -> u (B, P, 3) float64 voxels:
    u_a(x) = Σ_m amps[a, m] · sin(π/2 · freqs[a, m]·x + phases[a, m])."""
    arg = torch.einsum("bpj,bamj->bpam", coords, freqs) * (math.pi / 2) + phases[:, None]
    return (amps[:, None] * torch.sin(arg)).sum(-1)


def coords_of(idx: torch.Tensor, shape) -> torch.Tensor:
    """Voxel indices (..., 3) -> float64 coordinates in [-1, 1] (model.voxel_coords' map, in float64)."""
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], dtype=torch.float64, device=idx.device)
    return idx.to(torch.float64) * scale - 1.0


def warp(idx: torch.Tensor, shape, affine: torch.Tensor, freqs, phases, amps) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (B, P, 3) long -> (q (B, P, 3) long, inside (B, P) bool): q = round(c + A(p - c) + u(x)),
    c the grid centre, A (B, 3, 3) float64, u = displacement(x, freqs, phases, amps); inside: q on the grid.
    torch.round rounds halves to even, as np.round."""
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64, device=idx.device)
    p = idx.to(torch.float64) - centre
    moved = torch.einsum("bij,bpj->bpi", affine, p) + centre + displacement(coords_of(idx, shape), freqs, phases, amps)
    q = torch.round(moved)
    size = torch.tensor(shape, dtype=torch.float64, device=idx.device)
    inside = ((q >= 0) & (q <= size - 1)).all(-1)
    return torch.where(inside[..., None], q, torch.zeros_like(q)).long(), inside


def rotation(angles: torch.Tensor) -> torch.Tensor:
    """angles (B, 3) float64 radians about x, y, z -> (B, 3, 3) float64 Rz · Ry · Rx."""
    cx, cy, cz = torch.cos(angles).unbind(-1)
    sx, sy, sz = torch.sin(angles).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


# ------------------------------------------------------------------------------------- draws

def jitter_centres(centres: torch.Tensor, normals: torch.Tensor, sd: float) -> torch.Tensor:
    """centres (C,) float64 ascending, normals (C,) -> (C,) float64: c_i + clamp(sd·n_i, ±JITTER_GAP·gap_i),
    gap_i the smaller distance to a neighbouring centre; centre 0 (the background) stays."""
    c = centres.to(torch.float64)
    d = torch.diff(c)
    gaps = torch.minimum(torch.cat([d[:1], d]), torch.cat([d, d[-1:]]))
    shift = torch.maximum(torch.minimum(sd * normals, JITTER_GAP * gaps), -JITTER_GAP * gaps)
    shift[0] = 0.0
    return c + shift


def intensity_draw(tc, centres: torch.Tensor, epoch: int, volume: int, copy: int) -> dict:
    """The contrast, bias and noise parameters of (epoch, volume, copy): gamma (), centres (C,),
    bias (9,), sigma () float64 and key (2,) int64 in [0, 2³²). Every parameter is always drawn, in
    this order, so a kind's draw does not depend on which other kinds are on; a kind that is off
    gets its identity (γ 1, the model's centres, no field, σ 0)."""
    g = torch.Generator().manual_seed(seed_of(tc.seed, _INTENSITY, epoch, volume, copy))
    n = torch.randn(2 + len(centres) + BIAS_TERMS, generator=g, dtype=torch.float64)
    sigma_u = torch.rand((), generator=g, dtype=torch.float64)
    key = torch.randint(0, 2 ** 32, (2,), generator=g, dtype=torch.int64)
    on = set(tc.augment)
    c = centres.to(torch.float64)
    return dict(
        gamma=torch.exp(tc.augment_gamma * n[0]) if "contrast" in on else torch.ones((), dtype=torch.float64),
        centres=jitter_centres(c, n[2:2 + len(c)], tc.augment_centre_jitter) if "contrast" in on else c.clone(),
        bias=(n[2 + len(c):] * (tc.augment_bias / math.sqrt(BIAS_TERMS)) if "bias" in on
              else torch.zeros(BIAS_TERMS, dtype=torch.float64)),
        sigma=sigma_u * tc.augment_noise if "noise" in on else torch.zeros((), dtype=torch.float64),
        key=key)


def deform_draw(tc, volume: int, copy: int) -> dict:
    """The fixed deformation of virtual subject (volume, copy): affine (3, 3), freqs (3, M, 3),
    phases (3, M), amps (3, M) float64 (M = DEFORM_MODES). Copy 0 is the identity (the volume itself)."""
    m = DEFORM_MODES
    if copy == 0 or "deform" not in tc.augment:
        return dict(affine=torch.eye(3, dtype=torch.float64), freqs=torch.zeros(3, m, 3, dtype=torch.float64),
                    phases=torch.zeros(3, m, dtype=torch.float64), amps=torch.zeros(3, m, dtype=torch.float64))
    g = torch.Generator().manual_seed(seed_of(tc.seed, _DEFORM, volume, copy))
    freqs = torch.randint(0, DEFORM_MAX_FREQ + 1, (3, m, 3), generator=g).to(torch.float64)
    zero = (freqs == 0).all(-1)                                  # a constant mode would be a shift: make it x
    freqs[..., 0] = torch.where(zero, torch.ones_like(freqs[..., 0]), freqs[..., 0])
    phases = torch.rand(3, m, generator=g, dtype=torch.float64) * (2 * math.pi)
    amps = torch.randn(3, m, generator=g, dtype=torch.float64) * (tc.augment_deform * math.sqrt(2.0 / (3 * m)))
    angles = torch.randn(3, generator=g, dtype=torch.float64) * math.radians(tc.augment_rotate)
    scale = torch.exp(torch.randn((), generator=g, dtype=torch.float64) * tc.augment_scale)
    return dict(affine=scale * rotation(angles[None])[0], freqs=freqs, phases=phases, amps=amps)


# --------------------------------------------------------------------------------- the targets

class Augmenter:
    """Augmented targets for the Trainer (module docstring).

    classes: (N, V) uint8 flat class stack; intensities: (N, V) float16 flat intensity stack, or
    None when no intensity kind is on; brains: (N, V) flat brain masks (nonzero = brain; noise
    goes there only). All three are read where they live (CPU memmap or the GPU) and the results
    moved to `device`. shape: the grid (X, Y, Z); mode_pool: the window the classes were pooled
    with; centres: (C,) the model's centres; copies: samples per volume (augment_copies).
    """

    def __init__(self, tc, classes, intensities, brains, shape, centres, mode_pool: int, device):
        self.tc, self.shape, self.device = tc, tuple(int(s) for s in shape), torch.device(device)
        self.classes, self.intensities, self.brains = classes, intensities, brains
        self.centres = torch.as_tensor(np.asarray(centres), dtype=torch.float64)
        self.n_classes = len(self.centres)
        self.mode_pool = int(mode_pool)
        self.offsets = window_offsets(self.mode_pool).to(self.device)
        self.deform = "deform" in tc.augment
        self.intensity = uses_intensities(tc.augment)
        self._deforms: dict = {}

    def _stack(self, draws: list[dict], name: str) -> torch.Tensor:
        return torch.stack([d[name] for d in draws]).to(self.device)

    def deformations(self, volumes: torch.Tensor, copies: torch.Tensor) -> dict:
        """The fixed deformations of the samples (volumes, copies) (B,) each, stacked on the device."""
        draws = []
        for v, c in zip(volumes.tolist(), copies.tolist()):
            if (v, c) not in self._deforms:
                self._deforms[(v, c)] = deform_draw(self.tc, v, c)
            draws.append(self._deforms[(v, c)])
        return {k: self._stack(draws, k) for k in ("affine", "freqs", "phases", "amps")}

    def targets(self, epoch: int, volumes: torch.Tensor, copies: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """volumes, copies (B,) long; idx (B, P, 3) long voxel indices (the decoder's points) ->
        (B, P) long target classes on the device."""
        idx = idx.to(self.device)
        sx, sy, sz = self.shape
        if self.deform:
            q, inside = warp(idx, self.shape, **self.deformations(volumes, copies))
        else:
            q, inside = idx, None
        if not self.intensity:
            lin = (q[..., 0] * sy + q[..., 1]) * sz + q[..., 2]
            where = self.classes.device
            t = self.classes[volumes.to(where)[:, None], lin.to(where)].to(self.device).long()
            return t if inside is None else torch.where(inside, t, torch.zeros_like(t))
        draws = [intensity_draw(self.tc, self.centres, epoch, v, c) for v, c in zip(volumes.tolist(), copies.tolist())]
        nb = q[:, :, None, :] + self.offsets                                     # (B, P, W, 3) pooling window
        size = torch.tensor(self.shape, device=self.device)
        valid = ((nb >= 0) & (nb < size)).all(-1)
        if inside is not None:
            valid &= inside[..., None]
        nb = torch.where(valid[..., None], nb, torch.zeros_like(nb))
        lin = (nb[..., 0] * sy + nb[..., 1]) * sz + nb[..., 2]
        where = self.intensities.device
        rows, at = volumes.to(where)[:, None, None], lin.to(where)
        values = self.intensities[rows, at].to(self.device, torch.float64)
        brain = self.brains[volumes.to(self.brains.device)[:, None, None], lin.to(self.brains.device)].to(self.device)
        values = gamma_contrast(values, self._stack(draws, "gamma"))
        if "bias" in self.tc.augment:
            values = values * bias_field(coords_of(nb, self.shape), self._stack(draws, "bias"), self.shape)
        if "noise" in self.tc.augment:
            n1, n2 = hash_normals(self._stack(draws, "key"), lin)
            values = torch.where(brain != 0, rician(values, self._stack(draws, "sigma"), n1, n2), values)
        classes = encode_nearest(values, self._stack(draws, "centres"))
        t = mode_of(classes, valid, self.n_classes)
        if inside is not None:
            t = torch.where(inside, t, torch.zeros_like(t))
        return t
