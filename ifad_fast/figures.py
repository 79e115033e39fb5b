"""PNG figures: orthogonal slices through a point, scan / restoration / anomaly overlay."""
from __future__ import annotations

from pathlib import Path

import numpy as np

_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
_PLANE = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}


def _views(affine):
    """Per slice view: (name, fixed voxel axis, horizontal axis, vertical axis, edge labels or None).

    Edge labels are (left, right, bottom, top) of the displayed slice, from the affine's axis
    codes (nibabel.aff2axcodes): the end of a voxel axis where its index grows is labelled with
    its code, the other end with the opposite direction.
    """
    codes = None
    if affine is not None:
        import nibabel as nib
        codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    views = []
    for fixed, (h, v), default in ((2, (0, 1), "axial"), (1, (0, 2), "coronal"), (0, (1, 2), "sagittal")):
        if codes is None or None in codes:
            views.append((default, fixed, h, v, None))
        else:
            edges = (_OPPOSITE[codes[h]], codes[h], _OPPOSITE[codes[v]], codes[v])
            views.append((_PLANE[codes[fixed]], fixed, h, v, edges))
    return views


def slices_figure(path, scan: np.ndarray, restoration: np.ndarray, anomaly: np.ndarray,
                  truth: np.ndarray | None = None, centre=None, title: str = "", affine=None) -> Path:
    """Three orthogonal slices through `centre` (default: the lesion's or the anomaly's peak).

    scan, restoration, anomaly, truth: (X, Y, Z) arrays on one grid. Columns: scan, restoration,
    anomaly map over the scan (with a colour bar) and the ground-truth contour when `truth` is
    given. With the scan's `affine` (4, 4), each slice's edges are labelled with their anatomical
    directions (L/R, A/P, S/I) and the views are named by the plane they really are. Written
    atomically as PNG.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    if centre is None:
        focus = truth if truth is not None and truth.any() else anomaly >= np.percentile(anomaly, 99.9)
        centre = np.round(np.argwhere(focus).mean(0)).astype(int)
    centre = [int(c) for c in centre]

    def cut(vol, fixed, h, v):
        return np.take(vol, centre[fixed], axis=fixed).T      # (h, v) axes kept in order -> rows v, columns h

    vmax = float(np.percentile(anomaly[anomaly > 0], 99.5)) if (anomaly > 0).any() else 1.0
    fig, axes = plt.subplots(3, 3, figsize=(10.5, 10), facecolor="black")
    overlay = None
    for row, (name, fixed, h, v, edges) in enumerate(_views(affine)):
        panels = [(scan, "scan"), (restoration, "restoration"), (scan, "anomaly")]
        for col, (vol, label) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(cut(vol, fixed, h, v), cmap="gray", origin="lower")
            if col == 2:
                a = np.ma.masked_less(cut(anomaly, fixed, h, v), 0.05 * vmax)
                overlay = ax.imshow(a, cmap="magma", origin="lower", alpha=0.75, vmin=0, vmax=vmax)
            if col != 1 and truth is not None and cut(truth, fixed, h, v).any():
                ax.contour(cut(truth, fixed, h, v).astype(float), levels=[0.5], colors="cyan", linewidths=1.0)
            if edges is not None:
                style = dict(color="yellow", fontsize=9, fontweight="bold", transform=ax.transAxes)
                ax.text(0.02, 0.5, edges[0], ha="left", va="center", **style)
                ax.text(0.98, 0.5, edges[1], ha="right", va="center", **style)
                ax.text(0.5, 0.02, edges[2], ha="center", va="bottom", **style)
                ax.text(0.5, 0.98, edges[3], ha="center", va="top", **style)
            ax.set_axis_off()
            ax.set_title(f"{label} ({name})", color="white", fontsize=9)
    if title:
        fig.suptitle(title, color="white")
    fig.subplots_adjust(left=0.02, right=0.88, bottom=0.02, top=0.93, wspace=0.05, hspace=0.12)
    bar = fig.colorbar(overlay, cax=fig.add_axes([0.9, 0.2, 0.02, 0.6]))
    bar.set_label("anomaly score", color="white")
    bar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", facecolor="black")
    plt.close(fig)
    return path
