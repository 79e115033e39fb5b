"""Registration to MNI152 (issue 19, item 5): which library, and does it help the bundled model?

    python bench/register_check.py libraries [THREADS]        # SimpleITK vs dipy, speed and agreement
    python bench/register_check.py accuracy N_CASES [THREADS]  # bundled model, with and without --register

libraries: one 1 mm synthetic lesion case (generate_lesion(0, seed=2, voxel_mm=1.0)), registered as it is,
with a known world transform K (rotations 10° and 5°, scale 1.08, shift (6, -4, 3) mm) folded into its
affine, and resampled through K onto its own grid; the same inputs (register._block_mean at 2 mm), the same
2 mm template and two-level pyramid (4 and 2 mm) and metric (Mattes MI, 32 bins) for both libraries:
SimpleITK as register.register does (similarity, then affine; one thread, so that it is reproducible; 10 %
of the 2 mm template's brain voxels, as many at 4 mm); dipy's AffineRegistration (centres of mass,
RigidIsoScaling, Affine; 10 % of the voxels at each level, its own threads). Agreement: the RMS distance (mm, over brain voxels) between the
MNI positions the plain and the moved scan give the same anatomy (0 for a perfect registration).

accuracy: the bundled model (trained without registration), Restorer(model, "cpu", "cpu", schedule="fast"),
on lesion cases 0..N-1 (seed 2, 1 mm) re-acquired as 1.5mm and linear-1x1x3mm: pooled best Dice / AP over
brain voxels in the scan's space, without and with registration, and the registration seconds per scan.
"""
import json
import sys
import time

import numpy as np
import torch

from ifad_fast import api, register
from ifad_fast.acquisition import reacquire, resample
from ifad_fast.metrics import curve_metrics
from ifad_fast.synth import generate_lesion


def known_transform() -> np.ndarray:
    """K: 4x4 world -> world, rotation 10° about x then 5° about z, scale 1.08, shift (6, -4, 3) mm."""
    a, b = np.deg2rad(10.0), np.deg2rad(5.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    k = np.eye(4)
    k[:3, :3] = 1.08 * rx @ rz
    k[:3, 3] = [6.0, -4.0, 3.0]
    return k


def dipy_register(data, affine) -> np.ndarray:
    """register.register's job done by dipy (same inputs, template, pyramid, metric, sampling)."""
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric, transform_centers_of_mass
    from dipy.align.transforms import AffineTransform3D, RigidIsoScalingTransform3D

    tpl, tpl_affine = register.template()
    data, affine = register._block_mean(np.asarray(data, np.float32), np.asarray(affine, np.float64),
                                        register.TEMPLATE_MM)
    reg = AffineRegistration(metric=MutualInformationMetric(nbins=register.BINS,
                                                            sampling_proportion=register.SAMPLING),
                             level_iters=[register.ITERATIONS] * 2, sigmas=[1.0, 0.5], factors=[2, 1], verbosity=0)
    kw = dict(static_grid2world=tpl_affine, moving_grid2world=affine)
    start = transform_centers_of_mass(tpl, tpl_affine, data, affine).affine
    sim = reg.optimize(tpl, data, RigidIsoScalingTransform3D(), None, starting_affine=start, **kw)
    full = reg.optimize(tpl, data, AffineTransform3D(), None, starting_affine=sim.affine, **kw)
    return np.linalg.inv(full.affine)            # static (MNI) -> moving (scan) world, inverted


def libraries():
    case = generate_lesion(0, seed=2, voxel_mm=1.0)
    k = known_transform()
    inverse = np.linalg.inv(k) @ case.affine     # the moved scan's voxel v shows the anatomy at K^-1 A v
    moved = resample(case.image, case.affine, case.image.shape, inverse)
    moved *= resample((case.brain_mask > 0).astype(np.float32), case.affine, case.image.shape, inverse) > 0.5
    voxels = np.argwhere(case.brain_mask > 0)[::20]
    world = case.affine @ np.c_[voxels, np.ones(len(voxels))].T
    register.template()
    for name, fn in (("SimpleITK", register.register), ("dipy", dipy_register)):
        row = dict(library=name)
        for label, data, affine in (("plain", case.image, case.affine), ("via_affine", case.image, k @ case.affine),
                                    ("resampled", moved, case.affine)):
            t0 = time.perf_counter()
            m = fn(data, affine)
            row[f"{label}_s"] = round(time.perf_counter() - t0, 2)
            at = m @ (k @ world if label != "plain" else world)          # where the same anatomy lands in MNI
            if label == "plain":
                plain = at
            else:
                row[f"{label}_rms_mm"] = round(float(np.sqrt(((at - plain)[:3] ** 2).sum(0).mean())), 2)
        row["plain_shift_rms_mm"] = round(float(np.sqrt(((plain - world)[:3] ** 2).sum(0).mean())), 2)
        print(json.dumps(row), flush=True)


def accuracy(n_cases: int):
    model = api.default_model("cpu")
    setups = {"off": api.Restorer(model, "cpu", "cpu", schedule="fast"),
              "register": api.Restorer(api.with_registration(model), "cpu", "cpu", schedule="fast")}
    pooled, reg_seconds = {}, []
    timed = register.register

    def timing(data, affine):
        t0 = time.perf_counter()
        out = timed(data, affine)
        reg_seconds.append(time.perf_counter() - t0)
        return out

    register.register = timing
    for i in range(n_cases):
        case = generate_lesion(i, seed=2, voxel_mm=1.0)
        for acq in ("1.5mm", "linear-1x1x3mm"):
            a = reacquire(case, acq)
            brain = a.brain_mask > 0
            for setup, restorer in setups.items():
                res = restorer.restore_array(a.image, a.affine)
                assert res.anomaly.shape == a.image.shape
                s, m = pooled.setdefault((setup, acq), ([], []))
                s.append(res.anomaly[brain])
                m.append(a.mask[brain] > 0)
                cm = curve_metrics(res.anomaly[brain], a.mask[brain] > 0)
                print(json.dumps(dict(case=i, acq=acq, setup=setup, dice=round(cm["dice_best"], 4),
                                      ap=round(cm["ap"], 4), seconds=round(res.seconds, 1))), flush=True)
    for (setup, acq), (s, m) in sorted(pooled.items()):
        cm = curve_metrics(np.concatenate(s), np.concatenate(m))
        print(f"{setup:9s} {acq:15s} best Dice {cm['dice_best']:.4f}  AP {cm['ap']:.4f}")
    print(f"registration: {np.mean(reg_seconds):.2f} s per scan (min {min(reg_seconds):.2f}, max "
          f"{max(reg_seconds):.2f}, {len(reg_seconds)} scans)")


if __name__ == "__main__":
    what = sys.argv[1]
    threads = int(sys.argv[-1]) if len(sys.argv) > (2 if what == "libraries" else 3) else 2
    torch.set_num_threads(threads)
    libraries() if what == "libraries" else accuracy(int(sys.argv[2]))
