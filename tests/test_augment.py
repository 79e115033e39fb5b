"""Training augmentation (ifad_fast/augment.py): each formula against NumPy on fresh random inputs,
its statistics on phantoms, the targets of a step against a whole-volume NumPy reference, seeded
determinism, the Trainer with augmentation off (the run it always was) and on (resumes bit for
bit), prepare's intensities.npy and the CLI's refusal on a folder prepared without it."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from helpers import numpy_rng, toy_class_volumes
from ifad_fast import config as cfg
from ifad_fast import augment as aug
from ifad_fast.cli import main
from ifad_fast.dataset import INTENSITIES, MANIFEST, STACKS
from ifad_fast.errors import IfadError
from ifad_fast.kernels.numba_ops import assign_nearest, mode_pool3d
from ifad_fast.model import load_model
from ifad_fast.train import Trainer

ALL = ("contrast", "bias", "noise", "deform")
CENTRES = np.array([0.0, 0.2, 0.45, 0.7, 0.9])


def tc_with(**changes) -> cfg.TrainConfig:
    return dataclasses.replace(cfg.get_preset("tiny").train, **changes)


# ------------------------------------------------------------------ each formula against NumPy

def test_gamma_contrast_is_power_per_row():
    rng = numpy_rng(1)
    v, g = rng.uniform(0, 1, (3, 50)), np.exp(rng.normal(0, 0.5, 3))
    out = aug.gamma_contrast(torch.from_numpy(v), torch.from_numpy(g)).numpy()
    np.testing.assert_allclose(out, v ** g[:, None], rtol=1e-14, atol=0)


def np_bias_log(coords, coeffs, shape):
    """The log bias field written out: Σ a_k t_k over x, y, z, x², y², z², xy, xz, yz, each centred and
    scaled to unit variance over the grid's coordinates (np.linspace(-1, 1, n) per axis)."""
    axes = [np.linspace(-1, 1, n) for n in shape]
    sd = [a.std() for a in axes]
    sq_mean, sq_sd = [(a * a).mean() for a in axes], [(a * a).std() for a in axes]
    c = [coords[..., i] for i in range(3)]
    terms = [c[i] / sd[i] for i in range(3)] + [(c[i] ** 2 - sq_mean[i]) / sq_sd[i] for i in range(3)]
    terms += [c[i] * c[j] / (sd[i] * sd[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    return sum(k[..., None] * t for k, t in zip(np.moveaxis(coeffs, -1, 0), terms))


def test_bias_field_matches_numpy_formula():
    rng = numpy_rng(2)
    coords, coeffs, shape = rng.uniform(-1, 1, (4, 30, 3)), rng.normal(0, 0.2, (4, 9)), (12, 17, 9)
    out = aug.bias_field(torch.from_numpy(coords), torch.from_numpy(coeffs), shape).numpy()
    np.testing.assert_allclose(out, np.exp(np_bias_log(coords, coeffs, shape)), rtol=1e-12)


def np_hash_uniforms(key, lin):
    """hash_uniforms in uint64 arithmetic (products of 32-bit numbers fit: no overflow)."""
    m = np.uint64(0xFFFFFFFF)

    def mix(x):
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(0x7FEB352D)) & m
        x = x ^ (x >> np.uint64(15))
        x = (x * np.uint64(0x846CA68B)) & m
        return x ^ (x >> np.uint64(16))

    x = lin.astype(np.uint64)
    return [(mix((mix(x ^ np.uint64(k)) + np.uint64(k)) & m).astype(np.float64) + 0.5) / 2.0 ** 32 for k in key]


def test_hash_uniforms_match_uint64_numpy_and_normals_are_standard():
    rng = numpy_rng(3)
    key = rng.integers(0, 2 ** 32, 2)
    lin = rng.integers(0, 2 ** 27, 200_000)
    u1, u2 = aug.hash_uniforms(torch.tensor(key)[None], torch.from_numpy(lin)[None])
    r1, r2 = np_hash_uniforms(key, lin)
    np.testing.assert_array_equal(u1[0].numpy(), r1)
    np.testing.assert_array_equal(u2[0].numpy(), r2)
    n1, n2 = (n[0].numpy() for n in aug.hash_normals(torch.tensor(key)[None], torch.from_numpy(lin)[None]))
    rad = np.sqrt(-2 * np.log(r1))
    np.testing.assert_allclose(n1, rad * np.cos(2 * np.pi * r2), rtol=1e-12, atol=1e-12)
    for n in (n1, n2):                                   # N(0, 1): 200k samples, 5 standard errors
        assert abs(n.mean()) < 5 / math.sqrt(n.size) and abs(n.std() - 1) < 5 / math.sqrt(2 * n.size)
    assert abs(np.corrcoef(n1, n2)[0, 1]) < 5 / math.sqrt(n1.size)


def test_rician_matches_numpy_and_the_rice_distribution_on_a_constant_phantom():
    rng = numpy_rng(4)
    v, s = rng.uniform(0, 1, (2, 40)), rng.uniform(0, 0.1, 2)
    n1, n2 = rng.normal(size=(2, 40)), rng.normal(size=(2, 40))
    out = aug.rician(*(torch.from_numpy(a) for a in (v, s, n1, n2))).numpy()
    np.testing.assert_allclose(out, np.sqrt((v + s[:, None] * n1) ** 2 + (s[:, None] * n2) ** 2), rtol=1e-14)
    # a constant phantom ν = 0.3 with σ = 0.1, noise from the hash: mean and variance of Rice(ν/σ, σ)
    nu, sigma, n = 0.3, 0.1, 400_000
    key = torch.tensor([[12345, 67890]])
    a, b = aug.hash_normals(key, torch.arange(n)[None])
    out = aug.rician(torch.full((1, n), nu, dtype=torch.float64), torch.tensor([sigma]), a, b)[0].numpy()
    mean, var = stats.rice.stats(nu / sigma, scale=sigma, moments="mv")
    assert abs(out.mean() - mean) < 5 * math.sqrt(var / n)
    assert abs(out.var() / var - 1) < 0.01


def test_encode_nearest_is_the_encoders_rule_with_a_rows_own_centres():
    rng = numpy_rng(5)
    v = rng.uniform(-0.1, 1.1, (3, 500))
    v[0, :5] = [0.1, 0.325, 0.575, 0.8, 0.0]                 # midpoints of CENTRES: the lower class
    centres = np.stack([CENTRES, CENTRES + 0.01, np.sort(rng.uniform(0, 1, 5))])
    out = aug.encode_nearest(torch.from_numpy(v), torch.from_numpy(centres)).numpy()
    ref = np.argmin(np.abs(v[..., None] - centres[:, None, :]), -1)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out[0], assign_nearest(v[0], CENTRES))


def test_mode_of_counts_valid_neighbours_and_breaks_ties_low():
    rng = numpy_rng(6)
    classes, valid = rng.integers(0, 4, (2, 300, 8)), rng.uniform(size=(2, 300, 8)) < 0.8
    valid[..., 0] = True
    out = aug.mode_of(torch.from_numpy(classes), torch.from_numpy(valid), 4).numpy()
    counts = np.stack([((classes == c) & valid).sum(-1) for c in range(4)], -1)
    np.testing.assert_array_equal(out, counts.argmax(-1))                # argmax: the first (lower) on ties


def np_displacement(coords, freqs, phases, amps):
    u = np.zeros(coords.shape)
    for a in range(3):
        for m in range(freqs.shape[2]):
            arg = np.pi / 2 * np.einsum("bpj,bj->bp", coords, freqs[:, a, m]) + phases[:, a, m, None]
            u[..., a] += amps[:, a, m, None] * np.sin(arg)
    return u


def test_warp_matches_numpy_affine_plus_sine_modes():
    rng = numpy_rng(7)
    shape, b, p = (11, 13, 9), 2, 400
    idx = np.stack([rng.integers(0, s, (b, p)) for s in shape], -1)
    freqs = rng.integers(0, 3, (b, 3, 4, 3)).astype(float)
    phases, amps = rng.uniform(0, 6.3, (b, 3, 4)), rng.normal(0, 1.5, (b, 3, 4))
    affine = np.stack([np.eye(3) + rng.normal(0, 0.05, (3, 3)) for _ in range(b)])
    t = lambda a: torch.from_numpy(a)       # noqa: E731
    coords = idx * (2.0 / (np.array(shape) - 1)) - 1
    u = aug.displacement(t(coords), t(freqs), t(phases), t(amps)).numpy()
    np.testing.assert_allclose(u, np_displacement(coords, freqs, phases, amps), rtol=1e-12, atol=1e-12)
    q, inside = aug.warp(t(idx), shape, t(affine), t(freqs), t(phases), t(amps))
    c = (np.array(shape) - 1) / 2
    ref = np.round(np.einsum("bij,bpj->bpi", affine, idx - c) + c + u)
    ref_inside = ((ref >= 0) & (ref <= np.array(shape) - 1)).all(-1)
    np.testing.assert_array_equal(inside.numpy(), ref_inside)
    np.testing.assert_array_equal(q.numpy()[ref_inside], ref[ref_inside])
    assert ref_inside.mean() > 0.5 and not ref_inside.all()


# ----------------------------------------------------------------------- statistics on phantoms

def test_bias_field_log_sd_over_the_grid_is_the_asked_sd():
    tc = tc_with(augment=("bias",), augment_bias=0.25)
    s = 17
    idx = torch.stack(torch.meshgrid(*[torch.arange(s)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
    coords = aug.coords_of(idx, (s,) * 3)
    coeffs = torch.stack([aug.intensity_draw(tc, torch.from_numpy(CENTRES), e, 0, 0)["bias"] for e in range(300)])
    sds = torch.log(aug.bias_field(coords.expand(300, -1, -1), coeffs, (s,) * 3)).std(1, unbiased=False).numpy()
    rms = math.sqrt(np.mean(np.square(sds)))
    assert abs(rms / 0.25 - 1) < 0.07, rms                 # E[var] = sd²: 300 draws of 9 terms, 5 standard errors
    assert np.std(sds) > 0.02                              # the strength varies between draws


def test_gamma_draws_are_lognormal_and_map_quantiles():
    tc = tc_with(augment=("contrast",), augment_gamma=0.3, augment_centre_jitter=0.0)
    logs = np.array([math.log(aug.intensity_draw(tc, torch.from_numpy(CENTRES), e, v, 0)["gamma"].item())
                     for e in range(40) for v in range(50)])
    assert abs(logs.mean()) < 5 * 0.3 / math.sqrt(logs.size) and abs(logs.std() / 0.3 - 1) < 0.06
    values = numpy_rng(8).uniform(0, 1, 100_000)
    gamma = 1.7
    out = aug.gamma_contrast(torch.from_numpy(values)[None], torch.tensor([gamma], dtype=torch.float64))[0].numpy()
    q = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
    np.testing.assert_allclose(np.quantile(out, q, method="lower"), np.quantile(values, q, method="lower") ** gamma,
                               rtol=1e-12)                  # a monotone map moves order statistics
    np.testing.assert_allclose(np.quantile(out, q), q ** gamma, atol=0.01)   # uniform phantom: q^γ


def test_centre_jitter_keeps_order_and_background():
    tc = tc_with(augment=("contrast",), augment_centre_jitter=0.5)          # huge: the clamp holds
    for e in range(50):
        c = aug.intensity_draw(tc, torch.from_numpy(CENTRES), e, 0, 0)["centres"].numpy()
        assert c[0] == 0 and (np.diff(c) > 0).all() and not np.array_equal(c, CENTRES)


def test_deformation_rms_displacement_is_the_asked_amplitude_and_copy_zero_is_the_volume():
    tc = tc_with(augment=("deform",), augment_copies=2, augment_deform=3.0)
    s = 15
    idx = torch.stack(torch.meshgrid(*[torch.arange(s)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
    coords = aug.coords_of(idx, (s,) * 3)
    draws = [aug.deform_draw(tc, v, 1) for v in range(300)]
    u = aug.displacement(coords.expand(300, -1, -1), *(torch.stack([d[k] for d in draws])
                                                        for k in ("freqs", "phases", "amps")))
    assert abs(math.sqrt((u ** 2).sum(-1).mean().item()) / 3.0 - 1) < 0.1
    d0 = aug.deform_draw(tc, 7, 0)
    q, inside = aug.warp(idx, (s,) * 3, *(d0[k][None] for k in ("affine", "freqs", "phases", "amps")))
    assert inside.all() and torch.equal(q, idx)


# ------------------------------------------------------------- the targets of a step, end to end

def phantom(n=3, s=12, seed=9):
    """Intensities (n, s³) float16 of a smooth brain-like phantom, brains, classes = pool2(encode(I))."""
    rng = numpy_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s)] * 3, indexing="ij"))
    r = np.sqrt((g ** 2).sum(0))
    vols, brains = [], []
    for _ in range(n):
        brain = r < rng.uniform(0.7, 0.95)
        field = 0.5 + 0.35 * np.sin(3 * g[0] + rng.uniform(0, 6)) * np.cos(2 * g[1]) + 0.1 * rng.normal(size=r.shape)
        vols.append(np.where(brain, np.clip(field, 0, 1), 0).astype(np.float16))
        brains.append(brain)
    intens, brains = np.stack(vols), np.stack(brains)
    classes = np.stack([mode_pool3d(assign_nearest(v.astype(np.float32), CENTRES), 2, len(CENTRES)) for v in intens])
    return intens, brains, classes


def augmenter(tc, intens, brains, classes, pool=2):
    flat = lambda a: torch.from_numpy(np.ascontiguousarray(a)).reshape(len(a), -1)  # noqa: E731
    return aug.Augmenter(tc, flat(classes), flat(intens), flat(brains.astype(np.uint8)), intens.shape[1:],
                         CENTRES, pool, "cpu")


def reference_targets(tc, intens, brains, classes, epoch, v, c, idx, pool=2):
    """The whole augmented volume in NumPy (then numba's encode rule and mode pool), read at the warp."""
    s = intens.shape[1:]
    d = {k: t.numpy() for k, t in aug.intensity_draw(tc, torch.from_numpy(CENTRES), epoch, v, c).items()}
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in s], indexing="ij"), -1)
    if aug.uses_intensities(tc.augment):
        x = grid * (2.0 / (np.array(s) - 1)) - 1
        values = intens[v].astype(np.float64) ** d["gamma"]
        values = values * np.exp(np_bias_log(x, d["bias"], s))
        lin = np.arange(np.prod(s)).reshape(s)
        r1, r2 = np_hash_uniforms(d["key"], lin)
        rad, s_ = np.sqrt(-2 * np.log(r1)), d["sigma"]
        noisy = np.sqrt((values + s_ * rad * np.cos(2 * np.pi * r2)) ** 2 + (s_ * rad * np.sin(2 * np.pi * r2)) ** 2)
        values = np.where(brains[v], noisy, values)
        cls = np.argmin(np.abs(values[..., None] - d["centres"]), -1).astype(np.uint8)
        table = mode_pool3d(cls, pool, len(CENTRES))
    else:
        table = classes[v]
    w = {k: t.numpy() for k, t in aug.deform_draw(tc, v, c).items()}
    centre = (np.array(s) - 1) / 2
    coords = idx * (2.0 / (np.array(s) - 1)) - 1
    q = np.round((idx - centre) @ w["affine"].T + centre
                 + np_displacement(coords[None], w["freqs"][None], w["phases"][None], w["amps"][None])[0])
    inside = ((q >= 0) & (q <= np.array(s) - 1)).all(-1)
    q = np.where(inside[:, None], q, 0).astype(int)
    return np.where(inside, table[q[:, 0], q[:, 1], q[:, 2]], 0)


