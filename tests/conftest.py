"""Shared fixtures: small, real-looking NIfTI brains built with nibabel; the test seed (helpers.py)."""
from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import base_seed, seed_note


def pytest_report_header(config):
    return f"random inputs: {seed_note()} (set it to replay or vary them)"


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """torch's and NumPy's global generators start every test from the test seed."""
    torch.manual_seed(base_seed())
    np.random.seed(base_seed() % 2**32)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        report.sections.append(("random inputs", f"drawn with {seed_note()}"))


# ~6 mm voxels: the toy brains (~30 voxels, an ellipsoid of 0.8 of the box) are adult-sized
# (~150 mm), so they fit the physical frame of the `tiny` preset (192 mm) as real brains do.
AFFINE = np.array([[6.0, 0.0, 0.0, -90.0],
                   [0.0, 5.5, 0.0, -95.0],
                   [0.0, 0.0, 6.5, -80.0],
                   [0.0, 0.0, 0.0, 1.0]])


def toy_brain(seed: int, shape=(30, 34, 28), lesion: bool = False):
    """An ellipsoid 'brain' with three tissue intensities and noise; optionally a bright lesion.

    Returns (image float32, lesion mask uint8 or None).
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
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


@pytest.fixture
def scan_dir(tmp_path):
    """A folder of four healthy toy brains."""
    d = tmp_path / "healthy"
    d.mkdir()
    for i in range(4):
        write_nifti(d / f"h{i}.nii.gz", toy_brain(i)[0])
    return d


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """prepare -> train (tiny preset, 6 epochs) once per session: root/healthy, root/prep, root/run."""
    from ifad_fast.cli import main

    root = tmp_path_factory.mktemp("e2e")
    healthy = root / "healthy"
    healthy.mkdir()
    for i in range(4):
        write_nifti(healthy / f"h{i}.nii.gz", toy_brain(i)[0])
    assert main(["prepare", str(healthy), "-o", str(root / "prep"), "--preset", "tiny", "--classes", "10"]) == 0
    assert main(["train", str(root / "prep"), "-o", str(root / "run"), "--preset", "tiny", "--epochs", "6",
                 "--device", "cpu"]) == 0
    return root


@pytest.fixture
def one_thread():
    """Torch on one thread for tiny tensors: faster, and immune to other jobs on a shared machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
