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
    from .extras import require

    require("matplotlib")
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


def accuracy_figure(path, results: dict, scan: np.ndarray, truth: np.ndarray, maps: dict, affine=None,
                    title: str = "") -> Path:
    """The accuracy protocol's figure: every method's precision-recall curve on one plot (left), and
    one case's axial slice through its lesion's centre: the scan, then each method's map (its own
    colour scale), with the ground truth (cyan) and the map at its method's threshold (yellow).

    results: {method: `metrics.evaluate` result with "pr_curve", "ap", "threshold"}; scan, truth
    (bool) and maps ({method: map}): (X, Y, Z) on the scan's grid; affine names the axial axis.
    Written atomically as PNG.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    name, fixed, *_ = next((view for view in _views(affine) if view[0] == "axial"), _views(affine)[0])
    focus = truth if truth.any() else scan != 0
    index = int(round(np.argwhere(focus)[:, fixed].mean()))

    def cut(vol):
        return np.take(vol, index, axis=fixed).T         # rows v, columns h

    panels = [("scan", None), *maps.items()]
    cols = -(-len(panels) // 2)
    fig = plt.figure(figsize=(4.5 + 2.6 * cols, 5.6))
    grid = fig.add_gridspec(2, cols + 2)
    pr = fig.add_subplot(grid[:, :2])
    for method, r in results.items():
        pr.plot(r["pr_curve"]["recall"], r["pr_curve"]["precision"], label=f"{method} (AP {r['ap']:.3f})")
    pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall")
    pr.legend(fontsize=7, loc="lower left")
    pr.grid(alpha=0.3)
    brain = scan != 0
    for k, (label, score) in enumerate(panels):
        ax = fig.add_subplot(grid[k // cols, 2 + k % cols])
        if score is None:
            ax.imshow(cut(scan), cmap="gray", origin="lower")
        else:
            top = float(np.percentile(score[brain], 99.5)) if brain.any() else float(score.max())
            ax.imshow(cut(score), cmap="magma", origin="lower", vmin=0, vmax=top if top > 0 else 1.0)
            above = cut(score >= np.float32(results[label]["threshold"])) if label in results else None
            if above is not None and above.any() and not above.all():
                ax.contour(above.astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
        if cut(truth).any():
            ax.contour(cut(truth).astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{title} ({name} slice {index})" if title else f"{name} slice {index}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
