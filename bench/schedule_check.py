"""Fast vs paper restoration schedule on the bundled model: final full-sample loss and Dice per case.

    python bench/schedule_check.py [N_CASES]

The full-sample loss is the mean cross-entropy over every brain voxel at the final z (not the
noisy per-step sample); cases are validation lesions (seed 1).
"""
import sys
import time


from ifad_fast.api import Restorer, default_model
from ifad_fast.metrics import curve_metrics
from ifad_fast.synth import generate_lesion


def main(n: int):
    model = default_model()
    restorers = {sched: Restorer(model, "cpu", "cpu", schedule=sched) for sched in ("paper", "fast")}
    rows = []
    for j in range(n):
        case = generate_lesion(j, seed=1)
        row = {"case": case.name}
        for sched, restorer in restorers.items():
            rc = restorer.rc
            t0 = time.perf_counter()
            res = restorer.restore_array(case.image, case.affine)
            g = res.model_grid
            brain = g.score > 0
            row[sched] = dict(seconds=time.perf_counter() - t0, points=sum(s * k for s, k in rc.phases),
                              loss=float(g.score[brain].mean()),
                              dice=curve_metrics(res.anomaly.ravel(), case.mask.ravel() > 0)["dice_best"])
        rows.append(row)
        p, f = row["paper"], row["fast"]
        print(f"{row['case']}: loss paper {p['loss']:.4f} fast {f['loss']:.4f} ({100 * (f['loss'] / p['loss'] - 1):+.2f} %), "
              f"[DICE] paper {p['dice']:.3f} fast {f['dice']:.3f}, time {p['seconds']:.0f} s vs {f['seconds']:.0f} s, "
              f"points {p['points']:,} vs {f['points']:,}", flush=True)
    return rows


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
