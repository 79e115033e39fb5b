"""Data-parallel training through the CLI: 2 gloo processes on the CPU equal 1 process, and
checkpoints resume at another world size (2 -> 1, 1 -> 2)."""
import json

import numpy as np
import pytest
import torch

from ifad_fast.cli import main
from ifad_fast.model import load_model
from helpers import toy_brain, write_nifti


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    healthy = root / "healthy"
    healthy.mkdir()
    for i in range(5):                                   # 5 volumes: the last batch of each epoch is short
        write_nifti(healthy / f"h{i}.nii.gz", toy_brain(i)[0])
    assert main(["prepare", str(healthy), "-o", str(root / "prep"), "--resolution", "24", "--classes", "10"]) == 0
    return root


def train(prepared, out, epochs, *extra):
    # one thread per process: on a shared 2-core machine more only waits on preempted partners
    args = ["train", prepared / "prep", "-o", out, "--preset", "tiny", "--epochs", epochs, "--device", "cpu",
            "--threads", "1", *extra]
    assert main([str(a) for a in args]) == 0


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "loss.jsonl").read_text().splitlines()]


def assert_same_state(a, b):
    ma, mb = load_model(a), load_model(b)
    for x, y in zip(ma.decoder.state_dict().values(), mb.decoder.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ma.latents, mb.latents, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_under_one(prepared, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    train(prepared, one, 5)
    train(prepared, two, 3, "--nproc", "2")
    assert "in 2 processes" in capsys.readouterr().out
    np.testing.assert_allclose(losses(two), losses(one)[:3], rtol=0, atol=1e-4)
    config = json.loads((two / "config.json").read_text())
    assert config["processes"] == 2
    # the 2-process model loads and restores a scan
    img, _ = toy_brain(20, lesion=True)
    scan = write_nifti(tmp_path / "case.nii.gz", img)
    assert main(["restore", str(scan), "-m", str(two), "-o", str(tmp_path / "out"), "--schedule", "5x256",
                 "--backend", "torch", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "case_anomaly.nii.gz").is_file()
    # its checkpoint (world size 2) resumes in one process and lands where the 1-process run is
    train(prepared, two, 5, "--resume")
    np.testing.assert_allclose(losses(two), losses(one), rtol=0, atol=1e-4)
    assert_same_state(two, one)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_two(prepared, tmp_path):
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    train(prepared, one, 4)
    train(prepared, mixed, 2)
    train(prepared, mixed, 4, "--nproc", "2", "--resume")
    np.testing.assert_allclose(losses(mixed), losses(one), rtol=0, atol=1e-4)
    assert_same_state(mixed, one)


def test_process_count_errors(prepared, tmp_path, capsys, monkeypatch):
    code = main(["train", str(prepared / "prep"), "-o", str(tmp_path / "r"), "--preset", "tiny", "--nproc", "0",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--nproc" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["train", str(prepared / "prep"), "-o", str(tmp_path / "r"), "--preset", "tiny", "--nproc", "2",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "torchrun" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_sharded_restore_writes_each_case_once_and_continue_skips_finished(prepared, tmp_path, capfd):
    import nibabel as nib

    from ifad_fast.api import restore_config, restore_files

    train(prepared, tmp_path / "run", 2)
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        write_nifti(scans / f"c{i}.nii.gz", toy_brain(30 + i, lesion=True)[0])
    model = load_model(tmp_path / "run")
    rc = restore_config(model, "5x256")
    ref = tmp_path / "ref"
    restore_files(model, [scans], ref, rc, "torch", "cpu", progress=False, report=lambda _: None)
    capfd.readouterr()

    out = tmp_path / "out"
    assert main(["restore", str(scans), "-m", str(tmp_path / "run"), "-o", str(out), "--schedule", "5x256",
                 "--backend", "torch", "--device", "cpu", "--nproc", "2"]) == 0
    lines = capfd.readouterr().out.splitlines()
    for i in range(3):
        summary = json.loads((out / f"c{i}_restore.json").read_text())
        assert summary["shard"] == [i % 2, 2]                       # process i % 2 of 2 wrote it
        assert sum(f" c{i}: " in line for line in lines) == 1        # ... and only it
        np.testing.assert_allclose(nib.load(str(out / f"c{i}_anomaly.nii.gz")).get_fdata(),
                                   nib.load(str(ref / f"c{i}_anomaly.nii.gz")).get_fdata(), rtol=1e-4, atol=1e-5)
    # the whole set is checked before any process starts: refused, nothing touched
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code = main(["restore", str(scans), "-m", str(tmp_path / "run"), "-o", str(out), "--schedule", "5x256",
                 "--backend", "torch", "--device", "cpu", "--nproc", "2"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--continue" in err[0]
    # --continue: a shard redoes only its unfinished case (c1 is process 1's), the rest stays as written
    for p in out.glob("c1_*"):
        p.unlink()
    for rank, expect in ((0, []), (1, ["c1"])):
        written = restore_files(model, [scans], out, rc, "torch", "cpu", progress=False, report=lambda _: None,
                                existing="continue", shard=(rank, 2))
        assert [s["case"] for s in written] == expect
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.iterdir() if not p.name.startswith("c1_"))
    assert {p.name for p in out.iterdir()} == set(stamps)
