"""Datasplit CSVs and where the data is: reading and validating a CellMap datasplit CSV (errors name the row
and the path), scanning a CellMap root and writing one, and resolving the data root (`--data-root`,
`$CELLMAP_DATA_ROOT`, the default, else the synthetic dataset generated on first use).

The CSV format is cellmap-data's (facts page, section 3): no header, every field quoted, 5 columns
(split, raw zarr, raw subpath, label zarr, label subpath ending in `/[class,class,...]`) or 3 (split, raw
path, label path). Reading it:
- relative paths are resolved against the CSV's own folder (not the working directory), so a CSV kept
  next to its data reads the same from anywhere; `write_datasplit` writes absolute paths;
- a UTF-8 byte order mark and spaces after the commas are accepted;
- a crop listed twice is refused: twice in one split it would count double, in both splits validation
  would score crops the model trained on; so are an empty class list and a CSV without a train or a
  validate row. Each error is one line naming the CSV, the row(s) and the fix.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from config_shenron import ALL_CLASSES, DEFAULT_CACHE_DIR, DEFAULT_DATA_ROOT, SYNTHETIC_DATA_DIR
from errors import DataError
from make_synthetic_data import SYNTHETIC_FORMAT_VERSION, generate
from ngff import box_intersection, read_levels

SPLITS = ("train", "validate")
RAW_SUBPATH = "recon-1/em/fibsem-uint8"
GROUNDTRUTH_SUBPATH = "recon-1/labels/groundtruth"


@dataclass(frozen=True)
class CropEntry:
    """One datasplit row: a labelled crop and the raw volume it lies in."""

    split: str
    raw_path: str      # multiscale group of the raw EM
    crop_path: str     # .../groundtruth/crop<N>
    classes: tuple[str, ...]  # classes annotated in this crop (the CSV's bracket list)
    row: int = 0

    @property
    def name(self) -> str:
        zarr_dir = Path(self.crop_path).parts
        dataset = next((p[:-5] for p in zarr_dir if p.endswith(".zarr")), "?")
        return f"{dataset}/{Path(self.crop_path).name}"


_BRACKET = re.compile(r"^(.*)/\[([^\]]*)\]$")


def read_datasplit(csv_path: str | Path, check_paths: bool = True) -> list[CropEntry]:
    """Parse and check a CellMap datasplit CSV (3- or 5-column quoted form; the rules are the module's);
    DataError naming the row(s) and the path."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"datasplit CSV not found: {csv_path} (write one with `python data.py write-csv`)")
    folder = csv_path.resolve().parent
    entries, listed = [], {}
    # utf-8-sig drops a byte order mark (spreadsheet exports write one); skipinitialspace reads `"a", "b"`
    # as two quoted fields instead of a field holding literal quotes.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        try:
            for row_no, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                entry, relative = _parse_row(row, row_no, csv_path, folder)
                _check_listed_once(entry, listed, csv_path)
                if check_paths:
                    try:
                        validate_entry(entry)
                    except DataError as err:
                        if relative:
                            err = f"{err} (relative paths in the CSV are resolved against its folder {folder})"
                        raise DataError(f"{csv_path} row {row_no}: {err}") from None
                entries.append(entry)
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{csv_path}: not a readable CSV ({err}); save it as UTF-8 text, one quoted row per "
                            f"line") from None
    if not entries:
        raise DataError(f"{csv_path}: no rows")
    for split in SPLITS:
        if not any(e.split == split for e in entries):
            raise DataError(f"{csv_path}: no '{split}' row (a run trains on 'train' crops and scores 'validate' crops: "
                            f"mark at least one row {split!r}, or write a split with `python data.py write-csv`)")
    return entries


