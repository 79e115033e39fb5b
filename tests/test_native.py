"""The package as users meet it: install (wheel, extras), messages, progress, help, outputs."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ifad_fast
from ifad_fast.cli import main
from helpers import FAST, cli, leftovers, one_error_line, scan, toy_brain, write_nifti

ROOT = Path(__file__).resolve().parents[1]


def _sha(folder: Path) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in leftovers(folder)}


# ------------------------------------------------------------------------------ install


def _setuptools_version():
    if importlib.util.find_spec("setuptools") is None:
        return None
    import setuptools
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2])


def test_wheel_builds_without_warnings_and_holds_the_bundled_model(tmp_path):
    """The PEP 517 build that `pip wheel --no-deps --no-build-isolation` runs, under `python -W error`
    (no deprecated license table, no package missing from the configuration), on a copy of the source."""
    version = _setuptools_version()
    if version is None or version < (77, 0):
        pytest.skip(f"setuptools>=77 (pyproject.toml's build backend) is not installed (found {version})")
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ifad_fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-W", "error", "-c",
                            f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path)!r}))"],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = tmp_path / build.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert "ifad_fast/data/default_model.pt" in names and "ifad_fast/kernels/__init__.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_importing_the_engine_imports_neither_nilearn_nor_matplotlib():
    code = ("import sys, ifad_fast, ifad_fast.api, ifad_fast.cli\n"
            "print(sorted(m for m in ('nilearn', 'matplotlib') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("command, missing, extra", [
    (["synth", "--healthy", "1", "--lesions", "0"], "nilearn", "data"),
    (["demo"], "nilearn", "data"),
    (["demo"], "matplotlib", "figures"),
    (["bench", "speed", "--quick"], "nilearn", "data"),
])
def test_a_command_without_its_extra_names_the_extra_to_install(capsys, monkeypatch, tmp_path, command, missing,
                                                                extra):
    monkeypatch.setitem(sys.modules, missing, None)          # as if not installed
    out = tmp_path / "out"
    code, _, err = cli(capsys, *command, "-o", out)
    assert code == 2
    assert one_error_line(err, command[0]) == (f'ifad-fast {command[0]}: error: this needs {missing}: '
                                               f'pip install "ifad-fast[{extra}]"')
    assert leftovers(out) == []


def test_restore_figure_without_matplotlib_is_refused_before_any_work(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    scans = tmp_path / "scans"
    scan(scans, "a")
    before = _sha(scans)
    code, _, err = cli(capsys, "restore", scans, "-o", tmp_path / "out", "--figure", "--device", "cpu")
    assert code == 2
    assert one_error_line(err, "restore").endswith('this needs matplotlib: pip install "ifad-fast[figures]"')
    assert leftovers(tmp_path / "out") == [] and _sha(scans) == before


def test_the_package_docstring_example_runs_on_a_small_scan(tmp_path, monkeypatch):
    """`help(ifad_fast)`'s example, as written, with the bundled model (a 2-step schedule for speed)."""
    from ifad_fast import config as cfg

    monkeypatch.setitem(cfg.SCHEDULES, "fast", dict(cfg.SCHEDULES["fast"], phases=((2, 256),)))
    monkeypatch.chdir(tmp_path)
    img, _ = toy_brain(0)
    write_nifti(tmp_path / "scan.nii.gz", img)
    example = textwrap.dedent(ifad_fast.__doc__.split("\n\n", 1)[1])
    assert "restore_array(model, nib.load(\"scan.nii.gz\"))" in example
    scope: dict = {}
    exec(example, scope)
    assert scope["result"].anomaly.shape == img.shape and scope["result"].restoration.shape == img.shape


# ------------------------------------------------------------------------------ progress and messages

def _restore(capsys, tiny_run, tmp_path, *extra, n=2):
    scans = tmp_path / "scans"
    for i in range(n):
        scan(scans, f"s{i}", seed=i)
    return cli(capsys, "restore", scans, "-o", tmp_path / "out", "-m", tiny_run / "run" / "model.pt", *FAST, *extra)


