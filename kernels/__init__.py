"""Compute kernels (Numba for the CPU, Triton for GPUs). Leaves: they import nothing of ifad_fast."""
