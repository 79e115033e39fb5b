"""Fewer search points, measured on the protocol: the fast schedule against variants of its phases.

    python bench/search_points.py N_CASES MODEL|bundled "100x4096,20x16384;100x4096,20x8192;100x4096"

Test lesion cases 0..N-1 (seed 2, 1 mm) re-acquired as every acquisition of the protocol (the held-out ones
included); each scan restored by `Restorer(model, "cpu", "cpu", schedule="fast", phases=...)` per variant
(everything else the fast schedule's: adaptive grid, stopping search). Prints per variant the pooled best
Dice / AP over all scans, the worst acquisition's difference from the first variant, and the mean search
steps and seconds per scan (the cores may be shared: seconds are indicative only).
"""
import json
import sys
import time

import numpy as np
import torch

from ifad_fast.acquisition import ACQUISITIONS, reacquire
from ifad_fast.api import Restorer, default_model, parse_phases
from ifad_fast.metrics import curve_metrics
from ifad_fast.model import load_model
from ifad_fast.synth import generate_lesion

torch.set_num_threads(2)
n_cases, which, variants = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(";")
model = default_model("cpu") if which == "bundled" else load_model(which)
scans = []
for j in range(n_cases):
    cases = {}
    for name, acq in ACQUISITIONS.items():
        key = (acq.anatomy, acq.lesion)
        if key not in cases:
            cases[key] = generate_lesion(j, seed=2, voxel_mm=1.0, anatomy=acq.anatomy, kind=acq.lesion)
        scans.append((name, reacquire(cases[key], name)))
rows = {}
for v in variants:
    phases = parse_phases(v)
    restorer = Restorer(model, "cpu", "cpu", schedule="fast", phases=phases)
    per_acq, points, seconds = {}, [], []
    for name, scan in scans:
        brain = scan.brain_mask > 0
        t0 = time.perf_counter()
        res = restorer.restore_array(scan.image, scan.affine)
        seconds.append(time.perf_counter() - t0)
        points.append(len(res.model_grid.losses))                   # search steps taken
        per_acq.setdefault(name, ([], []))
        per_acq[name][0].append(res.anomaly[brain])
        per_acq[name][1].append(scan.mask[brain] > 0)
    scores = {a: curve_metrics(np.concatenate(s), np.concatenate(m)) for a, (s, m) in per_acq.items()}
    pooled = curve_metrics(np.concatenate([x for s, _ in per_acq.values() for x in s]),
                           np.concatenate([x for _, m in per_acq.values() for x in m]))
    rows[v] = dict(pooled=[round(pooled["dice_best"], 4), round(pooled["ap"], 4)],
                   per_acq={a: [round(c["dice_best"], 4), round(c["ap"], 4)] for a, c in scores.items()},
                   steps_mean=round(float(np.mean(points)), 1), seconds_mean=round(float(np.mean(seconds)), 2))
    first = rows[variants[0]]
    worst = [min(rows[v]["per_acq"][a][k] - first["per_acq"][a][k] for a in scores) for k in (0, 1)]
    print(json.dumps(dict(variant=v, **rows[v], worst_vs_first=[round(w, 4) for w in worst])), flush=True)
