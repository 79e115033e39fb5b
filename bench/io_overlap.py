"""Wall time of `Restorer.restore_files` with and without overlapped I/O (issue 21 item 4): the bundled
model restores N synthetic 1 mm scans (181×217×181 float32 .nii.gz, healthy and lesion cases of
ifad_fast.synth, made once in WORK_DIR/scans) with overlap_io=True and False, alternating (ABAB...),
each run into a fresh folder after one untimed warm-up case.

    PYTHONPATH=. python bench/io_overlap.py WORK_DIR [--n 8] [--batch 1] [--repeats 2] [--device cpu] [--schedule fast]

Prints per run its wall seconds and the seconds spent loading (load_scan), writing (write_outputs)
and restoring (the summaries' seconds), each summed over cases in whichever thread ran them; then
the mean wall per setting and the ratio (off / on: above 1, overlap is faster).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import ifad_fast.api as api
from ifad_fast.api import files as api_files
from ifad_fast.benchmarks.machine import machine


def make_scans(folder: Path, n: int, voxel_mm: float) -> list[Path]:
    """folder/case<i>.nii.gz: synthetic lesion (even i) and healthy (odd i) scans, made when missing."""
    from ifad_fast.synth import generate_healthy, generate_lesion

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"case{i:02d}.nii.gz"
        if not path.is_file():
            case = (generate_healthy if i % 2 else generate_lesion)(i // 2, seed=7, voxel_mm=voxel_mm)
            nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine), str(path))
        paths.append(path)
    return paths


class Stages:
    """Seconds summed over the calls of load_scan and write_outputs by the folder loop (api.files, wrapped in place)."""

    def __init__(self):
        self.seconds = {"load": 0.0, "write": 0.0}
        for stage, name in (("load", "load_scan"), ("write", "write_outputs")):
            setattr(api_files, name, self._timed(stage, getattr(api_files, name)))

    def _timed(self, stage, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[stage] += time.perf_counter() - t0
        return timed

    def reset(self):
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--schedule", default="fast")
    ap.add_argument("--voxel", type=float, default=1.0, help="voxel size (mm) of the synthetic scans")
    args = ap.parse_args()
    paths = make_scans(args.work / "scans", args.n, args.voxel)
    print(f"{machine()}; {args.n} scans {nib.load(str(paths[0])).shape}, batch {args.batch}, "
          f"schedule {args.schedule}, device {args.device}", flush=True)
    restorer = api.Restorer(api.default_model(args.device), device=args.device, schedule=args.schedule)
    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    restorer.restore_files([paths[0]], out, report=lambda line: None)          # warm-up, untimed
    stages, walls = Stages(), {True: [], False: []}
    for rep in range(args.repeats):
        for overlap in (True, False):
            shutil.rmtree(out, ignore_errors=True)
            stages.reset()
            t0 = time.perf_counter()
            summaries = restorer.restore_files([args.work / "scans"], out, batch=args.batch, overlap_io=overlap,
                                               report=lambda line: None)
            wall = time.perf_counter() - t0
            walls[overlap].append(wall)
            restore = sum(s["seconds"] for s in summaries)
            print(f"overlap_io={str(overlap):5} rep {rep + 1}: {wall:7.1f} s wall (load {stages.seconds['load']:.1f} s, "
                  f"write {stages.seconds['write']:.1f} s, restore {restore:.1f} s)", flush=True)
    on, off = statistics.mean(walls[True]), statistics.mean(walls[False])
    print(f"mean wall: overlap {on:.1f} s, in turn {off:.1f} s; ratio off/on {off / on:.3f}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
