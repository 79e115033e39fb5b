"""Compute backends: the two hot functions of restoration, behind one contract (`Backend`).

Every backend is built from a trained `Decoder` (weights frozen, weight norm folded) and answers,
for a grid of `shape` (X, Y, Z):

- `mean_loss(z, idx, targets, shape) -> (B,) float32`: per-scan mean cross-entropy of K points,
  differentiable with respect to z (B, D) float32. idx: (B, K, 3) int voxel indices; targets:
  (B, K) int class ids; K >= 1. No weight gradients.
- `score(z, idx, targets, shape, out=None) -> (M,) float32`: cross-entropy -log P(t | z, p) of M
  voxels of one scan. z: (D,); idx: (M, 3) int; targets: (M,) int; written into `out` if given.
  No gradients.
- `score_and_classes(z, idx, targets, shape) -> ((M,) float32, (M,) uint8)`: the same plus the
  most likely class per voxel (the restoration), from the same forward.
- `log_probs(z, idx, shape) -> (M, C) float32`: log P(c | z, p) of every class at M voxels (the
  coarse lattice of `restore.score_grid_adaptive`). Optional: `has_log_probs` says whether a
  backend has it (torch and cpu do; triton does not, and scores the full grid).

`Backend` owns what every backend shares: the input checks (shapes, index and class ranges,
raised as IfadError before any work), the precision names (`parse_precision`), and the bounded
per-shape caches (`BoundedCache`). A backend implements `_mean_loss`, `_score` and, when it
has a cheaper way than the default, `_score_and_classes`, on checked inputs.

`torch` (TorchBackend) is the reference every fast backend is tested against: the decoder with
weight norm folded, evaluated in float32 with plain torch ops, autograd for the z-gradient.
`cpu` is ifad_fast/backends/fast.py (any torch device), `triton` is ifad_fast/backends/triton.py (CUDA).
Both import this module; which backend a caller gets (names, 'auto', devices) is decided in
ifad_fast/backends/factory.py, which imports all three, so this module imports neither.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch

from ..config import PRECISION_ALIASES, PRECISIONS
from ..errors import IfadError
from ..model import Decoder, cross_entropy_per_point

# precision name (config.PRECISIONS) -> storage dtype of the per-point operands. tf32: float32
# storage, float32 matmuls on the TF32 tensor cores of a CUDA GPU (10-bit mantissa products,
# float32 accumulation)
OPERAND_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "tf32": torch.float32}
RUNS = {"float32": ("cpu", "triton", "torch"), "bf16": ("cpu", "triton"), "tf32": ("cpu",)}   # who runs what


def precisions_of(backend: str) -> tuple:
    """The precisions (config.PRECISIONS order) that the backend named `backend` runs (RUNS)."""
    return tuple(p for p in PRECISIONS if backend in RUNS[p])


def parse_precision(name: str, allowed=PRECISIONS, who: str = "this backend") -> str:
    """'float32' | 'bf16' | 'tf32' (config.PRECISIONS; also 'fp32', 'bfloat16') -> the canonical
    name; IfadError for anything else or for a precision that `who` does not run."""
    canonical = PRECISION_ALIASES.get(name, name)
    if canonical not in PRECISIONS:
        raise IfadError(f"unknown precision {name!r}; choose {', '.join(PRECISIONS)}")
    if canonical not in allowed:
        raise IfadError(f"{who} runs in {' or '.join(allowed)} only; use --backend "
                        f"{' or '.join(RUNS[canonical])} for {canonical}")
    return canonical


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bfloat16 matmuls natively (oneDNN reports AVX512-BF16 or AMX);
    False on AVX2-only CPUs, where torch emulates them several times slower than float32, and
    when this torch build cannot tell. The bf16 warnings of FastBackend and the Trainer, and the
    training benchmark's choice of rows, ask this."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class BoundedCache:
    """A small least-recently-used map: `get(key, make)` returns the cached value or stores
    make(); past `size` entries the least recently used one is dropped. The one caching policy
    of the backends (per-shape tables, per-size buffers)."""

    def __init__(self, size: int):
        self.size = int(size)
        self._items: OrderedDict = OrderedDict()

    def get(self, key, make):
        """The value cached under `key`, now the most recently used; else make() stored under it
        (dropping the least recently used entry past `size`)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self):
        return len(self._items)


