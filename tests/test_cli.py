"""End to end through the CLI on tiny volumes, and every user error: exit 2, one line, no output."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from ifad_fast.cli import main
from helpers import AFFINE, cli, toy_brain, write_nifti


def test_prepare_train_restore_evaluate(tiny_run, tmp_path, capsys):
    root = tiny_run
    assert (root / "run" / "model.pt").is_file() and (root / "run" / "loss.jsonl").is_file()
    lesions, masks = tmp_path / "lesions", tmp_path / "masks"
    lesions.mkdir(), masks.mkdir()
    shapes = {}
    for i in range(2):
        img, mask = toy_brain(10 + i, shape=(26 + i, 30, 28), lesion=True)
        write_nifti(lesions / f"case{i}.nii.gz", img)
        write_nifti(masks / f"case{i}_mask.nii.gz", mask)
        shapes[f"case{i}"] = img.shape
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "restore", lesions, "-m", root / "run", "-o", out, "--threshold", "0.5",
                            "--schedule", "20x256", "--backend", "torch", "--device", "cpu")
    assert code == 0, err
    assert "case0" in stdout and "case1" in stdout
    for name, shape in shapes.items():
        for suffix, dtype in (("anomaly", np.float32), ("restoration", np.float32), ("pred-mask", np.uint8)):
            img = nib.load(str(out / f"{name}_{suffix}.nii.gz"))
            assert img.shape == shape and img.get_data_dtype() == dtype
            np.testing.assert_allclose(img.affine, AFFINE)
        assert json.loads((out / f"{name}_restore.json").read_text())["backend"] == "torch"
    code, stdout, err = cli(capsys, "evaluate", "--scores", out, "--masks", masks, "-o", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dice_best", "dice_mean", "dice_std", "ap", "auroc", "fpr95", "threshold", "n_cases"):
        assert key in metrics
    assert metrics["n_cases"] == 2 and "[DICE]" in stdout
    assert metrics["method"] == "IF 3D (ifad-fast)" and "IF 3D (ifad-fast)" in stdout     # from the restore JSONs


def test_resume_through_cli(tiny_run, tmp_path, capsys):
    prep = tiny_run / "prep"
    code, _, err = cli(capsys, "train", prep, "-o", tmp_path / "r", "--preset", "tiny", "--epochs", "2", "--device", "cpu")
    assert code == 0
    code, _, err = cli(capsys, "train", prep, "-o", tmp_path / "r", "--preset", "tiny", "--epochs", "2", "--device", "cpu")
    assert code == 2 and "--resume" in err
    code, _, err = cli(capsys, "train", prep, "-o", tmp_path / "r", "--preset", "tiny", "--epochs", "3",
                       "--device", "cpu", "--resume")
    assert code == 0, err
    assert len((tmp_path / "r" / "loss.jsonl").read_text().splitlines()) == 3


def _user_errors(root, tmp_path):
    scan = write_nifti(tmp_path / "scan.nii.gz", toy_brain(5)[0])
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "junk.pt").write_text("junk")
    model = root / "run"
    return {
        "missing model": ["restore", scan, "-m", tmp_path / "nope.pt", "-o", tmp_path / "o1"],
        "wrong model file": ["restore", scan, "-m", tmp_path / "junk.pt", "-o", tmp_path / "o2"],
        "folder with no scans": ["restore", empty, "-m", model, "-o", tmp_path / "o3"],
        "unknown device": ["restore", scan, "-m", model, "-o", tmp_path / "o4", "--device", "tpu"],
        "cuda without a GPU": ["restore", scan, "-m", model, "-o", tmp_path / "o5", "--device", "cuda"],
        "unknown backend": ["restore", scan, "-m", model, "-o", tmp_path / "o6", "--backend", "fortran",
                            "--device", "cpu"],
        "bad schedule": ["restore", scan, "-m", model, "-o", tmp_path / "o7", "--schedule", "soon"],
        "unknown preset": ["train", root / "prep", "-o", tmp_path / "o8", "--preset", "huge"],
        "train on empty folder": ["train", empty, "-o", tmp_path / "o9", "--preset", "tiny"],
        "unpaired masks": ["evaluate", "--scores", root, "--masks", empty],
    }


@pytest.mark.parametrize("what", ["missing model", "wrong model file", "folder with no scans", "unknown device",
                                  "cuda without a GPU", "unknown backend", "bad schedule", "unknown preset",
                                  "train on empty folder", "unpaired masks"])
def test_user_errors_exit_2_with_one_line(tiny_run, tmp_path, capsys, what):
    import torch
    if what == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so asking for cuda is not an error here")
    args = _user_errors(tiny_run, tmp_path)[what]
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err
    outs = [p for p in tmp_path.glob("o*") if p.is_dir()]
    assert all(not any(q.suffix == ".gz" for q in p.iterdir()) for p in outs)


def test_console_script_help_and_version():
    out = subprocess.run([sys.executable, "-m", "ifad_fast.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("prepare", "train", "restore", "evaluate", "bench", "synth", "demo"):
        assert command in out.stdout
    out = subprocess.run([sys.executable, "-m", "ifad_fast.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "ifad-fast" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ifad_fast.cli", "restore", "/nonexistent.nii.gz", "-m", "x.pt"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_synth_voxel_mm(tmp_path, capsys):
    """`synth --voxel-mm` sets the voxel size in mm (`--resolution` is the grid size elsewhere)."""
    code, out, _ = cli(capsys, "synth", "-o", tmp_path / "s", "--healthy", 1, "--lesions", 0, "--voxel-mm", 4)
    assert code == 0 and "1 healthy" in out
    img = nib.load(tmp_path / "s" / "healthy" / "healthy_0000.nii.gz")
    assert np.allclose(img.header.get_zooms(), (4.0, 4.0, 4.0))
    code, _, err = cli(capsys, "synth", "-o", tmp_path / "t", "--healthy", 1, "--voxel-mm", 0.1)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "t" / "healthy").exists()
    assert main(["synth", "-o", str(tmp_path / "u"), "--resolution", "2"]) == 2


def test_bench_help_names_every_acquisition(capsys, monkeypatch):
    """`bench --help` lists the acquisitions by hand (the CLI does not import the table, which
    needs torch): it names each one, the held-out ones after "held-out"."""
    from ifad_fast.acquisition import ACQUISITIONS, HELD_OUT

    monkeypatch.setenv("COLUMNS", "1000")    # no line wrapping inside a name
    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    listed = text.split("(default all: ")[1].split(")")[0].replace(" and the held-out styles ", ",")
    standard, held_out = listed.split(",enlarged,folded,")[0], listed.split(",folded,")[1]
    assert set(listed.split(",")) == set(ACQUISITIONS) and set(held_out.split(",")) == set(HELD_OUT), listed
    assert not set(standard.split(",")) & set(HELD_OUT)


def test_synth_anatomy(tmp_path, capsys):
    """`synth --anatomy folded` records the anatomy in the manifest (and each case's folding
    parameters); the default is mni; an unknown anatomy is one error line and no output."""
    code, out, err = cli(capsys, "synth", "-o", tmp_path / "f", "--healthy", 1, "--lesions", 0, "--voxel-mm", 4,
                         "--anatomy", "folded")
    assert code == 0 and "folded anatomy" in out, err
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["anatomy"] == "folded"
    case = manifest["cases"]["healthy_0000"]
    assert case["anatomy"] == "folded" and 4.0 <= case["gyral_width_mm"] <= 8.0
    code, _, _ = cli(capsys, "synth", "-o", tmp_path / "m", "--healthy", 1, "--lesions", 0, "--voxel-mm", 4)
    assert code == 0 and json.loads((tmp_path / "m" / "manifest.json").read_text())["anatomy"] == "mni"
    code, _, err = cli(capsys, "synth", "-o", tmp_path / "mix", "--healthy", 2, "--lesions", 0, "--voxel-mm", 4,
                       "--anatomy", "mixed")
    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    assert code == 0 and manifest["anatomy"] == "mixed", err
    assert [manifest["cases"][f"healthy_000{i}"]["anatomy"] for i in range(2)] == ["mni", "folded"]
    code, _, err = cli(capsys, "synth", "-o", tmp_path / "x", "--healthy", 1, "--voxel-mm", 4, "--anatomy", "mni152")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_maps_method_names_what_made_the_maps(tmp_path):
    """evaluate's method label: from the cases' <case>_restore.json (no variant = IF 3D), none = 'anomaly maps'."""
    from ifad_fast.api import maps_method

    assert maps_method(tmp_path, ["a", "b"]) == "anomaly maps"
    (tmp_path / "a_restore.json").write_text(json.dumps({"case": "a", "variant": "2d"}))
    (tmp_path / "b_restore.json").write_text(json.dumps({"case": "b"}))
    (tmp_path / "c_restore.json").write_text("{not json")
    assert maps_method(tmp_path, ["a"]) == "IF 2D (ifad-fast)"
    assert maps_method(tmp_path, ["b", "c"]) == "IF 3D (ifad-fast)"
    assert maps_method(tmp_path, ["a", "b"]) == "IF 3D + IF 2D (ifad-fast)"