def test_progress_off_a_terminal_is_lines_with_stage_step_and_eta(capsys, tiny_run, tmp_path, monkeypatch):
    from ifad_fast import progress

    monkeypatch.setitem(progress.INTERVAL, "normal", 0.0)      # a line at every step instead of every 30 s
    code, out, err = _restore(capsys, tiny_run, tmp_path, n=1)
    assert code == 0, err
    steps = [line for line in out.splitlines() if line.startswith("restore: ")]
    assert steps[0].startswith("restore: 1/10 step (10 %), ") and "ETA" in steps[0]
    assert steps[-1].startswith("restore: 10/10 step (100 %)")
    assert "\r" not in out + err and "it/s" not in out + err          # no tqdm bar in a log


def test_progress_lines_come_at_a_steady_interval_not_every_step(monkeypatch, capsys):
    from ifad_fast import progress

    clock = iter(range(0, 1000, 7))                                # 7 s per step
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
    for _ in progress.progress_bar(range(20), desc="train", unit="epoch"):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["train: 5/20 epoch (25 %)", "train: 10/20 epoch (50 %)",
                                                     "train: 15/20 epoch (75 %)", "train: 20/20 epoch (100 %)"]


def test_quiet_prints_only_the_final_summary(capsys, tiny_run, tmp_path):
    code, out, err = _restore(capsys, tiny_run, tmp_path, "--quiet")
    assert code == 0 and err == ""
    assert out.splitlines() == [f"restored 2 scans -> {tmp_path / 'out'}"]


def test_verbose_prints_the_settings_it_resolved(capsys, tiny_run, tmp_path):
    code, out, _ = _restore(capsys, tiny_run, tmp_path, "-v", n=1)
    assert code == 0
    assert "restoring with the torch backend on cpu (float32, host pipeline), schedule 10x256" in out


def test_every_command_takes_quiet_and_verbose():
    from ifad_fast.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    required = dict(prepare=["x", "-o", "o"], train=["x", "-o", "o"], restore=["x"], synth=["-o", "o"],
                    bench=["speed"], calibrate=["x", "-o", "o.pt"])
    for name in commands:
        for flag, level in (("-q", "quiet"), ("--quiet", "quiet"), ("-v", "verbose"), ("--verbose", "verbose")):
            assert parser.parse_args([name, *required.get(name, []), flag]).verbosity == level


@pytest.mark.parametrize("command", ["restore", "prepare"])
def test_a_failing_single_scan_prints_its_message_once(capsys, tiny_run, tmp_path, command):
    scans = tmp_path / "scans"
    scans.mkdir()
    noisy = toy_brain(0)[0] + np.random.default_rng(0).uniform(50, 60, (30, 34, 28)).astype(np.float32)
    write_nifti(scans / "noisy.nii.gz", noisy)                           # refused: not skull-stripped
    before = _sha(scans)
    options = dict(restore=["-m", tiny_run / "run" / "model.pt", *FAST],
                   prepare=["--preset", "tiny", "--centres", "hcp-t2"])[command]
    code, out, err = cli(capsys, command, scans / "noisy.nii.gz", "-o", tmp_path / "out", *options)
    line = one_error_line(err, command)
    message = line.split("error: ", 1)[1]
    assert code == 2 and message not in out
    assert leftovers(tmp_path / "out") == [] and _sha(scans) == before


def test_no_command_prints_the_help_on_stderr_and_exits_2(capsys):
    code, out, err = cli(capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: ifad-fast") and "restore" in err and "evaluate" in err


def test_every_option_has_help_and_says_its_default():
    from ifad_fast.cli import build_parser

    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    synth = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["synth"]._actions}
    assert "default 8" in synth["healthy"] and "default 4" in synth["lesions"]
    train = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["train"]._actions}
    assert "GPU-sized" in train["preset"] and "small" in train["preset"]


# ------------------------------------------------------------------------------ outputs


def test_the_demo_folder_evaluates_as_it_is(capsys, tmp_path, monkeypatch):
    """The demo's ground truth is named as ground truth (<case>_mask), so evaluate pairs it."""
    from ifad_fast import config as cfg

    monkeypatch.setitem(cfg.SCHEDULES, "fast", dict(cfg.SCHEDULES["fast"], phases=((2, 256),)))   # speed only
    out = tmp_path / "demo"
    code, _, err = cli(capsys, "demo", "-o", out, "--device", "cpu")
    assert code == 0, err
    assert (out / "lesion_0000_mask.nii.gz").is_file() and not list(out.glob("*_truth*"))
    code, table, err = cli(capsys, "evaluate", "--scores", out, "--masks", out, "-o", out)
    assert code == 0, err
    assert "[DICE]" in table and json.loads((out / "metrics.json").read_text())["n_cases"] == 1


