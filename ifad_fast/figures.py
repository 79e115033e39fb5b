"""PNG figures: axial, coronal and sagittal slices through a point, each as scan, restoration and
anomaly overlay, drawn in one anatomical orientation with the voxels' physical shape.

Every scan is first turned to RAS voxel order (nibabel's closest canonical orientation: axes
permuted and flipped, never resampled), so an LPS or axis-permuted scan looks like its RAS copy.
Axial and coronal views follow the neurological convention by default (the subject's right on
the image's right; `convention="radiological"` mirrors them), sagittal views have anterior on the
left; every edge is labelled. Each panel's aspect is the ratio of its voxel sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import IfadError

CONVENTIONS = ("neurological", "radiological")
#: Top of the anomaly colour scale when no threshold sets it (the scale is 0 to 2 × threshold otherwise).
DEFAULT_VMAX = 4.0

# (view, fixed RAS axis, horizontal axis, vertical axis, edge labels left, right, bottom, top), neurological
_VIEWS = (("axial", 2, 0, 1, ("L", "R", "P", "A")),
          ("coronal", 1, 0, 2, ("L", "R", "I", "S")),
          ("sagittal", 0, 1, 2, ("A", "P", "I", "S")))


@dataclass
class Panel:
    """One view: its 2D images (row 0 at the top, as drawn), aspect (height / width of a pixel) and
    edge labels (left, right, bottom, top)."""

    view: str
    images: dict
    aspect: float
    edges: tuple


def canonical(volumes: dict, affine, centre=None):
    """The volumes (X, Y, Z) in RAS voxel order, their voxel sizes (mm) in that order and `centre`
    (voxel indices of the given order) mapped into it. Without an affine: as they are, 1 mm voxels."""
    import nibabel as nib

    if affine is None:
        return volumes, np.ones(3), centre
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    shape = next(v.shape for v in volumes.values() if v is not None)
    turned = {k: None if v is None else nib.orientations.apply_orientation(v, ornt) for k, v in volumes.items()}
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(0))
    ras_sizes = np.empty(3)
    ras_centre = None if centre is None else [0] * 3
    for axis, (new, flip) in enumerate(ornt.astype(int)):
        ras_sizes[new] = sizes[axis]
        if centre is not None:
            ras_centre[new] = shape[axis] - 1 - int(centre[axis]) if flip < 0 else int(centre[axis])
    return turned, ras_sizes, ras_centre


def panels(scan: np.ndarray, restoration: np.ndarray, anomaly: np.ndarray, truth: np.ndarray | None = None,
           predicted: np.ndarray | None = None, affine=None, centre=None,
           convention: str = "neurological") -> list[Panel]:
    """The three views through `centre` (the scan's voxel indices; default: the centre of the
    ground truth, else of the anomaly's top 0.1 %) as drawn by `slices_figure`."""
    if convention not in CONVENTIONS:
        raise IfadError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    volumes = dict(scan=scan, restoration=restoration, anomaly=anomaly, truth=truth, predicted=predicted)
    volumes, sizes, centre = canonical(volumes, affine, centre)
    if centre is None:
        truth, anomaly = volumes["truth"], volumes["anomaly"]
        focus = truth if truth is not None and truth.any() else anomaly >= np.percentile(anomaly, 99.9)
        centre = np.round(np.argwhere(focus).mean(0)).astype(int)
    out = []
    for view, fixed, h, v, edges in _VIEWS:
        mirror = view == "sagittal" or convention == "radiological"         # columns run right to left

        def cut(vol):
            image = np.flipud(np.take(vol, int(centre[fixed]), axis=fixed).T)    # rows: high index at the top
            return np.fliplr(image) if mirror else image

        if convention == "radiological" and view != "sagittal":
            edges = (edges[1], edges[0]) + edges[2:]
        images = {k: None if vol is None else cut(vol) for k, vol in volumes.items()}
        out.append(Panel(view, images, float(sizes[v] / sizes[h]), edges))
    return out


def draw(views: list[Panel], title: str = "", threshold: float | None = None, vmax: float | None = None,
         convention: str = "neurological"):
    """A matplotlib Figure of `views` (rows) × scan, restoration, anomaly overlay (columns), with the
    anomaly colour bar from 0 to `vmax` (default 2 × threshold, else DEFAULT_VMAX), the threshold
    marked on it, and a legend for the ground-truth and predicted contours."""
    from .extras import require

    require("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    vmax = vmax or (2 * threshold if threshold else DEFAULT_VMAX)
    fig, axes = plt.subplots(3, 3, figsize=(10.5, 10.5), facecolor="black")
    overlay = None
    style = dict(color="yellow", fontsize=9, fontweight="bold")
    for row, panel in enumerate(views):
        im = panel.images
        for col, label in enumerate(("scan", "restoration", "anomaly")):
            ax = axes[row, col]
            ax.imshow(im["restoration" if col == 1 else "scan"], cmap="gray", aspect=panel.aspect,
                      interpolation="nearest")
            if col == 2:
                shown = np.ma.masked_less(im["anomaly"], 0.05 * vmax)
                overlay = ax.imshow(shown, cmap="magma", alpha=0.75, vmin=0, vmax=vmax, aspect=panel.aspect,
                                    interpolation="nearest")
            for key, colour, dash in (("truth", "cyan", "solid"), ("predicted", "lime", "dashed")):
                if col != 1 and im[key] is not None and im[key].any():
                    ax.contour(im[key].astype(float), levels=[0.5], colors=colour, linewidths=1.0,
                               linestyles=dash)
            left, right, bottom, top = panel.edges
            for x, y, text, ha, va in ((0.02, 0.5, left, "left", "center"), (0.98, 0.5, right, "right", "center"),
                                       (0.5, 0.02, bottom, "center", "bottom"), (0.5, 0.98, top, "center", "top")):
                ax.text(x, y, text, ha=ha, va=va, transform=ax.transAxes, **style)
            ax.set_axis_off()
            ax.set_title(f"{label} ({panel.view})", color="white", fontsize=9)
    side = "right" if convention == "neurological" else "left"
    fig.suptitle((f"{title}\n" if title else "") + f"{convention}: the subject's right on the image's {side}",
                 color="white", fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.88, bottom=0.06, top=0.92, wspace=0.05, hspace=0.12)
    bar = fig.colorbar(overlay, cax=fig.add_axes([0.9, 0.2, 0.02, 0.6]), extend="max")
    bar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    bar.set_label("anomaly score" + (f" (threshold {threshold:.3g}: green line)" if threshold is not None else ""),
                  color="white")
    if threshold is not None:
        bar.ax.axhline(threshold, color="lime", linewidth=2)
    handles = [Line2D([], [], color="cyan", label="ground truth")] if any(p.images["truth"] is not None
                                                                          for p in views) else []
    if any(p.images["predicted"] is not None for p in views):
        handles.append(Line2D([], [], color="lime", linestyle="dashed", label=f"predicted (score ≥ {threshold:.3g})"
                              if threshold is not None else "predicted"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white")
    return fig


def slices_figure(path, scan: np.ndarray, restoration: np.ndarray, anomaly: np.ndarray,
                  truth: np.ndarray | None = None, centre=None, title: str = "", affine=None,
                  threshold: float | None = None, predicted: np.ndarray | None = None, vmax: float | None = None,
                  convention: str = "neurological") -> Path:
    """A 3 × 3 PNG: axial, coronal and sagittal slices through `centre` (see `panels`), each as
    scan, restoration and anomaly over the scan, written atomically.

    scan, restoration, anomaly, truth, predicted: (X, Y, Z) arrays on one grid; affine: its voxel ->
    world matrix (orientation and voxel sizes; without one the arrays are taken as RAS, 1 mm).
    threshold: marked on the colour bar, whose scale is 0 to `vmax` (default 2 × threshold) for
    every case alike; predicted: a mask drawn as a dashed contour (e.g. anomaly >= threshold).
    """
    from .io import atomic_path

    views = panels(scan, restoration, anomaly, truth, predicted, affine, centre, convention)
    fig = draw(views, title, threshold, vmax, convention)
    import matplotlib.pyplot as plt
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", facecolor="black")
    plt.close(fig)
    return path


def accuracy_figure(path, results: dict, scan: np.ndarray, truth: np.ndarray, maps: dict, affine=None,
                    title: str = "", convention: str = "neurological") -> Path:
    """The accuracy protocol's PNG: every method's precision-recall curve on one plot (left), and one
    case's axial slice through its ground truth's centre (as `panels` draws it): the scan, then each
    method's map on its own colour scale, with the ground truth (cyan) and the map at its method's
    threshold (dashed lime).

    results: {method: `metrics.evaluate` result with "pr_curve", "ap" and "threshold"}; scan, truth
    (bool) and maps ({method: map}): (X, Y, Z) arrays on the scan's grid, affine its voxel -> world
    matrix. Written atomically.
    """
    from .extras import require

    require("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    brain = scan != 0
    views = {"scan": panels(scan, scan, scan, truth, None, affine, convention=convention)[0]}
    for method, score in maps.items():
        above = score >= np.float32(results[method]["threshold"]) if method in results else None
        views[method] = panels(scan, scan, score, truth, above, affine, convention=convention)[0]
    cols = -(-len(views) // 2)
    fig = plt.figure(figsize=(4.5 + 2.6 * cols, 5.8))
    grid = fig.add_gridspec(2, cols + 2)
    pr = fig.add_subplot(grid[:, :2])
    for method, r in results.items():
        pr.plot(r["pr_curve"]["recall"], r["pr_curve"]["precision"], label=f"{method} (AP {r['ap']:.3f})")
    pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall")
    pr.legend(fontsize=7, loc="lower left")
    pr.grid(alpha=0.3)
    for k, (label, panel) in enumerate(views.items()):
        ax, im = fig.add_subplot(grid[k // cols, 2 + k % cols]), panel.images
        if label == "scan":
            ax.imshow(im["scan"], cmap="gray", aspect=panel.aspect, interpolation="nearest")
        else:
            top = float(np.percentile(maps[label][brain], 99.5)) if brain.any() else 0.0
            ax.imshow(im["anomaly"], cmap="magma", vmin=0, vmax=top if top > 0 else 1.0, aspect=panel.aspect,
                      interpolation="nearest")
        for key, colour, dash in (("truth", "cyan", "solid"), ("predicted", "lime", "dashed")):
            if im[key] is not None and im[key].any() and not im[key].all():
                ax.contour(im[key].astype(float), levels=[0.5], colors=colour, linewidths=0.8, linestyles=dash)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.suptitle((f"{title}; " if title else "") + f"axial, {convention}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
