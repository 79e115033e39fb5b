"""Going on from earlier work safely: `train --resume` only on the run's own data, `restore --continue`
redoes a case whose input changed, and IF 2D restores a brain that few model slices hold."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from helpers import FAST, cli, digests, one_error_line, scan, toy_brain, write_nifti

TINY = ["--preset", "tiny", "--device", "cpu"]


def copy_of_run(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    return run


# ------------------------------------------------------------------------------ train --resume


def test_resume_with_other_data_of_the_same_size_is_refused_and_the_run_is_unchanged(tiny_run, tmp_path, capsys):
    """Four other brains under the same case names: the latent table fits, the data does not."""
    other = tmp_path / "other"
    for i in range(4):
        scan(other, f"h{i}", seed=10 + i)
    assert cli(capsys, "prepare", other, "-o", tmp_path / "other_prep", "--preset", "tiny")[0] == 0
    run = copy_of_run(tiny_run, tmp_path)
    before = digests(run)
    assert {"checkpoint.pt", "config.json", "model.pt", "loss.jsonl"} <= set(before)
    code, out, err = cli(capsys, "train", tmp_path / "other_prep", "-o", run, "--epochs", "8", "--resume", *TINY)
    line = one_error_line(err, "train")
    assert code == 2 and f"{run} was trained on other data" in line and "pass the same DATA" in line, line
    assert digests(run) == before


def test_resume_with_the_same_data_continues_the_run(tiny_run, tmp_path, capsys):
    run = copy_of_run(tiny_run, tmp_path)
    code, out, err = cli(capsys, "train", tiny_run / "prep", "-o", run, "--epochs", "7", "--resume", *TINY)
    assert code == 0 and "error" not in err and "training data" not in err, err
    assert json.loads((run / "config.json").read_text())["epochs_done"] == 7


def test_resume_from_a_checkpoint_without_a_data_record_warns_and_continues(tiny_run, tmp_path, capsys):
    """Checkpoints written before the data was recorded cannot be checked: they resume, with a warning."""
    run = copy_of_run(tiny_run, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["data"]
    torch.save(state, run / "checkpoint.pt")
    code, out, err = cli(capsys, "train", tiny_run / "prep", "-o", run, "--epochs", "7", "--resume", *TINY)
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("ifad-fast train: warning: ")]
    assert len(warning) == 1 and "training data" in warning[0], err
    assert "data" in torch.load(run / "checkpoint.pt", weights_only=True)             # recorded from now on


# ------------------------------------------------------------------------------ restore --continue


def test_continue_redoes_a_case_whose_input_changed_and_skips_an_unchanged_one(tiny_run, tmp_path, capsys):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scan(scans, "a", seed=40)
    scan(scans, "b", seed=41)
    args = ["restore", scans, "-m", tiny_run / "run", "-o", out, *FAST]
    assert cli(capsys, *args)[0] == 0
    summary = json.loads((out / "b_restore.json").read_text())
    assert summary["input_sha256"] == hashlib.sha256((scans / "b.nii.gz").read_bytes()).hexdigest()
    first = digests(out)
    write_nifti(scans / "b.nii.gz", toy_brain(42)[0])                  # same name, another scan
    code, stdout, err = cli(capsys, *args, "--continue")
    assert code == 0, err
    assert "b: " in stdout and "changed" in stdout and "1 of 2 cases already done" in stdout, stdout
    now = digests(out)
    assert [now[k] for k in first if k.startswith("a_")] == [first[k] for k in first if k.startswith("a_")]
    assert now["b_anomaly.nii.gz"] != first["b_anomaly.nii.gz"]
    assert json.loads((out / "b_restore.json").read_text())["input_sha256"] == \
        hashlib.sha256((scans / "b.nii.gz").read_bytes()).hexdigest()
    code, stdout, _ = cli(capsys, *args, "--continue")                  # now both are up to date
    assert code == 0 and "2 of 2 cases already done" in stdout and digests(out) == now


# ------------------------------------------------------------------------------ IF 2D, a thin brain


def test_restored_slices_are_the_default_ones_wherever_those_hold_brain():
    """The old rule (each block at its default slice, left out when that holds no brain) on brains whose
    blocks all hold brain at their default slice; elsewhere a block is restored at its brain slice
    nearest to the default one."""
    from ifad_fast.restore.slices import blocks, restored_blocks

    for depth, lo, hi, steps in ((40, 4, 36, (1, 2, 4)), (160, 9, 150, (1, 4)), (24, 6, 18, (3, 6))):
        brain = np.zeros(depth, bool)
        brain[lo:hi] = True
        for step in steps:
            plan = blocks(depth, step)
            assert all(brain[s] or not brain[a:b].any() for s, a, b in plan)        # a normal brain
            assert restored_blocks(brain, step) == [(s, a, b) for s, a, b in plan if brain[s]]
    thin = np.zeros(24, bool)
    thin[11:13] = True                                                   # default slices 9 and 13 miss it
    assert restored_blocks(thin, 4) == [(11, 8, 12), (12, 12, 16)]
    ends = np.zeros(8, bool)
    ends[[1, 5]] = True                                                  # default 3: 1 and 5 as near, the lower
    assert restored_blocks(ends, 8) == [(1, 0, 8)]


def test_if2d_restores_a_brain_thin_along_the_axial_axis(tiny_run, tmp_path, capsys):
    """A brain three scan slices (20 mm) thick, the lowest a small patch: it lies in model slices 10-12
    of the tiny-2d grid, between the default restored slices 9 and 13; each of its two blocks is
    restored at its brain slice nearest to the default one."""
    run = tmp_path / "run2d"
    assert cli(capsys, "train", tiny_run / "prep", "-o", run, "--preset", "tiny-2d", "--epochs", "1",
               "--device", "cpu")[0] == 0
    image = toy_brain(30)[0]
    image[:, :, :12], image[:, :, 15:] = 0, 0
    patch = np.zeros(image.shape[:2], bool)
    patch[9:21, 11:23] = True
    image[:, :, 12] *= patch
    write_nifti(tmp_path / "thin.nii.gz", image)
    code, _, err = cli(capsys, "restore", tmp_path / "thin.nii.gz", "-m", run, "-o", tmp_path / "out",
                       "--schedule", "3x256", "--backend", "torch", "--device", "cpu")
    assert code == 0, err
    anomaly = np.asarray(nib.load(tmp_path / "out" / "thin_anomaly.nii.gz").dataobj)
    brain = image != 0
    assert np.isfinite(anomaly).all() and (anomaly[brain] > 0).mean() > 0.9
