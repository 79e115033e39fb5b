"""Shared fixtures: small, real-looking NIfTI brains built with nibabel; the test seed (helpers.py)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from helpers import base_seed, numpy_rng, seed_note, toy_brain, write_nifti


def pytest_report_header(config):
    return f"random inputs: {seed_note()} (set it to replay or vary them)"


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """torch's and NumPy's global generators start every test from the test seed."""
    torch.manual_seed(base_seed())
    np.random.seed(base_seed() % 2**32)


@pytest.fixture
def torch_kernels(monkeypatch):
    """Preprocessing computes CPU tensors with its device kernels (torch), as it does CUDA tensors,
    instead of on their NumPy views: how the device code is checked against the host without a GPU."""
    from ifad_fast import preprocess
    monkeypatch.setattr(preprocess, "CPU_TENSOR_KERNELS", "torch")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        report.sections.append(("random inputs", f"drawn with {seed_note()}"))


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
def seeded():
    """(NumPy generator from the test seed, 'IFAD_TEST_SEED=<seed>' for assertion messages)."""
    return numpy_rng(), seed_note()


@pytest.fixture
def one_thread():
    """Torch on one thread for tiny tensors: faster, and immune to other jobs on a shared machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


THREADS = torch.get_num_threads()      # torch's own count in this process, before any test


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """A command run in this process with --threads (train_job, restore_shard) leaves torch on that
    many threads; after each test torch is back on its own count, so no later test inherits it
    (float sums, and so test_golden_outputs' bit-for-bit maps, depend on the count)."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)
