"""Which backend runs: the one place where what a caller asked for -- a backend name
('auto', 'triton', 'torch', 'cpu') or a Backend already built, a device name ('auto', 'cpu',
'cuda', 'cuda:N') or a torch.device, a precision name -- becomes a built `Backend`.

The contract and the reference live in base.py, the implementations in fast.py (`cpu`) and
triton.py (`triton`); this module imports all three at the top and none of them
imports it, so the backends form no import cycle. Callers (api, restore, speed, the CLI) ask
`resolve_backend`; 'auto' is `auto_backend`'s policy.
"""
from __future__ import annotations

import torch

from . import triton as triton_backend
from .base import Backend, TorchBackend
from ..config import PRECISION_ALIASES
from ..errors import IfadError
from .fast import FastBackend
from ..model import Decoder

BACKENDS = ("auto", "triton", "torch", "cpu")


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


def resolve_backend(backend, decoder: Decoder, device="auto", precision: str = "float32") -> Backend:
    """The one place where what a caller asked for becomes a Backend: `backend` a name
    (BACKENDS; 'auto' picks by `make_backend`'s policy) or a Backend already built; `device` a
    name ('auto': CUDA if present, see `resolve_device`) or a torch.device. A Backend passed in
    keeps its own device and precision; naming another device with it is an IfadError."""
    if isinstance(backend, Backend):
        if not (isinstance(device, str) and device == "auto"):
            asked = resolve_device(device) if isinstance(device, str) else torch.device(device)
            if not _same_device(asked, backend.device):
                raise IfadError(f"the {backend.name} backend given runs on {backend.device}, not on {asked}; "
                                "build it on that device or leave the device out")
        return backend
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return make_backend(backend, decoder, device, precision)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device type, and the same CUDA index where both name one."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index is None or b.index is None:
        return True
    return a.index == b.index


def make_backend(name: str, decoder: Decoder, device, precision: str = "float32") -> Backend:
    """Build the named backend on `device` ('auto': `auto_backend`'s choice)."""
    if name not in BACKENDS:
        raise IfadError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        name = auto_backend(decoder.config, device, precision)
    if name == "torch":
        return TorchBackend(decoder, device, precision)
    if name == "cpu":
        return FastBackend(decoder, device, precision)
    reason = triton_backend.triton_unavailable_reason(device)
    if reason:
        raise IfadError(f"the triton backend cannot run here: {reason}; use --backend cpu or torch")
    return triton_backend.TritonBackend(decoder, device, precision)


def auto_backend(mc, device, precision: str = "float32") -> str:
    """The backend 'auto' picks: 'triton' for bf16 on a CUDA GPU where the triton backend runs and
    its bf16 kernel was checked on this GPU family for this model (triton.HARDWARE_CHECKED);
    'cpu' (FastBackend, any device) otherwise.

    Measured on an NVIDIA H200 (paper-size decoder, one 160³ scan, warm): paper schedule torch
    3.67 s, cpu float32 3.69, triton float32 3.97, triton bf16 1.88; fast schedule torch 1.13,
    cpu 0.91, triton float32 1.11, triton bf16 0.90. So the triton float32 path is never picked.
    """
    device = torch.device(device)
    if PRECISION_ALIASES.get(precision, precision) == "bf16" and _triton_usable(device):
        if triton_backend.hardware_check_error(mc, device, "bf16") is None:
            return "triton"
    return "cpu"


def _triton_usable(device: torch.device) -> bool:
    """True when `device` is a CUDA GPU on which the triton backend runs (Triton imports, the
    compute capability is high enough)."""
    return device.type == "cuda" and triton_backend.triton_unavailable_reason(device) is None
