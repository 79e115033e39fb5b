"""Which ground-truth mask goes with each anomaly map, for `evaluate`.

From folders: each `<case>_anomaly.nii.gz` of the scores folder pairs with the one file of the
masks folder named `<key><suffix>`, where the suffix marks ground truth (`GROUND_TRUTH_SUFFIXES`:
_mask, _seg, _dseg, _label, _labels, _lesion, _truth; .nii or .nii.gz in any letter case) and the
key is the case or the case without its modality suffix (`BraTS_001_t2` -> `BraTS_001`; BIDS:
its suffix entity, `sub-01_T2w` -> `sub-01`). In BIDS mask names desc-, label- and space-
entities are ignored (`sub-01_desc-lesion_mask` -> `sub-01`). So the masks folder may be the
scans' own folder: nothing else in it is ever a mask -- not a scan (a bare case name), not one
of our outputs. A case with no such mask, or more than one, is refused.

From a CSV (`--pairs`): a header line `map,mask`, then a line per case; relative paths start at
the CSV's folder.

Labels > 0 are lesion. A mask must look like a label map (whole numbers >= 0, at most
MAX_LABELS distinct values), so that a scan can never be used as ground truth.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import IfadError
from .io import BIDS_OUTPUT_FILES, GROUND_TRUTH_SUFFIXES, OUTPUT_FILES, describe_os_error, header_shape, read_volume
from .limits import check_memory

#: Modality suffixes stripped from a map's case name to find its mask (any letter case).
MODALITIES = ("t1", "t1ce", "t2", "flair", "t1w", "t2w")
#: More distinct values than this and a "mask" is taken for a scan.
MAX_LABELS = 64
_BIDS_IGNORED = ("desc-", "label-", "space-")
_MAP = OUTPUT_FILES["anomaly"].split(".")[0]                       # _anomaly
_OURS = tuple(names[k].split(".")[0].lower() for names in (OUTPUT_FILES, BIDS_OUTPUT_FILES)
              for k in ("anomaly", "restoration", "mask"))
_FOLDER_HINT = "pass --pairs FILE.csv (header map,mask) naming each case's mask"


@dataclass(frozen=True)
class Pair:
    """One case: its anomaly map and its ground-truth mask; `source`: the CSV line that named them."""

    name: str
    map: Path
    mask: Path
    source: str | None = None

    @property
    def summary(self) -> Path:
        """The <case>_restore.json that restore wrote beside the map (it may not exist)."""
        return self.map.parent / f"{self.name}{OUTPUT_FILES['summary']}"


def nifti_stem(path) -> str | None:
    """The name without .nii / .nii.gz (any letter case); None for other files."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return None


def _is_bids(name: str) -> bool:
    return name.startswith("sub-")


def case_keys(case: str) -> tuple[str, ...]:
    """The names a case's mask may carry before its suffix: the case, and the case without its
    modality suffix (`BraTS_001_t2` -> `BraTS_001`) or BIDS suffix entity (`sub-01_T2w` -> `sub-01`)."""
    head, _, last = case.rpartition("_")
    if head and (last.lower() in MODALITIES or (_is_bids(case) and "-" not in last)):
        return case, head
    return (case,)


def mask_key(stem: str) -> str | None:
    """The case key of a ground-truth name (`BraTS_001_seg` -> `BraTS_001`, `sub-01_desc-lesion_mask`
    -> `sub-01`), or None when `stem` is not one."""
    low = stem.lower()
    if low.endswith(_OURS):
        return None
    suffix = next((s for s in GROUND_TRUTH_SUFFIXES if low.endswith(s)), None)
    if suffix is None:
        return None
    key = stem[: -len(suffix)]
    if _is_bids(key):
        key = "_".join(part for part in key.split("_") if not part.startswith(_BIDS_IGNORED))
    return key or None


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise IfadError(f"{folder}: no such folder; pass folders of anomaly maps and masks, or --pairs FILE.csv")
    try:
        return sorted(p for p in folder.iterdir()
                      if nifti_stem(p) is not None and not p.name.startswith(".") and p.is_file())
    except OSError as exc:
        raise IfadError(describe_os_error(exc, folder)) from None


def pair_folders(scores_dir, masks_dir) -> list[Pair]:
    """Each <case>_anomaly map of `scores_dir` with its one ground-truth mask in `masks_dir`
    (see the module docstring); IfadError naming the cases with none or with several."""
    scores_dir, masks_dir = Path(scores_dir), Path(masks_dir)
    maps = {stem[: -len(_MAP)]: p for p in _nifti_files(scores_dir)
            if (stem := nifti_stem(p)).lower().endswith(_MAP)}
    if not maps:
        raise IfadError(f"{scores_dir}: no <case>_anomaly.nii.gz files; run 'ifad-fast restore' first")
    candidates: dict[str, list[Path]] = {}
    for p in _nifti_files(masks_dir):
        stem = nifti_stem(p)
        key = None if stem in maps else mask_key(stem)          # a scan named like its case is never a mask
        if key is not None:
            candidates.setdefault(key, []).append(p)
    found = {name: sorted({m for k in case_keys(name) for m in candidates.get(k, ())}) for name in sorted(maps)}
    missing = [name for name, masks in found.items() if not masks]
    if missing:
        raise IfadError(f"no mask for {', '.join(missing)} in {masks_dir}; name each case's ground truth "
                        "<case>_mask, _seg, _label or BIDS _dseg (.nii.gz), or " + _FOLDER_HINT)
    for name, masks in found.items():
        if len(masks) > 1:
            raise IfadError(f"{len(masks)} candidate masks for {name} in {masks_dir}: "
                            f"{', '.join(m.name for m in masks)}; rename all but its own, or {_FOLDER_HINT}")
    return [Pair(name, maps[name], masks[0]) for name, masks in found.items()]


