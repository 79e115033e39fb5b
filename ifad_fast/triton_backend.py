"""The triton backend: the fused point kernels of kernels/triton_decoder.py behind the
contract of backends.py (`mean_loss`, `score`, and `score_and_classes`: the anomaly score and
the restored class from one launch).

One fused launch per restoration step computes, for B scans × K points, the per-point
cross-entropy and (when z requires grad) the sums over points of the pre-activation gradients
at layers 0 and latent_in; dL/dz is then two tiny matmuls in the autograd backward. `score`
runs the same kernel forward-only over any list of voxels (a dilated brain mask or the whole
grid), launched in bounded chunks. Weights are folded and packed once, per device and precision.

Runs on CUDA GPUs with compute capability >= 8.0, and, for checks on any machine, on the CPU
through Triton's interpreter (TRITON_INTERPRET=1 set before Python starts; slow).
"""
from __future__ import annotations

import os

import torch

from .backends import Backend, BoundedCache
from .errors import IfadError
from .model import Decoder, axis_encoding

MIN_CC = (8, 0)


def triton_unavailable_reason(device) -> str | None:
    """None when the triton backend can run on `device`, else a one-line reason."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        return f"unknown device {device!r}"
    try:
        import triton  # noqa: F401
    except Exception as exc:                                   # ImportError, broken installs
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no usable CUDA GPU"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < MIN_CC:
            return (f"GPU compute capability {major}.{minor} is below 8.0 (the kernels need bf16 "
                    "tensor cores: Ampere or newer)")
        td = _kernels()
        if isinstance(td, str):
            return td
        if td.interpreted():
            return ("TRITON_INTERPRET=1 is set, so Triton would interpret the kernels on the CPU; "
                    "unset it to use the GPU")
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("on the CPU it runs only in Triton's interpreter (slow, for checks): set "
                    "TRITON_INTERPRET=1 in the environment before starting")
        td = _kernels()
        if isinstance(td, str):
            return td
        if not td.interpreted():
            return ("TRITON_INTERPRET=1 was set after triton had been imported; set it in the "
                    "environment before starting Python")
        return None
    return f"device type {device.type!r} is not supported (use a CUDA GPU)"


def _kernels():
    try:
        from .kernels import triton_decoder
    except Exception as exc:
        return f"the Triton kernels do not import ({type(exc).__name__}: {exc})"
    return triton_decoder


class TritonBackend(Backend):
    """Fused Triton kernels; float32 (exact dots) or bf16 (tensor cores, fp32 accumulation)."""

    name = "triton"
    precisions = ("float32", "bf16")
    graph_safe = True

    def __init__(self, decoder: Decoder, device="cuda", precision: str = "float32",
                 chunk: int = 1 << 20):
        reason = triton_unavailable_reason(device)
        if reason:
            raise IfadError(f"the triton backend cannot run here: {reason}")
        super().__init__(decoder, device, precision)
        self._td = _kernels()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        mc = self.config
        self.chunk = int(chunk)
        self.pack = self._td.PackedDecoder(decoder.weights(), mc.latent_dim, mc.n_freqs, mc.latent_in,
                                           self.device, self.precision)
        self._tables = BoundedCache(8)          # grid shape -> (X+Y+Z, 2L) γ rows

    def _table(self, shape) -> torch.Tensor:
        """(X+Y+Z, 2L) float32 per-axis γ rows (model.axis_encoding), so the kernel's γ is exactly
        the reference's."""
        return self._tables.get(shape, lambda: axis_encoding(shape, self.config.n_freqs, self.device))

    def _mean_loss(self, z, idx, targets, shape):
        return self._td.fused_mean_loss(self.pack, z, idx, targets, shape, self._table(shape))

    def _score(self, z, idx, targets, shape, out):
        return self._td.grid_scores(self.pack, z, idx, targets, shape, self._table(shape), chunk=self.chunk)

    def _score_and_classes(self, z, idx, targets, shape):
        return self._td.grid_scores(self.pack, z, idx, targets, shape, self._table(shape), chunk=self.chunk,
                                    classes=True)
