"""The fused Triton kernels (kernels/triton_decoder.py) and the triton backend, run on the CPU by
Triton's interpreter, against float64 / float32 torch references and against the kernel's own
specification (`fused_point_ref`, the "_emul" metrics) on random inputs.

TRITON_INTERPRET=1 must be set before triton is imported, and a process that imported triton
without it (the compile test, torch.compile elsewhere) cannot interpret: so every check runs in
one child process (this file run as a script with --worker) with the variable set, and reports
its errors as JSON; the tests below judge them. NaN or a missing result never passes.

Tolerances: float32 losses and scores 1e-5 relative (max over points / scans), z-gradients
1e-4 relative (‖Δ‖/‖ref‖ per scan), against float64 and against the spec; bf16 (bf16 operands,
fp32 accumulation): against the spec (torch, the same roundings) 1e-4 (losses, scores) / 1e-3
(gradients), against float64 2e-2 on losses and scores. bf16 z-gradients differ from float64 by 5-15 % on these random tiny nets
(rounding only the weights to bf16 gives the same: Σ δ cancels heavily), so that error is
recorded and gated only as a sanity bound (< 100 %, finite).
IF 2D through restore_classes (the slice latents as one batch, per-slice scoring): triton vs
torch after four Adam steps without the prior (which would swamp the data gradient), latents and
maps to 1e-4 relative.
Seed: helpers.base_seed() (IFAD_TEST_SEED, fixed by default), passed to the worker; check j draws
its decoder and inputs from seed + 1000·j and every failure message names the seed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from helpers import base_seed, grid_indices, random_batch, random_decoder, rel_max, rel_rows

from ifad_fast.model import axis_encoding

# name -> {metric: max allowed}
FP32 = dict(loss=1e-5, grad=1e-4, score=1e-5, loss_emul=1e-5, grad_emul=1e-4, score_emul=1e-5)
CHECKS = {
    "tiny_B2_K37_fp32": FP32,
    "odd_B1_K1_li1_fp32": FP32,
    "odd_B2_K130_lilast_fp32": FP32,
    "wide_B1_K37_h128_fp32": FP32,
    "tiny_B2_K37_bf16": dict(loss_emul=1e-4, grad_emul=1e-3, score_emul=1e-4, loss=2e-2, score=2e-2, grad=1.0),
    "odd_B2_K130_lilast_bf16": dict(loss_emul=1e-4, grad_emul=1e-3, score_emul=1e-4, loss=2e-2, score=2e-2, grad=1.0),
    "grid_all_voxels_chunked_fp32": dict(score=1e-5, classes=0.0),
    "backend_vs_torch_fp32": dict(loss=1e-5, grad=1e-4, score=1e-5, score_cls=1e-5, classes=0.0,
                                  unavailable_cpu_without_env=0.5, bad_input_accepted=0.5),
    # four Adam steps (no prior) from the same start: latents and maps of the two backends to 1e-4 (relative)
    "if2d_restore_vs_torch_fp32": dict(z=1e-4, anomaly=1e-4, slices=0.0),
}
WORKER_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------
# worker side (child process, TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------


def _reference64(dec, z, idx, tgt, shape):
    """float64 decoder (weights folded), γ from the model's float32 encoding; autograd for dz."""
    import torch
    from ifad_fast.model import positional_encoding, voxel_coords
    ref = dec.folded().double()
    enc = positional_encoding(voxel_coords(idx, shape), dec.config.n_freqs).double()
    z64 = z.detach().double().requires_grad_(True)
    logits = ref(z64[:, None, :].expand(-1, idx.shape[1], -1), enc)
    loss = -torch.log_softmax(logits, -1).gather(-1, tgt.long()[..., None]).squeeze(-1)
    loss.mean(1).sum().backward()
    return loss.detach(), z64.grad, logits.detach()


