"""Which local-latent settings? (issue 19; the `local` schedule, ifad_fast/restore/local.py)

    python bench/local_probe.py G SIGMA STEPS EXCLUDE MARGIN [HEALTHY [LESIONS [LESION_SEED]]]
    python bench/local_probe.py 6 0.1 100 0.5 3 64,65 0,1,2,3,4,5 1     # the schedule's settings, validation

The bundled model restores each scan with the fast schedule (cpu); the local stage then runs with these
settings on the same global latent. Both restorations are scored on every brain voxel of the model grid
(no adaptive grid) and printed as one JSON line: for healthy subjects of the training stream (seed 0, mixed
anatomy) within one class / mean CE; for lesion cases (synth's lesion stream LESION_SEED, default 1: the
validation stream, 1.5 mm) best Dice / AP per case and pooled over the brain, the mask taken to the model grid.
"""
import json
import sys

import numpy as np
import torch

from ifad_fast import config as cfg
from ifad_fast.api import Restorer, default_model
from ifad_fast.benchmarks.accuracy import TRAIN_ANATOMY, TRAIN_SEED
from ifad_fast.metrics import curve_metrics, restoration_fit
from ifad_fast.preprocess import prepare
from ifad_fast.restore.local import fit_local_latents, fit_region, score_grid_local
from ifad_fast.restore.scoring import postprocess
from ifad_fast.synth import generate_healthy, generate_lesion


def both(restorer, rc, case):
    """(seen Prepared, [(label, raw score, restored classes)] for the fast and the local restoration)."""
    model, pc = restorer.model, restorer.model.preprocess
    z = torch.from_numpy(restorer.restore_array(case.image, case.affine).model_grid.z)
    seen = prepare(case.image, restorer.encoder, pc, pc.test_mode_pool, case.affine)
    classes, brain = torch.from_numpy(seen.classes), torch.from_numpy(seen.placement.brain)
    decoder = model.decoder.folded()
    one = z.reshape(-1, 1, 1, 1).expand(-1, 2, 2, 2)
    score0, cls0, _ = score_grid_local(decoder, one, classes, brain)
    fit = fit_region(score0, brain, rc, restorer.decision)
    grid = fit_local_latents(decoder, z, classes, fit, rc, torch.Generator().manual_seed(0))
    score1, cls1, _ = score_grid_local(decoder, grid, classes, brain)
    return seen, [("fast", score0, cls0), ("local", score1, cls1)]


def main(g, sigma, steps, exclude, margin, healthy="64,65", lesions="", lesion_seed="1"):
    torch.set_num_threads(2)
    restorer = Restorer(default_model("cpu"), "cpu", "cpu", schedule="fast")
    rc = cfg.replace(restorer.rc, local_grid=int(g), local_sigma=float(sigma), local_steps=int(steps),
                     local_exclude=float(exclude), local_margin=int(margin))
    out = dict(grid=rc.local_grid, sigma=rc.local_sigma, steps=rc.local_steps, exclude=rc.local_exclude,
               margin=rc.local_margin)
    for i in [int(s) for s in healthy.split(",") if s]:
        seen, rows = both(restorer, rc, generate_healthy(i, seed=TRAIN_SEED, voxel_mm=1.5, anatomy=TRAIN_ANATOMY))
        out[f"healthy_{i}"] = {label: [round(f["within_one"], 3), round(f["mean_ce"], 3)] for label, score, cls in rows
                               for f in [restoration_fit(cls.numpy(), seen.classes, seen.placement.brain, score.numpy())]}
    pooled = {"fast": [], "local": []}
    truths = []
    for i in [int(s) for s in lesions.split(",") if s]:
        case = generate_lesion(i, seed=int(lesion_seed), voxel_mm=1.5)
        seen, rows = both(restorer, rc, case)
        brain = seen.placement.brain
        truth = (seen.placement.to_model(case.mask.astype(np.float32), "linear") > 0.5)[brain]
        truths.append(truth)
        for label, score, _ in rows:
            anomaly = postprocess(score.numpy(), rc.min_pool, rc.avg_pool)[brain]
            pooled[label].append(anomaly)
            m = curve_metrics(anomaly, truth)
            out.setdefault(f"cases_{label}", []).append([round(m["dice_best"], 3), round(m["ap"], 3)])
    if truths:
        for label, maps in pooled.items():
            m = curve_metrics(np.concatenate(maps), np.concatenate(truths))
            out[f"pooled_{label}"] = [round(m["dice_best"], 3), round(m["ap"], 3), round(m["fpr95"], 3)]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
