"""A paper-sized model file with random weights (weight-norm gains randomised, as `bench speed`) on a 160³
model grid, and `bench speed`'s synthetic MNI152 brain as a NIfTI scan: the inputs of bench/cli_timing.sh.

    python bench/make_paper160.py OUT_DIR      # writes OUT_DIR/paper160.pt and OUT_DIR/scan160.nii.gz
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ifad_fast import config as cfg
from ifad_fast.model import Model, save_model
from ifad_fast.benchmarks.speed import paper_sized_decoder
from ifad_fast.benchmarks.machine import benchmark_case

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
decoder = paper_sized_decoder("cpu")
mc = decoder.config
model = Model(decoder=decoder, centres=torch.tensor(cfg.HCP_T2_CENTRES, dtype=torch.float64),
              preprocess=cfg.PreprocessConfig(resolution=160), latents=torch.randn(1, mc.latent_dim) / 16)
save_model(model, out / "paper160.pt")
case = benchmark_case()
nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine), str(out / "scan160.nii.gz"))
