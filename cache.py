"""The crop cache: every crop of a datasplit read once at the training voxel size into local `.npy` files
(nnU-Net style: preprocess once, then sample fast), reopened as memory maps, and the data report of what
was used and dropped.

Per crop: raw uint8 with a context margin around the crop (zero outside the raw volume) and labels uint8
[C, Z, Y, X] with `UNANNOTATED` (255) for classes absent from the crop, plus stored foreground voxel
coordinates per class for balanced sampling. Workers and DDP ranks open them with
`np.load(mmap_mode="r")`, so the page cache is shared rather than copied. Preparation is resumable: a crop's
`meta.json` is written last, and the cache's `manifest.json` after every crop.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from config_shenron import ALL_CLASSES, DEFAULT_CACHE_DIR, MODELS
from datasplit import SPLITS, CropEntry
from errors import DataError
from ngff import choose_level, grid_box, read_levels, read_on_grid

CACHE_FORMAT_VERSION = 1
UNANNOTATED = 255          # label code for "not annotated here" (becomes NaN in the target)
FOREGROUND_SAMPLES = 4000  # foreground voxel coordinates kept per class and crop for balanced sampling


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
    shapes = np.array([m.patch_shape(profile) for m in MODELS.values()] + ([list(patch_shape)] if patch_shape else []))
    mz, my, mx = (shapes.max(axis=0) // 2).tolist()
    return (max(2, mz), my, mx)


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