@pytest.mark.parametrize("kinds", [("contrast",), ("bias",), ("noise",), ("deform",), ALL])
def test_step_targets_equal_the_whole_volume_numpy_reference(kinds):
    intens, brains, classes = phantom()
    tc = tc_with(augment=kinds, augment_copies=2 if "deform" in kinds else 1, augment_gamma=0.4,
                 augment_centre_jitter=0.03, augment_bias=0.3, augment_noise=0.08, augment_deform=2.5,
                 augment_rotate=8.0 if "deform" in kinds else 0.0, augment_scale=0.05 if "deform" in kinds else 0.0)
    a = augmenter(tc, intens, brains, classes)
    rng = numpy_rng(10)
    idx = torch.from_numpy(rng.integers(0, 12, (4, 600, 3)))
    vols, copies = torch.tensor([2, 0, 1, 2]), torch.tensor([1, 0, 1, 0] if "deform" in kinds else [0] * 4)
    out = a.targets(5, vols, copies, idx).numpy()
    for row, (v, c) in enumerate(zip(vols.tolist(), copies.tolist())):
        ref = reference_targets(tc, intens, brains, classes, 5, v, c, idx[row].numpy())
        np.testing.assert_array_equal(out[row], ref)
    plain = classes[vols.numpy()[:, None], idx[..., 0], idx[..., 1], idx[..., 2]]
    changed = (out != plain).mean()
    assert 0.01 < changed < 0.6, changed                   # it does something, and not everything


