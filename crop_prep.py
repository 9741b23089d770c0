"""Preparing one crop for the cache: its labels and raw EM brought to the training grid (resample.py's rules),
written into a crop_store.CropStore, in slabs so that no step holds more than a few hundred MB whatever the
crop's size.

Per class (every class of the toolkit's 14 that the crop annotates, whatever a run trains on):
- finer than or equal to the training scale: area rule onto the training grid, stored bit-packed over the
  class's box, with the per-axis coverage that says which voxels of the box are annotated;
- coarser (16, 32, 64 nm): stored bit-packed at its own resolution, never materialised at the training
  scale; patches upsample it with the nearest rule.
Raw: the pyramid level that matches the training scale, else the coarsest finer one (area rule); only
chunks that exist count, the rest is missing. Around the crop a margin of RAW_MARGIN voxels is kept where
raw exists. A crop whose raw region fits RAW_CACHE_VOXELS is cached at the training scale; a larger one (a
coarse crop with raw fetched at all resolutions) keeps only its chunk presence and is read on demand.
A crop that cannot be used gets a meta.json with status "skipped", the reason and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from crop_store import CropStore, pack_bits
from errors import DataError
from ngff import Level, read_levels
from resample import (apply_area, block_present_fraction, level_area_maps, nearest_index, present_chunks,
                      present_fraction, read_window)

RAW_MARGIN = (16, 128, 128)   # raw context kept around a crop (training voxels): half the largest profile patch
BLOCK = 16                    # raw coverage is summarised per BLOCK^3 training voxels for patch placement
RAW_CACHE_VOXELS = 1 << 29    # a larger raw region is read on demand instead of cached (512 MB of uint8)
FOREGROUND_SAMPLES = 4000     # foreground voxel coordinates kept per class and crop for balanced sampling
SLAB = 32                     # training-grid z slices processed at a time (a multiple of BLOCK)
SLAB_VOXELS = 1 << 24         # source voxels read at a time from a coarse label array
SCALE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CropJob:
    """What preparing one crop needs (picklable: preparation runs in worker processes)."""

    name: str
    raw_path: str
    crop_path: str
    classes: tuple[str, ...]       # annotated classes among the toolkit's 14, in ALL_CLASSES order
    scale: tuple[float, float, float]
    directory: str


class Skip(Exception):
    """The crop cannot be used: the reason and the fix."""

    def __init__(self, reason: str, fix: str = ""):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def prepare_crop(job: CropJob) -> dict:
    """Prepare `job`'s crop into its folder (under its lock; a finished one is reused) and return its meta."""
    store = CropStore(Path(job.directory))
    with store.locked():
        meta = store.read_meta()
        if meta is not None:
            return meta
        try:
            meta = _prepare(job, store)
        except Skip as skip:
            meta = {"status": "skipped", "reason": skip.reason, "fix": skip.fix,
                    "label_voxel_size": _label_voxel_size(job)}
        except DataError as err:
            raise DataError(f"{job.name}: {err}") from None
        store.write_meta(dict(meta, name=job.name, scale=list(job.scale)))
        return store.read_meta()


