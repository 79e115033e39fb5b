"""PNG figures: orthogonal slices through a point, scan / restoration / anomaly overlay."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def slices_figure(path, scan: np.ndarray, restoration: np.ndarray, anomaly: np.ndarray,
                  truth: np.ndarray | None = None, centre=None, title: str = "") -> Path:
    """Axial, coronal and sagittal slices through `centre` (default: the lesion's or the anomaly's peak).

    Columns: scan, restoration, anomaly map over the scan with the ground-truth contour.
    Written atomically as PNG.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    if centre is None:
        focus = truth if truth is not None and truth.any() else anomaly >= np.percentile(anomaly, 99.9)
        centre = np.round(np.argwhere(focus).mean(0)).astype(int)
    x, y, z = (int(c) for c in centre)
    views = [("axial", lambda v: v[:, :, z].T), ("coronal", lambda v: v[:, y, :].T), ("sagittal", lambda v: v[x, :, :].T)]
    vmax = float(np.percentile(anomaly[anomaly > 0], 99.5)) if (anomaly > 0).any() else 1.0
    fig, axes = plt.subplots(3, 3, figsize=(10, 10), facecolor="black")
    for row, (name, cut) in enumerate(views):
        panels = [(cut(scan), "scan"), (cut(restoration), "restoration"), (cut(scan), "anomaly")]
        for col, (img, label) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", origin="lower")
            if col == 2:
                a = np.ma.masked_less(cut(anomaly), 0.05 * vmax)
                ax.imshow(a, cmap="magma", origin="lower", alpha=0.75, vmin=0, vmax=vmax)
            if col != 1 and truth is not None and cut(truth).any():
                ax.contour(cut(truth).astype(float), levels=[0.5], colors="cyan", linewidths=1.0)
            ax.set_axis_off()
            ax.set_title(f"{label} ({name})", color="white", fontsize=9)
    if title:
        fig.suptitle(title, color="white")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", facecolor="black")
    plt.close(fig)
    return path
