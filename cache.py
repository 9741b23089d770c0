"""The crop cache: every crop of a datasplit read once at the training voxel size (crop_prep.py), stored one
folder per crop (crop_store.py), and reopened as a run's view of its crops (`CropCache`, `CachedCrop`), with
the data report of what was used, degraded and skipped.

A crop's folder is keyed by its source arrays and the training scale, not by the datasplit, the run's
classes or its patch size: one cache serves every class subset, patch size, split and row order, and two
runs share it. Preparation runs in `workers` processes with a progress bar and ETA, each crop under its own
lock (a second run waits for the first, then reuses its crops), and resumes after an interruption (a
crop's meta.json is written last). Opening verifies every file's size and CRC-32.

Patches read windows of a crop in crop coordinates (voxel 0 = the crop's first voxel on the training
grid): `raw_window` gives the raw and which of it is backed by EM that was fetched (missing raw is a mask,
never zeros passed off as EM); `label_window` gives the labels of the run's classes with UNANNOTATED where
a class is not annotated, including beyond the crop.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from config_shenron import ALL_CLASSES, DEFAULT_CACHE_DIR
from crop_prep import CropJob, prepare_crop
from crop_store import CropStore, unpack_bits
from datasplit import SPLITS, CropEntry
from errors import DataError, Interrupted
from ngff import Level, box_intersection
from resample import ChunkGrid, OnDemandRaw, nearest_index

CACHE_FORMAT_VERSION = 2
UNANNOTATED = 255          # label code for "not annotated here" (becomes NaN in the target)
MIN_VALIDATION_COVERAGE = 0.5  # a validation crop with less raw than this at the training scale is skipped


# ----------------------------------------------------------------------------------------------------
# Keys and preparation
# ----------------------------------------------------------------------------------------------------
def stored_classes(entry: CropEntry) -> tuple[str, ...]:
    """The classes of the toolkit's 14 that a crop annotates (others are ignored), in ALL_CLASSES order."""
    return tuple(c for c in ALL_CLASSES if c in entry.classes)


def _fingerprint(entry: CropEntry) -> list:
    """Cheap staleness signal: modification times of the arrays a crop is read from (a fetched chunk changes
    its array folder's time)."""
    paths = [Path(entry.raw_path) / ".zattrs"] + sorted(p for p in Path(entry.raw_path).glob("s*") if p.is_dir())
    for cls in stored_classes(entry):
        paths += [Path(entry.crop_path) / cls / ".zattrs", Path(entry.crop_path) / cls / "s0"]
    return [(str(p), p.stat().st_mtime_ns if p.exists() else None) for p in paths]


