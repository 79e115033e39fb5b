"""Meaningless results and tracebacks turned into one-line refusals, through the CLI.

Each refusal asserts the exit code, exactly one `ifad-fast CMD: error:` line on stderr (no
traceback, no library log line before it), that nothing is left half-written and that the
user's files are unchanged. Out-of-memory errors that cannot be caused on purpose are injected
with monkeypatch at the restore step or the training epoch they come from.
"""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import AFFINE, FAST, bad_model, cli, digests, leftovers, one_error_line, outputs_of, scan, toy_brain

ALLOCATOR = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12"


def _zero_pixdim(path: Path, sform: bool) -> Path:
    """A toy brain whose header's voxel sizes (pixdim[1:4]) are 0; with `sform`, an sform gives its
    geometry, else neither qform nor sform is set (nibabel then falls back to pixdim)."""
    img = nib.Nifti1Image(toy_brain(0)[0], None)
    img.set_qform(None, code=0)
    img.set_sform(AFFINE if sform else None, code=2 if sform else 0)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.zeros(3, "<f4").tobytes()          # pixdim[1..3] (pixdim starts at byte 76)
    path.write_bytes(bytes(raw))
    return path


# ------------------------------------------------------------------------------ meaningless results


@pytest.mark.parametrize("voxels_mm", [(0.001, 0.001, 0.001), (6.0, 5.5, 0.01)], ids=["1um-voxels", "0.01mm-slices"])
def test_brain_smaller_than_the_model_grid_fails_its_case_and_the_batch_goes_on(tiny_run, tmp_path, capsys,
                                                                                 voxels_mm):
    data, out = tmp_path / "in", tmp_path / "out"
    scan(data, "a", seed=1)
    scan(data, "b", affine=np.diag([*voxels_mm, 1.0]))
    before = digests(data)
    code, _, err = cli(capsys, "restore", data, "-m", tiny_run / "run", "-o", out, *FAST)
    line = one_error_line(err, "restore")
    assert code == 2 and "1 of 2 scans failed" in line and str(data / "b.nii.gz") in line
    assert "voxels (0 x 0 x 0) of the 24³ model grid" in line and "voxel sizes" in line
    assert sorted(outputs_of(out)) == ["a_anomaly.nii.gz", "a_restoration.nii.gz", "a_restore.json"]
    assert digests(data) == before


def test_zero_voxel_sizes_without_orientation_are_refused_in_one_line(tiny_run, tmp_path):
    """Run as a child process: nibabel logs to the stderr it found at import, which only a real
    process's stderr shows."""
    (tmp_path / "in").mkdir()
    path = _zero_pixdim(tmp_path / "in" / "flat.nii", sform=False)
    before = digests(tmp_path / "in")
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-m", "ifad_fast.cli", "restore", str(path), "-m", str(tiny_run / "run"),
                            "-o", str(out), *FAST], capture_output=True, text=True, timeout=300)
    line = one_error_line(child.stderr, "restore")
    assert child.returncode == 2 and str(path) in line and "voxel sizes" in line and "sform" in line
    assert outputs_of(out) == [] and digests(tmp_path / "in") == before


def test_nibabel_header_fixes_are_held_until_the_command_succeeds(tiny_run, tmp_path, capsys):
    """An sform carries the geometry, so zero pixdim is harmless: nibabel's note about it comes
    after the work, as a held library warning, not as a log line printed on the way."""
    (tmp_path / "in").mkdir()
    path = _zero_pixdim(tmp_path / "in" / "sformed.nii", sform=True)
    code, _, err = cli(capsys, "restore", path, "-m", tiny_run / "run", "-o", tmp_path / "out", *FAST)
    assert code == 0
    assert err.strip().splitlines() == ["ifad-fast restore: warning: UserWarning: nibabel: pixdim[1,2,3] should be "
                                        "non-zero; setting 0 dims to 1"]


# ------------------------------------------------------------------------------ damaged model files


def _clip(lo, hi):
    def change(payload, meta):
        meta["preprocess"]["clip_percentiles"] = [lo, hi]
    return change


