"""FastBackend ("cpu") against the TorchBackend reference, on fresh random inputs every run.

Tolerances (‖fast − ref‖ / ‖ref‖; a NaN or inf anywhere fails):
- float32: mean_loss 1e-5, dL/dz 1e-4 (vs autograd through TorchBackend), score 1e-5;
- bf16: mean_loss 1e-2, score 1e-2, dL/dz 0.2 at K >= 301 (bf16 δs summed over K points: 2-6 %
  typical, 9 % worst seen), cosine > 0.8 per scan at K = 37.
dL/dz is compared on points drawn away from ReLU kinks (see kink_free).
Random inputs come from helpers.base_seed() (IFAD_TEST_SEED; see tests/helpers.py).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import base_seed, grid_indices, random_batch, random_decoder, rel

from ifad_fast import config as cfg
from ifad_fast import reference as paper
from ifad_fast.backends import TorchBackend
from ifad_fast.backends.factory import make_backend
from ifad_fast.errors import IfadError
from ifad_fast.backends.fast import FastBackend
from ifad_fast.model import positional_encoding, voxel_coords

CONFIGS = {
    "h64": cfg.ModelConfig(latent_dim=16, hidden=64, n_layers=4, latent_in=2, n_freqs=4, n_classes=10, dropout=0.0),
    "h96": cfg.ModelConfig(latent_dim=24, hidden=96, n_layers=6, latent_in=3, n_freqs=5, n_classes=7),
    "in1": cfg.ModelConfig(latent_dim=8, hidden=48, n_layers=3, latent_in=1, n_freqs=3, n_classes=5),
}
SHAPES = [(11, 13, 9), (5, 17, 3)]


# these tensors are tiny: one thread is faster, and immune to other jobs on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


TOL = {"float32": dict(loss=1e-5, grad=1e-4, score=1e-5), "bf16": dict(loss=1e-2, grad=0.2, score=1e-2)}


def kink_free(dec, z, idx, shape, seed, margin=1e-5):
    """Redraw the points where a ReLU pre-activation lies within margin·mean|a| of 0 (float64).

    At such a point dL/dz jumps, and float32 rounding alone (in either backend, in any summation
    order) decides which side of the kink a point lands on: one flipped unit moves dL/dz by up to
    ~1e-3 relative at these sizes. Measured flips happened at |a| ≈ 1e-8; the margin is ~1000×.
    """
    d = dec.folded().double()
    mc = dec.config
    g = torch.Generator().manual_seed(seed + 2)
    B, K = idx.shape[:2]
    for _ in range(50):
        enc = positional_encoding(voxel_coords(idx, shape), mc.n_freqs).double()
        x = torch.cat((z.double()[:, None, :].expand(B, K, -1), enc), dim=-1)
        h, bad = x, torch.zeros(B, K, dtype=torch.bool)
        with torch.no_grad():
            for i, layer in enumerate(d.layers[:-1]):
                if i == mc.latent_in:
                    h = torch.cat((h, x), dim=-1)
                a = layer(h)
                bad |= (a.abs() < margin * a.abs().mean()).any(dim=-1)
                h = torch.relu(a)
        if not bad.any():
            return idx
        idx = idx.clone()
        n = int(bad.sum())
        idx[bad] = torch.stack([torch.randint(0, s, (n,), generator=g) for s in shape], dim=-1)
    raise AssertionError("could not draw kink-free points")


def make_fast(dec, precision, chunk=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # bf16 on a CPU without native bf16
        return FastBackend(dec, "cpu", precision, chunk=chunk)


def reference_loss_grad(ref, z, idx, targets, shape, weights):
    zr = z.clone().requires_grad_(True)
    loss = ref.mean_loss(zr, idx, targets, shape)
    (loss * weights).sum().backward()
    return loss.detach(), zr.grad


@pytest.mark.parametrize("precision", ["float32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mean_loss_and_grad_match_reference(name, precision):
    mc = CONFIGS[name]
    seed = base_seed()
    dec = random_decoder(mc, seed)
    ref = TorchBackend(dec)
    tol = TOL[precision]
    for shape, B, K, chunk in [(SHAPES[0], 1, 37, None), (SHAPES[0], 3, 301, 64), (SHAPES[1], 3, 37, 16),
                               (SHAPES[1], 1, 301, 301)]:
        fast = make_fast(dec, precision, chunk)
        z, idx, targets = random_batch(mc, shape, B, K, seed)
        idx = kink_free(dec, z, idx, shape, seed)
        weights = torch.rand(B) + 0.5                      # a non-uniform grad_output
        lr, gr = reference_loss_grad(ref, z, idx, targets, shape, weights)
        zf = z.clone().requires_grad_(True)
        lf = fast.mean_loss(zf, idx, targets, shape)
        assert lf.shape == (B,) and lf.dtype == torch.float32
        (lf * weights).sum().backward()
        ctx = f"seed={seed} shape={shape} B={B} K={K} chunk={chunk}"
        assert rel(lf, lr) <= tol["loss"], (ctx, rel(lf, lr))
        if precision == "float32" or K >= 301:
            assert rel(zf.grad, gr) <= tol["grad"], (ctx, rel(zf.grad, gr))
        else:   # bf16 with few points: the sum of K rounded δs is heavy-tailed (0.29 seen at K=37)
            cos = torch.nn.functional.cosine_similarity(zf.grad, gr, dim=1)
            assert torch.isfinite(zf.grad).all() and (cos > 0.8).all(), (ctx, cos)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
@pytest.mark.parametrize("name", ["h64", "h96"])
def test_score_full_grid_matches_reference(name, precision):
    mc = CONFIGS[name]
    seed = base_seed()
    dec = random_decoder(mc, seed)
    ref = TorchBackend(dec)
    fast = make_fast(dec, precision, chunk=100)           # 1287 voxels: 12 full chunks and a partial one
    shape = SHAPES[0]
    idx = grid_indices(shape)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, mc.n_classes, (idx.shape[0],), generator=g)
    z = torch.randn(mc.latent_dim, generator=g) * 0.5
    sr = ref.score(z, idx, targets, shape)
    sf = fast.score(z, idx, targets, shape)
    assert sf.shape == sr.shape and sf.dtype == torch.float32
    assert rel(sf, sr) <= TOL[precision]["score"], (seed, rel(sf, sr))
    out = torch.full_like(sr, float("nan"))
    assert fast.score(z, idx, targets, shape, out=out) is out
    assert rel(out, sr) <= TOL[precision]["score"]


def test_buffer_reuse_and_repeat_steps_are_stable():
    mc = CONFIGS["h96"]
    seed = base_seed()
    dec = random_decoder(mc, seed)
    fast = make_fast(dec, "float32", chunk=100)
    shape = SHAPES[0]
    runs = []
    for B, K in [(3, 301), (1, 37), (3, 301), (2, 120), (3, 301)]:
        z, idx, targets = random_batch(mc, shape, B, K, seed)
        zf = z.clone().requires_grad_(True)
        loss = fast.mean_loss(zf, idx, targets, shape)
        loss.sum().backward()
        runs.append((B, K, loss.detach(), zf.grad))
    # same input, different calls in between (other buffer sizes used): identical numbers
    assert torch.equal(runs[0][2], runs[2][2]) and torch.equal(runs[0][3], runs[2][3])
    assert torch.equal(runs[0][2], runs[4][2]) and torch.equal(runs[0][3], runs[4][3])
    # two losses alive at once, backward in reverse order: saved tensors are not shared buffers
    z, idx, targets = random_batch(mc, shape, 3, 301, seed)
    idx = kink_free(dec, z * 0.5, idx, shape, seed)
    z1 = z.clone().requires_grad_(True)
    fast.mean_loss(z1, idx, targets, shape).sum().backward()
    za, zb = z.clone().requires_grad_(True), (z * 0.5).requires_grad_(True)
    la, lb = fast.mean_loss(za, idx, targets, shape), fast.mean_loss(zb, idx, targets, shape)
    lb.sum().backward()
    la.sum().backward()
    assert torch.equal(za.grad, z1.grad)
    _, gb = reference_loss_grad(TorchBackend(dec), z * 0.5, idx, targets, shape, torch.ones(3))
    assert rel(zb.grad, gb) <= 1e-4


def test_no_grad_and_nan_propagate():
    mc = CONFIGS["h64"]
    seed = base_seed()
    dec = random_decoder(mc, seed)
    fast = make_fast(dec, "float32")
    z, idx, targets = random_batch(mc, SHAPES[0], 2, 37, seed)
    with torch.no_grad():
        loss = fast.mean_loss(z.clone().requires_grad_(True), idx, targets, SHAPES[0])
    assert loss.grad_fn is None and torch.isfinite(loss).all()
    assert rel(loss, TorchBackend(dec).mean_loss(z, idx, targets, SHAPES[0]).detach()) <= 1e-5
    zn = z.clone()
    zn[1, 3] = float("nan")
    zn.requires_grad_(True)
    ln = fast.mean_loss(zn, idx, targets, SHAPES[0])
    ln.sum().backward()
    assert torch.isfinite(ln[0]) and torch.isnan(ln[1])
    assert torch.isnan(zn.grad[1]).all() and torch.isfinite(zn.grad[0]).all()
    assert rel(ln, loss) == float("inf")                  # the comparison never lets NaN pass
    s = fast.score(zn.detach()[1], idx[0], targets[0], SHAPES[0])
    assert torch.isnan(s).all()


def test_errors_and_factory():
    mc = CONFIGS["h64"]
    dec = random_decoder(mc, base_seed())
    with pytest.raises(IfadError):
        FastBackend(dec, "cpu", "float16")
    fast = make_backend("cpu", dec, "cpu")
    assert isinstance(fast, FastBackend) and fast.name == "cpu"
    z, idx, targets = random_batch(mc, SHAPES[0], 1, 37, 0)
    bad = idx.clone()
    bad[0, 5, 1] = SHAPES[0][1]
    with pytest.raises(IfadError):
        fast.mean_loss(z, bad, targets, SHAPES[0])
    with pytest.raises(IfadError):
        fast.mean_loss(z[:, :-1], idx, targets, SHAPES[0])
    assert fast.score(z[0], idx[0, :0], targets[0, :0], SHAPES[0]).shape == (0,)
    # the decoder is untouched by building a backend
    before = [w.clone() for w, _ in dec.weights()]
    make_fast(dec, "bf16")
    assert all(torch.equal(a, w) for a, (w, _) in zip(before, dec.weights()))


def test_paper_reference_matches_torch_backend():
    """The benchmark's paper-style baseline computes the same function (it is timed against FastBackend)."""
    pr = paper
    mc = CONFIGS["h96"]
    seed = base_seed()
    dec = random_decoder(mc, seed)
    ref = TorchBackend(dec)
    shape = SHAPES[0]
    z, idx, targets = random_batch(mc, shape, 2, 301, seed)
    idx = kink_free(dec, z, idx, shape, seed)
    lr, gr = reference_loss_grad(ref, z, idx, targets, shape, torch.ones(2))
    lp, gp = pr.reference_step(dec, z, idx, targets, shape)
    assert rel(lp, lr) <= 1e-5 and rel(gp, gr) <= 1e-4
    assert all(p.grad is not None for p in dec.parameters())        # weight gradients were computed
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, mc.n_classes, shape, generator=g)
    grid = pr.reference_grid(dec, z[0], classes, chunk=500)
    assert grid.shape == shape
    assert rel(grid.reshape(-1), ref.score(z[0], grid_indices(shape), classes.reshape(-1), shape)) <= 1e-5


def test_score_and_classes_match_torch_reference():
    mc = CONFIGS["h64"]
    seed = base_seed()
    dec = random_decoder(mc, seed)
    shape = (11, 13, 9)
    z, idx, targets = random_batch(mc, shape, 1, 301, seed)
    ref_ce, ref_cls = TorchBackend(dec).score_and_classes(z[0], idx[0], targets[0], shape)
    ce, cls = FastBackend(dec, "cpu", "float32").score_and_classes(z[0], idx[0], targets[0], shape)
    assert rel(ce, ref_ce) < 1e-5, rel(ce, ref_ce)
    assert (cls == ref_cls).float().mean().item() > 0.99   # ties within rounding may differ
