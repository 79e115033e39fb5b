"""Training rows of `ifad-fast bench speed` (ifad_fast/benchmarks/speed.py calls `training` and `format_training`).

- One training step (a whole epoch of one batch: draw S × K points, forward, backward with every
  weight gradient and the batch's latents, Adam) per implementation: `plain` (every point reads
  [z, γ(p)], Decoder.logits_at) and `hoisted` (train.hoisted_logits), float32 and bf16.
  Reported: seconds per step, seconds per epoch per scan (= step / S: an epoch visits every
  scan once), and model TFLOP/s = 6 × (multiply-adds per point of the plain decoder) × S × K /
  step time (2 FLOP per multiply-add forward, 4 backward; the same numerator for every row,
  so the ratios are speed-ups).
- Scaling: seconds per epoch of the same job in 1 and in 2 processes (train.train_job under
  distributed.launch; gloo on the CPU with the cores split between the processes, NCCL with one
  GPU each where there are two).

On a shared machine the rows are timed back to back, interleaved, best of `repeats`.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import config as cfg
from ..model import layer_shapes
from ..train import Trainer

STEP_VARIANTS = (("plain", "float32"), ("hoisted", "float32"), ("hoisted", "bf16"))


def train_flop_per_point(mc: cfg.ModelConfig) -> int:
    """6 × multiply-adds of one plain decoder forward per point (forward + backward, model FLOPs)."""
    return 6 * sum(o * i for o, i in layer_shapes(mc))


def synthetic_volumes(n: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(classes, brains), each (n, R, R, R) uint8: the speed suite's synthetic MNI152 brain, shifted
    a voxel or two per copy."""
    from .machine import benchmark_volume
    classes, brain = benchmark_volume(resolution)
    rng = np.random.default_rng(seed)
    shifts = [tuple(rng.integers(-2, 3, 3)) for _ in range(n)]
    volumes, brains = (np.stack([np.roll(v, s, axis=(0, 1, 2)) for s in shifts]).astype(np.uint8)
                       for v in (classes, brain))
    # Numba's OpenMP workers (used by prepare) spin for ~2 s after a parallel region and would
    # slow the torch ops timed next on a 2-core machine ~10x: let them go to sleep first
    time.sleep(3)
    return volumes, brains


