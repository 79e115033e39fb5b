"""Restorer.restore_files with overlap_io (the default on CUDA): the next group loads and the previous
group's outputs are written in background threads while a group restores. Everything a user sees
is what overlap_io=False gives: the files byte for byte (but for timings), the report lines and
warnings in the same order, the same errors, nothing half-written, and no thread left behind."""
from __future__ import annotations

import json
import re
import threading
import warnings

import pytest
from helpers import base_seed, digests, leftovers, random_model, scan, toy_brain, write_nifti

from ifad_fast.api import files as api_files, restorer as api_restorer
from ifad_fast.api import Restorer
from ifad_fast.io import OutputSet, save_volume

SCHEDULE = "6x300"
TIMINGS = ("seconds", "date")       # what differs from one run to the next


@pytest.fixture(scope="module")
def restorer():
    return Restorer(random_model(base_seed()), "torch", "cpu", schedule=SCHEDULE, seed=2)


@pytest.fixture
def scans(tmp_path):
    """Five toy scans a..e; c's file is cut short, d is not skull-stripped (background 5)."""
    folder = tmp_path / "in"
    for i, name in enumerate("abe"):
        scan(folder, name, seed=base_seed() + i, lesion=name == "b")
    cut = scan(folder, "c", seed=base_seed() + 3)
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    write_nifti(folder / "d.nii.gz", toy_brain(base_seed() + 4)[0] + 5.0)
    (folder / "b_mask.nii.gz").unlink()
    return folder


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def contents(folder) -> dict:
    """{file: SHA-256}, the JSON files as their contents without timings."""
    return {name: without_timings(json.loads((folder / name).read_text())) if name.endswith(".json") else digest
            for name, digest in digests(folder).items()}


def without_seconds(line: str) -> str:
    """A report line without its timings (the restoration's seconds and the ETA)."""
    return re.sub(r", ETA .*$", "", re.sub(r"^(\d+/\d+ \S+: )[\d.]+ s, ", r"\1", line))


def run(restorer, folder, out, overlap, **kwargs):
    """restore_files into `out` -> (summaries or the exception raised, events: report lines and warnings
    in order); `out` is then moved to out-<overlap>, so that both runs name the same folder."""
    events = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: events.append(f"warning: {message}")
        threads = threading.active_count()
        try:
            result = restorer.restore_files([folder], out, report=events.append, overlap_io=overlap, **kwargs)
        except (Exception, KeyboardInterrupt) as exc:
            result = exc
        assert threading.active_count() == threads
    if out.exists():
        out.rename(out.with_name(f"{out.name}-{overlap}"))
    return result, [without_seconds(e) for e in events]


@pytest.mark.parametrize("batch, figure", [(1, False), (2, True)])
def test_overlapped_io_writes_and_says_what_io_in_turn_does(restorer, scans, tmp_path, batch, figure):
    if figure:
        pytest.importorskip("matplotlib")
    seen = {}
    for overlap in (False, True):
        error, events = run(restorer, scans, tmp_path / "out", overlap, threshold=0.5, batch=batch, figure=figure,
                            force=True)
        seen[overlap] = str(error), events, contents(tmp_path / f"out-{overlap}")
    assert seen[True] == seen[False]
    error, events, files = seen[True]
    assert error.startswith("1 of 5 scans failed (4 written to") and "c.nii.gz: could not read the voxel data" in error
    assert [e.split(":")[0] for e in events] == ["1/5 a", "2/5 b", "3/5 c", "warning", "4/5 d", "5/5 e"]
    assert "failed: " in events[2] and "skull-stripped" in events[3] and "max anomaly" in events[4]
    kinds = ("_anomaly.nii.gz", "_restoration.nii.gz", "_pred-mask.nii.gz", "_restore.json") + \
        (("_figure.png",) if figure else ())
    assert sorted(files) == sorted(["restore_args.json"] + [n + k for n in "abde" for k in kinds])


def test_loading_and_writing_run_in_their_threads_only_with_overlap(restorer, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    for name in "abc":
        scan(folder, name, seed=base_seed() + ord(name))
    threads = []
    real_load, real_write = api_files.load_scan, api_files.write_outputs

    def load_scan(*a, **k):
        threads.append(("load", threading.current_thread().name.split("_")[0]))
        return real_load(*a, **k)

    def write_outputs(*a, **k):
        threads.append(("write", threading.current_thread().name.split("_")[0]))
        return real_write(*a, **k)
    monkeypatch.setattr(api_files, "load_scan", load_scan)
    monkeypatch.setattr(api_files, "write_outputs", write_outputs)
    # the default (None) overlaps only on CUDA: on this CPU it runs in turn
    for overlap, loader, writer in ((False, "MainThread", "MainThread"), (True, "ifad-load", "ifad-write"),
                                    (None, "MainThread", "MainThread")):
        threads.clear()
        summaries, _ = run(restorer, folder, tmp_path / "out", overlap)
        assert [s["case"] for s in summaries] == ["a", "b", "c"]
        assert sorted(threads) == [("load", loader)] * 3 + [("write", writer)] * 3


@pytest.mark.parametrize("batch", [1, 2])
def test_a_failure_while_writing_propagates_and_leaves_no_half_written_case(restorer, tmp_path, monkeypatch, batch):
    folder = tmp_path / "in"
    for name in "abcde":
        scan(folder, name, seed=base_seed() + ord(name))
    real_write, calls = api_files.write_outputs, []

    def write_outputs(sc, res, out_dir, *a, **k):
        calls.append(sc.name)
        if len(calls) == 2:                           # half of the second case's set, then the fault
            with OutputSet() as outputs:
                save_volume(outputs.add(out_dir / f"{sc.name}_anomaly.nii.gz"), res.anomaly, sc.affine, sc.header)
                raise OSError(28, "No space left on device")
        return real_write(sc, res, out_dir, *a, **k)
    monkeypatch.setattr(api_files, "write_outputs", write_outputs)
    seen = {}
    for overlap in (False, True):
        calls.clear()
        error, events = run(restorer, folder, tmp_path / "out", overlap, batch=batch)
        seen[overlap] = repr(error), events, calls[:], leftovers(tmp_path / f"out-{overlap}")
    assert seen[True] == seen[False]
    error, events, calls, files = seen[True]
    assert error == repr(OSError(28, "No space left on device")) and calls == ["a", "b"]
    assert [e.split(":")[0] for e in events] == ["1/5 a"]
    assert files == ["a_anomaly.nii.gz", "a_restoration.nii.gz", "a_restore.json", "restore_args.json"]


@pytest.mark.parametrize("fault", [ValueError("a bug"), KeyboardInterrupt()])
def test_an_unexpected_error_while_restoring_propagates_after_the_cases_before_it(restorer, tmp_path, monkeypatch,
                                                                                   fault):
    folder = tmp_path / "in"
    for name in "abc":
        scan(folder, name, seed=base_seed() + ord(name))
    real, calls = api_restorer.restore_batch, []

    def restore_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise fault
        return real(*a, **k)
    monkeypatch.setattr(api_restorer, "restore_batch", restore_batch)
    seen = {}
    for overlap in (False, True):
        calls.clear()
        error, events = run(restorer, folder, tmp_path / "out", overlap)
        seen[overlap] = repr(error), events, leftovers(tmp_path / f"out-{overlap}")
    assert seen[True] == seen[False]
    error, events, files = seen[True]
    assert error == repr(fault) and [e.split(":")[0] for e in events] == ["1/3 a"]
    assert files == ["a_anomaly.nii.gz", "a_restoration.nii.gz", "a_restore.json", "restore_args.json"]

