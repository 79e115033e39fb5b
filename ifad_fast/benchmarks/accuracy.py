"""`ifad-fast bench accuracy` and `ifad-fast bench speed`.

The accuracy protocol (`accuracy`), on glioma-like cases synthesised from the MNI152 maps (and, held
out, MS-like and stroke-like ones):

1. Healthy training scans: subjects 0..N-1 of the healthy stream, seed 0, anatomy `mixed`
   (`synth --anatomy mixed`, 1.5 mm: even subjects the template's smooth cortex, odd ones
   individually folded), the set the bundled model was trained on (N = the model's number of training volumes); or
   IF 3D (IF 2D for a -2d preset) is trained on them here (`train=PRESET`). A second model
   (`compare`, e.g. IF 2D beside IF 3D) is scored on the same cases as one more method.
2. Baselines trained on the same scans, each seeing a scan through the model's own
   `to_model_grid`, post-processed with the paper's pools as voxel counts (BASELINE_POOLS; `baselines`): thresholding the
   histogram-equalised intensity (Meissen et al. 2021; nothing to train), the voxel-wise z-score
   against the healthy scans (Saase et al. 2020), the mean-image baseline and the dense VAE of
   the paper's Table 1.
3. Validation: lesion seed 1, cases 0..n_val-1, in the reference acquisition (1.5 mm, RAS);
   each method's threshold is the one of best pooled Dice there.
4. Test: lesion seed 2, cases 0..n_test-1, each synthesised once at 1 mm and re-acquired in
   every acquisition asked for (`acquisition.ACQUISITIONS`: voxel sizes, orientations, field of
   view, brain position): the same anatomy each time (the acquisitions of another `synth` anatomy
   or lesion kind take that case's twin: the same subject drawn with it). Healthy test scans: the
   unseen subjects n_healthy..n_healthy+n_healthy_test-1 of the healthy stream (mni anatomy, as the
   validation cases), synthesised like the lesion cases and acquired as the validation cases, for
   the false positives per healthy scan.
5. How well the restoration fits a healthy subject (`restoration_fit`): training subjects 0..n_fit-1
   and unseen ones n_healthy..n_healthy+n_fit-1 of the healthy stream (mixed: mni and folded
   alternate), the share of brain voxels
   whose restored class is within one class of the scan's, and the mean cross-entropy there.
6. The paper's metrics and those beyond it (`metrics.evaluate`: [DICE], DICE μ ± σ at the
   validation threshold, AP, AP per volume, AUROC, FPR@95R, lesion-wise precision, recall and F1
   (also by lesion size), false-positive voxels per healthy scan) on the brain voxels of each
   scan (so a larger field of view adds no easy background), per acquisition (the healthy scans
   in the validation acquisition's) and pooled over all of them (every voxel counts once, so
   finer acquisitions weigh more), for every method; and the spread (max − min) of [DICE] over
   the standard acquisitions, which the project targets at ≤ 0.03 for one model. The generalisation
   test: the held-out styles (`acquisition.HELD_OUT`: a soft rim, other contrast, a strong bias
   field, low SNR, the aged anatomy: the test case drawn folded with wider, deeper sulci and
   larger ventricles than any training subject, and lesion kinds that validation never shows: `ms`,
   the test case's subject with 5-20 small MS-like white-matter plaques instead of the glioma, and
   `stroke`, with a territorial infarct) pooled apart from the standard acquisitions, and the gap
   between the two per method ([DICE] and AP). accuracy.png: the pooled
   precision-recall curves of every method, and a test case's slice with each method's map.

Three disjoint random streams: healthy seed 0, lesion seed 1, lesion seed 2.

`accuracy_on_data` runs the same methods and metrics on the user's own folders (`layouts`): trained
on healthy scans, thresholds from a validation set, every metric on a test set.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import config as cfg
from ..acquisition import ACQUISITIONS, HELD_OUT
from ..baselines import VAEConfig
from .machine import machine
from ..errors import IfadError
from ..progress import progress_bar

TRAIN_SEED, VAL_SEED, TEST_SEED = 0, 1, 2
# The voxel-wise baselines' post-processing: the paper's pools as voxel counts on the model grid, whatever
# its voxel size. On the bundled model's 2.33 mm grid they served every baseline better than the paper's
# millimetres (1 x 9 voxels) that IF 3D now takes: [DICE] over the standard acquisitions z-score 0.687 vs
# 0.673, mean image 0.692 vs 0.629 (bench/RESULTS.md), so the protocol compares IF 3D with the stronger baselines.
BASELINE_POOLS = dict(min_pool=3, avg_pool=15)
TRAIN_ANATOMY = "mixed"   # the healthy stream's subjects: even ones mni, odd ones folded
SPREAD_TARGET = 0.03      # largest acceptable max − min of [DICE] over acquisitions
IF3D, IF2D, MEAN, VAE = "IF 3D", "IF 2D", "mean image", "VAE"
THRESHOLD, ZSCORE = "thresholding (Meissen 2021)", "z-score (Saase 2020)"
#: The paper's Table 1 (BraTS 2018 test scans, trained on HCP healthy T2, 160³): IF 3D and its best
#: VAE-family peer, printed beside a run on the user's own data for comparison.
PAPER_FIGURES = {"IF 3D (paper)": dict(dice_best=0.681, dice_mean=0.640, dice_std=0.177, ap=0.733, auroc=0.992,
                                       fpr95=0.0462),
                 "VQ-VAE (paper)": dict(dice_best=0.568, dice_mean=0.518, dice_std=0.188)}


@dataclass(frozen=True)
class AccuracySetup:
    """What the accuracy protocol runs: set sizes, acquisitions, restoration schedule, the voxel
    sizes of the healthy scans and of the lesion cases before re-acquisition, the VAE."""

    n_healthy: int | None
    n_val: int
    n_test: int
    acquisitions: tuple
    schedule: str = "fast"
    val_acquisition: str = "1.5mm"
    n_fit: int = 4
    n_healthy_test: int = 4
    healthy_mm: float = 1.5
    source_mm: float = 1.0
    vae: VAEConfig = VAEConfig()


class _Volumes(Sequence):
    """Volumes kept as their brain voxels, made whole (zero outside the brain) when indexed;
    values None: the brains themselves. brains: (bit-packed brain, shape) per volume."""

    def __init__(self, values, brains):
        self.values, self.brains = values, brains

    def __len__(self) -> int:
        return len(self.brains)

    def __getitem__(self, i: int) -> np.ndarray:
        packed, shape = self.brains[i]
        brain = np.unpackbits(packed, count=int(np.prod(shape))).view(bool).reshape(shape)
        if self.values is None:
            return brain
        out = np.zeros(shape, self.values[i].dtype)
        out[brain] = self.values[i]
        return out


@dataclass
class _Scored:
    """Scored scans per (method, acquisition): their brain voxels (flat float32 scores, bool masks;
    a healthy scan's all False); per (acquisition, case) the brain, bit-packed, and the voxel volume."""

    scores: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    brains: dict = field(default_factory=dict)

    def add(self, method: str, scan, score_map: np.ndarray, seconds: float):
        key, brain = (method, scan.acquisition), scan.brain_mask > 0
        self.scores.setdefault(key, []).append(np.ascontiguousarray(score_map[brain], dtype=np.float32))
        self.masks.setdefault(key, []).append(np.zeros(int(brain.sum()), bool) if scan.mask is None
                                              else scan.mask[brain] > 0)
        self.names.setdefault(key, []).append(scan.name)
        self.seconds.setdefault(method, []).append(seconds)
        self.brains.setdefault((scan.acquisition, scan.name),
                               ((np.packbits(brain), brain.shape), abs(float(np.linalg.det(scan.affine[:3, :3])))))

    def cases(self, keys, tag: bool = False) -> dict:
        """`metrics.evaluate`'s test arguments for the scans of `keys` ((method, acquisition)
        pairs): whole volumes of scores, masks and brains (the region), names (`tag`: with
        @acquisition) and voxel volumes."""
        items = [(k, i) for k in keys for i in range(len(self.scores.get(k, ())))]
        brains = [self.brains[(k[1], self.names[k][i])] for k, i in items]
        packed = [b[0] for b in brains]
        return dict(scores=_Volumes([self.scores[k][i] for k, i in items], packed),
                    masks=_Volumes([self.masks[k][i] for k, i in items], packed), regions=_Volumes(None, packed),
                    names=[self.names[k][i] + (f"@{k[1]}" if tag else "") for k, i in items],
                    voxel_volumes=[b[1] for b in brains])


def with_landmarks(pc, scans):
    """pc with its standard intensity scale fitted on `scans` (a function giving an iterable of
    native images) when it standardises and has none yet; else pc as it is."""
    from ..preprocess import fit_landmarks, scan_landmarks

    if not pc.standardise or pc.landmarks:
        return pc
    return cfg.replace(pc, landmarks=fit_landmarks([scan_landmarks(image, pc) for image in scans()]))


def healthy_volumes(n: int, pc, voxel_mm: float = 1.5, progress: bool = True):
    """Healthy subjects 0..n-1 (seed 0, mixed anatomy) on the model grid as the model sees them: a list of
    volumes (R, R, R) float32, a list of their brains (R, R, R) bool, and pc (with its landmarks
    fitted on these subjects when it standardises and has none)."""
    from ..preprocess import to_model_grid
    from ..synth import generate_healthy

    def subject(i):
        return generate_healthy(i, seed=TRAIN_SEED, voxel_mm=voxel_mm, anatomy=TRAIN_ANATOMY)

    pc = with_landmarks(pc, lambda: (subject(i).image for i in range(n)))
    volumes, brains = [], []
    for i in progress_bar(range(n), desc="healthy scans", unit="scan", disable=None if progress else True):
        case = subject(i)
        volume, placement, _ = to_model_grid(case.image, case.affine, pc)
        volumes.append(volume)
        brains.append(placement.brain)
    return volumes, brains, pc


def train_if3d(volumes: list[np.ndarray], brains: list[np.ndarray], preset: str, epochs: int | None = None,
               device="cpu", progress: bool = True, pc=None):
    """Train IF 3D (`preset`; IF 2D for a -2d preset) on model-grid volumes (R, R, R) float32 with their brains (bool): k-means
    centres fitted on them, encoded and mode-pooled as for training, `epochs` (default the
    preset's); pc: the preprocessing the volumes went through (default the preset's). -> Model."""
    import torch

    from ..preprocess import IntensityEncoder, mode_pool3d
    from ..train import Trainer

    p = cfg.get_preset(preset)
    pc = p.preprocess if pc is None else pc
    tc = cfg.replace(p.train, epochs=epochs, seed=TRAIN_SEED)
    encoder = IntensityEncoder.fit(volumes, k=p.model.n_classes, seed=tc.seed, brains=brains)
    classes = [encoder.encode(v) for v in volumes]
    if pc.train_mode_pool > 1:
        classes = [mode_pool3d(c, pc.train_mode_pool, encoder.n_classes) for c in classes]
    trainer = Trainer(torch.from_numpy(np.stack(classes)), p.model, tc, pc, encoder.centres, device,
                      [f"healthy_{i:04d}" for i in range(len(volumes))], brains=torch.from_numpy(np.stack(brains)))
    return trainer.run(tc.epochs, progress=progress)


def restoration_fit(restorer, subjects, voxel_mm: float = 1.5) -> dict:
    """How well `restorer` fits healthy subjects (healthy stream, seed 0): per subject and averaged,
    `metrics.restoration_fit` of its restored classes against the scan's own (mode-pooled) classes
    on the model grid's brain voxels."""
    from ..metrics import restoration_fit as fit
    from ..preprocess import prepare
    from ..synth import generate_healthy

    pc = restorer.model.preprocess
    rows = {}
    for i in subjects:
        case = generate_healthy(i, seed=TRAIN_SEED, voxel_mm=voxel_mm, anatomy=TRAIN_ANATOMY)
        grid = restorer.restore_array(case.image, case.affine).model_grid
        seen = prepare(case.image, restorer.encoder, pc, pc.test_mode_pool, case.affine)
        rows[f"healthy_{i:04d}"] = fit(grid.classes, seen.classes, seen.brain, grid.score)
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    return dict(mean, subjects=rows)


def if_label(model) -> str:
    """The method name of an implicit-field model: IF 3D or IF 2D, by its variant."""
    return IF3D if model.config.variant == "3d" else IF2D


def _methods(restorer, baselines, compare=None) -> dict:
    """Method name -> function of an acquired scan giving its anomaly map on the scan's grid (the
    baselines post-processed with BASELINE_POOLS).

    compare: the Restorer of one more implicit-field model, or None."""
    from ..baselines import anomaly_map

    model, rc = restorer.model, cfg.replace(restorer.rc, **BASELINE_POOLS)
    methods = {}
    for r in [restorer, *([compare] if compare is not None else [])]:
        label = if_label(r.model) if if_label(r.model) not in methods else f"{if_label(r.model)} (compared)"
        methods[label] = lambda scan, r=r: r.restore_array(scan.image, scan.affine).anomaly
    for label, b in baselines.items():
        methods[label] = lambda scan, b=b: anomaly_map(b, scan.image, scan.affine, model.preprocess, rc)
    return methods


def _score(into: _Scored, methods: dict, scan) -> dict:
    """Every method's anomaly map of `scan` (kept in `into`); returns them by method."""
    maps = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        maps[name] = fn(scan)
        into.add(name, scan, maps[name], time.perf_counter() - t0)
    return maps


def _evaluate(val: _Scored, test: _Scored, methods, acquisitions, val_acquisition: str) -> dict:
    """Per method: metrics per acquisition, pooled (with the pooled precision-recall curve), and the
    spread of [DICE] over acquisitions; thresholds from the validation cases (the test cases' own
    without any). The healthy scans (in the validation acquisition) count in that acquisition's row
    and the pooled one."""
    from ..metrics import evaluate

    out = {}
    for m in methods:
        v = val.cases([(m, val_acquisition)])
        thresholds = dict(val_scores=v["scores"], val_masks=v["masks"], val_regions=v["regions"]) if v["names"] else {}
        per_acq = {a: evaluate(**test.cases([(m, a)]), **thresholds) for a in acquisitions}
        for r in per_acq.values():
            del r["pr_curve"]
        keys = [(m, a) for a in dict.fromkeys([*acquisitions, val_acquisition])]
        pooled = evaluate(**test.cases(keys, tag=len(acquisitions) > 1), **thresholds)
        standard = [a for a in acquisitions if a not in HELD_OUT]
        held_out = [a for a in acquisitions if a in HELD_OUT]
        dices = np.array([per_acq[a]["dice_best"] for a in standard or acquisitions])
        out[m] = dict(acquisitions=per_acq, pooled=pooled, dice_best_min=float(dices.min()),
                      dice_best_max=float(dices.max()), dice_best_spread=float(np.ptp(dices)),
                      dice_best_std=float(dices.std()), seconds_per_scan=float(np.mean(test.seconds[m])))
        if standard and held_out:        # the generalisation test: styles training never shows, apart
            groups = {"standard": [(m, a) for a in dict.fromkeys([*standard, val_acquisition])],
                      "held_out": [(m, a) for a in held_out]}
            for name, group in groups.items():
                out[m][f"pooled_{name}"] = evaluate(**test.cases(group, tag=True), **thresholds)
                del out[m][f"pooled_{name}"]["pr_curve"]
            out[m]["gap"] = {k: out[m]["pooled_standard"][k] - out[m]["pooled_held_out"][k]
                             for k in ("dice_best", "ap")}
    return out


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


#: The columns of the metrics tables: (header, key, digits, whether higher is better).
COLUMNS = (("[DICE]", "dice_best", 3, True), ("DICE (μ ± σ)", "dice_mean", 3, True), ("AP", "ap", 3, True),
           ("AP per volume", "ap_per_volume", 3, True), ("AUROC", "auroc", 3, True), ("FPR@95R", "fpr95", 4, False),
           ("lesion precision", "lesion_precision", 3, True), ("lesion recall", "lesion_recall", 3, True),
           ("lesion F1", "lesion_f1", 3, True), ("FP voxels / healthy scan", "fp_voxels_per_healthy", 0, False))


def metrics_table(rows: dict) -> list[str]:
    """Markdown lines of a methods × metrics table (`COLUMNS`) of {method: evaluate's result}, the
    best value of each column in bold (every method that shows it, to the digits shown)."""
    shown = {m: {key: None if r.get(key) is None else round(r[key], digits) for _, key, digits, _ in COLUMNS}
             for m, r in rows.items()}
    best = {}
    for _, key, _, higher in COLUMNS:
        values = [x[key] for x in shown.values() if x[key] is not None]
        best[key] = (max if higher else min)(values) if values else None
    lines = [_row(["Method", *(c[0] for c in COLUMNS)]), "|---|" + "---:|" * len(COLUMNS)]
    for m, r in rows.items():
        cells = []
        for _, key, digits, _ in COLUMNS:
            x = shown[m][key]
            text = "-" if x is None else f"{x:.{digits}f}" + (f" ± {r['dice_std']:.3f}" if key == "dice_mean" else "")
            cells.append(f"**{text}**" if x is not None and x == best[key] else text)
        lines.append(_row([m, *cells]))
    return lines


def accuracy_markdown(result: dict) -> str:
    """Markdown tables of an accuracy result: methods × metrics pooled and per acquisition (best in
    bold), lesions found by size, the spread of [DICE] over acquisitions, the restoration's fit."""
    methods, s = result["methods"], result["setup"]
    several = len(s["acquisitions"]) > 1
    title = f"All {len(s['acquisitions'])} acquisitions pooled" if several else s["acquisitions"][0]
    lines = [f"### {title}", "", *metrics_table({m: r["pooled"] for m, r in methods.items()})]
    for a in s["acquisitions"] if several else ():
        lines += ["", f"### {a}", "", *metrics_table({m: r["acquisitions"][a] for m, r in methods.items()})]
    bins = list(next(iter(methods.values()))["pooled"]["lesion_by_size"])
    lines += ["", "### Lesions found / lesions, and false-positive components, by size (pooled)", "",
              _row(["Method", *bins]), "|---|" + "---:|" * len(bins)]
    for m, r in methods.items():
        by = r["pooled"]["lesion_by_size"]
        lines.append(_row([m, *(f"{by[b]['found']} / {by[b]['lesions']}, {by[b]['false_positive']} FP" for b in bins)]))
    if several:
        lines += ["", _row(["Method", "[DICE] min", "[DICE] max", "spread (max − min)",
                            f"spread ≤ {SPREAD_TARGET}", "IT (s / scan)"]), "|---|---:|---:|---:|:-:|---:|"]
    else:
        lines += ["", _row(["Method", "IT (s / scan)"]), "|---|---:|"]
    for m, r in methods.items():
        ok = "✔" if r["dice_best_spread"] <= SPREAD_TARGET else "✘"
        lines.append(_row([m, *([f"{r['dice_best_min']:.3f}", f"{r['dice_best_max']:.3f}",
                                 f"{r['dice_best_spread']:.3f}", ok] if several else []),
                           f"{r['seconds_per_scan']:.1f}"]))
    if any("gap" in r for r in methods.values()):
        lines += ["", f"### Generalisation: standard acquisitions vs held-out styles ({', '.join(HELD_OUT)})", "",
                  _row(["Method", "[DICE] standard", "[DICE] held-out", "gap", "AP standard", "AP held-out", "gap"]),
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m, r in methods.items():
            if "gap" in r:
                st, ho = r["pooled_standard"], r["pooled_held_out"]
                lines.append(_row([m, f"{st['dice_best']:.3f}", f"{ho['dice_best']:.3f}", f"{r['gap']['dice_best']:+.3f}",
                                   f"{st['ap']:.3f}", f"{ho['ap']:.3f}", f"{r['gap']['ap']:+.3f}"]))
    if result.get("fit"):
        lines += ["", _row(["Method", "healthy subjects", "restored class within one of the scan's", "exact",
                            "mean cross-entropy (nats)"]), "|---|---|---:|---:|---:|"]
        for m, groups in result["fit"].items():
            for label, f in groups.items():
                lines.append(_row([m, f"{label} ({len(f['subjects'])})", f"{f['within_one']:.3f}", f"{f['exact']:.3f}",
                                   f"{f['mean_ce']:.3f}"]))
    if "data" in s:
        where = (f"{s['n_test']} test scans ({s['n_healthy_test']} of them healthy) from {s['data']['test']}; "
                 f"thresholds from " + (f"{s['n_val']} validation scans from {s['data']['validation']}"
                                        if s["data"]["validation"] else "the test scans themselves (no validation set)")
                 + f"; trained on {s['n_healthy']} healthy scans from {s['data']['healthy']} ({s['data']['modality']}).")
    else:
        where = (f"{s['n_test']} test cases (lesion seed {TEST_SEED}, synthesised at {s['source_mm']} mm) × "
                 f"{len(s['acquisitions'])} acquisitions and {s['n_healthy_test']} unseen healthy scans (in "
                 f"{s['val_acquisition']}); thresholds from {s['n_val']} validation cases (lesion seed {VAL_SEED}, "
                 f"{s['val_acquisition']}); trained on {s['n_healthy']} healthy scans (seed {TRAIN_SEED}).")
    if "data" in s:
        lines += ["", "### The paper's figures, for comparison (BraTS 2018, trained on HCP; not this run)", "",
                  _row(["Paper's method", "[DICE]", "DICE (μ ± σ)", "AP", "AUROC", "FPR@95R"]),
                  "|---|---:|---:|---:|---:|---:|"]
        for name, f in PAPER_FIGURES.items():
            lines.append(_row([name, f"{f['dice_best']:.3f}", f"{f['dice_mean']:.3f} ± {f['dice_std']:.3f}",
                               *(f"{f[k]:.{4 if k == 'fpr95' else 3}f}" if k in f else "—"
                                 for k in ("ap", "auroc", "fpr95"))]))
    lines += ["", where + " Brain voxels only; lesions: 26-connected components, found when a voxel at or above the "
              f"threshold lies in one. {result.get('method', IF3D)}: {result['model']} ({result['frame']} frame), "
              f"schedule {s['schedule']}."
              + (f" {result['compared']['method']}: {result['compared']['model']}." if "compared" in result else "")]
    return "\n".join(lines)


def _setup(quick, n_healthy, n_val, n_test, acquisitions, schedule, source_mm, healthy_mm,
           vae_steps, n_healthy_test=None) -> AccuracySetup:
    from ..acquisition import get_acquisitions
    from ..synth import acquisition_grid

    for what, v in (("n_healthy", n_healthy), ("n_val", n_val), ("n_test", n_test), ("vae_steps", vae_steps),
                    ("n_healthy_test", n_healthy_test)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise IfadError(f"{what} must be a positive integer, got {v!r}")
    acquisition_grid(source_mm), acquisition_grid(healthy_mm)     # check the voxel sizes
    return AccuracySetup(n_healthy=n_healthy, n_val=n_val or (2 if quick else 6), n_test=n_test or (2 if quick else 24),
                         n_fit=1 if quick else AccuracySetup.n_fit,
                         n_healthy_test=n_healthy_test or (1 if quick else AccuracySetup.n_healthy_test),
                         acquisitions=tuple(a.name for a in get_acquisitions(acquisitions)), schedule=schedule,
                         source_mm=float(source_mm), healthy_mm=float(healthy_mm),
                         vae=VAEConfig(steps=vae_steps or (300 if quick else VAEConfig.steps)))


def _models(model, train, compare, device):
    """(the model, None when it is to be trained here; its preprocessing; how it is described; the
    compared model or None), from a Model, a file, None (the bundled model) or a preset to train."""
    from ..api.restorer import default_model
    from ..model import Model, load_model

    if train is not None:
        model, pc, described = None, cfg.get_preset(train).preprocess, f"trained here ({train} preset)"
    else:
        described = "bundled default model" if model is None else (
            "given model" if isinstance(model, Model) else str(model))
        model = default_model(device) if model is None else model if isinstance(model, Model) else load_model(model, device)
        pc = model.preprocess
    compared = None if compare is None else compare if isinstance(compare, Model) else load_model(compare, device)
    return model, pc, described, compared


def _trained(volumes, brains, model, described, train, epochs, vae: VAEConfig, compared, backend, device,
             schedule, progress, pc=None):
    """IF 3D trained on the healthy model-grid volumes when `train` names a preset, and every
    baseline fitted on them: (model, its description, its Restorer, the compared one or None,
    {method: anomaly-map function}, the VAE)."""
    from ..api.restorer import Restorer
    from ..baselines import DenseVAE, MeanImage, Thresholding, ZScore

    if train is not None:
        model = train_if3d(volumes, brains, train, epochs, device, progress, pc)
        described += f", {model.info['epochs']} epochs"
    vae_model = DenseVAE(vae).fit(volumes, brains, progress)
    baselines = {THRESHOLD: Thresholding(), ZSCORE: ZScore().fit(volumes), MEAN: MeanImage().fit(volumes),
                 VAE: vae_model}
    restorer = Restorer(model, backend, device, schedule=schedule)
    other = None if compared is None else Restorer(compared, backend, device, schedule=schedule)
    return model, described, restorer, other, _methods(restorer, baselines, other), vae_model


def _result(restorer, other, model, described, compare, setup: dict, vae_model, methods, scored) -> dict:
    """The result dict of an accuracy run (as written to accuracy.json)."""
    from ..model import Model

    rc = restorer.rc
    result = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(),
                  backend=restorer.backend, precision=restorer.precision, model=described, method=if_label(model),
                  frame=model.preprocess.frame, setup=setup,
                  restore=dict(phases=[list(p) for p in rc.phases], init=rc.init, lr=rc.lr, prior=rc.prior),
                  vae_final_loss=float(np.mean(vae_model.losses[-20:])), methods=scored)
    if other is not None:
        result["compared"] = dict(model="given model" if isinstance(compare, Model) else str(compare),
                                  method=list(methods)[1], frame=other.model.preprocess.frame,
                                  restore=dict(phases=[list(p) for p in other.rc.phases], init=other.rc.init,
                                               lr=other.rc.lr, prior=other.rc.prior, slice_step=other.rc.slice_step))
    return result


def _write(result: dict, out_dir, report, figure_case):
    """Report the tables; with `out_dir`, write accuracy.json, accuracy.md and accuracy.png (the
    figure of `figure_case`: (scan, {method: map}))."""
    table = accuracy_markdown(result)
    report(table)
    if out_dir:
        from ..figures import accuracy_figure
        from ..io import atomic_path, save_json
        save_json(Path(out_dir) / "accuracy.json", result)
        with atomic_path(Path(out_dir) / "accuracy.md") as tmp:
            tmp.write_text(table + "\n")
        scan, maps = figure_case
        title = f"{scan.name}" + (f" ({scan.acquisition})" if len(result["setup"]["acquisitions"]) > 1 else "")
        accuracy_figure(Path(out_dir) / "accuracy.png", {m: r["pooled"] for m, r in result["methods"].items()},
                        scan.image, scan.mask > 0, maps, affine=scan.affine,
                        title=f"{title}; curves: all test scans pooled")


def _check_schedule(schedule):
    from ..api.restorer import parse_phases

    if schedule not in cfg.SCHEDULES:
        parse_phases(schedule)                                    # a user error before any work


def accuracy(quick=False, backend="auto", device="auto", out_dir=None, model=None, schedule="fast",
             n_test=None, n_val=None, acquisitions=None, n_healthy=None, train=None, epochs=None,
             vae_steps=None, source_mm: float = 1.0, healthy_mm: float = 1.5, report=print,
             progress: bool = True, compare=None, n_healthy_test=None) -> dict:
    """Run the accuracy protocol (module docstring); write accuracy.json, accuracy.md and
    accuracy.png to `out_dir`.

    model: a Model, a model file, or None for the bundled model; train: a preset name to train
    IF 3D (IF 2D for a -2d preset) here on the healthy scans instead (`epochs` overrides the
    preset's). compare: a second model (Model or file; e.g. IF 2D beside IF 3D), scored on the
    same cases with the same schedule and reported as its own method (IF 3D / IF 2D by variant;
    the healthy scans and baselines follow the first model's frame). Defaults: 24 test
    and 6 validation cases, 4 healthy test scans, every acquisition; `quick`: 2, 2 and 1, at most 8
    healthy training scans, a 300-step VAE. Returns the result dict (as written to accuracy.json).
    """
    from ..acquisition import reacquire
    from ..backends.factory import resolve_device
    from ..synth import generate_healthy, generate_lesion

    device = resolve_device(device)
    _check_schedule(schedule)
    setup = _setup(quick, n_healthy, n_val, n_test, acquisitions, schedule, source_mm, healthy_mm, vae_steps,
                   n_healthy_test)
    model, pc, described, compared = _models(model, train, compare, device)
    if setup.n_healthy is None:   # the model's own training set size; quick: at most 8
        trained_on = (model.info or {}).get("volumes") if model is not None else None   # 2D: latents are slices
        n = len(trained_on) if trained_on else len(model.latents) if model is not None and model.latents.numel() else 16
        setup = replace(setup, n_healthy=min(n, 8) if quick else n)

    volumes, brains, pc = healthy_volumes(setup.n_healthy, pc, setup.healthy_mm, progress)
    model, described, restorer, other, methods, vae_model = _trained(
        volumes, brains, model, described, train, epochs, setup.vae, compared, backend, device, schedule, progress,
        pc)
    del volumes, brains

    fit = {}
    for label, r in [(if_label(model), restorer), *([(list(methods)[1], other)] if other is not None else [])]:
        fit[label] = {"training subjects": restoration_fit(r, range(setup.n_fit), setup.healthy_mm),
                      "unseen subjects": restoration_fit(r, range(setup.n_healthy, setup.n_healthy + setup.n_fit),
                                                         setup.healthy_mm)}

    val, test = _Scored(), _Scored()
    for j in progress_bar(range(setup.n_val), desc="validation", unit="case", disable=None if progress else True):
        _score(val, methods, reacquire(generate_lesion(j, seed=VAL_SEED, voxel_mm=setup.source_mm),
                                       setup.val_acquisition))
    bar = progress_bar(total=setup.n_test * len(setup.acquisitions) + setup.n_healthy_test, desc="test", unit="scan",
               disable=None if progress else True)
    shown = setup.val_acquisition if setup.val_acquisition in setup.acquisitions else setup.acquisitions[0]
    for j in range(setup.n_test):
        cases = {}              # the test case per anatomy and lesion kind (acquisitions 'folded', 'ms': their own)
        for a in setup.acquisitions:
            key = (ACQUISITIONS[a].anatomy, ACQUISITIONS[a].lesion)
            if key not in cases:
                cases[key] = generate_lesion(j, seed=TEST_SEED, voxel_mm=setup.source_mm, anatomy=key[0], kind=key[1])
            scan = reacquire(cases[key], a)
            maps = _score(test, methods, scan)
            if j == 0 and a == shown:
                figure_case = (scan, maps)
            bar.update(1)
    for i in range(setup.n_healthy, setup.n_healthy + setup.n_healthy_test):    # unseen healthy subjects
        _score(test, methods, reacquire(generate_healthy(i, seed=TRAIN_SEED, voxel_mm=setup.source_mm),
                                        setup.val_acquisition))
        bar.update(1)
    bar.close()

    result = _result(restorer, other, model, described, compare, asdict(setup), vae_model, methods,
                     _evaluate(val, test, methods, setup.acquisitions, setup.val_acquisition))
    result["fit"] = fit
    _write(result, out_dir, report, figure_case)
    return result


def _data_scans(cases, what: str, masks: bool, max_voxels=None, force: bool = False):
    """The cases (`layouts.Case`) read as scans (`acquisition.Acquired`, acquisition `what`), one at
    a time: the scan checked as `restore` checks it, its mask (labels > 0) on its grid."""
    from ..acquisition import Acquired
    from ..io import load_scan, read_volume
    from ..pairing import label_problem

    for case in cases:
        scan = load_scan(case.scan, max_voxels, force)
        mask = None
        if masks:
            labels = read_volume(case.mask, max_voxels, "mask")
            if labels.shape != scan.data.shape:
                raise IfadError(f"{case.mask}: mask shape {labels.shape} differs from its scan {case.scan} "
                                f"{scan.data.shape}; pass the mask on the scan's grid")
            problem = label_problem(labels)
            if problem:
                raise IfadError(f"{case.mask} does not look like a label map ({problem}); name {case.name}'s lesion "
                                "mask (labels > 0), or list the cases in a CSV of scan,mask")
            mask = (labels > 0).astype(np.uint8)
        yield Acquired(name=case.name, image=scan.data, mask=mask, brain_mask=(scan.data != 0).astype(np.uint8),
                       affine=scan.affine, acquisition=what)


def accuracy_on_data(healthy, test, validation=None, modality: str = "t2", model=None, train=None, epochs=None,
                     backend="auto", device="auto", schedule="fast", vae_steps=None, out_dir=None, report=print,
                     progress: bool = True, compare=None, max_voxels=None, force: bool = False) -> dict:
    """The accuracy protocol on the user's own data: IF 3D (`model`, the bundled one by default, or
    trained here on the healthy scans: `train` a preset) and every baseline trained on the healthy
    scans, each method's threshold chosen on the `validation` cases (else on the test cases
    themselves, and the result says so), every metric on the `test` cases (a mask of zeros: a
    healthy case). healthy, test, validation: folders in a layout `layouts.find_cases` reads
    (ours, BraTS, HCP, BIDS) or CSVs of scan,mask; `modality` picks the scans where several are
    given. Writes accuracy.json, accuracy.md and accuracy.png to `out_dir`; returns the result."""
    from ..backends.factory import resolve_device
    from ..layouts import find_cases
    from ..preprocess import to_model_grid

    device = resolve_device(device)
    _check_schedule(schedule)
    for what, v in (("epochs", epochs), ("vae_steps", vae_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise IfadError(f"{what} must be a positive integer, got {v!r}")
    healthy_cases = find_cases(healthy, modality, masks=False)
    test_cases = find_cases(test, modality)
    val_cases = find_cases(validation, modality) if validation is not None else []
    model, pc, described, compared = _models(model, train, compare, device)

    pc = with_landmarks(pc, lambda: (scan.image for scan in _data_scans(healthy_cases, "healthy", False, max_voxels,
                                                                         force)))
    volumes, brains = [], []
    for scan in progress_bar(_data_scans(healthy_cases, "healthy", False, max_voxels, force), total=len(healthy_cases),
                     desc="healthy scans", unit="scan", disable=None if progress else True):
        volume, placement, _ = to_model_grid(scan.image, scan.affine, pc)
        volumes.append(volume)
        brains.append(placement.brain)
    vae = VAEConfig(steps=vae_steps or VAEConfig.steps)
    model, described, restorer, other, methods, vae_model = _trained(
        volumes, brains, model, described, train, epochs, vae, compared, backend, device, schedule, progress, pc)
    del volumes, brains

    val, scored, figure_case = _Scored(), _Scored(), None
    for scan in progress_bar(_data_scans(val_cases, "validation", True, max_voxels, force), total=len(val_cases),
                     desc="validation", unit="scan", disable=None if progress else True):
        _score(val, methods, scan)
    for scan in progress_bar(_data_scans(test_cases, "test", True, max_voxels, force), total=len(test_cases),
                     desc="test", unit="scan", disable=None if progress else True):
        maps = _score(scored, methods, scan)
        if figure_case is None and scan.mask.any():
            figure_case = (scan, maps)
    methods_scored = _evaluate(val, scored, methods, ("test",), "validation")
    first = next(iter(methods_scored.values()))["pooled"]
    setup = dict(acquisitions=["test"], val_acquisition="validation", schedule=schedule, vae=asdict(vae),
                 n_healthy=len(healthy_cases), n_test=len(test_cases), n_healthy_test=first["n_healthy"],
                 n_val=len(val_cases), data=dict(healthy=str(healthy), test=str(test),
                                                 validation=None if validation is None else str(validation),
                                                 modality=modality))
    result = _result(restorer, other, model, described, compare, setup, vae_model, methods, methods_scored)
    _write(result, out_dir, report, figure_case)
    return result


def speed(quick=False, backend="auto", device="auto", out_dir=None, report=print) -> dict:
    """Times the restoration pieces for the paper-sized model on one volume (ifad_fast/benchmarks/speed.py);
    writes speed.json into out_dir when given. Returns the numbers as a dict."""
    from .speed import run
    result = run(quick=quick, backend=backend, device=device, report=report)
    if out_dir:
        from ..io import save_json
        save_json(Path(out_dir) / "speed.json", result)
    return result


def calibrate(model, schedules=("fast", "local"), n_val: int = 6, report=print):
    """`model` with each schedule's threshold chosen on the protocol's validation cases (lesion seed 1,
    `n_val` cases at 1.5 mm; `api.calibration.calibrate`)."""
    from ..api.calibration import calibrate as calibrate_on
    from ..synth import generate_lesion

    calibrate_on(model, lambda: (generate_lesion(j, seed=VAL_SEED) for j in range(n_val)), schedules,
                 described=f"synthetic lesions, seed {VAL_SEED}, {n_val} cases", n_cases=n_val, report=report)
    return model


def calibrate_and_bundle(model_path, out_path, n_val: int = 6, schedules=("fast", "local"), report=print,
                         trained_on: str = "synthetic healthy brains"):
    """Store the validation set's best-Dice threshold per schedule (`calibrate`) and `trained_on` (what the
    model was trained on, in words) in the model's info and save it."""
    from ..model import load_model, save_model

    model = calibrate(load_model(model_path), schedules, n_val, report)
    model.info.update(trained_on=trained_on, reproduce="bash bench/bundle_model.sh")
    save_model(model, out_path)
    report(f"-> {out_path}")
    return model
