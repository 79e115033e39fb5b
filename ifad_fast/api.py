"""The Python API: load a model, restore arrays or files, evaluate score folders.

    import ifad_fast as ifad
    model = ifad.load_model("run/model.pt")          # or ifad.default_model()
    result = ifad.restore_array(model, nib.load("scan.nii.gz"))   # or (volume, affine)
    result.anomaly                                    # numpy (X, Y, Z), the scan's own grid

A model with a physical frame (format 2, the default for new models) needs each scan's affine
(voxel -> world mm): pass a nibabel image, or the array and its affine. Without one it raises
IfadError rather than guess; cube-frame models (format-1 files such as the bundled one, or
`--frame cube`) take bare arrays as before.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import config as cfg
from .backends.factory import resolve_backend, resolve_device
from .errors import IfadError, IfadWarning, out_of_memory
from .io import (BIDS_OUTPUT_FILES, OUTPUT_FILES, OutputSet, Scan, case_name, check_output_folder, check_scan,
                 clean_stale_temporaries, find_scans, header_shape, load_scan, save_json, save_volume)
from .limits import check_memory, restore_bytes
from .model import Model, bundled_model_path, load_model
from .preprocess import IntensityEncoder, Placement, as_scan, prepare
from .progress import command_line, duration, say
from .register import registration_of
from .restore.scoring import Restoration, StageTimes
from .restore.volume import restore_batch

#: The run's arguments and provenance, written beside its outputs once its first case is.
RUN_ARGS = "restore_args.json"


def default_model(device="cpu") -> Model:
    """The bundled model (small preset, trained on synthetic brains)."""
    path = bundled_model_path()
    if not path.is_file():
        raise IfadError("no bundled default model in this install; pass -m MODEL (train one with 'ifad-fast train')")
    return load_model(path, device)


def restoring_prior(model: Model) -> tuple[str, float]:
    """(prior, σ) a model is restored under: the paper's N(0, σ²I) prior on z with the σ its latents were
    trained to, or none for a model trained without a prior.

    paper-trained: its training σ (the prior held its latents there: the bundled model of format 2 has a
    per-dimension RMS of 0.0104 at σ = 0.01). reference-trained (DeepSDF's penalty on ‖z‖, which sets no σ):
    the per-dimension RMS of its training latents, the Gaussian they follow. On the bundled model (48
    subjects, 200 epochs, RMS 0.30) σ = 0.01 pinned z near 0: healthy scans fit worse (restored class
    within one of the scan's 0.56-0.61 vs 0.67-0.80) and their anomaly tails rose (99.9th percentile up to
    2.4 vs 0.86-1.14), while σ = 0.1, 0.3 and no prior detected alike (4 cases, best Dice 0.713-0.715, AP
    0.769-0.771 vs 0.715 / 0.755; bench/RESULTS.md).
    """
    trained = model.train.prior if model.train else "paper"
    if trained == "none":
        return "none", model.train.sigma
    if trained == "reference" and model.latents is not None and model.latents.numel():
        return "paper", float(model.latents.detach().double().pow(2).mean().sqrt())
    return "paper", model.train.sigma if model.train else 0.01


def restore_config(model: Model, schedule: str = "fast", **overrides) -> cfg.RestoreConfig:
    """The RestoreConfig of a named schedule (or 'STEPSxK[,STEPSxK...]'), with the restoring prior of the model's
    training (`restoring_prior`)."""
    prior, sigma = restoring_prior(model)
    base = dict(prior=prior, sigma=sigma)
    base.update(cfg.SCHEDULES[schedule] if schedule in cfg.SCHEDULES else dict(phases=parse_phases(schedule)))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return cfg.RestoreConfig(**base)           # checked there: phases within the limits, the seed


def _check_files_options(existing: str, batch) -> None:
    """IfadError for a bad `existing` or `batch` of restore_files (before any work)."""
    if existing not in ("refuse", "continue", "overwrite"):
        raise IfadError(f"existing must be refuse, continue or overwrite, got {existing!r}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise IfadError(f"--batch must be at least 1, got {batch}")


def check_variant_options(model: Model, resolution: int | None = None) -> None:
    """IfadError for options a model's variant cannot honour: a 2D model restores and scores axial
    slices of its own grid, so it takes no other score resolution."""
    if model.config.variant == "2d" and resolution is not None and resolution != model.preprocess.resolution:
        raise IfadError("a 2D model scores the axial slices it restores, on its own grid "
                        f"({model.preprocess.resolution}³): drop --resolution")


def parse_phases(text: str) -> tuple:
    """'200x8192,30x32768' -> ((200, 8192), (30, 32768))."""
    try:
        phases = tuple(tuple(int(v) for v in part.split("x")) for part in text.split(","))
        if phases and all(len(p) == 2 and p[0] > 0 and p[1] > 0 for p in phases):
            return phases
    except ValueError:
        pass
    raise IfadError(f"unknown schedule {text!r}; use {', '.join(cfg.SCHEDULES)} or STEPSxPOINTS[,STEPSxPOINTS...]")


PROTOCOLS = {
    # the paper's setting: 700 Adam steps of 16,200 points, every voxel of the grid scored and kept
    # (its evaluation on the model grid: `model_grid_maps`)
    "paper": dict(schedule="paper", region="full"),
}


@dataclass
class NativeResult:
    """Outputs in the scan's own grid (X, Y, Z)."""

    anomaly: np.ndarray          # float32
    restoration: np.ndarray      # float32 intensities (normalised units) of the restored classes
    classes: np.ndarray          # uint8 restored classes
    model_grid: Restoration      # everything on the score grid (the model grid, or N³ with resolution=N)
    seconds: float
    placement: Placement | None = None   # how the scan sits in the score grid (model_affine, brain, to_native)
    stages: dict | None = None           # seconds per stage for the batch (Restorer(time_stages=True))


class Restorer:
    """Restores scans with one model, set up once (in the style of nnU-Net's predictor).

        restorer = Restorer(model, backend="auto", device="auto", precision="float32", schedule="fast")
        result = restorer.restore_array(nib.load("scan.nii.gz"))          # NativeResult
        results = restorer.restore_arrays([img1, img2])                    # restored together
        summaries = restorer.restore_files(["scans/"], "out/", threshold="model")

    Everything a restoration depends on is fixed here and resolved once: the device ('auto':
    CUDA if present), the backend (a name, 'auto' by `engines.make_backend`'s policy, or a
    Backend already built), the precision, the latent search (`schedule`: fast | paper |
    reference | 'STEPSxK[,STEPSxK...]' or a RestoreConfig; `seed` and keyword `overrides` such as
    lr=... replace its fields), the scored region (brain | full) and the score resolution
    (None: the model grid; N: an N³ grid of the same frame, IF 3D*). progress: show progress bars.

    pipeline: where a scan is prepared and restored. 'host': NumPy and Numba preprocessing, points
    drawn from a CPU generator and copied each step (the CPU path); 'device': the scan is copied to
    the device once and everything -- percentiles, frame, encoding, mode-pool, point draws (a
    generator on the device), latent search, score grid, pooling, the trip back to the scan's grid
    -- runs there; the maps are copied back once. 'auto' (default): 'device' on CUDA, else 'host'.
    On torch's CPU device the two give the same numbers (tests/test_device_pipeline.py).
    cuda_graphs: replay each phase's step from a CUDA graph (default: on for the device pipeline on
    CUDA; ignored elsewhere). time_stages: record seconds per stage (prepare, search, grid, post,
    native) in each NativeResult.stages, waiting for the device at each stage's end.
    """

    PIPELINES = ("auto", "host", "device")

    def __init__(self, model: Model, backend="auto", device="auto", precision: str = "float32",
                 schedule="fast", region: cfg.Region = "brain", resolution: int | None = None, seed: int | None = None,
                 *, progress: bool = False, pipeline: str = "auto", cuda_graphs: bool | None = None,
                 time_stages: bool = False, **overrides):
        cfg.check_region(region)
        if pipeline not in self.PIPELINES:
            raise IfadError(f"pipeline must be one of {', '.join(self.PIPELINES)}, got {pipeline!r}")
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
                                       or resolution < 4):
            raise IfadError(f"the score resolution must be a whole number of at least 4, got {resolution!r}")
        check_variant_options(model, resolution)
        if model.preprocess.register:
            from .register import require_simpleitk
            require_simpleitk()
        if isinstance(schedule, cfg.RestoreConfig):
            rc = cfg.replace(schedule, seed=seed, **overrides)     # checked by RestoreConfig
        else:
            rc = restore_config(model, schedule, seed=seed, **overrides)
        self.model, self.rc, self.region, self.progress = model, rc, region, bool(progress)
        self.resolution = None if resolution is None else int(resolution)
        self.engine = resolve_backend(backend, model.decoder, device, precision)
        self.device, self.precision = self.engine.device, self.engine.precision
        self.encoder = IntensityEncoder(model.centres.numpy())
        cuda = self.device.type == "cuda"
        self.pipeline = pipeline if pipeline != "auto" else "device" if cuda else "host"
        on_device = self.pipeline == "device"
        self.adam = ("fused" if cuda else "foreach") if on_device else "default"
        self.cuda_graphs = cuda and on_device and (cuda_graphs is None or bool(cuda_graphs))
        self.time_stages = bool(time_stages)
        # the maps' decision threshold (the model's; restore_files adds its own): where an
        # 'adaptive' score grid must be exact
        self.decision = (model.info or {}).get("threshold")

    @property
    def backend(self) -> str:
        """The name of the backend that runs (torch | cpu | triton)."""
        return self.engine.name

    def restore_array(self, volume, affine=None, force: bool = False) -> NativeResult:
        """Restore one scan: an array (X, Y, Z) with its affine, or a nibabel image."""
        return self.restore_arrays([volume], None if affine is None else [affine], force)[0]

    def restore_arrays(self, volumes, affines=None, force: bool = False) -> list[NativeResult]:
        """Restore native scans together; outputs come back on each scan's own grid.

        volumes: arrays (X, Y, Z) (skull-stripped, background 0; 4D with one volume is taken as
        3D) or nibabel images. affines: one 4x4 voxel -> world (mm) matrix per scan (None: the
        images' own; required by physical-frame models, see the module docstring). Each scan is
        checked as the CLI checks a file (`io.check_scan`): one that does not look skull-stripped
        raises IfadError, or with `force` an IfadWarning. The latent is searched on the model
        grid; the maps are scored at `resolution` when one was given.
        """
        affines = [None] * len(volumes) if affines is None else list(affines)
        if len(affines) != len(volumes):
            raise IfadError(f"{len(volumes)} scans but {len(affines)} affines; pass one affine per scan")
        scans = [as_scan(v, a) for v, a in zip(volumes, affines)]
        return self._restore([(check_scan(v, a, f"volume {i}", force), a) for i, (v, a) in enumerate(scans)])

    def _restore(self, scans: list[tuple], decision: float | None = None) -> list[NativeResult]:
        """restore_arrays for checked (array, affine) pairs; decision: the maps' decision threshold
        (default the model's, `self.decision`)."""
        t0 = time.perf_counter()
        stage = StageTimes(self.device, enabled=self.time_stages)
        on_device = self.pipeline == "device"
        pc, resolution = self.model.preprocess, self.resolution
        with stage("prepare"):
            # the device pipeline's one copy of each scan to the device
            inputs = [torch.from_numpy(np.ascontiguousarray(data)).to(self.device) if on_device else data
                      for data, _ in scans]
            prepared = scored = self._prepare(inputs, scans, None)
            if resolution is not None and resolution != pc.resolution:
                scored = self._prepare(inputs, scans, resolution)

            def batch(items):
                return torch.stack(items) if on_device else torch.from_numpy(np.stack(items)).to(self.device)
            classes, brain = batch([p.classes for p in prepared]), batch([p.brain for p in prepared])
            score_classes = None if scored is prepared else batch([p.classes for p in scored])
            score_brain = None if scored is prepared else batch([p.brain for p in scored])
        generator = torch.Generator(self.device if on_device else "cpu").manual_seed(self.rc.seed)
        maps = restore_batch(self.engine, self.model, classes, self.rc, generator, brain=brain, region=self.region,
                             progress=self.progress, score_classes=score_classes, score_brain=score_brain,
                             adam=self.adam, graphs=self.cuda_graphs, stages=stage,
                             threshold=self.decision if decision is None else decision)
        with stage("native"):
            grids = maps.to_host()
            native = []
            for i, (p, r) in enumerate(zip(scored, grids)):
                placement = p.placement
                if on_device:     # back to the scan's grid on the device, then the one copy out
                    anomaly = placement.to_native(maps.anomaly[i]).cpu().numpy()
                    classes = placement.to_native(maps.classes[i], mode="nearest").cpu().numpy()
                    placement = dataclasses.replace(placement, brain=placement.brain.cpu().numpy())
                else:
                    anomaly, classes = placement.to_native(r.anomaly), placement.to_native(r.classes, mode="nearest")
                native.append((anomaly, classes, placement))
        seconds = (time.perf_counter() - t0) / len(scans)
        stages = dict(stage.seconds) if stage.enabled else None
        return [NativeResult(anomaly=anomaly, restoration=self.encoder.decode(classes), classes=classes, model_grid=r,
                             seconds=seconds, placement=placement, stages=stages)
                for (anomaly, classes, placement), r in zip(native, grids)]

    def _restore_scans(self, scans: list[Scan], decision: float | None = None) -> list[NativeResult]:
        """restore_arrays for loaded scans; after a GPU's out-of-memory error, once more with score
        chunks an eighth the size."""
        pairs = [(s.data, s.affine) for s in scans]           # checked by io.load_scan
        try:
            return self._restore(pairs, decision)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
        rc, self.rc = self.rc, cfg.replace(self.rc, chunk=max(1, self.rc.chunk // 8))
        try:
            return self._restore(pairs, decision)
        finally:
            self.rc = rc

    def _prepare(self, inputs, scans, resolution):
        """Each scan on the model grid (or the N³ score grid), as arrays or on the device."""
        pc = self.model.preprocess
        return [prepare(x, self.encoder, pc, pc.test_mode_pool, affine, resolution)
                for x, (_, affine) in zip(inputs, scans)]

    def provenance(self) -> dict:
        """What a restore JSON records about the settings (model file and hash, seed, device, ...)."""
        model, rc = self.model, self.rc
        out = dict(ifad_fast=_version(), **run_provenance(), model=dict(file=model.source, sha256=model.sha256),
                   seed=rc.seed, device=str(self.device), backend=self.backend, precision=self.precision,
                   schedule=[list(p) for p in rc.phases], restore=cfg.to_dict(rc), region=self.region,
                   frame=_frame(model.preprocess), score_resolution=self.resolution or model.preprocess.resolution,
                   pipeline=self.pipeline, variant=model.config.variant)
        if model.config.variant == "2d":
            out["slice_step"] = rc.slice_step
        return out

    def _unrestorable(self, paths, max_voxels, batch: int) -> dict[Path, str]:
        """{path: why} for the scans whose header is unreadable or too large, or whose restoration
        needs more memory than this machine has (IfadError when even the model grid does not fit)."""
        failed: dict[Path, str] = {}
        shapes = {}
        for p in paths:
            try:
                shapes[p] = header_shape(p, max_voxels, "scan")
            except IfadError as exc:
                failed[p] = str(exc)
        k_max = max(k for _, k in self.rc.phases)
        grid_size = max(self.model.preprocess.resolution, self.resolution or 0)
        check_memory(restore_bytes(self.model.config, grid_size, k_max, batch), "restoring on the model grid",
                     "use --batch 1, a smaller schedule (fewer points per step) or a machine with more memory")
        for p, shape in shapes.items():
            n, cube = int(np.prod(shape)), max(shape) ** 3
            try:
                check_memory(restore_bytes(self.model.config, grid_size, k_max, batch, n, cube),
                             f"restoring {p} {shape}", "use --batch 1 or a machine with more memory")
            except IfadError as exc:
                failed[p] = str(exc)
        return failed

    def _restore_group(self, scans: list[Scan], decision) -> tuple[list, list]:
        """Restore loaded scans together -> ([(Scan, NativeResult)] of those restored to finite maps,
        [(path, why)] of the others)."""
        if not scans:
            return [], []
        try:
            results = self._restore_scans(scans, decision)
        except (IfadError, MemoryError, RuntimeError) as exc:
            if not (isinstance(exc, IfadError) or out_of_memory(exc)):
                raise
            why = str(exc) if isinstance(exc, IfadError) else \
                "ran out of memory restoring it; use --batch 1 or a machine with more memory"
            return [], [(scan.path, f"{scan.path}: {why}") for scan in scans]
        finite, failed = [], []
        for scan, res in zip(scans, results):
            if np.isfinite(res.anomaly).all() and np.isfinite(res.model_grid.losses).all():
                finite.append((scan, res))
            else:
                failed.append((scan.path, f"{scan.path}: the restoration gave NaN or Inf scores (the model or this "
                                          "scan is unusable); nothing was written for it"))
        return finite, failed

    def _groups_in_turn(self, groups, run: "_FilesProgress", load, write: "_CaseWriter", decision) -> None:
        """Load, restore and write each group of paths, one after the other; `run.written` logs each case."""
        for paths in groups:
            restored, failed = self._restore_group(_note_loaded(load(paths), run), decision)
            run.fail_all(failed)
            for scan, res in restored:
                run.written(scan, res, write(scan, res))

    def _groups_overlapped(self, groups, run: "_FilesProgress", load, write: "_CaseWriter", decision) -> None:
        """`_groups_in_turn`, but while a group restores, the next one loads and the previous one's
        outputs are written, each in a background thread (one group ahead and one behind at most).
        The lines, warnings and errors are those of `_groups_in_turn` in the same order: a group's
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
                    restored, failed = ([], []) if stop else self._restore_group(scans, decision)
                finally:
                    done, behind = behind, None
                    _logged(done, run)
                    _note_loaded(loaded, run)           # raises what stopped the loading
                run.fail_all(failed)
                behind = restored, writer.submit(write.group, restored)
        finally:
            reader.shutdown(wait=False, cancel_futures=True)
            try:
                _logged(behind, run)
            finally:
                writer.shutdown()
                reader.shutdown()

    def restore_files(self, inputs, out_dir, threshold=None, batch: int = 1, report=print,
                      existing: str = "refuse", figure: bool | str = False, force: bool = False,
                      max_voxels: int | None = None, shard: tuple[int, int] | None = None,
                      bids: bool = False, overlap_io: bool = True) -> list[dict]:
        """Restore scans (files or folders); per case write, as one set, <case>_anomaly.nii.gz,
        <case>_restoration.nii.gz, with a threshold <case>_pred-mask.nii.gz, with `figure`
        <case>_figure.png (True, "neurological" or "radiological": see `figures`), and
        <case>_restore.json last (settings and provenance). bids: BIDS-derivative names instead
        (`BIDS_OUTPUT_FILES`, e.g. sub-01/anat/sub-01_T2w_desc-anomaly_map.nii.gz and its .json
        sidecar) and out_dir/dataset_description.json.

        threshold: None, a number, or "model" (the model's stored threshold). batch: scans
        restored together. existing: what to do with cases whose outputs are already in
        `out_dir`: "refuse" (an IfadError before any work), "continue" (skip the finished ones,
        redo the rest) or "overwrite". Everything is checked before the first restoration; then a
        scan that fails does not stop the others, and an IfadError naming the failed scans is
        raised at the end. Returns the written summaries.

        shard: (rank, world) -- restore only cases rank, rank + world, ... of the sorted scan list
        (one of `world` processes sharing the work; each case is written by exactly one of them).
        overlap_io: while a group of `batch` scans restores, load the next group and write the
        previous one's outputs in background threads (same outputs, lines and errors; each group's
        lines come once the next group has restored); False: one step after the other.
        """
        _check_files_options(existing, batch)
        _check_figure(figure)
        model, rc, region = self.model, self.rc, self.region
        threshold = resolve_threshold(model, threshold)
        decision = min((t for t in (threshold, self.decision) if t is not None), default=None)
        paths = _shard_of(find_scans(inputs), shard)
        if shard is not None and not paths:
            return []
        out_dir = check_output_folder(out_dir)
        provenance = self.provenance()
        if self.model.source:
            provenance["model"]["file"] = portable_path(self.model.source, out_dir)
        if shard is not None:
            provenance["shard"] = list(shard)
        run_args = dict(provenance, inputs=[portable_path(i, out_dir) for i in inputs], threshold=threshold,
                        batch=batch, existing=existing, figure=figure, force=force, max_voxels=max_voxels)
        plan = {p: case_outputs(out_dir, case_name(p), threshold, figure, bids) for p in paths}
        todo = _cases_to_do(plan, out_dir, existing, provenance, threshold, figure, bids, report)
        unrestorable = self._unrestorable(todo, max_voxels, batch)    # before the first restoration
        for folder in {out_dir, *(files["summary"].parent for files in plan.values())}:
            clean_stale_temporaries(folder)                 # --bids writes into the cases' own folders

        run = _FilesProgress(len(todo), report, out_dir)
        for p in todo:
            if p in unrestorable:
                run.fail(p, unrestorable[p])
        run.runnable = [p for p in todo if p not in run.failed]
        write = _CaseWriter(out_dir, run_args if shard is None or shard[0] == 0 else None, threshold=threshold,
                            engine=self.engine, rc=rc, region=region, provenance=provenance, figure=figure,
                            model_threshold=(model.info or {}).get("threshold"), bids=bids)
        groups = [run.runnable[s:s + batch] for s in range(0, len(run.runnable), batch)]
        load = functools.partial(_load_group, max_voxels=max_voxels, force=force)
        restore_groups = self._groups_overlapped if overlap_io and len(groups) > 1 else self._groups_in_turn
        restore_groups(groups, run, load, write, decision)
        summaries = run.summaries
        if run.failed:
            if len(todo) == 1:
                raise IfadError(next(iter(run.failed.values())))
            raise IfadError(f"{len(run.failed)} of {len(todo)} scans failed ({len(summaries)} written to {out_dir}): "
                            + "; ".join(run.failed.values()))
        return summaries


class _FilesProgress:
    """The cases of one restore_files run that failed (path -> why), the summaries of those written,
    and a numbered line per finished one."""

    def __init__(self, total: int, report, out_dir: Path):
        self.total, self.report, self.out_dir, self.done, self.restored = total, report, out_dir, 0, 0
        self.failed: dict = {}
        self.summaries: list[dict] = []
        self.runnable: list = []
        self.t_start = time.perf_counter()

    def log(self, name: str, text: str) -> None:
        self.done += 1
        self.report(f"{self.done}/{self.total} {name}: {text}")

    def fail(self, path, why: str) -> None:
        self.failed[path] = why
        if self.total > 1:                           # one scan: the final error line says it
            self.log(case_name(path), f"failed: {why}")

    def fail_all(self, failed) -> None:
        for path, why in failed:
            self.fail(path, why)

    def written(self, scan: Scan, res: NativeResult, summary: dict) -> None:
        self.summaries.append(summary)
        self.restored += 1
        left = sum(1 for q in self.runnable if q not in self.failed) - self.restored
        self.log(scan.name, f"{res.seconds:.1f} s, final loss {res.model_grid.losses[-1]:.4f}, "
                            f"max anomaly {res.anomaly.max():.3f} -> {self.out_dir}"
                            f"{_eta(time.perf_counter() - self.t_start, self.restored, left)}")


class _CaseWriter:
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


def _logged(behind, run: _FilesProgress) -> None:
    """Wait for a group's writes (behind: (restored, future of `_CaseWriter.group`) or None), log
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
class _Loaded:
    """One scan of a group as `_load_group` left it: loaded, or why not (an IfadError's message), or
    the unexpected exception that stopped the group's loading; with the warnings its loading held."""

    path: Path
    scan: Scan | None = None
    why: str | None = None
    error: Exception | None = None
    notes: list = dataclasses.field(default_factory=list)


def _load_group(paths, max_voxels, force) -> list[_Loaded]:
    """Load the scans of `paths` in turn (in any thread: nothing is reported or warned here), up to
    the first unexpected exception."""
    loaded = []
    for p in paths:
        one = _Loaded(p)
        loaded.append(one)
        try:
            one.scan = load_scan(p, max_voxels=max_voxels, force=force, notes=one.notes)
        except IfadError as exc:
            one.why = str(exc)
        except Exception as exc:
            one.error = exc
            break
    return loaded


def _note_loaded(loaded: list[_Loaded], run: _FilesProgress) -> list[Scan]:
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


def restore_arrays(model: Model, volumes, affines=None, rc: cfg.RestoreConfig | None = None,
                   backend="auto", device="auto", precision="float32", region="brain",
                   progress=False, resolution: int | None = None, force: bool = False) -> list[NativeResult]:
    """`Restorer(model, ...).restore_arrays(volumes, affines, force)` in one call; rc: the
    RestoreConfig (default: the fast schedule). See `Restorer`."""
    return Restorer(model, backend, device, precision, rc or "fast", region, resolution,
                    progress=progress).restore_arrays(volumes, affines, force)


def restore_array(model: Model, volume, affine=None, **kwargs) -> NativeResult:
    """Restore one scan: an array (X, Y, Z) with its affine, or a nibabel image; keyword
    arguments as for `restore_arrays`."""
    return restore_arrays(model, [volume], None if affine is None else [affine], **kwargs)[0]


def model_grid_maps(result: NativeResult, label=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The paper's evaluation grid: (anomaly (N, N, N) float32, brain bool (N, N, N), label bool
    (N, N, N) or None) on the score grid of `result` (the model grid unless restored at another
    resolution). label: a native (X, Y, Z) lesion mask, resampled linearly (order 1), then > 0."""
    placement = result.placement
    lab = None if label is None else placement.label_to_model(label)
    return result.model_grid.anomaly, placement.brain, lab


def _check_figure(figure) -> None:
    """IfadError unless `figure` is False, True or a convention of figures.CONVENTIONS, and
    matplotlib is installed when a figure is asked for."""
    if not figure:
        return
    from .extras import require
    from .figures import CONVENTIONS
    if isinstance(figure, str) and figure not in CONVENTIONS:
        raise IfadError(f"figure must be one of {', '.join(CONVENTIONS)}, got {figure!r}")
    require("matplotlib")


def _shard_of(paths: list, shard: tuple[int, int] | None) -> list:
    """Cases rank, rank + world, ... of `paths` for shard (rank, world); all of them for None."""
    if shard is None:
        return paths
    rank, world = shard
    if not 0 <= rank < world:
        raise IfadError(f"shard {rank} of {world} does not exist")
    return paths[rank::world]


def _cases_to_do(plan: dict, out_dir: Path, existing: str, provenance: dict, threshold, figure, bids: bool,
                 report) -> list:
    """The scans of `plan` ({path: its output files}) to restore: every one, unless `existing` is
    'continue' (finished cases skipped, after checking they were made with the same settings).
    IfadError when an output would replace an input, or outputs exist and `existing` is 'refuse'."""
    paths = list(plan)
    inputs_resolved = {p.resolve(): p for p in paths}
    for files in plan.values():
        for f in files.values():
            if f.resolve() in inputs_resolved:
                raise IfadError(f"{f} would overwrite the input {inputs_resolved[f.resolve()]}; choose another -o")
    states = {p: _case_state(files, p if existing == "continue" else None) for p, files in plan.items()}
    if existing == "refuse":
        refuse_existing(paths, out_dir, threshold, figure, bids)
    if existing != "continue":
        return paths
    for p in paths:
        if states[p] == "complete":
            _check_same_settings(plan[p]["summary"], provenance, threshold)
        elif states[p] == "changed":
            report(f"{case_name(p)}: {p} changed since its outputs were written; restoring it again")
    todo = [p for p in paths if states[p] != "complete"]
    if len(todo) < len(paths):
        report(f"{len(paths) - len(todo)} of {len(paths)} cases already done in {out_dir}; skipping them")
    return todo


def bids_folder(name: str) -> Path:
    """sub-<label>[/ses-<label>]/anat for a BIDS-named case (its sub- and ses- entities), else '.'."""
    entities = dict(part.split("-", 1) for part in name.split("_") if "-" in part)
    if "sub" not in entities:
        return Path(".")
    return Path(f"sub-{entities['sub']}", *([f"ses-{entities['ses']}"] if "ses" in entities else []), "anat")


def case_outputs(out_dir, name: str, threshold=None, figure: bool = False, bids: bool = False) -> dict[str, Path]:
    """The files restore writes for case `name`, the JSON (the completion marker) last; with `bids`,
    BIDS-derivative names in the case's sub-<label>[/ses-<label>]/anat folder (BIDS_OUTPUT_FILES)."""
    keys = ["anomaly", "restoration"] + (["mask"] if threshold is not None else []) + \
           (["figure"] if figure else []) + ["summary"]
    folder, names = (Path(out_dir) / bids_folder(name), BIDS_OUTPUT_FILES) if bids else (Path(out_dir), OUTPUT_FILES)
    return {k: folder / f"{name}{names[k]}" for k in keys}


def cases_with_outputs(paths, out_dir, threshold=None, figure: bool = False, bids: bool = False) -> list[str]:
    """Names of the cases among `paths` that already have some outputs in `out_dir`."""
    return [case_name(p) for p in paths
            if _case_state(case_outputs(out_dir, case_name(p), threshold, figure, bids)) != "absent"]


def refuse_existing(paths, out_dir, threshold=None, figure: bool | str = False, bids: bool = False) -> None:
    """IfadError naming the cases among `paths` that already have outputs in `out_dir` (what
    existing='refuse' refuses), if any."""
    present = cases_with_outputs(paths, out_dir, threshold, figure, bids)
    if present:
        shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise IfadError(f"{out_dir} already holds outputs of {shown}; pass --continue to skip finished cases "
                        "or --overwrite to redo them")


def write_bids_description(out_dir) -> Path:
    """out_dir/dataset_description.json of a BIDS derivative data set generated by ifad-fast."""
    return save_json(Path(out_dir) / "dataset_description.json",
                     dict(Name="ifad-fast anomaly maps", BIDSVersion="1.9.0", DatasetType="derivative",
                          GeneratedBy=[dict(Name="ifad-fast", Version=_version(),
                                            Description="implicit-field anomaly detection: anomaly maps "
                                                        "and restorations of T2-weighted scans")]))


def _case_state(files: dict[str, Path], source=None) -> str:
    """'absent' (nothing written), 'complete' (a readable JSON and every file), 'partial', or with
    the case's input `source`, 'changed': complete, but the input's SHA-256 is not the one its JSON
    records (a JSON that records none counts as complete)."""
    if not any(p.exists() for p in files.values()):
        return "absent"
    try:
        summary = json.loads(files["summary"].read_text())
    except (OSError, ValueError):
        return "partial"
    if not all(p.is_file() for p in files.values()):
        return "partial"
    recorded = summary.get("input_sha256") if isinstance(summary, dict) else None
    return "changed" if source is not None and recorded not in (None, file_sha256(source)) else "complete"


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_same_settings(summary_path: Path, provenance: dict, threshold):
    """IfadError when a finished case (for --continue) was made with another model or settings."""
    try:
        old = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return
    before = dict(model=(old.get("model") or {}).get("sha256"), schedule=old.get("schedule"),
                  region=old.get("region"), threshold=old.get("threshold"), slice_step=old.get("slice_step"),
                  register=(old.get("frame") or {}).get("register", False))
    now = dict(model=provenance["model"]["sha256"], schedule=provenance["schedule"], region=provenance["region"],
               threshold=threshold, slice_step=provenance.get("slice_step"),
               register=provenance["frame"].get("register", False))
    for key, value in before.items():
        if value != now[key]:
            what = "model (another file hash)" if key == "model" else f"{key} ({value!r}, now {now[key]!r})"
            raise IfadError(f"{summary_path} was made with another {what}; pass --overwrite to redo it, "
                            "or use another -o")


def _eta(seconds_done: float, done: int, left: int) -> str:
    if done == 0 or left == 0:
        return ""
    return f", ETA {duration(seconds_done / done * left)}"


def _frame(pc) -> dict:
    return dataclasses.asdict(pc) if dataclasses.is_dataclass(pc) else dict(pc)


def resolve_threshold(model: Model, threshold):
    """None, a finite number, or 'model' (the threshold stored in the model) -> None or a float."""
    if threshold is None:
        return None
    if isinstance(threshold, str) and threshold == "model":
        t = (model.info or {}).get("threshold")
        if t is None:
            raise IfadError("this model stores no threshold; pass a number (--threshold T), e.g. one chosen "
                            "with 'ifad-fast evaluate' on validation cases")
        return float(t)
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise IfadError(f"threshold {threshold!r} is not a number; pass e.g. --threshold 0.5") from None
    if not math.isfinite(t):
        raise IfadError(f"threshold {threshold!r} is not a finite number; pass e.g. --threshold 0.5")
    return t


def restore_files(model: Model, inputs, out_dir, rc: cfg.RestoreConfig | None = None, backend="auto",
                  device="auto", precision="float32", region="brain", threshold=None, batch: int = 1,
                  progress=True, report=print, existing: str = "refuse", figure: bool = False,
                  force: bool = False, max_voxels: int | None = None, resolution: int | None = None,
                  shard: tuple[int, int] | None = None, bids: bool = False, overlap_io: bool = True) -> list[dict]:
    """`Restorer(model, ...).restore_files(inputs, out_dir, ...)` in one call; rc: the
    RestoreConfig (default: the fast schedule). See `Restorer.restore_files`."""
    _check_files_options(existing, batch)
    restorer = Restorer(model, backend, device, precision, rc or "fast", region, resolution, progress=progress)
    return restorer.restore_files(inputs, out_dir, threshold, batch, report, existing, figure, force, max_voxels,
                                  shard, bids, overlap_io)


def _version() -> str:
    from . import __version__
    return __version__


def run_provenance() -> dict:
    """The command line, the date (UTC) and the versions a result depends on."""
    import nibabel

    return dict(command=command_line(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                versions=dict(ifad_fast=_version(), torch=torch.__version__, numpy=np.__version__,
                              nibabel=nibabel.__version__, python=platform.python_version()))


def portable_path(path, folder) -> str:
    """`path` relative to `folder` (so a results folder moves with its inputs); a file shipped
    with the package as 'ifad_fast/...'."""
    path, package = Path(path).resolve(), Path(__file__).resolve().parent
    if path.is_relative_to(package):
        return str(Path(package.name) / path.relative_to(package))
    return os.path.relpath(path, Path(folder).resolve())


def write_outputs(scan: Scan, res: NativeResult, out_dir, threshold, engine, rc, region,
                  provenance: dict | None = None, figure: bool | str = False,
                  model_threshold: float | None = None, bids: bool = False) -> dict:
    """Write one case's outputs as a set (see `case_outputs`), the JSON summary last; returns it.
    The figure's colour scale is set by `threshold`, else by the model's own (`model_threshold`)."""
    out_dir = Path(out_dir)
    name = scan.name
    final = case_outputs(out_dir, name, threshold, figure, bids)
    final["summary"].parent.mkdir(parents=True, exist_ok=True)
    with OutputSet() as outputs:
        save_volume(outputs.add(final["anomaly"]), res.anomaly, scan.affine, scan.header)
        save_volume(outputs.add(final["restoration"]), res.restoration, scan.affine, scan.header)
        if threshold is not None:
            save_volume(outputs.add(final["mask"]), res.anomaly >= threshold, scan.affine, scan.header,
                        dtype=np.uint8)
        if figure:
            from .figures import slices_figure
            brain = scan.data[scan.data > 0]
            shown = scan.data / (np.percentile(brain, 99) if brain.size else 1.0)
            title = f"{name}: anomaly map" + (f", threshold {threshold:.3g}" if threshold is not None else "")
            slices_figure(outputs.add(final["figure"]), shown, res.restoration, res.anomaly, affine=scan.affine,
                          title=title, threshold=model_threshold if threshold is None else threshold,
                          predicted=None if threshold is None else res.anomaly >= threshold,
                          convention=figure if isinstance(figure, str) else "neurological")
        summary = dict(case=name, source=portable_path(scan.path, out_dir) if scan.path else None,
                       input_sha256=file_sha256(scan.path) if scan.path else None,
                       seconds=res.seconds, **(provenance or {}),
                       scored_voxels=res.model_grid.scored_voxels,
                       final_loss=res.model_grid.losses[-1] if res.model_grid.losses else None,
                       threshold=threshold,
                       files={k: v.name for k, v in final.items() if k != "summary"})
        registration = None if res.placement is None else registration_of(res.placement.native_affine, scan.affine)
        if registration is not None:
            summary["registration"] = registration
        summary.setdefault("backend", getattr(engine, "name", "?"))
        summary.setdefault("region", region)
        summary.setdefault("schedule", [list(p) for p in rc.phases])
        save_json(outputs.add(final["summary"]), summary)
    return summary


def maps_method(scores_dir, names) -> str:
    """What made the maps of cases `names` in `scores_dir`, from their <case>_restore.json (see
    `summaries_method`)."""
    return summaries_method(Path(scores_dir) / f"{n}{OUTPUT_FILES['summary']}" for n in names)


def summaries_method(paths) -> str:
    """What made the maps whose <case>_restore.json files are `paths` (unreadable or missing ones
    are skipped): 'IF 3D (ifad-fast)', 'IF 2D (ifad-fast)', 'IF 3D + IF 2D (ifad-fast)' when
    mixed, or 'anomaly maps' when none is readable (maps from elsewhere)."""
    variants = set()
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict):
            variants.add(str(d.get("variant", "3d")).upper())
    if not variants:
        return "anomaly maps"
    return " + ".join(f"IF {v}" for v in sorted(variants, reverse=True)) + " (ifad-fast)"


def evaluate_folders(scores_dir=None, masks_dir=None, val_scores=None, val_masks=None, out_dir=None,
                     max_voxels: int | None = None, pairs=None, val_pairs=None) -> dict:
    """The paper's metrics and those beyond it (`metrics.evaluate`: per-volume AP, lesion-wise
    detection with lesion sizes in mL from the masks' voxel volumes, false positives per healthy
    case) for anomaly maps against their ground-truth masks (labels > 0 = lesion; a mask with no
    lesion voxel makes a healthy case), and under "method" what made the maps (`summaries_method`);
    with `out_dir`, also written to out_dir/metrics.json.

    The cases are the <case>_anomaly maps of `scores_dir`, each paired by name with its mask in
    `masks_dir` (<case>_mask, _seg, _label, BIDS _dseg, ...; see `ifad_fast.pairing`), or the
    lines of the CSV `pairs` (header map,mask); the validation cases likewise. A case without
    exactly one mask, or a mask that does not look like a label map, raises IfadError before
    anything is written.
    """
    from .io import open_nifti
    from .metrics import evaluate
    from .pairing import case_pairs, load_cases

    if out_dir is not None:
        check_output_folder(out_dir)
    test = case_pairs(scores_dir, masks_dir, pairs)
    given = any(v is not None for v in (val_scores, val_masks, val_pairs))
    val = case_pairs(val_scores, val_masks, val_pairs, "val-") if given else None
    names, scores, masks = load_cases(test, max_voxels)
    _, val_s, val_m = load_cases(val, max_voxels) if val else (None, None, None)
    voxel_mm3 = [abs(float(np.linalg.det(open_nifti(p.mask, max_voxels, "mask")[0].affine[:3, :3]))) for p in test]
    result = evaluate(scores, masks, val_s, val_m, names=names, voxel_volumes=voxel_mm3)
    result["method"] = summaries_method(p.summary for p in test)
    if out_dir is not None:
        save_json(Path(out_dir) / "metrics.json", result)
    return result


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


def with_bias_correction(model: Model) -> Model:
    """The model, its scans divided by their fitted bias field before normalising
    (preprocess.correct_bias): for scans not bias-corrected as its training scans were."""
    return dataclasses.replace(model, preprocess=cfg.replace(model.preprocess, bias_correction=True))


def with_registration(model: Model, warn: bool = False) -> Model:
    """The model, its scans placed by their affine registration to MNI152 (register.py). warn: an
    IfadWarning when the model was trained without registration (its frame holds brains centred,
    not registered: the protocol's answer needs a model trained with --register)."""
    from .register import require_simpleitk

    require_simpleitk()
    if model.preprocess.register:
        return model
    if model.preprocess.frame != "physical":
        raise IfadError("--register places scans in the physical frame; this model's frame is cube")
    if warn:
        warnings.warn(IfadWarning("this model was trained without --register: its scans are registered to MNI152 "
                                  "now, but it never saw registered scans (train with --register for a matched "
                                  "model)"))
    return dataclasses.replace(model, preprocess=cfg.replace(model.preprocess, register=True))


def check_job(model: Model, job: RestoreJob, whole_set: bool = True) -> RestoreJob:
    """`job` with its threshold resolved (`resolve_threshold`), checked once before the processes
    that share it start. whole_set: with job.existing 'refuse', an IfadError when job.out_dir holds
    outputs of any of its cases (each process checks only its own shard's)."""
    threshold = resolve_threshold(model, job.threshold)
    if whole_set and job.existing == "refuse":
        refuse_existing(find_scans(job.inputs), job.out_dir, threshold, job.figure, job.bids)
    return dataclasses.replace(job, threshold=threshold)


def restore_shard(job: RestoreJob) -> dict:
    """This process's shard of `job` (RANK of WORLD_SIZE from the environment, as set by
    distributed.launch or torchrun): {"written": cases written, "error": one line or None}."""
    import os

    import torch

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
