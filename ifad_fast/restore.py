"""Restoration: search the latent that best explains a scan, score every voxel, post-process.

restore_classes(model, classes) -> Restoration; the anomaly score of a voxel is
-log P(t = t_scan | z, p), min-pooled (3) then average-pooled (15).

Scoring at another resolution (the paper's IF 3D*): the latent is searched on the model grid
(R³) and the field is then evaluated on an N³ grid of the same frame (`score_classes`): the
decoder is continuous, and voxel i of an S-grid is at -1 + 2i/(S - 1) for any S. The pooling
windows are in voxels of the grid they run on; at N the min-pool stays 3 (it removes single-voxel
speckle, which lives at the score grid's own voxel scale) and the average pool keeps its physical
size: avg_pool · (N - 1)/(R - 1), rounded to the nearest odd size (`pools_at`).

Where it runs: `restore_batch` keeps everything on the class volumes' device -- the latent
search (points drawn where the generator lives), the score grid, the brain region (`dilate`)
and the pooling (`postprocess`) -- and copies nothing to the host until the caller asks
(`DeviceMaps.to_host`). The class volumes are validated once (`backends.check_classes`), so
every backend call passes checked=True and a step never waits for the host; the loss trace is
kept on the device. On CUDA, `optimise_latents(graphs=True)` replays each phase's step from a
CUDA graph. `restore_classes` is the NumPy-in, NumPy-out entry on top of it.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import config as cfg
from .backends import check_classes
from .engines import resolve_backend
from .errors import IfadError
from .model import Model
from .progress import progress_bar
from .sampling import PointSampler


@dataclass
class Restoration:
    """Outputs on the model grid (R, R, R)."""

    anomaly: np.ndarray          # float32, post-processed anomaly score
    score: np.ndarray            # float32, raw per-voxel cross-entropy (0 where not scored)
    classes: np.ndarray          # uint8, the restoration: most likely class per voxel
    z: np.ndarray                # float32 (D,)
    losses: list = field(default_factory=list)   # mean data loss per step
    scored_voxels: int = 0
    region: str = "brain"
    slices: np.ndarray | None = None     # 2D models: the restored axial slices (S,) int; z is then (S, D)


def pool_reach(rc: cfg.RestoreConfig) -> int:
    """How far (in voxels, Chebyshev) a raw score can move the post-processed map."""
    return (rc.min_pool - 1) // 2 + (rc.avg_pool - 1) // 2


def pools_at(rc: cfg.RestoreConfig, model_resolution: int, score_resolution: int) -> cfg.RestoreConfig:
    """rc with the average-pool window scaled from the model grid to a score grid of another
    resolution (same physical size, nearest odd window, at least 1); the min-pool is kept."""
    if score_resolution == model_resolution:
        return rc
    scaled = rc.avg_pool * (score_resolution - 1) / max(model_resolution - 1, 1)
    odd = max(1, 2 * int(math.floor((scaled - 1) / 2 + 0.5)) + 1)
    return dataclasses.replace(rc, avg_pool=odd)


def postprocess(score, min_pool: int = 3, avg_pool: int = 15):
    """3D min-pool then average-pool, stride 1, same size; zero padding counts in the average.

    score: (X, Y, Z) float. A NumPy array (or array-like) gives a float32 array (computed with
    torch on the CPU); a tensor gives a float32 tensor on its own device. The average pool is
    three 1-D box sums from float64 prefix sums: the numbers of avg_pool3d(k, padding=k//2,
    count_include_pad=True) at O(1) work per voxel, any volume size.
    """
    on_device = isinstance(score, torch.Tensor)
    x = score.to(torch.float32) if on_device else torch.as_tensor(np.asarray(score, dtype=np.float32))
    x = x[None, None]
    if min_pool > 1:
        x = -F.max_pool3d(-x, min_pool, stride=1, padding=min_pool // 2)
    x = x[0, 0].double()
    if avg_pool > 1:
        for axis in range(3):
            x = _box_sum(x, avg_pool, axis) / avg_pool
    x = x.float()
    return x if on_device else x.numpy()


def _box_sum(x: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """Sum over a centred window of k along `axis`, zeros beyond the edges (prefix sums; integer
    inputs are summed in int64, exactly)."""
    n = x.shape[axis]
    pad = [0, 0] * 3
    pad[2 * (2 - axis)] = k // 2 + 1           # F.pad counts axes from the last
    pad[2 * (2 - axis) + 1] = k // 2
    c = F.pad(x, pad).cumsum(axis)
    return c.narrow(axis, k, n) - c.narrow(axis, 0, n)


def dilate(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """Voxels within Chebyshev distance `reach` of a bool (X, Y, Z) mask, on its device: bool
    (X, Y, Z), equal to preprocess.brain_region (SciPy's maximum filter) bit for bit."""
    if reach <= 0:
        return mask.to(torch.bool)
    x = mask.to(torch.int32)
    for axis in range(3):
        x = _box_sum(x, 2 * reach + 1, axis)
    return x > 0


def initial_latents(model: Model, n: int, rc: cfg.RestoreConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, D) float32 starting latents: the mean training latent (rc.init 'mean'), else N(0, 1/D)
    drawn from `generator` on its device."""
    d = model.config.latent_dim
    if rc.init == "mean" and model.latents.numel():
        return model.latents.mean(0, keepdim=True).repeat(n, 1).float()
    return torch.randn(n, d, generator=generator, device=generator.device) / math.sqrt(d)


def prior_weight(rc: cfg.RestoreConfig, k: int) -> float:
    """Weight of ‖z‖² next to the mean data loss: eq. (4) of the paper divided by K."""
    return 1.0 / (rc.sigma ** 2 * k) if rc.prior == "paper" else 0.0


ADAM = ("default", "foreach", "fused")


def _adam(z: torch.Tensor, lr: float, kind: str, capturable: bool):
    """Adam on [z]: kind 'default' (torch's own choice), 'foreach' or 'fused'; capturable: its
    step count lives on the device, as a CUDA graph needs. torch's default for a CPU tensor is
    its single-tensor step, which `LatentAdam` computes number for number."""
    if kind == "default" and not capturable and z.device.type == "cpu":
        return LatentAdam(z, lr)
    options = dict(foreach=True) if kind == "foreach" else dict(fused=True) if kind == "fused" else {}
    return torch.optim.Adam([z], lr=lr, capturable=capturable, **options)


class LatentAdam:
    """torch.optim.Adam (betas 0.9 / 0.999, eps 1e-8, no weight decay) on one tensor, the same
    operations in the same order as torch's single-tensor step, so the same numbers
    (tests/test_less_work.py). Why not torch's: its first use in a process imports torch._dynamo,
    1.5-2.7 s of a one-scan `restore` on a 2-core CPU. Offers what the search uses: param_groups
    (the learning rate), zero_grad, step."""

    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, z: torch.Tensor, lr: float):
        self.z = z
        self.param_groups = [{"lr": float(lr)}]
        self.exp_avg = torch.zeros_like(z, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(z, memory_format=torch.preserve_format)
        self.steps = 0

    def zero_grad(self, set_to_none: bool = True):
        """Drop z's gradient (set_to_none) or zero it."""
        if set_to_none:
            self.z.grad = None
        elif self.z.grad is not None:
            self.z.grad.zero_()

    @torch.no_grad()
    def step(self):
        """One Adam update of z from z.grad (none: no update, as torch's)."""
        grad = self.z.grad
        if grad is None:
            return
        self.steps += 1
        step = float(self.steps)
        self.exp_avg.lerp_(grad, 1 - self.BETA1)
        self.exp_avg_sq.mul_(self.BETA2).addcmul_(grad, grad, value=1 - self.BETA2)
        step_size = self.param_groups[0]["lr"] / (1 - self.BETA1 ** step)
        denom = (self.exp_avg_sq.sqrt() / (1 - self.BETA2 ** step) ** 0.5).add_(self.EPS)
        self.z.addcdiv_(self.exp_avg, denom, value=-step_size)


def optimise_latents(backend, classes: torch.Tensor, z0: torch.Tensor, rc: cfg.RestoreConfig,
                     generator: torch.Generator, progress: bool = False, brain: torch.Tensor | None = None,
                     *, adam: str = "default", graphs: bool = False, checked: bool = False, points=None):
    """Adam on z over rc.phases of (steps, K). classes: (B, X, Y, Z) uint8 on the backend's device;
    brain: bool (B, X, Y, Z), where rc.brain_fraction of the points are drawn (default classes != 0).
    B latents are searched together, each with its own point draws (scans or slices alike).
    rc.restart_per_phase: a new Adam (fresh moment estimates) at each phase, as the reference notebook;
    otherwise one Adam throughout, its learning rate multiplied by rc.lr_decay at each new phase.

    The points are drawn where `generator` lives (a CPU generator: copied to the device each step;
    a generator on the classes' device: drawn there). The classes are range-checked once here
    (unless `checked`: the caller did), then every step calls the backend with checked=True and
    keeps its loss on the device, so a step never waits for the host. adam: 'default' | 'foreach'
    | 'fused' (the same numbers as 'default' on the CPU for 'foreach'). graphs: on CUDA, with a
    graph-safe backend, each phase's step is captured in a CUDA graph and replayed (`GraphedStep`;
    eager steps if capture fails); ignored elsewhere. points: a callable K -> (idx (B, K, 3) long,
    targets (B, K) long) on the classes' device, the points of each latent z[b] (the 2D variant's
    per-slice draws, ifad_fast/slices.py); it replaces the draws above, and `classes` then only
    gives the grid shape and the device.

    rc.stop_tol > 0 ends a phase early once its loss has levelled off (`converged`, read every
    rc.stop_window steps; the B latents stop together).

    Returns z (B, D) float32 and the per-step mean data loss (steps run, B) float32, both on the
    classes' device.
    """
    if adam not in ADAM:
        raise ValueError(f"adam must be one of {ADAM}, got {adam!r}")
    device = classes.device
    b, shape = z0.shape[0], tuple(int(s) for s in classes.shape[1:])
    if not checked:
        check_classes(classes, backend.config.n_classes)
    z = z0.clone().to(device).requires_grad_(True)
    graphs = bool(graphs) and device.type == "cuda" and getattr(backend, "graph_safe", False)
    if points is None:
        flat = classes.reshape(b, -1).long()
        focus = (brain if brain is not None else classes != 0).to(generator.device)    # the draws run there
        sampler = PointSampler(shape, focus, rc.brain_fraction)
        rows = torch.arange(b, device=generator.device)

        def points(k):
            idx, lin = sampler.draw(rows, k, generator)
            return idx.to(device), flat.gather(1, lin.to(device))
    total = sum(steps for steps, _ in rc.phases)
    trace = torch.zeros(total, b, dtype=torch.float32, device=device)
    bar = progress_bar(total=total, desc="restore", unit="step", disable=None if progress else True, leave=False)
    opt, done = _adam(z, rc.lr, adam, graphs), 0
    for phase, (steps, k) in enumerate(rc.phases):
        if phase and rc.restart_per_phase:
            opt = _adam(z, rc.lr * rc.lr_decay ** phase, adam, graphs)
        elif phase and rc.lr_decay != 1.0:
            for group in opt.param_groups:
                group["lr"] *= rc.lr_decay
        reg = prior_weight(rc, k)

        def step(idx, targets, opt=opt, reg=reg):
            data_loss = backend.mean_loss(z, idx, targets, shape, checked=True)
            loss = data_loss.sum() + reg * (z * z).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return data_loss.detach()

        run = GraphedStep(step, opt) if graphs and steps > GraphedStep.WARMUP + 1 else step
        for s in range(steps):
            trace[done] = run(*points(k))
            done += 1
            bar.update(1)
            if rc.stop_tol and converged(trace[done - s - 1:done], rc.stop_window, rc.stop_tol):
                bar.update(steps - s - 1)
                break
        if isinstance(run, GraphedStep) and run.fallback:
            warnings.warn(f"CUDA graph capture failed, phase {phase + 1} ran eagerly: {run.fallback}",
                          RuntimeWarning, stacklevel=2)
        del run
    bar.close()
    return z.detach(), trace[:done]


def converged(losses: torch.Tensor, window: int, tol: float) -> bool:
    """Whether a phase's search has levelled off: losses (steps so far, B) float32; checked every
    `window` steps (one read from the device), True when for every latent the mean of the last
    window is not below the mean of the window before by more than tol x that mean."""
    n = losses.shape[0]
    if n < 2 * window or n % window:
        return False
    last, before = losses[n - window:].mean(0), losses[n - 2 * window:n - window].mean(0)
    return bool(((before - last) <= tol * before.abs()).all())


class GraphedStep:
    """One phase's optimiser step replayed from a CUDA graph (static shapes: K is fixed within a
    phase). The first WARMUP calls run eagerly on a side stream (they create the backend's buffers
    and Adam's state, and compile kernels), the next is captured, and every later call copies its
    points and targets into the graph's inputs and replays it. If capture fails, the phase goes on
    with eager steps and `fallback` says why."""

    WARMUP = 2

    def __init__(self, step, opt):
        self.step, self.opt = step, opt
        self.graph, self.fallback, self.calls = None, None, 0

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.idx.copy_(idx)
            self.targets.copy_(targets)
            self.graph.replay()
            return self.out
        if self.fallback is not None:
            return self.step(idx, targets)
        if self.calls < self.WARMUP:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(idx, targets)
            torch.cuda.current_stream().wait_stream(side)
            return out
        try:
            self.idx, self.targets = idx.clone(), targets.clone()
            self.opt.zero_grad(set_to_none=True)       # backward then allocates the grad from the graph's pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.step(self.idx, self.targets)
        except Exception as exc:                        # capture is not possible here: run eagerly
            self.fallback = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self.opt.zero_grad(set_to_none=True)
            return self.step(idx, targets)
        self.graph = graph
        graph.replay()
        return self.out


@torch.no_grad()
def score_points(backend, z: torch.Tensor, classes: torch.Tensor, lin: torch.Tensor, chunk: int = 65536,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and most likely class of the voxels `lin` of one scan, `chunk` voxels a call.

    classes: (X, Y, Z) uint8 (range-checked by the caller); lin: (P,) long linear indices into it.
    Returns (ce float32 (P,), classes uint8 (P,)) on the classes' device.
    """
    shape = tuple(int(s) for s in classes.shape)
    device = classes.device
    flat_cls = classes.reshape(-1)
    ce_out = torch.empty(lin.numel(), dtype=torch.float32, device=device)
    cls_out = torch.empty(lin.numel(), dtype=torch.uint8, device=device)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    sizes = torch.tensor(shape, device=device)
    for start in progress_bar(range(0, lin.numel(), chunk), desc="score", unit="chunk",
                              disable=None if progress else True, leave=False):
        part = lin[start:start + chunk]
        idx = (part[:, None] // strides) % sizes
        ce, cls = backend.score_and_classes(z, idx, flat_cls[part].long(), shape, checked=True)
        ce_out[start:start + part.numel()] = ce.float()
        cls_out[start:start + part.numel()] = cls.to(torch.uint8)
    return ce_out, cls_out


def score_grid(backend, z: torch.Tensor, classes: torch.Tensor, region: torch.Tensor | None,
               chunk: int = 65536, progress: bool = False, *, checked: bool = False):
    """Per-voxel cross-entropy of one scan. classes: (X, Y, Z) uint8; region: bool (X, Y, Z) or None.

    Returns (scores float32 (X, Y, Z), 0 outside the region; most likely classes uint8 (X, Y, Z)),
    on the classes' device. The classes are range-checked once (unless `checked`), the backend
    then runs with checked=True.
    """
    if not checked:
        check_classes(classes, backend.config.n_classes)
    n = classes.numel()
    lin = region.reshape(-1).nonzero().squeeze(1) if region is not None else torch.arange(n, device=classes.device)
    ce, cls = score_points(backend, z, classes, lin, chunk, progress)
    scores = torch.zeros(n, dtype=torch.float32, device=classes.device)
    predicted = torch.zeros(n, dtype=torch.uint8, device=classes.device)
    scores[lin] = ce
    predicted[lin] = cls
    return scores.reshape(classes.shape), predicted.reshape(classes.shape)


def lattice_axis(n: int, device=None) -> torch.Tensor:
    """(L,) int64 coarse-lattice positions along an axis of n voxels: every 2nd voxel and the last,
    so that every voxel lies on or between two lattice positions at most 2 apart."""
    ax = torch.arange(0, n, 2, device=device)
    return ax if (n - 1) % 2 == 0 else torch.cat((ax, torch.tensor([n - 1], device=device)))


def _cell(coord: torch.Tensor, n: int):
    """For voxel coordinates (P,) along an axis of n: the lower lattice index j (P,) int64 (into
    lattice_axis(n)) and the weight t (P,) float32 of the upper one (0 on the lower, 1 on the upper)."""
    top = (n - 1) // 2 + (0 if (n - 1) % 2 == 0 else 1)          # last lattice index
    j = (coord // 2).clamp(max=max(top - 1, 0))
    lo = 2 * j
    hi = torch.where(j + 1 == top, torch.full_like(j, n - 1), lo + 2) if top else lo
    t = ((coord - lo).float() / (hi - lo).clamp(min=1).float()) if top else torch.zeros_like(coord, dtype=torch.float32)
    return j, t


@torch.no_grad()
def interpolated_log_probs(lattice_lp: torch.Tensor, coords: torch.Tensor, shape) -> torch.Tensor:
    """Trilinear interpolation of per-class log-probabilities from the coarse lattice.

    lattice_lp: (Lx, Ly, Lz, C) float32 at the positions lattice_axis(X) x lattice_axis(Y) x
    lattice_axis(Z); coords: (P, 3) int64 voxel indices of a grid `shape`. Returns (P, C) float32.
    """
    lx, ly, lz, c = lattice_lp.shape
    flat = lattice_lp.reshape(-1, c)
    (jx, tx), (jy, ty), (jz, tz) = (_cell(coords[:, a], int(shape[a])) for a in range(3))
    out = torch.zeros(coords.shape[0], c, dtype=torch.float32, device=lattice_lp.device)
    for dx, wx in ((0, 1 - tx), (1, tx)):
        for dy, wy in ((0, 1 - ty), (1, ty)):
            for dz, wz in ((0, 1 - tz), (1, tz)):
                w = wx * wy * wz
                corner = ((jx + dx).clamp(max=lx - 1) * ly + (jy + dy).clamp(max=ly - 1)) * lz + \
                    (jz + dz).clamp(max=lz - 1)
                out.addcmul_(flat[corner], w[:, None])
    return out


@torch.no_grad()
def score_grid_adaptive(backend, z: torch.Tensor, classes: torch.Tensor, region: torch.Tensor,
                        refine: "callable", chunk: int = 65536, progress: bool = False):
    """score_grid at a fraction of the decoder evaluations, exact where the decision is made.

    1. The decoder gives every class's log-probability on the coarse lattice (every 2nd voxel per
       axis, `lattice_axis`) wherever a lattice point is a corner of a cell touching the region.
    2. Every region voxel gets its cross-entropy and restored class from the trilinear
       interpolation of those log-probabilities (the decoder is a continuous field; IF 3D*).
    3. refine(scores) -> bool (X, Y, Z): the voxels whose post-processed value must be exact; every
       region voxel within the pooling reach of them is scored exactly (`score_points`).

    classes: (X, Y, Z) uint8 (checked by the caller); region: bool (X, Y, Z). Returns (scores
    float32 (X, Y, Z), 0 outside the region; classes uint8 (X, Y, Z); decoder evaluations int).
    """
    shape = tuple(int(s) for s in classes.shape)
    device = classes.device
    axes = [lattice_axis(s, device) for s in shape]
    near = dilate(region, 1)[axes[0]][:, axes[1]][:, :, axes[2]]              # lattice points needed
    pick = near.nonzero()
    coords = torch.stack([axes[a][pick[:, a]] for a in range(3)], 1)
    lattice = torch.zeros(*near.shape, backend.config.n_classes, dtype=torch.float32, device=device)
    for start in range(0, coords.shape[0], chunk):
        part = pick[start:start + chunk]
        lattice[part[:, 0], part[:, 1], part[:, 2]] = backend.log_probs(z, coords[start:start + chunk], shape,
                                                                         checked=True)
    lin = region.reshape(-1).nonzero().squeeze(1)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    sizes = torch.tensor(shape, device=device)
    flat_cls = classes.reshape(-1)
    scores = torch.zeros(classes.numel(), dtype=torch.float32, device=device)
    predicted = torch.zeros(classes.numel(), dtype=torch.uint8, device=device)
    for start in range(0, lin.numel(), chunk):
        part = lin[start:start + chunk]
        lp = interpolated_log_probs(lattice, (part[:, None] // strides) % sizes, shape)
        scores[part] = -lp.gather(1, flat_cls[part].long()[:, None])[:, 0]
        predicted[part] = lp.argmax(1).to(torch.uint8)
    scores, predicted = scores.reshape(shape), predicted.reshape(shape)
    exact = refine(scores) & region
    on_lattice = torch.zeros(shape, dtype=torch.bool, device=device)
    on_lattice[axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]] = True
    redo = (exact & ~on_lattice).reshape(-1).nonzero().squeeze(1)
    if redo.numel():
        ce, cls = score_points(backend, z, classes, redo, chunk, progress)
        scores.view(-1)[redo] = ce
        predicted.view(-1)[redo] = cls
    return scores, predicted, int(coords.shape[0] + redo.numel())


def refine_near(brain: torch.Tensor, rc: cfg.RestoreConfig, threshold: float, region: str):
    """The refine rule of score_grid_adaptive: voxels within the pooling reach of those whose
    post-processed map (of the interpolated scores) reaches (1 - rc.refine_margin) * threshold."""
    def refine(scores: torch.Tensor) -> torch.Tensor:
        near = anomaly_map(scores, brain, rc, region) >= (1.0 - rc.refine_margin) * threshold
        return dilate(near, pool_reach(rc))
    return refine


def anomaly_map(score: torch.Tensor, brain: torch.Tensor, rc: cfg.RestoreConfig, region: str) -> torch.Tensor:
    """The anomaly map of one raw score (X, Y, Z) float32: min-pool then average-pool (rc's sizes),
    zeroed outside the bool `brain` when region is 'brain'."""
    anomaly = postprocess(score, rc.min_pool, rc.avg_pool)
    if region == "brain":
        anomaly.masked_fill_(~brain, 0.0)
    return anomaly


class StageTimes:
    """Wall seconds per named stage of a restoration: `with times("grid"): ...` adds the block's
    time, after waiting for `device` (so the GPU work queued in the block counts). `seconds` maps
    stage -> seconds in first-seen order. Disabled (enabled=False), it times and waits for nothing."""

    def __init__(self, device=None, enabled: bool = True):
        self.device = None if device is None else torch.device(device)
        self.enabled = bool(enabled)
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class DeviceMaps:
    """A batch restored on the device: anomaly, score float32 and classes uint8 (B, N, N, N) on the
    score grid, z (B, D) float32, losses (steps, B) float32, scored voxels (B,) int64; all on the
    device until `to_host`."""

    anomaly: torch.Tensor
    score: torch.Tensor
    classes: torch.Tensor
    z: torch.Tensor
    losses: torch.Tensor
    scored: torch.Tensor
    region: str = "brain"
    slices: list | None = None        # 2D models: per scan, its restored axial slices (S_i,) int64;
                                      # z then holds their latents, scan after scan (sum S_i, D)

    def to_host(self) -> list[Restoration]:
        """One Restoration (NumPy) per scan; each array crosses to the host once, for the batch."""
        anomaly, score, classes = self.anomaly.cpu().numpy(), self.score.cpu().numpy(), self.classes.cpu().numpy()
        z, losses, scored = self.z.cpu().numpy(), self.losses.cpu(), self.scored.tolist()
        if self.slices is None:
            zs, slices = z, [None] * len(anomaly)
        else:
            zs, slices = np.split(z, np.cumsum([len(s) for s in self.slices])[:-1]), self.slices
        return [Restoration(anomaly=anomaly[i], score=score[i], classes=classes[i], z=zs[i],
                            losses=losses[:, i].tolist(), scored_voxels=int(scored[i]), region=self.region,
                            slices=slices[i])
                for i in range(anomaly.shape[0])]


def restore_batch(backend, model: Model, classes: torch.Tensor, rc: cfg.RestoreConfig, generator: torch.Generator,
                  *, brain: torch.Tensor | None = None, region: str = "brain", progress: bool = False,
                  score_classes: torch.Tensor | None = None, score_brain: torch.Tensor | None = None,
                  adam: str = "default", graphs: bool = False, stages=None,
                  threshold: float | None = None) -> DeviceMaps:
    """Restore a batch of encoded scans on the classes' device (the backend's): search, score, pool.

    classes: (B, R, R, R) uint8 on the model grid; brain: bool like it (default classes != 0);
    score_classes / score_brain: the same scans on another grid of the same frame, where the
    scores are computed (see `restore_classes`). generator: draws z0 and the points (on its own
    device, see `optimise_latents`, with `adam` and `graphs`). stages: a `StageTimes` to record
    search / grid / post, or None. threshold: the decision threshold of the maps; with
    rc.grid 'adaptive' the grid is then scored by `score_grid_adaptive` (exact wherever the map can
    reach (1 - rc.refine_margin) * threshold), on backends that have `log_probs`; otherwise, and
    without a threshold, every voxel of the region is scored. Returns DeviceMaps (nothing copied
    to the host); its `scored` counts the decoder evaluations of the grid.
    """
    if model.config.variant == "2d":            # IF 2D: one latent per restored axial slice
        from .slices import restore_slices
        if score_classes is not None:
            raise IfadError("a 2D model scores the slices it restores, on its own grid: drop --resolution")
        return restore_slices(backend, model, classes, rc, generator, brain=brain, region=region, progress=progress,
                              adam=adam, graphs=graphs, stages=stages)
    stage = stages or StageTimes(enabled=False)
    n_classes = backend.config.n_classes
    check_classes(classes, n_classes)
    brain = classes != 0 if brain is None else brain.to(torch.bool)
    if score_classes is None:
        score_cls, score_brain, src = classes, brain, rc
    else:
        check_classes(score_classes, n_classes, "score classes")
        score_cls = score_classes
        score_brain = score_cls != 0 if score_brain is None else score_brain.to(torch.bool)
        src = pools_at(rc, classes.shape[1], score_cls.shape[1])
    with stage("search"):
        z0 = initial_latents(model, classes.shape[0], rc, generator)
        z, trace = optimise_latents(backend, classes, z0, rc, generator, progress, brain, adam=adam,
                                    graphs=graphs, checked=True)
    adaptive = rc.grid == "adaptive" and threshold is not None and backend.has_log_probs
    scores, anomalies, predicted, scored = [], [], [], []
    for i in range(classes.shape[0]):
        with stage("grid"):
            keep = dilate(score_brain[i], pool_reach(src)) if region == "brain" else None
            if adaptive:
                within = keep if keep is not None else torch.ones_like(score_brain[i])
                score, cls, n = score_grid_adaptive(backend, z[i], score_cls[i], within,
                                                    refine_near(score_brain[i], src, threshold, region),
                                                    rc.chunk, progress)
            else:
                score, cls = score_grid(backend, z[i], score_cls[i], keep, rc.chunk, progress, checked=True)
                n = keep.sum() if keep is not None else score.numel()
        with stage("post"):
            anomaly = anomaly_map(score, score_brain[i], src, region)
        scores.append(score)
        anomalies.append(anomaly)
        predicted.append(cls)
        scored.append(torch.as_tensor(n, device=score.device))
    return DeviceMaps(anomaly=torch.stack(anomalies), score=torch.stack(scores), classes=torch.stack(predicted),
                      z=z, losses=trace, scored=torch.stack(scored), region=region)


def restore_classes(model: Model, classes: np.ndarray, rc: cfg.RestoreConfig = cfg.RestoreConfig(),
                    backend="auto", device="auto", precision="float32", brain: np.ndarray | None = None,
                    region: str = "brain", progress: bool = False, score_classes: np.ndarray | None = None,
                    score_brain: np.ndarray | None = None, threshold: float | None = None) -> list[Restoration]:
    """Restore one or several encoded scans at once.

    classes: (X, Y, Z) or (B, X, Y, Z) uint8 on the model grid, where the latent is searched.
    brain: bool mask of the same shape (default: classes != 0; pass the scan's own support when
    class 0 can hold brain voxels, as after min-max normalisation). region 'brain' scores only
    voxels within the pooling reach of the brain and zeroes the map outside the brain; 'full'
    scores and keeps every voxel. score_classes / score_brain: the same scans encoded on another
    grid of the same frame (e.g. N³), where the scores, the restoration and the pooling are then
    computed (pools scaled by `pools_at`); default: the search grid. backend, device and precision
    are resolved by `backends.resolve_backend` (a Backend object, or names; 'auto' by default).
    The points are drawn from a CPU generator seeded with rc.seed (the same draws on any device);
    the work runs on the backend's device (`restore_batch`) and the results come back as NumPy.
    threshold: the maps' decision threshold, for rc.grid 'adaptive' (see `restore_batch`).
    """
    if region not in ("brain", "full"):
        raise IfadError(f"region must be brain or full, got {region!r}")
    engine = resolve_backend(backend, model.decoder, device, precision)
    device = engine.device

    def batch(a, dtype):
        if a is None:
            return None
        a = np.asarray(a, dtype=dtype)
        return torch.from_numpy(a[None] if a.ndim == 3 else a).to(device)

    maps = restore_batch(engine, model, batch(classes, np.uint8), rc, torch.Generator().manual_seed(rc.seed),
                         brain=batch(brain, bool), region=region, progress=progress,
                         score_classes=batch(score_classes, np.uint8), score_brain=batch(score_brain, bool),
                         threshold=threshold)
    return maps.to_host()