def _parse_row(row: list[str], row_no: int, csv_path: Path, folder: Path) -> tuple[CropEntry, bool]:
    """One CSV row as a CropEntry with absolute paths (relative ones taken from `folder`), and whether any
    path was given relative."""
    where = f"{csv_path} row {row_no}"
    fields = [field.strip() for field in row]
    if len(fields) == 5:
        split, raw, crop = fields[0], os.path.join(fields[1], fields[2]), os.path.join(fields[3], fields[4])
    elif len(fields) == 3:
        split, raw, crop = fields
    else:
        raise DataError(f"{where}: expected 3 or 5 quoted fields, got {len(fields)} "
                        f"(quote every field: the class list contains commas)")
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    m = _BRACKET.match(crop)
    if not m:
        raise DataError(f"{where}: label path {crop!r} must end with /[class,class,...]")
    classes = tuple(c.strip() for c in m.group(2).split(",") if c.strip())
    if not classes:
        raise DataError(f"{where}: empty class list in {crop!r} (list the classes annotated in the crop, "
                        f"e.g. /[nuc,er_mem], or remove the row)")
    crop = m.group(1)
    relative = not (os.path.isabs(raw) and os.path.isabs(crop))

    def absolute(path: str) -> str:
        return path if os.path.isabs(path) else os.path.normpath(folder / path)

    return CropEntry(split, absolute(raw), absolute(crop), classes, row_no), relative


def _check_listed_once(entry: CropEntry, listed: dict[str, CropEntry], csv_path: Path) -> None:
    """DataError if the entry's crop was listed on an earlier row; records it otherwise."""
    first = listed.setdefault(os.path.normpath(entry.crop_path), entry)
    if first is entry:
        return
    rows = f"{csv_path} rows {first.row} and {entry.row}"
    if first.split == entry.split:
        raise DataError(f"{rows}: crop {entry.crop_path} is listed twice in {entry.split} (it would count double; "
                        f"remove one of the rows)")
    raise DataError(f"{rows}: crop {entry.crop_path} is in both train and validate (validating on a training crop "
                    f"inflates the metrics; keep it in one split)")


def validate_entry(entry: CropEntry) -> None:
    """Check that the raw group, the crop and every listed class exist with usable metadata (ngff.read_levels
    checks voxel sizes, axes and level shapes), and that the crop's class arrays cover the same box."""
    if not Path(entry.raw_path).is_dir():
        raise DataError(f"raw zarr group not found: {entry.raw_path}")
    raw_levels = read_levels(entry.raw_path)
    if raw_levels[0].dtype != "uint8":
        raise DataError(f"raw array {raw_levels[0].path} has dtype {raw_levels[0].dtype}, "
                        f"expected uint8 (point the CSV at recon-1/em/fibsem-uint8)")
    if not Path(entry.crop_path).is_dir():
        raise DataError(f"crop group not found: {entry.crop_path}")
    finest = {}
    for cls in entry.classes:
        class_path = Path(entry.crop_path) / cls
        if not class_path.is_dir():
            raise DataError(f"class {cls!r} is listed but missing on disk: {class_path} "
                            f"(remove it from the bracket list or regenerate the CSV)")
        lv = finest[cls] = read_levels(class_path)[0]
        if not np.issubdtype(np.dtype(lv.dtype), np.integer) and lv.dtype != "bool":
            raise DataError(f"label array {lv.path} has dtype {lv.dtype}, expected integer labels")
    first = entry.classes[0]
    reference = finest[first]
    for cls, lv in finest.items():
        # Annotations of one crop share its box; a class array elsewhere has a wrong translation or scale.
        tolerance = np.maximum(reference.scale, lv.scale) * (1 + 1e-6)
        if np.any(np.abs(np.subtract(lv.extent(), reference.extent())) > tolerance):
            raise DataError(f"crop {entry.crop_path}: class {cls!r} covers {lv.extent_text()} but class {first!r} "
                            f"covers {reference.extent_text()}; the class arrays of a crop must cover the same box "
                            f"(check their translation and scale)")


def find_datasets(root: str | Path) -> list[Path]:
    """Zarr containers laid out as <root>/<ds>/<ds>.zarr with raw EM inside."""
    root = Path(root)
    return sorted(p for p in root.glob("*/*.zarr") if (p / RAW_SUBPATH).is_dir())


