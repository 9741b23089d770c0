"""Datasplit CSVs and where the data is: reading and validating a CellMap datasplit CSV (errors name the row
and the path), scanning a CellMap root and writing one, and resolving the data root (`--data-root`,
`$CELLMAP_DATA_ROOT`, the default, else the synthetic dataset generated on first use).

The CSV format is cellmap-data's (facts page, section 3): no header, every field quoted, 5 columns
(split, raw zarr, raw subpath, label zarr, label subpath ending in `/[class,class,...]`) or 3 (split, raw
path, label path).
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

import numpy as np

from config_shenron import ALL_CLASSES, DEFAULT_CACHE_DIR, DEFAULT_DATA_ROOT, SYNTHETIC_DATA_DIR
from errors import DataError
from make_synthetic_data import SYNTHETIC_FORMAT_VERSION, generate
from ngff import read_levels

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
    """Parse a CellMap datasplit CSV (3- or 5-column quoted form); DataError names row and path."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"datasplit CSV not found: {csv_path} (write one with `python data.py write-csv`)")
    entries = []
    with open(csv_path, newline="") as f:
        for row_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{csv_path} row {row_no}"
            if len(row) == 5:
                split, raw, crop = row[0], os.path.join(row[1], row[2]), os.path.join(row[3], row[4])
            elif len(row) == 3:
                split, raw, crop = row
            else:
                raise DataError(f"{where}: expected 3 or 5 quoted fields, got {len(row)} "
                                f"(quote every field: the class list contains commas)")
            split = split.strip()
            if split not in SPLITS:
                raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            m = _BRACKET.match(crop.strip())
            if not m:
                raise DataError(f"{where}: label path {crop!r} must end with /[class,class,...]")
            classes = tuple(c.strip() for c in m.group(2).split(",") if c.strip())
            entry = CropEntry(split, raw.strip(), m.group(1), classes, row_no)
            if check_paths:
                try:
                    validate_entry(entry)
                except DataError as err:
                    raise DataError(f"{where}: {err}") from None
            entries.append(entry)
    if not entries:
        raise DataError(f"{csv_path}: no rows")
    return entries


def validate_entry(entry: CropEntry) -> None:
    """Check that the raw group, the crop and every listed class exist with usable metadata."""
    if not Path(entry.raw_path).is_dir():
        raise DataError(f"raw zarr group not found: {entry.raw_path}")
    raw_levels = read_levels(entry.raw_path)
    if raw_levels[0].dtype != "uint8":
        raise DataError(f"raw array {raw_levels[0].path} has dtype {raw_levels[0].dtype}, "
                        f"expected uint8 (point the CSV at recon-1/em/fibsem-uint8)")
    if not Path(entry.crop_path).is_dir():
        raise DataError(f"crop group not found: {entry.crop_path}")
    for cls in entry.classes:
        class_path = Path(entry.crop_path) / cls
        if not class_path.is_dir():
            raise DataError(f"class {cls!r} is listed but missing on disk: {class_path} "
                            f"(remove it from the bracket list or regenerate the CSV)")
        lv = read_levels(class_path)[0]
        if not np.issubdtype(np.dtype(lv.dtype), np.integer) and lv.dtype != "bool":
            raise DataError(f"label array {lv.path} has dtype {lv.dtype}, expected integer labels")


def find_datasets(root: str | Path) -> list[Path]:
    """Zarr containers laid out as <root>/<ds>/<ds>.zarr with raw EM inside."""
    root = Path(root)
    return sorted(p for p in root.glob("*/*.zarr") if (p / RAW_SUBPATH).is_dir())


def scan_crops(root: str | Path, max_scale_nm: float | None = None) -> list[CropEntry]:
    """Every crop under a CellMap root with the classes annotated in it (split left empty)."""
    crops = []
    for zarr_dir in find_datasets(root):
        gt = zarr_dir / GROUNDTRUTH_SUBPATH
        for crop_dir in sorted(gt.glob("crop*"), key=lambda p: (len(p.name), p.name)):
            classes = sorted((d.name for d in crop_dir.iterdir() if (d / ".zattrs").is_file()),
                             key=lambda c: (ALL_CLASSES.index(c) if c in ALL_CLASSES else 999, c))
            if not classes:
                continue
            if max_scale_nm is not None:
                finest = min(max(read_levels(crop_dir / c)[0].scale) for c in classes)
                if finest > max_scale_nm:
                    continue
            crops.append(CropEntry("", str(zarr_dir / RAW_SUBPATH), str(crop_dir), tuple(classes)))
    return crops


def write_datasplit(root: str | Path, csv_path: str | Path, val_fraction: float = 0.15, seed: int = 0,
                    max_scale_nm: float | None = None) -> Path:
    """Scan `root`, split crops at random (seeded; at least one crop per side), write the quoted CSV."""
    crops = scan_crops(root, max_scale_nm)
    if len(crops) < 2:
        raise DataError(f"{root}: found {len(crops)} labelled crop(s); need at least 2 to split "
                        f"(expected <root>/<ds>/<ds>.zarr/{GROUNDTRUTH_SUBPATH}/crop*/<class>)")
    order = np.random.default_rng(seed).permutation(len(crops))
    n_val = min(len(crops) - 1, max(1, round(val_fraction * len(crops))))
    val = set(order[:n_val].tolist())
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
    return csv_path


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
    return path if path.is_file() else write_datasplit(root, path)