def crop_key(entry: CropEntry, scale: Sequence[float]) -> str:
    blob = json.dumps({"version": CACHE_FORMAT_VERSION, "raw": entry.raw_path, "crop": entry.crop_path,
                       "classes": stored_classes(entry), "scale": list(scale), "sources": _fingerprint(entry)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_directory(scale: Sequence[float], cache_root: Path = DEFAULT_CACHE_DIR) -> Path:
    return Path(cache_root) / f"v{CACHE_FORMAT_VERSION}-{'x'.join(f'{s:g}' for s in scale)}nm"


def prepare_cache(entries: Sequence[CropEntry], classes: Sequence[str], scale: Sequence[float],
                  cache_root: Path = DEFAULT_CACHE_DIR, workers: int = 0, progress: bool = True,
                  build: bool = True, verify: bool = True) -> "CropCache":
    """Prepare the crops that are not cached yet (in `workers` processes; 0 = this one) and open the run's view
    of them with `classes`. With `build=False` only an already complete cache is opened (FileNotFoundError
    otherwise: another rank is still preparing it). DataError names the crop, file and fix."""
    classes = tuple(classes)
    unknown = [c for c in classes if c not in ALL_CLASSES]
    if unknown:
        raise DataError(f"unknown class(es) {unknown}; valid: {', '.join(ALL_CLASSES)}")
    directory = cache_directory(scale, cache_root)
    jobs = {}
    for e in entries:
        key = crop_key(e, scale)
        jobs.setdefault(key, CropJob(e.name, e.raw_path, e.crop_path, stored_classes(e), tuple(scale),
                                     str(directory / key)))
    todo = [job for job in jobs.values() if not (Path(job.directory) / "meta.json").is_file()]
    if todo and not build:
        raise FileNotFoundError(todo[0].directory)
    if todo:
        _prepare_all(todo, workers, progress)
    crops, rows = [], []
    for e in entries:
        store = CropStore(Path(jobs[crop_key(e, scale)].directory))
        meta = store.read_meta()
        row = {"name": e.name, "split": e.split, "row": e.row, "label_voxel_size": meta.get("label_voxel_size")}
        if meta["status"] != "ready":
            rows.append(dict(row, status="skipped", reason=meta["reason"], fix=meta.get("fix", "")))
            continue
        if verify:
            store.verify(meta)
        crop = CachedCrop.open(e, store, meta, classes)
        if not crop.annotated.any():
            rows.append(dict(row, status="skipped", reason="none of the requested classes is annotated", fix=""))
            continue
        if e.split == "validate" and crop.raw_coverage < MIN_VALIDATION_COVERAGE:
            # Validation tiles and predicts a crop whole: crop 289 (1000^3 at 32 nm, 0.039% raw at 8 nm in the
            # default download) would be 4 million 2D tiles, nearly all without EM, and a full-crop prediction
            # of 64e9 voxels per class, for a score of the few voxels with raw.
            rows.append(dict(row, status="skipped", reason=f"a validation crop needs raw EM over most of it; it has "
                             f"{share_text(crop.raw_coverage)} at the training scale", fix="put it in the train split "
                             "(it is trained where raw exists), or fetch its EM at all resolutions "
                             "(csc fetch-data --fetch-all-em-resolutions)"))
            continue
        crops.append(crop)
        rows.append(dict(row, status="used", annotated=[c for c, a in zip(classes, crop.annotated) if a],
                         raw_coverage=crop.raw_coverage))
    return CropCache(directory, classes, tuple(scale), crops, rows)


def _ignore_interrupts() -> None:
    """Pool workers leave Ctrl-C to the main process, which stops them (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _prepare_all(jobs: list[CropJob], workers: int, progress: bool) -> None:
    """Run prepare_crop over `jobs` with a progress bar (ETA); one line on Ctrl-C or SIGTERM, finished crops kept."""
    bar = tqdm(total=len(jobs), desc="preparing the crop cache", unit="crop", disable=not progress, file=sys.stdout)
    pool = multiprocessing.get_context("fork").Pool(workers, _ignore_interrupts) if workers > 0 else None
    previous = signal.signal(signal.SIGTERM, _interrupt)  # after the fork: the workers keep the default
    try:
        results = pool.imap_unordered(prepare_crop, jobs) if pool else map(prepare_crop, jobs)
        for meta in results:
            bar.set_postfix_str(meta.get("name", ""))
            bar.update()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while preparing the crop cache: {bar.n} of {len(jobs)} crops done; run "
                          f"again to prepare the rest (finished crops are kept)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        if pool:
            pool.terminate()
            pool.join()


# ----------------------------------------------------------------------------------------------------
# The run's view
# ----------------------------------------------------------------------------------------------------
@dataclass
class CachedCrop:
    """One cached crop as a run sees it: the run's classes, windows in crop coordinates. Arrays are opened
    on first access (per worker process) and not pickled."""

    name: str
    split: str
    directory: Path
    shape: tuple[int, int, int]              # crop box on the training grid
    grid_start: tuple[int, int, int]         # its first voxel's index on the training grid (centre j*scale)
    scale: tuple[float, float, float]
    classes: tuple[str, ...]                 # the run's classes
    stored: list                             # per run class: its meta entry, or None (not annotated here)
    annotated: np.ndarray                    # [C] bool
    positives: np.ndarray                    # [C] int64 positive voxels at the training scale
    annotated_voxels: np.ndarray             # [C] int64
    raw: dict                                # meta["raw"]
    label_voxel_size: tuple[float, ...]
    class_order: tuple[str, ...]             # stored classes, as indexed in foreground.npy
    _arrays: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, entry: CropEntry, store: CropStore, meta: dict, classes: Sequence[str]) -> "CachedCrop":
        stored = [meta["classes"].get(c) for c in classes]
        return cls(entry.name, entry.split, store.directory, tuple(meta["shape"]), tuple(meta["grid_start"]),
                   tuple(meta["scale"]), tuple(classes), stored, np.array([s is not None for s in stored]),
                   np.array([s["positives"] if s else 0 for s in stored], dtype=np.int64),
                   np.array([s["annotated"] if s else 0 for s in stored], dtype=np.int64), meta["raw"],
                   tuple(meta["label_voxel_size"]), tuple(meta["class_order"]))

    def __getstate__(self):  # workers re-open the memory maps instead of pickling them
        return dict(self.__dict__, _arrays={})

    def _load(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = CropStore(self.directory).load(name)
        return self._arrays[name]

    @property
    def raw_coverage(self) -> float:
        """Fraction of the crop's voxels with raw at the training scale."""
        return float(self.raw["crop_coverage"])

    @property
    def coverage_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 raw coverage of BLOCK^3 blocks, the crop coordinates where block 0 starts)."""
        return self._load("coverage.npy").astype(np.float32) / 255, np.array(self.raw["coverage_blocks_start"])

    @property
    def foreground(self) -> np.ndarray:
        """int32 [N, 4]: run class index, z, y, x (crop coordinates) of sampled foreground voxels."""
        if "foreground" not in self._arrays:
            stored = np.asarray(self._load("foreground.npy"))
            to_run = np.array([self.classes.index(c) if c in self.classes else -1 for c in self.class_order])
            run_index = to_run[stored[:, 0]] if len(stored) else np.zeros(0, dtype=np.int64)
            keep = run_index >= 0
            self._arrays["foreground"] = np.concatenate([run_index[keep, None], stored[keep, 1:]], 1).astype(np.int32)
        return self._arrays["foreground"]

    # ---- windows ----
    def raw_window(self, start: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 raw, bool valid) of the box [start, start + shape) in crop coordinates; voxels without
        fetched EM (or beyond the stored region) are invalid and 0."""
        if self.raw["mode"] == "zarr":
            return self._raw_from_zarr(start, shape)
        raw = np.zeros(tuple(shape), dtype=np.uint8)
        valid = np.zeros(tuple(shape), dtype=bool)
        src, dst = _overlap(start, shape, self.raw["region_start"], self.raw["region_shape"])
        if src is None:
            return raw, valid
        raw[dst] = self._load("raw.npy")[src]
        packed = self._load("raw_valid.npy")[src[0], src[1]]
        valid[dst] = unpack_bits(packed, src[2].start, src[2].stop)
        return raw, valid

    def _raw_from_zarr(self, start, shape) -> tuple[np.ndarray, np.ndarray]:
        """Raw read on demand (crops too large to cache)."""
        if "zarr" not in self._arrays:
            lv = self.raw["level"]
            level = Level(lv["path"], tuple(lv["scale"]), tuple(lv["translation"]), tuple(lv["shape"]), "uint8")
            grid = ChunkGrid(level.shape, tuple(self.raw["chunks"]), np.asarray(self._load("presence.npy")))
            self._arrays["zarr"] = OnDemandRaw(level, grid, self.scale)
        return self._arrays["zarr"].window(np.asarray(self.grid_start) + np.asarray(start), shape)

    def label_window(self, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
        """uint8 [C, *shape]: 0/1 per run class, UNANNOTATED where the class is not annotated."""
        out = np.full((len(self.classes),) + tuple(shape), UNANNOTATED, dtype=np.uint8)
        for c, info in enumerate(self.stored):
            if info is not None:
                read = self._grid_labels if info["storage"] == "grid" else self._native_labels
                read(info, start, shape, out[c])
        return out

    def _grid_labels(self, info: dict, start, shape, out: np.ndarray) -> None:
        src, dst = _overlap(start, shape, info["box_start"], info["box_shape"])
        if src is None:
            return
        bits = unpack_bits(self._load(info["file"])[src[0], src[1]], src[2].start, src[2].stop)
        cz, cy, cx = (np.asarray(c)[s] for c, s in zip(info["coverage"], src))
        annotated = (cz[:, None, None] * cy[None, :, None] * cx[None, None, :]) >= 0.5
        out[dst] = np.where(annotated, bits, UNANNOTATED)

    def _native_labels(self, info: dict, start, shape, out: np.ndarray) -> None:
        lv = info["level"]
        index, inside = zip(*(nearest_index(self.grid_start[a] + int(start[a]), int(shape[a]), self.scale[a],
                                            lv["translation"][a], lv["scale"][a], lv["shape"][a]) for a in range(3)))
        if not all(i.any() for i in inside):
            return
        iz, iy, ix = (i[m] for i, m in zip(index, inside))
        first, last = int(ix.min()) // 8, -(-(int(ix.max()) + 1) // 8)
        packed = np.asarray(self._load(info["file"])[iz[:, None], iy[None, :], first:last])
        bits = np.unpackbits(packed, axis=-1)[..., ix - 8 * first]
        out[np.ix_(*inside)] = bits

    @property
    def labels(self) -> np.ndarray:
        """uint8 [C, Z, Y, X] over the whole crop (small crops: tests, panels)."""
        return self.label_window((0, 0, 0), self.shape)


def _overlap(start, shape, box_start, box_shape):
    """(source slices into the box's arrays, destination slices into the window) of the window
    [start, start + shape) and the box [box_start, box_start + box_shape), or (None, None)."""
    start, box_start = np.asarray(start, dtype=np.int64), np.asarray(box_start, dtype=np.int64)
    shared = box_intersection(start, start + np.asarray(shape), box_start, box_start + np.asarray(box_shape))
    if shared is None:
        return None, None
    lo, hi = shared
    return (tuple(slice(int(a), int(b)) for a, b in zip(lo - box_start, hi - box_start)),
            tuple(slice(int(a), int(b)) for a, b in zip(lo - start, hi - start)))


@dataclass
class CropCache:
    """A run's crops: those of its datasplit that are usable with its classes, and one row per datasplit row
    saying what happened to it."""

    directory: Path
    classes: tuple[str, ...]
    scale: tuple[float, float, float]
    crops: list[CachedCrop]
    rows: list[dict]

    def split(self, name: str) -> list[CachedCrop]:
        return [c for c in self.crops if c.split == name]

    @property
    def dropped(self) -> list[tuple[str, str]]:
        return [(r["name"], r["reason"]) for r in self.rows if r["status"] == "skipped"]

    def class_frequencies(self, split: str = "train") -> dict[str, float]:
        """Positive fraction of annotated voxels per class (for frequency-based class weights)."""
        pos = sum((c.positives for c in self.split(split)), np.zeros(len(self.classes)))
        ann = sum((c.annotated_voxels for c in self.split(split)), np.zeros(len(self.classes)))
        return {cls: float(p / a) if a else 0.0 for cls, p, a in zip(self.classes, pos, ann)}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
DEGRADED_COVERAGE = 0.95  # a crop with less raw than this is reported as degraded (edge voxels aside)


def share_text(fraction: float) -> str:
    """A share as a percentage that never rounds a small non-zero share to 0% (0.000393 -> 0.039%)."""
    return f"{fraction:.0%}" if fraction >= 0.01 or fraction == 0 else f"{100 * fraction:.2g}%"


def data_report(entries: Sequence[CropEntry], cache: CropCache, patch_yx: Sequence[int] | None = None) -> list[str]:
    """Lines saying what was loaded: crops per split, one line per skipped crop with the fix, one per crop whose
    raw is partly missing, the crops smaller than a patch, and the classes no crop of a split annotates."""
    lines = [f"data: {len(entries)} crops in the datasplit; cache {cache.directory}"]
    for split in SPLITS:
        crops = cache.split(split)
        for c in crops:
            if c.raw_coverage < DEGRADED_COVERAGE:
                lines.append(f"  {split}: {c.name}: raw EM covers {share_text(c.raw_coverage)} of the crop; the "
                             f"voxels without it are masked out of the loss and the metrics")
            if patch_yx is not None and (c.shape[1] < patch_yx[0] or c.shape[2] < patch_yx[1]):
                # Kept, unlike cellmap-data, which drops such crops silently: their patches take the raw context
                # from around the crop, and their labels beyond its edge are masked out of the loss and metrics.
                lines.append(f"  {split}: {c.name} is {c.shape[1]}x{c.shape[2]} voxels, smaller than the "
                             f"{patch_yx[0]}x{patch_yx[1]} patch: used, with the labels beyond its edge masked")
        listed = sum(e.split == split for e in entries)
        voxels = sum(int(np.prod(c.shape)) for c in crops)
        with_raw = round(sum(float(np.prod(c.shape)) * c.raw_coverage for c in crops))
        lines.append(f"  {split}: {len(crops)}/{listed} crops used, {voxels:,} voxels at the training scale "
                     f"({with_raw:,} with raw EM)")
        annotated = np.zeros(len(cache.classes), dtype=bool)
        for c in crops:
            annotated |= c.annotated
        missing = [cls for cls, a in zip(cache.classes, annotated) if not a]
        if missing:
            lines.append(f"  {split}: classes with no annotation: {', '.join(missing)}")
    for row in cache.rows:
        if row["status"] == "skipped":
            voxel = row.get("label_voxel_size")
            at = f" (labels at {' x '.join(f'{v:g}' for v in voxel)} nm)" if voxel else ""
            lines.append(f"  dropped {row['name']}{at}: {row['reason']}" + (f"; fix: {row['fix']}" if row['fix'] else ""))
    for train, validate, voxels in split_overlaps(cache):
        share = voxels / float(np.prod(validate.shape))
        lines.append(f"  WARNING: train crop {train.name} overlaps validation crop {validate.name} ({share_text(share)} "
                     f"of it): its labels there are held out of training, but its raw may still be seen as input; "
                     f"fix: put both crops in the same split of the datasplit CSV")
    if cache.dropped:
        lines.append(f"  WARNING: {len(cache.dropped)} of {len(entries)} crops dropped")
    return lines


def split_overlaps(cache: CropCache) -> list[tuple[CachedCrop, CachedCrop, int]]:
    """(train crop, validation crop, shared voxels on the training grid) for every used pair of one dataset
    whose boxes intersect. The real download has such pairs: a coarse crop (e.g. crop 289, 1000^3 at 32 nm)
    contains fine crops of its dataset, and the official make-datasplit splits crops without looking."""
    pairs = []
    for validate in cache.split("validate"):
        for train in cache.split("train"):
            if train.name.rsplit("/", 1)[0] != validate.name.rsplit("/", 1)[0]:
                continue
            src, _ = _overlap(validate.grid_start, validate.shape, train.grid_start, train.shape)
            if src is not None:
                pairs.append((train, validate, math.prod(s.stop - s.start for s in src)))
    return pairs


def crops_table(cache: CropCache, sample_share: dict[str, float], unusable: dict[str, str]) -> list[dict]:
    """results.json's `crops`: one row per datasplit row (name, split, label voxel size, used or skipped with
    the reason and fix, annotated classes, raw coverage at the training scale, expected share of training
    samples; a validation crop that training crops overlap names them); `unusable` are training crops the
    sampler leaves out (name -> reason)."""
    overlapping: dict[str, list[str]] = {}
    for train, validate, _ in split_overlaps(cache):
        overlapping.setdefault(validate.name, []).append(train.name)
    rows = []
    for row in cache.rows:
        row = dict(row, sample_share=sample_share.get(row["name"]) if row["split"] == "train" else None)
        if row["name"] in overlapping:
            row["overlapping_train_crops"] = overlapping[row["name"]]
        if row["split"] == "train" and row["name"] in unusable:
            row.update(status="skipped", reason=unusable[row["name"]])
        rows.append(row)
    return rows

