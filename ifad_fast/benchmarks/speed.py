"""The speed suite behind `ifad-fast bench speed [--quick]` (and `ifad_fast.benchmarks.accuracy.speed`).

Paper-sized decoder (random weights), one 160³ volume (a synthetic MNI152 brain encoded with
the HCP T2 centres). Times, in one run and on one machine, side by side:

- one restoration step at K = 16,200 (forward + backward to z), per implementation:
  `paper` the straightforward code (ifad_fast/reference.py: weight norm every call, all weight
  gradients, 316-wide input), `torch` the reference backend, `cpu` float32 and bf16 (FastBackend);
- each schedule's whole restoration (paper 700×16,200; reference 501×10,000 + 101×50,000; fast);
- the score grid (full 160³ for `paper`, the brain region for the fast path);
- the post-processing (min-pool 3 + avg-pool 15: direct pooling on the benchmark's device vs
  prefix sums);
- the total per scan; and one whole restore_classes of the volume (search, score, post-process) with
  the decoder read as IF 3D (one latent) and as IF 2D (a latent per axial slice: one slice in 4
  restored, up to 40 latents searched as one batch, scored and post-processed), run for real on the same
  schedule on the run's backend;
- achieved GFLOP/s from counted FLOPs; the measured matmul peak
  (2048×512·512×512 on a CPU, 8192³ on a GPU);
- the stage breakdown of one whole restore of the native scan with the fast schedule through the
  Restorer (`stage_breakdown`): prepare (normalise, frame, encode, mode-pool), search (the latent
  search), grid (the brain-region score grid), post (pooling), native (back to the scan's grid),
  each with its share; the host pipeline, and on CUDA the device pipeline with and without CUDA
  graphs;
- training: one step per implementation and precision, and 1 → 2 processes (ifad_fast/benchmarks/training.py).

Only warm calls are timed: every timed piece runs once untimed first (the fast restoration and
the grid on a short schedule / a small region), so one-off costs (allocation, CUDA context and
kernel compilation) are left out. Whole restorations of the slow implementations are
extrapolated from timed steps (marked "extrapolated"); the fast path's are run for real.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from .. import config as cfg
from .. import reference as paper
from . import training as train_speed
from ..backends.base import TorchBackend
from ..backends.factory import resolve_backend, resolve_device
from .machine import benchmark_case, benchmark_volume, machine
from ..backends.fast import FastBackend
from ..model import Decoder, layer_shapes
from ..restore.scoring import dilate, pool_reach, postprocess, score_grid
from ..restore.search import GraphedStep, optimise_latents


def macs_per_point(mc: cfg.ModelConfig, hoisted: bool) -> int:
    """Multiply-adds of one decoder forward per point; hoisted: z's share of layers 0 and latent_in removed."""
    total = sum(o * i for o, i in layer_shapes(mc))
    if hoisted:
        total -= 2 * mc.hidden * mc.latent_dim
    return total


def timed(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median seconds of `repeats` calls after `warmup` untimed calls; `sync()` (e.g.
    torch.cuda.synchronize) ends each timed call, so queued GPU work is counted."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_shape(device: torch.device) -> tuple[int, int, int]:
    """(m, n, k) of the peak measurement: the decoder's own shape on a CPU, 8192³ on a GPU (what
    the card can reach; the decoder's small matmuls do not fill it)."""
    return (8192, 8192, 8192) if device.type == "cuda" else (2048, 512, 512)


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(dtype, device: torch.device) -> float:
    """GFLOP/s of (m×k)·(k×n) in `dtype` on `device`, median of 5 timed runs of 10 after a warm-up."""
    m, n, k = matmul_shape(device)
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)

    def run():
        for _ in range(10):
            a @ b
    return 10 * 2 * m * n * k / timed(run, 5, sync=_sync(device)) / 1e9


STAGES = ("prepare", "search", "grid", "post", "native")      # what Restorer(time_stages=True) records
REPORTED_STAGES = STAGES + ("write",)                         # and the outputs written, timed here


