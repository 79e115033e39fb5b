"""The triton backend: the fused point kernels of kernels/triton_decoder.py behind the
interface of backends.py (`mean_loss`, `score`, and `score_and_classes`, which restore.py uses
when a backend has it: the anomaly score and the restored class from one launch).

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

from .errors import IfadError
from .model import Decoder, positional_encoding, voxel_coords

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


class TritonBackend:
    """Fused Triton kernels; float32 (exact dots) or bf16 (tensor cores, fp32 accumulation)."""

    name = "triton"

    def __init__(self, decoder: Decoder, device="cuda", precision: str = "float32",
                 chunk: int = 1 << 20):
        reason = triton_unavailable_reason(device)
        if reason:
            raise IfadError(f"the triton backend cannot run here: {reason}")
        td = _kernels()
        self._td = td
        try:
            self.precision = td.normalise_precision(precision)
        except ValueError as exc:
            raise IfadError(str(exc)) from None
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        mc = decoder.config
        self.config = mc
        self.chunk = int(chunk)
        self.pack = td.PackedDecoder(decoder.weights(), mc.latent_dim, mc.n_freqs, mc.latent_in,
                                     self.device, self.precision)
        self._tables: dict = {}

    def _table(self, shape) -> torch.Tensor:
        """(X+Y+Z, 2L) per-axis γ rows, computed with the model's own voxel_coords and
        positional_encoding, so the kernel's γ is exactly the reference's."""
        key = tuple(int(s) for s in shape)
        if key not in self._tables:
            L = self.config.n_freqs
            rows = []
            for c, s in enumerate(key):
                idx = torch.zeros(s, 3, dtype=torch.long, device=self.device)
                idx[:, c] = torch.arange(s, device=self.device)
                enc = positional_encoding(voxel_coords(idx, key), L)
                rows.append(enc[:, c * 2 * L:(c + 1) * 2 * L])
            self._tables[key] = torch.cat(rows).to(torch.float32).contiguous()
        return self._tables[key]

    def _check(self, z, idx, targets, batched: bool, shape):
        D = self.config.latent_dim
        if len(shape) != 3:
            raise IfadError(f"grid shape must have 3 sizes, got {tuple(shape)}")
        if batched:
            ok = z.dim() == 2 and z.shape[1] == D and idx.dim() == 3 and idx.shape[0] == z.shape[0] \
                and idx.shape[2] == 3 and tuple(targets.shape) == tuple(idx.shape[:2]) and idx.shape[1] > 0
            want = "z (B, D), idx (B, K>0, 3), targets (B, K)"
        else:
            ok = z.dim() == 1 and z.shape[0] == D and idx.dim() == 2 and idx.shape[1] == 3 \
                and tuple(targets.shape) == (idx.shape[0],)
            want = "z (D,), idx (M, 3), targets (M,)"
        if not ok:
            raise IfadError(f"triton backend: expected {want} with D={D}; got z {tuple(z.shape)}, "
                            f"idx {tuple(idx.shape)}, targets {tuple(targets.shape)}")

    def mean_loss(self, z, idx, targets, shape):
        """(B,) per-scan mean cross-entropy of K points; differentiable with respect to z."""
        self._check(z, idx, targets, True, shape)
        return self._td.fused_mean_loss(self.pack, z, idx, targets, shape, table=self._table(shape))

    @torch.no_grad()
    def score(self, z, idx, targets, shape):
        """(M,) float32 -log P(t | z, p) of the voxels idx (targets gathered at those voxels)."""
        self._check(z, idx, targets, False, shape)
        return self._td.grid_scores(self.pack, z.detach(), idx, targets, shape, chunk=self.chunk,
                                    table=self._table(shape))

    @torch.no_grad()
    def score_and_classes(self, z, idx, targets, shape):
        """(scores (M,) float32, most likely class (M,) uint8) of the voxels idx, one launch."""
        self._check(z, idx, targets, False, shape)
        return self._td.grid_scores(self.pack, z.detach(), idx, targets, shape, chunk=self.chunk,
                                    table=self._table(shape), classes=True)
