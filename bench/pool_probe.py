"""Which post-processing pools, for which lesion kinds? (issue 19; the held-out lesion kinds ms and stroke)

    python bench/pool_probe.py KINDS CASES SEED POOLS [SCHEDULE]
    python bench/pool_probe.py glioma,ms,stroke 0,1,2,3,4,5 1 3x15,1x15,3x9,1x9,1x5 fast

The bundled model restores each lesion case of synth's lesion stream SEED (1: the validation stream; 1.5 mm,
every brain voxel of the model grid scored exactly: grid full) once per kind; the raw cross-entropy is then
post-processed with each MINxAVG pool pair (min-pool MIN, average-pool AVG, voxels of the 96³ model grid,
2.33 mm: the paper's 3x15 at its 1.5 mm grid is 4.5 and 22.5 mm) and scored over the model grid's brain
voxels, the mask taken to the model grid. Prints one JSON line per kind: pooled best Dice / AP / AUROC per pool.
"""
import json
import sys

import numpy as np
import torch

from ifad_fast.api import Restorer, default_model
from ifad_fast.metrics import curve_metrics
from ifad_fast.restore.scoring import postprocess
from ifad_fast.synth import generate_lesion


def main(kinds, cases, seed, pools, schedule="fast"):
    torch.set_num_threads(2)
    restorer = Restorer(default_model("cpu"), "cpu", "cpu", schedule=schedule, grid="full")
    pools = [tuple(int(v) for v in p.split("x")) for p in pools.split(",")]
    for kind in kinds.split(","):
        maps, truths = {p: [] for p in pools}, []
        for j in [int(s) for s in cases.split(",")]:
            case = generate_lesion(j, seed=int(seed), voxel_mm=1.5, kind=kind)
            result = restorer.restore_array(case.image, case.affine)
            placement = result.placement
            brain = placement.brain
            truths.append((placement.label_to_model(case.mask) > 0)[brain])
            for p in pools:
                maps[p].append(postprocess(result.model_grid.score, *p)[brain])
        out = dict(kind=kind, schedule=schedule, seed=int(seed), cases=cases)
        truth = np.concatenate(truths)
        for p in pools:
            m = curve_metrics(np.concatenate(maps[p]), truth)
            out[f"{p[0]}x{p[1]}"] = [round(m["dice_best"], 3), round(m["ap"], 3), round(m["auroc"], 3)]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
