"""What the tests share: the random seed, random decoders and batches, relative errors.

Seed: every test that draws random inputs derives them from `base_seed()`, which is
IFAD_TEST_SEED when set and DEFAULT_SEED otherwise, so a CI run is reproducible and
`IFAD_TEST_SEED=<int> pytest ...` replays (or varies) one. conftest.py also seeds torch's and
NumPy's global generators with it before every test, prints it in the session header, and adds
it to the report of every failed test.

Also here, so that no test file imports another: toy scans on disk (`toy_brain`,
`write_nifti`, `scan`), the CLI runner and its checks (`cli`, `one_error_line`, `leftovers`,
`outputs_of`, `digests`, `bad_model`), world-space toy brains (`world_of`, `acquisition`,
`brain_image`, `train_world_model`), small training and restoring set-ups
(`toy_class_volumes`, `tiny_configs`, `tiny_trainer`, `random_model`, `toy_scans`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ifad_fast import config as cfg
from ifad_fast.model import Decoder, Model
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


# --------------------------------------------------------------------------- toy scans on disk

# ~6 mm voxels: the toy brains (~30 voxels, an ellipsoid of 0.8 of the box) are adult-sized
# (~150 mm), so they fit the physical frame of the `tiny` preset (192 mm) as real brains do.
AFFINE = np.array([[6.0, 0.0, 0.0, -90.0],
                   [0.0, 5.5, 0.0, -95.0],
                   [0.0, 0.0, 6.5, -80.0],
                   [0.0, 0.0, 0.0, 1.0]])


def toy_brain(seed: int, shape=(30, 34, 28), lesion: bool = False):
    """An ellipsoid 'brain' with three tissue intensities and noise; optionally a bright lesion.

    Returns (image (X, Y, Z) float32, lesion mask (X, Y, Z) uint8 or None).
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    centre = np.array(shape) / 2 + rng.normal(0, 0.7, 3)
    radii = np.array(shape) * 0.4 * rng.uniform(0.92, 1.08, 3)
    d = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    img = np.where(d < 1, 300.0 + 250 * (d > 0.6) + 400 * (d < 0.25), 0.0)
    img += rng.normal(0, 8, shape) * (d < 1)
    mask = None
    if lesion:
        spot = centre + np.array([0.3, 0.0, 0.0]) * radii
        m = np.sqrt(((grid - spot[:, None, None, None]) ** 2).sum(0)) < 0.25 * radii.min()
        img[m] = 1000.0
        mask = m.astype(np.uint8)
    return img.astype(np.float32), mask


def write_nifti(path, data, affine=AFFINE):
    """`data` saved as NIfTI at `path` (with `affine`); returns the path."""
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def scan(folder: Path, name: str, seed: int = 0, lesion: bool = False, affine=AFFINE, **kw) -> Path:
    """folder/<name>.nii.gz, a toy brain (and folder/<name>_mask.nii.gz with `lesion`)."""
    folder.mkdir(parents=True, exist_ok=True)
    img, mask = toy_brain(seed, lesion=lesion, **kw)
    path = write_nifti(folder / f"{name}.nii.gz", img, affine)
    if lesion:
        write_nifti(folder / f"{name}_mask.nii.gz", mask, affine)
    return path


# --------------------------------------------------------------------------- the CLI

#: A restoration that takes a fraction of a second: torch backend on the CPU, 10 steps.
FAST = ["--schedule", "10x256", "--backend", "torch", "--device", "cpu"]


def cli(capsys, *args):
    """Run `ifad-fast ARGS` in this process: (exit code, stdout, stderr)."""
    from ifad_fast.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    """The one line of `err`, asserted to be `ifad-fast COMMAND: error: ...` with no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ifad-fast {command}: error: ") and "Traceback" not in err, err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Every file under `folder` (recursively), as names relative to it."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def outputs_of(folder: Path) -> list[str]:
    """ifad-fast outputs and temporaries (anything but the toy inputs) in `folder`."""
    return [n for n in leftovers(folder) if n.startswith(".") or any(
        s in n for s in ("_anomaly", "_restoration", "_pred-mask", "_restore.json", "_figure", "_classes",
                         "_ifad-classes", "_ifad-brainmask", "volumes.npy", "brains.npy",
                         "manifest.json", "metrics.json", "model.pt", "checkpoint.pt"))]


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative name."""
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in leftovers(folder)}


