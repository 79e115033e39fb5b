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

import pytest

import ifad_fast
from ifad_fast.cli import main
from conftest import toy_brain, write_nifti
from test_cli_hardening import cli, leftovers, one_error_line, scan

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