def test_zero_strength_intensity_targets_are_the_prepared_classes():
    """γ = 1, no jitter, no field, no noise: encode + the backward 2³ mode pool give prepare's classes
    exactly (intensities on a 2⁻¹⁰ lattice: float16 holds them exactly)."""
    intens, brains, _ = phantom()
    intens = (np.round(intens.astype(np.float64) * 1024) / 1024 + 1 / 4096).astype(np.float16)
    classes = np.stack([mode_pool3d(assign_nearest(v.astype(np.float32), CENTRES), 2, 5) for v in intens])
    tc = tc_with(augment=("contrast", "bias", "noise"), augment_gamma=0.0, augment_centre_jitter=0.0,
                 augment_bias=0.0, augment_noise=0.0)
    idx = torch.stack(torch.meshgrid(*[torch.arange(12)] * 3, indexing="ij"), -1).reshape(1, -1, 3).repeat(3, 1, 1)
    out = augmenter(tc, intens, brains, classes).targets(0, torch.arange(3), torch.zeros(3, dtype=torch.long), idx)
    np.testing.assert_array_equal(out.reshape(3, 12, 12, 12).numpy(), classes)


def test_targets_are_seeded_by_seed_epoch_volume_and_copy_not_by_the_batch():
    intens, brains, classes = phantom()
    tc = tc_with(augment=ALL, augment_copies=3)
    idx = torch.from_numpy(numpy_rng(11).integers(0, 12, (3, 500, 3)))
    vols, copies = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1])
    a = augmenter(tc, intens, brains, classes)
    first = a.targets(3, vols, copies, idx)
    assert torch.equal(first, augmenter(tc, intens, brains, classes).targets(3, vols, copies, idx))   # same seed
    for row in range(3):                             # alone, in another batch, or a process's share of the points
        alone = a.targets(3, vols[row:row + 1], copies[row:row + 1], idx[row:row + 1, 100:350])
        assert torch.equal(alone[0], first[row, 100:350])
    assert not torch.equal(first, a.targets(4, vols, copies, idx))                                # epoch
    other = augmenter(dataclasses.replace(tc, seed=1), intens, brains, classes)
    assert not torch.equal(first, other.targets(3, vols, copies, idx))                            # seed
    # the warp is fixed per (volume, copy): deform alone gives the same targets in every epoch
    warp_only = augmenter(tc_with(augment=("deform",), augment_copies=3), intens, brains, classes)
    assert torch.equal(warp_only.targets(0, vols, copies, idx), warp_only.targets(9, vols, copies, idx))
    assert not torch.equal(warp_only.targets(0, vols, copies, idx), warp_only.targets(0, vols, copies[[1, 2, 0]], idx))


