"""A folder being written (train's run folder, restore's output folder) is locked against a
second writer.

`hold(folder)` takes `folder/.ifad-lock` with flock(2) and writes the holder's pid and host in
it. The kernel drops the lock when its holder dies, however it dies, so a lock file left by a
killed run is stale by construction and simply taken over. On file systems without flock (some
network mounts) the recorded pid decides instead: a dead process on this host holds nothing.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from .errors import IfadError

try:
    import fcntl
except ImportError:                  # not POSIX: the recorded pid decides
    fcntl = None

LOCK_NAME = ".ifad-lock"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine is running (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def hold(folder, option: str = "-o"):
    """Hold the lock on `folder` while the block runs; the folder (and missing parents) is
    created, and removed again on release if it is then empty. Raises IfadError naming the
    process that holds it."""
    folder = Path(folder)
    created = _make_folder(folder)
    try:
        fd = _acquire(folder / LOCK_NAME, option)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK_NAME)       # before closing: a waiter's open file is now a dead one
        os.close(fd)
        _remove_empty(created)


def _acquire(path: Path, option: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            owner = _owner(fd)
            taken = _kernel_lock(fd)
            if taken is None:                          # no flock here: trust the recorded pid
                taken = owner is None or not _alive(*owner)
            elif taken and not _same_file(fd, path):
                os.close(fd)                           # its holder removed it after we opened it: again
                continue
            if not taken:
                who = f"process {owner[0]}" + ("" if owner[1] == socket.gethostname() else f" on {owner[1]}") \
                    if owner else "another process"
                raise IfadError(f"{path.parent} is in use by {who} (another ifad-fast train or restore writing "
                                f"into it); wait for it to finish or stop it, or choose another {option}")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


def _kernel_lock(fd: int) -> bool | None:
    """flock(fd): True when taken, False when another open file holds it, None when unsupported."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:                    # e.g. ENOLCK: a network mount without lock support
        return None
    return True


def _owner(fd: int) -> tuple[int, str] | None:
    """(pid, host) recorded in the lock file, or None when it holds none (new, or half-written)."""
    try:
        pid, host = os.pread(fd, 4096, 0).decode().split()
        return int(pid), host
    except (ValueError, UnicodeDecodeError):
        return None


def _alive(pid: int, host: str) -> bool:
    return host != socket.gethostname() or pid_alive(pid)     # another host's process cannot be asked


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns the folders created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    created = []
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            continue
        except BaseException:
            _remove_empty(created)
            raise
        created.append(p)
    return created


def _remove_empty(created: list[Path]):
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break