def _set(section, field, value):
    def change(payload, meta):
        meta[section][field] = value
    return change


def _format_version(value):
    def change(payload, meta):
        meta["format_version"] = value
    return change


def _repeated_centre(payload, meta):
    payload["centres"][4] = payload["centres"][3]


BAD_MODELS = {
    "clip percentiles above 100": (_clip(2, 200), "clip_percentiles"),
    "clip percentiles reversed": (_clip(98, 2), "clip_percentiles"),
    "clip percentiles equal": (_clip(50, 50), "clip_percentiles"),
    "sigma 0": (_set("train", "sigma", 0.0), "sigma"),
    "sigma negative": (_set("train", "sigma", -0.01), "sigma"),
    "test mode pool 7": (_set("preprocess", "test_mode_pool", 7), "test_mode_pool"),
    "train mode pool 0": (_set("preprocess", "train_mode_pool", 0), "train_mode_pool"),
    "format version 0": (_format_version(0), "format_version 0"),
    "format version -3": (_format_version(-3), "format_version -3"),
    "repeated class centre": (_repeated_centre, "strictly increasing"),
}


@pytest.mark.parametrize("what", list(BAD_MODELS))
def test_damaged_model_settings_are_refused_when_the_model_loads(tiny_run, tmp_path, capsys, what):
    change, expect = BAD_MODELS[what]
    model = bad_model(tiny_run / "run" / "model.pt", tmp_path / "bad.pt", change)
    data, out = tmp_path / "in", tmp_path / "out"
    scan(data, "a", seed=1)
    scan(data, "b", seed=2)
    before = digests(tmp_path)
    code, stdout, err = cli(capsys, "restore", data, "-m", model, "-o", out, *FAST)
    line = one_error_line(err, "restore")
    assert code == 2 and f"{model}: damaged model file" in line and expect in line, line
    assert stdout == "" and digests(tmp_path) == before          # refused before any case started


# ------------------------------------------------------------------------------ damaged checkpoints


