import dataclasses

import numpy as np
import pytest
import torch

from ifad_fast import config as cfg
from ifad_fast.train import Trainer, latent_prior
from helpers import tiny_configs, tiny_trainer, toy_class_volumes


@pytest.mark.slow
def test_training_lowers_the_loss():
    t = tiny_trainer(toy_class_volumes(), epochs=30, lr_step_epochs=100)
    t.run(30, progress=False)
    losses = [row["loss"] for row in t.log]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


@pytest.mark.parametrize("prior", ["paper", "reference", "none"])
def test_resume_equals_uninterrupted(tmp_path, prior):
    vols = toy_class_volumes()
    full = tiny_trainer(vols, prior=prior, checkpoint_every=2)
    full.run(4, progress=False)

    first = tiny_trainer(vols, prior=prior, checkpoint_every=2)
    first.run(2, tmp_path, progress=False)
    resumed = tiny_trainer(vols, prior=prior, checkpoint_every=2)
    resumed.load(tmp_path)
    assert resumed.epoch == 2
    resumed.run(4, tmp_path, progress=False)

    for a, b in zip(full.decoder.state_dict().values(), resumed.decoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(full.latents, resumed.latents, rtol=0, atol=0)
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "loss.jsonl").read_text().count("\n") == 4


def test_seed_makes_runs_repeatable_and_differs_across_seeds():
    vols = toy_class_volumes()
    a, b, c = tiny_trainer(vols, seed=1), tiny_trainer(vols, seed=1), tiny_trainer(vols, seed=2)
    for t in (a, b, c):
        t.run(2, progress=False)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert not torch.equal(a.latents, c.latents)


def test_latent_priors():
    z = torch.randn(4, 16)
    tc = cfg.TrainConfig(sigma=0.1)
    torch.testing.assert_close(latent_prior(z, tc, 0, 100), (z * z).sum(1).mean() / (0.01 * 100))
    ref = dataclasses.replace(tc, prior="reference", norm_penalty=1e-2, norm_ramp_epochs=10)
    torch.testing.assert_close(latent_prior(z, ref, 5, 100), 1e-2 * 0.5 * z.norm(dim=1).mean())
    assert latent_prior(z, dataclasses.replace(tc, prior="none"), 0, 100).item() == 0.0


def test_reference_prior_bounds_latent_norm():
    t = tiny_trainer(toy_class_volumes(), prior="reference", max_norm=0.05, latent_init_std=1.0)
    t.run(1, progress=False)
    # rows are renormalised before each use; after one step they sit near the bound
    assert t.latents.detach().norm(dim=1).max() < 0.05 + 0.05


def test_train_command_sets_the_reference_prior_and_refuses_a_zero_bound(tmp_path, scan_dir, capsys):
    import json

    from ifad_fast.cli import main

    prep, common = tmp_path / "prep", ["--preset", "tiny", "--device", "cpu", "--epochs", "1", "-q"]
    assert main(["prepare", str(scan_dir), "-o", str(prep), "--preset", "tiny", "-q"]) == 0
    assert main(["train", str(prep), "-o", str(tmp_path / "ref"), "--prior", "reference", "--norm-penalty", "0.001",
                 "--norm-ramp-epochs", "20", "--max-latent-norm", "10", *common]) == 0
    saved = json.loads((tmp_path / "ref" / "config.json").read_text())["train"]
    assert (saved["prior"], saved["norm_penalty"], saved["norm_ramp_epochs"], saved["max_norm"]) == ("reference", 0.001, 20, 10.0)
    capsys.readouterr()
    assert main(["train", str(prep), "-o", str(tmp_path / "bad"), "--prior", "reference", "--max-latent-norm", "0",
                 *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_norm must be a positive number" in err[0], err
    assert not (tmp_path / "bad" / "model.pt").exists()


@pytest.mark.parametrize("dtype,dropout,tol", [(torch.float64, 0.0, 1e-10), (torch.float32, 0.0, 2e-5),
                                               (torch.float32, 0.3, 2e-5)])
def test_hoisted_step_equals_plain_autograd_step(dtype, dropout, tol):
    """Loss and every gradient (weight-norm g and v, biases, z) of the fast step vs Decoder.logits_at."""
    from ifad_fast.model import Decoder
    from ifad_fast.train import hoisted_logits, plain_logits

    mc = cfg.ModelConfig(latent_dim=12, hidden=48, n_layers=5, latent_in=3, n_freqs=3, n_classes=6, dropout=dropout)
    gen = torch.Generator().manual_seed(11)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        decoder = Decoder(mc).to(dtype).train()
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=dtype))
    shape = (9, 10, 11)
    z0 = torch.randn(3, mc.latent_dim, generator=gen, dtype=dtype) * 0.5
    idx = (torch.rand(3, 200, 3, generator=gen) * torch.tensor(shape)).long()
    targets = torch.randint(0, mc.n_classes, (3, 200), generator=gen)

    def loss_and_grads(fn):
        decoder.zero_grad(set_to_none=True)
        z = z0.clone().requires_grad_(True)
        torch.manual_seed(7)                                  # same dropout masks for both
        loss = torch.nn.functional.cross_entropy(fn(decoder, z, idx, shape).reshape(-1, mc.n_classes),
                                                 targets.reshape(-1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in decoder.parameters()] + [z.grad.clone()]

    ref_loss, ref_grads = loss_and_grads(plain_logits)
    loss, grads = loss_and_grads(hoisted_logits)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    assert len(grads) == len(ref_grads) == 3 * (mc.n_layers + 1) + 1
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())


@pytest.mark.slow
def test_bf16_training_loss_curve_tracks_float32():
    """The gate for precision='bf16': a 25-epoch loss curve within 1 % of float32's, epoch by epoch."""
    import warnings

    vols = toy_class_volumes(4)
    curves = {}
    for precision in ("float32", "bf16"):
        mc, tc, pc = tiny_configs()
        mc = dataclasses.replace(mc, dropout=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)       # emulated bf16 on this CPU: slow, not wrong
            t = Trainer(vols, mc, tc, pc, centres=np.linspace(0, 1, 4), precision=precision)
        t.run(25, progress=False)
        curves[precision] = np.array([row["loss"] for row in t.log])
    assert not np.array_equal(curves["bf16"], curves["float32"])     # bf16 was really used
    assert curves["float32"][-1] < 0.6 * curves["float32"][0]
    np.testing.assert_allclose(curves["bf16"], curves["float32"], rtol=1e-2)


def test_trainer_reads_memory_mapped_stacks_in_place(tmp_path):
    vols = toy_class_volumes()
    brains = (vols > 0).to(torch.uint8)
    np.save(tmp_path / "v.npy", vols.numpy())
    np.save(tmp_path / "b.npy", brains.numpy())
    mapped, mapped_brains = (np.load(tmp_path / name, mmap_mode="r") for name in ("v.npy", "b.npy"))
    mc, tc, pc = tiny_configs(brain_fraction=0.5)
    a = Trainer(mapped, mc, tc, pc, centres=np.linspace(0, 1, 4), brains=mapped_brains)
    b = Trainer(vols, mc, tc, pc, centres=np.linspace(0, 1, 4), brains=brains.bool())
    assert a.volumes.data_ptr() == mapped.ctypes.data                  # neither stack copied
    assert a.sampler.flat.data_ptr() == mapped_brains.ctypes.data
    a.run(2, progress=False)
    b.run(2, progress=False)
    assert [r["loss"] for r in a.log] == [r["loss"] for r in b.log]
