"""One process's share of a restore run split over processes (`ifad-fast restore --nproc N`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .. import config as cfg
from ..backends.factory import resolve_device
from ..errors import IfadError
from ..io import find_scans
from ..model import Model, load_model
from ..progress import say
from .outputs import refuse_existing
from .restorer import (
    Restorer,
    default_model,
    resolve_threshold,
    with_bias_correction,
    with_registration,
)


@dataclass(frozen=True)
class RestoreJob:
    """`restore_files` arguments as every process of a sharded restore sees them (picklable)."""

    model: str | None            # model file or run folder; None: the bundled model
    inputs: tuple
    out_dir: str
    rc: cfg.RestoreConfig
    backend: str = "auto"
    device: str = "cpu"          # cpu | cuda (process r of a CUDA run takes cuda:LOCAL_RANK)
    precision: cfg.Precision = "float32"
    region: cfg.Region = "brain"
    threshold: float | str | None = None   # a number, 'model' (the model's; check_job resolves it) or None
    batch: int = 1
    existing: str = "refuse"
    figure: bool | str = False
    force: bool = False
    max_voxels: int | None = None
    resolution: int | None = None
    threads: int | None = None
    bias_correction: bool = False
    register: bool = False
    bids: bool = False


def check_job(model: Model, job: RestoreJob, whole_set: bool = True) -> RestoreJob:
    """`job` with its threshold resolved (`resolve_threshold`), checked once before the processes
    that share it start. whole_set: with job.existing 'refuse', an IfadError when job.out_dir holds
    outputs of any of its cases (each process checks only its own shard's)."""
    threshold = resolve_threshold(model, job.threshold, cfg.schedule_name(job.rc), (job.rc.min_pool, job.rc.avg_pool))
    if whole_set and job.existing == "refuse":
        refuse_existing(find_scans(job.inputs), job.out_dir, threshold, job.figure, job.bids)
    return dataclasses.replace(job, threshold=threshold)


def restore_shard(job: RestoreJob) -> dict:
    """This process's shard of `job` (RANK of WORLD_SIZE from the environment, as set by
    distributed.launch or torchrun): {"written": cases written, "error": one line or None}."""


    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(job.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if job.threads:
        torch.set_num_threads(job.threads)
    model = default_model(device) if job.model is None else load_model(job.model, device)
    if job.bias_correction:
        model = with_bias_correction(model)
    if job.register:
        model = with_registration(model, warn=rank == 0)
    tag = f"[{rank + 1}/{world}] " if world > 1 else ""
    try:
        restorer = Restorer(model, job.backend, device, job.precision, job.rc, job.region, job.resolution,
                            progress=rank == 0)
        written = restorer.restore_files(job.inputs, job.out_dir, job.threshold, job.batch,
                                         report=lambda line: say(tag + line), existing=job.existing,
                                         figure=job.figure, force=job.force, max_voxels=job.max_voxels,
                                         shard=(rank, world) if world > 1 else None, bids=job.bids)
    except IfadError as exc:
        return dict(written=None, error=str(exc))
    return dict(written=len(written), error=None)