def _kernel_check(td, mc, B, K, shape, seed, precision="float32", config=None):
    dec = random_decoder(mc, seed)
    z, idx, tgt = random_batch(mc, shape, B, K, seed)
    pack = td.PackedDecoder(dec.weights(), mc.latent_dim, mc.n_freqs, mc.latent_in, "cpu",
                            precision, config)
    table = axis_encoding(shape, mc.n_freqs)
    zg = z.clone().requires_grad_(True)
    mean = td.fused_mean_loss(pack, zg, idx, tgt, shape, table)
    mean.sum().backward()
    scores = td.grid_scores(pack, z[-1], idx[-1], tgt[-1], shape, table, chunk=max(1, K // 2 + 1))
    loss64, dz64, _ = _reference64(dec, z, idx, tgt, shape)
    out = dict(loss=rel_max(mean, loss64.mean(1)), grad=rel_rows(zg.grad, dz64),
               score=rel_max(scores, loss64[-1]))
    # the kernel's own specification at its precision (the "_emul" metrics)
    el, edz = td.fused_point_ref(dec.weights(), mc.latent_dim, mc.latent_in, z, idx, tgt, shape, table, precision)
    out.update(loss_emul=rel_max(mean, el.mean(1)), grad_emul=rel_rows(zg.grad, edz),
               score_emul=rel_max(scores, el[-1]))
    return out


def _grid_check(td, seed):
    import torch
    from ifad_fast import config as cfg
    mc = cfg.ModelConfig(latent_dim=8, hidden=48, n_layers=3, latent_in=2, n_freqs=3, n_classes=6, dropout=0.0)
    shape = (5, 6, 7)
    dec = random_decoder(mc, seed)
    pack = td.PackedDecoder(dec.weights(), mc.latent_dim, mc.n_freqs, mc.latent_in, "cpu", "float32")
    grid = grid_indices(shape)
    gen = torch.Generator().manual_seed(seed + 1)
    vol = torch.randint(0, mc.n_classes, shape, generator=gen, dtype=torch.uint8)
    tgt = vol[grid[:, 0], grid[:, 1], grid[:, 2]]                       # uint8, gathered
    z = torch.randn(mc.latent_dim, generator=gen)
    s, cls = td.grid_scores(pack, z, grid, tgt, shape, axis_encoding(shape, mc.n_freqs), chunk=97, classes=True)
    ref, _, logits = _reference64(dec, z[None], grid[None], tgt[None].long(), shape)
    return dict(score=rel_max(s, ref[0]), classes=_class_mismatch(cls, logits[0]))


def _class_mismatch(cls, logits):
    """Share of points whose class differs from the reference argmax, among points whose top
    two logits differ by more than 1e-4 (near-ties may flip with rounding)."""
    import torch
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    if cls.dtype != torch.uint8 or cls.shape != logits.shape[:1]:
        return math.inf
    return (cls.long() != logits.argmax(-1))[clear].double().mean().item()


def _backend_check(seed):
    import torch
    from ifad_fast import config as cfg
    from ifad_fast.backends import TorchBackend
    from ifad_fast.backends.triton import TritonBackend, triton_unavailable_reason
    mc = cfg.ModelConfig(latent_dim=16, hidden=64, n_layers=4, latent_in=2, n_freqs=4, dropout=0.0)
    dec = random_decoder(mc, seed)
    shape = (9, 8, 7)
    z, idx, tgt = random_batch(mc, shape, 2, 29, seed)
    assert triton_unavailable_reason("cpu") is None, triton_unavailable_reason("cpu")
    tb, rb = TritonBackend(dec, "cpu"), TorchBackend(dec, "cpu")
    assert tb.name == "triton"
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    la, lb = tb.mean_loss(za, idx, tgt, shape), rb.mean_loss(zb, idx, tgt, shape)
    (la * torch.tensor([1.0, -2.0])).sum().backward()          # per-scan grad_output scaling
    (lb * torch.tensor([1.0, -2.0])).sum().backward()
    sa, sb = tb.score(z[0], idx[0], tgt[0], shape), rb.score(z[0], idx[0], tgt[0], shape)
    assert sa.dtype == torch.float32 and sa.shape == (idx.shape[1],)
    sc, cls = tb.score_and_classes(z[1], idx[1], tgt[1], shape)
    ref_logits = rb.decoder.logits_at(z[1:2], idx[1:2], shape)[0]
    # the contract's input checks run before any launch (an index past the grid would read
    # outside the γ table)
    from ifad_fast.errors import IfadError
    bad = idx.clone()
    bad[1, 0, 2] = shape[2]
    try:
        tb.mean_loss(z, bad, tgt, shape)
        accepted = 1.0
    except IfadError:
        accepted = 0.0
    # the reason for a CPU device without the interpreter is one line
    env = dict(os.environ)
    os.environ.pop("TRITON_INTERPRET")
    try:
        why = triton_unavailable_reason("cpu")
    finally:
        os.environ.clear()
        os.environ.update(env)
    return dict(loss=rel_max(la, lb), grad=rel_rows(za.grad, zb.grad), score=rel_max(sa, sb),
                score_cls=rel_max(sc, rb.score(z[1], idx[1], tgt[1], shape)),
                classes=_class_mismatch(cls, ref_logits.double()),
                unavailable_cpu_without_env=0.0 if (why and "\n" not in why) else 1.0,
                bad_input_accepted=accepted)


def _slices_check(seed):
    """IF 2D restore_classes (slice latents as one batch, per-slice scoring) on the triton backend vs torch."""
    import dataclasses

    import numpy as np
    import torch
    from ifad_fast import config as cfg
    from ifad_fast.backends import TorchBackend
    from ifad_fast.model import Model
    from ifad_fast.restore import restore_classes
    from ifad_fast.backends.triton import TritonBackend
    mc = dataclasses.replace(cfg.get_preset("tiny-2d").model, n_classes=4)
    dec = random_decoder(mc, seed)
    model = Model(dec, torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=torch.float64),
                  cfg.PreprocessConfig(resolution=12), torch.zeros(2, mc.latent_dim))
    rng = np.random.default_rng(seed)
    brain = np.zeros((8, 7, 12), bool)
    brain[2:-2, 1:-1, 2:-1] = True
    classes = np.where(brain, rng.integers(0, 4, brain.shape), 0).astype(np.uint8)
    rc = cfg.RestoreConfig(phases=((4, 48),), seed=seed % 1000, brain_fraction=0.5, lr=1e-2, prior="none")
    a = restore_classes(model, classes, rc, TritonBackend(dec, "cpu"), "cpu", brain=brain)[0]
    b = restore_classes(model, classes, rc, TorchBackend(dec, "cpu"), "cpu", brain=brain)[0]
    return dict(z=rel_rows(torch.from_numpy(a.z), torch.from_numpy(b.z)),
                anomaly=rel_max(torch.from_numpy(a.anomaly), torch.from_numpy(b.anomaly)),
                # block 0's default slice 1 holds no brain: its brain slice nearest to it, 2, is restored
                slices=0.0 if a.slices.tolist() == b.slices.tolist() == [2, 5, 9] else 1.0)


def _worker(seed: int) -> None:
    import torch
    from ifad_fast import config as cfg
    from ifad_fast.kernels import triton_decoder as td
    assert td.interpreted(), "worker must run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    M = cfg.ModelConfig
    tiny = M(latent_dim=16, hidden=64, n_layers=4, latent_in=2, n_freqs=4, n_classes=10, dropout=0.0)
    # H=48: HR = 48-8-12 = 28 (layer 0 outputs 28: latent_in = 1), BLOCK_N != BLOCK_K, C=5
    odd1 = M(latent_dim=8, hidden=48, n_layers=3, latent_in=1, n_freqs=2, n_classes=5, dropout=0.0)
    # latent_in = n_layers-1 (Σδ_LI taken in the output layer's backward), H=40 -> padded 64, L=3
    odd2 = M(latent_dim=6, hidden=40, n_layers=5, latent_in=4, n_freqs=3, n_classes=7, dropout=0.0)
    wide = M(latent_dim=32, hidden=128, n_layers=4, latent_in=2, n_freqs=5, n_classes=10, dropout=0.0)
    T = td.TileConfig
    tile = dict(num_warps=1, num_stages=1)
    jobs = {
        "tiny_B2_K37_fp32": lambda s: _kernel_check(td, tiny, 2, 37, (7, 9, 11), s),
        "odd_B1_K1_li1_fp32": lambda s: _kernel_check(td, odd1, 1, 1, (3, 4, 5), s, config=T(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, **tile)),
        "odd_B2_K130_lilast_fp32": lambda s: _kernel_check(td, odd2, 2, 130, (10, 6, 13), s),
        "wide_B1_K37_h128_fp32": lambda s: _kernel_check(td, wide, 1, 37, (12, 11, 10), s, config=T(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, **tile)),
        "tiny_B2_K37_bf16": lambda s: _kernel_check(td, tiny, 2, 37, (7, 9, 11), s, "bf16"),
        "odd_B2_K130_lilast_bf16": lambda s: _kernel_check(td, odd2, 2, 130, (10, 6, 13), s, "bf16"),
        "grid_all_voxels_chunked_fp32": lambda s: _grid_check(td, s),
        "backend_vs_torch_fp32": lambda s: _backend_check(s),
        "if2d_restore_vs_torch_fp32": lambda s: _slices_check(s),
    }
    for j, (name, job) in enumerate(jobs.items()):
        try:
            res = job(seed + 1000 * j)
        except Exception as exc:
            res = dict(error=f"{type(exc).__name__}: {exc}")
        print("RESULT " + json.dumps(dict(name=name, seed=seed, **res)), flush=True)


# ------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    seed = base_seed()
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(seed)],
                          env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            out[r["name"]] = r
    return dict(results=out, seed=seed, rc=proc.returncode, stderr=proc.stderr[-3000:])


@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreted_kernel_matches_reference(results, name, record_property):
    r = results["results"].get(name)
    assert r is not None, f"no result for {name} (seed {results['seed']}): {results['stderr']}"
    record_property("errors", r)
    assert "error" not in r, f"{name} failed (seed {results['seed']}): {r['error']}"
    for metric, tol in CHECKS[name].items():
        v = r.get(metric)
        assert v is not None, f"{name}: {metric} missing"
        assert v == v and v <= tol, f"{name}: {metric} = {v:.3g} > {tol:g} (seed {results['seed']})"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]))
