"""Size limits and memory estimates, checked before any expensive work starts.

Each limit is refused with one line that names the option that raises it. The memory
estimates are deliberately simple upper-bound-ish sums of the big arrays a job holds at once
(counted per voxel or per point); they exist to refuse jobs that cannot fit, before they are
killed by the out-of-memory killer, not to predict usage to the byte.
"""
from __future__ import annotations

import os

from .errors import IfadError

#: Largest scan (voxels) read without --max-voxels: 512³ (a 0.5 mm whole-brain scan has ~ 40 M).
DEFAULT_MAX_VOXELS = 512 ** 3
#: Largest model grid side: 512³ voxels on the grid (the paper uses 160, IF 3D* scores at 300).
MAX_RESOLUTION = 512
#: Largest number of points per restoration step (the paper: 16,200; the reference: 50,000).
MAX_POINTS_PER_STEP = 1 << 22
#: Largest total of steps x points of a restoration schedule (~900x the paper's 11.3 M).
MAX_SCHEDULE_POINTS = 10 ** 10

GB = 1024 ** 3
#: Memory of one worker process before its data (Python, torch, NumPy loaded): ~0.4 GB measured.
PROCESS_BYTES = 400 * 1024 ** 2


def check_voxels(shape, max_voxels: int | None, what: str) -> int:
    """Voxel count of `shape`; IfadError when it exceeds `max_voxels` (None: the default)."""
    n = 1
    for s in shape:
        n *= int(s)
    limit = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
    if n > limit:
        raise IfadError(f"{what}: {tuple(int(s) for s in shape)} is {n:,} voxels, more than the limit of "
                        f"{limit:,}; if the scan is real, raise the limit with --max-voxels {n}")
    return n


def check_resolution(resolution, what: str) -> int:
    """A model grid side between 4 and MAX_RESOLUTION; IfadError otherwise."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 4 <= resolution <= MAX_RESOLUTION:
        raise IfadError(f"{what}: resolution {resolution!r} is outside 4..{MAX_RESOLUTION} "
                        "(the model grid is resolution³; the paper uses 160)")
    return resolution


def check_schedule(phases) -> tuple:
    """Phases ((steps, points), ...) within MAX_POINTS_PER_STEP and MAX_SCHEDULE_POINTS."""
    for steps, k in phases:
        if k > MAX_POINTS_PER_STEP:
            raise IfadError(f"schedule: {k:,} points per step is more than the limit of {MAX_POINTS_PER_STEP:,}; "
                            "use fewer points per step (the paper uses 16,200)")
    total = sum(steps * k for steps, k in phases)
    if total > MAX_SCHEDULE_POINTS:
        raise IfadError(f"schedule: {total:,} points in all (steps x points) is more than the limit of "
                        f"{MAX_SCHEDULE_POINTS:,}; use fewer steps (the paper uses 700 x 16,200)")
    return tuple(phases)


def available_memory(device=None) -> int | None:
    """Bytes that can still be allocated on `device` (host memory for the CPU); None if unknown."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: float, what: str, advice: str, device=None) -> None:
    """IfadError when `need` bytes are more than the memory available on `device`."""
    have = available_memory(device)
    if have is not None and need > have:
        where = "GPU memory" if device is not None and getattr(device, "type", "") == "cuda" else "memory"
        raise IfadError(f"{what} needs about {need / GB:.1f} GB of {where} but only {have / GB:.1f} GB is "
                        f"available; {advice}")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_processes(nproc: int, threads: int | None, device=None) -> None:
    """IfadError when `nproc` processes of `threads` threads each cannot run well here: more
    threads than cores, more CPU processes than cores, or more processes than memory for them."""
    cores = usable_cores()
    if threads is not None and threads * nproc > cores:
        asked = f"--threads {threads} × --nproc {nproc} = {threads * nproc} threads" if nproc > 1 else \
            f"--threads {threads}"
        raise IfadError(f"{asked} is more than the {cores} CPU cores this machine gives (the extra threads only "
                        f"slow the others down); use --threads {max(1, cores // nproc)} or fewer")
    if nproc > 1 and getattr(device, "type", str(device)) == "cpu" and nproc > cores:
        raise IfadError(f"--nproc {nproc} is more than the {cores} CPU cores this machine gives (the extra "
                        f"processes only slow the others down); use --nproc {cores} or fewer")
    if nproc > 1:
        check_memory(nproc * PROCESS_BYTES, f"--nproc {nproc} ({PROCESS_BYTES / GB:.1f} GB per process)",
                     "use fewer processes")


def point_bytes(mc) -> int:
    """Bytes held per decoder point in a forward + backward pass (activations kept for autograd)."""
    return 4 * (mc.input_dim + 3 * mc.hidden * mc.n_layers + 4 * mc.n_classes) + 64


def restore_bytes(mc, resolution: int, points_per_step: int, batch: int = 1, native_voxels: int = 0,
                  cube_voxels: int = 0) -> int:
    """Peak bytes of restoring `batch` scans: model-grid arrays (~64 B/voxel: classes, brain mask,
    point lists, scores, float64 pooling), one step's points, the native-grid in/out arrays."""
    grid = resolution ** 3
    return batch * (64 * grid + 12 * cube_voxels + 24 * native_voxels + points_per_step * point_bytes(mc))


def train_bytes(mc, tc, resolution: int, n_volumes: int) -> int:
    """Peak bytes of training: the brain sampler's tables and one batch's points (a batch holds
    at most every sample, whatever volumes_per_batch asks). The class
    volumes are memory-mapped (paged in and out by the OS), so they are not counted."""
    from .sampling import sampler_bytes
    tables = sampler_bytes(n_volumes, (resolution,) * 3) if tc.brain_fraction > 0 else 0
    samples = n_volumes * (resolution if mc.variant == "2d" else 1)     # at most a slice per grid row in 2D
    return tables + min(tc.volumes_per_batch, samples) * tc.points_per_volume * point_bytes(mc)


def prepare_bytes(resolution: int, native_voxels: int, cube_voxels: int) -> int:
    """Peak bytes of preparing one scan: the float32 scan and its normalised copy, the padded
    cube, the model-grid volume and its classes."""
    return 12 * native_voxels + 8 * cube_voxels + 12 * resolution ** 3
