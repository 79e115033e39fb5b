"""Processes and machine limits: a launcher's workers end with it (SIGTERM, kill -9), a folder
being written is locked against a second writer, and --nproc / --threads / --volumes-per-batch
are checked against the machine's cores and memory."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ifad_fast import limits, locks
from ifad_fast.errors import IfadError
from helpers import FAST, cli, leftovers, one_error_line, scan

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to list a process's children")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of process `pid` from /proc, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = text[text.rindex(")") + 2:].split()[:2]
    return state, int(ppid)


def children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (_stat(int(d.name)) or ("", 0))[1] == pid:
            kids.append(int(d.name))
    return kids


def running(pid: int) -> bool:
    s = _stat(pid)
    return s is not None and s[0] not in "ZX"          # a zombie has ended, only not been waited for


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.05)


def sha256s(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in leftovers(folder)}


class Holder:
    """Another process holding the lock on `folder` (a second writer's view of a running one)."""

    def __init__(self, folder: Path):
        code = "import sys, time\nfrom ifad_fast.locks import hold\nwith hold(sys.argv[1]):\n" \
               "    print('held', flush=True)\n    time.sleep(120)\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "held\n"
        self.pid = self.proc.pid

    def kill(self):
        self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def holder():
    held = []
    yield lambda folder: held.append(Holder(folder)) or held[-1]
    for h in held:
        h.kill()


# ------------------------------------------------------------------ workers end with the launcher


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill -9"])
def test_workers_end_with_their_launcher_and_print_no_traceback(tiny_run, tmp_path, sig):
    run = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "ifad_fast.cli", "train", str(tiny_run / "prep"), "-o",
                                 str(run), "--preset", "tiny", "--epochs", "1000000", "--device", "cpu",
                                 "--threads", "1", "--nproc", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids = []
    try:
        wait_for(lambda: (run / "loss.jsonl").exists() or launcher.poll() is not None, 240, "a first epoch")
        assert launcher.poll() is None, launcher.communicate()
        kids = children(launcher.pid)                  # the two workers (and multiprocessing's tracker)
        assert len(kids) >= 2
        launcher.send_signal(sig)
        out, err = launcher.communicate(timeout=30)
        wait_for(lambda: not any(running(k) for k in kids), 10, "every worker gone")
    finally:
        for k in kids:
            if running(k):
                os.kill(k, signal.SIGKILL)
        launcher.kill()
        launcher.communicate()
    if sig == signal.SIGTERM:
        assert launcher.returncode == 143, err
        line = one_error_line(err, "train")
        assert line.startswith("ifad-fast train: error: stopped by SIGTERM; ") and "--resume" in line
        assert not (run / locks.LOCK_NAME).exists()
    else:
        assert launcher.returncode == -signal.SIGKILL and err == ""
    with locks.hold(run):                              # free for the next writer (a stale file is taken over)
        pass
    assert not [n for n in leftovers(run) if n == locks.LOCK_NAME]


@needs_proc
def test_a_worker_whose_launcher_is_killed_exits_without_the_parent_death_signal(tmp_path):
    """The portable fallback: a thread in the worker sees its parent pid change."""
    worker = "import os, sys, time\nsys.platform = 'elsewhere'\nfrom ifad_fast.distributed import _die_with\n" \
             "_die_with(os.getppid())\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n"
    launcher = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', sys.argv[1]])\ntime.sleep(120)\n"
    parent = subprocess.Popen([sys.executable, "-c", launcher, worker], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert running(child)
        parent.kill()
        parent.wait(30)
        wait_for(lambda: not running(child), 10, "the worker gone")
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------ a folder in use has one writer


def test_a_second_train_or_restore_into_a_folder_in_use_is_refused_naming_its_process(tiny_run, tmp_path,
                                                                                      capsys, holder):
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(tiny_run / "run", run)
    held = holder(run)
    before = sha256s(run)
    code, _, err = cli(capsys, "train", tiny_run / "prep", "-o", run, "--preset", "tiny", "--epochs", "8",
                       "--device", "cpu", "--resume")
    assert code == 2 and f"process {held.pid}" in one_error_line(err, "train") and "in use" in err
    assert sha256s(run) == before

    good = scan(tmp_path / "in", "a", seed=60)
    out.mkdir()
    held = holder(out)
    code, _, err = cli(capsys, "restore", good, "-m", tiny_run / "run", "-o", out, *FAST)
    assert code == 2 and f"process {held.pid}" in one_error_line(err, "restore")
    assert leftovers(out) == [locks.LOCK_NAME]                    # the holder's, nothing of ours


def test_a_live_lock_is_refused_and_a_killed_holders_lock_taken_over(tmp_path, holder):
    folder = tmp_path / "run"
    held = holder(folder)
    with pytest.raises(IfadError, match=f"in use by process {held.pid}"):
        with locks.hold(folder):
            pass
    held.kill()                                        # kill -9: its lock file stays, the kernel lock goes
    assert (folder / locks.LOCK_NAME).exists()
    with locks.hold(folder):
        assert (folder / locks.LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert leftovers(folder) == []                     # released: the lock file removed
    with locks.hold(tmp_path / "new" / "run"):          # a folder the lock creates is removed with it
        assert (tmp_path / "new" / "run" / locks.LOCK_NAME).is_file()
    assert not (tmp_path / "new").exists()


def test_without_flock_a_dead_pid_is_a_stale_lock_and_a_live_one_holds(tmp_path, monkeypatch, holder):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / locks.LOCK_NAME).write_text(f"{dead.pid} {os.uname().nodename}\n")
    with locks.hold(folder):
        assert (folder / locks.LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert folder.is_dir() and leftovers(folder) == []
    live = holder(tmp_path / "other")
    (folder / locks.LOCK_NAME).write_text(f"{live.pid} {os.uname().nodename}\n")
    with pytest.raises(IfadError, match=f"in use by process {live.pid}"):
        with locks.hold(folder):
            pass


# ------------------------------------------------------------------ options against the machine


def _train(tiny_run, out, *extra):
    return ["train", tiny_run / "prep", "-o", out, "--preset", "tiny", "--epochs", "1", "--device", "cpu", *extra]


LIMITS = {
    "nproc > cores": (["--nproc", "3"], 2, 64, "--nproc 3 is more than the 2 CPU cores"),
    "nproc > memory": (["--nproc", "64"], 128, 23, "--nproc 64 (0.4 GB per process) needs about 25.0 GB of memory"),
    "threads > cores": (["--threads", "4096"], 2, 64, "--threads 4096 is more than the 2 CPU cores"),
    "threads × nproc > cores": (["--threads", "2", "--nproc", "2"], 2, 64,
                                "--threads 2 × --nproc 2 = 4 threads is more than the 2 CPU cores"),
}
CASES = [("train", k) for k in LIMITS] + [("restore", k) for k in LIMITS if "threads" not in k]  # no restore --threads


@pytest.mark.parametrize("command, case", CASES, ids=[f"{c}: {k}" for c, k in CASES])
def test_processes_and_threads_beyond_the_machine_are_refused(tiny_run, tmp_path, capsys, monkeypatch, command, case):
    extra, cores, memory_gb, expect = LIMITS[case]
    monkeypatch.setattr(limits, "usable_cores", lambda: cores)
    monkeypatch.setattr(limits, "available_memory", lambda device=None: memory_gb * limits.GB)
    out = tmp_path / "out"
    args = _train(tiny_run, out, *extra) if command == "train" else \
        ["restore", scan(tmp_path / "in", "a", seed=62), "-m", tiny_run / "run", "-o", out, *FAST, *extra]
    code, _, err = cli(capsys, *args)
    assert code == 2 and expect in one_error_line(err, command), err
    assert not out.exists()


def test_a_batch_larger_than_the_data_set_trains_on_all_of_it(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, *_train(tiny_run, out, "--volumes-per-batch", "100000000", "--threads", "1"))
    assert code == 0, err
    assert "trained tiny model" in stdout and (out / "model.pt").is_file()
