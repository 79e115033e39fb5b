"""Bad input, faults and big batches through the CLI: one test per defect class.

Each error case asserts the exit code, that stderr is exactly one `ifad-fast CMD: error:` line
(no traceback), and what is and is not left on disk (no outputs, no temporaries). Faults that
cannot be made for real on any machine (a full disk; permissions, when the tests run as root,
who may read and write anything) are injected with monkeypatch at the system call they come from.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ifad_fast.cli import main
from helpers import AFFINE, FAST, bad_model, cli, leftovers, one_error_line, outputs_of, scan, toy_brain, write_nifti

# ------------------------------------------------------------------ interruption


def test_ctrl_c_then_resume_repeats_the_uninterrupted_run(tiny_run, tmp_path):
    """SIGINT to a training child after its first checkpoint; resume; the loss log and weights
    equal an uninterrupted run's bit for bit (one thread everywhere, so matmul order is fixed)."""
    prep, interrupted, straight = tiny_run / "prep", tmp_path / "interrupted", tmp_path / "straight"
    common = ["--preset", "tiny", "--device", "cpu", "--threads", "1"]
    child = subprocess.Popen([sys.executable, "-m", "ifad_fast.cli", "train", str(prep), "-o", str(interrupted),
                              "--epochs", "1000000", *common],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (interrupted / "checkpoint.pt").exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=240)
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ifad-fast train: interrupted" and "Traceback" not in err
    done = len((interrupted / "loss.jsonl").read_text().splitlines())
    assert done >= 5 and torch.load(interrupted / "checkpoint.pt", weights_only=True)["epoch"] == done
    assert not [n for n in leftovers(interrupted) if n.startswith(".")]

    threads = torch.get_num_threads()
    try:
        target = str(done + 3)
        assert main(["train", str(prep), "-o", str(interrupted), "--epochs", target, "--resume", *common]) == 0
        assert main(["train", str(prep), "-o", str(straight), "--epochs", target, *common]) == 0
    finally:
        torch.set_num_threads(threads)
    logs = [[json.loads(line) for line in (d / "loss.jsonl").read_text().splitlines()] for d in (interrupted, straight)]
    assert len(logs[0]) == len(logs[1]) == done + 3
    for a, b in zip(*logs):
        assert (a["epoch"], a["loss"], a["latent_norm"]) == (b["epoch"], b["loss"], b["latent_norm"])
    wa, wb = (torch.load(d / "model.pt", weights_only=True)["decoder"] for d in (interrupted, straight))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


# ------------------------------------------------------------------- size limits


