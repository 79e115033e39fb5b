"""The latent search of a restoration: Adam on z over a schedule's phases of (steps, points).

optimise_latents(backend, classes, z0, rc, generator) -> (z (B, D), losses (steps, B)); the points
are a row plan's draws: `ScanDraws` (sampling.PointSampler over whole scans, IF 3D, the default)
or a caller's `points` (IF 2D's per-slice draws, slices.SliceDraws); each step calls
Backend.mean_loss. On the CPU, Adam is `LatentAdam` (torch's single-tensor step written out); on
CUDA a phase's step can be replayed from a CUDA graph (`GraphedStep`). Used by core.py, the one
restoration core of IF 3D and IF 2D.
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import config as cfg
from ..backends.base import check_classes
from ..model import Model
from ..progress import progress_bar
from ..sampling import PointSampler


def initial_latents(model: Model, n: int, rc: cfg.RestoreConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, D) float32 starting latents: the mean training latent (rc.init 'mean'), else N(0, 1/D)
    drawn from `generator` on its device."""
    d = model.config.latent_dim
    if rc.init == "mean" and model.latents.numel():
        return model.latents.mean(0, keepdim=True).repeat(n, 1).float()
    return torch.randn(n, d, generator=generator, device=generator.device) / math.sqrt(d)


class ScanDraws:
    """optimise_latents' points for whole scans (IF 3D's rows): K voxels per scan and step from
    sampling.PointSampler, rc.brain_fraction of them among the brain voxels, all rows from one
    `generator`, on its device (a CPU generator: the same draws on any device).

    classes: (B, X, Y, Z) uint8; brain: bool like it (default classes != 0). A call k returns
    (idx (B, k, 3) long, targets (B, k) long) on the classes' device.
    """

    def __init__(self, classes: torch.Tensor, brain: torch.Tensor | None, fraction: float,
                 generator: torch.Generator):
        b, shape = classes.shape[0], tuple(int(s) for s in classes.shape[1:])
        self.flat = classes.reshape(b, -1).long()
        focus = (brain if brain is not None else classes != 0).to(generator.device)    # the draws run there
        self.sampler = PointSampler(shape, focus, fraction)
        self.rows = torch.arange(b, device=generator.device)
        self.generator, self.device = generator, classes.device

    def __call__(self, k: int):
        idx, lin = self.sampler.draw(self.rows, k, self.generator)
        return idx.to(self.device), self.flat.gather(1, lin.to(self.device))


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
    targets (B, K) long) on the classes' device, the points of each latent z[b] (a row plan's
    draws, e.g. the 2D variant's per-slice slices.SliceDraws); it replaces the draws above
    (`ScanDraws` from `generator` and `brain`), and `classes` then only gives the grid shape and
    the device.

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
        points = ScanDraws(classes, brain, rc.brain_fraction, generator)
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
