"""`ifad-fast` command line: every command is one call into the library.

User errors (IfadError) print one line on stderr and exit 2, with no traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .errors import IfadError


def _add_engine_args(p, backend=True):
    if backend:
        p.add_argument("--backend", default="auto", help="auto | triton | torch | cpu (default auto)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ifad-fast", description="Implicit-field anomaly detection for brain MRI.")
    parser.add_argument("--version", action="version", version=f"ifad-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", help="encode scans as intensity-class volumes on the model grid")
    p.add_argument("inputs", nargs="+", help="NIfTI files or folders")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--resolution", type=int, default=160, help="model grid size (default 160)")
    p.add_argument("--centres", default=None, help="JSON file of centres, or hcp-t2 (default: fit on the inputs)")
    p.add_argument("--fit-centres", action="store_true", help="fit k-means centres on the inputs (the default)")
    p.add_argument("--classes", type=int, default=10, help="number of classes when fitting (default 10)")
    p.add_argument("--mode-pool", type=int, choices=(1, 2, 3), default=2, help="mode-pool window (default 2)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", help="train the auto-decoder on healthy scans")
    p.add_argument("data", help="folder of healthy NIfTI scans, or the output of 'prepare'")
    p.add_argument("-o", "--output", required=True, help="run folder (model.pt, checkpoint.pt, loss.jsonl)")
    p.add_argument("--preset", default="paper", help="paper | small | tiny (default paper)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prior", choices=("paper", "reference", "none"), default=None, help="latent prior")
    p.add_argument("--centres", default=None, help="JSON file of centres or hcp-t2 (default: fit on the data)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_engine_args(p, backend=False)

    p = sub.add_parser("restore", help="anomaly maps for scans (restoration by latent search)")
    p.add_argument("inputs", nargs="+", help="NIfTI scans or folders")
    p.add_argument("-m", "--model", default=None, help="model.pt or run folder (default: the bundled model)")
    p.add_argument("-o", "--output", default="ifad_out", help="output folder (default ifad_out)")
    p.add_argument("--schedule", default="fast", help="fast | paper | reference | STEPSxPOINTS[,...] (default fast)")
    p.add_argument("--threshold", type=float, default=None, help="also write a binary <case>_mask.nii.gz")
    p.add_argument("--precision", choices=("float32", "bf16"), default="float32")
    p.add_argument("--region", choices=("brain", "full"), default="brain",
                   help="score voxels near the brain only (default) or the full grid")
    p.add_argument("--batch", type=int, default=1, help="scans restored together (default 1)")
    p.add_argument("--seed", type=int, default=0)
    _add_engine_args(p)

    p = sub.add_parser("evaluate", help="the paper's metrics for anomaly maps against lesion masks")
    p.add_argument("--scores", required=True, help="folder of <case>_anomaly.nii.gz")
    p.add_argument("--masks", required=True, help="folder of <case>_mask.nii.gz or <case>.nii.gz")
    p.add_argument("--val-scores", default=None, help="validation anomaly maps (threshold chosen there)")
    p.add_argument("--val-masks", default=None)
    p.add_argument("-o", "--output", default=None, help="folder for metrics.json")

    p = sub.add_parser("synth", help="synthesise healthy and lesion brains from the MNI152 maps")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--healthy", type=int, default=8)
    p.add_argument("--lesions", type=int, default=4)
    p.add_argument("--resolution", type=float, default=1.5, help="voxel size in mm (default 1.5)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="synthesise a lesion case, restore it with the bundled model, plot it")
    p.add_argument("-o", "--output", default="ifad_demo")
    p.add_argument("--seed", type=int, default=0)
    _add_engine_args(p)

    p = sub.add_parser("bench", help="speed and accuracy benchmarks")
    p.add_argument("what", choices=("speed", "accuracy"))
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats, for development")
    p.add_argument("-o", "--output", default=None, help="folder for the report (json)")
    _add_engine_args(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args) or 0
    except IfadError as exc:
        print(f"ifad-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ifad-fast {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_prepare(args):
    from . import config as cfg
    from .dataset import prepare_scans
    from .preprocess import IntensityEncoder

    if args.resolution < 4:
        raise IfadError("--resolution must be at least 4")
    encoder = None if (args.fit_centres or args.centres is None) else IntensityEncoder.load(args.centres)
    manifest = prepare_scans(args.inputs, args.output, cfg.PreprocessConfig(resolution=args.resolution),
                             args.mode_pool, encoder, k=args.classes, seed=args.seed)
    print(f"prepared {len(manifest['cases'])} scans at {args.resolution}³ -> {args.output}")


def cmd_train(args):
    import torch

    from . import config as cfg
    from .backends import resolve_device
    from .dataset import training_volumes
    from .train import Trainer

    preset = cfg.get_preset(args.preset)
    tc = cfg.replace(preset.train, epochs=args.epochs, seed=args.seed, prior=args.prior)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.output)
    if (out / "checkpoint.pt").exists() and not args.resume:
        raise IfadError(f"{out} already holds a training run; pass --resume to continue it or choose another -o")
    volumes, names, centres = training_volumes(args.data, preset.preprocess, args.centres, out / "cache",
                                               k=preset.model.n_classes, seed=tc.seed)
    if len(centres) != preset.model.n_classes:
        raise IfadError(f"{len(centres)} intensity centres but the {args.preset} model has "
                        f"{preset.model.n_classes} classes; pass matching --centres")
    trainer = Trainer(torch.from_numpy(volumes), preset.model, tc, preset.preprocess, centres, device, names)
    if args.resume:
        trainer.load(out)
    t0 = time.perf_counter()
    trainer.run(tc.epochs, out)
    print(f"trained {args.preset} model on {len(names)} volumes for {trainer.epoch} epochs "
          f"({time.perf_counter() - t0:.0f} s), final loss {trainer.log[-1]['loss']:.4f} -> {out / 'model.pt'}")


def load_model_arg(spec, device):
    from .api import default_model
    from .model import load_model

    if spec is None:
        model = default_model(device)
        print("using the bundled default model (small preset, trained on synthetic MNI152 brains); "
              "train your own with 'ifad-fast train' and pass -m", file=sys.stderr)
        return model
    return load_model(spec, device)


def cmd_restore(args):
    from .api import restore_config, restore_files
    from .backends import resolve_device

    device = resolve_device(args.device)
    model = load_model_arg(args.model, device)
    rc = restore_config(model, args.schedule, seed=args.seed)
    restore_files(model, args.inputs, args.output, rc, args.backend, device, args.precision,
                  args.region, args.threshold, args.batch)


def cmd_evaluate(args):
    from .api import evaluate_folders
    from .metrics import format_table

    if bool(args.val_scores) != bool(args.val_masks):
        raise IfadError("pass both --val-scores and --val-masks, or neither")
    result = evaluate_folders(args.scores, args.masks, args.val_scores, args.val_masks, args.output)
    print(format_table(result))
    print(f"threshold {result['threshold']:.4g} chosen on the {result['threshold_source']}")


def cmd_synth(args):
    from .synth import write_set

    if args.healthy < 0 or args.lesions < 0 or args.healthy + args.lesions == 0:
        raise IfadError("ask for at least one case with --healthy N and/or --lesions M")
    write_set(args.output, args.healthy, args.lesions, seed=args.seed, voxel_mm=args.resolution)
    print(f"wrote {args.healthy} healthy and {args.lesions} lesion cases -> {args.output}")


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.output, seed=args.seed, backend=args.backend, device=args.device)


def cmd_bench(args):
    if args.what == "speed":
        from .benchmark import speed
        speed(quick=args.quick, backend=args.backend, device=args.device, out_dir=args.output)
    else:
        from .benchmark import accuracy
        accuracy(quick=args.quick, backend=args.backend, device=args.device, out_dir=args.output)


COMMANDS = dict(prepare=cmd_prepare, train=cmd_train, restore=cmd_restore, evaluate=cmd_evaluate,
                synth=cmd_synth, demo=cmd_demo, bench=cmd_bench)

if __name__ == "__main__":
    sys.exit(main())