def _header_only(path: Path, shape, dtype=np.float32) -> Path:
    """A .nii.gz whose header declares `shape` but holds only 1 MB of voxels (a 'gzip bomb' stand-in)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(AFFINE, code=1)
    hdr.set_sform(AFFINE, code=1)
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + b"\0" * (1 << 20))
    return path


def _model_with_resolution(tiny_run, tmp_path, resolution):
    def change(payload, meta):
        meta["preprocess"]["resolution"] = resolution
    return bad_model(tiny_run / "run" / "model.pt", tmp_path / "big.pt", change)


@pytest.mark.parametrize("what", ["1024³ header", "1024³ header (prepare)", "schedule 1x200000000",
                                  "model resolution 2000", "memory estimate", "prepare --resolution 2000"])
def test_size_limits_refused_before_work(tiny_run, tmp_path, capsys, monkeypatch, what):
    model, out = tiny_run / "run", tmp_path / "out"
    good = scan(tmp_path / "in", "good")
    if what == "1024³ header":
        args = ["restore", _header_only(tmp_path / "bomb.nii.gz", (1024,) * 3), "-m", model, "-o", out, *FAST]
        expect = "--max-voxels 1073741824"
    elif what == "1024³ header (prepare)":
        args = ["prepare", _header_only(tmp_path / "bomb.nii.gz", (1024,) * 3), "-o", out, "--centres", "hcp-t2"]
        expect = "--max-voxels"
    elif what == "schedule 1x200000000":
        args = ["restore", good, "-m", model, "-o", out, "--schedule", "1x200000000", "--device", "cpu"]
        expect = "points per step"
    elif what == "model resolution 2000":
        args = ["restore", good, "-m", _model_with_resolution(tiny_run, tmp_path, 2000), "-o", out, *FAST]
        expect = "resolution 2000"
    elif what == "memory estimate":
        monkeypatch.setattr("ifad_fast.limits.available_memory", lambda device=None: 1 << 20)
        args = ["restore", good, "-m", model, "-o", out, *FAST]
        expect = "GB of memory but only 0.0 GB is available"
    else:
        args = ["prepare", good, "-o", out, "--resolution", "2000"]
        expect = "2000 is outside 4..512"
    t0 = time.perf_counter()
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert expect in one_error_line(err, args[0])
    assert outputs_of(out) == []
    assert time.perf_counter() - t0 < 60          # a generous bound, not a timing: the bomb took 80 s + 8.7 GB


# ----------------------------------------------------- one line, not a traceback


def _bad_sform(path: Path, row: int, value: float) -> Path:
    """A toy brain whose sform (the header's only affine) has `row` set to `value` (0: singular, NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(toy_brain(0)[0], None)
    img.set_sform(AFFINE, code=2)
    img.set_qform(None, code=0)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    offset = 280 + 16 * row                               # srow_x, srow_y, srow_z: float32[4] each
    raw[offset:offset + 16] = np.full(4, value, "<f4").tobytes() if row == 2 else \
        np.array([value, *AFFINE[row, 1:]], "<f4").tobytes()
    path.write_bytes(bytes(raw))
    return path


def _write_fail(exc):
    def fail(*a, **k):
        raise exc
    return fail


# damaged model files: change(payload, meta)
def _wrong_type(p, m):
    m["model"]["hidden"] = "64"


def _missing_field(p, m):
    del m["model"]["n_freqs"]


def _missing_preprocess(p, m):
    del m["preprocess"]


def _missing_centres(p, m):
    del p["centres"]


def _class_mismatch(p, m):
    p["centres"] = p["centres"][:5]


def _unknown_prior(p, m):
    m["train"]["prior"] = "magic"


def _faults(tmp_path, monkeypatch):
    """(readonly, unreadable, disk_full_nifti, disk_full_json, disk_full_torch): each patches in one fault
    when called."""
    enospc = OSError(errno.ENOSPC, "No space left on device")

    def readonly():
        real = os.access
        monkeypatch.setattr("ifad_fast.io.os.access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))

    def unreadable():
        real = Path.iterdir

        def iterdir(self):
            if self == tmp_path / "in":
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)
        monkeypatch.setattr(Path, "iterdir", iterdir)

    def disk_full_nifti():
        monkeypatch.setattr("ifad_fast.io.nib.save", _write_fail(enospc))

    def disk_full_json():
        monkeypatch.setattr(Path, "write_text", _write_fail(enospc))

    def disk_full_torch():
        monkeypatch.setattr("torch.save", _write_fail(RuntimeError("[enforce fail at inline_container.cc:595] . "
                                                                   "unexpected pos 1234 vs 1200")))
        low = shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096)
        monkeypatch.setattr("ifad_fast.io.shutil.disk_usage", lambda p: low)

    return readonly, unreadable, disk_full_nifti, disk_full_json, disk_full_torch


