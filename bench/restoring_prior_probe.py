"""Which restoring prior suits a model: 4 test lesion cases (seed 2, 1 mm, re-acquired at 1.5 mm) and healthy
subjects 48-50 (seed 0, unseen by the bundled model) restored under the paper's prior at each sigma given.

    python bench/restoring_prior_probe.py MODEL 0.01,0.03,0.1,0.3,none      # none: no prior

One JSON line per sigma: pooled best Dice / AP and its threshold, per-case Dice at that threshold, the 99.9th
percentile of each healthy scan's anomaly map in its brain, and the fit (restored class within one of the
scan's on the model grid's brain).
"""
import sys, json, numpy as np, torch
from ifad_fast.api import Restorer
from ifad_fast.model import load_model
from ifad_fast.metrics import curve_metrics, restoration_fit
from ifad_fast.preprocess import prepare
from ifad_fast.synth import generate_lesion, generate_healthy
from ifad_fast.acquisition import reacquire
torch.set_num_threads(2)
model = load_model(sys.argv[1])
cases = [reacquire(generate_lesion(j, seed=2, voxel_mm=1.0), "1.5mm") for j in range(4)]
healthy = [generate_healthy(i, seed=0) for i in (48, 49, 50)]
for prior, sigma in [("none", 0.01) if s == "none" else ("paper", float(s)) for s in sys.argv[2].split(",")]:
    r = Restorer(model, "cpu", "cpu", schedule="fast", prior=prior, sigma=sigma)
    S, M, per = [], [], []
    for c in cases:
        b = c.brain_mask > 0; a = r.restore_array(c.image, c.affine).anomaly
        S.append(a[b]); M.append(c.mask[b] > 0)
    cm = curve_metrics(np.concatenate(S), np.concatenate(M)); t = cm["threshold"]
    for s, m in zip(S, M):
        p = s >= t; per.append(2 * (p & m).sum() / (p.sum() + m.sum()))
    hmax, fits = [], []
    for h in healthy:
        res = r.restore_array(h.image, h.affine); b = h.brain_mask > 0
        hmax.append(float(np.percentile(res.anomaly[b], 99.9)))
        g = res.model_grid; seen = prepare(h.image, r.encoder, model.preprocess, model.preprocess.test_mode_pool, h.affine)
        fits.append(restoration_fit(g.classes, seen.classes, seen.brain, g.score)["within_one"])
    print(json.dumps(dict(prior=prior, sigma=sigma, dice=round(cm["dice_best"], 4), ap=round(cm["ap"], 4), thr=round(t, 3),
                          per_case=[round(x, 3) for x in per], healthy_p999=[round(x, 3) for x in hmax], fit=[round(x, 3) for x in fits])), flush=True)
