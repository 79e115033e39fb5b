"""Numba CPU kernels against plain NumPy references, on random inputs.

Every random test draws from helpers.base_seed() (IFAD_TEST_SEED, fixed by default) and puts
the seed in its assertion message; set IFAD_TEST_SEED=<seed> to replay or vary the inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from ifad_fast.config import HCP_T2_CENTRES
from ifad_fast.kernels.numba_ops import assign_nearest, mode_pool3d

SHAPES = [(7, 5, 9), (1, 4, 3), (16, 17, 18)]
PAPER_CENTRES = np.array(HCP_T2_CENTRES)


# --------------------------------------------------------------------------- references


def assign_nearest_ref(volume, centres):
    """Nearest centre by broadcast argmin (np.argmin takes the first minimum on ties)."""
    return np.argmin(np.abs(volume[..., None] - centres), axis=-1).astype(np.uint8)


def _box_sum(a, axis, lo, hi):
    """Sum of a[i+lo .. i+hi] along `axis` (inclusive), out-of-range neighbours not counted."""
    n = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (-lo, hi)
    p = np.pad(a, pad)  # zeros: padded voxels count for no class
    return sum(np.take(p, np.arange(d, d + n), axis=axis) for d in range(hi - lo + 1))


def mode_pool3d_ref(classes, window, n_classes):
    """One-hot (X,Y,Z,C), box sum of every channel over the window, argmax (first max)."""
    lo, hi = -(window // 2), (window - 1) // 2  # 3 -> -1..+1, 2 -> -1..0 (looks back, as the reference)
    counts = (classes[..., None] == np.arange(n_classes)).astype(np.int32)
    for axis in range(3):
        counts = _box_sum(counts, axis, lo, hi)
    return np.argmax(counts, axis=-1).astype(np.uint8)


def _check_equal(got, want, msg):
    assert got.dtype == np.uint8, msg
    assert got.shape == want.shape, msg
    if not np.array_equal(got, want):
        bad = np.argwhere(np.atleast_1d(got != want))
        first = tuple(bad[0])
        raise AssertionError(
            f"{msg}: {len(bad)} of {want.size} voxels differ, first at {first}: "
            f"got {np.atleast_1d(got)[first]}, want {np.atleast_1d(want)[first]}"
        )


# --------------------------------------------------------------------------- assign_nearest


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_centres", [1, 2, 10, 255])
def test_assign_nearest_matches_reference(seeded, shape, dtype, n_centres):
    rng, seed = seeded
    centres = np.sort(rng.random(n_centres)).astype(dtype)
    volume = rng.uniform(-0.5, 1.5, size=shape).astype(dtype)  # also outside the centre range
    _check_equal(assign_nearest(volume, centres), assign_nearest_ref(volume, centres), seed)


@pytest.mark.parametrize("vol_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c_dtype", [np.float32, np.float64])
def test_assign_nearest_paper_centres_mixed_dtypes(seeded, vol_dtype, c_dtype):
    rng, seed = seeded
    centres = PAPER_CENTRES.astype(c_dtype)
    volume = rng.random((16, 17, 18)).astype(vol_dtype)
    _check_equal(assign_nearest(volume, centres), assign_nearest_ref(volume, centres), seed)


def test_assign_nearest_exact_ties_go_to_lower_index():
    centres = np.array([0.0, 1.0, 2.0, 4.0, 8.0], dtype=np.float32)
    volume = np.array([0.5, 1.5, 3.0, 6.0, -1.0, 9.0, 1.0, 100.0], dtype=np.float32)
    want = np.array([0, 1, 2, 3, 0, 4, 1, 4], dtype=np.uint8)
    np.testing.assert_array_equal(assign_nearest_ref(volume, centres), want)  # the rule itself
    np.testing.assert_array_equal(assign_nearest(volume, centres), want)
    np.testing.assert_array_equal(
        assign_nearest(volume.astype(np.float64), centres.astype(np.float64)), want
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assign_nearest_at_and_around_midpoints(seeded, dtype):
    rng, seed = seeded
    centres = np.concatenate([PAPER_CENTRES, np.sort(rng.random(5))]).astype(dtype)
    centres = np.sort(centres)
    mid = (centres[:-1] + centres[1:]) / dtype(2)
    lo, hi = centres.min() - 1, centres.max() + 1
    volume = np.concatenate(
        [
            mid,
            np.nextafter(mid, dtype(-np.inf)),
            np.nextafter(mid, dtype(np.inf)),
            centres,
            np.array([lo, hi, -1e30, 1e30, 0.0, -0.0], dtype=dtype),
        ]
    ).astype(dtype)
    _check_equal(assign_nearest(volume, centres), assign_nearest_ref(volume, centres), seed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assign_nearest_non_finite_like_reference(dtype):
    centres = PAPER_CENTRES.astype(dtype)
    volume = np.array([np.nan, np.inf, -np.inf, 0.5], dtype=dtype)
    with np.errstate(invalid="ignore"):
        want = assign_nearest_ref(volume, centres)
    np.testing.assert_array_equal(assign_nearest(volume, centres), want)


def test_assign_nearest_duplicate_centres_and_rounding_ties():
    # Duplicates: the lower index wins; near-equal centres whose distances round equal too.
    centres = np.array([0.1, 0.1, 0.5, 1.0, 1.0 + 2**-52, 3.0])
    volume = np.array([0.0, 0.1, 0.3, 1.0, 1.0 + 2**-53, 1e17, 2.0, -1e17])
    np.testing.assert_array_equal(
        assign_nearest(volume, centres), assign_nearest_ref(volume, centres)
    )


def test_assign_nearest_non_contiguous_and_shapes(seeded):
    rng, seed = seeded
    centres = PAPER_CENTRES
    base = rng.random((12, 10, 14))
    for volume in (base[::2, :, ::-1], base.transpose(2, 0, 1), base[3], base[0, 0, 0]):
        got = assign_nearest(volume, centres)
        _check_equal(got, assign_nearest_ref(volume, centres), seed)
    assert assign_nearest(np.empty((0, 3, 4), np.float32), centres).shape == (0, 3, 4)


def test_assign_nearest_rejects_bad_centres():
    volume = np.zeros((2, 2, 2), np.float32)
    with pytest.raises(ValueError):
        assign_nearest(volume, np.array([0.5, 0.2]))  # not sorted
    with pytest.raises(ValueError):
        assign_nearest(volume, np.array([]))
    with pytest.raises(ValueError):
        assign_nearest(volume, np.zeros((2, 2)))
    with pytest.raises(ValueError):
        assign_nearest(volume, np.linspace(0, 1, 256))  # does not fit uint8
    with pytest.raises(ValueError):
        assign_nearest(volume, np.array([0.0, np.nan]))
    with pytest.raises(ValueError):
        assign_nearest(volume, np.array([0.0, np.inf]))


# --------------------------------------------------------------------------- mode_pool3d


def _classes(rng, shape, n_classes, skewed):
    if skewed:  # one dominant class, like background; many ties between the rest
        p = np.full(n_classes, 1.0)
        p[0] = 3.0 * n_classes
        return rng.choice(n_classes, size=shape, p=p / p.sum()).astype(np.uint8)
    return rng.integers(0, n_classes, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("n_classes", [2, 10])
@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "skewed"])
def test_mode_pool3d_matches_reference(seeded, shape, window, n_classes, skewed):
    rng, seed = seeded
    classes = _classes(rng, shape, n_classes, skewed)
    _check_equal(
        mode_pool3d(classes, window, n_classes),
        mode_pool3d_ref(classes, window, n_classes),
        seed,
    )


@pytest.mark.parametrize(
    "window, n_classes",
    [
        (1, 10),  # identity
        (4, 5),  # even window, extra at the start: -2..+1
        (5, 3),
        (3, 12),  # 12 classes x 5 bits = 60: the last packed case
        (3, 13),  # 65 bits: histogram path
        (2, 40),  # histogram path
        (3, 256),  # histogram path, full uint8 range
    ],
)
def test_mode_pool3d_other_windows_and_class_counts(seeded, window, n_classes):
    rng, seed = seeded
    for shape in [(9, 6, 11), (2, 1, 5)]:
        classes = _classes(rng, shape, n_classes, skewed=False)
        _check_equal(
            mode_pool3d(classes, window, n_classes),
            mode_pool3d_ref(classes, window, n_classes),
            f"{seed} shape={shape}",
        )


def test_mode_pool3d_boundary_rule_by_hand():
    # 1x1xN volumes make the offsets visible: window 2 looks back (-1..0, as the paper's
    # reference code), 3 is centred; padded voxels vote for no class.
    classes = np.array([1, 0, 0, 1, 1, 0], dtype=np.uint8).reshape(1, 1, 6)
    # window 2: {1}->1, {1,0}->0, {0,0}->0, {0,1}->0, {1,1}->1, {1,0}->0
    np.testing.assert_array_equal(mode_pool3d(classes, 2, 2).ravel(), [1, 0, 0, 0, 1, 0])
    # window 3: {1,0}->0, {1,0,0}->0, {0,0,1}->0, {0,1,1}->1, {1,1,0}->1, {1,0}->0
    np.testing.assert_array_equal(mode_pool3d(classes, 3, 2).ravel(), [0, 0, 0, 1, 1, 0])


def test_mode_pool3d_accepts_other_integer_dtypes_and_views(seeded):
    rng, seed = seeded
    base = rng.integers(0, 10, size=(10, 12, 14))  # int64
    for classes in (base, base[::2, :, ::-1], base.transpose(2, 0, 1)):
        want = mode_pool3d_ref(classes, 3, 10)
        _check_equal(mode_pool3d(classes, 3, 10), want, seed)
    assert mode_pool3d(np.zeros((0, 4, 4), np.uint8), 3, 10).shape == (0, 4, 4)


@pytest.mark.parametrize("window", [0, -1, 2.5, "3", None, True])
def test_mode_pool3d_invalid_window_raises(window):
    with pytest.raises(ValueError):
        mode_pool3d(np.zeros((3, 3, 3), np.uint8), window, 10)


def test_mode_pool3d_invalid_inputs_raise():
    with pytest.raises(ValueError):
        mode_pool3d(np.full((3, 3, 3), 10, np.uint8), 3, 10)  # id out of range
    with pytest.raises(ValueError):
        mode_pool3d(np.full((3, 3, 3), -1, np.int64), 3, 10)
    with pytest.raises(ValueError):
        mode_pool3d(np.zeros((3, 3), np.uint8), 3, 10)  # not 3-D
    with pytest.raises(ValueError):
        mode_pool3d(np.zeros((3, 3, 3), np.float32), 3, 10)
    for n_classes in (0, 257, 2.0):
        with pytest.raises(ValueError):
            mode_pool3d(np.zeros((3, 3, 3), np.uint8), 3, n_classes)