class Backend(ABC):
    """The contract of a compute backend (see the module docstring); subclasses set `name` and
    `precisions` and implement `_mean_loss`, `_score` and `_score_and_classes` on checked inputs
    (abstract: a subclass missing one cannot be built)."""

    name = "?"
    precisions: tuple = ("float32",)
    # True when a checked=True mean_loss neither synchronises with nor copies from the host, so a
    # restoration step can be captured in a CUDA graph (restore.optimise_latents)
    graph_safe = False

    def __init__(self, decoder: Decoder, device="cpu", precision: str = "float32"):
        self.precision = parse_precision(precision, self.precisions, f"the {self.name} backend")
        self.config = decoder.config
        self.device = torch.device(device)
        if self.precision == "tf32" and self.device.type != "cuda":
            raise IfadError(f"precision tf32 runs float32 matmuls on the TF32 tensor cores of a CUDA GPU; "
                            f"on {self.device.type} use --precision float32 (or bf16)")

    # ------------------------------------------------------------------ public, checked
    # checked=True: the caller has validated the inputs already (restore/volume.py checks the class
    # volume once per restoration and draws indices inside the grid by construction), so the
    # per-call range checks -- one host synchronisation per call on a GPU -- are skipped.
    def mean_loss(self, z: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, shape, *,
                  checked: bool = False) -> torch.Tensor:
        """z (B, D) float32, idx (B, K, 3) int, targets (B, K) int -> (B,) float32 mean
        cross-entropy over the K points of each scan, differentiable with respect to z."""
        shape = _grid_shape(shape) if checked else self._check(z, idx, targets, shape, batched=True)
        with self.matmul_precision():
            return self._mean_loss(z, idx, targets, shape)

    @torch.no_grad()
    def score(self, z: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, shape,
              out: torch.Tensor | None = None, *, checked: bool = False) -> torch.Tensor:
        """z (D,), idx (M, 3) int, targets (M,) int -> (M,) float32 -log P(t | z, p); written into
        `out` ((M,) float32 on the backend's device) when given."""
        shape = _grid_shape(shape) if checked else self._check(z, idx, targets, shape, batched=False)
        if out is not None and (out.shape != (idx.shape[0],) or out.dtype != torch.float32
                                or out.device != self.device):
            raise IfadError("score: out must be a float32 tensor of shape (M,) on the backend's device")
        with self.matmul_precision():
            scores = self._score(z.detach(), idx, targets, shape, out)
        if out is not None and scores is not out:
            scores = out.copy_(scores)
        return scores

    @torch.no_grad()
    def score_and_classes(self, z: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, shape, *,
                          checked: bool = False):
        """Like score, plus the most likely class per voxel: ((M,) float32, (M,) uint8)."""
        shape = _grid_shape(shape) if checked else self._check(z, idx, targets, shape, batched=False)
        with self.matmul_precision():
            return self._score_and_classes(z.detach(), idx, targets, shape)

    @torch.no_grad()
    def log_probs(self, z: torch.Tensor, idx: torch.Tensor, shape, *, checked: bool = False) -> torch.Tensor:
        """z (D,), idx (M, 3) int -> (M, C) float32 log-probabilities of every class at each voxel."""
        if not self.has_log_probs:
            raise IfadError(f"the {self.name} backend gives no per-class log-probabilities; use the cpu or torch "
                            "backend for the adaptive grid, or score the full grid (--grid full)")
        if checked:
            shape = _grid_shape(shape)
        else:
            shape = self._check(z, idx, torch.zeros(idx.shape[:1], dtype=torch.long, device=idx.device), shape,
                                batched=False)
        with self.matmul_precision():
            return self._log_probs(z.detach(), idx, shape)

    @property
    def has_log_probs(self) -> bool:
        """Whether this backend gives `log_probs`."""
        return self._log_probs is not None

    # optional: a backend that can give every class's log-probabilities defines
    # _log_probs(z, idx, shape) -> (M, C) float32 on checked inputs
    _log_probs = None

    def matmul_precision(self):
        """A context in which this backend's float32 matmuls run at its precision: TF32 tensor
        cores for 'tf32' (set for the call only, restored after), unchanged otherwise."""
        return tf32_matmuls() if self.precision == "tf32" else nullcontext()

    # ------------------------------------------------------------------ to implement (checked inputs)
    @abstractmethod
    def _mean_loss(self, z, idx, targets, shape) -> torch.Tensor:
        """mean_loss's (B,) float32 mean cross-entropy, differentiable with respect to z."""

    @abstractmethod
    def _score(self, z, idx, targets, shape, out) -> torch.Tensor:
        """(M,) float32 scores; may write into `out` (None or checked) and return it."""

    @abstractmethod
    def _score_and_classes(self, z, idx, targets, shape):
        """score_and_classes's ((M,) float32 scores, (M,) most likely classes)."""

    # ------------------------------------------------------------------ checks
    def _check(self, z, idx, targets, shape, batched: bool) -> tuple[int, int, int]:
        """Shapes, dtypes and ranges of one call; returns the grid shape as three ints."""
        shape = _grid_shape(shape)
        D = self.config.latent_dim
        if batched:
            ok = (z.dim() == 2 and z.shape[1] == D and idx.dim() == 3 and idx.shape[0] == z.shape[0]
                  and idx.shape[2] == 3 and tuple(targets.shape) == tuple(idx.shape[:2]))
            want = "z (B, D), idx (B, K, 3), targets (B, K)"
        else:
            ok = (z.dim() == 1 and z.shape[0] == D and idx.dim() == 2 and idx.shape[1] == 3
                  and tuple(targets.shape) == (idx.shape[0],))
            want = "z (D,), idx (M, 3), targets (M,)"
        if not ok:
            raise IfadError(f"{self.name} backend: expected {want} with D = {D}; got z {tuple(z.shape)}, "
                            f"idx {tuple(idx.shape)}, targets {tuple(targets.shape)}")
        if batched and idx.shape[1] == 0:
            raise IfadError("mean_loss needs at least one point per scan (K >= 1)")
        if idx.is_floating_point() or targets.is_floating_point() or idx.dtype == torch.bool:
            raise IfadError(f"idx and targets must be integer tensors, got {idx.dtype} and {targets.dtype}")
        if idx.numel():             # one host read for both ranges (on CUDA: one synchronisation)
            flat = idx.reshape(-1, 3)
            bad = torch.stack((((flat < 0) | (flat >= torch.tensor(shape, device=idx.device))).any(),
                               ((targets < 0) | (targets >= self.config.n_classes)).any().to(idx.device)))
            bad_idx, bad_targets = bad.tolist()
            if bad_idx:
                raise IfadError(f"voxel indices out of range for a grid of shape {shape}")
            if bad_targets:
                raise IfadError(f"targets must be class ids in 0..{self.config.n_classes - 1}")
        return shape