def _hostile_cases(tiny_run, tmp_path, monkeypatch):
    """name -> (CLI arguments, what its one error line says, a fault to patch in first or None)."""
    model = tiny_run / "run"
    good = scan(tmp_path / "in", "good")
    sing = _bad_sform(tmp_path / "singular" / "s.nii", 2, 0.0)
    nanaff = _bad_sform(tmp_path / "nanaff" / "n.nii", 0, float("nan"))
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    maps = tmp_path / "maps"
    maps.mkdir()
    img, mask = toy_brain(3, lesion=True)
    write_nifti(maps / "c_anomaly.nii.gz", img)
    raw = (maps / "c_anomaly.nii.gz").read_bytes()
    (maps / "c_anomaly.nii.gz").write_bytes(raw[: len(raw) // 2])       # truncated gzip
    write_nifti(maps / "c_mask.nii.gz", mask)
    synth_root = tmp_path / "synth"
    scan(synth_root / "healthy", "healthy_0000")
    (synth_root / "manifest.json").write_text(json.dumps({"generator": "ifad_fast.synth", "cases": {}}))
    src = model / "model.pt"
    M = lambda name, change: bad_model(src, tmp_path / f"{name}.pt", change)  # noqa: E731

    out = tmp_path / "out"
    restore = lambda *a: ["restore", *a, "-m", model, "-o", out, *FAST]  # noqa: E731
    train = lambda data, *a: ["train", data, "-o", out, "--preset", "tiny", "--device", "cpu", *a]  # noqa: E731
    readonly, unreadable, disk_full_nifti, disk_full_json, disk_full_torch = _faults(tmp_path, monkeypatch)

    return {
        "restore: singular affine": (restore(sing), "affine is singular", None),
        "prepare: NaN affine": (["prepare", nanaff, "-o", out, "--centres", "hcp-t2"], "affine is singular", None),
        "train: singular affine": (train(tmp_path / "singular"), "affine is singular", None),
        "restore: -o is a file": (["restore", good, "-m", model, "-o", afile, *FAST], "is a file", None),
        "prepare: -o is a file": (["prepare", good, "-o", afile], "is a file", None),
        "train: -o is a file": (["train", tiny_run / "prep", "-o", afile, "--preset", "tiny"], "is a file", None),
        "evaluate: -o is a file": (["evaluate", "--scores", maps, "--masks", maps, "-o", afile], "is a file", None),
        "synth: -o is a file": (["synth", "-o", afile, "--healthy", "1", "--lesions", "0"], "is a file", None),
        "restore: read-only output folder": (["restore", good, "-m", model, "-o", tmp_path, *FAST],
                                             "permission denied", readonly),
        "restore: full disk": (restore(good), "no space left", disk_full_nifti),
        "evaluate: full disk": (["evaluate", "--scores", tiny_run / "ev", "--masks", tiny_run / "ev", "-o", out],
                                "no space left", disk_full_json),
        "train: full disk": (train(tiny_run / "prep", "--epochs", "1"), "no space left", disk_full_torch),
        "restore: unreadable folder": (restore(tmp_path / "in"), "permission denied", unreadable),
        "evaluate: truncated map": (["evaluate", "--scores", maps, "--masks", maps], "c_anomaly.nii.gz", None),
        "train --epochs 0": (train(tiny_run / "prep", "--epochs", "0"), "--epochs", None),
        "train --epochs -1": (train(tiny_run / "prep", "--epochs", "-1"), "--epochs", None),
        "train --threads -1": (train(tiny_run / "prep", "--threads", "-1"), "--threads", None),
        "train --seed -1": (train(tiny_run / "prep", "--seed", "-1"), "--seed", None),
        "train --seed 2**40": (train(tiny_run / "prep", "--seed", str(2 ** 40)), "--seed", None),
        "train on a synth root": (train(synth_root), "healthy", None),
        "prepare --classes 0": (["prepare", good, "-o", out, "--classes", "0"], "--classes", None),
        "prepare --classes 1": (["prepare", good, "-o", out, "--classes", "1"], "--classes", None),
        "model: wrong-typed meta field": (["restore", good, "-m", M("t", _wrong_type), "-o", out, *FAST],
                                          "model.hidden", None),
        "model: missing meta field": (["restore", good, "-m", M("f", _missing_field), "-o", out, *FAST],
                                      "model.n_freqs is missing", None),
        "model: missing preprocess": (["restore", good, "-m", M("p", _missing_preprocess), "-o", out, *FAST],
                                      "'preprocess' is missing", None),
        "model: missing centres": (["restore", good, "-m", M("c", _missing_centres), "-o", out, *FAST],
                                   "no centres", None),
        "model: class-count mismatch": (["restore", good, "-m", M("k", _class_mismatch), "-o", out, *FAST],
                                        "5 intensity centres for a decoder of 10 classes", None),
        "model: unknown prior": (["restore", good, "-m", M("u", _unknown_prior), "-o", out, *FAST],
                                 "prior must be one of paper, reference, none; got 'magic'", None),
    }


HOSTILE_CASES = ["restore: singular affine", "prepare: NaN affine", "train: singular affine", "restore: -o is a file",
           "prepare: -o is a file", "train: -o is a file", "evaluate: -o is a file", "synth: -o is a file",
           "restore: read-only output folder", "restore: full disk", "evaluate: full disk", "train: full disk",
           "restore: unreadable folder", "evaluate: truncated map", "train --epochs 0", "train --epochs -1",
           "train --threads -1", "train --seed -1", "train --seed 2**40", "train on a synth root",
           "prepare --classes 0", "prepare --classes 1", "model: wrong-typed meta field", "model: missing meta field",
           "model: missing preprocess", "model: missing centres", "model: class-count mismatch",
           "model: unknown prior"]


@pytest.fixture(scope="session")
def evaluated(tiny_run):
    """tiny_run/ev: two restored lesion cases with their masks (for evaluate)."""
    ev = tiny_run / "ev"
    if not ev.exists():
        for i in range(2):
            scan(ev, f"case{i}", seed=20 + i, lesion=True)
        assert main(["restore", str(ev), "-m", str(tiny_run / "run"), "-o", str(ev), *FAST]) == 0
    return ev


@pytest.mark.parametrize("what", HOSTILE_CASES)
def test_one_line_not_a_traceback(tiny_run, evaluated, tmp_path, capsys, monkeypatch, what):
    args, expect, patch = _hostile_cases(tiny_run, tmp_path, monkeypatch)[what]
    capsys.readouterr()
    if patch:
        patch()
    before = outputs_of(evaluated)
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert expect in one_error_line(err, str(args[0])), err
    assert outputs_of(tmp_path / "out") == [] and outputs_of(evaluated) == before
    assert not [n for n in leftovers(tmp_path) if Path(n).name.startswith(".")]


# ------------------------------------------------------- no silent wrong answers


def test_no_silent_wrong_answers(tiny_run, tmp_path, capsys):
    model, out = tiny_run / "run", tmp_path / "out"
    good = scan(tmp_path / "in", "good")

    def nan_weights(p, m):
        key = next(k for k in p["decoder"] if k.endswith("original1"))
        p["decoder"][key][0, 0] = float("nan")

    nan_model = bad_model(model / "model.pt", tmp_path / "nan.pt", nan_weights)
    code, _, err = cli(capsys, "restore", good, "-m", nan_model, "-o", out, *FAST)
    assert code == 2 and "holds NaN or Inf" in one_error_line(err, "restore")
    code, _, err = cli(capsys, "restore", good, "-m", model, "-o", out, "--threshold", "nan", *FAST)
    assert code == 2 and "not a finite number" in one_error_line(err, "restore")
    assert outputs_of(out) == []

    img, _ = toy_brain(4)
    head = img + np.random.default_rng(0).normal(60, 10, img.shape).astype(np.float32)   # no zero background
    (tmp_path / "head").mkdir()
    unstripped = write_nifti(tmp_path / "head" / "head.nii.gz", head)
    code, _, err = cli(capsys, "restore", unstripped, "-m", model, "-o", out, *FAST)
    line = one_error_line(err, "restore")
    assert code == 2 and "skull-stripped" in line and "--force" in line and outputs_of(out) == []
    code, _, err = cli(capsys, "restore", unstripped, "-m", model, "-o", out, "--force", *FAST)
    assert code == 0 and err.count("warning: ") == 1 and "skull-stripped" in err and "--force" in err
    summary = (out / "head_restore.json").read_text()
    assert "NaN" not in summary and json.loads(summary)["final_loss"] is not None


# -------------------------------------------------- outputs never destroy inputs


def test_outputs_never_destroy_inputs(tiny_run, tmp_path, capsys):
    model, data = tiny_run / "run", tmp_path / "data"
    for i in range(2):
        scan(data, f"case{i}", seed=30 + i, lesion=True)
    truth = {p.name: p.read_bytes() for p in data.iterdir()}
    code, _, err = cli(capsys, "restore", data, "-m", model, "-o", data, "--threshold", "0.5", *FAST)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name in truth} == truth   # inputs untouched
    assert (data / "case0_pred-mask.nii.gz").is_file()
    # evaluate in the same folder pairs each map with its ground truth, never the prediction or the scan
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        (masks / f"case{i}_mask.nii.gz").write_bytes(truth[f"case{i}_mask.nii.gz"])
    assert cli(capsys, "evaluate", "--scores", data, "--masks", data, "-o", tmp_path / "m1")[0] == 0
    assert cli(capsys, "evaluate", "--scores", data, "--masks", masks, "-o", tmp_path / "m2")[0] == 0
    same, apart = (json.loads((tmp_path / m / "metrics.json").read_text()) for m in ("m1", "m2"))
    assert same == apart and same["dice_best"] < 1.0
    # with the masks gone, the scans themselves (restored sources) are never taken for masks
    for i in range(2):
        (data / f"case{i}_mask.nii.gz").unlink()
    code, _, err = cli(capsys, "evaluate", "--scores", data, "--masks", data)
    assert code == 2 and "no mask for case0, case1" in one_error_line(err, "evaluate")

    # two inputs with one case name: refused, naming both, nothing written
    scan(tmp_path / "p1", "t2")
    scan(tmp_path / "p2", "t2", seed=1)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "restore", tmp_path / "p1" / "t2.nii.gz", tmp_path / "p2", "-m", model, "-o", out, *FAST)
    line = one_error_line(err, "restore")
    assert code == 2 and str(tmp_path / "p1" / "t2.nii.gz") in line and str(tmp_path / "p2" / "t2.nii.gz") in line
    assert outputs_of(out) == []