def read_pairs(path) -> list[Pair]:
    """The pairs of a CSV: a header line `map,mask`, then `MAP,MASK` per case (relative paths start
    at the CSV's folder). A case is named by its map (`p1_anomaly.nii.gz` -> `p1`)."""
    path = Path(path)
    if not path.is_file():
        raise IfadError(f"{path}: no such file; pass a CSV with a header line map,mask and a line per case")
    try:
        rows = []                                  # (line number, stripped cells), blank lines skipped
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(c.strip() for c in row):
                    rows.append((reader.line_num, [c.strip() for c in row]))
    except OSError as exc:
        raise IfadError(describe_os_error(exc, path)) from None
    except (UnicodeDecodeError, csv.Error):
        raise IfadError(f"{path}: not a readable CSV text file; pass lines of map,mask") from None
    if not rows or [c.lower() for c in rows[0][1]] != ["map", "mask"]:
        raise IfadError(f"{path}: the first line must be the header map,mask; then a line MAP,MASK per case")
    pairs: dict[str, Pair] = {}
    for line, cells in rows[1:]:
        where = f"line {line} of {path}"
        if len(cells) != 2 or not all(cells):
            raise IfadError(f"{where}: expected MAP,MASK, got {','.join(cells)!r}")
        files = [p if p.is_absolute() else path.parent / p for p in map(Path, cells)]
        for f, what in zip(files, ("map", "mask")):
            if not f.is_file():
                raise IfadError(f"{f} ({what} on {where}): no such file; fix the path (relative paths start at "
                                "the CSV's folder)")
        stem = nifti_stem(files[0]) or files[0].name
        name = stem[: -len(_MAP)] if stem.lower().endswith(_MAP) else stem
        if name in pairs:
            raise IfadError(f"two maps of case {name} in {path}: {pairs[name].map} ({pairs[name].source}) and "
                            f"{files[0]} ({where}); evaluate each case once")
        pairs[name] = Pair(name, files[0], files[1], where)
    if not pairs:
        raise IfadError(f"{path}: no pairs after the header; add a line MAP,MASK per case")
    return list(pairs.values())


def case_pairs(scores_dir=None, masks_dir=None, pairs=None, option: str = "") -> list[Pair]:
    """The pairs of the CSV `pairs`, or those found in the `scores_dir` and `masks_dir` folders;
    option: the CLI options' prefix in messages ('' or 'val-')."""
    o = f"--{option}"
    if pairs is not None:
        if scores_dir is not None or masks_dir is not None:
            raise IfadError(f"pass either {o}pairs FILE.csv or {o}scores and {o}masks folders, not both")
        return read_pairs(pairs)
    if scores_dir is None or masks_dir is None:
        raise IfadError(f"pass both {o}scores and {o}masks folders, or {o}pairs FILE.csv")
    return pair_folders(scores_dir, masks_dir)


def label_problem(mask: np.ndarray) -> str | None:
    """Why `mask` does not look like a label map (whole numbers >= 0, at most MAX_LABELS distinct
    values), or None."""
    values = np.unique(mask)
    if len(values) <= MAX_LABELS and values[0] >= 0 and np.array_equal(values, np.round(values)):
        return None
    if len(values) > MAX_LABELS:
        return f"{len(values)} distinct values"
    return f"{len(values)} distinct values, not all whole numbers >= 0"


def load_cases(pairs: list[Pair], max_voxels: int | None = None
               ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(names, anomaly maps, boolean masks: labels > 0) of `pairs`. Shapes and memory are
    checked from the headers before any voxel is read; every mask must look like a label map."""
    total = 0
    for p in pairs:
        shape = header_shape(p.map, max_voxels, "anomaly map")
        mshape = header_shape(p.mask, max_voxels, "mask")
        if shape != mshape:
            raise IfadError(f"{p.mask}: mask shape {mshape} differs from its map {p.map} {shape}; "
                            "pass the mask of this case on the scan's grid")
        total += int(np.prod(shape))
    check_memory(total * 10, f"evaluating {len(pairs)} cases ({total:,} voxels)",
                 "evaluate fewer cases at a time or use a machine with more memory")
    scores, masks = [], []
    for p in pairs:
        score = read_volume(p.map, max_voxels, "anomaly map")
        if not np.isfinite(score).all():
            raise IfadError(f"{p.map}: the anomaly map holds NaN or Inf; restore this case again")
        mask = read_volume(p.mask, max_voxels, "mask")
        problem = label_problem(mask)
        if problem:
            fix = f"name its lesion mask (labels > 0) on {p.source}" if p.source else _FOLDER_HINT
            raise IfadError(f"{p.mask} does not look like a label map ({problem}); {fix}")
        scores.append(score)
        masks.append(mask > 0)
    return [p.name for p in pairs], scores, masks
