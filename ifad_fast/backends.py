"""Compute backends: the two hot functions of restoration, behind one small interface.

Every backend is built from a trained `Decoder` and answers, for a batch of B scans:

- `mean_loss(z, idx, targets, shape) -> (B,)`: per-scan mean cross-entropy of K points,
  differentiable with respect to z (B, D). idx: (B, K, 3) int voxel indices into a grid of
  `shape` (X, Y, Z); targets: (B, K) int class ids. Weights are frozen: no weight gradients.
- `score(z, idx, targets, shape) -> (M,)`: float32 cross-entropy -log P(t | z, p) of M voxels
  of one scan. z: (D,); idx: (M, 3); targets: (M,). No gradients.
- `score_and_classes(...) -> ((M,) float32, (M,) int)`: the same plus the most likely class
  per voxel (the restoration), from the same forward.

`torch` is the reference every fast backend is tested against: the decoder with weight norm
folded, evaluated in float32 with plain torch ops, autograd for the z-gradient.
"""
from __future__ import annotations

import torch

from .errors import IfadError
from .model import Decoder, cross_entropy_per_point

BACKENDS = ("auto", "triton", "torch", "cpu")


class TorchBackend:
    """Reference: plain torch, float32, folded weights, autograd for dL/dz."""

    name = "torch"

    def __init__(self, decoder: Decoder, device="cpu", precision: str = "float32"):
        if precision != "float32":
            raise IfadError("the torch reference backend runs in float32 only; use --backend cpu for bf16")
        self.decoder = decoder.folded().to(device)
        self.device = torch.device(device)
        self.precision = precision

    def mean_loss(self, z, idx, targets, shape):
        logits = self.decoder.logits_at(z, idx, shape)
        return cross_entropy_per_point(logits, targets).mean(dim=1)

    @torch.no_grad()
    def score(self, z, idx, targets, shape):
        return self.score_and_classes(z, idx, targets, shape)[0]

    @torch.no_grad()
    def score_and_classes(self, z, idx, targets, shape):
        """Like score, plus the most likely class per voxel (M,) int64."""
        logits = self.decoder.logits_at(z[None], idx[None], shape)[0]
        return cross_entropy_per_point(logits, targets), logits.argmax(-1)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a clear error for unknown or unavailable devices."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise IfadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IfadError("CUDA was asked for but this machine has no usable CUDA GPU "
                        "(or torch was built without CUDA); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise IfadError(f"device {device!r} is not supported; use cpu, cuda or auto")
    return dev


def make_backend(name: str, decoder: Decoder, device, precision: str = "float32"):
    """Build the named backend on `device` ('auto' picks the fastest that works here)."""
    if name not in BACKENDS:
        raise IfadError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if _triton_usable(device) else "cpu"
    if name == "torch":
        return TorchBackend(decoder, device, precision)
    if name == "cpu":
        from .fast import FastBackend
        return FastBackend(decoder, device, precision)
    from .triton_backend import TritonBackend, triton_unavailable_reason
    reason = triton_unavailable_reason(device)
    if reason:
        raise IfadError(f"the triton backend cannot run here: {reason}; use --backend cpu or torch")
    return TritonBackend(decoder, device, precision)


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from .triton_backend import triton_unavailable_reason
    except ImportError:
        return False
    return triton_unavailable_reason(device) is None
