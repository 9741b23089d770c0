"""The toolkit's data module: datasplit CSVs, the crop cache, patch sampling, validation tiles, load report.

Pipeline (nnU-Net style: preprocess once, then sample fast):
1. `read_datasplit` parses and validates a CellMap datasplit CSV (errors name the row and the path);
   `write_datasplit` scans a CellMap root and writes one.
2. `prepare_cache` reads every crop once at the training voxel size (`TRAIN_SCALE_NM`) into a local cache
   of `.npy` files: raw uint8 with a context margin around the crop (zero outside the raw volume) and
   labels uint8 [C, Z, Y, X] with `UNANNOTATED` (255) for classes absent from the crop. Workers and DDP
   ranks open them with `np.load(mmap_mode="r")`, so the page cache is shared rather than copied.
3. `TrainPatches` cuts 2D (1 slice), 2.5D (5 slices centred on the target slice) and 3D patches with
   class-balanced centres and dihedral augmentation; `ValidationTiles` tiles every validation crop in
   full, each annotated voxel exactly once.
4. `to_model_inputs` turns a compact uint8 batch into the float model input (0..1, the same scaling for
   training and validation) and the float target (NaN = unannotated or outside the crop).

Why not cellmap-data for sampling (facts page section 4): it decodes ~25 zarr chunks per array per
sample (12-21 samples/s on 2 cores), its `transpose`/`rotate` transforms are wrong for 2D patches, its
sampler ignores the DDP rank, and it drops crops silently. It is kept as a reference backend in
`cellmap_backend.py`. Reading follows OME-NGFF: a level's translation is the centre of its first voxel
(so a 2x level is offset by half a fine voxel); cellmap-data reads it as the corner.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config_shenron import ALL_CLASSES, DEFAULT_CACHE_DIR, DEFAULT_DATA_ROOT, SYNTHETIC_DATA_DIR

CACHE_FORMAT_VERSION = 1
UNANNOTATED = 255          # label code for "not annotated here" (becomes NaN in the target)
FOREGROUND_SAMPLES = 4000  # foreground voxel coordinates kept per class and crop for balanced sampling
SPLITS = ("train", "validate")
RAW_SUBPATH = "recon-1/em/fibsem-uint8"
GROUNDTRUTH_SUBPATH = "recon-1/labels/groundtruth"


class DataError(ValueError):
    """Bad data or datasplit: the message names the file/row and the fix. CLIs print it on one line."""


# ----------------------------------------------------------------------------------------------------
# OME-NGFF multiscale metadata
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    path: str                              # path of the zarr array
    scale: tuple[float, float, float]      # voxel size (z, y, x) nm
    translation: tuple[float, float, float]  # centre of voxel 0 (z, y, x) nm
    shape: tuple[int, int, int]
    dtype: str

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """World box [lo, hi) covered by the array's voxels."""
        s, t, n = np.array(self.scale), np.array(self.translation), np.array(self.shape)
        return t - s / 2, t + (n - 0.5) * s


def read_levels(group_path: str | Path) -> list[Level]:
    """Scale levels of one OME-NGFF multiscale group, finest first; DataError if malformed."""
    import zarr

    group_path = Path(group_path)
    attrs_file = group_path / ".zattrs"
    if not group_path.is_dir():
        raise DataError(f"zarr group not found: {group_path}")
    try:
        multiscales = json.loads(attrs_file.read_text())["multiscales"][0]
        datasets = multiscales["datasets"]
    except (OSError, KeyError, IndexError, TypeError, json.JSONDecodeError):
        raise DataError(f"{attrs_file}: missing or invalid OME-NGFF 'multiscales' metadata "
                        f"(each CellMap array group needs multiscales[0].datasets with scale/translation)")
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in multiscales.get("axes", ["z", "y", "x"])]
    spatial = [i for i, a in enumerate(axes) if a in ("z", "y", "x")]
    order = [spatial[[axes[i] for i in spatial].index(a)] for a in ("z", "y", "x")] if len(spatial) == 3 else None
    if order is None:
        raise DataError(f"{attrs_file}: expected spatial axes z, y, x, found {axes}")
    levels = []
    for ds in datasets:
        scale, trans = None, [0.0] * len(axes)
        for tx in ds.get("coordinateTransformations", []):
            if tx.get("type") == "scale":
                scale = tx["scale"]
            elif tx.get("type") == "translation":
                trans = tx["translation"]
        if scale is None:
            raise DataError(f"{attrs_file}: level {ds.get('path')!r} has no scale transformation")
        try:
            arr = zarr.open_array(str(group_path / ds["path"]), mode="r")
        except Exception:
            raise DataError(f"zarr array missing or unreadable: {group_path / ds['path']}")
        shape = tuple(int(arr.shape[len(arr.shape) - len(axes) + i]) for i in order)
        levels.append(Level(str(group_path / ds["path"]), tuple(float(scale[i]) for i in order),
                            tuple(float(trans[i]) for i in order), shape, str(arr.dtype)))
    if not levels:
        raise DataError(f"{attrs_file}: multiscales lists no datasets")
    return sorted(levels, key=lambda lv: np.prod(lv.scale))


