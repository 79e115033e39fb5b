"""How closely restorations follow an unseen healthy subject: one axial and one coronal slice of the subject's
own (mode-pooled) classes beside each model's restored classes, with the share of brain voxels within one
class of the scan's. A PNG for README / RESULTS.

    python bench/fit_figure.py OUT.png SUBJECT[:ANATOMY] LABEL=MODEL[@SCHEDULE] [...]   # MODEL: a file or 'bundled'
    python bench/fit_figure.py docs/restoration_fit.png 65:folded fast=bundled@fast local=bundled@local

SUBJECT: a healthy subject of the training stream (seed 0) the models were not trained on (the bundled
model holds 0..63), drawn with synth's ANATOMY (default mni; folded, aged). SCHEDULE: a restoring schedule
(default fast). cpu backend, model grid.
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ifad_fast.api import Restorer, default_model  # noqa: E402
from ifad_fast.metrics import restoration_fit  # noqa: E402
from ifad_fast.model import load_model  # noqa: E402
from ifad_fast.preprocess import prepare  # noqa: E402
from ifad_fast.synth import generate_healthy  # noqa: E402

out, (subject, _, anatomy) = sys.argv[1], sys.argv[2].partition(":")
anatomy = anatomy or "mni"
models = [(spec.split("=", 1)[0], spec.split("=", 1)[1]) for spec in sys.argv[3:]]
case = generate_healthy(int(subject), seed=0, anatomy=anatomy)
rows = []
for label, spec in models:
    spec, _, schedule = spec.partition("@")
    model = default_model("cpu") if spec == "bundled" else load_model(spec)
    restorer = Restorer(model, "cpu", "cpu", schedule=schedule or "fast")
    grid = restorer.restore_array(case.image, case.affine).model_grid
    pc = model.preprocess
    seen = prepare(case.image, restorer.encoder, pc, pc.test_mode_pool, case.affine)
    fit = restoration_fit(grid.classes, seen.classes, seen.brain, grid.score)
    rows.append((label, seen.classes, grid.classes, seen.brain, fit["within_one"]))

n_classes = max(int(r[1].max()) for r in rows) + 1
fig, axes = plt.subplots(2, 1 + len(rows), figsize=(3.2 * (1 + len(rows)), 6.4))
seen, brain = rows[0][1], rows[0][3]
zc = int(np.argwhere(brain)[:, 2].mean())
yc = int(np.argwhere(brain)[:, 1].mean())
panels = [("scan's classes", seen)] + [(f"{label}: within one class {fit:.2f}", restored)
                                        for label, _, restored, _, fit in rows]
for col, (title, vol) in enumerate(panels):
    for row, (cut, name) in enumerate(((vol[:, :, zc], "axial"), (vol[:, yc, :], "coronal"))):
        ax = axes[row, col]
        ax.imshow(np.rot90(cut), cmap="gray", vmin=0, vmax=n_classes - 1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{title}" if row == 0 else name, fontsize=8)
fig.suptitle(f"healthy subject {subject} ({anatomy} anatomy, unseen, seed 0): classes on the model grid", fontsize=9)
fig.tight_layout()
fig.savefig(out, dpi=90)
print(out, [(r[0], round(r[4], 3)) for r in rows])
