"""`ifad-fast` command line: every command is one call into the library.

User errors (IfadError, bad options, out of memory, operating-system errors such as a full
disk) print one line on stderr and exit 2, with no traceback. IfadWarnings are printed at once
as one `warning:` line each; other libraries' warnings are held back and printed only when the
command succeeds, so an error is never preceded by unrelated noise. Ctrl-C exits 130; SIGTERM
or SIGHUP to an `--nproc` launcher stops its processes and exits 143 or 129 (128 + signal).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .config import MAX_SEED, PRECISIONS, REGIONS, SYNTH_ANATOMIES, TRAIN_PRECISIONS
from .errors import IfadError, IfadWarning, out_of_memory
from .limits import DEFAULT_MAX_VOXELS, MAX_RESOLUTION
from .progress import cli_run, say, verbose


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `ifad-fast CMD: error: ...`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi if hi is not None else '∞'}")
        return value
    parse.__name__ = "int"
    return parse


def _pools(text: str) -> dict:
    """'MINxAVG' -> {min_pool, avg_pool}: odd whole numbers of voxels."""
    try:
        low, avg = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MINxAVG, e.g. 3x15") from None
    if not all(1 <= w <= 63 and w % 2 for w in (low, avg)):
        raise argparse.ArgumentTypeError(f"{text!r}: both windows odd numbers of voxels, 1 to 63")
    return dict(min_pool=low, avg_pool=avg)


_pools.__name__ = "pools"


def _threshold(text: str) -> float | str:
    if text == "model":                            # --threshold alone (or 'model'): the model's own
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


_threshold.__name__ = "threshold"


def _add_engine_args(p, backend=True):
    if backend:
        p.add_argument("--backend", default="auto", help="auto | triton | torch | cpu (default auto)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default auto)")


def _augment_kinds(text: str) -> tuple:
    from .augment import parse_kinds
    try:
        return parse_kinds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_augment_kinds.__name__ = "augmentations"


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of at least 0")
    return value


_non_negative.__name__ = "number"


def _add_augment_args(p):
    g = p.add_argument_group("augmentation (domain randomisation of the training targets; off by default in every "
                             "preset: no accuracy gain measured yet)")
    g.add_argument("--augment", type=_augment_kinds, default=None, metavar="KINDS",
                   help="none (default) or a comma list of contrast (gamma and class-centre jitter), bias (smooth "
                        "multiplicative field), noise (Rician), deform (fixed smooth warps: with --augment-copies); "
                        "contrast, bias and noise are redrawn every epoch and need a folder from this version's "
                        "'ifad-fast prepare' (its intensities.npy)")
    g.add_argument("--augment-copies", type=_int_in(1, 64), default=None, metavar="M",
                   help="deform: each volume trains as M virtual subjects with their own latents, copy 0 the "
                        "volume itself, 1..M-1 its fixed warps (default 1; deform needs at least 2)")
    from .config import TrainConfig
    for name, what in (("gamma", "contrast: sd of log gamma"),
                       ("centre-jitter", "contrast: sd of each class centre's shift"),
                       ("bias", "bias: sd of the log field over the grid"),
                       ("noise", "noise: largest Rician sigma (normalised intensity)"),
                       ("deform", "deform: RMS displacement in voxels"),
                       ("rotate", "deform: sd of the rotation about each axis in degrees"),
                       ("scale", "deform: sd of the log global scale")):
        default = TrainConfig.__dataclass_fields__[f"augment_{name.replace('-', '_')}"].default
        g.add_argument(f"--augment-{name}", type=_non_negative, default=None, metavar="S",
                       help=f"{what} (default {default:g})")


def _add_seed(p, default=0):
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=default, help=f"0..{MAX_SEED}")


def _add_frame_args(p):
    p.add_argument("--frame", choices=("physical", "cube"), default=None,
                   help="physical: RAS, isotropic voxels, brain centred in a fixed box (default); "
                        "cube: pad the scan to a cube of its own matrix (for scans already aligned)")
    p.add_argument("--extent", type=float, default=None,
                   help="side of the physical frame in mm (default: the preset's, paper 240)")
    p.add_argument("--percentile-region", choices=("brain", "interior"), default=None,
                   help="clip percentiles over every brain voxel (the paper's) or the brain less its "
                        "partial-volume rim (robust to resampled scans) (default: the preset's)")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="divide each scan by a smooth bias field (a quadratic that minimises the entropy "
                        "of its log-intensity histogram) before normalising (default: the preset's)")
    p.add_argument("--standardise", action=argparse.BooleanOptionalAction, default=None,
                   help="map each scan's intensity landmarks onto a scale fitted on the training scans "
                        "(Nyúl-Udupa histogram standardisation; default: the preset's)")
    p.add_argument("--register", action=argparse.BooleanOptionalAction, default=None,
                   help="place each scan in the frame by its affine registration to the MNI152 brain "
                        "(SimpleITK, a few seconds a scan: pip install 'ifad-fast[register]'); a model trained "
                        "so registers the scans it restores (default: off)")


def _add_input_checks(p):
    p.add_argument("--max-voxels", type=_int_in(1), default=None,
                   help="refuse scans with more voxels than this, read from the header "
                        f"(default {DEFAULT_MAX_VOXELS:,} = 512³)")
    p.add_argument("--force", action="store_true",
                   help="go on with scans that do not look skull-stripped (with a warning)")


def _add_inputs(p):
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="NIfTI scans (.nii, .nii.gz, any letter case) or folders of them; a BIDS root (with "
                        "dataset_description.json): its sub-*/[ses-*/]anat/*_T2w scans")
    p.add_argument("-i", "--input", dest="more_inputs", action="extend", nargs="+", default=[], metavar="INPUT",
                   help="more INPUTs, as nnU-Net's -i")


def _inputs(args) -> list:
    """INPUT... and -i INPUT..., in that order; IfadError when there are none."""
    inputs = [*args.inputs, *args.more_inputs]
    if not inputs:
        raise IfadError("give the scans or folders to read: INPUT... or -i INPUT")
    return inputs


def _add_prepare_command(sub):
    """The `prepare` command's arguments."""
    p = sub.add_parser("prepare", help="encode scans as intensity-class volumes on the model grid")
    _add_inputs(p)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--preset", default="paper",
                   help="paper | small | tiny (or their -2d variants): grid size and frame extent (default paper)")
    p.add_argument("--resolution", type=_int_in(4, MAX_RESOLUTION), default=None,
                   help=f"model grid size, 4..{MAX_RESOLUTION} (default: the preset's, paper 160)")
    _add_frame_args(p)
    p.add_argument("--centres", default=None, help="JSON file of centres, or hcp-t2 (default: fit on the inputs)")
    p.add_argument("--fit-centres", action="store_true", help="fit k-means centres on the inputs (the default)")
    p.add_argument("--classes", type=_int_in(2, 255), default=10,
                   help="number of classes when fitting, 2..255 (default 10)")
    p.add_argument("--mode-pool", type=int, choices=(1, 2, 3), default=2, help="mode-pool window (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared set already in the output folder")
    _add_seed(p)
    _add_input_checks(p)


