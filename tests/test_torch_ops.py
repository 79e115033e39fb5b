"""Torch encoding kernels (for scans on a GPU) against the Numba kernels, bit for bit.

Random inputs from the test seed (conftest's `seeded`); the seed is in every assertion message
(IFAD_TEST_SEED=<int> replays or varies it).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ifad_fast.kernels.numba_ops import assign_nearest, mode_pool3d
from ifad_fast.kernels.torch_ops import assign_nearest_torch, mode_pool3d_torch


@pytest.mark.parametrize("shape", [(7, 5, 9), (1, 4, 3), (16, 17, 18)])
@pytest.mark.parametrize("n_centres", [1, 2, 10, 255])
def test_assign_nearest_torch_equals_numba(seeded, shape, n_centres):
    rng, seed = seeded
    centres = np.sort(rng.random(n_centres))
    volume = rng.uniform(-0.5, 1.5, size=shape).astype(np.float32)
    volume.flat[: min(volume.size, n_centres)] = centres[: volume.size].astype(np.float32)  # on a centre
    if n_centres > 1:   # exactly at a midpoint (a tie: the lower index wins)
        volume.flat[-1] = np.float32((centres[0] + centres[1]) / 2)
    got = assign_nearest_torch(torch.from_numpy(volume), centres).numpy()
    want = assign_nearest(volume, centres)
    assert got.dtype == np.uint8 and np.array_equal(got, want), seed


@pytest.mark.parametrize("shape", [(7, 5, 9), (1, 4, 3), (16, 17, 18)])
@pytest.mark.parametrize("window", [1, 2, 3, 4])
@pytest.mark.parametrize("n_classes", [1, 3, 10, 20])
def test_mode_pool_torch_equals_numba(seeded, shape, window, n_classes):
    rng, seed = seeded
    # few distinct values in blocks, so ties and majorities both occur
    classes = rng.integers(0, n_classes, size=shape).astype(np.uint8)
    classes[::2] = classes[0]
    got = mode_pool3d_torch(torch.from_numpy(classes), window, n_classes).numpy()
    want = mode_pool3d(classes, window, n_classes)
    assert got.dtype == np.uint8 and np.array_equal(got, want), f"{seed}: {np.sum(got != want)} voxels differ"


def test_torch_ops_refuse_bad_input():
    with pytest.raises(ValueError):
        mode_pool3d_torch(torch.zeros(4, 4, dtype=torch.uint8), 3, 2)
    with pytest.raises(ValueError):
        assign_nearest_torch(torch.zeros(3), [0.5, 0.1])