# ----------------------------------------------------------------------- batches


def test_batches_go_on_and_continue(tiny_run, tmp_path, capsys):
    model, data, out = tiny_run / "run", tmp_path / "data", tmp_path / "out"
    scan(data, "a", seed=40)
    (data / "b.nii.gz").write_bytes(b"\x1f\x8b not really a scan")
    scan(data, "c", seed=41)
    code, stdout, err = cli(capsys, "restore", data, "-m", model, "-o", out, *FAST)
    line = one_error_line(err, "restore")
    assert code == 2 and "1 of 3 scans failed" in line and str(data / "b.nii.gz") in line
    assert "1/3" in stdout and "3/3" in stdout and "ETA" in stdout
    done = {n: (out / n).stat().st_mtime_ns for n in outputs_of(out)}
    assert sorted(done) == [f"{c}{s}" for c in "ac" for s in ("_anomaly.nii.gz", "_restoration.nii.gz",
                                                              "_restore.json")]
    code, _, err = cli(capsys, "restore", data, "-m", model, "-o", out, *FAST)
    assert code == 2 and "--continue" in one_error_line(err, "restore") and "--overwrite" in err
    scan(data, "b", seed=42)                                   # the bad scan is fixed
    code, stdout, err = cli(capsys, "restore", data, "-m", model, "-o", out, "--continue", *FAST)
    assert code == 0 and err == "" and "2 of 3 cases already done" in stdout and "1/1 b" in stdout
    assert all((out / n).stat().st_mtime_ns == t for n, t in done.items())       # finished cases not redone
    assert (out / "b_restore.json").is_file()
    code, stdout, err = cli(capsys, "restore", data, "-m", model, "-o", out, "--overwrite", *FAST)
    assert code == 0 and "3/3" in stdout
    assert all((out / n).stat().st_mtime_ns != t for n, t in done.items() if n.endswith(".json"))


