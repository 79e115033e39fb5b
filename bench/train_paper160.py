"""A briefly trained paper-sized model (8 × 512, D = 256, 160³ grid) with a decision threshold: the input
bench/cli_timing.sh needs to time the fast schedule where its search runs on a loss that still falls and its
adaptive grid can engage (a random-weight model has a flat map and no threshold).

    python bench/train_paper160.py OUT_DIR [SUBJECTS] [EPOCHS]   # writes OUT_DIR/paper160_trained.pt

The paper preset's model and preprocessing, healthy subjects 0..SUBJECTS-1 (seed 0, default 8), EPOCHS
epochs (default 40) with the paper's training prior and 80 % of the points inside the brain; the threshold
is the best-Dice threshold of 4 validation lesion cases (seed 1) under the fast schedule. Only a timing
input: far from the paper's 2,000 epochs, its maps are not an accuracy result.
"""
import sys
from pathlib import Path

import numpy as np
import torch

from ifad_fast import config as cfg
from ifad_fast.api import Restorer
from ifad_fast.benchmarks.accuracy import VAL_SEED, healthy_volumes
from ifad_fast.metrics import curve_metrics
from ifad_fast.model import save_model
from ifad_fast.preprocess import IntensityEncoder, mode_pool3d
from ifad_fast.synth import generate_lesion
from ifad_fast.train import Trainer

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 40
torch.set_num_threads(2)
p = cfg.get_preset("paper")
volumes, brains, pc = healthy_volumes(n, p.preprocess, progress=False)
encoder = IntensityEncoder.fit(volumes, k=p.model.n_classes, seed=0, brains=brains)
classes = np.stack([mode_pool3d(encoder.encode(v), pc.train_mode_pool, encoder.n_classes) for v in volumes])
tc = cfg.replace(p.train, epochs=epochs, volumes_per_batch=min(n, p.train.volumes_per_batch), brain_fraction=0.8)
trainer = Trainer(torch.from_numpy(classes), p.model, tc, pc, encoder.centres, "cpu",
                  [f"healthy_{i:04d}" for i in range(n)], brains=torch.from_numpy(np.stack(brains)))
model = trainer.run(epochs, progress=True)
restorer = Restorer(model, "cpu", "cpu", schedule="fast")
maps, masks = [], []
for j in range(4):
    case = generate_lesion(j, seed=VAL_SEED)
    maps.append(restorer.restore_array(case.image, case.affine).anomaly.ravel())
    masks.append(case.mask.ravel() > 0)
curve = curve_metrics(np.concatenate(maps), np.concatenate(masks))
model.info = dict(model.info or {}, threshold=float(curve["threshold"]), threshold_schedule="fast",
                  threshold_set=f"synthetic lesions, seed {VAL_SEED}, 4 cases",
                  trained_on=f"synthetic healthy brains 0..{n - 1} (seed 0), {epochs} epochs: a timing input only")
save_model(model, out / "paper160_trained.pt")
print(f"threshold {curve['threshold']:.4g}, validation [DICE] {curve['dice_best']:.3f}, AP {curve['ap']:.3f}")
