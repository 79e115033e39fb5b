"""Which training prior lets the latent carry the subject? N healthy subjects (seed 0), small preset, E epochs
per prior; each model scored on 4 test lesion cases (seed 2, 1 mm; pooled best Dice / AP) and for fit on healthy
subjects 0, 1 (training) and 60, 61 (unseen), restoring with the paper prior and with none.

    python bench/training_priors.py EPOCHS N paper,reference,none OUT_DIR
"""
import json
import sys
import time

import numpy as np, torch
from ifad_fast import api, config as cfg, metrics
from ifad_fast.benchmarks import accuracy as benchmark
from ifad_fast.model import save_model
from ifad_fast.synth import generate_lesion, generate_healthy
from ifad_fast.preprocess import prepare, IntensityEncoder
from ifad_fast.restore import restore_classes
torch.set_num_threads(2)
E = int(sys.argv[1]); N = int(sys.argv[2]); variants = sys.argv[3].split(",")
p = cfg.get_preset("small")
vols, brains, pc = benchmark.healthy_volumes(N, p.preprocess, progress=False)
lesions = [generate_lesion(i, seed=2, voxel_mm=1.0) for i in range(4)]
healthy = {i: generate_healthy(i, seed=0) for i in (0, 1, 60, 61)}
TRAIN = {"paper": dict(prior="paper"), "reference": dict(prior="reference", norm_penalty=1e-4, norm_ramp_epochs=20, max_norm=10.0),
         "none": dict(prior="none"), "paper-s0.1": dict(prior="paper", sigma=0.1)}
for v in variants:
    t0 = time.time()
    import ifad_fast.benchmarks.accuracy as B
    orig = cfg.get_preset
    def patched(name, _o=orig, _v=v):
        pr = _o(name)
        return cfg.Preset(pr.model, pr.preprocess, cfg.replace(pr.train, **TRAIN[_v]))
    B.cfg = cfg
    cfg.get_preset = patched
    model = benchmark.train_if3d(vols, brains, "small", E, progress=False, pc=pc)
    cfg.get_preset = orig
    save_model(model, f"{sys.argv[4]}/m_{v}_{E}_{N}.pt")
    tt = time.time() - t0
    lat = model.latents.norm(dim=1)
    enc = IntensityEncoder(model.centres.numpy())
    for rprior in ("paper", "none"):
        rc = cfg.replace(api.restore_config(model, "fast"), prior=rprior)
        S, M = [], []
        for c in lesions:
            pp = prepare(c.image, enc, model.preprocess, model.preprocess.test_mode_pool, c.affine)
            r = restore_classes(model, pp.classes, rc, "cpu", "cpu", brain=pp.brain)[0]
            b = c.brain_mask > 0
            S.append(pp.placement.to_native(r.anomaly)[b]); M.append(c.mask[b] > 0)
        cm = metrics.curve_metrics(np.concatenate(S), np.concatenate(M))
        fits = {}
        for i, c in healthy.items():
            pp = prepare(c.image, enc, model.preprocess, model.preprocess.test_mode_pool, c.affine)
            r = restore_classes(model, pp.classes, rc, "cpu", "cpu", brain=pp.brain)[0]
            f = metrics.restoration_fit(r.classes, pp.classes, pp.brain, r.score)
            fits[i] = round(f["within_one"], 3)
        print(json.dumps(dict(train=v, restore_prior=rprior, epochs=E, n=N, train_s=round(tt), dice=round(cm["dice_best"], 4),
                              ap=round(cm["ap"], 4), fit=fits, latent_norm=round(float(lat.mean()), 3))), flush=True)
