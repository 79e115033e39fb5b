"""Training volumes stored once: prepare's volumes.npy, memory-mapped, or a stack built in the run cache."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ifad_fast import config as cfg
from ifad_fast.dataset import MANIFEST, STACK, load_prepared, prepare_scans, training_volumes


def _nifti_classes(folder, manifest):
    return np.stack([np.asarray(nib.load(str(folder / f"{c['name']}_classes.nii.gz")).dataobj)
                     for c in manifest["cases"]])


def test_prepare_writes_a_stack_equal_to_the_nifti_classes_and_training_maps_it(tmp_path, scan_dir):
    out = tmp_path / "prep"
    pc = cfg.PreprocessConfig(resolution=16)
    manifest = prepare_scans([scan_dir], out, pc, 2, k=6, progress=False)
    assert manifest["stack"] == STACK and not list(out.glob(".*part*"))
    volumes, names, centres = training_volumes(out, pc, None, tmp_path / "cache", progress=False)
    assert isinstance(volumes, np.memmap) and Path(volumes.filename) == (out / STACK).resolve()
    assert not volumes.flags.writeable and volumes.dtype == np.uint8 and volumes.shape == (4, 16, 16, 16)
    np.testing.assert_array_equal(volumes, _nifti_classes(out, manifest))
    assert names == [c["name"] for c in manifest["cases"]] and len(centres) == 6
    assert not (tmp_path / "cache").exists()                # nothing copied


def test_a_folder_without_a_stack_gets_one_in_the_cache_rebuilt_when_the_manifest_changes(tmp_path, scan_dir):
    out, cache = tmp_path / "prep", tmp_path / "cache"
    pc = cfg.PreprocessConfig(resolution=16)
    prepare_scans([scan_dir], out, pc, 2, k=6, progress=False)
    (out / STACK).unlink()                                   # as prepared by an older version
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["stack"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    in_memory, _, _ = load_prepared(out)
    assert not isinstance(in_memory, np.memmap)
    np.testing.assert_array_equal(in_memory, _nifti_classes(out, manifest))

    first, _, _ = load_prepared(out, cache)
    assert isinstance(first, np.memmap) and Path(first.filename) == (cache / STACK).resolve()
    np.testing.assert_array_equal(first, in_memory)
    stamp = (cache / STACK).stat().st_mtime_ns
    load_prepared(out, cache)
    assert (cache / STACK).stat().st_mtime_ns == stamp        # reused

    manifest["cases"] = manifest["cases"][:2]                 # the folder changed: rebuilt
    (out / MANIFEST).write_text(json.dumps(manifest))
    second, names, _ = load_prepared(out, cache)
    assert second.shape == (2, 16, 16, 16) and len(names) == 2
    np.testing.assert_array_equal(second, in_memory[:2])
