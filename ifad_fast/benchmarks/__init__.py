"""The benchmarks behind `ifad-fast bench`.

- `accuracy`: `ifad-fast bench accuracy` (the protocol on synthetic cases, `accuracy`;
  `accuracy_on_data` on the user's folders) and `speed`, the entry of `ifad-fast bench speed`;
- `speed`: the speed suite (`run`, `format_report`);
- `training`: its training rows (a step per implementation and precision, 1 -> 2 processes);
- `machine`: what they share: `machine()` (the machine's line), the synthetic brain the speed rows
  are timed on.

`accuracy ─▶ speed ─▶ training ─▶ machine`, one way. The functions named like their module
(`accuracy.accuracy`, `accuracy.speed`, `training.training`, `machine.machine`) are not re-exported
here, so that `ifad_fast.benchmarks.accuracy` etc. stay the modules.
"""
from .accuracy import IF2D, IF3D, MEAN, THRESHOLD, VAE, ZSCORE, accuracy_on_data, metrics_table

__all__ = ["accuracy_on_data", "metrics_table", "IF3D", "IF2D", "MEAN", "THRESHOLD", "VAE", "ZSCORE"]
