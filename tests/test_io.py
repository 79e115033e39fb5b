import gzip

import nibabel as nib
import numpy as np
import pytest

from ifad_fast.errors import IfadError
from ifad_fast.io import atomic_path, find_scans, load_scan, save_volume
from helpers import AFFINE, toy_brain, write_nifti


def test_load_3d_and_single_volume_4d(tmp_path):
    img, _ = toy_brain(0)
    a = load_scan(write_nifti(tmp_path / "a.nii.gz", img))
    b = load_scan(write_nifti(tmp_path / "b.nii", img[..., None]))
    assert a.data.shape == b.data.shape == img.shape
    assert a.data.dtype == np.float32
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, AFFINE)


def test_save_keeps_affine_and_header(tmp_path):
    img, _ = toy_brain(1)
    src = tmp_path / "src.nii.gz"
    nib.save(nib.Nifti1Image(img, AFFINE), str(src))
    scan = load_scan(src)
    out = save_volume(tmp_path / "out" / "x.nii.gz", scan.data * 2, scan.affine, scan.header)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, AFFINE)
    np.testing.assert_allclose(back.get_fdata(), img * 2, rtol=1e-6)
    assert back.get_data_dtype() == np.float32
    mask = save_volume(tmp_path / "m.nii.gz", img > 500, scan.affine, scan.header, dtype=np.uint8)
    assert nib.load(str(mask)).get_data_dtype() == np.uint8


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.nii.gz") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _bad_inputs(tmp_path):
    img, _ = toy_brain(2)
    cases = {}
    (tmp_path / "text.nii.gz").write_text("hello, not an image")
    cases["not a NIfTI"] = tmp_path / "text.nii.gz"
    good = write_nifti(tmp_path / "good.nii.gz", img)
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    cases["truncated"] = tmp_path / "trunc.nii.gz"
    cases["2D"] = write_nifti(tmp_path / "flat.nii.gz", img[:, :, 5])
    cases["4D with several volumes"] = write_nifti(tmp_path / "series.nii.gz", np.stack([img, img], -1))
    cases["all zeros"] = write_nifti(tmp_path / "zeros.nii.gz", np.zeros_like(img))
    nan = img.copy()
    nan[3, 3, 3] = np.nan
    cases["NaN"] = write_nifti(tmp_path / "nan.nii.gz", nan)
    inf = img.copy()
    inf[3, 3, 3] = np.inf
    cases["Inf"] = write_nifti(tmp_path / "inf.nii.gz", inf)
    cases["complex dtype"] = write_nifti(tmp_path / "cplx.nii.gz", img.astype(np.complex64))
    return cases


def test_malformed_inputs_raise_project_error(tmp_path):
    for what, path in _bad_inputs(tmp_path).items():
        with pytest.raises(IfadError) as info:
            load_scan(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message, what
    with pytest.raises(IfadError):
        load_scan(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("what", ["not a NIfTI", "truncated", "2D", "4D with several volumes", "all zeros",
                                  "NaN", "Inf", "complex dtype"])
def test_cli_malformed_input_exits_2_with_one_line(tmp_path, capsys, what):
    from ifad_fast.cli import main

    path = _bad_inputs(tmp_path)[what]
    out = tmp_path / "out"
    code = main(["prepare", str(path), "-o", str(out), "--resolution", "8", "--centres", "hcp-t2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("ifad-fast prepare: error:")
    assert not out.exists() or not any(p.name.endswith(".nii.gz") for p in out.iterdir())


def test_find_scans(tmp_path, scan_dir):
    assert len(find_scans([scan_dir])) == 4
    with pytest.raises(IfadError, match="no NIfTI"):
        find_scans([tmp_path / "healthy" / ".."]) if False else find_scans([_empty(tmp_path)])
    with pytest.raises(IfadError, match="no such"):
        find_scans([tmp_path / "nope"])


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_save_json_never_writes_nan(tmp_path):
    import json
    from ifad_fast.io import save_json
    path = save_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2.5)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": 2.5}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_output_set_is_all_or_nothing(tmp_path):
    from ifad_fast.io import OutputSet, save_json
    with pytest.raises(KeyboardInterrupt):
        with OutputSet() as outputs:
            save_volume(outputs.add(tmp_path / "a.nii.gz"), np.ones((3, 3, 3)), AFFINE)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with OutputSet() as outputs:
        save_volume(outputs.add(tmp_path / "a.nii.gz"), np.ones((3, 3, 3)), AFFINE)
        save_json(outputs.add(tmp_path / "a.json"), {"done": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.nii.gz"]
    assert oct((tmp_path / "a.nii.gz").stat().st_mode & 0o777) != oct(0o600)


def test_stale_temporaries_are_cleaned_live_ones_kept_none_read_as_scans(tmp_path, scan_dir):
    import os
    import subprocess
    import sys
    from ifad_fast.io import clean_stale_temporaries, is_temporary
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = scan_dir / f".h0.nii.gz.{dead.pid}-abcd1234.part.nii.gz"
    old_style = scan_dir / ".h1.nii.gz.k2j3h4g5.part.nii.gz"
    live = scan_dir / f".h2.nii.gz.{os.getpid()}-zzzz9999.part.nii.gz"
    for p in (stale, old_style, live):
        p.write_bytes(b"partial")
        assert is_temporary(p)
    assert not is_temporary(scan_dir / "h0.nii.gz")
    assert len(find_scans([scan_dir])) == 4
    assert sorted(clean_stale_temporaries(scan_dir)) == sorted([stale, old_style])
    assert live.exists() and not stale.exists()
    with pytest.raises(IfadError, match="temporary"):
        find_scans([live])


def test_find_scans_names_are_unique(tmp_path):
    img, _ = toy_brain(0)
    a = write_nifti(_mkdir(tmp_path / "p1") / "t2.nii.gz", img)
    b = write_nifti(_mkdir(tmp_path / "p2") / "t2.nii.gz", img)
    assert find_scans([a, a, tmp_path / "p1"]) == [a]              # the same file twice is one case
    with pytest.raises(IfadError, match="both be named 't2'") as info:
        find_scans([a, b])
    assert str(a) in str(info.value) and str(b) in str(info.value)


def _mkdir(p):
    p.mkdir()
    return p


def test_background_check_tells_skull_stripped_from_not():
    from ifad_fast.io import background_problem
    img, _ = toy_brain(3)
    assert background_problem(img, 1.0 / 1000) is None
    noisy = img + np.random.default_rng(0).normal(40, 5, img.shape).astype(np.float32)
    assert "border" in background_problem(noisy)
    cropped = img[img.any((1, 2))][:, img.any((0, 2))][:, :, img.any((0, 1))]   # cropped tight to the brain
    assert background_problem(cropped) is None
    assert "larger than any brain" in background_problem(img, voxel_ml=1.0)    # 1 mL voxels: litres of "brain"


def test_save_volume_on_another_grid_sets_both_forms(tmp_path):
    img, _ = toy_brain(1)
    src = tmp_path / "src.nii.gz"
    nifti = nib.Nifti1Image(img, AFFINE)
    nifti.set_qform(AFFINE, code=1)
    nifti.set_sform(AFFINE, code=4)
    nib.save(nifti, str(src))
    scan = load_scan(src)
    other = AFFINE @ np.diag([2.0, 2, 2, 1])
    back = nib.load(str(save_volume(tmp_path / "o.nii.gz", img[::2, ::2, ::2], other, scan.header)))
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 4
    np.testing.assert_allclose(back.header.get_qform(), other, atol=1e-5)
    np.testing.assert_allclose(back.header.get_sform(), other, atol=1e-5)