# --------------------------------------------------------------- crash leftovers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_no_crash_leftovers(tiny_run, tmp_path, capsys, monkeypatch):
    model, data, out = tiny_run / "run", tmp_path / "data", tmp_path / "out"
    scan(data, "a", seed=50)
    scan(data, "b", seed=51)
    # what kill -9 leaves: temporaries of a dead writer, in the input and the output folder
    stale = [data / f".a.nii.gz.{_dead_pid()}-abcd1234.part.nii.gz",
             out / f".a_anomaly.nii.gz.{_dead_pid()}-x1y2z3w4.part.nii.gz",
             out / ".b_anomaly.nii.gz.q8w7e6r5.part.nii.gz"]            # the last: an older ifad-fast's name
    out.mkdir()
    for p in stale:
        p.write_bytes(b"\x1f\x8b half a file")
    code, _, err = cli(capsys, "restore", data, "-m", model, "-o", out, *FAST)
    assert code == 0, err
    assert not [n for n in leftovers(out) if n.startswith(".")]                  # stale ones cleaned
    assert sorted(p.name for p in out.glob("*_restore.json")) == ["a_restore.json", "b_restore.json"]

    # a fault in the middle of a case's set (full disk, Ctrl-C): nothing of that case is left
    real_save = nib.save
    calls = []

    def failing_save(img, path):
        calls.append(path)
        if len(calls) == 2:                                           # the first case's restoration map
            raise fault
        real_save(img, path)

    monkeypatch.setattr("ifad_fast.io.nib.save", failing_save)
    for fault, expect_code in ((OSError(errno.ENOSPC, "No space left on device"), 2), (KeyboardInterrupt(), 130)):
        calls.clear()
        target = tmp_path / f"out_{expect_code}"
        code, _, err = cli(capsys, "restore", data, "-m", model, "-o", target, *FAST)
        assert code == expect_code and len(err.strip().splitlines()) == 1, err
        assert leftovers(target) == []                               # no anomaly-only set, no temporaries

    # an interrupted prepare: no class files without a manifest
    calls.clear()
    fault = KeyboardInterrupt()
    code, _, err = cli(capsys, "prepare", data, "-o", tmp_path / "prep", "--resolution", "8", "--centres", "hcp-t2")
    assert code == 130 and err.strip() == "ifad-fast prepare: interrupted"
    assert leftovers(tmp_path / "prep") == []