def _prepare(job: CropJob, store: CropStore) -> dict:
    scale = job.scale
    levels = {cls: read_levels(Path(job.crop_path) / cls)[0] for cls in job.classes}
    if not levels:
        raise Skip("none of the toolkit's classes is annotated in it")
    kinds = {cls: _storage_kind(lv, scale) for cls, lv in levels.items()}
    if "mixed" in kinds.values():
        raise Skip(f"labels at {_nm(next(lv.scale for lv in levels.values()))} nm are coarser than the training "
                   f"scale on some axes and finer on others (not supported)")
    boxes = {cls: _class_box(lv, kinds[cls], scale) for cls, lv in levels.items()}
    start = np.min([b[0] for b in boxes.values()], axis=0)
    stop = np.max([b[0] + b[1] for b in boxes.values()], axis=0)
    shape = stop - start
    if shape.min() <= 0:
        raise Skip("the crop is empty at the training scale")
    raw = _prepare_raw(job, store, start, shape)
    classes, foreground = {}, []
    for index, cls in enumerate(job.classes):
        prepare = _prepare_grid_class if kinds[cls] == "grid" else _prepare_native_class
        info, coords = prepare(levels[cls], boxes[cls], start, scale, store, f"label_{cls}.npy")
        classes[cls] = info
        foreground.append(np.concatenate([np.full((len(coords), 1), index), coords], axis=1))
    store.save_array("foreground.npy", np.concatenate(foreground).astype(np.int32))
    finest = min((lv.scale for lv in levels.values()), key=np.prod)
    return {"status": "ready", "grid_start": start.tolist(), "shape": shape.tolist(), "classes": classes,
            "class_order": list(job.classes), "label_voxel_size": list(finest), "raw": raw}


def _label_voxel_size(job: CropJob) -> list[float] | None:
    """The finest voxel size among the crop's classes (for the report), None if it has none."""
    scales = [read_levels(Path(job.crop_path) / cls)[0].scale for cls in job.classes]
    return list(min(scales, key=np.prod)) if scales else None


def _nm(scale) -> str:
    return " x ".join(f"{v:g}" for v in scale)


def _storage_kind(level: Level, scale) -> str:
    finer = [s <= t * (1 + SCALE_TOLERANCE) for s, t in zip(level.scale, scale)]
    coarser = [s >= t * (1 - SCALE_TOLERANCE) for s, t in zip(level.scale, scale)]
    return "grid" if all(finer) else "native" if all(coarser) else "mixed"


def _class_box(level: Level, kind: str, scale) -> tuple[np.ndarray, np.ndarray]:
    """(start, shape) on the training grid of the voxels a class annotates: at least half covered (grid), or
    whose centre lies in the array (native)."""
    lo = np.floor((np.array(level.translation) - np.array(level.scale) / 2) / scale).astype(int) - 1
    hi = np.ceil((np.array(level.translation) + (np.array(level.shape) - 0.5) * level.scale) / scale).astype(int) + 1
    start, stop = [], []
    for a in range(3):
        n = int(hi[a] - lo[a])
        if kind == "grid":
            inside = level_area_maps(level, lo, hi - lo, scale)[a].coverage >= 0.5
        else:
            inside = nearest_index(int(lo[a]), n, scale[a], level.translation[a], level.scale[a], level.shape[a])[1]
        where = np.nonzero(inside)[0]
        start.append(lo[a] + (where[0] if len(where) else 0))
        stop.append(lo[a] + (where[-1] + 1 if len(where) else 0))
    return np.array(start), np.array(stop) - np.array(start)


# ----------------------------------------------------------------------------------------------------
# Raw
# ----------------------------------------------------------------------------------------------------
def _raw_candidates(levels: Sequence[Level], scale) -> list[Level]:
    """Levels finer than or equal to the training scale: the matching one first, then coarsest to finest."""
    fine = [lv for lv in levels if all(s <= t * (1 + SCALE_TOLERANCE) for s, t in zip(lv.scale, scale))]
    matching = [lv for lv in fine if all(abs(s - t) <= t * SCALE_TOLERANCE for s, t in zip(lv.scale, scale))]
    return matching + sorted([lv for lv in fine if lv not in matching], key=lambda lv: -np.prod(lv.scale))