def _trainer(preset: cfg.Preset, data, points: int, device, step: str, precision: str) -> Trainer:
    volumes, brains = data
    tc = cfg.replace(preset.train, points_per_volume=points, volumes_per_batch=len(volumes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # bf16 on a CPU without it: timed anyway
        return Trainer(volumes, preset.model, tc, preset.preprocess, np.linspace(0, 1, preset.model.n_classes),
                       device, brains=brains, step=step, precision=precision)


def step_rows(preset_name: str, volumes_per_batch: int, points: int, device, repeats: int,
              variants=STEP_VARIANTS) -> list[dict]:
    """Seconds per step of each (step, precision), timed interleaved; best and median of `repeats`."""
    preset = cfg.get_preset(preset_name)
    data = synthetic_volumes(volumes_per_batch, preset.preprocess.resolution)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    trainers = {v: _trainer(preset, data, points, device, *v) for v in variants}
    for t in trainers.values():                                     # warm-up (allocations, autotuning)
        t.train_epoch()
    sync()
    times = {v: [] for v in variants}
    for _ in range(repeats):
        for v, t in trainers.items():
            t0 = time.perf_counter()
            t.train_epoch()
            sync()
            times[v].append(time.perf_counter() - t0)
    flop = train_flop_per_point(preset.model) * volumes_per_batch * points
    rows = []
    for (step, precision), ts in times.items():
        best = min(ts)
        rows.append(dict(preset=preset_name, batch=f"{volumes_per_batch}×{points:,}", step=step,
                         precision=precision, seconds=best, median=statistics.median(ts),
                         epoch_per_scan=best / volumes_per_batch, tflops=flop / best / 1e12))
    return rows


def scaling_rows(preset_name: str, volumes_per_batch: int, points: int, device, epochs: int,
                 nprocs=(1, 2)) -> list[dict]:
    """Median seconds per epoch (first epoch left out) of one job in 1 and 2 processes."""
    from ..distributed import launch
    from ..train import TrainJob, train_job

    device = torch.device(device)
    preset = cfg.get_preset(preset_name)
    n = 2 * volumes_per_batch
    tc = cfg.replace(preset.train, points_per_volume=points, volumes_per_batch=volumes_per_batch,
                     epochs=epochs, checkpoint_every=10 ** 9)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack, brain_stack = Path(tmp) / "volumes.npy", Path(tmp) / "brains.npy"
        volumes, brains = synthetic_volumes(n, preset.preprocess.resolution)
        np.save(stack, volumes)
        np.save(brain_stack, brains)
        for nproc in nprocs:
            if device.type == "cuda" and torch.cuda.device_count() < nproc:
                rows.append(dict(processes=nproc, threads=None, seconds=None, note=f"needs {nproc} GPUs"))
                continue
            threads = max(1, (os.cpu_count() or 1) // nproc) if device.type == "cpu" else None
            job = TrainJob(volumes=str(stack), brains=str(brain_stack), names=tuple(f"v{i}" for i in range(n)),
                           centres=tuple(np.linspace(0, 1, preset.model.n_classes)), model=preset.model,
                           train=tc, preprocess=preset.preprocess, out=str(Path(tmp) / f"run{nproc}"),
                           device=device.type, threads=threads, progress=False)
            launch(train_job, nproc, job)[0] if nproc > 1 else train_job(job)
            import json
            log = [json.loads(line) for line in (Path(job.out) / "loss.jsonl").read_text().splitlines()]
            rows.append(dict(processes=nproc, threads=threads,
                             seconds=statistics.median(r["seconds"] for r in log[1:])))
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = base / r["seconds"] if r["seconds"] and base else None
        r.update(preset=preset_name, batch=f"{volumes_per_batch}×{points:,}", volumes=n)
    return rows


def training(quick: bool = False, device="cpu", report=print) -> dict:
    """The training rows: the paper preset's step (batch 6 × 16,200; --quick: the small preset,
    4 × 4,096; bf16 only on CUDA or CPUs with native bf16) and 1 → 2 process scaling."""
    device = torch.device(device)
    from ..backends.base import cpu_has_native_bf16
    variants = STEP_VARIANTS
    if device.type == "cpu" and not cpu_has_native_bf16():     # emulated: ~15× slower, not worth timing
        variants = tuple(v for v in variants if v[1] != "bf16")
    if quick:
        steps = step_rows("small", 4, 4096, device, repeats=2, variants=variants)
        scaling = scaling_rows("small", 4, 4096, device, epochs=3)
    else:
        steps = step_rows("paper", 6, 16200, device, repeats=3 if device.type == "cpu" else 20, variants=variants)
        scaling = scaling_rows("paper", 6, 16200, device, epochs=4 if device.type == "cpu" else 30)
    result = dict(steps=steps, scaling=scaling)
    report(format_training(result))
    return result


def format_training(r: dict) -> str:
    """The Markdown tables of `training`'s result: seconds per step by implementation and precision
    (speed-up against the plain step), then seconds per epoch by number of processes."""
    lines = ["| training step | batch | implementation | precision | seconds/step (median) | "
             "s/epoch/scan | model TFLOP/s | vs plain |", "|---|---|---|---|---:|---:|---:|---:|"]
    base = next(s["seconds"] for s in r["steps"] if s["step"] == "plain")
    for s in r["steps"]:
        lines.append(f"| {s['preset']} | {s['batch']} | {s['step']} | {s['precision']} | {s['seconds']:.3f} "
                     f"({s['median']:.3f}) | {s['epoch_per_scan']:.4f} | {s['tflops']:.3f} | "
                     f"{base / s['seconds']:.2f}× |")
    lines += ["", "| training processes | threads each | batch | volumes | seconds/epoch | speed-up |",
              "|---|---:|---|---:|---:|---:|"]
    for s in r["scaling"]:
        threads = s.get("threads") or "–"
        if s["seconds"] is None:
            lines.append(f"| {s['processes']} | {threads} | {s['batch']} | {s['volumes']} | – ({s['note']}) | |")
        else:
            lines.append(f"| {s['processes']} | {threads} | {s['batch']} | {s['volumes']} | {s['seconds']:.3f} | "
                         f"{s['speedup']:.2f}× |")
    return "\n".join(lines)
