"""Paired accuracy check of the less-work options (IF 3D): one latent search per scan scored on the full and
the adaptive grid, and a search stopped on a level loss (stop_tol, window 5) scored on the full grid; pooled best
Dice / AP per acquisition of the test stream (seed 2, 1 mm) and overall, plus per scan the decoder evaluations,
the maps' max difference and the voxels whose decision flips.

    python bench/less_work_protocol.py N_CASES MODEL|bundled THREADS [THRESHOLD] [STOP_TOL] [STOP_WINDOW]
"""
import sys, json, time, numpy as np, torch
from ifad_fast import api, config as cfg, metrics
from ifad_fast.acquisition import ACQUISITIONS, reacquire
from ifad_fast.synth import generate_lesion
from ifad_fast.preprocess import prepare, IntensityEncoder
from ifad_fast.restore import optimise_latents, initial_latents, score_grid, score_grid_adaptive, refine_near, dilate, pool_reach, anomaly_map
from ifad_fast.backends.factory import resolve_backend
torch.set_num_threads(int(sys.argv[3]))
model = api.default_model() if sys.argv[2] == "bundled" else __import__("ifad_fast.model", fromlist=["x"]).load_model(sys.argv[2])
thr = float((model.info or {}).get("threshold") or float(sys.argv[4]))
base = api.restore_config(model, "fast")
stop = cfg.replace(base, stop_tol=float(sys.argv[5]) if len(sys.argv) > 5 else 0.002,
                   stop_window=int(sys.argv[6]) if len(sys.argv) > 6 else 5)
eng = resolve_backend("cpu", model.decoder, "cpu"); enc = IntensityEncoder(model.centres.numpy()); pc = model.preprocess
acc = {}
def add(k, name, a, b, m):
    acc.setdefault(k, {}).setdefault(name, ([], []))
    acc[k][name][0].append(a[b]); acc[k][name][1].append(m[b] > 0)
for i in range(int(sys.argv[1])):
    case = generate_lesion(i, seed=2, voxel_mm=1.0)
    for name in ACQUISITIONS:
        acq = ACQUISITIONS[name]
        a = reacquire(case if (acq.anatomy, acq.lesion) == ("mni", "glioma") else generate_lesion(i, seed=2, voxel_mm=1.0, anatomy=acq.anatomy, kind=acq.lesion), name); b = a.brain_mask > 0
        p = prepare(a.image, enc, pc, pc.test_mode_pool, a.affine)
        cls = torch.from_numpy(p.classes); brain = torch.from_numpy(p.brain)
        keep = dilate(brain, pool_reach(base))
        row = dict(case=i, acq=name)
        for label, rc in (("base", base), ("stop", stop)):
            g = torch.Generator().manual_seed(rc.seed)
            t0 = time.perf_counter()
            z, tr = optimise_latents(eng, cls[None], initial_latents(model, 1, rc, g), rc, g, brain=brain[None], checked=True)
            row[f"search_{label}_s"] = round(time.perf_counter() - t0, 2); row[f"steps_{label}"] = tr.shape[0]
            t0 = time.perf_counter()
            S, C = score_grid(eng, z[0], cls, keep, rc.chunk, checked=True)
            row[f"grid_{label}_s"] = round(time.perf_counter() - t0, 2)
            A = anomaly_map(S, brain, rc, "brain").numpy()
            add(label, name, p.placement.to_native(A), b, a.mask)
            if label == "base":
                t0 = time.perf_counter()
                S2, C2, n = score_grid_adaptive(eng, z[0], cls, keep, refine_near(brain, rc, thr, "brain"), rc.chunk)
                row["grid_adaptive_s"] = round(time.perf_counter() - t0, 2)
                A2 = anomaly_map(S2, brain, rc, "brain").numpy()
                row.update(evals_adaptive=n, evals_full=int(keep.sum()), maxdiff=round(float(np.abs(A2 - A).max()), 4),
                           flips=int(((A2 >= thr) != (A >= thr)).sum()), clsdiff=round(float((C2 != C).float().mean()), 5))
                add("adaptive", name, p.placement.to_native(A2), b, a.mask)
                Abase = A
            else:
                row["maxdiff_stop"] = round(float(np.abs(A - Abase).max()), 4)
        print(json.dumps(row), flush=True)
summary = {}
for k, per_acq in acc.items():
    per = {}
    for name, (s, m) in per_acq.items():
        cm = metrics.curve_metrics(np.concatenate(s), np.concatenate(m)); per[name] = (round(cm["dice_best"], 4), round(cm["ap"], 4))
    cm = metrics.curve_metrics(np.concatenate([x for s, _ in per_acq.values() for x in s]), np.concatenate([x for _, m in per_acq.values() for x in m]))
    per["pooled"] = (round(cm["dice_best"], 4), round(cm["ap"], 4)); summary[k] = per
print("SUMMARY", json.dumps(summary), flush=True)
