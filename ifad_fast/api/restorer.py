"""The `Restorer` (one model, its settings resolved once), schedules, the restoring prior, and the one-call
wrappers `restore_array`, `restore_arrays` and `restore_files`."""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import config as cfg
from ..backends.factory import resolve_backend
from ..errors import IfadError, IfadWarning, out_of_memory
from ..io import (
    Scan,
    case_name,
    check_output_folder,
    check_scan,
    clean_stale_temporaries,
    find_scans,
    header_shape,
)
from ..limits import check_memory, restore_bytes
from ..model import Model, bundled_model_path, load_model, stored_threshold
from ..preprocess import IntensityEncoder, as_scan, prepare_grids
from ..restore.scoring import StageTimes
from ..restore.volume import restore_batch
from .files import (
    CaseWriter,
    FilesProgress,
    check_figure,
    check_files_options,
    load_group,
    restore_in_turn,
    restore_overlapped,
    shard_of,
)
from .outputs import (
    case_outputs,
    cases_to_do,
    frame_summary,
    package_version,
    portable_path,
    run_provenance,
)
from .results import NativeResult


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
    training (`restoring_prior`) and the paper's pools in millimetres on its grid (`config.frame_pools`)."""
    prior, sigma = restoring_prior(model)
    base = dict(prior=prior, sigma=sigma, **cfg.frame_pools(model.preprocess))
    base.update(cfg.SCHEDULES[schedule] if schedule in cfg.SCHEDULES else dict(phases=parse_phases(schedule)))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return cfg.RestoreConfig(**base)           # checked there: phases within the limits, the seed


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
    # the paper's setting: 700 Adam steps of 16,200 points, every voxel of the grid scored and kept, its
    # pools in voxels whatever the grid (its evaluation on the model grid: `model_grid_maps`)
    "paper": dict(schedule="paper", region="full", pools=dict(min_pool=3, avg_pool=15)),
}




class Restorer:
    """Restores scans with one model, set up once (in the style of nnU-Net's predictor).

        restorer = Restorer(model, backend="auto", device="auto", precision="float32", schedule="fast")
        result = restorer.restore_array(nib.load("scan.nii.gz"))          # NativeResult
        results = restorer.restore_arrays([img1, img2])                    # restored together
        summaries = restorer.restore_files(["scans/"], "out/", threshold="model")

    Everything a restoration depends on is fixed here and resolved once: the device ('auto':
    CUDA if present), the backend (a name, 'auto' by `engines.make_backend`'s policy, or a
    Backend already built), the precision, the latent search (`schedule`: fast | local | paper |
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
            from ..register import require_simpleitk
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
        # the maps' decision threshold (the model's for this schedule; restore_files adds its own): where an
        # 'adaptive' score grid must be exact. The local stage judges its fit region on the one-latent
        # (fast) map, by that map's threshold.
        pools = (rc.min_pool, rc.avg_pool)
        self.decision = stored_threshold(model, cfg.schedule_name(rc), pools)
        self.fit_threshold = stored_threshold(model, "fast", pools)

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
            own_grid = resolution is None or resolution == pc.resolution
            grids = self._prepare(inputs, scans, (None,) if own_grid else (None, resolution))
            prepared = [g[0] for g in grids]
            scored = prepared if own_grid else [g[1] for g in grids]

            def batch(items):
                return torch.stack(items) if on_device else torch.from_numpy(np.stack(items)).to(self.device)
            classes, brain = batch([p.classes for p in prepared]), batch([p.brain for p in prepared])
            score_classes = None if scored is prepared else batch([p.classes for p in scored])
            score_brain = None if scored is prepared else batch([p.brain for p in scored])
        generator = torch.Generator(self.device if on_device else "cpu").manual_seed(self.rc.seed)
        maps = restore_batch(self.engine, self.model, classes, self.rc, generator, brain=brain, region=self.region,
                             progress=self.progress, score_classes=score_classes, score_brain=score_brain,
                             adam=self.adam, graphs=self.cuda_graphs, stages=stage,
                             threshold=self.decision if decision is None else decision,
                             fit_threshold=self.fit_threshold)
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

    def _prepare(self, inputs, scans, resolutions) -> list[list]:
        """Each scan prepared at each grid size of `resolutions` (None: the model grid; N: the N³ score
        grid), its normalisation and registration done once: [[Prepared per size] per scan], as
        arrays or on the device."""
        pc = self.model.preprocess
        return [prepare_grids(x, self.encoder, pc, pc.test_mode_pool, affine, resolutions)
                for x, (_, affine) in zip(inputs, scans)]

    def provenance(self) -> dict:
        """What a restore JSON records about the settings (model file and hash, seed, device, ...)."""
        model, rc = self.model, self.rc
        out = dict(ifad_fast=package_version(), **run_provenance(), model=dict(file=model.source, sha256=model.sha256),
                   seed=rc.seed, device=str(self.device), backend=self.backend, precision=self.precision,
                   schedule=[list(p) for p in rc.phases], restore=cfg.to_dict(rc), region=self.region,
                   frame=frame_summary(model.preprocess), score_resolution=self.resolution or model.preprocess.resolution,
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

    def restore_files(self, inputs, out_dir, threshold=None, batch: int = 1, report=print,
                      existing: str = "refuse", figure: bool | str = False, force: bool = False,
                      max_voxels: int | None = None, shard: tuple[int, int] | None = None,
                      bids: bool = False, overlap_io: bool | None = None) -> list[dict]:
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
        lines come once the next group has restored); False: one step after the other; None
        (default): overlap when restoring on CUDA, where CPU cores are idle. On a CPU the I/O
        threads slow the restoration as much as they hide (2 cores: 36.1 s either way, RESULTS).
        """
        check_files_options(existing, batch)
        check_figure(figure)
        model, rc, region = self.model, self.rc, self.region
        threshold = resolve_threshold(model, threshold, cfg.schedule_name(rc), (rc.min_pool, rc.avg_pool))
        decision = min((t for t in (threshold, self.decision) if t is not None), default=None)
        paths = shard_of(find_scans(inputs), shard)
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
        todo = cases_to_do(plan, out_dir, existing, provenance, threshold, figure, bids, report)
        unrestorable = self._unrestorable(todo, max_voxels, batch)    # before the first restoration
        for folder in {out_dir, *(files["summary"].parent for files in plan.values())}:
            clean_stale_temporaries(folder)                 # --bids writes into the cases' own folders

        run = FilesProgress(len(todo), report, out_dir)
        for p in todo:
            if p in unrestorable:
                run.fail(p, unrestorable[p])
        run.runnable = [p for p in todo if p not in run.failed]
        write = CaseWriter(out_dir, run_args if shard is None or shard[0] == 0 else None, threshold=threshold,
                            engine=self.engine, rc=rc, region=region, provenance=provenance, figure=figure,
                            model_threshold=self.decision, bids=bids)
        groups = [run.runnable[s:s + batch] for s in range(0, len(run.runnable), batch)]
        load = functools.partial(load_group, max_voxels=max_voxels, force=force)
        overlap = self.device.type == "cuda" if overlap_io is None else bool(overlap_io)
        restore_groups = restore_overlapped if overlap and len(groups) > 1 else restore_in_turn
        restore_groups(self._restore_group, groups, run, load, write, decision)
        summaries = run.summaries
        if run.failed:
            if len(todo) == 1:
                raise IfadError(next(iter(run.failed.values())))
            raise IfadError(f"{len(run.failed)} of {len(todo)} scans failed ({len(summaries)} written to {out_dir}): "
                            + "; ".join(run.failed.values()))
        return summaries


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


