"""FastBackend ("cpu") against the paper-style reference, paper-size decoder, on CPU.

Run explicitly (not collected by the normal test run, whose testpaths is tests/):

    python -m pytest bench/test_bench_fast.py --benchmark-only

Threads: torch's default unless IFAD_BENCH_THREADS is set (torch.set_num_threads(n) for the
whole module). Groups: one restoration step (forward + backward to z) at K = 16,200; one grid
chunk of 65,536 voxels scored; one matmul (2048×512)·(512×512), float32 vs bf16.

Every case first checks its result against the paper-style reference (ifad_fast/reference.py):
- float32: losses and scores within 1e-5 relative (‖fast − ref‖/‖ref‖), dL/dz within 1e-3
  (the float32 reference is itself ~5e-4 from a float64 evaluation at this size: with random
  weights the logits are nearly uniform and dL/dz is a ~1e-4-sized sum of 16,200 terms);
- bf16: losses and scores within 1e-2, dL/dz within 0.2 (measured ~0.06).
NaN never passes.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from ifad_fast import config as cfg
from ifad_fast.backends.fast import FastBackend
from ifad_fast.model import Decoder
from ifad_fast.reference import reference_score, reference_step
from ifad_fast.reference import rel_error as rel

SHAPE = (160, 160, 160)
K = 16200
GRID_CHUNK = 65536
ROUNDS = {"reference": 5, "float32": 7, "bf16": 3}
TOL = {"float32": dict(loss=1e-5, grad=1e-3, score=1e-5), "bf16": dict(loss=1e-2, grad=0.2, score=1e-2)}

# multiply-adds per point (paper size: D=256, L=10, hidden 512, 8 layers, latent_in 4, C=10)
MAC_REF_FWD = 1_840_128            # plain decoder, 316-wide input, 512-wide [h3, z, γ] at layer 4
MAC_FAST_FWD = 1_516_544           # z hoisted (1,577,984) minus layers 0 and 4's γ blocks (2 × 30,720): tables
MAC_FAST_BWD = 1_516_544           # δ through W^T: layers 8..1, only the 196-wide h block at layer 4
FLOPS = {
    ("step", "reference"): 2 * K * 3 * MAC_REF_FWD,          # forward, dL/dinput, dL/dW
    ("step", "fast"): 2 * K * (MAC_FAST_FWD + MAC_FAST_BWD),
    ("grid", "reference"): 2 * GRID_CHUNK * MAC_REF_FWD,
    ("grid", "fast"): 2 * GRID_CHUNK * MAC_FAST_FWD,
}


@pytest.fixture(scope="module", autouse=True)
def threads():
    n = os.environ.get("IFAD_BENCH_THREADS")
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    mc = cfg.ModelConfig()
    dec = Decoder(mc)                   # random weights (torch's default init), weight norm on every layer
    idx = torch.stack([torch.randint(0, s, (1, K)) for s in SHAPE], dim=-1)
    targets = torch.randint(0, mc.n_classes, (1, K))
    z = torch.randn(1, mc.latent_dim) / mc.latent_dim ** 0.5          # the reference's N(0, 1/D) init
    flat = torch.arange(GRID_CHUNK)                                    # the first 65,536 voxels, C order
    gidx = torch.stack((flat // (SHAPE[1] * SHAPE[2]), (flat // SHAPE[2]) % SHAPE[1], flat % SHAPE[2]), -1)
    gtargets = torch.randint(0, mc.n_classes, (GRID_CHUNK,))
    return dict(dec=dec, idx=idx, targets=targets, z=z, gidx=gidx, gtargets=gtargets)


@pytest.fixture(scope="module")
def reference(problem):
    p = problem
    loss, grad = reference_step(p["dec"], p["z"], p["idx"], p["targets"], SHAPE)
    score = reference_score(p["dec"], p["z"][0], p["gidx"], p["gtargets"], SHAPE)
    return dict(loss=loss, grad=grad, score=score)


def fast_backend(dec, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # bf16 on a CPU without native bf16
        return FastBackend(dec, "cpu", precision)


def fast_step(backend, p):
    z = p["z"].clone().requires_grad_(True)
    loss = backend.mean_loss(z, p["idx"], p["targets"], SHAPE)
    loss.sum().backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("impl", ["reference", "float32", "bf16"])
def test_step(benchmark, problem, reference, impl):
    benchmark.group = f"restoration step (forward + backward to z), K = {K}"
    p = problem
    if impl == "reference":
        fn = lambda: reference_step(p["dec"], p["z"], p["idx"], p["targets"], SHAPE)      # noqa: E731
    else:
        backend = fast_backend(p["dec"], impl)
        fn = lambda: fast_step(backend, p)                                                # noqa: E731
    loss, grad = fn()
    tol = TOL.get(impl, TOL["float32"])
    assert rel(loss, reference["loss"]) <= tol["loss"], rel(loss, reference["loss"])
    assert rel(grad, reference["grad"]) <= tol["grad"], rel(grad, reference["grad"])
    benchmark.extra_info["flop"] = FLOPS[("step", "reference" if impl == "reference" else "fast")]
    benchmark.extra_info["loss_rel_err"] = rel(loss, reference["loss"])
    benchmark.extra_info["grad_rel_err"] = rel(grad, reference["grad"])
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(fn, rounds=ROUNDS[impl], iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["reference", "float32", "bf16"])
def test_grid_chunk(benchmark, problem, reference, impl):
    benchmark.group = f"score a grid chunk of {GRID_CHUNK} voxels"
    p = problem
    if impl == "reference":
        fn = lambda: reference_score(p["dec"], p["z"][0], p["gidx"], p["gtargets"], SHAPE)  # noqa: E731
    else:
        backend = fast_backend(p["dec"], impl)
        out = torch.empty(GRID_CHUNK, dtype=torch.float32)
        fn = lambda: backend.score(p["z"][0], p["gidx"], p["gtargets"], SHAPE, out=out)   # noqa: E731
    score = fn()
    err = rel(score, reference["score"])
    assert err <= TOL.get(impl, TOL["float32"])["score"], err
    benchmark.extra_info["flop"] = FLOPS[("grid", "reference" if impl == "reference" else "fast")]
    benchmark.extra_info["score_rel_err"] = err
    benchmark.extra_info["score_max_abs_err"] = float((score - reference["score"]).abs().max())
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(fn, rounds=ROUNDS[impl], iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("layout", ["float32", "bf16 a@W.t()", "bf16 a@WT"])
def test_matmul(benchmark, layout):
    """(2048×512)·(512×512) with torch.mm into a preallocated output; W (out, in) contiguous, WT = W^T contiguous."""
    benchmark.group = "matmul (2048x512)·(512x512), torch.mm"
    dt = torch.float32 if layout == "float32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 512, generator=g).to(dt)
    W = torch.randn(512, 512, generator=g).to(dt)
    WT = W.t().contiguous()
    out = torch.empty(2048, 512, dtype=dt)
    rhs = WT if layout == "bf16 a@WT" else W.t()
    want = a.float() @ W.float().t()
    got = torch.mm(a, rhs, out=out)
    assert rel(got.float(), want) <= (1e-5 if dt == torch.float32 else 1e-2)
    benchmark.extra_info["flop"] = 2 * 2048 * 512 * 512
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(lambda: torch.mm(a, rhs, out=out), rounds=30 if dt == torch.float32 else 10,
                       iterations=1, warmup_rounds=2)
