"""Which training augmentation carries a model over to scans it was not trained on?

    python bench/augment_study.py EPOCHS N VARIANTS OUT_DIR [CASES] [RESTORE_PRIORS]
    e.g. python bench/augment_study.py 60 16 ref,ref+int,ref+all out 4 paper,none

Trains the `small` preset on healthy subjects 0..N-1 (seed 0, 1.5 mm, prepared as `prepare` does,
intensities kept for the intensity augmentations) for EPOCHS epochs with the DeepSDF-style training
prior (`--prior reference`), once per variant:

    ref       no augmentation
    ref+int   contrast, bias, noise (redrawn per epoch, volume)
    ref+all   contrast, bias, noise, deform with 2 copies per volume (twice the samples per epoch)
    paper     the paper's prior, no augmentation (the bundled model's recipe)

Each model is restored (fast schedule, cpu backend) under each restoring prior (default: paper and none),
on test lesion cases 0..CASES-1 (seed 2, 1 mm) re-acquired as 1.5mm, linear-1x1x3mm and the held-out
styles contrast, bias, noise; one JSON line per (variant, restoring prior): pooled best Dice / AP per
acquisition over the cases' brain voxels, and the restoration fit (restored class within one of the
scan's) on healthy subjects 0, 1 (trained on) and 60, 61 (unseen).
"""
import json
import sys
import time

import numpy as np
import torch

from ifad_fast import config as cfg
from ifad_fast.acquisition import reacquire
from ifad_fast.api import Restorer
from ifad_fast.benchmarks.accuracy import TEST_SEED, healthy_volumes, restoration_fit
from ifad_fast.metrics import curve_metrics
from ifad_fast.model import save_model
from ifad_fast.preprocess import IntensityEncoder, mode_pool3d
from ifad_fast.synth import generate_lesion
from ifad_fast.train import Trainer

ACQUISITIONS = ("1.5mm", "linear-1x1x3mm", "contrast", "bias", "noise")
VARIANTS = {
    "paper": dict(prior="paper"),
    "ref": dict(prior="reference", norm_penalty=1e-4, norm_ramp_epochs=20, max_norm=10.0),
    "ref+int": dict(prior="reference", norm_penalty=1e-4, norm_ramp_epochs=20, max_norm=10.0,
                    augment=("contrast", "bias", "noise")),
    "ref+all": dict(prior="reference", norm_penalty=1e-4, norm_ramp_epochs=20, max_norm=10.0,
                    augment=("contrast", "bias", "noise", "deform"), augment_copies=2),
}


def train(variant, volumes, brains, pc, epochs):
    p = cfg.get_preset("small")
    tc = cfg.replace(p.train, epochs=epochs, seed=0, **VARIANTS[variant])
    encoder = IntensityEncoder.fit(volumes, k=p.model.n_classes, seed=0, brains=brains)
    classes = np.stack([mode_pool3d(encoder.encode(v), pc.train_mode_pool, encoder.n_classes) for v in volumes])
    trainer = Trainer(torch.from_numpy(classes), p.model, tc, pc, encoder.centres, "cpu",
                      [f"healthy_{i:04d}" for i in range(len(volumes))], brains=torch.from_numpy(np.stack(brains)),
                      intensities=np.stack(volumes).astype(np.float16) if tc.augment else None)
    return trainer.run(epochs, progress=False)


def main():
    epochs, n, variants, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
    n_cases = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    priors = sys.argv[6].split(",") if len(sys.argv) > 6 else ("paper", "none")
    torch.set_num_threads(2)
    pc = cfg.get_preset("small").preprocess
    volumes, brains, pc = healthy_volumes(n, pc, progress=False)
    cases = [generate_lesion(j, seed=TEST_SEED, voxel_mm=1.0) for j in range(n_cases)]
    scans = {a: [reacquire(c, a) for c in cases] for a in ACQUISITIONS}
    for variant in variants:
        t0 = time.time()
        model = train(variant, volumes, brains, pc, epochs)
        train_s = time.time() - t0
        save_model(model, f"{out}/{variant}_{epochs}_{n}.pt")
        for prior in priors:
            restorer = Restorer(model, "cpu", "cpu", schedule="fast", prior=prior, sigma=0.01)
            row = dict(variant=variant, restore_prior=prior, epochs=epochs, n=n, cases=n_cases, train_s=round(train_s),
                       latent_norm=round(float(model.latents.norm(dim=1).mean()), 3))
            for a, acquired in scans.items():
                maps, masks = [], []
                for scan in acquired:
                    brain = scan.brain_mask > 0
                    maps.append(restorer.restore_array(scan.image, scan.affine).anomaly[brain])
                    masks.append(scan.mask[brain] > 0)
                m = curve_metrics(np.concatenate(maps), np.concatenate(masks))
                row[a] = [round(m["dice_best"], 4), round(m["ap"], 4)]
            fit = restoration_fit(restorer, (0, 1, 60, 61))
            row["fit"] = {k[-2:]: round(v["within_one"], 3) for k, v in fit["subjects"].items()}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