def scan_crops(root: str | Path, classes: Sequence[str] = ALL_CLASSES,
               max_scale_nm: float | None = None) -> tuple[list[CropEntry], list[str]]:
    """Every crop under a CellMap root with the requested classes it annotates (split left empty), as the
    official make-datasplit finds them: a class array is kept when its finest voxel size is at most
    `max_scale_nm` on every axis (its check_scale), a crop with no class left is dropped. Returns the crops
    and one line per kind of thing dropped, with counts and an example."""
    crops, coarse, without, other = [], [], [], set()
    for zarr_dir in find_datasets(root):
        gt = zarr_dir / GROUNDTRUTH_SUBPATH
        for crop_dir in sorted(gt.glob("crop*"), key=lambda p: (len(p.name), p.name)):
            present = [d.name for d in crop_dir.iterdir() if (d / ".zattrs").is_file()]
            other.update(c for c in present if c not in classes)
            kept = []
            for cls in (c for c in classes if c in present):
                scale = read_levels(crop_dir / cls)[0].scale
                if max_scale_nm is not None and max(scale) > max_scale_nm * (1 + 1e-6):
                    coarse.append(f"{zarr_dir.stem}/{crop_dir.name}/{cls} at {' x '.join(f'{v:g}' for v in scale)} nm")
                else:
                    kept.append(cls)
            if kept:
                crops.append(CropEntry("", str(zarr_dir / RAW_SUBPATH), str(crop_dir), tuple(kept)))
            else:
                without.append(f"{zarr_dir.stem}/{crop_dir.name}")
    dropped = []
    if coarse:
        dropped.append(f"dropped {len(coarse)} class arrays coarser than --max-scale {max_scale_nm:g} nm "
                       f"(e.g. {coarse[0]})")
    if without:
        dropped.append(f"dropped {len(without)} crops with none of the requested classes left (e.g. {without[0]})")
    if other:
        dropped.append(f"left out {len(other)} classes that are not requested: {', '.join(sorted(other)[:8])}"
                       + (", ..." if len(other) > 8 else ""))
    return crops, dropped


