"""The folder loop of `Restorer.restore_files`: groups of scans loaded, restored and written in turn or
overlapped (the next group loads and the last one is written while one restores), with its numbered lines."""
from __future__ import annotations

import dataclasses
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IfadError
from ..io import Scan, case_name, load_scan, save_json
from ..progress import duration
from .outputs import RUN_ARGS, write_bids_description, write_outputs
from .results import NativeResult


def check_files_options(existing: str, batch) -> None:
    """IfadError for a bad `existing` or `batch` of restore_files (before any work)."""
    if existing not in ("refuse", "continue", "overwrite"):
        raise IfadError(f"existing must be refuse, continue or overwrite, got {existing!r}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise IfadError(f"--batch must be at least 1, got {batch}")


def check_figure(figure) -> None:
    """IfadError unless `figure` is False, True or a convention of figures.CONVENTIONS, and
    matplotlib is installed when a figure is asked for."""
    if not figure:
        return
    from ..extras import require
    from ..figures import CONVENTIONS
    if isinstance(figure, str) and figure not in CONVENTIONS:
        raise IfadError(f"figure must be one of {', '.join(CONVENTIONS)}, got {figure!r}")
    require("matplotlib")


def shard_of(paths: list, shard: tuple[int, int] | None) -> list:
    """Cases rank, rank + world, ... of `paths` for shard (rank, world); all of them for None."""
    if shard is None:
        return paths
    rank, world = shard
    if not 0 <= rank < world:
        raise IfadError(f"shard {rank} of {world} does not exist")
    return paths[rank::world]


def eta_text(seconds_done: float, done: int, left: int) -> str:
    """', ETA <duration>' for a run that took `seconds_done` for `done` cases with `left` to go ('' before the
    first case and after the last)."""
    if done == 0 or left == 0:
        return ""
    return f", ETA {duration(seconds_done / done * left)}"


class FilesProgress:
    """The cases of one restore_files run that failed (path -> why), the summaries of those written,
    and a numbered line per finished one."""

    def __init__(self, total: int, report, out_dir: Path):
        self.total, self.report, self.out_dir, self.done, self.restored = total, report, out_dir, 0, 0
        self.failed: dict = {}
        self.summaries: list[dict] = []
        self.runnable: list = []
        self.t_start = time.perf_counter()

    def log(self, name: str, text: str) -> None:
        """Report the next numbered line: 'k/n name: text'."""
        self.done += 1
        self.report(f"{self.done}/{self.total} {name}: {text}")

    def fail(self, path, why: str) -> None:
        """Record that `path` failed and why (a numbered line when the run has more than one case)."""
        self.failed[path] = why
        if self.total > 1:                           # one scan: the final error line says it
            self.log(case_name(path), f"failed: {why}")

    def fail_all(self, failed) -> None:
        """`fail` for each (path, why) in turn."""
        for path, why in failed:
            self.fail(path, why)

    def written(self, scan: Scan, res: NativeResult, summary: dict) -> None:
        """Record a written case and report its line: seconds, final loss, max anomaly, where, time left."""
        self.summaries.append(summary)
        self.restored += 1
        left = sum(1 for q in self.runnable if q not in self.failed) - self.restored
        self.log(scan.name, f"{res.seconds:.1f} s, final loss {res.model_grid.losses[-1]:.4f}, "
                            f"max anomaly {res.anomaly.max():.3f} -> {self.out_dir}"
                            f"{eta_text(time.perf_counter() - self.t_start, self.restored, left)}")


class CaseWriter:
    """Writes a case's outputs (`write_outputs` with `options`), and after the first one the run's
    arguments (RUN_ARGS, and with BIDS names dataset_description.json) when `run_args` is given."""

    def __init__(self, out_dir: Path, run_args: dict | None, **options):
        self.out_dir, self.run_args, self.options = out_dir, run_args, options

    def __call__(self, scan: Scan, res: NativeResult) -> dict:
        summary = write_outputs(scan, res, self.out_dir, **self.options)
        if self.run_args is not None:
            save_json(self.out_dir / RUN_ARGS, self.run_args)
            if self.options["bids"]:
                write_bids_description(self.out_dir)
            self.run_args = None
        return summary

    def group(self, restored: list) -> tuple[list[dict], BaseException | None]:
        """Write each (Scan, NativeResult) in turn -> (their summaries, the exception that stopped
        the writing or None)."""
        summaries = []
        for scan, res in restored:
            try:
                summaries.append(self(scan, res))
            except BaseException as exc:
                return summaries, exc
        return summaries, None


def logged(behind, run: FilesProgress) -> None:
    """Wait for a group's writes (behind: (restored, future of `CaseWriter.group`) or None), log
    each written case, then raise what stopped the writing, as writing in turn would have."""
    if behind is None:
        return
    restored, future = behind
    summaries, error = future.result()
    for (scan, res), summary in zip(restored, summaries):
        run.written(scan, res, summary)
    if error is not None:
        raise error


@dataclass
class Loaded:
    """One scan of a group as `load_group` left it: loaded, or why not (an IfadError's message), or
    the unexpected exception that stopped the group's loading; with the warnings its loading held."""

    path: Path
    scan: Scan | None = None
    why: str | None = None
    error: Exception | None = None
    notes: list = dataclasses.field(default_factory=list)


def load_group(paths, max_voxels, force) -> list[Loaded]:
    """Load the scans of `paths` in turn (in any thread: nothing is reported or warned here), up to
    the first unexpected exception."""
    loaded = []
    for p in paths:
        one = Loaded(p)
        loaded.append(one)
        try:
            one.scan = load_scan(p, max_voxels=max_voxels, force=force, notes=one.notes)
        except IfadError as exc:
            one.why = str(exc)
        except Exception as exc:
            one.error = exc
            break
    return loaded


def note_loaded(loaded: list[Loaded], run: FilesProgress) -> list[Scan]:
    """Issue each scan's held warnings and record its failure, in order -> the loaded scans; raises
    the exception that stopped the loading."""
    scans = []
    for one in loaded:
        for note in one.notes:
            warnings.warn(note, stacklevel=2)
        if one.error is not None:
            raise one.error
        if one.scan is None:
            run.fail(one.path, one.why)
        else:
            scans.append(one.scan)
    return scans


def restore_in_turn(restore_group, groups, run: FilesProgress, load, write: CaseWriter, decision) -> None:
    """Load, restore and write each group of paths, one after the other; `run.written` logs each case.
    restore_group: (scans, decision) -> ([(Scan, NativeResult)] restored, [(path, why)] failed), as
    `Restorer._restore_group`; load: paths -> [Loaded]; write: a `CaseWriter`."""
    for paths in groups:
        restored, failed = restore_group(note_loaded(load(paths), run), decision)
        run.fail_all(failed)
        for scan, res in restored:
            run.written(scan, res, write(scan, res))


def restore_overlapped(restore_group, groups, run: FilesProgress, load, write: CaseWriter, decision) -> None:
    """`restore_in_turn`, but while a group restores, the next one loads and the previous one's
    outputs are written, each in a background thread (one group ahead and one behind at most).
    The lines, warnings and errors are those of `restore_in_turn` in the same order: a group's
    written cases are logged once the next group has restored."""
    reader = ThreadPoolExecutor(1, thread_name_prefix="ifad-load")
    writer = ThreadPoolExecutor(1, thread_name_prefix="ifad-write")
    behind = None                                   # the previous group: (restored, its writes' future)
    try:
        ahead = reader.submit(load, groups[0])
        for i in range(len(groups)):
            loaded = ahead.result()
            if i + 1 < len(groups):
                ahead = reader.submit(load, groups[i + 1])
            scans = [one.scan for one in loaded if one.scan is not None]
            stop = any(one.error is not None for one in loaded)
            try:
                restored, failed = ([], []) if stop else restore_group(scans, decision)
            finally:
                done, behind = behind, None
                logged(done, run)
                note_loaded(loaded, run)           # raises what stopped the loading
            run.fail_all(failed)
            behind = restored, writer.submit(write.group, restored)
    finally:
        reader.shutdown(wait=False, cancel_futures=True)
        try:
            logged(behind, run)
        finally:
            writer.shutdown()
            reader.shutdown()