def _add_train_command(sub):
    """The `train` command's arguments."""
    p = sub.add_parser("train", help="train the auto-decoder on healthy scans")
    p.add_argument("data", help="folder of healthy NIfTI scans, or the output of 'prepare'")
    p.add_argument("-o", "--output", required=True, help="run folder (model.pt, checkpoint.pt, loss.jsonl)")
    p.add_argument("--preset", default="paper",
                   help="paper | small | tiny: IF 3D, a latent per volume; paper-2d | small-2d | tiny-2d: "
                        "IF 2D, a latent per axial slice (default paper: the paper's model, GPU-sized; "
                        "on a CPU use small, the bundled model's)")
    p.add_argument("--epochs", type=_int_in(1), default=None,
                   help="epochs to train in all, --resume included (default: the preset's, paper 2000, small 250)")
    _add_seed(p, default=None)
    p.add_argument("--prior", choices=("paper", "reference", "none"), default=None,
                   help="latent prior: paper (|z|^2/sigma^2, sigma 0.01), reference (DeepSDF: a penalty on |z| "
                        "ramped in, |z| bounded), none (default: the preset's)")
    p.add_argument("--norm-penalty", type=_non_negative, default=None, metavar="L",
                   help="reference prior: weight of the mean |z| (default 1e-4)")
    p.add_argument("--norm-ramp-epochs", type=_int_in(1), default=None, metavar="E",
                   help="reference prior: epochs over which that weight ramps in (default 100)")
    p.add_argument("--max-latent-norm", type=_non_negative, default=None, metavar="B",
                   help="reference prior: each latent's |z| kept at most B (default 1)")
    p.add_argument("--centres", default=None, help="JSON file of centres or hcp-t2 (default: fit on the data)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--threads", type=_int_in(1, 4096), default=None,
                   help="torch CPU threads per process (× --nproc: at most the CPU cores)")
    p.add_argument("--volumes-per-batch", type=_int_in(1), default=None,
                   help="volumes in each (global) batch, whatever --nproc is (default: the preset's)")
    p.add_argument("--nproc", type=_int_in(1, 1024), default=None,
                   help="data-parallel processes started here (gloo on CPU, NCCL with one GPU each); "
                        "leave out under torchrun")
    p.add_argument("--precision", choices=TRAIN_PRECISIONS, default="float32",
                   help="bf16: autocast for the decoder, float32 weights (GPUs / CPUs with native bf16)")
    _add_augment_args(p)
    _add_frame_args(p)
    _add_input_checks(p)
    _add_engine_args(p, backend=False)