def multiscales_attrs(levels) -> dict:
    """OME-NGFF 0.4 `multiscales` attributes for levels [(array path, scale zyx nm, translation zyx nm)]:
    the metadata `read_levels` reads (the synthetic data and written predictions use it)."""
    return {"multiscales": [{
        "version": "0.4", "name": "",
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": path, "coordinateTransformations": [
            {"type": "scale", "scale": [float(s) for s in scale]},
            {"type": "translation", "translation": [float(t) for t in trans]}]} for path, scale, trans in levels],
    }]}


def choose_level(levels: Sequence[Level], scale: Sequence[float]) -> Level:
    """The coarsest level no coarser than `scale` on any axis (nothing invented), else the finest."""
    fine_enough = [lv for lv in levels if all(s <= t * 1.001 for s, t in zip(lv.scale, scale))]
    return max(fine_enough, key=lambda lv: np.prod(lv.scale)) if fine_enough else levels[0]


def grid_box(level: Level, scale: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) indices on the training grid (voxel j centred at j*scale) whose centres lie in the array."""
    lo, hi = level.extent()
    s = np.asarray(scale, dtype=float)
    start = np.ceil(lo / s - 1e-6).astype(int)
    stop = np.ceil(hi / s - 1e-6).astype(int)
    return start, stop


def read_on_grid(level: Level, scale: Sequence[float], start: Sequence[int], shape: Sequence[int],
                 fill: int, binarize: bool = False) -> np.ndarray:
    """Nearest-neighbour read of grid box [start, start+shape) at `scale`; voxels outside the array = fill.
    `binarize` maps label values (0/1 or instance ids of any integer dtype) to 0/1.

    Only the bounding slab of the needed source voxels is read from zarr, then indexed per axis.
    """
    import zarr

    arr = zarr.open_array(level.path, mode="r")
    src_idx, dst_idx = [], []
    for a in range(3):
        centres = (np.arange(shape[a]) + start[a]) * scale[a]
        src = np.floor((centres - level.translation[a]) / level.scale[a] + 0.5 + 1e-6).astype(np.int64)
        ok = (src >= 0) & (src < level.shape[a])
        src_idx.append(src[ok])
        dst_idx.append(np.nonzero(ok)[0])
    out = np.full(tuple(shape), fill, dtype=np.uint8)
    if any(len(i) == 0 for i in src_idx):
        return out
    lo = [int(i.min()) for i in src_idx]
    hi = [int(i.max()) + 1 for i in src_idx]
    slab = np.asarray(arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    picked = slab[np.ix_(*(i - l for i, l in zip(src_idx, lo)))]
    out[np.ix_(*dst_idx)] = (picked > 0) if binarize else picked
    return out


# ----------------------------------------------------------------------------------------------------
# Datasplit CSV
# ----------------------------------------------------------------------------------------------------
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
    from make_synthetic_data import SYNTHETIC_FORMAT_VERSION, generate

    import fcntl
    import shutil

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


# ----------------------------------------------------------------------------------------------------
# Crop cache
# ----------------------------------------------------------------------------------------------------
@dataclass
class CachedCrop:
    """One crop in the cache. Arrays are memory-mapped on first access (per worker process)."""

    name: str
    split: str
    directory: Path
    shape: tuple[int, int, int]              # crop box on the training grid
    grid_start: tuple[int, int, int]         # its first voxel's index on the training grid (centre j*scale)
    margin: tuple[int, int, int]             # raw context on each side
    annotated: np.ndarray                    # [C] bool
    positives: np.ndarray                    # [C] int64 positive voxels
    _arrays: dict = field(default_factory=dict, repr=False)

    def _load(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    @property
    def raw(self) -> np.ndarray:          # uint8 [Z+2mz, Y+2my, X+2mx]
        return self._load("raw")

    @property
    def labels(self) -> np.ndarray:       # uint8 [C, Z, Y, X]: 0, 1 or UNANNOTATED
        return self._load("labels")

    @property
    def foreground(self) -> np.ndarray:   # int32 [N, 4]: class index, z, y, x (crop coordinates)
        return self._load("foreground")

    def __getstate__(self):               # workers re-open the memory maps instead of pickling them
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


@dataclass
class CropCache:
    """All crops of one datasplit at one scale, class list and margin."""

    directory: Path
    classes: tuple[str, ...]
    scale: tuple[float, float, float]
    margin: tuple[int, int, int]
    crops: list[CachedCrop]
    dropped: list[tuple[str, str]]   # (crop, reason)

    def split(self, name: str) -> list[CachedCrop]:
        return [c for c in self.crops if c.split == name]

    def class_frequencies(self, split: str = "train") -> dict[str, float]:
        """Positive fraction of annotated voxels per class (for frequency-based class weights)."""
        pos = np.zeros(len(self.classes))
        ann = np.zeros(len(self.classes))
        for c in self.split(split):
            pos += c.positives
            ann += c.annotated * float(np.prod(c.shape))
        return {cls: float(p / a) if a else 0.0 for cls, p, a in zip(self.classes, pos, ann)}


def _source_fingerprint(entry: CropEntry) -> list:
    """Cheap staleness signal: mtimes of the array folders and metadata a crop is read from."""
    paths = [Path(entry.raw_path) / ".zattrs"]
    for cls in entry.classes:
        paths += [Path(entry.crop_path) / cls / ".zattrs", Path(entry.crop_path) / cls]
    return [(str(p), p.stat().st_mtime_ns if p.exists() else None) for p in paths]


def cache_key(entries: Sequence[CropEntry], classes: Sequence[str], scale: Sequence[float],
              margin: Sequence[int]) -> str:
    blob = json.dumps({
        "version": CACHE_FORMAT_VERSION, "classes": list(classes), "scale": list(scale),
        "margin": list(margin),
        "crops": [[e.split, e.raw_path, e.crop_path, list(e.classes), _source_fingerprint(e)] for e in entries],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _prepare_crop(entry: CropEntry, classes: Sequence[str], scale: Sequence[float],
                  margin: Sequence[int], out: Path, rng: np.random.Generator) -> dict:
    """Read one crop at the training scale into `out`; returns its metadata (written last, as the
    completion marker). Raises DataError for a crop that cannot be used."""
    present = [c for c in classes if c in entry.classes]
    class_levels = {c: choose_level(read_levels(Path(entry.crop_path) / c), scale) for c in present}
    if not class_levels:
        return {"skip": "none of the requested classes is annotated"}
    boxes = [grid_box(lv, scale) for lv in class_levels.values()]
    start = np.min([b[0] for b in boxes], axis=0)
    stop = np.max([b[1] for b in boxes], axis=0)
    shape = tuple(int(v) for v in stop - start)
    if min(shape) <= 0:
        return {"skip": "crop is empty at the training scale"}

    raw_level = choose_level(read_levels(entry.raw_path), scale)
    raw_start, raw_stop = grid_box(raw_level, scale)
    if np.any(start >= raw_stop) or np.any(stop <= raw_start):
        return {"skip": "crop lies outside its raw volume"}
    m = np.asarray(margin)
    raw = read_on_grid(raw_level, scale, start - m, tuple(int(v) for v in stop - start + 2 * m), fill=0)

    labels = np.full((len(classes),) + shape, UNANNOTATED, dtype=np.uint8)
    for cls, lv in class_levels.items():
        labels[classes.index(cls)] = read_on_grid(lv, scale, start, shape, fill=UNANNOTATED, binarize=True)
    annotated = np.array([bool(np.any(labels[i] != UNANNOTATED)) for i in range(len(classes))])
    positives = np.array([int(np.count_nonzero(labels[i] == 1)) for i in range(len(classes))], dtype=np.int64)

    foreground = []
    for i in range(len(classes)):
        coords = np.argwhere(labels[i] == 1)
        if len(coords) > FOREGROUND_SAMPLES:
            coords = coords[np.sort(rng.choice(len(coords), FOREGROUND_SAMPLES, replace=False))]
        foreground.append(np.concatenate([np.full((len(coords), 1), i), coords], axis=1))
    out.mkdir(parents=True, exist_ok=True)
    _save_atomic(out / "raw.npy", raw)
    _save_atomic(out / "labels.npy", labels)
    _save_atomic(out / "foreground.npy", np.concatenate(foreground).astype(np.int32))
    return {"shape": list(shape), "grid_start": start.tolist(), "annotated": annotated.tolist(),
            "positives": positives.tolist(), "raw_scale": list(raw_level.scale),
            "inside_raw": bool(np.all(start >= raw_start) and np.all(stop <= raw_stop))}


def prepare_cache(entries: Sequence[CropEntry], classes: Sequence[str], scale: Sequence[float],
                  margin: Sequence[int], cache_root: Path = DEFAULT_CACHE_DIR,
                  progress: bool = True, build: bool = True) -> CropCache:
    """Build (or reuse) the cache for these crops. Resumable: finished crops are kept on interruption.
    With `build=False` only an existing complete cache is opened (FileNotFoundError otherwise)."""
    from tqdm import tqdm

    classes = tuple(classes)
    unknown = [c for c in classes if c not in ALL_CLASSES]
    if unknown:
        raise DataError(f"unknown class(es) {unknown}; valid: {', '.join(ALL_CLASSES)}")
    key = cache_key(entries, classes, scale, margin)
    directory = Path(cache_root) / key
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file() and not build:
        raise FileNotFoundError(manifest_path)
    if not manifest_path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        todo = [(i, e) for i, e in enumerate(entries) if not (directory / f"crop_{i:04d}" / "meta.json").is_file()]
        bar = tqdm(todo, desc=f"preparing cache {key}", unit="crop", disable=not progress or not todo,
                   file=sys.stdout)
        for i, e in bar:
            bar.set_postfix_str(e.name)
            out = directory / f"crop_{i:04d}"
            try:
                meta = _prepare_crop(e, classes, scale, margin, out, rng)
            except DataError as err:
                raise DataError(f"datasplit row {e.row}: {err}")
            meta.update(name=e.name, split=e.split, row=e.row)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / "meta.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, out / "meta.json")
        manifest = {"version": CACHE_FORMAT_VERSION, "classes": list(classes), "scale": list(scale),
                    "margin": list(margin), "crops": len(entries)}
        tmp = directory / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path)
    return load_cache(directory, classes, scale, margin, len(entries))


def load_cache(directory: Path, classes, scale, margin, n_entries: int) -> CropCache:
    crops, dropped = [], []
    for i in range(n_entries):
        meta = json.loads((directory / f"crop_{i:04d}" / "meta.json").read_text())
        if "skip" in meta:
            dropped.append((meta["name"], meta["skip"]))
            continue
        crops.append(CachedCrop(meta["name"], meta["split"], directory / f"crop_{i:04d}", tuple(meta["shape"]),
                                tuple(meta["grid_start"]), tuple(margin), np.array(meta["annotated"]),
                                np.array(meta["positives"], dtype=np.int64)))
    return CropCache(directory, tuple(classes), tuple(scale), tuple(margin), crops, dropped)


def cache_margin(profile, patch_shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Raw context needed around a crop so that any patch centred inside it is fully backed by raw: the
    largest patch of every model config of `profile` (so 2D, 2.5D and 3D runs share one cache) and of
    the run's own `patch_shape` (e.g. after --patch-yx). Training and evaluation both call this."""
    from config_shenron import MODELS

    shapes = np.array([m.patch_shape(profile) for m in MODELS.values()] + ([list(patch_shape)] if patch_shape else []))
    mz, my, mx = (shapes.max(axis=0) // 2).tolist()
    return (max(2, mz), my, mx)


# ----------------------------------------------------------------------------------------------------
# Patch cutting and augmentation
# ----------------------------------------------------------------------------------------------------
def cut_patch(crop: CachedCrop, start: Sequence[int], raw_shape: Sequence[int],
              label_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Raw [Dr,H,W] starting at crop-coordinate `start` and labels [C,Dl,H,W] for the same y/x window
    whose z extent is centred in the raw's (Dl = 1 for 2D/2.5D). Labels outside the crop = UNANNOTATED."""
    m = crop.margin
    z0, y0, x0 = start
    raw = np.array(crop.raw[z0 + m[0]: z0 + m[0] + raw_shape[0], y0 + m[1]: y0 + m[1] + raw_shape[1],
                              x0 + m[2]: x0 + m[2] + raw_shape[2]])
    lz0 = z0 + (raw_shape[0] - label_shape[0]) // 2
    lab_start = (lz0, y0, x0)
    labels = np.full((crop.labels.shape[0],) + tuple(label_shape), UNANNOTATED, dtype=np.uint8)
    src, dst = [], []
    for a in range(3):
        lo, hi = max(0, lab_start[a]), min(crop.shape[a], lab_start[a] + label_shape[a])
        if hi <= lo:
            return raw, labels
        src.append(slice(lo, hi))
        dst.append(slice(lo - lab_start[a], hi - lab_start[a]))
    labels[(slice(None), *dst)] = crop.labels[(slice(None), *src)]
    return raw, labels


def augment(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator, flip_z: bool) -> tuple[np.ndarray, np.ndarray]:
    """Dihedral augmentation of the y/x plane (flips + transpose = all 90-degree rotations and mirrors),
    optional z mirror; applied identically to raw [Z,H,W] and labels [C,Z,H,W]."""
    if flip_z and rng.random() < 0.5:
        raw, labels = raw[::-1], labels[:, ::-1]
    if rng.random() < 0.5:
        raw, labels = raw[:, ::-1], labels[:, :, ::-1]
    if rng.random() < 0.5:
        raw, labels = raw[:, :, ::-1], labels[:, :, :, ::-1]
    if rng.random() < 0.5:
        raw, labels = raw.swapaxes(1, 2), labels.swapaxes(2, 3)
    # copy(): a flipped size-1 axis counts as contiguous to numpy but has a negative stride torch refuses
    return raw.copy(order="C"), labels.copy(order="C")


def format_sample(raw: np.ndarray, labels: np.ndarray, dims: int) -> dict:
    """2D/2.5D: raw slices become channels [S,H,W], labels [C,H,W]; 3D: raw [1,D,H,W], labels [C,D,H,W]."""
    if dims == 2:
        return {"raw": torch.from_numpy(raw), "labels": torch.from_numpy(labels[:, 0])}
    return {"raw": torch.from_numpy(raw[None]), "labels": torch.from_numpy(labels)}


@dataclass(frozen=True)
class PatchSpec:
    """What one model consumes: raw z extent, label z extent, y/x size, dimensionality."""

    raw_shape: tuple[int, int, int]
    dims: int

    @property
    def label_shape(self) -> tuple[int, int, int]:
        return (1 if self.dims == 2 else self.raw_shape[0],) + self.raw_shape[1:]


class EpochSampler(Sampler):
    """Yields (epoch, i) keys: each sample's randomness derives from (seed, rank, epoch, i), so a run is
    reproducible for any number of workers and resumable at an epoch boundary (call set_epoch)."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.num_samples)])

    def __len__(self) -> int:
        return self.num_samples


class TrainPatches(Dataset):
    """Class-balanced random patches from the training crops.

    With probability `foreground_fraction` a sample is centred on a stored foreground voxel of a class
    drawn uniformly among classes with training positives (then a crop drawn uniformly among crops
    holding that class); otherwise a crop is drawn in proportion to its volume and the centre uniformly
    inside it. The centre voxel is the target slice for 2D/2.5D. Different ranks get different samples.
    """

    def __init__(self, cache: CropCache, spec: PatchSpec, seed: int, rank: int = 0,
                 foreground_fraction: float = 0.5, augment: bool = True):
        self.crops = cache.split("train")
        if not self.crops:
            raise DataError("no training crops left after preparation (see the data report)")
        self.spec, self.seed, self.rank = spec, seed, rank
        self.foreground_fraction, self.augment = foreground_fraction, augment
        holders = np.stack([c.positives > 0 for c in self.crops])  # [crops, C]
        self.fg_classes = np.nonzero(holders.any(axis=0))[0]
        self.crops_with_class = {int(k): np.nonzero(holders[:, k])[0] for k in self.fg_classes}
        volumes = np.array([np.prod(c.shape) for c in self.crops], dtype=float)
        self.volume_p = volumes / volumes.sum()

    def __len__(self) -> int:  # keys come from EpochSampler; the length is nominal
        return 1 << 30

    def __getitem__(self, key) -> dict:
        epoch, i = key
        rng = np.random.default_rng([self.seed, self.rank, epoch, i])
        if len(self.fg_classes) and rng.random() < self.foreground_fraction:
            k = int(rng.choice(self.fg_classes))
            crop = self.crops[int(rng.choice(self.crops_with_class[k]))]
            fg = crop.foreground
            rows = np.nonzero(fg[:, 0] == k)[0]
            centre = fg[rows[rng.integers(len(rows))], 1:]
        else:
            crop = self.crops[int(rng.choice(len(self.crops), p=self.volume_p))]
            centre = np.array([rng.integers(n) for n in crop.shape])
        start = centre - np.array(self.spec.raw_shape) // 2
        raw, labels = cut_patch(crop, start, self.spec.raw_shape, self.spec.label_shape)
        if self.augment:
            raw, labels = augment(raw, labels, rng, flip_z=True)
        return format_sample(raw, labels, self.spec.dims)


def tile_starts(length: int, tile: int, step: int | None = None) -> list[int]:
    """Tile origins covering [0, length): a grid of `step` centred on the crop (overhang < tile/2 each side)."""
    step = step or tile
    n = max(1, math.ceil(max(length - tile, 0) / step) + 1)
    total = (n - 1) * step + tile
    first = -((total - length) // 2)
    return [first + k * step for k in range(n)]


class ValidationTiles(Dataset):
    """Deterministic tiles over every validation crop, each annotated voxel covered exactly once.

    2D/2.5D: one tile per (z slice, y/x tile) with the model's z context; 3D: (D,H,W) tiles. Tiles may
    overhang the crop: the overhang is UNANNOTATED in the labels and raw context from the cache margin.
    """

    def __init__(self, cache: CropCache, spec: PatchSpec, split: str = "validate", rank: int = 0,
                 world_size: int = 1):
        self.crops = cache.split(split)
        self.spec = spec
        lz, ly, lx = spec.label_shape
        tiles = []
        for ci, crop in enumerate(self.crops):
            for z in tile_starts(crop.shape[0], lz):
                for y in tile_starts(crop.shape[1], ly):
                    for x in tile_starts(crop.shape[2], lx):
                        tiles.append((ci, z, y, x))
        self.all_tiles = tiles
        self.tiles = tiles[rank::world_size]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, j: int) -> dict:
        ci, z, y, x = self.tiles[j]
        crop = self.crops[ci]
        z_raw = z - (self.spec.raw_shape[0] - self.spec.label_shape[0]) // 2
        raw, labels = cut_patch(crop, (z_raw, y, x), self.spec.raw_shape, self.spec.label_shape)
        sample = format_sample(raw, labels, self.spec.dims)
        sample["tile"] = torch.tensor([ci, z, y, x])
        return sample


def make_loader(dataset: Dataset, batch_size: int, workers: int, sampler: Sampler | None = None,
                pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0, drop_last=False,
                      prefetch_factor=4 if workers > 0 else None)


def to_model_inputs(batch: dict, device: torch.device | str, channels_last: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact uint8 batch -> (input float32 in [0, 1], target float32 with NaN where unannotated).
    The same function serves training and validation, so the input scaling cannot diverge."""
    raw = batch["raw"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    x = raw.float().div_(255.0)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y = labels.float().masked_fill_(labels == UNANNOTATED, float("nan"))
    return x, y


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def data_report(entries: Sequence[CropEntry], cache: CropCache, patch_yx: Sequence[int] | None = None) -> list[str]:
    """Lines saying what was loaded: crops per split, what was dropped and why, unannotated classes, and
    (given the patch's y/x size) the crops smaller than a patch."""
    lines = [f"data: {len(entries)} crops in the datasplit; cache {cache.directory}"]
    for split in SPLITS:
        crops = cache.split(split)
        if patch_yx is not None:
            # Kept, unlike cellmap-data, which drops such crops silently: their patches take the raw context
            # from around the crop, and their labels beyond its edge are masked out of the loss and metrics.
            for c in crops:
                if c.shape[1] < patch_yx[0] or c.shape[2] < patch_yx[1]:
                    lines.append(f"  {split}: {c.name} is {c.shape[1]}x{c.shape[2]} voxels, smaller than the "
                                 f"{patch_yx[0]}x{patch_yx[1]} patch: used, with the labels beyond its edge masked")
        listed = sum(e.split == split for e in entries)
        voxels = sum(int(np.prod(c.shape)) for c in crops)
        lines.append(f"  {split}: {len(crops)}/{listed} crops used, {voxels:,} voxels at the training scale")
        annotated = np.zeros(len(cache.classes), dtype=bool)
        for c in crops:
            annotated |= c.annotated
        missing = [cls for cls, a in zip(cache.classes, annotated) if not a]
        if missing:
            lines.append(f"  {split}: classes with no annotation: {', '.join(missing)}")
    for name, reason in cache.dropped:
        lines.append(f"  dropped {name}: {reason}")
    if cache.dropped:
        lines.append(f"  WARNING: {len(cache.dropped)} of {len(entries)} crops dropped")
    return lines


def batch_sanity_line(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str]) -> str:
    """First-batch check: input range, NaN fraction, positive fraction per class among valid voxels."""
    valid = ~torch.isnan(y)
    dims = [0] + list(range(2, y.dim()))
    pos = (torch.nan_to_num(y, nan=0.0) * valid).sum(dims) / valid.sum(dims).clamp_min(1)
    per_class = ", ".join(f"{c} {p:.3f}" for c, p in zip(classes, pos.tolist()))
    return (f"first batch: input {list(x.shape)} range {x.min().item():.3f}..{x.max().item():.3f}, "
            f"target NaN {1 - valid.float().mean().item():.1%}, positive fraction: {per_class}")


# ----------------------------------------------------------------------------------------------------
# Command line: write-csv, prepare
# ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="CellMap datasplit and cache tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-csv", help="scan a CellMap root and write a datasplit CSV")
    w.add_argument("--data-root", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--val-fraction", type=float, default=0.15)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-scale", type=float, default=None,
                   help="keep crops whose finest label voxel is at most this many nm")
    c = sub.add_parser("check-csv", help="validate a datasplit CSV")
    c.add_argument("csv")
    args = p.parse_args(argv)
    try:
        if args.cmd == "write-csv":
            out = Path(args.out)
            if out.exists():
                raise DataError(f"{out} exists; choose another --out or delete it first")
            path = write_datasplit(args.data_root, out, args.val_fraction, args.seed, args.max_scale)
            entries = read_datasplit(path)
            print(f"wrote {path}: " + ", ".join(f"{s} {sum(e.split == s for e in entries)}" for s in SPLITS))
        else:
            entries = read_datasplit(args.csv)
            print(f"{args.csv}: OK, " + ", ".join(f"{s} {sum(e.split == s for e in entries)}" for s in SPLITS))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
