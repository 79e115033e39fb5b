"""Less work per scan at the same answer: the adaptive score grid and the search that stops when it
has levelled off (restore.score_grid_adaptive, restore.converged), each against the plain path.

Tolerances: log_probs of the cpu backend against the torch reference 1e-5 relative (float32, the
same bound as the scores in test_fast_backend); exp(log_probs) sums to 1 within 1e-5; the
interpolation against a NumPy reference 1e-6 absolute (float32 weights); wherever the adaptive grid
refines, its anomaly map equals the full grid's within 1e-6 (prefix sums in float64 over voxels of
both kinds).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import RANDOM_MC, base_seed, grid_indices, random_batch, random_decoder, random_model, rel_max, seed_note
from ifad_fast import config as cfg
from ifad_fast.backends import TorchBackend
from ifad_fast.errors import IfadError
from ifad_fast.backends.fast import FastBackend
from ifad_fast.restore import (anomaly_map, converged, dilate, interpolated_log_probs, lattice_axis, optimise_latents,
                               pool_reach, refine_near, restore_classes, score_grid, score_grid_adaptive)

MC = cfg.ModelConfig(latent_dim=8, hidden=32, n_layers=4, latent_in=2, n_freqs=3, n_classes=5)


@pytest.mark.parametrize("shape", [(7, 9, 6), (12, 5, 11)])
def test_log_probs_match_the_reference_and_the_scores(shape):
    dec = random_decoder(MC, base_seed())
    z, idx, targets = random_batch(MC, shape, 1, 300, base_seed() + 1)
    ref = TorchBackend(dec).log_probs(z[0], idx[0], shape)
    fast = FastBackend(dec, chunk=128).log_probs(z[0], idx[0], shape)
    assert fast.shape == (300, MC.n_classes) and fast.dtype == torch.float32
    assert rel_max(fast, ref) < 1e-5, seed_note()
    assert torch.allclose(fast.exp().sum(1), torch.ones(300), atol=1e-5)
    for backend in (TorchBackend(dec), FastBackend(dec, chunk=128)):      # -log P(t) is the score, bit for bit
        lp = backend.log_probs(z[0], idx[0], shape)
        assert torch.equal(-lp.gather(1, targets[0][:, None])[:, 0], backend.score(z[0], idx[0], targets[0], shape))


def test_log_probs_check_their_inputs():
    backend = FastBackend(random_decoder(MC, base_seed()))
    with pytest.raises(IfadError, match="out of range"):
        backend.log_probs(torch.zeros(MC.latent_dim), torch.tensor([[0, 0, 9]]), (4, 4, 4))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9])
def test_lattice_axis_brackets_every_voxel(n):
    ax = lattice_axis(n).tolist()
    assert ax[0] == 0 and ax[-1] == n - 1 and ax == sorted(set(ax))
    assert all(b - a <= 2 for a, b in zip(ax, ax[1:]))


@pytest.mark.parametrize("shape", [(6, 7, 5), (9, 4, 1), (2, 3, 8)])
def test_interpolation_matches_numpy_and_is_exact_on_the_lattice(shape):
    rng = np.random.default_rng(base_seed())
    axes = [lattice_axis(s).numpy() for s in shape]
    lat = rng.normal(size=(len(axes[0]), len(axes[1]), len(axes[2]), 3)).astype(np.float32)
    coords = grid_indices(shape)
    out = interpolated_log_probs(torch.from_numpy(lat), coords, shape).numpy()
    # reference: separable np.interp along each axis of the lattice
    ref = lat
    for a in range(3):
        ref = np.apply_along_axis(lambda v, a=a: np.interp(np.arange(shape[a]), axes[a], v), a, ref)
    ref = ref.reshape(-1, 3)
    assert np.abs(out - ref).max() < 1e-6, seed_note()
    on = np.isin(coords[:, 0], axes[0]) & np.isin(coords[:, 1], axes[1]) & np.isin(coords[:, 2], axes[2])
    ix = [np.searchsorted(axes[a], coords[on, a].numpy()) for a in range(3)]
    assert np.array_equal(out[on], lat[ix[0], ix[1], ix[2]])


def _scan(shape=(16, 14, 12), seed=0):
    """Classes (X, Y, Z) uint8 with a ball of brain, its brain mask and a region around it."""
    rng = np.random.default_rng(base_seed() + seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (g ** 2).sum(0) < 0.7
    classes = np.where(brain, rng.integers(1, MC.n_classes, shape), 0).astype(np.uint8)
    return torch.from_numpy(classes), torch.from_numpy(brain)


def test_adaptive_grid_refined_everywhere_is_the_full_grid():
    backend = FastBackend(random_decoder(MC, base_seed()))
    classes, brain = _scan()
    region = dilate(brain, 2)
    z = torch.randn(MC.latent_dim) * 0.5
    full, full_cls = score_grid(backend, z, classes, region)
    adaptive, cls, n = score_grid_adaptive(backend, z, classes, region, lambda s: torch.ones_like(region))
    # the same voxels in chunks of another size: equal up to float32 rounding (a CPU GEMM may block
    # its sums by the batch size; seen on AVX-512, 2.4e-7 on scores up to 2.4)
    torch.testing.assert_close(adaptive, full, rtol=1e-6, atol=1e-6)
    assert torch.equal(cls, full_cls)
    assert n >= int(region.sum())                      # the lattice, then every other voxel of the region


def test_adaptive_grid_is_exact_where_it_refines_and_does_less_work():
    backend = FastBackend(_sharp_decoder())
    _, brain = _scan(shape=(24, 22, 20))
    rc = cfg.RestoreConfig(min_pool=3, avg_pool=5, refine_margin=0.1)
    region = dilate(brain, pool_reach(rc))
    z = torch.randn(MC.latent_dim) * 0.5
    # a scan that is the decoder's own restoration but for a 4-voxel cube of another class: a lesion
    restored = score_grid(backend, z, torch.zeros_like(brain, dtype=torch.uint8), None)[1]
    classes = torch.where(brain, restored, torch.zeros_like(restored))
    lesion = (slice(8, 12), slice(9, 13), slice(8, 12))
    classes[lesion] = (classes[lesion].long() + 2).remainder(MC.n_classes).clamp(min=1).to(torch.uint8)
    full, _ = score_grid(backend, z, classes, region)
    exact_map = anomaly_map(full, brain, rc, "brain")
    threshold = float(exact_map[brain].quantile(0.9))
    rule = refine_near(brain, rc, threshold, "brain")
    scores, _, n = score_grid_adaptive(backend, z, classes, region, rule)
    assert n < int(region.sum()), "the adaptive grid evaluated the decoder at least as often as the full grid"
    approx_map = anomaly_map(scores, brain, rc, "brain")
    # the voxels whose (interpolated) map reached the margin: every raw score in their window is exact
    refined = anomaly_map(_interpolated_only(backend, z, classes, region), brain, rc, "brain") >= 0.9 * threshold
    assert refined.any()
    assert (approx_map[refined] - exact_map[refined]).abs().max() < 1e-6
    on = lambda m: (m >= threshold) & refined                         # noqa: E731
    assert torch.equal(on(approx_map), on(exact_map))


def _sharp_decoder():
    """A random decoder whose logits are 20x larger: confident, as a trained one, so that a scan
    equal to its restoration scores low and a lesion high."""
    dec = random_decoder(MC, base_seed())
    with torch.no_grad():
        dec.layers[-1].parametrizations.weight.original0.mul_(20.0)
        dec.layers[-1].bias.mul_(20.0)
    return dec


def _interpolated_only(backend, z, classes, region):
    """The scores of the adaptive grid before any refinement."""
    return score_grid_adaptive(backend, z, classes, region, lambda s: torch.zeros_like(region))[0]


def test_adaptive_grid_follows_the_threshold_through_restore_classes():
    model = random_model(base_seed())
    rng = np.random.default_rng(base_seed())
    classes = rng.integers(0, RANDOM_MC.n_classes, (20, 20, 20)).astype(np.uint8)
    rc = cfg.RestoreConfig(phases=((3, 256),), grid="adaptive", avg_pool=5)
    full = restore_classes(model, classes, cfg.replace(rc, grid="full"), "cpu", "cpu")[0]
    no_threshold = restore_classes(model, classes, rc, "cpu", "cpu")[0]
    assert np.array_equal(no_threshold.anomaly, full.anomaly)              # no decision range: the full grid
    low = restore_classes(model, classes, rc, "cpu", "cpu", threshold=0.0)[0]
    np.testing.assert_allclose(low.score, full.score, rtol=1e-6, atol=1e-6)  # everything can cross 0 (to rounding)
    assert low.scored_voxels >= full.scored_voxels                          # the lattice came first



def test_converged_reads_whole_windows():
    flat = torch.full((20, 2), 1.5)
    assert converged(flat, 5, 0.01) and converged(flat, 10, 0.0)
    assert not converged(flat[:9], 5, 0.01)                # fewer than two windows
    assert not converged(flat[:12], 5, 0.01)               # not at a window's end
    falling = torch.linspace(2.0, 1.0, 20)[:, None].repeat(1, 2)
    assert not converged(falling, 5, 0.01)
    one_falls = flat.clone()
    one_falls[15:, 1] = 1.0                                 # the batch stops only when every latent has
    assert not converged(one_falls, 5, 0.01)


def test_search_stops_early_on_a_level_loss_and_not_otherwise():
    backend = FastBackend(random_decoder(MC, base_seed()))
    classes, brain = _scan()
    z0 = torch.zeros(1, MC.latent_dim)
    still = cfg.RestoreConfig(phases=((40, 64), (30, 128)), lr=0.0, prior="none", stop_tol=0.5, stop_window=5)
    z, trace = optimise_latents(backend, classes[None], z0, still, torch.Generator().manual_seed(0), brain=brain[None])
    assert trace.shape == (20, 1)                           # two windows per phase, then the next phase
    assert torch.equal(z, z0)
    never = cfg.replace(still, stop_tol=0.0)
    _, trace = optimise_latents(backend, classes[None], z0, never, torch.Generator().manual_seed(0), brain=brain[None])
    assert trace.shape == (70, 1)


@pytest.mark.parametrize("field,value", [("grid", "coarse"), ("refine_margin", 1.0), ("refine_margin", True),
                                         ("stop_tol", -0.1), ("stop_window", 0), ("stop_window", 2.5)])
def test_restore_config_refuses_bad_settings(field, value):
    with pytest.raises(IfadError):
        cfg.RestoreConfig(**{field: value})


def test_the_paper_protocol_scores_the_full_grid_and_runs_every_step():
    rc = cfg.RestoreConfig(**cfg.SCHEDULES["paper"])
    assert rc.grid == "full" and rc.stop_tol == 0.0


def test_cli_grid_option(tiny_run, tmp_path, capsys):
    import json

    from helpers import FAST, cli, one_error_line, scan

    case = scan(tmp_path, "case", lesion=True)
    model = tiny_run / "run" / "model.pt"
    code, _, err = cli(capsys, "restore", case, "-m", model, "-o", tmp_path / "paper", "--protocol", "paper",
                       "--grid", "adaptive")
    assert code == 2 and "--grid" in one_error_line(err, "restore")
    assert not (tmp_path / "paper").exists()
    code, _, err = cli(capsys, "restore", case, "-m", model, "-o", tmp_path / "out", "--grid", "adaptive",
                       "--threshold", "0.5", *FAST)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "case_restore.json").read_text())
    assert summary["restore"]["grid"] == "adaptive" and summary["scored_voxels"] > 0
    # the tiny run's model stores no threshold: asked for without one, the grid is the full one, and it says so
    code, _, err = cli(capsys, "restore", case, "-m", model, "-o", tmp_path / "full", "--grid", "adaptive", *FAST)
    assert code == 0 and "scoring the full grid" in err and "--threshold" in err, err
    again = json.loads((tmp_path / "full" / "case_restore.json").read_text())
    code, _, err = cli(capsys, "restore", case, "-m", model, "-o", tmp_path / "plain", "--grid", "full", *FAST)
    assert code == 0 and "scoring the full grid" not in err
    plain = json.loads((tmp_path / "plain" / "case_restore.json").read_text())
    assert again["scored_voxels"] == plain["scored_voxels"]


def test_latent_adam_is_torchs_adam_number_for_number():
    from ifad_fast.restore import LatentAdam

    g = torch.Generator().manual_seed(base_seed())
    z0 = torch.randn(3, 16, generator=g)
    ours, theirs = z0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    a, b = LatentAdam(ours, 1e-2), torch.optim.Adam([theirs], lr=1e-2)
    for step in range(60):
        grad = torch.randn(3, 16, generator=g) * (0.1 + step % 7)
        if step == 30:                                           # a new phase: the learning rate decays
            for opt in (a, b):
                opt.param_groups[0]["lr"] *= 0.3
        for opt, z in ((a, ours), (b, theirs)):
            opt.zero_grad(set_to_none=True)
            (z * grad).sum().backward()
            opt.step()
        assert torch.equal(ours, theirs), (step, seed_note())
    assert ours.grad is not None and (a.zero_grad(), ours.grad)[1] is None


def test_the_search_on_the_cpu_does_not_import_dynamo():
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from ifad_fast.restore import _adam\n"
            "z = torch.zeros(4, requires_grad=True); opt = _adam(z, 1e-2, 'default', False)\n"
            "z.sum().backward(); opt.step()\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_a_backend_without_log_probs_says_so_and_the_grid_falls_back_to_full():
    from ifad_fast.backends import Backend
    from ifad_fast.restore import restore_batch

    class ScoresOnly(Backend):           # as the triton backend: scores, no per-class log-probabilities
        name = "scores-only"

        def __init__(self, decoder):
            super().__init__(decoder)
            self.inner = FastBackend(decoder)

        def _mean_loss(self, z, idx, targets, shape):
            return self.inner._mean_loss(z, idx, targets, shape)

        def _score(self, z, idx, targets, shape, out):
            return self.inner._score(z, idx, targets, shape, out)

        def _score_and_classes(self, z, idx, targets, shape):
            return self.inner._score_and_classes(z, idx, targets, shape)

    model = random_model(base_seed())
    backend = ScoresOnly(model.decoder)
    assert not backend.has_log_probs and FastBackend(model.decoder).has_log_probs
    with pytest.raises(IfadError, match="--grid full"):
        backend.log_probs(torch.zeros(RANDOM_MC.latent_dim), torch.zeros(1, 3, dtype=torch.long), (4, 4, 4))
    rng = np.random.default_rng(base_seed())
    classes = torch.from_numpy(rng.integers(0, RANDOM_MC.n_classes, (1, 20, 20, 20)).astype(np.uint8))
    rc = cfg.RestoreConfig(phases=((2, 128),), grid="adaptive", avg_pool=5)
    adaptive = restore_batch(backend, model, classes, rc, torch.Generator().manual_seed(0), threshold=0.0)
    full = restore_batch(backend, model, classes, cfg.replace(rc, grid="full"), torch.Generator().manual_seed(0))
    assert torch.equal(adaptive.anomaly, full.anomaly) and torch.equal(adaptive.scored, full.scored)