def _add_restore_command(sub):
    """The `restore` command's arguments."""
    p = sub.add_parser("restore", help="anomaly maps for scans (restoration by latent search)")
    _add_inputs(p)
    p.add_argument("-m", "--model", default=None, help="model.pt or run folder (default: the bundled model)")
    p.add_argument("-o", "--output", default="ifad_out", help="output folder (default ifad_out)")
    p.add_argument("--schedule", default=None, help="fast | local | paper | reference | STEPSxPOINTS[,...] (default fast)")
    p.add_argument("--threshold", nargs="?", const="model", type=_threshold, default=None, metavar="T",
                   help="also write a binary <case>_pred-mask.nii.gz of score >= T; "
                        "without T (or with T = model), the threshold the model stores for the schedule "
                        "(ifad-fast calibrate stores them)")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="float32 (default); bf16 (bfloat16 operands, float32 accumulation) or tf32 "
                        "(float32 matmuls on TF32 tensor cores, CUDA only): faster, gated against float32")
    p.add_argument("--region", choices=REGIONS, default=None,
                   help="score voxels near the brain only (default) or the full grid")
    p.add_argument("--resolution", type=_int_in(4, MAX_RESOLUTION), default=None,
                   help="score on an N³ grid of the model frame's extent (IF 3D*; default: the model's grid)")
    p.add_argument("--protocol", choices=("paper",), default=None,
                   help="paper: the paper's setting (schedule paper, region full)")
    p.add_argument("--pools", type=_pools, default=None, metavar="MINxAVG",
                   help="the anomaly score's min-pool and average-pool windows in model-grid voxels (default: the "
                        "paper's 4.5 and 22.5 mm on the model grid, 1x9 for the bundled model; 3x15: the paper's "
                        "voxel counts, which remove specks under 7 mm on a 2.33 mm grid, small lesions with them)")
    p.add_argument("--grid", choices=("full", "adaptive"), default=None,
                   help="full: the decoder at every voxel near the brain; adaptive: at every 2nd voxel, "
                        "interpolated, and at every voxel where the map can reach the threshold (exact "
                        "masks, about half the work; default of the fast schedule when the model stores "
                        "a threshold)")
    p.add_argument("--bids", action="store_true",
                   help="name the outputs as a BIDS derivative data set: sub-<label>[/ses-<label>]/anat/"
                        "<case>_desc-anomaly_map.nii.gz with its .json sidecar, _desc-restoration_map, "
                        "_desc-anomaly_mask, and dataset_description.json")
    p.add_argument("--bias-correction", action="store_true",
                   help="divide each scan by its fitted smooth bias field before normalising, for scans that "
                        "were not bias-corrected (N4) as the model's training scans were (adds about a second "
                        "per scan)")
    p.add_argument("--register", action="store_true",
                   help="place each scan by its affine registration to the MNI152 brain (pip install "
                        "'ifad-fast[register]'); a model trained with --register does this anyway; for one trained "
                        "without it a warning says the model never saw registered scans")
    p.add_argument("--slice-step", type=_int_in(1, MAX_RESOLUTION), default=None, metavar="N",
                   help="2D models: restore one axial slice in N, its score filling N slices (default 4, the paper's)")
    p.add_argument("--batch", type=_int_in(1, 1024), default=1, help="scans restored together (default 1)")
    p.add_argument("--figure", action="store_true",
                   help="also write <case>_figure.png: axial, coronal and sagittal slices, anomaly overlay "
                        "(neurological: the subject's right on the right)")
    p.add_argument("--radiological", action="store_true",
                   help="with --figure: the subject's right on the image's left, as radiologists read scans")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--continue", dest="resume", action="store_true",
                       help="skip cases whose outputs are complete in the output folder, do the rest")
    again.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    p.add_argument("--nproc", type=_int_in(1, 1024), default=None,
                   help="processes started here, each restoring its share of the cases (one GPU each "
                        "with --device cuda); leave out under torchrun")
    _add_seed(p)
    _add_input_checks(p)
    _add_engine_args(p)


def _add_evaluate_command(sub):
    """The `evaluate` command's arguments."""
    p = sub.add_parser("evaluate", help="the paper's metrics and lesion-wise detection for anomaly maps against "
                                        "lesion masks")
    p.add_argument("--scores", default=None, help="folder of <case>_anomaly.nii.gz")
    p.add_argument("--masks", default=None,
                   help="folder of ground truth (labels > 0 = lesion; a mask of zeros: a healthy case), found by "
                        "name: <case>_mask, _seg, _label(s), _lesion, BIDS _dseg/_mask, the case's modality suffix "
                        "(_t2, _T2w...) dropped; may be the scans' folder (a scan is never taken for a mask)")
    p.add_argument("--pairs", default=None, metavar="CSV",
                   help="instead of --scores/--masks: a CSV with the header map,mask and a line per case "
                        "(relative paths start at the CSV's folder)")
    p.add_argument("--val-scores", default=None, help="validation anomaly maps (threshold chosen there)")
    p.add_argument("--val-masks", default=None, help="validation ground truth, as --masks")
    p.add_argument("--val-pairs", default=None, metavar="CSV", help="validation cases as a CSV, as --pairs")
    p.add_argument("-o", "--output", default=None, help="folder for metrics.json")
    p.add_argument("--max-voxels", type=_int_in(1), default=None,
                   help=f"refuse maps with more voxels than this (default {DEFAULT_MAX_VOXELS:,})")