def test_restore_records_provenance_with_relative_paths_and_the_run_arguments(capsys, tiny_run, tmp_path):
    from datetime import datetime

    import numpy
    import torch

    scans, out = tmp_path / "in", tmp_path / "out"
    scan(scans, "a")
    scan(scans, "b", seed=1)
    args = ["restore", str(scans), "-m", str(tiny_run / "run" / "model.pt"), "-o", str(out), *FAST, "--threshold",
            "0.5"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    model_file = os.path.relpath(tiny_run / "run" / "model.pt", out)
    for case in ("a", "b"):
        summary = json.loads((out / f"{case}_restore.json").read_text())
        assert summary["command"] == "ifad-fast " + " ".join(args)
        assert datetime.fromisoformat(summary["date"]).tzinfo is not None
        assert summary["versions"]["torch"] == torch.__version__ and summary["versions"]["numpy"] == numpy.__version__
        assert summary["versions"]["ifad_fast"] == ifad_fast.__version__
        assert summary["source"] == f"../in/{case}.nii.gz" and summary["model"]["file"] == model_file
        assert summary["input_sha256"] == hashlib.sha256((scans / f"{case}.nii.gz").read_bytes()).hexdigest()
        recorded = json.dumps({k: v for k, v in summary.items() if k != "command"})   # the command as typed
        assert str(tmp_path) not in recorded and str(tiny_run) not in recorded        # no absolute paths
    run = json.loads((out / "restore_args.json").read_text())
    assert run["command"] == "ifad-fast " + " ".join(args) and run["inputs"] == ["../in"]
    assert run["threshold"] == 0.5 and run["model"]["file"] == model_file and run["schedule"] == [[10, 256]]


# ------------------------------------------------------------------------------ one input check for the CLI and the API


def _with_scalp(seed=0):
    """A toy brain wrapped in a bright one-voxel (5.5-6.5 mm) ring of 'scalp', background zero."""
    from scipy import ndimage

    img, _ = toy_brain(seed)
    ring = ndimage.binary_dilation(img != 0) & (img == 0)
    img[ring] = 1000.0
    return img


def _tiny_restorer(tiny_run):
    from ifad_fast.api import Restorer
    from ifad_fast.model import load_model

    return Restorer(load_model(tiny_run / "run"), "torch", "cpu", schedule="10x256")


def test_the_api_refuses_a_scan_the_cli_refuses_unless_forced(tiny_run):
    from ifad_fast.errors import IfadError, IfadWarning
    from helpers import AFFINE

    img, _ = toy_brain(0)
    noisy = img + np.random.default_rng(0).uniform(50, 60, img.shape).astype(np.float32)
    restorer = _tiny_restorer(tiny_run)
    with pytest.raises(IfadError, match="volume 0: does not look skull-stripped .*--force"):
        restorer.restore_array(noisy, AFFINE)
    with pytest.warns(IfadWarning, match="going on because of --force"):
        assert restorer.restore_array(noisy, AFFINE, force=True).anomaly.shape == img.shape


def test_the_api_takes_a_4d_image_with_one_volume_as_the_cli_does(tiny_run):
    import nibabel as nib
    from helpers import AFFINE

    img, _ = toy_brain(1)
    restorer = _tiny_restorer(tiny_run)
    four_d = restorer.restore_array(nib.Nifti1Image(img[..., None], AFFINE))
    np.testing.assert_array_equal(four_d.anomaly, restorer.restore_array(img, AFFINE).anomaly)


def test_scalp_left_around_the_brain_is_refused_unless_forced(capsys, tiny_run, tmp_path):
    from ifad_fast.io import background_problem

    img = _with_scalp()
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "scalp.nii.gz", img)
    before = _sha(scans)
    code, _, err = cli(capsys, "restore", scans, "-o", tmp_path / "out", "-m", tiny_run / "run", *FAST)
    assert code == 2 and "scalp left around the brain" in one_error_line(err, "restore")
    assert leftovers(tmp_path / "out") == [] and _sha(scans) == before
    code, _, err = cli(capsys, "restore", scans, "-o", tmp_path / "out", "-m", tiny_run / "run", *FAST, "--force")
    assert code == 0 and "warning: " in err and "scalp left around the brain" in err
    assert _sha(scans) == before
    for seed in range(6):                                        # the brains alone pass
        assert background_problem(toy_brain(seed)[0], None, (6.0, 5.5, 6.5)) is None


