"""Work over several processes: the process group, its collectives, and the launcher.

`ifad-fast train --nproc N` starts N processes itself (`launch`: spawned, rendezvous on a free
port of 127.0.0.1, gloo on CPUs bound to the loopback interface, NCCL on GPUs with rank r on
cuda:r); under `torchrun --nproc_per_node=N -m ifad_fast.cli train ...` the same code reads
RANK, WORLD_SIZE and LOCAL_RANK from the environment (`from_env`). Each process runs the same
training function; `Group` is what it knows of the others. With one process every
collective is a no-op and nothing of torch.distributed is touched. `restore --nproc N` uses
`launch` too, without a process group (each process restores its own cases).

The launched processes end with their launcher, however it ends: SIGTERM or SIGHUP to it stops
them and raises `Stopped`; if it is killed outright they are killed too (Linux's parent-death
signal, and a thread in each that watches its parent elsewhere).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from .errors import IfadError


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank r of `world`, LOCAL_RANK `local` on its machine."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def all_reduce_(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum `flat` over all processes, in place; every process gets the same bits back."""
        if self.world > 1:
            torch.distributed.all_reduce(flat)
        return flat

    def barrier(self):
        """Wait until every process gets here."""
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true in any process (the same answer in every process)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item() > 0

    def agree(self, value: float) -> bool:
        """Whether every process holds the same `value` (e.g. a checksum of replicated state)."""
        if self.world == 1:
            return True
        both = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        return both[0].item() == value and -both[1].item() == value

    @property
    def device(self) -> torch.device:
        """Where this group's collectives run: cuda:local under NCCL, else the CPU."""
        if self.world > 1 and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", self.local)
        return torch.device("cpu")


SINGLE = Group()


def env_world() -> int:
    """WORLD_SIZE set by torchrun (or by `launch`), 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise IfadError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def from_env(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

    Returns (group, this process's device: cuda:LOCAL_RANK for a CUDA run). World size 1: SINGLE.
    """
    world = env_world()
    if world <= 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise IfadError(f"process {rank} wants cuda:{local} but this machine has "
                            f"{torch.cuda.device_count()} GPUs; start at most that many processes per machine")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             rank=rank, world_size=world,
                                             device_id=device if device.type == "cuda" else None)
    return Group(rank=rank, world=world, local=local), device


def leave():
    """Leave the process group, if this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else None


class Stopped(IfadError):
    """The launcher got SIGTERM or SIGHUP and stopped its processes; exit code 128 + the signal."""

    def __init__(self, signum: int, hint: str = ""):
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f"; {hint}" if hint else ""))
        self.exit_code = 128 + signum


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_PR_SET_PDEATHSIG = 1


def _catch_stop_signals(hint: str) -> dict:
    """Make SIGTERM and SIGHUP raise Stopped here (main thread only; an ignored one, as under
    nohup, stays ignored); returns the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        for s in previous:
            signal.signal(s, signal.SIG_IGN)      # a second signal must not cut the cleanup short
        raise Stopped(signum, hint)

    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    for s in previous:
        signal.signal(s, stop)
    return previous


def _die_with(parent: int):
    """End this process when `parent` (its launcher) ends, even by kill -9: Linux's parent-death
    signal, and elsewhere (or should that fail) a thread that sees the parent pid change."""
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:                    # it ended before the signal was set
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def _worker(rank: int, world: int, port: int, fn, args, conn, parent: int):
    _die_with(parent)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    lo = _loopback_interface()
    if lo and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = lo
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())        # not tqdm's default process lock: a terminated rank would leak it
    code = 0
    try:
        try:
            conn.send(("done", fn(*args)))
        except IfadError as exc:
            code = 2
            conn.send(("user", str(exc)))
        except KeyboardInterrupt:           # Ctrl-C: the run saved its checkpoint (see train.Trainer.run)
            code = 130
            conn.send(("interrupted", None))
        except BaseException:
            code = 1
            conn.send(("crash", traceback.format_exc()))
    except OSError:                         # a broken pipe: the launcher is gone, nobody is listening
        code = code or 1
    finally:
        conn.close()
        leave()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)              # no interpreter teardown (seconds with torch loaded): all is written


def launch(fn, nproc: int, *args, hint: str = ""):
    """Run fn(*args) in `nproc` spawned processes (RANK, WORLD_SIZE, ... set for a process group);
    returns their results, by rank.

    A user error (IfadError) in any process stops the others and is raised here with its
    message; a process that dies without a word (killed) too, with `hint` (how to go on) added;
    any other failure raises RuntimeError with that process's traceback. Ctrl-C in the
    terminal reaches every process: training finishes its epoch, saves and stops (then
    KeyboardInterrupt is raised here); a second Ctrl-C stops everything at once. SIGTERM or
    SIGHUP here stops the processes and raises Stopped (with `hint`).
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    if nproc < 1:
        raise IfadError(f"--nproc must be at least 1, got {nproc}")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs, conns = [], {}
    results, failure, interrupted, signals = {}, None, False, 0
    previous = _catch_stop_signals(hint)
    try:
        for rank in range(nproc):
            reader, writer = ctx.Pipe(duplex=False)
            conns[reader] = rank
            procs.append(ctx.Process(target=_worker, args=(rank, nproc, port, fn, args, writer, os.getpid())))
            procs[-1].start()
            writer.close()
        while conns and failure is None:
            try:
                for conn in wait(list(conns)):
                    rank = conns.pop(conn)
                    try:
                        kind, payload = conn.recv()
                    except EOFError:                    # died without a word (killed, out of memory)
                        procs[rank].join()
                        code = procs[rank].exitcode
                        how = (f"was killed by signal {-code}{' (out of memory?)' if code == -9 else ''}"
                               if code < 0 else f"exited with code {code} before reporting (see its messages above)")
                        kind, payload = "user", f"process {rank} of {nproc} {how}; the others were stopped" + \
                            (f"; {hint}" if hint else "")
                    conn.close()
                    if kind == "done":
                        results[rank] = payload
                    elif kind == "interrupted":
                        interrupted = True
                    else:
                        failure = failure or (kind, rank, payload)
            except KeyboardInterrupt:                   # the processes got it too: wait for them to save
                signals += 1
                if signals > 1:
                    for p in procs:
                        p.join(5)
                    raise
        if failure is not None:
            kind, rank, payload = failure
            if kind == "user":
                raise IfadError(payload)
            raise RuntimeError(f"process {rank} of {nproc} failed:\n{payload}")
        for p in procs:
            p.join()
    except BaseException:
        _stop(procs)
        raise
    finally:
        for conn in conns:
            conn.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if interrupted or signals:
        raise KeyboardInterrupt
    return [results[r] for r in range(nproc)]


def _stop(procs):
    """Terminate (then kill) the processes this launch started that are still running."""
    procs = [p for p in procs if p.pid is not None]
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
