"""One model's detection under variants of its intensity preprocessing, per acquisition.

    python bench/intensity_variants.py --cases 6 --acquisitions 1.5mm,1x1x3mm,linear-1x1x3mm \
        --variant brain --variant interior --variant interior+unbias --variant interior+standardise

Test lesion cases 0..N-1 of the accuracy protocol's test stream (seed 2, synthesised at 1 mm) are
re-acquired as each acquisition and restored with the model (default: the bundled one, cpu backend,
fast schedule) whose preprocessing is changed as the variant says: `brain` / `interior` set
percentile_region; `+unbias` divides each scan by its fitted bias field first (bias_correction);
`+standardise` also maps intensities onto landmarks fitted on the model's training subjects
(healthy stream seed 0, as many as the model holds latents). Prints the pooled
best Dice and AP over the cases' brain voxels, one line per (variant, acquisition). IF 3D only: a
quick check beside the full `ifad-fast bench accuracy`, not a replacement.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from ifad_fast.acquisition import ACQUISITIONS, reacquire
from ifad_fast.api import Restorer, default_model
from ifad_fast.benchmarks.accuracy import TEST_SEED, TRAIN_SEED, with_landmarks
from ifad_fast.metrics import curve_metrics
from ifad_fast.model import load_model
from ifad_fast.synth import generate_healthy, generate_lesion


def variant_model(model, variant: str):
    """The model with its preprocessing changed as `variant` says (see the module docstring)."""
    parts = variant.split("+")
    pc = dataclasses.replace(model.preprocess, percentile_region=parts[0], standardise="standardise" in parts,
                             bias_correction="unbias" in parts, landmarks=())
    n = len(model.latents)
    pc = with_landmarks(pc, lambda: (generate_healthy(i, seed=TRAIN_SEED).image for i in range(n)))
    return dataclasses.replace(model, preprocess=pc)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model file or run folder (default: the bundled model)")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--acquisitions", default="1.5mm,1x1x3mm,linear-1x1x3mm")
    parser.add_argument("--variant", action="append", default=None, help="brain | interior, then +unbias and/or +standardise")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = default_model("cpu") if args.model is None else load_model(args.model)
    cases = {}          # per anatomy: the 'folded' acquisition takes the cases drawn with the folded anatomy
    for variant in args.variant or ["brain", "interior"]:
        restorer = Restorer(variant_model(base, variant), "cpu", "cpu", schedule="fast")
        for name in args.acquisitions.split(","):
            scores, masks = [], []
            anatomy = ACQUISITIONS[name].anatomy
            if anatomy not in cases:
                cases[anatomy] = [generate_lesion(j, seed=TEST_SEED, voxel_mm=1.0, anatomy=anatomy)
                                  for j in range(args.cases)]
            for case in cases[anatomy]:
                scan = reacquire(case, name)
                brain = scan.brain_mask > 0
                scores.append(restorer.restore_array(scan.image, scan.affine).anomaly[brain])
                masks.append(scan.mask[brain] > 0)
            c = curve_metrics(np.concatenate(scores), np.concatenate(masks))
            print(f"{variant:24s} {name:16s} [DICE] {c['dice_best']:.3f}  AP {c['ap']:.3f}  ({time.strftime('%X')})",
                  flush=True)


if __name__ == "__main__":
    main()