# ------------------------------------------------------------------------------ BIDS and other layouts


def test_restore_finds_the_t2w_scans_of_a_bids_root_given_with_i(capsys, tiny_run, tmp_path):
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.9.0"}')
    scan(root / "sub-01" / "anat", "sub-01_T2w")
    scan(root / "sub-01" / "anat", "sub-01_T1w", seed=1)                          # another modality: not taken
    scan(root / "sub-02" / "ses-1" / "anat", "sub-02_ses-1_T2w", seed=2)
    scan(root / "derivatives" / "x" / "sub-01" / "anat", "sub-01_desc-x_T2w", seed=3)   # derivatives: not taken
    out = tmp_path / "out"
    code, _, err = cli(capsys, "restore", "-i", root, "-o", out, "-m", tiny_run / "run", *FAST)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*_restore.json")) == ["sub-01_T2w_restore.json",
                                                                  "sub-02_ses-1_T2w_restore.json"]


def test_restore_bids_writes_a_derivative_data_set(capsys, tiny_run, tmp_path):
    """--bids: each case's outputs under its sub-/ses-/anat folder with BIDS-derivative names (the map's
    JSON sidecar last), dataset_description.json as a derivative; --continue then skips both cases, a
    plain re-run is refused in one line, and the predicted mask is never taken for ground truth."""
    from ifad_fast.pairing import mask_key

    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.9.0"}')
    scan(root / "sub-01" / "anat", "sub-01_T2w")
    scan(root / "sub-02" / "ses-1" / "anat", "sub-02_ses-1_T2w", seed=2)
    out = tmp_path / "derivatives" / "ifad"
    args = ["restore", "-i", root, "-o", out, "-m", tiny_run / "run", "--bids", "--threshold", "1.0", *FAST]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    for folder, case in (("sub-01/anat", "sub-01_T2w"), ("sub-02/ses-1/anat", "sub-02_ses-1_T2w")):
        names = sorted(p.name for p in (out / folder).iterdir())
        assert names == sorted(f"{case}_desc-{n}" for n in ("anomaly_map.nii.gz", "anomaly_map.json",
                                                             "restoration_map.nii.gz", "anomaly_mask.nii.gz"))
        sidecar = json.loads((out / folder / f"{case}_desc-anomaly_map.json").read_text())
        assert sidecar["case"] == case and sidecar["files"]["anomaly"] == f"{case}_desc-anomaly_map.nii.gz"
        assert mask_key(f"{case}_desc-anomaly_mask") is None
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "ifad-fast"
    stale = out / "sub-01" / "anat" / ".sub-01_T2w_desc-anomaly_map.999999999-x.part.nii.gz"   # a killed run's
    stale.write_bytes(b"partial")
    code, out_text, err = cli(capsys, *args, "--continue")
    assert code == 0 and "2 of 2 cases already done" in out_text + err, err
    assert not stale.exists()
    code, _, err = cli(capsys, *args)
    assert code == 2 and "already holds outputs of sub-01_T2w" in one_error_line(err, "restore")


def test_upper_case_extensions_are_scans(capsys, tiny_run, tmp_path):
    img, _ = toy_brain(0)
    (tmp_path / "in").mkdir()
    write_nifti(tmp_path / "in" / "CASE1.NII.GZ", img)
    write_nifti(tmp_path / "in" / "CASE2.NII", img)
    code, _, err = cli(capsys, "restore", tmp_path / "in", "-o", tmp_path / "out", "-m", tiny_run / "run", *FAST)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*_restore.json")) == ["CASE1_restore.json",
                                                                                "CASE2_restore.json"]


def test_inputs_positional_or_with_i_but_at_least_one(capsys, tmp_path):
    code, _, err = cli(capsys, "restore", "-o", tmp_path / "out")
    assert code == 2 and "scan" in one_error_line(err, "restore")
    assert leftovers(tmp_path / "out") == []