def raw_level_for(raw_path: str, crop_start, crop_shape, scale, margin=RAW_MARGIN):
    """(level, chunk grid, coverage blocks of the box crop +- margin) of the raw level a crop is read from:
    the one matching the training scale, else the coarsest finer one, with chunks over the crop. Skip when
    the crop lies outside the raw volume or no such level has data over it (with the levels that do)."""
    margin = np.asarray(margin)
    region_start, region_shape = np.asarray(crop_start) - margin, np.asarray(crop_shape) + 2 * margin
    levels = read_levels(raw_path)
    if not any(_overlaps(lv, crop_start, crop_shape, scale) for lv in levels):
        raise Skip("crop lies outside its raw volume")
    for level in _raw_candidates(levels, scale):
        grid = present_chunks(level.path)
        blocks = block_present_fraction(level, grid, region_start, region_shape, scale, BLOCK)
        inside_crop = blocks[tuple(slice(m // BLOCK, -(-(m + n) // BLOCK)) for m, n in zip(margin, crop_shape))]
        if inside_crop.max(initial=0.0) > 0:
            return level, grid, blocks
    over = [lv for lv in levels if block_present_fraction(lv, present_chunks(lv.path), crop_start, crop_shape,
                                                           scale, 4 * BLOCK).max(initial=0) > 0]
    where = f"only at {', '.join(_nm(lv.scale) for lv in over)} nm" if over else "at no level"
    raise Skip(f"no raw EM at {_nm(scale)} nm or finer: chunks over this crop exist {where}",
               "fetch its EM at all resolutions (csc fetch-data --fetch-all-em-resolutions), or leave such "
               "crops out of the datasplit (python data.py write-csv --max-scale 8)")


def _prepare_raw(job: CropJob, store: CropStore, crop_start, crop_shape) -> dict:
    """Keep the raw region around the crop where raw exists (cached, or read on demand when large) and write
    the coverage blocks; Skip when there is no raw at or below the training scale over it."""
    scale, margin = job.scale, np.array(RAW_MARGIN)
    region_start, region_shape = crop_start - margin, crop_shape + 2 * margin
    level, grid, blocks = raw_level_for(job.raw_path, crop_start, crop_shape, scale)
    # Keep the part of the region whose blocks have raw: usually the crop and the chunks that overhang it.
    filled = np.argwhere(blocks > 0)
    lo = np.maximum(filled.min(0) * BLOCK, 0)
    hi = np.minimum((filled.max(0) + 1) * BLOCK, region_shape)
    kept_start, kept_shape = region_start + lo, hi - lo
    info = {"level": _level_dict(level), "region_start": (kept_start - crop_start).tolist(),
            "region_shape": kept_shape.tolist()}
    if np.prod(kept_shape) <= RAW_CACHE_VOXELS:
        coverage = _cache_raw(level, grid, kept_start, kept_shape, scale, store)
        info.update(mode="cached", coverage_blocks_start=(kept_start - crop_start).tolist())
    else:
        store.save_array("presence.npy", grid.present)
        coverage = block_present_fraction(level, grid, kept_start, kept_shape, scale, BLOCK)
        info.update(mode="zarr", coverage_blocks_start=(kept_start - crop_start).tolist(),
                    chunks=list(grid.chunks))
    store.save_array("coverage.npy", np.round(coverage * 255).astype(np.uint8))
    info["crop_coverage"] = _crop_coverage(coverage, kept_start - crop_start, crop_shape)
    return info


def _overlaps(level: Level, start, shape, scale) -> bool:
    lo, hi = level.extent()
    box_lo, box_hi = (np.asarray(start) - 0.5) * scale, (np.asarray(start) + np.asarray(shape) - 0.5) * scale
    return bool(np.all(lo < box_hi) and np.all(box_lo < hi))


def _cache_raw(level: Level, grid, start, shape, scale, store: CropStore) -> np.ndarray:
    """Write raw.npy (area rule, z slabs) and raw_valid.npy over the box; a voxel is valid only if all of it is
    backed by existing chunks. Returns the coverage blocks (fraction of valid voxels per block)."""
    import zarr

    source = zarr.open_array(level.path, mode="r")
    shape = tuple(int(v) for v in shape)
    raw = store.open_array("raw.npy", shape)
    valid = np.zeros((shape[0], shape[1], -(-shape[2] // 8)), dtype=np.uint8)
    blocks = [-(-n // BLOCK) for n in shape]
    valid_sum = np.zeros(blocks, dtype=np.float64)
    for z0 in range(0, shape[0], SLAB):  # SLAB is a multiple of BLOCK: slabs hold whole blocks in z
        n = min(SLAB, shape[0] - z0)
        slab_start, slab_shape = (start[0] + z0, start[1], start[2]), (n, shape[1], shape[2])
        ok = present_fraction(level, grid, slab_start, slab_shape, scale) >= 1 - 1e-6
        maps = level_area_maps(level, slab_start, slab_shape, scale)
        values = apply_area(read_window(source, maps), maps) if ok.any() else np.zeros(ok.shape, np.float32)
        raw[z0:z0 + n] = np.where(ok, np.clip(np.rint(values), 0, 255), 0).astype(np.uint8)
        valid[z0:z0 + n] = pack_bits(ok)
        valid_sum[z0 // BLOCK: -(-(z0 + n) // BLOCK)] = _block_sums(ok)
    store.commit("raw.npy", raw)
    store.save_array("raw_valid.npy", valid)
    sizes = np.einsum("z,y,x->zyx", *[np.minimum(BLOCK, n - np.arange(b) * BLOCK).astype(np.float64)
                                      for n, b in zip(shape, blocks)])
    return valid_sum / sizes


def _block_sums(mask: np.ndarray) -> np.ndarray:
    """Sums of `mask` over BLOCK^3 blocks from its origin (the last blocks cut at its end)."""
    padded = [-(-n // BLOCK) * BLOCK for n in mask.shape]
    full = np.zeros(padded, dtype=np.float32)
    full[tuple(slice(0, n) for n in mask.shape)] = mask
    b = [n // BLOCK for n in padded]
    return full.reshape(b[0], BLOCK, b[1], BLOCK, b[2], BLOCK).sum((1, 3, 5))


def _crop_coverage(blocks: np.ndarray, offset, crop_shape) -> float:
    """Fraction of the crop's voxels with raw, from the coverage blocks (which start at `offset`, crop coords)."""
    weights = []
    for a in range(3):
        first = offset[a] + np.arange(blocks.shape[a]) * BLOCK
        overlap = np.clip(np.minimum(first + BLOCK, crop_shape[a]) - np.maximum(first, 0), 0, None)
        weights.append(overlap.astype(np.float64))
    covered = np.einsum("zyx,z,y,x->", blocks.astype(np.float64), *weights)
    return float(covered / np.prod(crop_shape))


def _level_dict(level: Level) -> dict:
    return {"path": level.path, "scale": list(level.scale), "translation": list(level.translation),
            "shape": list(level.shape)}


# ----------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------
def _prepare_grid_class(level: Level, box, crop_start, scale, store: CropStore, name: str):
    """Area rule onto the class box in z slabs; returns (meta, sampled foreground coords in crop coords)."""
    import zarr

    source = zarr.open_array(level.path, mode="r")
    start, shape = box
    maps = level_area_maps(level, start, shape, scale)
    cov = [m.coverage for m in maps]
    packed = store.open_array(name, (int(shape[0]), int(shape[1]), -(-int(shape[2]) // 8)))
    sampler = ForegroundSampler()
    positives = annotated = 0
    for z0 in range(0, int(shape[0]), SLAB):
        n = min(SLAB, int(shape[0]) - z0)
        slab = level_area_maps(level, (start[0] + z0, start[1], start[2]), (n, shape[1], shape[2]), scale)
        fraction = apply_area(read_window(source, slab) > 0, slab)
        coverage = cov[0][z0:z0 + n, None, None] * cov[1][None, :, None] * cov[2][None, None, :]
        positive = (coverage >= 0.5) & (fraction >= coverage / 2 - 1e-6)
        packed[z0:z0 + n] = pack_bits(positive)
        positives += int(positive.sum())
        annotated += int((coverage >= 0.5).sum())
        sampler.add(positive, (z0, 0, 0))
    store.commit(name, packed)
    info = {"storage": "grid", "file": name, "box_start": (start - crop_start).tolist(), "box_shape": shape.tolist(),
            "coverage": [c.tolist() for c in cov], "positives": positives, "annotated": annotated}
    return info, sampler.coordinates() + (start - crop_start)


def _prepare_native_class(level: Level, box, crop_start, scale, store: CropStore, name: str):
    """The class at its own (coarser) resolution, bit-packed in z slabs; counts and foreground coordinates
    are those of the training-grid voxels it maps to (nearest rule)."""
    import zarr

    source = zarr.open_array(level.path, mode="r")
    start, shape = box
    # How many training-grid voxels of the box take each source voxel (nearest rule), per axis.
    multiplicity = []
    for a in range(3):
        index, inside = nearest_index(int(start[a]), int(shape[a]), scale[a], level.translation[a], level.scale[a],
                                      level.shape[a])
        multiplicity.append(np.bincount(index[inside], minlength=level.shape[a]).astype(np.float64))
    packed = store.open_array(name, (level.shape[0], level.shape[1], -(-level.shape[2] // 8)))
    sampler = ForegroundSampler()
    positives = 0.0
    step = max(1, SLAB_VOXELS // (level.shape[1] * level.shape[2]))
    for z0 in range(0, level.shape[0], step):
        fg = np.asarray(source[z0:z0 + step]) > 0
        packed[z0:z0 + len(fg)] = pack_bits(fg)
        positives += float(multiplicity[0][z0:z0 + len(fg)] @ (fg.astype(np.float32) @ multiplicity[2].astype(np.float32))
                           @ multiplicity[1])
        sampler.add(fg, (z0, 0, 0))
    store.commit(name, packed)
    # A sampled source voxel stands for the training voxel nearest to its centre.
    centres = np.asarray(level.translation) + sampler.coordinates() * np.asarray(level.scale)
    coords = np.clip(np.rint(centres / np.asarray(scale)).astype(np.int64) - crop_start, 0, None)
    info = {"storage": "native", "file": name, "level": _level_dict(level), "positives": int(round(positives)),
            "annotated": int(np.prod([m.sum() for m in multiplicity]))}
    return info, np.minimum(coords, np.asarray(start) + np.asarray(shape) - crop_start - 1)


class ForegroundSampler:
    """A uniform sample of at most FOREGROUND_SAMPLES foreground coordinates of masks added slab by slab: each
    slab keeps at most that many (uniformly), and the final draw weights each kept coordinate by how many it
    stands for, so memory stays bounded however many foreground voxels a crop has."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.kept, self.weights = [], []

    def add(self, mask: np.ndarray, offset) -> None:
        flat = np.flatnonzero(mask)
        if len(flat) == 0:
            return
        stand_for = max(1.0, len(flat) / FOREGROUND_SAMPLES)
        if len(flat) > FOREGROUND_SAMPLES:
            flat = np.sort(self.rng.choice(flat, FOREGROUND_SAMPLES, replace=False))
        self.kept.append(np.stack(np.unravel_index(flat, mask.shape), axis=1) + np.asarray(offset))
        self.weights.append(np.full(len(flat), stand_for))

    def coordinates(self) -> np.ndarray:
        if not self.kept:
            return np.zeros((0, 3), dtype=np.int64)
        coords, weights = np.concatenate(self.kept), np.concatenate(self.weights)
        if len(coords) > FOREGROUND_SAMPLES:
            pick = self.rng.choice(len(coords), FOREGROUND_SAMPLES, replace=False, p=weights / weights.sum())
            coords = coords[np.sort(pick)]
        return coords.astype(np.int64)
