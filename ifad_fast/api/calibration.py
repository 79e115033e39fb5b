"""Decision thresholds chosen on validation cases and stored in the model, one per schedule (`calibrate`).

A threshold belongs to the maps of one schedule: the local schedule's maps sit higher than the fast
one's on the same scan (the bundled model: 3.53 against 3.19 at the best validation Dice), so a model
stores `info["thresholds"] = {schedule: threshold}` and `info["threshold"]` (the fast one, what older
readers take), and `restore --threshold` alone takes the one of the schedule that runs
(`model.stored_threshold`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .. import config as cfg
from ..errors import IfadError
from ..metrics import curve_metrics
from ..model import Model, stored_threshold
from ..progress import progress_bar
from .restorer import Restorer


def calibrate(model: Model, cases: Callable[[], Iterable], schedules=("fast", "local"), backend="auto",
              device="cpu", described: str = "validation cases", n_cases: int | None = None,
              progress: bool = True, report=print) -> dict:
    """Choose each schedule's threshold on `cases` and store them in `model.info` (in place).

    cases: a callable giving a fresh iterable of cases, each with `image` (X, Y, Z), `affine` (4, 4) and
    `mask` (X, Y, Z, non-zero = lesion), read once per schedule. The threshold is where the pooled Dice
    over the cases' brain voxels (image != 0) is best (`metrics.curve_metrics`). The schedules run in
    order, and the local one judges its fit region by the fast map's threshold: with none stored, 'fast'
    must come before 'local'. described: the cases in words, stored as info["threshold_set"]; n_cases:
    how many there are, for the progress bar.
    Returns {schedule: {"threshold", "dice_best", "ap", "n_cases"}}.
    """
    schedules = tuple(schedules)
    unknown = [s for s in schedules if s not in cfg.SCHEDULES]
    if not schedules or unknown or len(set(schedules)) != len(schedules):
        raise IfadError(f"schedules to calibrate: distinct names of {', '.join(cfg.SCHEDULES)}, got "
                        f"{','.join(schedules) or 'none'}")
    if ("local" in schedules and stored_threshold(model, "fast") is None
            and ("fast" not in schedules or schedules.index("fast") > schedules.index("local"))):
        raise IfadError("the local schedule leaves out of its fit what the fast map marks, and this model stores "
                        "no fast threshold: calibrate fast first (--schedule fast,local)")
    found = {}
    for schedule in schedules:
        restorer = Restorer(model, backend, device, schedule=schedule)
        scores, truth = [], []
        for case in progress_bar(cases(), total=n_cases, desc=f"calibrate {schedule}", unit="case",
                                 disable=None if progress else True):
            brain = np.asarray(case.image) != 0
            scores.append(restorer.restore_array(case.image, case.affine).anomaly[brain])
            truth.append(np.asarray(case.mask)[brain] != 0)
        if not scores:
            raise IfadError("no validation cases to calibrate on; pass scans with their lesion masks")
        curve = curve_metrics(np.concatenate(scores), np.concatenate(truth))
        found[schedule] = dict(threshold=float(curve["threshold"]), dice_best=float(curve["dice_best"]),
                               ap=float(curve["ap"]), n_cases=len(scores))
        thresholds = {**(model.info or {}).get("thresholds", {}), schedule: found[schedule]["threshold"]}
        first = "fast" if "fast" in thresholds else schedules[0]     # the one threshold older readers take
        model.info = dict(model.info or {}, thresholds=thresholds, threshold=thresholds[first],
                          threshold_schedule=first, threshold_set=described,
                          threshold_pools=[restorer.rc.min_pool, restorer.rc.avg_pool])
        report(f"{schedule}: threshold {curve['threshold']:.4g} (validation [DICE] {curve['dice_best']:.3f}, "
               f"AP {curve['ap']:.3f}, {len(scores)} cases)")
    return found
