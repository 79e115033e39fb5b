"""What every benchmark shares: a line naming the machine for its tables, and the synthetic brain the
speed rows are timed on. A leaf of the benchmark layer: accuracy.py, speed.py and training.py import
it, it imports none of them.
"""
from __future__ import annotations

import platform

from .. import config as cfg


def machine() -> str:
    """One line naming this machine for a results table: CPU model, core count, the CUDA GPU if
    any, torch's version."""
    import os
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def benchmark_case():
    """The synthetic MNI152 brain every row is timed on (healthy subject 0 of seed 123)."""
    from ..synth import generate_healthy
    return generate_healthy(0, seed=123)


def benchmark_volume(resolution: int):
    """A synthetic MNI152 brain at resolution³: (classes uint8 with the HCP T2 centres, brain mask bool)."""
    from ..preprocess import IntensityEncoder, prepare
    case = benchmark_case()
    p = prepare(case.image, IntensityEncoder.preset("hcp-t2"), cfg.PreprocessConfig(resolution=resolution), 3,
                case.affine)
    return p.classes, p.brain