def bad_model(src: Path, dst: Path, change) -> Path:
    """A copy of the model file `src` with `change(payload, meta)` applied."""
    payload = torch.load(src, map_location="cpu", weights_only=True)
    meta = json.loads(payload["meta"])
    change(payload, meta)
    payload["meta"] = json.dumps(meta)
    torch.save(payload, dst)
    return dst


# --------------------------------------------------------------------------- world-space toy brains

# the anatomy lives in world millimetres (RAS): an adult-sized ellipsoid brain off the origin
WORLD_CENTRE = np.array([4.0, -18.0, 10.0])
WORLD_RADII = np.array([66.0, 82.0, 60.0])


def world_of(shape, affine) -> np.ndarray:
    """World coordinates (mm) of every voxel of a grid: (X, Y, Z, 3) float64."""
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def rotation(angles_deg) -> np.ndarray:
    """(3, 3) float64 rotation: about x, then y, then z by the given degrees (applied z first)."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def acquisition(kind: str, voxel=2.0, margin=8.0):
    """(shape, (4, 4) affine) of a grid covering the world-space brain: 'ras', 'lps', 'oblique',
    'aniso' (1x1.5x4 mm, axes permuted: array axes are S, R, A)."""
    half = WORLD_RADII + margin
    if kind == "aniso":
        order, sizes = [2, 0, 1], np.array([1.0, 1.5, 4.0])
        cols = np.eye(3)[:, order] * sizes
    else:
        cols = {"ras": np.eye(3), "lps": np.diag([-1.0, -1.0, 1.0]),
                "oblique": rotation((14.0, -9.0, 21.0))}[kind] * voxel
    # cover the brain's bounding box (in the grid's own axes) with some margin
    extent = np.abs(np.linalg.inv(cols)) @ half
    shape = tuple(int(np.ceil(2 * e)) + 1 for e in extent)
    affine = np.eye(4)
    affine[:3, :3] = cols
    affine[:3, 3] = WORLD_CENTRE + np.array([3.0, -2.0, 1.5]) - cols @ ((np.array(shape) - 1) / 2.0)
    return shape, affine


def brain_image(world, rng, radii=WORLD_RADII, centre=WORLD_CENTRE, lesion=False, noise=8.0):
    """T2-like toy brain sampled at `world` points (..., 3): three tissues, optional bright
    lesion. Returns (image (...) float32, lesion mask (...) bool)."""
    d = np.sqrt((((world - centre) / radii) ** 2).sum(-1))
    img = np.where(d < 1, 300.0 + 250 * (d > 0.6) + 400 * (d < 0.25), 0.0)
    img += 40 * np.sin((world[..., 0] - centre[0]) / 12.0) * (d < 1)
    img += rng.normal(0, noise, d.shape) * (d < 1)
    mask = np.zeros(d.shape, bool)
    if lesion:
        mask = np.sqrt((((world - centre - [0.35 * radii[0], 0.1 * radii[1], 0]) ** 2).sum(-1))) < 16.0
        img[mask] = 1000.0
    return img.astype(np.float32), mask


def train_world_model(preset_name: str, epochs: int, volumes_per_batch: int, points_per_volume: int) -> Model:
    """A model of `preset_name` (6 classes) trained on eight world-space toy brains at 4 mm."""
    import dataclasses

    from ifad_fast.preprocess import IntensityEncoder, mode_pool3d, to_model_grid
    from ifad_fast.train import Trainer

    preset = cfg.get_preset(preset_name)
    rng = np.random.default_rng(0)
    vols = []
    for _ in range(8):
        shape, affine = acquisition("ras", voxel=4.0)
        img, _ = brain_image(world_of(shape, affine), rng, radii=WORLD_RADII * rng.uniform(0.92, 1.08, 3),
                             centre=WORLD_CENTRE + rng.normal(0, 4, 3))
        vols.append(to_model_grid(img, affine, preset.preprocess))
    encoder = IntensityEncoder.fit([v[0] for v in vols], k=6, seed=0, brains=[v[1].brain for v in vols])
    classes = np.stack([mode_pool3d(encoder.encode(v[0]), 2, 6) for v in vols])
    brains = np.stack([v[1].brain for v in vols])
    mc = dataclasses.replace(preset.model, n_classes=6)
    tc = dataclasses.replace(preset.train, epochs=epochs, volumes_per_batch=volumes_per_batch,
                             points_per_volume=points_per_volume, brain_fraction=0.8, lr_weights=5e-3,
                             lr_latents=1e-2, lr_step_epochs=1000, prior="none")
    trainer = Trainer(torch.from_numpy(classes), mc, tc, preset.preprocess, encoder.centres,
                      brains=torch.from_numpy(brains))
    return trainer.run(tc.epochs, progress=False)


# --------------------------------------------------------------------------- training and restoring set-ups

def toy_class_volumes(n=3, size=12, seed=0) -> torch.Tensor:
    """Class volumes (n, size, size, size) uint8: a ball holding a core whose place and size vary
    per volume (classes 0..3)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    r = np.sqrt((g ** 2).sum(0))
    vols = []
    for _ in range(n):
        shift = rng.uniform(-0.5, 0.5, 3)[:, None, None, None]
        core = np.sqrt(((g - shift) ** 2).sum(0)) < rng.uniform(0.25, 0.45)
        outer = rng.uniform(0.55, 0.95)
        vols.append(np.where(r > outer, 0, np.where(core, 3, np.where(g[0] > shift[0, 0], 2, 1))).astype(np.uint8))
    return torch.from_numpy(np.stack(vols))


