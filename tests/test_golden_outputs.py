"""Before/after: today's restorations against the ones recorded before the architecture work.

tests/golden_cases.py holds the cases and how they were recorded. Where the library versions and
the CPU's vector unit match the recording (fixtures/golden/machine.json), every output must be
bit-identical. Elsewhere vectorised float code may round differently, so the maps are compared
with the recording's float16 copies: |anomaly - ref| <= 2e-3 + 2e-3 |ref| (float16 keeps ~1e-3
relative) on at least 99.5 % of voxels, classes equal on at least 99.5 %, and the restoration
within the same bound wherever the classes agree.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from golden_cases import CASES, FOLDER, MAPS, digest, load_model, machine, restore_case

RECORDED = np.load(FOLDER / "outputs.npz")
SAME_MACHINE = json.loads((FOLDER / "machine.json").read_text()) == machine()


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_match_the_recording(model, case):
    out = restore_case(model, case)
    ref_classes = RECORDED[f"{case.name}/classes/u8"]
    assert out["classes"].shape == ref_classes.shape
    if SAME_MACHINE:
        for key in MAPS:
            assert digest(out[key]) == str(RECORDED[f"{case.name}/{key}/sha256"]), \
                f"{case.name}: {key} is no longer bit-identical to the recording"
        return
    same_class = out["classes"] == ref_classes
    assert same_class.mean() >= 0.995, f"{case.name}: classes agree on {same_class.mean():.4f}"
    for key in ("anomaly", "restoration"):
        ref = RECORDED[f"{case.name}/{key}/f16"].astype(np.float64)
        close = np.abs(out[key] - ref) <= 2e-3 + 2e-3 * np.abs(ref)
        where = same_class if key == "restoration" else np.ones_like(close)
        assert close[where].mean() >= 0.995, f"{case.name}: {key} within tolerance on {close[where].mean():.4f}"


def test_the_recording_covers_a_dozen_cases_on_both_backends():
    assert len(CASES) >= 12 and {c.backend for c in CASES} == {"cpu", "torch"}
    assert {c.pipeline for c in CASES} == {"host", "device"} and any(c.lesion for c in CASES)
    assert sorted(RECORDED.files) == sorted(
        [f"{c.name}/{k}/sha256" for c in CASES for k in MAPS]
        + [f"{c.name}/{k}/f16" for c in CASES for k in ("anomaly", "restoration")]
        + [f"{c.name}/classes/u8" for c in CASES])


def test_the_tolerance_path_notices_a_changed_map(model):
    """The off-machine comparison is not vacuous: a map shifted by 0.01 fails it."""
    case = CASES[2]
    out = restore_case(model, case)
    ref = RECORDED[f"{case.name}/anomaly/f16"].astype(np.float64)
    assert (np.abs(out["anomaly"] - ref) <= 2e-3 + 2e-3 * np.abs(ref)).mean() >= 0.995
    assert (np.abs(out["anomaly"] + 0.01 - ref) <= 2e-3 + 2e-3 * np.abs(ref)).mean() < 0.5
