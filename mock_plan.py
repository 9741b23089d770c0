"""What a mock of the real download holds, decided before anything is written: per dataset the raw EM
pyramid, per crop its label arrays (classes, levels, dtypes) and the raw chunks `csc fetch-data` would copy.

The raw pyramid of a dataset (`raw_pyramid`) is not in the manifests; it is derived from all the dataset's
training crops:
- native voxel size (`native_voxel_size`), per axis: the finest v in {finest label voxel x 2^m} between
  1 and 16 nm such that, with raw voxel 0 centred at 0, every crop's corner (translation - voxel / 2) lies
  on the raw voxel corners (labels as coarse as v or coarser) or on the raw corners subdivided by the
  label voxel (finer labels, e.g. 2.62 x 2 x 2 labels on 5.24 x 4 x 4 raw). On the 22 datasets of the
  manifest this finds one answer each (2 nm cos7; 4 nm fly, nacc; 3.24-5.24 x 4 x 4 for the anisotropic
  HeLa, Jurkat, macrophage, SUM159, CTL; 8 nm for the mouse tissues; 4 nm for the 16 nm glomerulus).
  Where no v fits, the rule of the facts page is used: anisotropic labels sit on raw of twice their voxel
  size, isotropic ones on raw of their size capped at 8 nm;
- levels s0..sK, each twice the previous, down to the first whose voxel is >= COARSEST_RAW_NM on every
  axis; translation of level k = (2^k - 1) / 2 x s0 voxel (voxel centres, s0 at 0);
- extent: from 0 to past the far corner of every training crop of the dataset plus RAW_MARGIN_NM.
Label arrays: each class group has LABEL_LEVELS levels, s_k at the crop's voxel x 2^k (voxel-centre
translation, shape floor(n / 2^k)), all copied by the download. Semantic classes and `all` are uint8;
instance classes get uint16, uint32 or uint64 by crop and class, uint32 where uint16 cannot number the
objects that can touch the crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import config_shenron
import fetch_rule
from crop_manifest import ALL_IDS_ARRAY, INSTANCE_CLASSES, CropRow, read_class_table
from mock_world import BODY_IDS, INSTANCE_ID_SPACES, NUCLEUS_IDS

RAW_CHUNKS = (64, 128, 128)        # jrc_cos7-1a s0 .zarray (the other datasets are assumed alike)
LABEL_CHUNKS = (64, 64, 64)
COARSEST_RAW_NM = 64.0
RAW_MARGIN_NM = 4096.0
LABEL_LEVELS = 3
NATIVE_VOXEL_RANGE_NM = (1.0, 16.0)
INSTANCE_DTYPES = ("uint16", "uint32", "uint64")
INSTANCE_ID_BASE = 1000            # instance ids start here, far above 255
# With `label_classes="ours"`: the toolkit's 14 classes, `all` and these two (instance classes beyond the 14).
OUR_EXTRA_CLASSES = ("mito", "cell")


@dataclass(frozen=True)
class RawLevel:
    path: str
    grid: fetch_rule.Grid
    chunks: tuple[int, int, int]


@dataclass(frozen=True)
class DatasetPlan:
    name: str
    native_voxel: tuple[float, float, float]
    native_rule: str                          # "lattice" (fits every crop) or "fallback" (facts-page rule)
    levels: tuple[RawLevel, ...]


@dataclass(frozen=True)
class LabelArray:
    name: str                                 # class name, or "all"
    dtype: str
    levels: tuple[fetch_rule.Grid, ...]       # s0, s1, ...


@dataclass(frozen=True)
class CropPlan:
    row: CropRow
    arrays: tuple[LabelArray, ...]
    raw_chunks: dict[str, fetch_rule.ChunkRanges]   # raw level path -> the chunk ranges copied for this crop
    organelles: bool                                # needs the whole scene, not only nuclei

    @property
    def grid(self) -> fetch_rule.Grid:
        return fetch_rule.Grid(self.row.voxel_size, self.row.translation, self.row.shape)


def _on_raw_corners(crop: CropRow, axis: int, raw_voxel: float) -> bool:
    label_voxel = crop.voxel_size[axis]
    corner = crop.translation[axis] - label_voxel / 2
    pitch = raw_voxel if label_voxel >= raw_voxel * (1 - 1e-6) else label_voxel
    steps = (corner + raw_voxel / 2) / pitch
    return abs(steps - round(steps)) < 1e-3


def native_voxel_size(crops: Sequence[CropRow]) -> tuple[tuple[float, float, float], str]:
    """The raw s0 voxel size of a dataset from all its training crops, and which rule gave it."""
    found = []
    for axis in range(3):
        finest = min(c.voxel_size[axis] for c in crops)
        candidates = [finest * 2.0 ** m for m in range(-6, 7)]
        fits = [v for v in candidates if NATIVE_VOXEL_RANGE_NM[0] <= v <= NATIVE_VOXEL_RANGE_NM[1]
                and all(_on_raw_corners(c, axis, v) for c in crops)]
        found.append(round(fits[0], 6) if fits else None)
    if None not in found:
        return tuple(found), "lattice"
    finest = [min(c.voxel_size[a] for c in crops) for a in range(3)]
    if not math.isclose(finest[0], finest[1]):
        return tuple(2 * v for v in finest), "fallback"
    return tuple(min(v, 8.0) for v in finest), "fallback"


def raw_pyramid(name: str, crops: Sequence[CropRow]) -> DatasetPlan:
    voxel, rule = native_voxel_size(crops)
    far = np.max([c.box_nm()[1] for c in crops], axis=0) + RAW_MARGIN_NM
    shape = np.ceil((far + np.asarray(voxel) / 2) / np.asarray(voxel)).astype(int)
    levels, k = [], 0
    while True:
        scale = tuple(v * 2 ** k for v in voxel)
        translation = tuple((2 ** k - 1) / 2 * v for v in voxel)
        levels.append(RawLevel(f"s{k}", fetch_rule.Grid(scale, translation, tuple(int(n) for n in shape)),
                               RAW_CHUNKS))
        if min(scale) >= COARSEST_RAW_NM:
            return DatasetPlan(name, voxel, rule, tuple(levels))
        shape, k = shape // 2, k + 1


def label_levels(row: CropRow) -> tuple[fetch_rule.Grid, ...]:
    levels = []
    for k in range(LABEL_LEVELS):
        shape = tuple(n // 2 ** k for n in row.shape)
        if min(shape) < 1:
            break
        levels.append(fetch_rule.Grid(tuple(v * 2 ** k for v in row.voxel_size),
                                      tuple(t + (2 ** k - 1) / 2 * v for t, v in zip(row.translation, row.voxel_size)),
                                      shape))
    return tuple(levels)


def selected_classes(row: CropRow, label_classes) -> tuple[str, ...]:
    """The arrays a crop gets: "all" = every class of its row and `all`; "ours" = the toolkit's 14 it has,
    `all` and OUR_EXTRA_CLASSES it has; a sequence of names = exactly those it has (`all` only if named)."""
    if label_classes == "all":
        return row.classes + (ALL_IDS_ARRAY,)
    if label_classes == "ours":
        wanted = set(config_shenron.ALL_CLASSES) | set(OUR_EXTRA_CLASSES)
        return tuple(c for c in row.classes if c in wanted) + (ALL_IDS_ARRAY,)
    names = set(label_classes)
    return tuple(c for c in row.classes if c in names) + ((ALL_IDS_ARRAY,) if ALL_IDS_ARRAY in names else ())


def instance_dtype(row: CropRow, name: str) -> str:
    """uint16 / uint32 / uint64 in turn over crops and classes; uint32 where uint16 runs out of ids."""
    dtype = INSTANCE_DTYPES[(row.crop_id + INSTANCE_CLASSES.index(name)) % len(INSTANCE_DTYPES)]
    space = INSTANCE_ID_SPACES.get(name, BODY_IDS)
    if dtype == "uint16" and INSTANCE_ID_BASE + space.capacity(space.window(*row.box_nm())) > 2 ** 16 - 1:
        return "uint32"
    return dtype


def crop_plan(row: CropRow, dataset: DatasetPlan, label_classes, raw_padding: int,
              all_em_resolutions: bool) -> CropPlan:
    table = read_class_table()
    names = selected_classes(row, label_classes)
    arrays = tuple(LabelArray(name, instance_dtype(row, name) if name in INSTANCE_CLASSES else "uint8",
                              label_levels(row)) for name in names)
    # the atomic ids these arrays tell apart; `all` tells apart those of every class of the crop
    needed = set().union(*(table[c].atomic_ids for c in (row.classes if ALL_IDS_ARRAY in names else names)
                           if c in table))
    copied = fetch_rule.fetched_chunks([lv.grid for lv in dataset.levels], [lv.chunks for lv in dataset.levels],
                                       fetch_rule.Grid(row.voxel_size, row.translation, row.shape),
                                       raw_padding, all_em_resolutions)
    return CropPlan(row, arrays, {dataset.levels[i].path: ranges for i, ranges in copied.items()},
                    organelles=not needed <= NUCLEUS_IDS)
