"""Numba CPU kernels against the straightforward ways, at 160^3.

Run explicitly (not collected by the normal test run, whose testpaths is tests/):

    python -m pytest bench/test_bench_cpu_kernels.py --benchmark-only

Every case first checks that the Numba result equals the baseline's exactly, then times.
"""

from __future__ import annotations

import numpy as np
import pytest

from ifad_fast.config import HCP_T2_CENTRES
from ifad_fast.kernels.numba_ops import assign_nearest, mode_pool3d

try:
    from bench.baselines import assign_nearest_broadcast, mode_pool3d_onehot_torch
except ImportError:  # run as `pytest bench/...` without `python -m`: bench/ is on sys.path
    from baselines import assign_nearest_broadcast, mode_pool3d_onehot_torch

N = 160
N_CLASSES = 10
CENTRES = np.array(HCP_T2_CENTRES, dtype=np.float32)
ROUNDS = {"numba": 20, "baseline": 5}


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).random((N, N, N), dtype=np.float32)


@pytest.fixture(scope="module")
def classes(volume):
    return assign_nearest_broadcast(volume, CENTRES)


@pytest.fixture(scope="module")
def mode_pool_reference(classes):
    cache = {}

    def get(window):
        if window not in cache:
            cache[window] = mode_pool3d_onehot_torch(classes, window, N_CLASSES)
        return cache[window]

    return get


@pytest.mark.parametrize("impl", ["numba", "baseline"], ids=["numba", "onehot_torch"])
@pytest.mark.parametrize("window", [3, 2])
def test_mode_pool3d(benchmark, classes, mode_pool_reference, window, impl):
    benchmark.group = f"mode_pool3d {window}x{window}x{window} at {N}^3, {N_CLASSES} classes"
    fn = mode_pool3d if impl == "numba" else mode_pool3d_onehot_torch
    want = mode_pool_reference(window)
    fast = mode_pool3d(classes, window, N_CLASSES)  # also compiles / loads the cache
    assert np.array_equal(fast, want), "numba mode_pool3d differs from the one-hot torch way"
    out = benchmark.pedantic(
        fn, args=(classes, window, N_CLASSES), rounds=ROUNDS[impl], warmup_rounds=1
    )
    assert np.array_equal(out, want)


@pytest.mark.parametrize("impl", ["numba", "baseline"], ids=["numba", "broadcast_numpy"])
def test_assign_nearest(benchmark, volume, classes, impl):
    benchmark.group = f"assign_nearest at {N}^3, {N_CLASSES} centres (float32)"
    fn = assign_nearest if impl == "numba" else assign_nearest_broadcast
    want = classes  # assign_nearest_broadcast(volume, CENTRES)
    assert np.array_equal(assign_nearest(volume, CENTRES), want), (
        "numba assign_nearest differs from the broadcast argmin"
    )
    out = benchmark.pedantic(fn, args=(volume, CENTRES), rounds=ROUNDS[impl], warmup_rounds=1)
    assert np.array_equal(out, want)
