"""The scans of a data folder, and their ground truth, for `ifad-fast bench accuracy --healthy DIR
--test DIR [--validation DIR]`.

Folders are searched to any depth (hidden files and ifad-fast's outputs skipped) and read
without help in these layouts:

* ours: `<case>.nii.gz` beside its mask `<case>_mask.nii.gz`;
* BraTS: `<case>_t2.nii.gz` (`_flair`, `_t1`, `_t1ce` by `modality`) and `<case>_seg.nii.gz`, in
  one folder or a folder per case;
* HCP: `T2w_acpc_dc_restore_brain.nii.gz` (t1: `T1w_acpc_dc_restore_brain`) somewhere in each
  subject's folder, the case named by that folder (the first one under the data folder);
* BIDS: `sub-<id>[_ses-<s>]_T2w.nii.gz` (`_T1w`, `_FLAIR`) and a mask named as `evaluate` finds
  them (`_dseg`, `_desc-lesion_mask`, ...).

A mask is a file named as ground truth (`pairing.mask_key`: `_mask`, `_seg`, `_dseg`, `_label`,
...) whose key is the scan's name or its name without the modality suffix; labels > 0 are
lesion, a mask of zeros makes a healthy case. When some scans carry a modality suffix, only those
of `modality` are read. Otherwise, a CSV: the header `scan,mask` and a line per case (the mask may
be left empty where none is needed; relative paths start at the CSV's folder).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .errors import IfadError
from .io import NON_SCAN_SUFFIXES, describe_os_error
from .pairing import case_keys, mask_key, nifti_stem

#: The name endings of each modality (any letter case), BraTS's and BIDS's.
MODALITIES = {"t2": ("t2", "t2w"), "flair": ("flair",), "t1": ("t1", "t1w"), "t1ce": ("t1ce",)}
#: HCP's skull-stripped structural scans.
HCP_NAMES = {"t2": "T2w_acpc_dc_restore_brain", "t1": "T1w_acpc_dc_restore_brain"}
_LAYOUTS = "ours (<case> + <case>_mask), BraTS, HCP or BIDS, or a CSV of scan,mask"


@dataclass(frozen=True)
class Case:
    """One scan of a data set and its ground-truth mask (None: none is needed or none exists)."""

    name: str
    scan: Path
    mask: Path | None = None


def _nifti_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.rglob("*") if nifti_stem(p) is not None and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    except OSError as exc:
        raise IfadError(describe_os_error(exc, folder)) from None


def _modality(stem: str) -> str | None:
    last = stem.rpartition("_")[2].lower()
    return next((m for m, ends in MODALITIES.items() if last in ends), None)


def _scans(folder: Path, files: list[Path], modality: str) -> dict[str, Path]:
    """Case name -> scan of a folder's NIfTI files (HCP's named files, else the scans of `modality`
    where scans carry one, else every file that is neither a mask nor an output)."""
    hcp = [p for p in files if nifti_stem(p) == HCP_NAMES.get(modality)]
    if hcp:
        named = [(p.relative_to(folder).parts[0] if p.parent != folder else folder.name, p) for p in hcp]
    else:
        scans = [p for p in files if mask_key(nifti_stem(p)) is None
                 and not nifti_stem(p).lower().endswith(NON_SCAN_SUFFIXES)]
        if any(_modality(nifti_stem(p)) for p in scans):
            scans = [p for p in scans if _modality(nifti_stem(p)) == modality]
        named = [(case_keys(nifti_stem(p))[-1], p) for p in scans]
    out: dict[str, Path] = {}
    for name, p in named:
        if name in out:
            raise IfadError(f"two scans of case {name} in {folder}: {out[name]} and {p}; keep one, or list the "
                            "cases in a CSV of scan,mask")
        out[name] = p
    if not out:
        raise IfadError(f"{folder}: no {modality} scan found; pass --modality or a folder in a layout read "
                        f"without help: {_LAYOUTS}")
    return out


def find_cases(source, modality: str = "t2", masks: bool = True) -> list[Case]:
    """The cases of a data folder or CSV (module docstring), sorted by name; with `masks`, each with
    exactly one ground-truth mask (else IfadError naming the cases without one, or with two)."""
    source = Path(source)
    if modality not in MODALITIES:
        raise IfadError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")
    if source.is_file() and source.suffix.lower() == ".csv":
        return read_csv(source, masks)
    if not source.is_dir():
        raise IfadError(f"{source}: no such folder; pass a folder of scans ({_LAYOUTS})")
    files = _nifti_files(source)
    scans = _scans(source, files, modality)
    if not masks:
        return [Case(name, scans[name]) for name in sorted(scans)]
    candidates: dict[str, list[Path]] = {}
    for p in files:
        key = mask_key(nifti_stem(p))
        if key is not None:
            candidates.setdefault(key, []).append(p)
    found = {name: sorted({m for k in case_keys(nifti_stem(p)) + (name,) for m in candidates.get(k, ())})
             for name, p in scans.items()}
    missing = sorted(name for name, ms in found.items() if not ms)
    if missing:
        raise IfadError(f"no ground truth for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} in "
                        f"{source}; name each case's mask <case>_mask or _seg (a mask of zeros for a healthy scan), "
                        "or list the cases in a CSV of scan,mask")
    for name, ms in found.items():
        if len(ms) > 1:
            raise IfadError(f"{len(ms)} candidate masks for {name} in {source}: {', '.join(m.name for m in ms)}; "
                            "keep one, or list the cases in a CSV of scan,mask")
    return [Case(name, scans[name], found[name][0]) for name in sorted(scans)]


def read_csv(path: Path, masks: bool = True) -> list[Case]:
    """The cases of a CSV with the header `scan,mask` (the mask may be empty unless `masks`)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), 1)
                    if any(c.strip() for c in row)]
    except OSError as exc:
        raise IfadError(describe_os_error(exc, path)) from None
    except (UnicodeDecodeError, csv.Error):
        raise IfadError(f"{path}: not a readable CSV text file; pass lines of scan,mask") from None
    if not rows or [c.lower() for c in rows[0][1]] not in (["scan", "mask"], ["scan"]):
        raise IfadError(f"{path}: the first line must be the header scan,mask; then a line SCAN,MASK per case")
    cases: dict[str, Case] = {}
    for line, cells in rows[1:]:
        where = f"line {line} of {path}"
        files = [None if not c else Path(c) if Path(c).is_absolute() else path.parent / c for c in cells[:2]]
        if len(cells) > 2 or files[0] is None or (masks and (len(files) < 2 or files[1] is None)):
            raise IfadError(f"{where}: expected SCAN,MASK, got {','.join(cells)!r}")
        for f, what in zip(files, ("scan", "mask")):
            if f is not None and not f.is_file():
                raise IfadError(f"{f} ({what} on {where}): no such file; fix the path (relative paths start at the "
                                "CSV's folder)")
        name = case_keys(nifti_stem(files[0]) or files[0].name)[-1]
        if name in cases:
            raise IfadError(f"two scans of case {name} in {path}: {cases[name].scan} and {files[0]} ({where})")
        cases[name] = Case(name, files[0], files[1] if len(files) > 1 else None)
    if not cases:
        raise IfadError(f"{path}: no cases after the header; add a line SCAN,MASK per case")
    return [cases[name] for name in sorted(cases)]
