"""Compute backends: one contract, three implementations, and the factory that picks one.

- `base`: the contract (`Backend`), `TorchBackend` (the reference), the precision names
  (`PRECISIONS`, `parse_precision`), `BoundedCache`, `check_classes`;
- `fast`: `FastBackend` (`cpu`); `triton`: `TritonBackend` (`triton`) and the hardware gate of its
  bf16 kernel;
- `factory`: which backend runs (`resolve_device`, `resolve_backend`, `make_backend`, `auto_backend`).

`base` imports neither implementation nor the factory, `fast` and `triton` import only `base`, the
factory imports all three, so the imports below form no cycle. Inside the package, modules import
from the defining module (`backends.base`, `backends.factory`); these names are for users.
"""
from .base import (PRECISION_ALIASES, PRECISIONS, Backend, BoundedCache, TorchBackend, check_classes,
                   cpu_has_native_bf16, parse_precision)
from .fast import FastBackend
from .triton import HARDWARE_CHECKED, TritonBackend, hardware_check_error, triton_unavailable_reason
from .factory import BACKENDS, auto_backend, make_backend, resolve_backend, resolve_device

__all__ = ["Backend", "TorchBackend", "FastBackend", "TritonBackend", "BoundedCache", "PRECISIONS",
           "PRECISION_ALIASES", "parse_precision", "check_classes", "cpu_has_native_bf16", "HARDWARE_CHECKED",
           "hardware_check_error", "triton_unavailable_reason", "BACKENDS", "auto_backend", "make_backend",
           "resolve_backend", "resolve_device"]