# ---------------------------------------------------------------------- messages


def test_messages_say_what_happened(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    good = scan(tmp_path / "in", "good")
    def prepare(path):
        return cli(capsys, "prepare", path, "-o", out, "--resolution", "8", "--centres", "hcp-t2")

    # float64 values beyond float32's range
    img, _ = toy_brain(6)
    big = img.astype(np.float64)
    big[big > 0] *= 1e300
    code, _, err = prepare(write_nifti(tmp_path / "big.nii.gz", big))
    assert code == 2 and "beyond float32's range" in one_error_line(err, "prepare")

    # permission: a real chmod where it binds (not for root), else the PermissionError open() raises
    locked = scan(tmp_path / "locked", "locked")
    if os.geteuid() != 0:
        locked.chmod(0)
    else:
        real_open = open

        def guarded_open(path, *a, **k):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *a, **k)
        monkeypatch.setattr("ifad_fast.io.open", guarded_open, raising=False)
    code, _, err = prepare(locked)
    assert code == 2 and "permission denied" in one_error_line(err, "prepare")
    monkeypatch.undo()

    # out of memory while reading voxels
    def no_memory(self, dtype=None, copy=None):
        raise MemoryError
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_memory)
    code, _, err = prepare(good)
    line = one_error_line(err, "prepare")
    assert code == 2 and "not enough memory" in line and "truncated" not in line
    monkeypatch.undo()

    # a library's warning before an error is not printed; on success it comes after the work
    real_load = nib.load

    def noisy_load(path, *a, **k):
        warnings.warn("pixdim[0] (qfac) should be 1 (default) or -1", UserWarning)
        return real_load(path, *a, **k)
    monkeypatch.setattr("ifad_fast.io.nib.load", noisy_load)
    zeros = write_nifti(tmp_path / "zeros.nii.gz", np.zeros((8, 8, 8), np.float32))
    code, _, err = prepare(zeros)
    assert code == 2 and "all voxels are zero" in one_error_line(err, "prepare")
    code, stdout, err = prepare(good)
    assert code == 0 and err.strip().splitlines() == ["ifad-fast prepare: warning: UserWarning: pixdim[0] (qfac) "
                                                      "should be 1 (default) or -1"]
    assert (out / "manifest.json").is_file()


# ------------------------------------------------------------------------------ what users also expect