# ------------------------------------------------------------------------------ the trainer

def tiny_trainer(classes, brains, intens=None, **train):
    p = cfg.get_preset("tiny")
    mc = dataclasses.replace(p.model, n_classes=len(CENTRES), dropout=0.1)
    tc = dataclasses.replace(p.train, brain_fraction=0.5, checkpoint_every=2, **train)
    pc = dataclasses.replace(p.preprocess, resolution=classes.shape[1])
    return Trainer(classes, mc, tc, pc, centres=CENTRES, brains=brains, intensities=intens, mode_pool=2)


def test_augmentation_off_is_the_run_without_the_fields():
    """augment = () with every strength changed trains exactly as a config that never set them."""
    intens, brains, classes = phantom()
    plain = tiny_trainer(classes, brains)
    off = tiny_trainer(classes, brains, intens, augment=(), augment_gamma=0.9, augment_bias=0.5, augment_noise=0.2,
                       augment_deform=5.0, augment_rotate=10.0, augment_centre_jitter=0.1)
    for t in (plain, off):
        t.run(2, progress=False)
    assert [r["loss"] for r in plain.log] == [r["loss"] for r in off.log]
    for a, b in zip(plain.decoder.state_dict().values(), off.decoder.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(plain.latents, off.latents) and off.augmenter is None
    assert plain.data == off.data and "intensities" not in json.dumps(off.data)   # older checkpoints resume
    on = tiny_trainer(classes, brains, intens, augment=("contrast",))
    on.run(2, progress=False)
    assert [r["loss"] for r in on.log] != [r["loss"] for r in plain.log]
    assert on.data != plain.data                                    # the intensities are recorded


def test_training_without_augmentation_repeats_the_run_from_before_augmentation_existed():
    """2 epochs on toy class volumes (tiny preset, 4 classes, dropout 0.1, half the points in the brain):
    the loss log and the weight/latent digest that ifad-fast gave before TrainConfig had augmentation
    fields (commit 63f08b6, recorded on the development machine, where they are equal bit for bit).
    Augmentation off must draw no other random number: a changed draw moves these by far more than
    the tolerance, which only absorbs float differences between CPUs' matmul kernels."""
    torch.manual_seed(0)
    vols = toy_class_volumes()
    p = cfg.get_preset("tiny")
    mc = dataclasses.replace(p.model, n_classes=4, dropout=0.1)
    tc = dataclasses.replace(p.train, brain_fraction=0.5)
    t = Trainer(vols, mc, tc, dataclasses.replace(p.preprocess, resolution=12), centres=np.linspace(0, 1, 4),
                brains=vols > 0)
    t.run(2, progress=False)
    np.testing.assert_allclose([r["loss"] for r in t.log], [1.4424729744593303, 1.3851583003997803], rtol=1e-6)
    np.testing.assert_allclose(t.checksum(), 281.87737974934913, rtol=1e-6)


@pytest.mark.slow
def test_resume_mid_training_with_augmentation_equals_the_uninterrupted_run(tmp_path):
    intens, brains, classes = phantom()
    kw = dict(augment=ALL, augment_copies=2, augment_rotate=5.0)
    full = tiny_trainer(classes, brains, intens, **kw)
    full.run(4, progress=False)
    first = tiny_trainer(classes, brains, intens, **kw)
    first.run(2, tmp_path, progress=False)
    resumed = tiny_trainer(classes, brains, intens, **kw)
    resumed.load(tmp_path)
    assert resumed.epoch == 2
    resumed.run(4, tmp_path, progress=False)
    for a, b in zip(full.decoder.state_dict().values(), resumed.decoder.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(full.latents, resumed.latents) and full.latents.shape[0] == 2 * len(classes)
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]
    model = load_model(tmp_path / "model.pt")                       # the settings travel in the model file
    assert model.train.augment == ALL and model.train.augment_copies == 2 and model.train.augment_rotate == 5.0


def test_trainer_and_config_refusals():
    intens, brains, classes = phantom()
    with pytest.raises(IfadError, match="prepare"):
        tiny_trainer(classes, brains, None, augment=("noise",))
    tiny_trainer(classes, brains, None, augment=("deform",), augment_copies=2)    # the warp reads classes only
    for bad in (dict(augment=("blur",)), dict(augment=("bias", "bias")), dict(augment=("deform",)),
                dict(augment_copies=2), dict(augment=("bias",), augment_bias=-0.1), dict(augment_copies=0)):
        with pytest.raises(IfadError):
            tc_with(**bad)
    p = cfg.get_preset("tiny-2d")
    with pytest.raises(IfadError, match="3D"):
        Trainer(classes, dataclasses.replace(p.model, n_classes=5), tc_with(augment=ALL, augment_copies=2),
                dataclasses.replace(p.preprocess, resolution=12), CENTRES, brains=brains, intensities=intens)
    for name, preset in cfg.PRESETS.items():                        # off in every preset
        assert preset.train.augment == () and preset.train.augment_copies == 1, name
    assert aug.parse_kinds("none") == () and aug.parse_kinds("noise,contrast") == ("contrast", "noise")


# ---------------------------------------------------------------------------- prepare and CLI

def test_prepare_stores_the_intensities_the_classes_were_encoded_from(tmp_path, scan_dir):
    from ifad_fast.preprocess import IntensityEncoder, to_model_grid
    from ifad_fast.io import load_scan, find_scans

    out = tmp_path / "prep"
    assert main(["prepare", str(scan_dir), "-o", str(out), "--preset", "tiny", "--classes", "6", "-q"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    stack = np.load(out / INTENSITIES)
    classes = np.load(out / STACKS["classes"])
    assert manifest["intensities"] == INTENSITIES and stack.dtype == np.float16 and stack.shape == classes.shape
    pc = cfg.get_preset("tiny").preprocess
    encoder = IntensityEncoder(manifest["centres"])
    for i, path in enumerate(find_scans([scan_dir])):
        volume = to_model_grid(load_scan(path).data, load_scan(path).affine, pc)[0]
        np.testing.assert_allclose(stack[i], volume, atol=2 ** -11)             # float16 of the model-grid volume
        again = mode_pool3d(encoder.encode(stack[i].astype(np.float32)), manifest["mode_pool"], 6)
        assert (again == classes[i]).mean() > 0.99                             # float16 rounding at boundaries


def test_intensity_augmentation_on_a_folder_prepared_without_intensities_is_one_error_line(tmp_path, scan_dir,
                                                                                          capsys):
    prep, common = tmp_path / "prep", ["--preset", "tiny", "--device", "cpu", "--epochs", "2", "-q"]
    assert main(["prepare", str(scan_dir), "-o", str(prep), "--preset", "tiny", "--classes", "10", "-q"]) == 0
    assert main(["train", str(prep), "-o", str(tmp_path / "new"), "--augment", "contrast,noise,deform",
                 "--augment-copies", "2", *common]) == 0
    saved = json.loads((tmp_path / "new" / "config.json").read_text())["train"]
    assert saved["augment"] == ["contrast", "noise", "deform"] and saved["augment_copies"] == 2
    (prep / INTENSITIES).unlink()                                   # as prepared by an older version
    manifest = json.loads((prep / MANIFEST).read_text())
    del manifest["intensities"]
    (prep / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["train", str(prep), "-o", str(tmp_path / "run"), "--augment", "bias", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ifad-fast train: error: ") and "ifad-fast prepare" in err[0], err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert main(["train", str(prep), "-o", str(tmp_path / "warp"), "--augment", "deform", "--augment-copies", "2",
                 *common]) == 0                                      # the warp alone reads the classes
    assert main(["train", str(prep), "-o", str(tmp_path / "off"), *common]) == 0
    capsys.readouterr()
    assert main(["train", str(prep), "-o", str(tmp_path / "bad"), "--augment", "blur", *common]) == 2
    assert "unknown augmentation 'blur'" in capsys.readouterr().err


def test_prepare_counts_and_allocates_the_intensity_stack_like_the_others(tmp_path, scan_dir, monkeypatch, capsys):
    """The disk check asks room for intensities.npy too (2 bytes a voxel beside the two uint8 stacks); without
    posix_fallocate (macOS) the blocks are written as zeros first and the stack comes out the same."""
    import os
    import shutil

    assert main(["prepare", str(scan_dir), "-o", str(tmp_path / "a"), "--preset", "tiny", "-q"]) == 0
    voxels = np.load(tmp_path / "a" / STACKS["classes"], mmap_mode="r").size
    low = shutil._ntuple_diskusage(1 << 30, (1 << 30) - 3 * voxels, 3 * voxels)   # room for the uint8 stacks only
    with monkeypatch.context() as m:
        m.setattr("ifad_fast.dataset.shutil.disk_usage", lambda p: low)
        capsys.readouterr()
        assert main(["prepare", str(scan_dir), "-o", str(tmp_path / "b"), "--preset", "tiny", "-q"]) == 2
        err = capsys.readouterr().err
        assert "no space left" in err and INTENSITIES in err
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    assert main(["prepare", str(scan_dir), "-o", str(tmp_path / "c"), "--preset", "tiny", "-q"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a" / INTENSITIES), np.load(tmp_path / "c" / INTENSITIES))


def test_a_2d_model_trains_with_intensity_augmentation_per_volume():
    intens, brains, classes = phantom()
    p = cfg.get_preset("tiny-2d")
    tc = dataclasses.replace(p.train, augment=("contrast", "bias", "noise"))
    mc, pc = dataclasses.replace(p.model, n_classes=5), dataclasses.replace(p.preprocess, resolution=12)
    t = Trainer(classes, mc, tc, pc, CENTRES, brains=brains, intensities=intens, mode_pool=2)
    t.run(1, progress=False)
    plain = Trainer(classes, mc, p.train, pc, CENTRES, brains=brains)
    plain.run(1, progress=False)
    assert len(t.latents) == len(plain.latents) and math.isfinite(t.log[0]["loss"])
    assert t.log[0]["loss"] != plain.log[0]["loss"]
