"""`prepare` and `synth` never destroy data: outputs named apart from inputs, a folder holding
outputs refused without --overwrite, a full disk one line with nothing left behind.

Each refusal asserts the exit code, exactly one stderr line, what is left on disk and that the
user's files are byte for byte unchanged (SHA-256). A full disk is injected with monkeypatch at
the call it comes from (shutil.disk_usage, os.posix_fallocate), as in test_cli_hardening.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from ifad_fast.dataset import MANIFEST, INTENSITIES, STACKS
from helpers import cli, digests, leftovers, one_error_line, scan

TINY = ["--preset", "tiny", "--classes", "10"]
TRAIN = ["--preset", "tiny", "--epochs", "1", "--device", "cpu"]
SYNTH = ["--voxel-mm", "4"]
CLASSES, BRAIN = "_ifad-classes.nii.gz", "_ifad-brainmask.nii.gz"


def prepared_names(cases) -> list[str]:
    """The files `prepare` writes for these case names, sorted."""
    return sorted([MANIFEST, *STACKS.values(), INTENSITIES, *(c + s for c in cases for s in (CLASSES, BRAIN))])


# ------------------------------------------------------------------------------ prepare: inputs


def test_prepare_into_the_scans_folder_keeps_a_skull_stripped_scan_named_like_a_brain_mask(tmp_path, capsys):
    """FSL bet names its output `<case>_brain.nii.gz`: it is a scan, and prepare -o its own folder keeps it."""
    folder = tmp_path / "scans"
    scan(folder, "sub01", seed=1)
    scan(folder, "sub01_brain", seed=2)
    before = digests(folder)
    code, out, err = cli(capsys, "prepare", folder, "-o", folder, *TINY)
    assert code == 0, err
    after = digests(folder)
    assert {n: after[n] for n in before} == before
    assert sorted(after) == sorted([*before, *prepared_names(["sub01", "sub01_brain"])])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert [c["name"] for c in manifest["cases"]] == ["sub01", "sub01_brain"]

    code, _, err = cli(capsys, "prepare", folder, "-o", folder, *TINY, "--overwrite")   # outputs are not inputs
    assert code == 0, err
    again = digests(folder)
    assert sorted(again) == sorted(after) and {n: again[n] for n in before} == before


def test_prepare_leaves_an_unrelated_file_named_like_a_case_alone(tmp_path, capsys):
    scan(tmp_path / "in", "sub01")
    out = tmp_path / "out"
    scan(out, "sub01_brain", seed=5)
    scan(out, "sub01_classes", seed=6)
    before = digests(out)
    code, _, err = cli(capsys, "prepare", tmp_path / "in", "-o", out, *TINY)
    assert code == 0, err
    after = digests(out)
    assert {n: after[n] for n in before} == before and sorted(after) == sorted([*before, *prepared_names(["sub01"])])


def test_prepare_refuses_an_output_that_is_an_input_even_with_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    scan(out, "a" + CLASSES.removesuffix(".nii.gz"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.nii.gz").symlink_to(out / f"a{CLASSES}")      # the scan a is that very file
    before = digests(out)
    code, _, err = cli(capsys, "prepare", tmp_path / "in", "-o", out, *TINY, "--overwrite")
    assert code == 2
    line = one_error_line(err, "prepare")
    assert "would overwrite the input" in line and f"a{CLASSES}" in line
    assert digests(out) == before


def test_prepare_overwrite_never_removes_an_input_listed_by_an_old_manifest(tmp_path, capsys):
    """A folder prepared by an older version lists `<case>_brain.nii.gz` as its own; a re-run with
    --overwrite removes that set's files, but not the scan that now has that name."""
    folder = tmp_path / "scans"
    scan(folder, "sub01", seed=1)
    assert cli(capsys, "prepare", folder, "-o", folder, *TINY)[0] == 0
    manifest = json.loads((folder / MANIFEST).read_text())
    for case in manifest["cases"]:                               # as the older version named them
        files = case.pop("files")
        (folder / files["classes"]).rename(folder / f"{case['name']}_classes.nii.gz")
        (folder / files["brain"]).unlink()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    scan(folder, "sub01_brain", seed=2)                          # the user's skull-stripped scan
    scans = {n: h for n, h in digests(folder).items() if n in ("sub01.nii.gz", "sub01_brain.nii.gz")}
    code, _, err = cli(capsys, "prepare", folder, "-o", folder, *TINY, "--overwrite")
    assert code == 0, err
    after = digests(folder)
    assert {n: after[n] for n in scans} == scans
    assert sorted(after) == sorted([*scans, *prepared_names(["sub01", "sub01_brain"])])   # the old set's file gone