def stage_breakdown(decoder: Decoder, z: torch.Tensor, resolution: int, device: torch.device, backend="auto",
                    quick: bool = False) -> list[dict]:
    """Seconds per stage of whole restores of the benchmark scan (its native grid in, maps on it
    out) with the fast schedule through `api.Restorer(time_stages=True)`: a model made of
    `decoder`, the HCP T2 centres and `z` as its mean training latent, at resolution³. One untimed
    restore (a few steps per phase: enough to capture a CUDA graph) first, then one timed. Rows:
    the host pipeline; on CUDA also the device pipeline with and without CUDA graphs. quick: the
    schedule's steps divided by 10."""
    from ..api.restorer import Restorer
    from ..model import Model

    model = Model(decoder=decoder, centres=torch.tensor(cfg.HCP_T2_CENTRES, dtype=torch.float64),
                  preprocess=cfg.PreprocessConfig(resolution=resolution), latents=z.detach().cpu().float())
    case = benchmark_case()
    rc = cfg.RestoreConfig(**{**cfg.SCHEDULES["fast"], "prior": "none"})
    if quick:
        rc = cfg.replace(rc, phases=tuple((max(1, s // 10), k) for s, k in rc.phases))
    settings = [("host", None)]
    if device.type == "cuda":
        settings += [("device", True), ("device", False)]
    rows = []
    for pipeline, graphs in settings:
        kw = dict(pipeline=pipeline, cuda_graphs=graphs, time_stages=True)
        warm = cfg.replace(rc, phases=tuple((GraphedStep.WARMUP + 2, k) for _, k in rc.phases))
        Restorer(model, backend, device, schedule=warm, **kw).restore_array(case.image, case.affine)
        restorer = Restorer(model, backend, device, schedule=rc, **kw)
        result = restorer.restore_array(case.image, case.affine)
        stages = {k: result.stages.get(k, 0.0) for k in STAGES}
        stages["write"] = write_seconds(case, result, restorer)
        label = pipeline + ("" if graphs is None else ", CUDA graphs" if restorer.cuda_graphs else ", no graphs")
        points = sum(_phase_points(rc, len(result.model_grid.losses)))
        hoisted = restorer.backend != "torch"
        fwd = macs_per_point(decoder.config, hoisted=hoisted)
        rows.append(dict(pipeline=label, backend=restorer.backend, precision=restorer.precision, points=points,
                         seconds=result.seconds + stages["write"], stages=stages,
                         flop=dict(search=2 * 2 * fwd * points, grid=2 * fwd * result.model_grid.scored_voxels),
                         grid_evaluations=result.model_grid.scored_voxels))
    return rows


def _phase_points(rc: cfg.RestoreConfig, steps_run: int):
    """The points of each step the search ran (its phases in order, `steps_run` steps in all)."""
    for steps, k in rc.phases:
        for _ in range(min(steps, steps_run)):
            yield k
        steps_run -= min(steps, steps_run)


def write_seconds(case, result, restorer) -> float:
    """Seconds to write one restore's outputs (anomaly map, restoration, JSON) as `restore` does,
    into a temporary folder."""
    import tempfile

    import nibabel as nib

    from ..api.outputs import write_outputs
    from ..io import Scan

    scan = Scan(case.image, case.affine, nib.Nifti1Header())
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        write_outputs(scan, result, out, None, restorer.engine, restorer.rc, restorer.region)
        return time.perf_counter() - t0


def run(quick=False, backend="auto", device="auto", report=print) -> dict:
    """Run the suite on `device` ('auto': CUDA if present); report the table, return the numbers.

    The step, grid and post-processing rows time the paper-style code, `torch` and `cpu`
    (FastBackend) on the device whatever `backend` says; the IF 3D / IF 2D rows and the stage
    breakdown restore with `backend` ('auto': the API's choice).
    """
    device = resolve_device(device)
    sync = _sync(device)
    decoder = paper_sized_decoder(device)
    mc = decoder.config
    res = 96 if quick else 160
    classes_np, brain_np = benchmark_volume(res)
    classes = torch.from_numpy(classes_np).to(device)
    shape = tuple(classes.shape)
    k = 16200
    steps_timed = 1 if quick else 5
    z = torch.randn(1, mc.latent_dim, device=device) / 16
    idx, targets = random_points(classes, k)

    fwd_ref, fwd_fast = macs_per_point(mc, False), macs_per_point(mc, True)
    step_flop = {"paper": 2 * fwd_ref * k * 3, "torch": 2 * fwd_ref * k * 2, "cpu": 2 * fwd_fast * k * 2}
    impls = {"torch": TorchBackend(decoder, device), "cpu float32": FastBackend(decoder, device, "float32")}
    if not quick:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            impls["cpu bf16"] = FastBackend(decoder, device, "bf16")

    def backend_step(b):
        def step():
            zz = z.clone().requires_grad_(True)
            b.mean_loss(zz, idx, targets, shape).sum().backward()
        return step

    rows = []
    t_paper = timed(lambda: paper.reference_step(decoder, z, idx, targets, shape), steps_timed, sync=sync)
    rows.append(("step K=16,200", "paper (straightforward)", t_paper, step_flop["paper"]))
    step_times = {}
    for name, b in impls.items():
        step_times[name] = timed(backend_step(b), 1 if "bf16" in name else steps_timed, sync=sync)
        rows.append(("step K=16,200", name, step_times[name], step_flop["torch" if name == "torch" else "cpu"]))

    # whole restorations: paper schedule extrapolated for the slow paths; fast schedule run for real
    restore_rows = []
    for sched in ("paper", "reference"):
        phases = cfg.SCHEDULES[sched]["phases"]
        points = sum(s * kk for s, kk in phases)
        restore_rows.append((f"restore {sched} (extrapolated)", "paper (straightforward)", t_paper * points / k))
        for name in impls:
            restore_rows.append((f"restore {sched} (extrapolated)", name, step_times[name] * points / k))
    fast_rc = cfg.RestoreConfig(**{**cfg.SCHEDULES["fast"], "prior": "none"})
    if quick:
        fast_rc = cfg.RestoreConfig(**{**cfg.SCHEDULES["fast"], "prior": "none",
                                       "phases": tuple((max(1, s // 10), kk) for s, kk in fast_rc.phases)})
    t_fast_restore = time_search(impls["cpu float32"], classes, brain_np, z, fast_rc, sync)
    fast_points = sum(s * kk for s, kk in fast_rc.phases)
    restore_rows.append((f"restore fast ({fast_points:,} points, run)", "cpu float32", t_fast_restore))

    grid, scores = time_grid(decoder, impls["cpu float32"], z, classes, brain_np, fwd_fast, quick, sync)
    postprocessing = time_postprocessing(scores, sync)

    breakdown = stage_breakdown(decoder, z, res, device, backend, quick)
    engine = resolve_backend(backend, decoder, device)          # the run's backend ('auto': the API's choice)
    variants = restore_variants(decoder, classes_np, brain_np, fast_rc, engine, sync)

    total_paper = t_paper * 700 * 16200 / k + grid["paper_full_extrapolated"] + postprocessing["direct"]
    total_fast = t_fast_restore + grid["fast_region"] + postprocessing["prefix_sums"]
    peak32 = matmul_peak(torch.float32, device)
    peak16 = matmul_peak(torch.bfloat16, device)
    result = dict(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), quick=quick,
                  resolution=res, device=str(device), matmul_gflops=dict(float32=peak32, bf16=peak16),
                  matmul_shape=list(matmul_shape(device)),
                  steps=[dict(what=w, impl=i, seconds=s, gflops=f / s / 1e9) for w, i, s, f in rows],
                  restorations=[dict(what=w, impl=i, seconds=s) for w, i, s in restore_rows],
                  grid=grid, postprocess=postprocessing, stages=breakdown,
                  total=dict(paper_straightforward=total_paper, fast=total_fast, ratio=total_paper / total_fast),
                  variants=dict(**variants, slice_step=fast_rc.slice_step, backend=f"{engine.name} {engine.precision}"))
    result["training"] = train_speed.training(quick, device, report=lambda _: None)
    report(format_report(result))
    return result


def paper_sized_decoder(device) -> Decoder:
    """The decoder every speed row runs: the paper's size, torch's initialisation (seed 0) with the
    weight-norm gains randomised (x U(0.5, 1.5)), eval mode, on `device`."""
    torch.manual_seed(0)
    decoder = Decoder(cfg.ModelConfig()).to(device).eval()
    with torch.no_grad():
        for layer in decoder.layers:
            g = layer.parametrizations.weight.original0
            g.mul_(torch.rand_like(g) + 0.5)
    return decoder


def random_points(classes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k voxels of the classes (X, Y, Z) drawn uniformly (seed 0): (idx (1, k, 3) int64, targets (1, k)
    int64), on the classes' device."""
    shape = tuple(classes.shape)
    gen = torch.Generator().manual_seed(0)
    idx = (torch.rand(1, k, 3, generator=gen) * torch.tensor(shape)).long().to(classes.device)
    lin = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
    return idx, classes.reshape(1, -1).long().gather(1, lin)


def time_search(backend, classes: torch.Tensor, brain_np, z: torch.Tensor, rc: cfg.RestoreConfig, sync) -> float:
    """Seconds of one latent search with `rc` on the classes (X, Y, Z), after a one-step-per-phase warm-up."""
    brain = torch.from_numpy(brain_np)

    def search(schedule):
        optimise_latents(backend, classes[None], z.cpu(), schedule, torch.Generator().manual_seed(0),
                         brain=brain[None])
        sync()
    search(cfg.replace(rc, phases=tuple((1, k) for _, k in rc.phases)))
    t0 = time.perf_counter()
    search(rc)
    return time.perf_counter() - t0


def time_grid(decoder: Decoder, fast, z: torch.Tensor, classes: torch.Tensor, brain_np, fwd_fast: int, quick: bool,
              sync) -> tuple[dict, torch.Tensor]:
    """The score grid: a 65,536-voxel chunk of the straightforward code, extrapolated to the full
    grid, and the fast backend's brain-region grid run for real (after a one-slab warm-up).
    Returns (the grid's row of run(), the fast grid's scores (X, Y, Z) float32)."""
    shape, device = tuple(classes.shape), classes.device
    n_grid = classes.numel()
    chunk_idx = torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3)
    chunk_idx = chunk_idx[n_grid // 2: n_grid // 2 + 65536].to(device)
    chunk_t = classes.reshape(-1)[n_grid // 2: n_grid // 2 + 65536]
    t_chunk = timed(lambda: paper.reference_score(decoder, z[0], chunk_idx, chunk_t, shape), 1 if quick else 2,
                    sync=sync)
    region = dilate(torch.from_numpy(brain_np).to(device), pool_reach(cfg.RestoreConfig()))
    slab = torch.zeros_like(region)
    slab[shape[0] // 2] = region[shape[0] // 2]
    score_grid(fast, z[0], classes, slab)                              # warm-up
    sync()
    t0 = time.perf_counter()
    scores, _ = score_grid(fast, z[0], classes, region)
    sync()
    t_fast = time.perf_counter() - t0
    n_region = int(region.sum())
    return dict(paper_full_extrapolated=t_chunk * n_grid / 65536, fast_region=t_fast, region_voxels=n_region,
                grid_voxels=n_grid, fast_region_gflops=2 * fwd_fast * n_region / t_fast / 1e9), scores


def time_postprocessing(scores: torch.Tensor, sync) -> dict:
    """Min-pool 3 then the 15³ average pool: direct (max_pool3d, avg_pool3d on the scores' device)
    against the prefix sums of `postprocess` (NumPy in, on the CPU); seconds each."""
    def direct():
        x = -F.max_pool3d(-scores[None, None], 3, stride=1, padding=1)
        return F.avg_pool3d(x, 15, stride=1, padding=7)
    raw = scores.cpu().numpy()
    return dict(direct=timed(direct, 1, sync=sync), prefix_sums=timed(lambda: postprocess(raw), 2))


def restore_variants(decoder: Decoder, classes, brain, rc: cfg.RestoreConfig, engine, sync) -> dict:
    """Whole restorations (search, score, post-process) of one volume through restore_classes, the
    same decoder weights read as IF 3D (one latent) and as IF 2D (a latent per restored slice), on
    one backend and schedule, each after one untimed run on a one-step schedule.

    Returns {"if3d": seconds, "if2d": seconds, "slices": restored slices of the 2D run}."""
    import dataclasses

    from ..model import Model
    from ..restore.volume import restore_classes

    out = {}
    for variant in ("3d", "2d"):
        twin = Decoder(dataclasses.replace(decoder.config, variant=variant)).to(next(decoder.parameters()).device)
        twin.load_state_dict(decoder.state_dict())
        model = Model(twin.eval(), torch.zeros(decoder.config.n_classes, dtype=torch.float64),
                      cfg.PreprocessConfig(), torch.zeros(0, decoder.config.latent_dim))
        restore_classes(model, classes, cfg.replace(rc, phases=tuple((1, k) for _, k in rc.phases)), engine,
                        engine.device, brain=brain)                                      # warm-up
        sync()
        t0 = time.perf_counter()
        res = restore_classes(model, classes, rc, engine, engine.device, brain=brain)[0]
        sync()
        out[f"if{variant}"] = time.perf_counter() - t0
        if variant == "2d":
            out["slices"] = len(res.slices)
    return out


def format_report(r: dict) -> str:
    """The Markdown table of a run() result."""
    p32 = r["matmul_gflops"]["float32"]
    m, n, k = r["matmul_shape"]
    lines = [f"machine: {r['machine']}; {r['date']}; volume {r['resolution']}³; device {r['device']}",
             f"matmul peak ({m}×{k}·{k}×{n}): float32 {p32:.0f} GFLOP/s, bf16 {r['matmul_gflops']['bf16']:.0f} GFLOP/s",
             "warm calls only: every timed piece ran once untimed first (the fast restoration and the grid "
             "on a short schedule / one slab)",
             "", "| what | implementation | seconds | ratio vs paper code | GFLOP/s | % of fp32 peak |",
             "|---|---|---:|---:|---:|---:|"]
    base = r["steps"][0]["seconds"]
    for s in r["steps"]:
        lines.append(f"| {s['what']} | {s['impl']} | {s['seconds']:.3f} | {base / s['seconds']:.2f}× | "
                     f"{s['gflops']:.0f} | {100 * s['gflops'] / p32:.0f} % |")
    base_restore = {}
    for s in r["restorations"]:
        if s["impl"].startswith("paper"):
            base_restore[s["what"]] = s["seconds"]
        ref = base_restore.get(s["what"], r["restorations"][0]["seconds"])
        lines.append(f"| {s['what']} | {s['impl']} | {s['seconds']:.1f} | {ref / s['seconds']:.1f}× | | |")
    g = r["grid"]
    lines.append(f"| grid, all {g['grid_voxels']:,} voxels (extrapolated) | paper (straightforward) | "
                 f"{g['paper_full_extrapolated']:.1f} | 1.0× | | |")
    lines.append(f"| grid, brain region {g['region_voxels']:,} voxels | cpu float32 | {g['fast_region']:.1f} | "
                 f"{g['paper_full_extrapolated'] / g['fast_region']:.1f}× | {g['fast_region_gflops']:.0f} | "
                 f"{100 * g['fast_region_gflops'] / p32:.0f} % |")
    pp = r["postprocess"]
    lines.append(f"| post-processing | direct avg_pool3d(15) | {pp['direct']:.2f} | 1.0× | | |")
    lines.append(f"| post-processing | prefix sums | {pp['prefix_sums']:.2f} | {pp['direct'] / pp['prefix_sums']:.1f}× | | |")
    t = r["total"]
    lines.append(f"| **total per scan** | paper code, paper schedule (extrapolated) | {t['paper_straightforward']:.0f} | 1.0× | | |")
    label = "fast schedule shortened 10× (--quick: not comparable)" if r["quick"] else "fast schedule"
    lines.append(f"| **total per scan** | cpu float32, {label}, brain region | {t['fast']:.1f} | {t['ratio']:.1f}× | | |")
    if "variants" in r:                     # IF 3D and IF 2D through restore_classes: same backend and schedule
        v = r["variants"]
        lines.append(f"| **whole restore_classes, IF 3D** (one latent) | {v['backend']}, {label}, brain region | "
                     f"{v['if3d']:.1f} | {t['paper_straightforward'] / v['if3d']:.1f}× | | |")
        lines.append(f"| **whole restore_classes, IF 2D** ({v['slices']} slice latents, one slice in "
                     f"{v['slice_step']}; IF 3D / IF 2D time **{v['if3d'] / v['if2d']:.2f}**) | {v['backend']}, "
                     f"{label}, brain region | {v['if2d']:.1f} | {t['paper_straightforward'] / v['if2d']:.1f}× | | |")
    if r.get("stages"):
        lines += ["", f"stage breakdown of one whole restore through the Restorer ({label}, the scan's native grid "
                  "in and out; seconds and share of the total):", "",
                  "| pipeline | backend | " + " | ".join(REPORTED_STAGES) + " | total |",
                  "|---|---|" + "---:|" * (len(REPORTED_STAGES) + 1)]
        for row in r["stages"]:
            total = sum(row["stages"].values()) or 1.0
            cells = [f"{row['stages'].get(k, 0.0):.2f} ({100 * row['stages'].get(k, 0.0) / total:.0f} %)"
                     for k in REPORTED_STAGES]
            lines.append(f"| {row['pipeline']} | {row['backend']} {row['precision']} | " + " | ".join(cells)
                         + f" | {row['seconds']:.2f} |")
        lines += ["", "the decoder's work per stage against the float32 matmul peak (FLOP = 2 × multiply-adds; "
                  "search: forward and backward to z of every point drawn, grid: one forward per evaluated "
                  "voxel; the other stages do no decoder work):", "",
                  "| pipeline | stage | decoder evaluations | GFLOP | seconds | GFLOP/s | % of fp32 peak |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in r["stages"]:
            for stage, n in (("search", row["points"]), ("grid", row.get("grid_evaluations", 0))):
                flop, sec = row.get("flop", {}).get(stage, 0), row["stages"][stage]
                rate = flop / sec / 1e9 if sec else 0.0
                lines.append(f"| {row['pipeline']} | {stage} | {n:,} | {flop / 1e9:.0f} | {sec:.2f} | {rate:.0f} | "
                             f"{100 * rate / p32:.0f} % |")
    if "training" in r:
        lines += ["", train_speed.format_training(r["training"])]
    return "\n".join(lines)
