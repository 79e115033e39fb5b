"""The bundled model and `ifad-fast demo`, end to end."""
import json

import nibabel as nib
import numpy as np

from ifad_fast.api import default_model
from ifad_fast.cli import main


def test_bundled_model_loads_with_its_provenance():
    model = default_model()
    assert model.config.hidden == 256 and model.preprocess.resolution == 96
    assert model.info["threshold"] > 0 and "bundle_model.sh" in model.info["reproduce"]
    assert len(model.latents) == 64 and "--anatomy mixed" in model.info["trained_on"]   # bench/bundle_model.sh


def test_demo_writes_maps_figure_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "demo.json").read_text())
    for key in ("scan", "truth", "anomaly", "restoration", "mask", "figure"):
        assert (out / report["files"][key]).name in {p.name for p in out.iterdir()}
    scan = nib.load(report["files"]["scan"])
    anomaly = nib.load(report["files"]["anomaly"])
    assert anomaly.shape == scan.shape
    np.testing.assert_allclose(anomaly.affine, scan.affine)
    assert (out / report["files"]["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the lesion must stand out: a detector no better than chance would give AUROC ~0.5
    assert report["auroc"] > 0.9 and 0.0 <= report["dice"] <= 1.0
    assert "Dice" in capsys.readouterr().out