def test_restore_provenance_threshold_from_model_and_figure(tiny_run, tmp_path, capsys):
    src = tiny_run / "run" / "model.pt"
    good = scan(tmp_path / "in", "good", seed=60)
    code, _, err = cli(capsys, "restore", good, "-m", src, "-o", tmp_path / "o1", "--threshold", *FAST)
    assert code == 2 and "stores no threshold" in one_error_line(err, "restore")

    def store(p, m):
        m["info"]["threshold"] = 0.25
    model = bad_model(src, tmp_path / "with_threshold.pt", store)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "restore", good, "-m", model, "-o", out, "--threshold", "--figure", "--seed", "7",
                            *FAST)
    assert code == 0, err
    summary = json.loads((out / "good_restore.json").read_text())
    assert summary["threshold"] == 0.25
    assert summary["model"] == {"file": os.path.relpath(model.resolve(), out.resolve()),
                                "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    from ifad_fast import __version__
    assert summary["ifad_fast"] == __version__ and summary["seed"] == 7 and summary["device"] == "cpu"
    assert summary["backend"] == "torch" and summary["precision"] == "float32" and summary["region"] == "brain"
    assert summary["schedule"] == [[10, 256]] and summary["frame"]["resolution"] == 24
    anomaly = nib.load(out / "good_anomaly.nii.gz").get_fdata()
    mask = nib.load(out / "good_pred-mask.nii.gz").get_fdata()
    np.testing.assert_array_equal(mask > 0, anomaly.astype(np.float32) >= np.float32(0.25))
    assert (out / "good_figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1/1 good" in stdout


def test_train_provenance_and_a_loss_line_every_epoch(tiny_run, tmp_path, monkeypatch):
    from ifad_fast import __version__
    from ifad_fast.train import Trainer
    config = json.loads((tiny_run / "run" / "config.json").read_text())
    assert config["data"] == str((tiny_run / "prep").resolve()) and config["preset"] == "tiny"
    assert config["ifad_fast"] == __version__

    # a crash in epoch 3 (no checkpoint yet: every 5) keeps the log lines of epochs 1 and 2
    real = Trainer.train_epoch

    def crash_in_third(self):
        if self.epoch == 2:
            raise RuntimeError("crash")
        return real(self)
    monkeypatch.setattr(Trainer, "train_epoch", crash_in_third)
    with pytest.raises(RuntimeError):
        main(["train", str(tiny_run / "prep"), "-o", str(tmp_path / "r"), "--preset", "tiny", "--epochs", "10",
              "--device", "cpu"])
    rows = [json.loads(line) for line in (tmp_path / "r" / "loss.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
def test_paper_preset_on_cpu_warns_with_an_estimate(tmp_path, capsys):
    from ifad_fast import config as cfg
    from ifad_fast.train import estimate_seconds
    p = cfg.get_preset("paper")
    one, rate = estimate_seconds(p.model, p.train, 10, 1)
    assert rate > 0 and one > 0
    assert main(["prepare", str(scan(tmp_path / "in", "h")), "-o", str(tmp_path / "prep"), "--resolution", "160",
                 "--centres", "hcp-t2"]) == 0
    capsys.readouterr()
    code, _, err = cli(capsys, "train", tmp_path / "prep", "-o", tmp_path / "run", "--preset", "paper", "--epochs", "1",
                       "--device", "cpu")
    assert code == 0, err
    assert "warning: the paper preset is GPU-sized" in err and " h on this CPU" in err


def test_restore_array_rejects_wrong_shapes_clearly():
    from ifad_fast.api import default_model, restore_array
    from ifad_fast.errors import IfadError
    img, _ = toy_brain(0)
    with pytest.raises(IfadError, match=r"got shape \(1, 30, 34, 28\) \(drop the leading axis"):
        restore_array(default_model(), img[None])


def test_outputs_keep_qform_and_sform_as_given(tiny_run, tmp_path, capsys):
    img, _ = toy_brain(7)
    c, s = math.cos(0.3), math.sin(0.3)
    oblique = np.array([[c, -s, 0, 5], [s, c, 0, 6], [0, 0, 1, 7], [0, 0, 0, 1.0]]) @ np.diag([1.2, 1.1, 1.3, 1])
    nifti = nib.Nifti1Image(img, None)
    nifti.set_qform(np.diag([1.2, 1.1, 1.3, 1]), code=0)
    nifti.set_sform(oblique, code=2)
    (tmp_path / "in").mkdir()
    nib.save(nifti, tmp_path / "in" / "obl.nii.gz")
    out = tmp_path / "out"
    assert cli(capsys, "restore", tmp_path / "in", "-m", tiny_run / "run", "-o", out, *FAST)[0] == 0
    for name in ("obl_anomaly", "obl_restoration"):
        h = nib.load(out / f"{name}.nii.gz").header
        assert int(h["qform_code"]) == 0 and int(h["sform_code"]) == 2
        np.testing.assert_allclose(h.get_sform(), oblique, atol=1e-6)
        np.testing.assert_allclose(h.get_qform(), np.diag([1.2, 1.1, 1.3, 1]), atol=1e-6)