def _grid_shape(shape) -> tuple[int, int, int]:
    """(X, Y, Z) as three positive ints; IfadError otherwise."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise IfadError(f"grid shape must be three sizes, got {shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise IfadError(f"grid shape must be three positive sizes, got {shape}")
    return shape


def check_classes(classes: torch.Tensor, n_classes: int, what: str = "classes") -> None:
    """IfadError unless `classes` is an integer tensor of class ids in 0..n_classes-1: the one
    range check of a restoration (a single host read), after which backend calls pass checked=True."""
    if classes.is_floating_point() or classes.dtype == torch.bool:
        raise IfadError(f"{what} must be integer class ids, got {classes.dtype}")
    if classes.numel():
        lo, hi = torch.aminmax(classes.reshape(-1))
        lo, hi = (int(v) for v in torch.stack((lo.long(), hi.long())).tolist())
        if lo < 0 or hi >= n_classes:
            raise IfadError(f"{what} must be class ids in 0..{n_classes - 1}, found {lo if lo < 0 else hi}; "
                            "the scans were encoded with other centres than this model's")


@contextmanager
def tf32_matmuls():
    """float32 matmuls on TF32 tensor cores inside the block (torch.set_float32_matmul_precision
    'high'); the previous setting is restored on exit."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class TorchBackend(Backend):
    """Reference: plain torch, float32, folded weights, autograd for dL/dz."""

    name = "torch"
    precisions = precisions_of("torch")

    def __init__(self, decoder: Decoder, device="cpu", precision: str = "float32"):
        super().__init__(decoder, device, precision)
        self.decoder = decoder.folded().to(self.device)

    def _mean_loss(self, z, idx, targets, shape):
        logits = self.decoder.logits_at(z, idx, shape)
        return cross_entropy_per_point(logits, targets).mean(dim=1)

    def _score(self, z, idx, targets, shape, out):
        return self._score_and_classes(z, idx, targets, shape)[0]

    def _score_and_classes(self, z, idx, targets, shape):
        logits = self.decoder.logits_at(z[None], idx[None], shape)[0]
        return cross_entropy_per_point(logits, targets), logits.argmax(-1).to(torch.uint8)

    def _log_probs(self, z, idx, shape):
        return torch.log_softmax(self.decoder.logits_at(z[None], idx[None], shape)[0].float(), dim=-1)