def tiny_configs(**train):
    """(ModelConfig, TrainConfig, PreprocessConfig) of the `tiny` preset for toy_class_volumes:
    4 classes, dropout 0.1, a 12³ grid; `train` overrides TrainConfig fields."""
    import dataclasses

    p = cfg.get_preset("tiny")
    mc = dataclasses.replace(p.model, n_classes=4, dropout=0.1)
    return mc, dataclasses.replace(p.train, **train), dataclasses.replace(p.preprocess, resolution=12)


def tiny_trainer(vols, **train):
    """A Trainer of `tiny_configs(**train)` on class volumes `vols` (n, X, Y, Z) uint8."""
    from ifad_fast.train import Trainer

    mc, tc, pc = tiny_configs(**train)
    return Trainer(vols, mc, tc, pc, centres=np.linspace(0, 1, 4))


#: The small random model of the restoring tests: 6 classes, a 20³ grid of 9.6 mm voxels (the
#: toy brains fit).
RANDOM_MC = cfg.ModelConfig(latent_dim=8, hidden=40, n_layers=3, latent_in=1, n_freqs=3, n_classes=6)
RANDOM_PC = cfg.PreprocessConfig(resolution=20, extent_mm=192.0)


def random_model(seed: int, frame: str = "physical") -> Model:
    """An untrained model of RANDOM_MC / RANDOM_PC (random decoder, random sorted centres with 0
    first, four random latents): for pipelines compared number for number, where the weights need
    not mean anything."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.cat((torch.zeros(1, dtype=torch.float64),
                         torch.rand(RANDOM_MC.n_classes - 1, generator=g, dtype=torch.float64).sort().values))
    return Model(decoder=random_decoder(RANDOM_MC, seed), centres=centres,
                 preprocess=cfg.replace(RANDOM_PC, frame=frame),
                 latents=torch.randn(4, RANDOM_MC.latent_dim, generator=g) * 0.3)


def toy_scans(n: int, offset: int = 0) -> list[np.ndarray]:
    """n fresh toy brains (with lesions), (30, 34, 28) float32 each, drawn from the test seed."""
    return [toy_brain(base_seed() + offset + i, lesion=True)[0] for i in range(n)]