# ------------------------------------------------------------------------------ prepare: existing outputs


@pytest.mark.parametrize("name", [MANIFEST, *STACKS.values(), f"sub01{CLASSES}", f"sub01{BRAIN}"])
def test_prepare_refuses_a_folder_holding_any_file_it_would_write(tmp_path, capsys, name):
    scan(tmp_path / "in", "sub01")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's")
    code, _, err = cli(capsys, "prepare", tmp_path / "in", "-o", out, *TINY)
    assert code == 2
    assert name in one_error_line(err, "prepare") and "--overwrite" in err
    assert leftovers(out) == [name] and (out / name).read_bytes() == b"the user's"

    code, _, err = cli(capsys, "prepare", tmp_path / "in", "-o", out, *TINY, "--overwrite")
    assert code == 0, err
    assert leftovers(out) == prepared_names(["sub01"]) and (out / name).read_bytes() != b"the user's"


def test_prepare_into_another_folder_then_train_reads_it(tmp_path, capsys):
    for i in range(3):
        scan(tmp_path / "in", f"h{i}", seed=i)
    inputs = digests(tmp_path / "in")
    prep = tmp_path / "prep"
    assert cli(capsys, "prepare", tmp_path / "in", "-o", prep, *TINY)[0] == 0
    assert leftovers(prep) == prepared_names(["h0", "h1", "h2"]) and digests(tmp_path / "in") == inputs
    code, out, err = cli(capsys, "train", prep, "-o", tmp_path / "run", *TRAIN)
    assert code == 0 and "on 3 volumes" in out, err
    assert not (tmp_path / "run" / "cache").exists()          # the prepared stacks were read in place


def test_a_folder_prepared_with_the_old_file_names_still_trains(tmp_path, capsys):
    for i in range(2):
        scan(tmp_path / "in", f"h{i}", seed=i)
    prep = tmp_path / "prep"
    assert cli(capsys, "prepare", tmp_path / "in", "-o", prep, *TINY)[0] == 0
    manifest = json.loads((prep / MANIFEST).read_text())
    for case in manifest["cases"]:                               # names and layout of an older version
        files = case.pop("files")
        (prep / files["classes"]).rename(prep / f"{case['name']}_classes.nii.gz")
        (prep / files["brain"]).rename(prep / f"{case['name']}_brain.nii.gz")
    del manifest["stacks"]
    for name in STACKS.values():
        (prep / name).unlink()
    (prep / MANIFEST).write_text(json.dumps(manifest))
    code, out, err = cli(capsys, "train", prep, "-o", tmp_path / "run", *TRAIN)
    assert code == 0 and "on 2 volumes" in out, err


# ------------------------------------------------------------------------------ full disk


def _low_disk(monkeypatch, free=4096):
    low = shutil._ntuple_diskusage(1 << 30, (1 << 30) - free, free)
    monkeypatch.setattr("ifad_fast.dataset.shutil.disk_usage", lambda p: low)


def _enospc_on_allocate(monkeypatch):
    def fail(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", fail, raising=False)


@pytest.mark.parametrize("fault", [_low_disk, _enospc_on_allocate], ids=["too little free space", "ENOSPC"])
def test_prepare_on_a_full_disk_is_one_line_naming_the_stack_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                                                 fault):
    for i in range(2):
        scan(tmp_path / "in", f"h{i}", seed=i)
    inputs = digests(tmp_path / "in")
    out = tmp_path / "out"
    fault(monkeypatch)
    code, _, err = cli(capsys, "prepare", tmp_path / "in", "-o", out, *TINY)
    assert code == 2
    line = one_error_line(err, "prepare")
    assert "no space left" in line and str(out / STACKS["classes"]) in line and ".part" not in line
    assert leftovers(out) == [] and digests(tmp_path / "in") == inputs


