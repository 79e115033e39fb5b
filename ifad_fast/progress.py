"""Progress as users expect it: a tqdm bar on a terminal; off one (a batch job, a log file) a line
at a steady interval, `stage: k/N unit (p %), elapsed, ETA`; nothing with `--quiet`.

The level (quiet | normal | verbose) and the command line (recorded in outputs' provenance) live in
environment variables set by the CLI (`cli_run`), so the processes of an `--nproc` run share them.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from contextlib import contextmanager

LEVELS = ("quiet", "normal", "verbose")
#: Seconds between two progress lines off a terminal, per level.
INTERVAL = {"normal": 30.0, "verbose": 5.0}
_ENV = "IFAD_FAST_VERBOSITY"
_COMMAND = "IFAD_FAST_COMMAND"


def level() -> str:
    """quiet | normal (the default) | verbose."""
    value = os.environ.get(_ENV, "normal")
    return value if value in LEVELS else "normal"


def command_line() -> str:
    """The command being run: the CLI's (`ifad-fast restore ...`), else this process's arguments."""
    return os.environ.get(_COMMAND) or shlex.join(sys.argv)


@contextmanager
def cli_run(level: str, argv):
    """Run a block at verbosity `level` as the command `ifad-fast ARGV` (this process and the ones it starts)."""
    values = {_ENV: level, _COMMAND: shlex.join(["ifad-fast", *argv])}
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def say(*args, **kwargs) -> None:
    """print, except with --quiet (for notes and per-case lines, not final summaries)."""
    if level() != "quiet":
        print(*args, **kwargs, flush=True)


def verbose(*args, **kwargs) -> None:
    """print with --verbose only."""
    if level() == "verbose":
        print(*args, **kwargs, flush=True)


def duration(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable=None, initial: int = 0,
                 leave: bool = True):
    """tqdm's interface (update, set_postfix, write, close; iteration): a bar when stderr is a
    terminal, else progress lines on stdout; silent when `disable` is True or with --quiet."""
    if disable is True or level() == "quiet":
        return _Lines(iterable, total, desc, unit, initial, interval=None)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return _Lines(iterable, total, desc, unit, initial, interval=INTERVAL[level()])


class _Lines:
    """A progress line every `interval` seconds (None: never), and a last one at the end of a
    stage that printed any."""

    def __init__(self, iterable, total, desc, unit, initial, interval):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.start, self.interval, self.postfix = initial, initial, interval, ""
        self.t0 = self.last = time.monotonic()
        self.shown, self.closed = None, False          # shown: the count of the last line printed

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.interval is not None and now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        if not self.closed and self.shown not in (None, self.n):
            self._line(time.monotonic())
        self.closed = True

    def _line(self, now: float) -> None:
        self.shown = self.n
        elapsed = now - self.t0
        parts = [f"{self.desc}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f} %)"
        parts.append(f"{duration(elapsed)} elapsed")
        done, left = self.n - self.start, (self.total or 0) - self.n
        if done > 0 and left > 0:
            parts.append(f"ETA {duration(elapsed / done * left)}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), flush=True)
