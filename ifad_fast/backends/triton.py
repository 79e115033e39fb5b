"""The triton backend: the fused point kernels of kernels/triton_decoder.py behind the
contract of base.py (`mean_loss`, `score`, and `score_and_classes`: the anomaly score and
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

from .base import Backend, BoundedCache, precisions_of
from ..errors import IfadError
from ..model import Decoder, axis_encoding

MIN_CC = (8, 0)

# The bf16 kernel is run on CUDA only for the model shapes and GPU families on which its loss,
# scores and z-gradient were compared with the torch backend on hardware: Triton's interpreter
# does not reproduce the GPU's code paths (on an NVIDIA H200 the z-gradient came out wrong,
# ‖Δ‖/‖ref‖ = 1.0, for latent_dim = 64 -- the `small` preset, the bundled model -- while losses and
# scores agreed to 1e-5, and the interpreter showed nothing). A row is
# (GPU family as triton_decoder.arch_key names it, precision, latent_dim, hidden, n_layers,
# latent_in, n_freqs, n_classes). Add one only after `bench/gpu_check.sh` (the GPU suite's
# gradient check) passes for that shape on that family.
HARDWARE_CHECKED = {
    # NVIDIA H200, torch 2.11 + Triton 3.6, 2026-11-26: the paper-size decoder (ModelConfig()), and
    # the same with latent_dim = 16
    ("sm90", "bf16", 256, 512, 8, 4, 10, 10),
    ("sm90", "bf16", 16, 512, 8, 4, 10, 10),
}
GATED_PRECISIONS = ("bf16",)          # float32 ("ieee" dots) is not gated


def hardware_key(mc, cc: int | None, precision: str) -> tuple:
    """The HARDWARE_CHECKED row of model config `mc` on compute capability `cc` (e.g. 90)."""
    td = _kernels()
    family = td.arch_key(cc) if not isinstance(td, str) else f"cc{cc}"
    return (family, precision, mc.latent_dim, mc.hidden, mc.n_layers, mc.latent_in, mc.n_freqs, mc.n_classes)


def hardware_check_error(mc, device, precision: str, cc: int | None = None) -> str | None:
    """None when the triton backend may run `precision` for model config `mc` on `device` (any
    precision off CUDA -- the interpreter is a check itself -- and float32 anywhere), else the
    one-line reason: the configuration is not in HARDWARE_CHECKED. cc: the compute capability
    (default: the device's)."""
    device = torch.device(device)
    if device.type != "cuda" or precision not in GATED_PRECISIONS:
        return None
    if cc is None:
        major, minor = torch.cuda.get_device_capability(device)
        cc = 10 * major + minor
    key = hardware_key(mc, cc, precision)
    if key in HARDWARE_CHECKED:
        return None
    return (f"the triton backend's {precision} kernel has not been checked on this GPU ({key[0]}) for this model "
            f"(latent_dim {mc.latent_dim}, hidden {mc.hidden}, {mc.n_layers} layers, latent_in {mc.latent_in}, "
            f"{mc.n_freqs} frequencies, {mc.n_classes} classes), and it has given wrong gradients on hardware "
            "for a shape the interpreter passed; use --backend cpu, or --precision float32")


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
        from ..kernels import triton_decoder
    except Exception as exc:
        return f"the Triton kernels do not import ({type(exc).__name__}: {exc})"
    return triton_decoder


class TritonBackend(Backend):
    """Fused Triton kernels; float32 (exact dots) or bf16 (tensor cores, fp32 accumulation)."""

    name = "triton"
    precisions = precisions_of("triton")
    graph_safe = True

    def __init__(self, decoder: Decoder, device="cuda", precision: str = "float32",
                 chunk: int = 1 << 20, allow_unchecked: bool = False):
        """allow_unchecked: run a precision and model shape that HARDWARE_CHECKED does not list
        (for the GPU suite that checks new rows); users get an IfadError instead."""
        reason = triton_unavailable_reason(device)
        if reason:
            raise IfadError(f"the triton backend cannot run here: {reason}")
        super().__init__(decoder, device, precision)
        reason = None if allow_unchecked else hardware_check_error(self.config, self.device, self.precision)
        if reason:
            raise IfadError(reason)
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
