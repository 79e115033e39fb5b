"""Recorded outputs of the restoring engine, so that a refactor can be shown to change no number.

A dozen restorations of toy brains (four acquisitions -- RAS, LPS, oblique, anisotropic and
permuted -- healthy and with a lesion) by a small trained model, on the `cpu` and `torch`
backends and through the host and device pipelines, with the full and adaptive score grids and
a score resolution of its own: `CASES`. `record()` ran them once, on the tree before the
architecture work of issue 21, and stored in tests/fixtures/golden/:

- model.pt: the model (trained here once by `train_world_model`, so its weights are fixed bytes);
- outputs.npz: per case, the SHA-256 of each output array's bytes (anomaly float32, restoration
  float32, classes uint8, all in the scan's grid) and float16 copies of the two maps;
- machine.json: where they were recorded (torch and NumPy versions, torch's CPU capability); every
  case runs on THREADS intra-op threads, since a reduction's split among threads changes its bits.

tests/test_golden_outputs.py restores the same cases now. On a machine and library versions like
the recording's the outputs must be bit-identical; elsewhere, where vectorised float code may
round differently, they must agree within the tolerances stated there.

Re-record (only when a change is *meant* to change numbers, and say so in the commit):
    python tests/golden_cases.py
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helpers import WORLD_CENTRE, WORLD_RADII, acquisition, brain_image, world_of

FOLDER = Path(__file__).parent / "fixtures" / "golden"
MAPS = ("anomaly", "restoration", "classes")
THREADS = 2              # torch's intra-op threads for every case (recorded with 2)
THRESHOLD = 0.2          # the model's decision threshold: where the adaptive grid must be exact


@dataclass(frozen=True)
class Case:
    """One restoration: a scan (acquisition, seed, lesion) and how it is restored."""

    name: str
    kind: str                    # ras | lps | oblique | aniso (tests.helpers.acquisition)
    seed: int
    lesion: bool
    backend: str                 # cpu | torch
    pipeline: str = "host"       # host | device (torch's CPU device)
    grid: str = "full"           # full | adaptive (uses THRESHOLD)
    resolution: int | None = None


def _cases() -> tuple[Case, ...]:
    scans = [(k, s, les) for s, k in enumerate(("ras", "lps", "oblique", "aniso")) for les in (False, True)]
    out = []
    for kind, seed, lesion in scans:
        for backend in ("cpu", "torch"):
            tag = f"{kind}-{'lesion' if lesion else 'healthy'}-{backend}"
            out.append(Case(tag, kind, seed, lesion, backend))
    out += [Case("ras-lesion-torch-device", "ras", 0, True, "torch", pipeline="device"),
            Case("oblique-lesion-cpu-adaptive", "oblique", 2, True, "cpu", grid="adaptive"),
            Case("aniso-lesion-torch-adaptive", "aniso", 3, True, "torch", grid="adaptive"),
            Case("lps-lesion-cpu-res16", "lps", 1, True, "cpu", resolution=16)]
    return tuple(out)


CASES = _cases()


def scan_of(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(image (X, Y, Z) float32, affine (4, 4)) of a case: a world-space toy brain at 6 mm, or for
    'aniso' at 5 x 7.5 x 20 mm with the axes permuted (S, R, A)."""
    if case.kind == "aniso":
        cols = np.eye(3)[:, [2, 0, 1]] * np.array([5.0, 7.5, 20.0])
        extent = np.abs(np.linalg.inv(cols)) @ (WORLD_RADII + 8.0)
        shape = tuple(int(np.ceil(2 * e)) + 1 for e in extent)
        affine = np.eye(4)
        affine[:3, :3] = cols
        affine[:3, 3] = WORLD_CENTRE - cols @ ((np.array(shape) - 1) / 2.0)
    else:
        shape, affine = acquisition(case.kind, voxel=6.0)
    img, _ = brain_image(world_of(shape, affine), np.random.default_rng(1000 + case.seed), lesion=case.lesion)
    return img, affine


def restore_case(model, case: Case) -> dict[str, np.ndarray]:
    """The case's outputs in its scan's grid: {anomaly, restoration, classes}."""
    from ifad_fast.api import Restorer

    rc = dict(grid=case.grid, min_pool=3, avg_pool=15)    # the pools they were recorded with (before frame_pools)
    restorer = Restorer(model, backend=case.backend, device="cpu", schedule="fast", seed=7,
                        resolution=case.resolution, pipeline=case.pipeline, **rc)
    img, affine = scan_of(case)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)             # a float reduction's split, hence its bits, follows it
    try:
        res = restorer.restore_array(img, affine)
    finally:
        torch.set_num_threads(threads)
    return {"anomaly": res.anomaly, "restoration": res.restoration, "classes": res.classes}


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes."""
    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def machine() -> dict:
    """What the float results depend on beyond the code: library versions and the CPU's vector unit."""
    return {"torch": torch.__version__, "numpy": np.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def load_model():
    from ifad_fast.model import load_model as load

    return load(FOLDER / "model.pt")


def record() -> None:
    """Train the model (if absent), run every case and store the fixtures."""
    from ifad_fast.model import save_model
    from helpers import train_world_model

    FOLDER.mkdir(parents=True, exist_ok=True)
    if not (FOLDER / "model.pt").exists():
        torch.manual_seed(0)
        model = train_world_model("tiny", epochs=40, volumes_per_batch=4, points_per_volume=2048)
        model.info = {"threshold": THRESHOLD}
        save_model(model, FOLDER / "model.pt")
    model = load_model()
    stored = {}
    for case in CASES:
        out = restore_case(model, case)
        for key in MAPS:
            stored[f"{case.name}/{key}/sha256"] = np.array(digest(out[key]))
        for key in ("anomaly", "restoration"):
            stored[f"{case.name}/{key}/f16"] = out[key].astype(np.float16)
        stored[f"{case.name}/classes/u8"] = out["classes"]
        print(case.name, out["anomaly"].shape, f"max anomaly {out['anomaly'].max():.3f}")
    np.savez_compressed(FOLDER / "outputs.npz", **stored)
    (FOLDER / "machine.json").write_text(json.dumps(machine(), indent=1) + "\n")


if __name__ == "__main__":
    record()
