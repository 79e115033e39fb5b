"""Where the restoration's fit to its subject is lost: the search or the model? (issue 19, the 80 % target)

    python bench/fit_probe.py [ANATOMY [SUBJECTS [VARIANTS [MODEL]]]]
    python bench/fit_probe.py mni 64,66,68                  # unseen healthy subjects, every variant
    python bench/fit_probe.py mni 0,2,4 fast                # subjects the bundled model was trained on
    python bench/fit_probe.py folded 65,67 fast             # the folded anatomy (unseen subjects)
    python bench/fit_probe.py aged 64,65,66 fast,local      # the held-out anatomy, one latent vs local latents
    python bench/fit_probe.py mni 0,1,2 fast runs/x/model.pt  # another model (default: the bundled one)

Healthy subjects (seed 0, 1.5 mm) restored by the bundled model on the CPU under each search variant: the
default `fast` schedule (the paper's prior at the model's restoring sigma), `local` (fast, then local latents),
the same without a prior, and a 4x longer search with and without the prior. One JSON line per variant with, per subject,
`metrics.restoration_fit` on the model grid's brain voxels (within one class, exact class, mean CE).
"""
import json
import sys
import time

import torch

from ifad_fast.api import Restorer, default_model
from ifad_fast.model import load_model
from ifad_fast.metrics import restoration_fit
from ifad_fast.preprocess import prepare
from ifad_fast.synth import generate_healthy

LONG = dict(schedule="400x4096,40x16384", init="mean", lr=1e-2, lr_decay=0.3, brain_fraction=0.8)
VARIANTS = {"fast": dict(schedule="fast"), "local": dict(schedule="local"), "fast-noprior": dict(schedule="fast", prior="none"),
            "long": dict(LONG), "long-noprior": dict(LONG, prior="none")}


def main(anatomy="mni", subjects="48,49,50", only=None, model_path=None):
    torch.set_num_threads(2)
    model = load_model(model_path) if model_path else default_model()
    healthy = [generate_healthy(int(i), seed=0, anatomy=anatomy) for i in subjects.split(",")]
    pc = model.preprocess
    for name, options in VARIANTS.items():
        if only and name not in only.split(","):
            continue
        restorer = Restorer(model, "cpu", "cpu", **options)
        seen = [prepare(h.image, restorer.encoder, pc, pc.test_mode_pool, h.affine) for h in healthy]
        fits, t0 = [], time.time()
        for case, scan in zip(healthy, seen):
            grid = restorer.restore_array(case.image, case.affine).model_grid
            fit = restoration_fit(grid.classes, scan.classes, scan.brain, grid.score)
            fits.append({k: round(float(v), 3) for k, v in fit.items()})
        print(json.dumps(dict(model=model_path or "bundled", variant=name, anatomy=anatomy, subjects=subjects, prior=restorer.rc.prior,
                              sigma=round(restorer.rc.sigma, 3), phases=restorer.rc.phases,
                              seconds=round(time.time() - t0), fits=fits)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