def resolve_threshold(model: Model, threshold, schedule: str | None = None, pools: tuple | None = None):
    """None, a finite number, or 'model' (the threshold the model stores for maps of `schedule` pooled
    (min_pool, avg_pool) = `pools`, `model.stored_threshold`) -> None or a float."""
    if threshold is None:
        return None
    if isinstance(threshold, str) and threshold == "model":
        t = stored_threshold(model, schedule, pools)
        chosen_on = (model.info or {}).get("threshold_pools")
        if t is None and stored_threshold(model, schedule) is not None:
            raise IfadError(f"this model's thresholds were chosen on maps pooled {chosen_on[0]}x{chosen_on[1]}, these "
                            f"are pooled {pools[0]}x{pools[1]}: pass a number (--threshold T) or drop --pools")
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
                  shard: tuple[int, int] | None = None, bids: bool = False,
                  overlap_io: bool | None = None) -> list[dict]:
    """`Restorer(model, ...).restore_files(inputs, out_dir, ...)` in one call; rc: the
    RestoreConfig (default: the fast schedule). See `Restorer.restore_files`."""
    check_files_options(existing, batch)
    restorer = Restorer(model, backend, device, precision, rc or "fast", region, resolution, progress=progress)
    return restorer.restore_files(inputs, out_dir, threshold, batch, report, existing, figure, force, max_voxels,
                                  shard, bids, overlap_io)


def with_bias_correction(model: Model) -> Model:
    """The model, its scans divided by their fitted bias field before normalising
    (preprocess.correct_bias): for scans not bias-corrected as its training scans were."""
    return dataclasses.replace(model, preprocess=cfg.replace(model.preprocess, bias_correction=True))


def with_registration(model: Model, warn: bool = False) -> Model:
    """The model, its scans placed by their affine registration to MNI152 (register.py). warn: an
    IfadWarning when the model was trained without registration (its frame holds brains centred,
    not registered: the protocol's answer needs a model trained with --register)."""
    from ..register import require_simpleitk

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