def write_datasplit(root: str | Path, csv_path: str | Path, val_fraction: float = 0.15, seed: int = 0,
                    max_scale_nm: float | None = None, classes: Sequence[str] = ALL_CLASSES) -> tuple[Path, list[str]]:
    """Scan `root` (scan_crops), split the crops at random (seeded; about round(val_fraction x crops) validation
    crops, at least one per side; the official tool draws each crop's side independently instead), crops
    whose boxes overlap always on one side (overlap_groups), write the quoted CSV. Returns its path and the
    lines saying what was dropped or grouped."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in (0, 1)")
    crops, dropped = scan_crops(Path(root).absolute(), classes, max_scale_nm)  # absolute: rows stay valid anywhere
    if len(crops) < 2:
        raise DataError(f"{root}: found {len(crops)} labelled crop(s) with the requested classes; need at least 2 to "
                        f"split (expected <root>/<ds>/<ds>.zarr/{GROUNDTRUTH_SUBPATH}/crop*/<class>)")
    groups = overlap_groups(crops)
    val = set(validation_rows(groups, len(crops), val_fraction, seed, root))
    joined = [g for g in groups if len(g) > 1]
    if joined:
        example = ", ".join(crops[i].name for i in joined[0])
        dropped.append(f"kept {sum(map(len, joined))} crops that overlap in {len(joined)} group(s), each group in one "
                       f"split, so that validation never scores raw a training crop holds (e.g. {example})")
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")  # concurrent ranks may race here
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for i, c in enumerate(crops):
            zarr_dir = c.raw_path[: -len(RAW_SUBPATH) - 1]
            crop_rel = os.path.relpath(c.crop_path, zarr_dir)
            w.writerow(["validate" if i in val else "train", zarr_dir, RAW_SUBPATH, zarr_dir,
                        f"{crop_rel}/[{','.join(c.classes)}]"])
    os.replace(tmp, csv_path)
    return csv_path, dropped


def crop_box_nm(entry: CropEntry) -> tuple[np.ndarray, np.ndarray]:
    """The crop's box in world nm, [low, high) per axis (z, y, x), from its first class's finest level."""
    level = read_levels(Path(entry.crop_path) / entry.classes[0])[0]
    scale, first = np.array(level.scale), np.array(level.translation)  # translation: the first voxel's centre
    return first - scale / 2, first + scale * (np.array(level.shape) - 0.5)


def overlap_groups(crops: Sequence[CropEntry]) -> list[list[int]]:
    """Indices of `crops` grouped so that crops of one dataset whose boxes intersect share a group (transitively),
    in order of their first crop. The real download needs it: a coarse crop (crop 289, 1000^3 at 32 nm) holds
    a fine crop of its dataset (crop 266), and a split that puts them on two sides validates on raw and nuclei
    the model was trained on."""
    boxes = [crop_box_nm(c) for c in crops]
    group = list(range(len(crops)))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in range(len(crops)):
        for j in range(i + 1, len(crops)):
            if crops[i].raw_path == crops[j].raw_path and box_intersection(*boxes[i], *boxes[j]) is not None:
                group[find(j)] = find(i)
    members: dict[int, list[int]] = {}
    for i in range(len(crops)):
        members.setdefault(find(i), []).append(i)
    return list(members.values())


def validation_rows(groups: list[list[int]], n_crops: int, val_fraction: float, seed: int, root) -> list[int]:
    """The crops of the groups drawn for validation: groups in a seeded random order, each taken that keeps
    the validation side within round(val_fraction x crops); if none fits, the smallest group, as long as a
    crop is left for training. With every group a single crop this is the plain seeded draw of crops."""
    target = min(n_crops - 1, max(1, round(val_fraction * n_crops)))
    chosen: list[int] = []
    for g in np.random.default_rng(seed).permutation(len(groups)):
        if len(chosen) + len(groups[int(g)]) <= target:
            chosen += groups[int(g)]
    if not chosen:
        smallest = min(groups, key=len)
        if len(smallest) == n_crops:
            raise DataError(f"{root}: all {n_crops} crops overlap one another: no split keeps validation apart from "
                            f"training; add crops that do not overlap, or write the CSV by hand")
        chosen = smallest
    return chosen


# ----------------------------------------------------------------------------------------------------
# Where the data is
# ----------------------------------------------------------------------------------------------------
def has_cellmap_data(root: str | Path) -> bool:
    root = Path(root)
    return root.is_dir() and ((root / "datasplit.csv").is_file() or bool(find_datasets(root)))


def ensure_synthetic_data(directory: Path = SYNTHETIC_DATA_DIR, seed: int = 0) -> Path:
    """Generate the synthetic CellMap-format dataset on first use; returns its directory."""
    marker = directory / "SYNTHETIC_VERSION"
    directory.parent.mkdir(parents=True, exist_ok=True)
    # DDP ranks (and parallel commands) may all get here: one generates, the others wait on the lock.
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text().split()[0] == SYNTHETIC_FORMAT_VERSION:
            return directory
        if directory.exists():  # an interrupted or outdated generation: it is ours to replace
            shutil.rmtree(directory)
        generate(directory, seed=seed)
    return directory


def resolve_data_root(cli_value: str | None) -> tuple[Path, str | None]:
    """Data root from --data-root, else $CELLMAP_DATA_ROOT, else the default; the synthetic set only
    replaces the *unset* default. Returns (root, notice-or-None); DataError for a bad explicit root."""
    explicit = cli_value or os.environ.get("CELLMAP_DATA_ROOT")
    source = "--data-root" if cli_value else "$CELLMAP_DATA_ROOT"
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise DataError(f"{source} {root} does not exist (fix the path, or unset it to use the "
                            f"synthetic dataset)")
        if not has_cellmap_data(root):
            raise DataError(f"{source} {root} holds no CellMap data (expected datasplit.csv or "
                            f"<ds>/<ds>.zarr/{RAW_SUBPATH})")
        return root.resolve(), None
    if has_cellmap_data(DEFAULT_DATA_ROOT):
        return Path(DEFAULT_DATA_ROOT), None
    notice = (f"no CellMap data at {DEFAULT_DATA_ROOT}: using the synthetic dataset in "
              f"{SYNTHETIC_DATA_DIR} (set --data-root or $CELLMAP_DATA_ROOT for real data)")
    return ensure_synthetic_data().resolve(), notice


def datasplit_for(root: Path, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The root's datasplit.csv, or one written (seeded) into the cache folder for a root that has none."""
    own = root / "datasplit.csv"
    if own.is_file():
        return own
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    path = cache_dir / "datasplits" / f"{root.name}-{key}.csv"
    return path if path.is_file() else write_datasplit(root, path)[0]
