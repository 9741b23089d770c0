"""Which raw EM chunks `csc fetch-data` copies for one crop: the rule of the official
cli/fetch_data.py and utils/fetch_data.py at 6b9ad68 (read, not copied), as pure functions.

For every level of the raw pyramid the download writes `.zarray` (and the group's metadata); it copies chunks
of a level only when:
1. no axis of the level has length <= 1, and
2. on every axis (voxel size of the level) / (voxel size of the crop's labels) > 0.8, both rounded to 4
   decimals; with `--fetch-all-em-resolutions` the threshold is 0, so every level qualifies;
3. then the chunks overlapping the voxel slice [start - padding, stop + padding) clamped to the array, where
   start / stop are the level's voxels *nearest* to the centres of the crop's first and last voxels
   (xarray `sel(method="nearest")`, pandas rule: a tie goes to the higher index). `stop` is exclusive, so
   the level voxel nearest to the crop's last voxel is not included; an empty slice copies nothing.
`padding` is `--raw-padding` in voxels of each level (the same number on every level and axis).
The label arrays of a crop are copied whole (every file under the crop's group, all their levels).

Coordinates are built as the official reader builds them: arange(n) * scale + translation (OME-NGFF
voxel centres).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RATIO_THRESHOLD = 0.8        # level voxel / label voxel must exceed this on every axis
TRANSFORM_PRECISION = 4      # decimals the official reader rounds voxel sizes to

ChunkRanges = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]   # [first, last + 1) per axis


@dataclass(frozen=True)
class Grid:
    """One voxel grid: voxel size and centre of voxel 0 (z, y, x nm), shape in voxels."""

    scale: tuple[float, float, float]
    translation: tuple[float, float, float]
    shape: tuple[int, int, int]

    def coords(self, axis: int) -> np.ndarray:
        return np.arange(self.shape[axis], dtype=float) * self.scale[axis] + self.translation[axis]


def level_is_fetched(level_scale: Sequence[float], crop_scale: Sequence[float], all_resolutions: bool) -> bool:
    """Rule 2: is this level sampled coarsely enough (relative to the crop's labels) to be copied?"""
    threshold = 0.0 if all_resolutions else RATIO_THRESHOLD
    return all(round(s, TRANSFORM_PRECISION) / round(c, TRANSFORM_PRECISION) > threshold
               for s, c in zip(level_scale, crop_scale))


def nearest_index(coords: np.ndarray, value: float) -> int:
    """Index of the coordinate nearest to `value` (coords increasing); a tie goes to the higher index, values
    beyond either end to that end."""
    right = int(np.searchsorted(coords, value, side="left"))     # first coordinate >= value
    if right == len(coords):
        return len(coords) - 1
    left = right if coords[right] == value else right - 1        # last coordinate <= value
    if left < 0:
        return 0
    return left if abs(coords[left] - value) < abs(coords[right] - value) else right


def crop_region(level: Grid, crop: Grid, padding: int) -> tuple[tuple[int, int], ...]:
    """Rule 3: the voxel slice [start, stop) of `level` copied for `crop`, per axis (may be empty)."""
    region = []
    for axis in range(3):
        coords = level.coords(axis)
        first = crop.translation[axis]
        last = (crop.shape[axis] - 1) * crop.scale[axis] + crop.translation[axis]
        start, stop = nearest_index(coords, first), nearest_index(coords, last)
        region.append((max(start - padding, 0), min(stop + padding, level.shape[axis])))
    return tuple(region)


def chunk_ranges(region: Sequence[tuple[int, int]], chunks: Sequence[int]) -> ChunkRanges | None:
    """The chunks a voxel slice overlaps, [first, last + 1) per axis; None when the slice is empty."""
    if any(stop <= start for start, stop in region):
        return None
    return tuple((start // c, -(-stop // c)) for (start, stop), c in zip(region, chunks))


def fetched_chunks(levels: Sequence[Grid], chunks: Sequence[Sequence[int]], crop: Grid, padding: int = 0,
                   all_resolutions: bool = False) -> dict[int, ChunkRanges]:
    """The chunk ranges copied for `crop`, by level index (levels without chunks are absent)."""
    copied = {}
    for index, (level, level_chunks) in enumerate(zip(levels, chunks)):
        if any(n <= 1 for n in level.shape) or not level_is_fetched(level.scale, crop.scale, all_resolutions):
            continue
        ranges = chunk_ranges(crop_region(level, crop, padding), level_chunks)
        if ranges is not None:
            copied[index] = ranges
    return copied