def _add_calibrate_command(sub):
    """The `calibrate` command's arguments."""
    p = sub.add_parser("calibrate", help="choose each schedule's decision threshold on validation scans with lesion "
                                         "masks and store them in a copy of the model (for --threshold alone)")
    p.add_argument("validation", metavar="VALIDATION",
                   help="validation scans and their ground truth (labels > 0 = lesion): a folder (ours, BraTS, HCP "
                        "or BIDS layout) or a CSV of scan,mask")
    p.add_argument("-m", "--model", default=None, help="model.pt or run folder (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_PT",
                   help="the calibrated model file to write (the input model is left as it is)")
    p.add_argument("--schedule", default=None, metavar="SCHEDULES",
                   help="comma list of the schedules whose maps get a threshold, in order (default fast,local; "
                        "a 2D model: fast; local after fast: its fit region is judged by the fast map's threshold)")
    p.add_argument("--modality", default="t2", choices=("t2", "flair", "t1", "t1ce"),
                   help="which scans to read where a case has several (default t2)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    _add_input_checks(p)
    _add_engine_args(p)


def _add_synth_command(sub):
    """The `synth` command's arguments."""
    p = sub.add_parser("synth", help="synthesise healthy and lesion brains from the MNI152 maps")
    p.add_argument("-o", "--output", required=True,
                   help="output folder: healthy/<case>.nii.gz, lesion/<case>.nii.gz with <case>_mask.nii.gz, "
                        "manifest.json")
    p.add_argument("--healthy", type=_int_in(0, 100000), default=8, help="healthy brains (default 8)")
    p.add_argument("--lesions", type=_int_in(0, 100000), default=4,
                   help="brains with a lesion (--lesion-kind), each with its mask (default 4)")
    p.add_argument("--voxel-mm", type=float, default=1.5, help="isotropic voxel size in mm (default 1.5)")
    p.add_argument("--anatomy", choices=SYNTH_ANATOMIES, default="mni",
                   help="mni: the template's smooth cortex, varied (default; the same images as before); "
                        "folded: each subject also gets individual cortical folding and hemispheric asymmetry; "
                        "aged: folded with wider, deeper sulci and larger ventricles than folded draws; "
                        "mixed: folded for odd subjects, mni for even ones (the bundled model's training set)")
    p.add_argument("--lesion-kind", choices=("glioma", "ms", "stroke"), default="glioma",
                   help="the lesion cases' lesion: glioma (default; the same images as before); ms: 5-20 small "
                        "MS-like white-matter plaques; stroke: a territorial infarct (same subjects as glioma)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a synthetic set already in the output folder (its files that the new set does "
                        "not write are removed, nothing else)")
    _add_seed(p)


def _add_demo_command(sub):
    """The `demo` command's arguments."""
    p = sub.add_parser("demo", help="synthesise a lesion case, restore it with the bundled model, plot it")
    p.add_argument("-o", "--output", default="ifad_demo", help="output folder (default ifad_demo)")
    _add_seed(p)
    _add_engine_args(p)


def _add_bench_command(sub):
    """The `bench` command's arguments."""
    p = sub.add_parser("bench", help="speed and accuracy benchmarks")
    p.add_argument("what", choices=("speed", "accuracy"),
                   help="speed: one 160³ scan through each engine; accuracy: the paper's metrics on synthetic lesions")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats, for development")
    p.add_argument("-o", "--output", default=None, help="folder for the report (json; accuracy also md)")
    acc = p.add_argument_group("accuracy only")
    acc.add_argument("-m", "--model", default=None, help="model.pt or run folder (default: the bundled model)")
    acc.add_argument("--compare", default=None, metavar="MODEL",
                     help="also score this model on the same cases, e.g. an IF 2D model beside IF 3D "
                          "(reported as IF 3D or IF 2D by its variant)")
    acc.add_argument("--train", default=None, metavar="PRESET",
                     help="train IF 3D here on the healthy scans instead (paper | small | tiny; -2d: IF 2D)")
    acc.add_argument("--epochs", type=_int_in(1), default=None, help="with --train: epochs (default the preset's)")
    acc.add_argument("--acquisitions", default=None,
                     help="comma-separated acquisitions of the test scans (default all: "
                          "1.5mm,1mm,2mm,1x1x3mm,lps,permuted,off-centre,cropped,enlarged,folded and the "
                          "held-out styles linear-1x1x3mm,contrast,bias,noise,aged,ms,stroke)")
    acc.add_argument("--n-test", type=_int_in(1), default=None, help="test cases (default 24, quick 2)")
    acc.add_argument("--n-val", type=_int_in(1), default=None, help="validation cases (default 6, quick 2)")
    acc.add_argument("--n-healthy", type=_int_in(1), default=None,
                     help="healthy training scans (default: as many as the model was trained on)")
    acc.add_argument("--n-healthy-test", type=_int_in(1), default=None,
                     help="unseen healthy scans scored for false positives (default 4, quick 1)")
    acc.add_argument("--schedule", default="fast", help="restoration schedule (default fast)")
    acc.add_argument("--vae-steps", type=_int_in(1), default=None, help="VAE training steps (default 1000, quick 300)")
    data = p.add_argument_group("accuracy on your own data (instead of synthetic cases)")
    data.add_argument("--healthy", default=None, metavar="DIR",
                      help="healthy scans to train every method on: a folder (ours, BraTS, HCP or BIDS layout) or a "
                           "CSV of scan,mask")
    data.add_argument("--test", default=None, metavar="DIR",
                      help="test scans and their ground truth (labels > 0 = lesion; a mask of zeros: a healthy scan)")
    data.add_argument("--validation", default=None, metavar="DIR",
                      help="validation scans and ground truth, where each method's threshold is chosen "
                           "(default: on the test scans themselves, and the report says so)")
    data.add_argument("--modality", default="t2", choices=("t2", "flair", "t1", "t1ce"),
                      help="which scans to read where a case has several (BraTS _t2/_flair/..., BIDS _T2w/...; "
                           "default t2)")
    _add_engine_args(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = _Parser(prog="ifad-fast", description="Implicit-field anomaly detection for brain MRI.")
    parser.add_argument("--version", action="version", version=f"ifad-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_prepare_command(sub)
    _add_train_command(sub)
    _add_restore_command(sub)
    _add_evaluate_command(sub)
    _add_calibrate_command(sub)
    _add_synth_command(sub)
    _add_demo_command(sub)
    _add_bench_command(sub)
    for p in sub.choices.values():
        talk = p.add_mutually_exclusive_group()
        talk.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const="quiet", default="normal",
                          help="print only errors, warnings and the final summary")
        talk.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const="verbose",
                          help="also print the settings resolved (device, backend, ...) and, off a terminal, "
                               "progress every 5 s instead of 30 s")
    return parser


def main(argv=None) -> int:
    """Run one command (argv: the arguments after `ifad-fast`); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:                      # --help, --version, or a one-line option error
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:                       # as argparse does for a missing argument
        parser.print_help(sys.stderr)
        return 2
    prefix = f"ifad-fast {args.command}"
    held: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        if issubclass(category, IfadWarning):
            print(f"{prefix}: warning: {text}", file=sys.stderr, flush=True)
        else:
            held.append(f"{prefix}: warning: {category.__name__}: {text}")

    with cli_run(args.verbosity, sys.argv[1:] if argv is None else argv), warnings.catch_warnings():
        warnings.simplefilter("always", IfadWarning)
        warnings.showwarning = show
        try:
            code = COMMANDS[args.command](args) or 0
        except IfadError as exc:
            print(f"{prefix}: error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):              # any other RuntimeError is a bug: its traceback shows
                raise
            print(f"{prefix}: error: ran out of memory; use smaller inputs or batches, or a machine with more "
                  "memory", file=sys.stderr)
            return 2
        except OSError as exc:
            from .io import describe_os_error
            print(f"{prefix}: error: {describe_os_error(exc)}", file=sys.stderr)
            return 2
    for line in dict.fromkeys(held):
        print(line, file=sys.stderr)
    return code


def _output(path, option="-o"):
    from .io import check_output_folder
    return check_output_folder(path, option)


def _holding_output(command):
    """`command` run holding the lock on its -o folder, so a second writer into it is refused
    (under torchrun rank 0 holds it for every rank)."""
    @functools.wraps(command)
    def run(args):
        from .locks import hold

        out = _output(args.output)
        if os.environ.get("RANK", "0") != "0":
            return command(args)
        with hold(out):
            return command(args)
    return run


def _frame_config(pc, args):
    """The preset's PreprocessConfig with --frame / --extent / --percentile-region / --bias-correction /
    --standardise / --register applied."""
    from . import config as cfg
    if args.extent is not None and not (math.isfinite(args.extent) and args.extent > 0):
        raise IfadError("--extent must be a positive number of millimetres")
    pc = cfg.replace(pc, frame=args.frame, extent_mm=args.extent, percentile_region=args.percentile_region,
                     bias_correction=args.bias_correction, standardise=args.standardise, register=args.register)
    if pc.register:
        from .register import require_simpleitk
        require_simpleitk()
    return pc


def cmd_prepare(args):
    """`ifad-fast prepare`: scans -> class volumes, brain masks and manifest.json."""
    from . import config as cfg
    from .dataset import prepare_scans
    from .preprocess import IntensityEncoder

    args.inputs = _inputs(args)
    _output(args.output)
    pc = _frame_config(cfg.replace(cfg.get_preset(args.preset).preprocess, resolution=args.resolution), args)
    encoder = None if (args.fit_centres or args.centres is None) else IntensityEncoder.load(args.centres)
    manifest = prepare_scans(args.inputs, args.output, pc, args.mode_pool, encoder, k=args.classes,
                             seed=args.seed, overwrite=args.overwrite, force=args.force,
                             max_voxels=args.max_voxels, report=say)
    print(f"prepared {len(manifest['cases'])} scans at {pc.resolution}³ ({pc.frame} frame) -> {args.output}")


def _train_config(args, preset):
    """The preset's TrainConfig with the command line's choices (checked by TrainConfig)."""
    from . import config as cfg

    tc = cfg.replace(preset.train, epochs=args.epochs, seed=args.seed, prior=args.prior,
                     norm_penalty=args.norm_penalty, norm_ramp_epochs=args.norm_ramp_epochs,
                     max_norm=args.max_latent_norm,
                     volumes_per_batch=args.volumes_per_batch, augment=args.augment,
                     augment_copies=args.augment_copies, augment_gamma=args.augment_gamma,
                     augment_centre_jitter=args.augment_centre_jitter,
                     augment_bias=args.augment_bias, augment_noise=args.augment_noise,
                     augment_deform=args.augment_deform, augment_rotate=args.augment_rotate,
                     augment_scale=args.augment_scale)
    if preset.model.variant == "2d" and "deform" in tc.augment:
        raise IfadError("--augment deform (virtual subjects) is for 3D models; a 2D preset takes contrast, bias "
                        "and noise")
    return tc


def _warn_gpu_sized(name: str, preset, tc, names, brains, device):
    """Warn that a paper-sized training on this CPU takes hours (estimated from its matmul rate)."""
    from .train import estimate_seconds

    samples, what = len(names), f"{len(names)} volumes"
    if preset.model.variant == "2d":                 # a sample per brain slice
        from .restore.slices import slice_table
        samples = len(slice_table(brains))
        what += f" ({samples} slices)"
    seconds, rate = estimate_seconds(preset.model, tc, samples, tc.epochs, device)
    warnings.warn(IfadWarning(
        f"the {name} preset is GPU-sized: {tc.epochs} epochs on {what} need roughly "
        f"{seconds / 3600:.1f} h on this CPU (at half its measured {rate / 1e9:.0f} GFLOP/s matmul rate); "
        f"use a GPU (--device cuda) or --preset {name.replace('paper', 'small')}"))


@_holding_output
def cmd_train(args):
    """`ifad-fast train`: validate everything, load the data, train (Ctrl-C saves a checkpoint).

    --nproc N: N processes started here (distributed.launch); under torchrun each process runs
    this command, rank 0 preparing the data while the others wait.
    """
    from . import config as cfg
    from .backends.factory import resolve_device
    from .augment import uses_intensities
    from .dataset import MANIFEST, load_intensities, training_volumes
    from .distributed import SINGLE, from_env, launch
    from .io import clean_stale_temporaries
    from .limits import check_memory, train_bytes, usable_cores
    from .train import TrainJob, data_fingerprint, train_job

    preset = cfg.get_preset(args.preset)
    tc = _train_config(args, preset)
    device = resolve_device(args.device)
    nproc, world = _processes(args, device)
    out = _output(args.output)
    if (out / "checkpoint.pt").exists() and not args.resume:
        raise IfadError(f"{out} already holds a training run; pass --resume to continue it or choose another -o")
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise IfadError(f"{out / 'checkpoint.pt'}: no checkpoint to resume from; start without --resume")
    if (Path(args.data) / MANIFEST).is_file() and (args.frame or args.extent or args.percentile_region
                                                   or args.standardise is not None
                                                   or args.bias_correction is not None
                                                   or args.register is not None):
        raise IfadError(f"{args.data} is a prepared folder: its frame and intensities were chosen by 'ifad-fast "
                        "prepare'; drop --frame/--extent/--percentile-region/--bias-correction/--standardise/--register "
                        "or pass the raw scans")
    pc = _frame_config(preset.preprocess, args)
    group = from_env(device)[0] if world > 1 else SINGLE      # under torchrun: join now, prepare on rank 0
    if group.main:
        clean_stale_temporaries(out)
    else:
        group.barrier()
    volumes, brains, names, centres, pc = training_volumes(args.data, pc, args.centres, out / "cache",
                                                           k=preset.model.n_classes, seed=tc.seed,
                                                           progress=group.main, force=args.force,
                                                           max_voxels=args.max_voxels,
                                                           intensities=uses_intensities(tc.augment))
    if group.main:
        group.barrier()
    intensities, mode_pool = load_intensities(volumes) if uses_intensities(tc.augment) else (None, None)
    if uses_intensities(tc.augment) and intensities is None:
        raise IfadError(f"{args.data} was prepared without intensities.npy (by an older ifad-fast); --augment "
                        f"{','.join(k for k in tc.augment if k != 'deform')} re-encodes the intensities: run "
                        "'ifad-fast prepare' on its scans again")
    if len(centres) != preset.model.n_classes:
        raise IfadError(f"{len(centres)} intensity centres but the {args.preset} model has "
                        f"{preset.model.n_classes} classes; pass matching --centres")
    check_memory(train_bytes(preset.model, tc, preset.preprocess.resolution, len(names)),
                 f"training on {len(names)} volumes at {preset.preprocess.resolution}³",
                 "train on fewer volumes, use a smaller preset or a machine with more memory", device)
    if args.preset in ("paper", "paper-2d") and device.type == "cpu" and group.main:
        _warn_gpu_sized(args.preset, preset, tc, names, brains, device)
    threads = args.threads
    if threads is None and nproc > 1 and device.type == "cpu":
        threads = max(1, usable_cores() // nproc)
    if group.main:
        verbose(f"training the {args.preset} model on {len(names)} volumes at {pc.resolution}³ ({pc.frame} frame): "
                f"{tc.epochs} epochs, {tc.volumes_per_batch} volumes per batch, {device}, "
                f"{max(nproc, world)} process(es), {threads or 'default'} threads, {args.precision}")
    provenance = dict(data=str(Path(args.data).resolve()), preset=args.preset, device=str(device))
    job = TrainJob(volumes=str(volumes.filename), brains=str(brains.filename), names=tuple(names),
                   centres=tuple(float(c) for c in centres), model=preset.model, train=tc, preprocess=pc,
                   out=str(out), device=str(device), resume=args.resume, precision=args.precision,
                   threads=threads, provenance=tuple(provenance.items()),
                   data=tuple(data_fingerprint(volumes, brains, names, intensities).items()),  # hashed once
                   intensities=None if intensities is None else str(intensities.filename), mode_pool=mode_pool)
    summary = (launch(train_job, nproc, job, hint="--resume continues from the last checkpoint")[0]
               if nproc > 1 else train_job(job))
    if group.main:
        procs = max(nproc, world)
        print(f"trained {args.preset} model on {len(names)} volumes for {summary['epochs']} epochs"
              f"{f' in {procs} processes' if procs > 1 else ''} ({summary['seconds']:.0f} s), "
              f"final loss {summary['final_loss']:.4f} -> {out / 'model.pt'}")


def _processes(args, device) -> tuple[int, int]:
    """(--nproc, or 1; WORLD_SIZE under torchrun, or 1), checked against each other, the GPUs, the
    CPU cores (with --threads) and the memory."""
    from .distributed import env_world
    from .limits import check_processes

    world = env_world()
    if world > 1 and args.nproc not in (None, 1):
        raise IfadError(f"running under torchrun (WORLD_SIZE={world}): leave --nproc out")
    nproc = 1 if args.nproc is None else args.nproc
    if nproc > 1 and device.type == "cuda":
        import torch
        if device.index is not None:
            raise IfadError(f"--nproc {nproc} puts process r on cuda:r; pass --device cuda, not {device}")
        if torch.cuda.device_count() < nproc:
            raise IfadError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    check_processes(nproc, getattr(args, "threads", None), device)
    return nproc, world


def load_model_arg(spec, device):
    """The model named by -m (file or run folder), or the bundled one when none is named."""
    from .api.restorer import default_model
    from .model import load_model

    if spec is None:
        model = default_model(device)
        say("using the bundled default model (small preset, trained on synthetic MNI152 brains); "
              "train your own with 'ifad-fast train' and pass -m")
        return model
    return load_model(spec, device)


@_holding_output
def cmd_restore(args):
    """`ifad-fast restore`: anomaly maps for scans or folders (one `api.Restorer`).

    --nproc N (or torchrun): process r restores cases r, r + N, ... of the sorted scan list, so
    every case is written once, by one process; --continue skips the cases already finished.
    """
    from .api.jobs import RestoreJob, check_job, restore_shard
    from .api.restorer import PROTOCOLS, Restorer, restore_config, with_bias_correction, with_registration
    from .backends.factory import resolve_device
    from .config import schedule_name
    from .distributed import launch
    from .extras import require
    from .limits import usable_cores
    from .model import stored_threshold

    args.inputs = _inputs(args)
    if args.radiological and not args.figure:
        raise IfadError("--radiological sets the orientation of --figure; add --figure or drop it")
    figure = args.figure and ("radiological" if args.radiological else "neurological")
    if figure:
        require("matplotlib")
    schedule, region, pools = args.schedule or "fast", args.region or "brain", args.pools or {}
    if args.protocol:
        protocol = PROTOCOLS[args.protocol]
        for name, given in (("schedule", args.schedule), ("region", args.region)):
            if given is not None and given != protocol[name]:
                raise IfadError(f"--protocol {args.protocol} sets --{name} {protocol[name]}; drop --{name} {given}")
        schedule, region, pools = protocol["schedule"], protocol["region"], protocol["pools"]
        if args.pools not in (None, pools):
            raise IfadError(f"--protocol {args.protocol} sets the paper's pools "
                            f"{pools['min_pool']}x{pools['avg_pool']}; drop --pools")
        if args.grid == "adaptive":
            raise IfadError(f"--protocol {args.protocol} scores the full grid; drop --grid adaptive")
    _output(args.output)
    device = resolve_device(args.device)
    nproc, world = _processes(args, device)
    alone = nproc == 1 and world == 1
    model = load_model_arg(args.model, device if alone else "cpu")   # shared: each process loads its own
    if args.bias_correction:
        model = with_bias_correction(model)
    if args.register:
        model = with_registration(model, warn=True)
    if args.slice_step is not None and model.config.variant != "2d":
        raise IfadError("--slice-step is for 2D models (one latent per axial slice); this model is 3D")
    rc = restore_config(model, schedule, seed=args.seed, slice_step=args.slice_step, grid=args.grid, **pools)
    existing = "continue" if args.resume else "overwrite" if args.overwrite else "refuse"
    pooled = (rc.min_pool, rc.avg_pool)
    if rc.local_grid and args.threshold is None and stored_threshold(model, "fast", pooled) is None:
        raise IfadError("the local schedule fits its local latents where the map stays clear of the decision "
                        "threshold, and this model stores none for these pools: pass --threshold T or use --schedule fast")
    if args.grid == "adaptive" and args.threshold is None and stored_threshold(model, schedule_name(rc), pooled) is None:
        warnings.warn(IfadWarning("--grid adaptive is exact near a decision threshold, and this model stores none: "
                                  "scoring the full grid (pass --threshold T to use the adaptive grid)"))
    if alone:
        restorer = Restorer(model, args.backend, device, args.precision, rc, region, args.resolution, progress=True)
        if args.grid == "adaptive" and not restorer.engine.has_log_probs:
            warnings.warn(IfadWarning(f"--grid adaptive needs per-class log-probabilities, which the "
                                      f"{restorer.backend} backend does not give: scoring the full grid "
                                      "(--backend cpu or torch gives the adaptive grid)"))
        verbose(f"restoring with the {restorer.backend} backend on {restorer.device} ({restorer.precision}, "
                f"{restorer.pipeline} pipeline), schedule {'+'.join(f'{s}x{k}' for s, k in rc.phases)}, "
                f"region {region}, seed {rc.seed}")
        written = restorer.restore_files(args.inputs, args.output, args.threshold, args.batch, report=say,
                                         existing=existing, figure=figure, force=args.force,
                                         max_voxels=args.max_voxels, bids=args.bids)
        print(f"restored {len(written)} scans -> {args.output}")
        return
    threads = max(1, usable_cores() // nproc) if device.type == "cpu" and nproc > 1 else None
    job = RestoreJob(model=args.model, inputs=tuple(args.inputs), out_dir=args.output, rc=rc, backend=args.backend,
                     device=str(device), precision=args.precision, region=region, threshold=args.threshold,
                     batch=args.batch, existing=existing, figure=figure, force=args.force,
                     max_voxels=args.max_voxels, resolution=args.resolution, threads=threads,
                     bias_correction=args.bias_correction, register=args.register, bids=args.bids)
    job = check_job(model, job, whole_set=nproc > 1)     # the whole set, before any process starts writing
    results = (launch(restore_shard, nproc, job, hint="--continue skips the cases already written")
               if nproc > 1 else [restore_shard(job)])
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise IfadError("; ".join(errors))
    print(f"restored {sum(r['written'] for r in results)} scans -> {args.output}")     # under torchrun: this rank's


def cmd_calibrate(args):
    """`ifad-fast calibrate`: thresholds chosen on validation scans, stored in a copy of the model."""
    from .api.calibration import calibrate
    from .backends.factory import resolve_device
    from .benchmarks.accuracy import _data_scans
    from .layouts import find_cases
    from .model import save_model

    out = Path(args.output)
    if out.is_dir():
        raise IfadError(f"{out} is a folder; pass the model file to write, e.g. -o {out / 'model.pt'}")
    if out.exists() and not args.overwrite:
        raise IfadError(f"{out} exists; pass --overwrite to replace it, or another -o")
    cases = find_cases(args.validation, args.modality)
    device = resolve_device(args.device)
    model = load_model_arg(args.model, device)
    default = "fast" if model.config.variant == "2d" else "fast,local"
    schedules = tuple(s.strip() for s in (args.schedule or default).split(","))
    found = calibrate(model, lambda: _data_scans(cases, "validation", True, args.max_voxels, args.force), schedules,
                      args.backend, device, described=f"{len(cases)} validation cases of {args.validation}",
                      n_cases=len(cases), report=say)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    for schedule, row in found.items():
        print(f"{schedule}: threshold {row['threshold']:.4g} (validation [DICE] {row['dice_best']:.3f})")
    print(f"calibrated model -> {out}; restore with -m {out} --threshold")


def cmd_evaluate(args):
    """`ifad-fast evaluate`: the paper's metrics for maps and masks (folders, or --pairs CSV)."""
    from .api.evaluation import evaluate_folders
    from .metrics import format_table

    if args.output is not None:
        _output(args.output)
    result = evaluate_folders(args.scores, args.masks, args.val_scores, args.val_masks, args.output,
                              max_voxels=args.max_voxels, pairs=args.pairs, val_pairs=args.val_pairs)
    print(format_table(result, method=result["method"]))
    print(f"threshold {result['threshold']:.4g} chosen on the {result['threshold_source']}")


def cmd_synth(args):
    """`ifad-fast synth`: synthetic healthy and lesion brains."""
    from .extras import require
    from .synth import write_set

    require("nilearn")
    if args.healthy + args.lesions == 0:
        raise IfadError("ask for at least one case with --healthy N and/or --lesions M")
    _output(args.output)
    write_set(args.output, args.healthy, args.lesions, seed=args.seed, voxel_mm=args.voxel_mm,
              overwrite=args.overwrite, anatomy=args.anatomy, lesion_kind=args.lesion_kind)
    print(f"wrote {args.healthy} healthy and {args.lesions} {args.lesion_kind} lesion cases ({args.anatomy} anatomy) "
          f"-> {args.output}")


def cmd_demo(args):
    """`ifad-fast demo`: one synthetic case through the bundled model."""
    from .demo import run_demo
    from .extras import require

    require("nilearn")
    require("matplotlib")
    _output(args.output)
    run_demo(args.output, seed=args.seed, backend=args.backend, device=args.device)


_ACCURACY_ONLY = dict(model=None, train=None, epochs=None, acquisitions=None, n_test=None, n_val=None,
                      n_healthy=None, schedule="fast", vae_steps=None, compare=None, n_healthy_test=None,
                      healthy=None, test=None, validation=None, modality="t2")
_SYNTHETIC_ONLY = ("acquisitions", "n_test", "n_val", "n_healthy", "n_healthy_test")


def cmd_bench(args):
    """`ifad-fast bench`: the speed or accuracy benchmark."""
    from .extras import require

    on_data = args.what == "accuracy" and any(v is not None for v in (args.healthy, args.test, args.validation))
    if not on_data:
        require("nilearn")                          # both synthesise their scans
    if args.what == "accuracy" and args.output is not None:
        require("matplotlib")                       # accuracy.png, written last
    if args.output is not None:
        _output(args.output)
    if args.what == "speed":
        given = [k for k, default in _ACCURACY_ONLY.items() if getattr(args, k) != default]
        if given:
            raise IfadError(f"--{given[0].replace('_', '-')} is an option of 'bench accuracy', not 'bench speed'")
        from .benchmarks.accuracy import speed
        speed(quick=args.quick, backend=args.backend, device=args.device, out_dir=args.output)
    else:
        from .benchmarks.accuracy import accuracy
        if args.model is not None and args.train is not None:
            raise IfadError("pass either --model (a trained model) or --train PRESET, not both")
        if args.epochs is not None and args.train is None:
            raise IfadError("--epochs goes with --train PRESET")
        if on_data:
            return _bench_on_data(args)
        accuracy(quick=args.quick, backend=args.backend, device=args.device, out_dir=args.output,
                 model=args.model, train=args.train, epochs=args.epochs, acquisitions=args.acquisitions,
                 n_test=args.n_test, n_val=args.n_val, n_healthy=args.n_healthy, schedule=args.schedule,
                 vae_steps=args.vae_steps, compare=args.compare, n_healthy_test=args.n_healthy_test)


def _bench_on_data(args):
    """`bench accuracy --healthy DIR --test DIR [--validation DIR]`: the protocol on the user's data."""
    from .benchmarks.accuracy import accuracy_on_data

    if args.healthy is None or args.test is None:
        raise IfadError("--healthy DIR and --test DIR go together (--validation DIR is optional)")
    given = [k for k in _SYNTHETIC_ONLY if getattr(args, k) is not None]
    if given:
        raise IfadError(f"--{given[0].replace('_', '-')} is for the synthetic protocol; with --healthy/--test every "
                        "scan given is used")
    accuracy_on_data(args.healthy, args.test, args.validation, args.modality, model=args.model, train=args.train,
                     epochs=args.epochs, backend=args.backend, device=args.device, schedule=args.schedule,
                     vae_steps=args.vae_steps or (300 if args.quick else None), out_dir=args.output,
                     compare=args.compare)


COMMANDS = dict(prepare=cmd_prepare, train=cmd_train, restore=cmd_restore, evaluate=cmd_evaluate,
                calibrate=cmd_calibrate, synth=cmd_synth, demo=cmd_demo, bench=cmd_bench)

if __name__ == "__main__":
    sys.exit(main())
