"""Anomaly-detection metrics: the paper's (Table 1, after Baur et al.) and those of recent benchmarks.

* ``[DICE]`` (``dice_best``): the best Dice over all thresholds, with the voxels of all
  test cases pooled together.
* ``DICE (mu +- sigma)`` (``dice_mean``, ``dice_std``): the per-case Dice at one threshold,
  the one that maximises the pooled Dice on the validation set (or on the test set itself
  when no validation set is given; ``threshold_source`` says which).
* ``AP``: average precision, the same number as scikit-learn's ``average_precision_score``
  (sum over thresholds of ``(R_n - R_{n-1}) * P_n``, ties grouped as scikit-learn does).
* ``AUROC``: the same number as scikit-learn's ``roc_auc_score`` (ties count one half,
  i.e. the trapezoid rule).
* ``FPR@95R`` (``fpr95``): the false positive rate at the highest threshold whose recall is
  at least 0.95, i.e. the threshold equal to the ``ceil(0.95 * P)``-th highest score of a
  positive voxel (``P`` positives).  No interpolation between operating points.

Beyond the paper (:func:`evaluate`):

* ``ap_per_volume``: the mean over lesion cases of each case's own AP (beside the pooled ``ap``,
  which large lesions dominate).
* Lesion-wise detection at the validation threshold (:func:`lesion_detection`): the connected
  components of the ground truth and of the prediction (``scipy.ndimage.label``, full
  connectivity: 26 neighbours in 3D); a ground-truth lesion is *found* when a predicted voxel
  lies in it, a predicted component that touches no ground-truth voxel is a *false positive*.
  ``lesion_precision = found / (found + false positives)``, ``lesion_recall = found / lesions``,
  ``lesion_f1 = 2 found / (2 found + false positives + missed)``, summed over the lesion cases;
  ``lesion_by_size`` splits them by component size: ground-truth lesions by their own size, false
  positives by theirs, in bins ``< 1 mL``, ``1-10 mL``, ``>= 10 mL`` (``LESION_BINS_ML``) when the
  voxel volumes are known, else ``< 1000``, ``1000-10000``, ``>= 10000`` voxels (the same bins for
  1 mm³ voxels).  A ratio whose denominator is 0 is ``None``.
* Healthy cases (a mask with no lesion voxel, within the region): left out of every lesion
  metric above and of the pooled curves, and counted instead as ``fp_voxels_per_healthy`` (mean
  number of voxels at or above the threshold per healthy case) and ``fp_lesions_per_healthy``
  (mean number of predicted components); ``None`` when no healthy case is given.

Conventions
-----------
* A voxel is predicted anomalous when ``score >= threshold``.
* A mask voxel is anomalous when it is non-zero (so BraTS labels 1, 2, 4 all count).
* A test case whose mask has no anomalous voxel is a healthy case (see above); the validation
  cases are pooled whole, healthy ones included (their voxels count as normal ones).
* :func:`dice` of two empty masks is 1.0 (perfect agreement on "no anomaly").
* ``dice_std`` is the population standard deviation (``ddof=0``).
* :func:`evaluate` pools the scores as float32 (the threshold is a float32 value and the
  per-case Dice compares the float32-cast scores with it); :func:`curve_metrics` keeps the
  floating dtype it is given.

Exactness and memory
--------------------
All curve metrics are exact and come from one sort.  The pooled voxels are split into the
scores of the positive voxels and of the negative voxels, each sorted in place (no int64
index array, no boolean label array).  Recall, and hence AP, FPR@95R and the best Dice,
only change at the distinct scores of positive voxels: for a fixed number of true
positives the false positives are fewest at the highest threshold that keeps them, which
is a positive voxel's score.  So for each distinct positive score ``v`` the counts
``TP(v) = #pos >= v`` (a cumulative sum) and ``FP(v) = #neg >= v`` (a binary search in the
sorted negatives) give everything; AUROC is the Mann-Whitney sum
``sum_v c_v * (#neg < v + #neg == v / 2) / (P * N)`` in exact integers.
:func:`evaluate` fills the two float32 arrays directly from the cases, so pooling
50 cases of 160^3 voxels (205 M voxels) needs about 0.8 GB plus one case's temporaries
and the work arrays of one block of 2 M positives (~0.2 GB): measured ~0.8-0.9 GB above
the inputs, ~10 s on 2 cores, whether 1 % or 50 % of the voxels are anomalous.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import IfadError

__all__ = ["LESION_BINS_ML", "curve_metrics", "dice", "evaluate", "format_table", "lesion_detection",
           "restoration_fit"]

#: Lesion size bins in mL: < 1, 1-10, >= 10 (in voxels, × 1000, when voxel volumes are unknown).
LESION_BINS_ML = (1.0, 10.0)
#: About this many points of the pooled precision-recall curve go into `evaluate`'s result.
PR_POINTS = 200


# ----------------------------------------------------------------------------- core


# Distinct positive scores are processed in blocks of about this many positive voxels,
# so the int64/float64 work arrays stay bounded (~100 B per voxel of a block) even when
# most voxels are anomalous.
_BLOCK = 1 << 21


def _curve_from_sorted(pos: np.ndarray, neg: np.ndarray, block: int = _BLOCK, pr_points: int = 0) -> dict:
    """Metrics from the ascending-sorted scores of the positive and negative voxels; with
    `pr_points`, also about that many points of the precision-recall curve (``pr_curve``)."""
    n_pos = int(pos.size)
    n_neg = int(neg.size)
    if n_pos == 0:
        raise IfadError(
            "the masks have no anomalous (non-zero) voxel at all; AP, AUROC and Dice are "
            "undefined: evaluate on cases that contain lesions"
        )
    if n_neg == 0:
        raise IfadError(
            "every evaluated voxel is anomalous; AUROC and FPR are undefined: evaluate on "
            "cases (or regions) that also contain normal voxels"
        )
    k95 = (95 * n_pos + 99) // 100        # ceil(0.95 * P) positives, exact in integers
    tp_before = 0                         # positives above the current block
    ap_sum = 0.0
    twice_u = 0                           # 2 * Mann-Whitney U, exact
    best_dice, best_t = -1.0, None
    fpr95 = fpr95_t = None
    stride = max(1, n_pos // pr_points) if pr_points else 0
    recall, precision = [], []
    hi = n_pos
    while hi > 0:                         # blocks from the highest scores down
        lo = max(hi - block, 0)
        if lo > 0:                        # start the block at the start of a tie run
            lo = int(np.searchsorted(pos[:hi], pos[lo], side="left"))
        blk = pos[lo:hi]
        starts = np.flatnonzero(blk[1:] != blk[:-1]) + 1
        starts = np.concatenate((np.zeros(1, dtype=starts.dtype), starts))
        counts = np.diff(np.append(starts, blk.size))[::-1].astype(np.int64)
        values = blk[starts][::-1]        # distinct positive scores, descending
        del starts
        tp = tp_before + np.cumsum(counts)                               # #pos >= v
        n_neg_below = np.searchsorted(neg, values, side="left").astype(np.int64)
        fp = n_neg - n_neg_below                                         # #neg >= v

        tp_f = tp.astype(np.float64)
        pred_f = tp_f + fp
        ap_sum += float(np.dot(counts.astype(np.float64), tp_f / pred_f))
        if stride:
            at = np.unique(np.append(np.arange(0, tp.size, stride), tp.size - 1))
            recall += (tp_f[at] / n_pos).tolist()
            precision += (tp_f[at] / pred_f[at]).tolist()

        dice_curve = 2.0 * tp_f / (pred_f + n_pos)
        i = int(np.argmax(dice_curve))    # first maximum = highest threshold
        if dice_curve[i] > best_dice:
            best_dice, best_t = float(dice_curve[i]), float(values[i])
        del tp_f, pred_f, dice_curve

        n_neg_equal = np.searchsorted(neg, values, side="right").astype(np.int64) - n_neg_below
        twice_u += 2 * int(np.dot(counts, n_neg_below)) + int(np.dot(counts, n_neg_equal))
        del n_neg_equal, n_neg_below

        if fpr95 is None and tp[-1] >= k95:
            j = int(np.searchsorted(tp, k95, side="left"))   # highest v with recall >= 0.95
            fpr95, fpr95_t = float(fp[j]) / n_neg, float(values[j])
        tp_before = int(tp[-1])
        hi = lo
    return {
        "dice_best": best_dice,
        "threshold": best_t,
        "ap": ap_sum / n_pos,
        "auroc": twice_u / (2.0 * n_pos * n_neg),
        "fpr95": fpr95,
        "fpr95_threshold": fpr95_t,
        "n_voxels": n_pos + n_neg,
        "n_positive": n_pos,
        **({"pr_curve": {"recall": recall, "precision": precision}} if stride else {}),
    }


def _float_dtype(a: np.ndarray):
    return a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)


def _check_no_nan(scores: np.ndarray, what: str) -> None:
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise IfadError(f"{what} contain NaN; fix the scoring (or replace NaNs) before evaluating")


def curve_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Pooled curve metrics of flat (or same-shaped) ``scores`` and ``labels``.

    ``labels`` is boolean or numeric (non-zero = anomalous).  Returns a dict with
    ``dice_best``, ``threshold`` (where the best Dice is reached; the highest one if
    several), ``ap``, ``auroc``, ``fpr95``, ``fpr95_threshold``, ``n_voxels``,
    ``n_positive``.  Raises IfadError on empty input, shape mismatch, NaN scores, or
    labels with no positive (or no negative) voxel.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.size == 0:
        raise IfadError("no scores to evaluate (empty array); pass at least one voxel")
    if scores.shape != labels.shape:
        raise IfadError(
            f"scores have shape {scores.shape} but labels have shape {labels.shape}; "
            "pass one label per score"
        )
    _check_no_nan(scores, "scores")
    truth = labels if labels.dtype == np.bool_ else labels != 0
    truth = truth.ravel()
    flat = scores.ravel()
    dtype = _float_dtype(scores)
    pos = flat[truth].astype(dtype, copy=False)
    neg = flat[~truth].astype(dtype, copy=False)   # fancy indexing copies: sorting is safe
    del truth
    pos.sort()
    neg.sort()
    return _curve_from_sorted(pos, neg)


# ----------------------------------------------------------------------------- Dice


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice ``2|A & B| / (|A| + |B|)`` of two masks (non-zero = in the set).

    Both empty gives 1.0 (perfect agreement on "no anomaly").
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise IfadError(
            f"prediction has shape {pred.shape} but the mask has shape {truth.shape}; "
            "pass arrays of the same shape"
        )
    p = pred if pred.dtype == np.bool_ else pred != 0
    t = truth if truth.dtype == np.bool_ else truth != 0
    n_p = int(np.count_nonzero(p))
    n_t = int(np.count_nonzero(t))
    if n_p + n_t == 0:
        return 1.0
    inter = int(np.count_nonzero(np.logical_and(p, t)))
    return 2.0 * inter / (n_p + n_t)


def restoration_fit(restored: np.ndarray, observed: np.ndarray, brain: np.ndarray, score: np.ndarray) -> dict:
    """How well a restoration fits its (healthy) subject, on the brain voxels of the model grid.

    restored, observed: class ids (R, R, R) (the decoded restoration; the scan's own classes as the
    search saw them, mode-pooled); brain: bool (R, R, R); score: the raw per-voxel cross-entropy
    (R, R, R). Returns within_one (share of brain voxels whose restored class is within one class of
    the scan's), exact (share equal) and mean_ce (mean cross-entropy in nats; on healthy tissue
    every nat of it is a false alarm's raw material).
    """
    brain = np.asarray(brain, dtype=bool)
    if not brain.any():
        raise IfadError("restoration fit: the brain mask is empty")
    diff = np.abs(np.asarray(restored, np.int16)[brain] - np.asarray(observed, np.int16)[brain])
    return dict(within_one=float(np.mean(diff <= 1)), exact=float(np.mean(diff == 0)),
                mean_ce=float(np.mean(np.asarray(score, np.float64)[brain])))


# ----------------------------------------------------------------------------- pooling


def _flat_case(score, mask, region, label: str):
    """Validated flat float32 scores and bool truth of one case (restricted to region)."""
    s, t, r = _case(score, mask, region, label)
    return (s[r], t[r]) if r is not None else (s.ravel(), t.ravel())


def _case(score, mask, region, label: str):
    """Validated float32 scores, bool truth and bool region (or None) of one case, in its shape."""
    s = np.asarray(score)
    m = np.asarray(mask)
    if s.size == 0:
        raise IfadError(f"{label}: the score volume is empty; pass a non-empty volume")
    if s.shape != m.shape:
        raise IfadError(
            f"{label}: scores have shape {s.shape} but the mask has shape {m.shape}; "
            "pass the mask that belongs to this case (same grid)"
        )
    _check_no_nan(s, f"{label}: scores")
    t = m if m.dtype == np.bool_ else m != 0
    s = s.astype(np.float32, copy=False)
    if region is not None:
        r = np.asarray(region)
        if r.shape != s.shape:
            raise IfadError(
                f"{label}: region has shape {r.shape} but the scores have shape {s.shape}; "
                "pass a region mask on the same grid"
            )
        return s, t, r if r.dtype == np.bool_ else r != 0
    return s, t, None


def _check_lists(scores, masks, regions, what: str):
    if scores is None or len(scores) == 0:
        raise IfadError(f"no {what} cases to evaluate; pass at least one score volume and mask")
    if masks is None or len(masks) != len(scores):
        n_m = 0 if masks is None else len(masks)
        raise IfadError(
            f"{len(scores)} {what} score volumes but {n_m} masks; pass one mask per case"
        )
    if regions is not None and len(regions) != len(scores):
        raise IfadError(
            f"{len(scores)} {what} score volumes but {len(regions)} regions; "
            "pass one region per case (or none)"
        )


def _pooled_curve(scores, masks, regions, what: str, lesion_cases_only: bool = False, pr_points: int = 0) -> dict:
    """Curve metrics of all cases (or only those with an anomalous voxel) pooled, filling two
    preallocated float32 arrays."""
    _check_lists(scores, masks, regions, what)
    label = lambda i: f"{what} case {i}"  # noqa: E731
    n_pos = n_neg = 0
    cases = []
    for i in range(len(scores)):
        s, t = _flat_case(scores[i], masks[i], None if regions is None else regions[i], label(i))
        p = int(np.count_nonzero(t))
        if p or not lesion_cases_only:
            cases.append(i)
            n_pos += p
            n_neg += t.size - p
        del s, t
    pos = np.empty(n_pos, dtype=np.float32)
    neg = np.empty(n_neg, dtype=np.float32)
    ip = ineg = 0
    for i in cases:
        s, t = _flat_case(scores[i], masks[i], None if regions is None else regions[i], label(i))
        p = int(np.count_nonzero(t))
        np.compress(t, s, out=pos[ip:ip + p])
        nt = ~t      # a new array: t may be a view of the caller's mask
        np.compress(nt, s, out=neg[ineg:ineg + (s.size - p)])
        ip += p
        ineg += s.size - p
        del s, t, nt
    pos.sort()
    neg.sort()
    out = _curve_from_sorted(pos, neg, pr_points=pr_points)
    del pos, neg
    return out


def lesion_detection(pred: np.ndarray, truth: np.ndarray, voxel_volume: float | None = None) -> dict:
    """Lesion-wise detection in one case: the connected components (full connectivity, 26
    neighbours in 3D) of the ground truth ``truth`` and of the prediction ``pred`` (same shape,
    non-zero = in the set). Returns the sizes of the ``found`` and ``missed`` ground-truth lesions
    and of the ``false`` predicted components (touching no ground-truth voxel), in mL when
    ``voxel_volume`` (mm³) is given, else in voxels."""
    from scipy.ndimage import label

    pred, truth = np.asarray(pred) != 0, np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise IfadError(f"prediction has shape {pred.shape} but the mask has shape {truth.shape}; "
                        "pass arrays of the same shape")
    structure = np.ones((3,) * truth.ndim, bool)
    unit = 1.0 if voxel_volume is None else float(voxel_volume) / 1000.0
    both = pred & truth
    out = {}
    for what, mask, kept in (("truth", truth, "found"), ("pred", pred, "overlapping")):
        labels, n = label(mask, structure)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * unit
        hit = np.zeros(n + 1, bool)
        hit[labels[both]] = True
        out[what] = (sizes[hit[1:]], sizes[~hit[1:]])
        del labels
    return {"found": out["truth"][0].tolist(), "missed": out["truth"][1].tolist(), "false": out["pred"][1].tolist()}


def _detection(found, missed, false) -> dict:
    """Counts, precision, recall and F1 of lesion-wise detection (None where undefined)."""
    tp, fn, fp = len(found), len(missed), len(false)
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {"lesions": tp + fn, "found": tp, "missed": fn, "false_positive": fp,
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}


def _by_size(found, missed, false, in_ml: bool) -> dict:
    """`_detection` per size bin (`LESION_BINS_ML`; × 1000 voxels when not `in_ml`)."""
    lo, hi = LESION_BINS_ML if in_ml else (1000 * LESION_BINS_ML[0], 1000 * LESION_BINS_ML[1])
    unit = " mL" if in_ml else " voxels"
    bins = {f"< {lo:g}{unit}": (0, lo), f"{lo:g}-{hi:g}{unit}": (lo, hi), f">= {hi:g}{unit}": (hi, math.inf)}
    pick = lambda sizes, a, b: [x for x in sizes if a <= x < b]  # noqa: E731
    return {name: _detection(pick(found, a, b), pick(missed, a, b), pick(false, a, b)) for name, (a, b) in bins.items()}


def _case_ap(s: np.ndarray, t: np.ndarray) -> float:
    """AP of one case's flat scores against its truth (at least one anomalous voxel; 1.0 when
    every voxel is anomalous)."""
    pos, neg = s[t], s[~t]
    if neg.size == 0:
        return 1.0
    pos.sort()
    neg.sort()
    return _curve_from_sorted(pos, neg)["ap"]


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _at_threshold(scores, masks, regions, names, voxel_volumes, threshold: float):
    """Every test case binarised at `threshold`: (per_case and per_healthy rows as `evaluate` returns
    them, and the found, missed and false lesions of the lesion cases pooled)."""
    thr32 = np.float32(threshold)
    per_case, per_healthy = [], []
    found, missed, false = [], [], []
    for i in range(len(scores)):
        s, t, r = _case(scores[i], masks[i], None if regions is None else regions[i], f"test case {i}")
        name = str(names[i]) if names is not None else f"case_{i:03d}"
        pred = s >= thr32
        if r is not None:
            pred &= r
            t = t & r
        lesions = lesion_detection(pred, t, None if voxel_volumes is None else voxel_volumes[i])
        if not t.any():
            per_healthy.append({"name": name, "fp_voxels": int(np.count_nonzero(pred)),
                                "fp_lesions": len(lesions["false"])})
            continue
        found += lesions["found"]
        missed += lesions["missed"]
        false += lesions["false"]
        fs, ft = (s[r], t[r]) if r is not None else (s.ravel(), t.ravel())
        per_case.append({"name": name, "dice": dice(fs >= thr32, ft), "ap": _case_ap(fs, ft),
                         "lesions": len(lesions["found"]) + len(lesions["missed"]),
                         "found": len(lesions["found"]), "false_positive": len(lesions["false"])})
        del s, t, r, pred, fs, ft
    return per_case, per_healthy, found, missed, false


def evaluate(
    scores: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    val_scores: Sequence[np.ndarray] | None = None,
    val_masks: Sequence[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
    regions: Sequence[np.ndarray] | None = None,
    val_regions: Sequence[np.ndarray] | None = None,
    voxel_volumes: Sequence[float] | None = None,
) -> dict:
    """The paper's metrics and those beyond it (module docstring) over test cases (``scores[i]``
    and ``masks[i]`` on one grid; a case whose mask has no anomalous voxel is a healthy case).

    ``dice_best``, ``ap``, ``auroc``, ``fpr95`` pool every voxel of the lesion cases.  The
    per-case Dice, the lesion-wise detection and the healthy cases' false positives use the
    threshold that maximises the pooled Dice on the validation cases when they are given
    (``threshold_source = "validation"``), else on the test cases themselves (``"test (no
    validation set given)"``).  ``regions`` / ``val_regions`` optionally restrict each case to
    its non-zero region voxels (e.g. the brain); by default every voxel counts, as in the paper.
    ``voxel_volumes``: each test case's voxel volume in mm³, for lesion sizes in mL (else voxels).

    Returns a dict with ``dice_best``, ``dice_best_threshold``, ``dice_mean``, ``dice_std``,
    ``ap``, ``ap_per_volume``, ``auroc``, ``fpr95``, ``fpr95_threshold``, ``threshold``,
    ``threshold_source``, ``lesion_precision``, ``lesion_recall``, ``lesion_f1``,
    ``lesion_counts``, ``lesion_by_size``, ``lesion_size_unit``, ``fp_voxels_per_healthy``,
    ``fp_lesions_per_healthy``, ``n_cases`` (lesion cases), ``n_healthy``, ``n_voxels``,
    ``n_positive``, ``pr_curve`` (``{"recall", "precision"}``: about PR_POINTS points of the pooled
    curve, recall ascending), ``per_case`` (lesion cases: ``{"name", "dice", "ap", "lesions", "found",
    "false_positive"}``) and ``per_healthy`` (``{"name", "fp_voxels", "fp_lesions"}``).
    """
    _check_lists(scores, masks, regions, "test")
    for what, given in (("name", names), ("voxel volume", voxel_volumes)):
        if given is not None and len(given) != len(scores):
            raise IfadError(f"{len(scores)} test cases but {len(given)} {what}s; pass one {what} per case")
    if (val_scores is None) != (val_masks is None):
        raise IfadError(
            "validation scores and validation masks come together; pass both or neither"
        )
    test = _pooled_curve(scores, masks, regions, "test", lesion_cases_only=True, pr_points=PR_POINTS)
    if val_scores is not None:
        val = _pooled_curve(val_scores, val_masks, val_regions, "validation")
        threshold = val["threshold"]
        source = "validation"
    else:
        threshold = test["threshold"]
        source = "test (no validation set given)"

    per_case, per_healthy, found, missed, false = _at_threshold(scores, masks, regions, names, voxel_volumes,
                                                                threshold)
    d = np.array([c["dice"] for c in per_case], dtype=np.float64)
    detected = _detection(found, missed, false)
    return {
        "dice_best": test["dice_best"],
        "dice_best_threshold": test["threshold"],
        "dice_mean": float(d.mean()),
        "dice_std": float(d.std(ddof=0)),
        "ap": test["ap"],
        "ap_per_volume": _mean([c["ap"] for c in per_case]),
        "auroc": test["auroc"],
        "fpr95": test["fpr95"],
        "fpr95_threshold": test["fpr95_threshold"],
        "threshold": float(threshold),
        "threshold_source": source,
        "lesion_precision": detected["precision"],
        "lesion_recall": detected["recall"],
        "lesion_f1": detected["f1"],
        "lesion_counts": {k: detected[k] for k in ("lesions", "found", "missed", "false_positive")},
        "lesion_by_size": _by_size(found, missed, false, voxel_volumes is not None),
        "lesion_size_unit": "mL" if voxel_volumes is not None else "voxels",
        "fp_voxels_per_healthy": _mean([c["fp_voxels"] for c in per_healthy]),
        "fp_lesions_per_healthy": _mean([c["fp_lesions"] for c in per_healthy]),
        "n_cases": len(per_case),
        "n_healthy": len(per_healthy),
        "n_voxels": test["n_voxels"],
        "n_positive": test["n_positive"],
        "pr_curve": test["pr_curve"],
        "per_case": per_case,
        "per_healthy": per_healthy,
    }


# ----------------------------------------------------------------------------- table


def _fmt(x, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _text_table(header: list, row: list) -> list[str]:
    widths = [max(len(h), len(r)) for h, r in zip(header, row)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    return [line(header), "-" * len(line(header)), line(row)]


def format_table(results: dict, method: str = "IF 3D (ifad-fast)") -> str:
    """A plain-text table with the columns of the paper's Table 1.

    Method, [DICE], DICE (mu +- sigma), AP, AUROC, FPR@95R, and IT (s) when ``results``
    has ``seconds_per_case``; then, when ``results`` has them (`evaluate`'s), a second table of
    the metrics beyond the paper: AP per volume, lesion-wise precision, recall and F1, false
    positive voxels per healthy case.
    """
    header = ["Method", "[DICE]", "DICE (μ ± σ)", "AP", "AUROC", "FPR@95R"]
    mean = results.get("dice_mean")
    std = results.get("dice_std")
    dice_ms = "-" if mean is None else f"{mean:.3f} ± {_fmt(std, 3)}"
    row = [
        method,
        _fmt(results.get("dice_best"), 3),
        dice_ms,
        _fmt(results.get("ap"), 3),
        _fmt(results.get("auroc"), 3),
        _fmt(results.get("fpr95"), 4),
    ]
    if results.get("seconds_per_case") is not None:
        header.append("IT (s)")
        row.append(_fmt(float(results["seconds_per_case"]), 1))
    lines = _text_table(header, row)
    if "ap_per_volume" in results:
        header = ["Method", "AP per volume", "lesion precision", "lesion recall", "lesion F1",
                  f"FP voxels / healthy ({results.get('n_healthy', 0)})"]
        row = [method, *(_fmt(results.get(k), 3) for k in ("ap_per_volume", "lesion_precision", "lesion_recall",
                                                            "lesion_f1")), _fmt(results.get("fp_voxels_per_healthy"), 1)]
        lines += ["", *_text_table(header, row)]
    return "\n".join(lines)
