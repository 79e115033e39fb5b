"""Is the fit limited by the decoder's size? (issue 19, the 80 % target)

    python bench/capacity_probe.py SUBJECTS EPOCHS VARIANTS  # e.g. 8 200 small,wide,wide512,latent128,deep

Trains the `small` preset's recipe (DeepSDF-style prior as bench/bundle_model.sh) on healthy subjects 0..SUBJECTS-1
of the accuracy protocol's mixed training stream, once per decoder variant, then restores (fast schedule, cpu)
subjects it was trained on (0, 1) and unseen ones (SUBJECTS, SUBJECTS+1) and prints one JSON line per variant:
within one class / mean CE per subject, final loss, training seconds.
"""
import dataclasses
import json
import sys
import time

import numpy as np
import torch

from ifad_fast import config as cfg
from ifad_fast.api import Restorer
from ifad_fast.benchmarks.accuracy import TRAIN_SEED, healthy_volumes, restoration_fit
from ifad_fast.preprocess import IntensityEncoder, mode_pool3d
from ifad_fast.train import Trainer

VARIANTS = {"small": {}, "wide": dict(hidden=384), "wide512": dict(hidden=512), "latent128": dict(latent_dim=128),
            "deep": dict(n_layers=8, latent_in=4)}


def main(n=8, epochs=200, variants="small,wide"):
    torch.set_num_threads(2)
    n, epochs = int(n), int(epochs)
    p = cfg.get_preset("small")
    volumes, brains, pc = healthy_volumes(n, p.preprocess, progress=False)
    tc = cfg.replace(p.train, epochs=epochs, seed=TRAIN_SEED, prior="reference", norm_ramp_epochs=20, max_norm=10.0)
    encoder = IntensityEncoder.fit(volumes, k=p.model.n_classes, seed=tc.seed, brains=brains)
    classes = np.stack([mode_pool3d(encoder.encode(v), pc.train_mode_pool, encoder.n_classes) for v in volumes])
    for name in variants.split(","):
        mc = dataclasses.replace(p.model, **VARIANTS[name])
        t0 = time.perf_counter()
        trainer = Trainer(torch.from_numpy(classes), mc, tc, pc, encoder.centres, "cpu",
                          [f"healthy_{i:04d}" for i in range(n)], brains=torch.from_numpy(np.stack(brains)))
        model = trainer.run(epochs, progress=False)
        seconds = time.perf_counter() - t0
        restorer = Restorer(model, "cpu", "cpu", schedule="fast")
        fits = {label: restoration_fit(restorer, subjects)["subjects"]
                for label, subjects in (("trained", (0, 1)), ("unseen", (n, n + 1)))}
        print(json.dumps({"variant": name, "model": dataclasses.asdict(mc), "subjects": n, "epochs": epochs,
                          "final_loss": round(float(model.info["final_loss"]), 4), "seconds": round(seconds),
                          "fit": {k: {s: [round(f["within_one"], 3), round(f["mean_ce"], 3)] for s, f in v.items()}
                                  for k, v in fits.items()}}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