@pytest.mark.parametrize("data", ["scans", "prepared without stacks"])
@pytest.mark.parametrize("fault", [_low_disk, _enospc_on_allocate], ids=["too little free space", "ENOSPC"])
def test_train_cache_on_a_full_disk_is_one_line_naming_the_stack_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                                                     fault, data):
    for i in range(2):
        scan(tmp_path / "in", f"h{i}", seed=i)
    source = tmp_path / "in"
    if data != "scans":
        source = tmp_path / "prep"
        assert cli(capsys, "prepare", tmp_path / "in", "-o", source, *TINY)[0] == 0
        manifest = json.loads((source / MANIFEST).read_text())
        del manifest["stacks"]
        (source / MANIFEST).write_text(json.dumps(manifest))
        for name in STACKS.values():
            (source / name).unlink()
    before = digests(source)
    run = tmp_path / "run"
    fault(monkeypatch)
    code, _, err = cli(capsys, "train", source, "-o", run, *TRAIN)
    assert code == 2
    line = one_error_line(err, "train")
    assert "no space left" in line and str(run / "cache" / STACKS["classes"]) in line and ".part" not in line
    assert leftovers(run) == [] and digests(source) == before


def test_prepare_without_posix_fallocate_writes_the_same_stacks(tmp_path, capsys, monkeypatch):
    """Where os.posix_fallocate is missing (macOS) the stacks' blocks are written as zeros first."""
    for i in range(2):
        scan(tmp_path / "in", f"h{i}", seed=i)
    assert cli(capsys, "prepare", tmp_path / "in", "-o", tmp_path / "a", *TINY)[0] == 0
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    assert cli(capsys, "prepare", tmp_path / "in", "-o", tmp_path / "b", *TINY)[0] == 0
    for name in STACKS.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ------------------------------------------------------------------------------ synth


def test_synth_refuses_a_folder_holding_a_synthetic_set_without_overwrite(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli(capsys, "synth", "-o", out, "--healthy", "1", "--lesions", "1", *SYNTH)[0] == 0
    before = digests(out)
    for again in (["--healthy", "1", "--lesions", "1"], ["--healthy", "0", "--lesions", "3"]):
        code, _, err = cli(capsys, "synth", "-o", out, *again, *SYNTH, "--seed", "3")
        assert code == 2
        assert "--overwrite" in one_error_line(err, "synth")
        assert digests(out) == before


def test_synth_refuses_a_folder_holding_one_of_its_files(tmp_path, capsys):
    out = tmp_path / "synth"
    scan(out / "lesion", "lesion_0001")                         # the user's own file, no synth manifest
    before = digests(out)
    code, _, err = cli(capsys, "synth", "-o", out, "--healthy", "1", "--lesions", "2", *SYNTH)
    assert code == 2
    assert "lesion_0001.nii.gz" in one_error_line(err, "synth")
    assert digests(out) == before


def test_synth_overwrite_with_a_smaller_set_leaves_only_its_files_and_a_matching_manifest(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli(capsys, "synth", "-o", out, "--healthy", "2", "--lesions", "2", *SYNTH)[0] == 0
    first = digests(out)
    scan(out / "healthy", "mine")                               # the user's files beside the set
    (out / "lesion" / "notes.txt").write_text("keep me")
    theirs = {n: h for n, h in digests(out).items() if n not in first}
    code, _, err = cli(capsys, "synth", "-o", out, "--healthy", "1", "--lesions", "1", *SYNTH, "--seed", "3",
                       "--overwrite")
    assert code == 0, err
    after = digests(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["healthy"] == ["healthy_0000"] and manifest["lesion"] == ["lesion_0000"]
    assert sorted(manifest["cases"]) == ["healthy_0000", "lesion_0000"]
    assert sorted(after) == sorted(["manifest.json", "healthy/healthy_0000.nii.gz", "lesion/lesion_0000.nii.gz",
                                    "lesion/lesion_0000_mask.nii.gz", *theirs])
    assert {n: after[n] for n in theirs} == theirs
    assert after["healthy/healthy_0000.nii.gz"] != first["healthy/healthy_0000.nii.gz"]       # the new seed's