def _edit_checkpoint(change):
    def edit(path: Path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        change(state)
        torch.save(state, path)
    return edit


def _truncate(path: Path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


BAD_CHECKPOINTS = {
    "no epoch": (_edit_checkpoint(lambda s: s.pop("epoch")), "no epoch"),
    "epoch not a number": (_edit_checkpoint(lambda s: s.update(epoch="six")), "epoch"),
    "bad generator state": (_edit_checkpoint(lambda s: s.update(generator=torch.zeros(3, dtype=torch.uint8))),
                            "generator state"),
    "non-JSON log": (_edit_checkpoint(lambda s: s.update(log="{not json")), "loss log"),
    "truncated": (_truncate, "truncated"),
}


@pytest.mark.parametrize("what", list(BAD_CHECKPOINTS))
def test_damaged_checkpoint_is_refused_on_resume(tiny_run, tmp_path, capsys, what):
    damage, expect = BAD_CHECKPOINTS[what]
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    damage(run / "checkpoint.pt")
    before = digests(run)
    code, _, err = cli(capsys, "train", tiny_run / "prep", "-o", run, "--preset", "tiny", "--device", "cpu",
                       "--epochs", "8", "--resume")
    line = one_error_line(err, "train")
    assert code == 2 and f"{run / 'checkpoint.pt'} is damaged" in line and expect in line, line
    assert "start a new run or restore it from a copy" in line
    assert digests(run) == before


# ------------------------------------------------------------------------------ out of memory


def _failing_restore(monkeypatch, fault, times: int):
    """ifad_fast.api.restorer.restore_batch raising `fault` on its first `times` calls; returns the chunk sizes
    (RestoreConfig.chunk) of every call."""
    import ifad_fast.api.restorer as api

    real, chunks = api.restore_batch, []

    def restore_batch(backend, model, classes, rc, *a, **k):
        chunks.append(rc.chunk)
        if len(chunks) <= times:
            raise fault
        return real(backend, model, classes, rc, *a, **k)
    monkeypatch.setattr(api, "restore_batch", restore_batch)
    return chunks


FAULTS = {"cpu allocator": (RuntimeError, ALLOCATOR),
          "cuda out of memory": (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 20.00 GiB")}


@pytest.mark.parametrize("what", list(FAULTS))
def test_out_of_memory_fails_its_case_and_the_batch_goes_on(tiny_run, tmp_path, capsys, monkeypatch, what):
    kind, text = FAULTS[what]
    data, out = tmp_path / "in", tmp_path / "out"
    scan(data, "a", seed=1)
    scan(data, "b", seed=2)
    times = 2 if kind is torch.OutOfMemoryError else 1           # a GPU's error is retried once, then fails
    chunks = _failing_restore(monkeypatch, kind(text), times)
    code, _, err = cli(capsys, "restore", data, "-m", tiny_run / "run", "-o", out, *FAST)
    line = one_error_line(err, "restore")
    assert code == 2 and "1 of 2 scans failed" in line and "ran out of memory" in line and str(data / "a.nii.gz") in line
    assert sorted(outputs_of(out)) == ["b_anomaly.nii.gz", "b_restoration.nii.gz", "b_restore.json"]
    assert len(chunks) == times + 1


def test_gpu_out_of_memory_is_retried_with_smaller_score_chunks(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    chunks = _failing_restore(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"), 1)
    code, _, err = cli(capsys, "restore", scan(tmp_path / "in", "a"), "-m", tiny_run / "run", "-o", out, *FAST)
    assert code == 0 and err == "", err
    assert len(chunks) == 2 and chunks[1] < chunks[0]
    assert (out / "a_restore.json").is_file()


@pytest.mark.parametrize("what", list(FAULTS))
def test_out_of_memory_outside_a_batch_prints_one_line(tiny_run, tmp_path, capsys, monkeypatch, what):
    kind, text = FAULTS[what]

    def epoch(self):
        raise kind(text)
    monkeypatch.setattr("ifad_fast.train.Trainer.train_epoch", epoch)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", tiny_run / "prep", "-o", run, "--preset", "tiny", "--device", "cpu",
                       "--epochs", "2")
    assert code == 2 and "ran out of memory" in one_error_line(err, "train")
    assert outputs_of(run) == []


def test_other_runtime_errors_still_show_their_traceback(tiny_run, tmp_path, capsys, monkeypatch):
    """A RuntimeError that is not about memory is a bug: it is not dressed up as a user error."""
    from ifad_fast.cli import main

    _failing_restore(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), 1)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main([str(a) for a in ("restore", scan(tmp_path / "in", "a"), "-m", tiny_run / "run",
                               "-o", tmp_path / "out", *FAST)])
    monkeypatch.setattr("ifad_fast.train.Trainer.train_epoch", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main([str(a) for a in ("train", tiny_run / "prep", "-o", tmp_path / "run", "--preset", "tiny",
                               "--device", "cpu", "--epochs", "2")])


# ------------------------------------------------------------------------------ messages


def test_a_full_disk_names_the_output_not_its_temporary(tiny_run, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    path, out = scan(tmp_path / "in", "a"), tmp_path / "out"
    monkeypatch.setattr("ifad_fast.io.nib.save", full)
    code, _, err = cli(capsys, "restore", path, "-m", tiny_run / "run", "-o", out, *FAST)
    line = one_error_line(err, "restore")
    assert code == 2 and f"{out / 'a_anomaly.nii.gz'}: no space left" in line and ".part" not in line
    assert leftovers(out) == []


def test_train_on_a_file_says_a_folder_is_expected(tmp_path, capsys):
    path = scan(tmp_path / "in", "a")
    code, _, err = cli(capsys, "train", path, "-o", tmp_path / "run", "--preset", "tiny", "--device", "cpu")
    line = one_error_line(err, "train")
    assert code == 2 and f"{path}: is a file" in line and "folder" in line and "no such" not in line
    assert leftovers(tmp_path / "run") == []
