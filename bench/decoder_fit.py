"""Can the decoder draw its own training subjects? Each training subject's learnt latent decoded on
the whole model grid, against the subject's classes (prepared as for training), beside the mean
latent's decoding: the share of brain voxels whose decoded class is within one class of the
subject's, and exact agreement.

    python bench/decoder_fit.py [--model RUN] [--subjects 3]

If a subject's own latent fits it no better than a search does (`bench accuracy`'s fit table), the
decoder, not the latent search, limits how closely a restoration follows its subject. The training
subjects are the healthy stream's (seed 0, 1.5 mm), as for the bundled model; pass --model for a
model trained on them.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from ifad_fast.api import default_model
from ifad_fast.benchmarks.accuracy import TRAIN_SEED
from ifad_fast.model import load_model
from ifad_fast.preprocess import IntensityEncoder, prepare
from ifad_fast.synth import generate_healthy


def decode(model, z: torch.Tensor) -> np.ndarray:
    """The most likely class of every voxel of the model grid for latent z (D,): uint8 (R, R, R)."""
    r = model.preprocess.resolution
    idx = torch.stack(torch.meshgrid(*(torch.arange(r),) * 3, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        out = [model.decoder.logits_at(z[None], chunk[None], (r, r, r))[0].argmax(-1) for chunk in idx.split(1 << 17)]
    return torch.cat(out).reshape(r, r, r).numpy().astype(np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--subjects", type=int, default=3)
    args = parser.parse_args()
    model = default_model("cpu") if args.model is None else load_model(args.model)
    model.decoder.eval()
    pc, encoder = model.preprocess, IntensityEncoder(model.centres.numpy())
    mean = decode(model, model.latents.mean(0))
    for i in range(args.subjects):
        case = generate_healthy(i, seed=TRAIN_SEED)
        seen = prepare(case.image, encoder, pc, pc.train_mode_pool, case.affine)
        brain, target = seen.brain, seen.classes.astype(int)
        for label, classes in (("own latent", decode(model, model.latents[i])), ("mean latent", mean)):
            diff = np.abs(classes[brain].astype(int) - target[brain])
            print(f"subject {i} {label:11s}: within one class {np.mean(diff <= 1):.3f}, exact {np.mean(diff == 0):.3f}")


if __name__ == "__main__":
    main()
