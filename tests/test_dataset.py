"""Training volumes stored once: prepare's volumes.npy / brains.npy, memory-mapped, or stacks built in the run cache."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ifad_fast import config as cfg
from ifad_fast.dataset import MANIFEST, STACKS, load_prepared, prepare_scans, training_volumes


def _nifti(folder, manifest, key):
    return np.stack([np.asarray(nib.load(str(folder / c["files"][key])).dataobj) for c in manifest["cases"]])


def test_prepare_writes_stacks_equal_to_the_nifti_files_and_training_maps_them(tmp_path, scan_dir):
    out = tmp_path / "prep"
    pc = cfg.replace(cfg.get_preset("tiny").preprocess, resolution=16)
    manifest = prepare_scans([scan_dir], out, pc, 2, k=6, progress=False)
    assert manifest["stacks"] == STACKS and not list(out.glob(".*part*"))
    volumes, brains, names, centres, _ = training_volumes(out, pc, None, tmp_path / "cache", progress=False)
    for stack, name, key in ((volumes, STACKS["classes"], "classes"), (brains, STACKS["brains"], "brain")):
        assert isinstance(stack, np.memmap) and Path(stack.filename) == (out / name).resolve()
        assert not stack.flags.writeable and stack.dtype == np.uint8 and stack.shape == (4, 16, 16, 16)
        np.testing.assert_array_equal(stack, _nifti(out, manifest, key))
    assert brains.any() and (brains <= 1).all()
    assert names == [c["name"] for c in manifest["cases"]] and len(centres) == 6
    assert not (tmp_path / "cache").exists()                # nothing copied


def test_a_folder_without_stacks_gets_them_in_the_cache_rebuilt_when_the_manifest_changes(tmp_path, scan_dir):
    out, cache = tmp_path / "prep", tmp_path / "cache"
    pc = cfg.replace(cfg.get_preset("tiny").preprocess, resolution=16)
    prepare_scans([scan_dir], out, pc, 2, k=6, progress=False)
    for name in STACKS.values():                             # as prepared by an older version
        (out / name).unlink()
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["stacks"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    classes, brains, _, _ = load_prepared(out)
    assert not isinstance(classes, np.memmap)
    np.testing.assert_array_equal(classes, _nifti(out, manifest, "classes"))
    np.testing.assert_array_equal(brains, _nifti(out, manifest, "brain") > 0)

    first = load_prepared(out, cache)
    assert all(isinstance(a, np.memmap) for a in first[:2])
    assert Path(first[0].filename) == (cache / STACKS["classes"]).resolve()
    np.testing.assert_array_equal(first[0], classes)
    np.testing.assert_array_equal(first[1], brains)
    stamp = (cache / STACKS["classes"]).stat().st_mtime_ns
    load_prepared(out, cache)
    assert (cache / STACKS["classes"]).stat().st_mtime_ns == stamp        # reused

    manifest["cases"] = manifest["cases"][:2]                 # the folder changed: rebuilt
    (out / MANIFEST).write_text(json.dumps(manifest))
    second, second_brains, names, _ = load_prepared(out, cache)
    assert second.shape == second_brains.shape == (2, 16, 16, 16) and len(names) == 2
    np.testing.assert_array_equal(second, classes[:2])
