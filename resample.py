"""Bringing OME-NGFF arrays onto the training grid, and knowing which of their chunks exist.

The training grid at voxel size s has voxel j centred at j*s, covering [j*s - s/2, j*s + s/2) on each axis.
A source level (voxel size S, translation t = centre of its voxel 0, shape N) has voxel i covering
[t + (i - 1/2) S, t + (i + 1/2) S). Every rule below works per axis on these intervals (`AxisMap`):

- Area rule (raw EM and labels finer than, or equal to, the grid): a grid voxel is the average of the
  source voxels it overlaps, each weighted by the length of the overlap (separably, so by the overlapping
  volume in 3D). For labels this gives, per grid voxel, `coverage` = the fraction of it covered by the
  labelled array and `foreground` = the covered fraction that is foreground. A grid voxel is annotated when
  at least half of it is covered (coverage >= 0.5), and foreground when at least half of its covered
  source voxels are (foreground >= coverage / 2); voxels outside the array count as unannotated, never as
  background. Where the source has exactly the grid's voxel size and is aligned with it, this is a copy.
- Nearest rule (labels coarser than the grid, upsampled per patch, never materialised at the grid's
  resolution): a grid voxel takes the source voxel containing its centre.
- Chunk presence (raw EM): `csc fetch-data` writes every level's .zarray but only some chunks; zarr reads an
  absent chunk as the fill value 0, which is not EM. `present_chunks` lists which chunks exist, and the area
  rule applied to that chunk grid gives, per grid voxel, the fraction backed by data that was written.

Why not a library: scipy.ndimage.zoom and skimage.transform.resize sample points or interpolate on index
grids; neither knows OME-NGFF translations, partial coverage at an array's edge, or missing chunks.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ngff import Level

# Overlaps shorter than this many nanometres are rounding noise of float coordinates, not overlaps.
EDGE_TOLERANCE_NM = 1e-6


@dataclass(frozen=True)
class AxisMap:
    """Area weights of `n` grid voxels on one axis over source cells `first .. first + width`:
    grid voxel j = sum_k weight[j, k] * source[index[j, k]] (indices relative to `first`)."""

    first: int                # first source cell used
    width: int                # number of source cells from `first`
    index: np.ndarray         # [n, K] int64, relative to `first`
    weight: np.ndarray        # [n, K] float64, overlap length / grid voxel size

    @property
    def coverage(self) -> np.ndarray:
        """[n] fraction of each grid voxel covered by the source cells (1 inside, < 1 at the edge)."""
        return self.weight.sum(axis=1)


def grid_edges(start: int, n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper world bounds (nm) of grid voxels start .. start + n - 1."""
    centres = (start + np.arange(n)) * float(scale)
    return centres - scale / 2, centres + scale / 2


def voxel_edges(translation: float, scale: float, length: int) -> np.ndarray:
    """[length + 1] world bounds (nm) of a level's voxels along one axis."""
    return translation + (np.arange(length + 1) - 0.5) * float(scale)


def chunk_edges(translation: float, scale: float, length: int, chunk: int) -> np.ndarray:
    """World bounds (nm) of a level's chunks along one axis (the last chunk ends at the array's edge)."""
    starts = np.append(np.arange(0, length, chunk), length)
    return translation + (starts - 0.5) * float(scale)


def area_map(start: int, n: int, scale: float, edges: np.ndarray) -> AxisMap:
    """Area weights of grid voxels start .. start + n - 1 (voxel size `scale`) over source cells with world
    bounds `edges` ([cells + 1], increasing). Grid voxels beyond the cells get weight 0 (no coverage)."""
    return interval_map(*grid_edges(start, n, scale), edges)


def interval_map(lo: np.ndarray, hi: np.ndarray, edges: np.ndarray) -> AxisMap:
    """Area weights of target intervals [lo, hi) (world nm) over source cells with bounds `edges`, each weight
    = overlap length / target length."""
    n, cells = len(lo), len(edges) - 1
    first_cell = np.clip(np.searchsorted(edges, lo + EDGE_TOLERANCE_NM, side="right") - 1, 0, cells - 1)
    last_cell = np.clip(np.searchsorted(edges, hi - EDGE_TOLERANCE_NM, side="left") - 1, 0, cells - 1)
    k = max(1, int((last_cell - first_cell).max(initial=0)) + 1)
    cell = first_cell[:, None] + np.arange(k)[None, :]
    inside = cell <= last_cell[:, None]
    cell = np.minimum(cell, cells - 1)
    overlap = np.minimum(hi[:, None], edges[cell + 1]) - np.maximum(lo[:, None], edges[cell])
    weight = np.where(inside & (overlap > EDGE_TOLERANCE_NM), overlap, 0.0) / (hi - lo)[:, None]
    used = weight > 0
    if not used.any():
        return AxisMap(0, 0, np.zeros((n, 1), np.int64), np.zeros((n, 1)))
    first = int(cell[used].min())
    width = int(cell[used].max()) - first + 1
    return AxisMap(first, width, np.where(used, cell - first, 0), weight)


def level_area_maps(level: Level, start: Sequence[int], shape: Sequence[int], scale: Sequence[float]) -> list[AxisMap]:
    """Per-axis area maps of the grid box [start, start + shape) over `level`'s voxels."""
    return [area_map(int(start[a]), int(shape[a]), scale[a], voxel_edges(level.translation[a], level.scale[a],
                                                                          level.shape[a])) for a in range(3)]


def apply_area(source: np.ndarray, maps: Sequence[AxisMap]) -> np.ndarray:
    """float32 [n_z, n_y, n_x]: `source` (the window [first, first + width) of every axis) averaged onto the
    grid with the maps' weights, one axis at a time (each step touches only the overlapping cells)."""
    out = np.asarray(source, dtype=np.float32)
    for axis, m in enumerate(maps):
        out = np.moveaxis(out, axis, 0)
        result = np.zeros((m.index.shape[0],) + out.shape[1:], dtype=np.float32)
        for k in range(m.index.shape[1]):
            w = m.weight[:, k].astype(np.float32).reshape((-1,) + (1,) * (out.ndim - 1))
            result += w * out[m.index[:, k]]
        out = np.moveaxis(result, 0, axis)
    return out


def read_window(array, maps: Sequence[AxisMap]) -> np.ndarray:
    """The source window the maps use, read from a zarr (or numpy) array."""
    return np.asarray(array[tuple(slice(m.first, m.first + max(m.width, 1)) for m in maps)])


# ----------------------------------------------------------------------------------------------------
# Nearest rule (coarse labels)
# ----------------------------------------------------------------------------------------------------
def nearest_index(start: int, n: int, scale: float, translation: float, src_scale: float,
                  length: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, inside) of grid voxels start .. start + n - 1: the source voxel containing each grid
    voxel's centre, and whether that voxel exists."""
    centres = (start + np.arange(n)) * float(scale)
    index = np.floor((centres - translation) / src_scale + 0.5 + 1e-9).astype(np.int64)
    inside = (index >= 0) & (index < length)
    return np.clip(index, 0, max(length - 1, 0)), inside


# ----------------------------------------------------------------------------------------------------
# Chunk presence (raw EM)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkGrid:
    """Which chunks of a zarr v2 array exist on disk."""

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    present: np.ndarray       # bool [chunks per axis]

    @property
    def fraction_present(self) -> float:
        return float(self.present.mean()) if self.present.size else 0.0


def present_chunks(array_path: str | Path) -> ChunkGrid:
    """The chunk grid of a zarr v2 array (spatial axes z, y, x) and which chunk files exist. Chunks are files
    named "i.j.k" (dimension_separator ".", the default) or nested folders "i/j/k" ("/")."""
    array_path = Path(array_path)
    meta = json.loads((array_path / ".zarray").read_text())
    shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
    grid = tuple(math.ceil(n / c) for n, c in zip(shape, chunks))
    present = np.zeros(grid, dtype=bool)
    if meta.get("dimension_separator", ".") == "/":
        for root, _, files in os.walk(array_path):
            parts = Path(root).relative_to(array_path).parts
            for name in files:
                _mark(present, (*parts, name))
    else:
        with os.scandir(array_path) as entries:
            for entry in entries:
                _mark(present, entry.name.split("."))
    return ChunkGrid(shape, chunks, present)


def _mark(present: np.ndarray, parts) -> None:
    """Set the chunk with key `parts` ("i", "j", "k") present; ignore names that are not chunk keys."""
    if len(parts) != present.ndim or not all(p.isdigit() for p in parts):
        return
    index = tuple(int(p) for p in parts)
    if all(i < n for i, n in zip(index, present.shape)):
        present[index] = True


def presence_area_maps(level: Level, grid: ChunkGrid, start: Sequence[int], shape: Sequence[int],
                       scale: Sequence[float]) -> list[AxisMap]:
    """Per-axis area maps of the grid box over the level's chunks (for `apply_area(grid.present, maps)`)."""
    return [area_map(int(start[a]), int(shape[a]), scale[a],
                     chunk_edges(level.translation[a], level.scale[a], grid.shape[a], grid.chunks[a]))
            for a in range(3)]


def present_fraction(level: Level, grid: ChunkGrid, start: Sequence[int], shape: Sequence[int],
                     scale: Sequence[float]) -> np.ndarray:
    """float32 [shape]: the fraction of each grid voxel of the box backed by chunks that exist."""
    maps = presence_area_maps(level, grid, start, shape, scale)
    return apply_area(read_window(grid.present, maps).astype(np.float32), maps)


def block_present_fraction(level: Level, grid: ChunkGrid, start: Sequence[int], shape: Sequence[int],
                           scale: Sequence[float], block: int) -> np.ndarray:
    """float32 [ceil(shape / block)]: the fraction of each block of `block`^3 grid voxels of the box (blocks
    from `start`; the last ones cut at the box's end) backed by chunks that exist. Cheap for any box size:
    it never goes below block resolution."""
    maps = []
    for a in range(3):
        first = start[a] + np.arange(0, shape[a], block)
        last = np.minimum(first + block, start[a] + shape[a])
        maps.append(interval_map((first - 0.5) * scale[a], (last - 0.5) * scale[a],
                                 chunk_edges(level.translation[a], level.scale[a], grid.shape[a], grid.chunks[a])))
    return apply_area(read_window(grid.present, maps).astype(np.float32), maps)


class OnDemandRaw:
    """Raw EM read from a zarr level when a window is asked for (crops too large to cache, test crops): the
    area rule onto the training grid, valid where every chunk the voxel draws on exists. Picklable: the zarr
    array is opened on first use in each process."""

    def __init__(self, level: Level, grid: ChunkGrid, scale: Sequence[float]):
        self.level, self.grid, self.scale = level, grid, tuple(scale)
        self._array = None

    def __getstate__(self):
        return dict(self.__dict__, _array=None)

    def window(self, grid_start: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 raw, bool valid) of the training-grid box [grid_start, grid_start + shape)."""
        valid = present_fraction(self.level, self.grid, grid_start, shape, self.scale) >= 1 - 1e-6
        if not valid.any():
            return np.zeros(tuple(shape), np.uint8), valid
        if self._array is None:
            import zarr

            self._array = zarr.open_array(self.level.path, mode="r")
        maps = level_area_maps(self.level, grid_start, shape, self.scale)
        values = apply_area(read_window(self._array, maps), maps)
        return np.where(valid, np.clip(np.rint(values), 0, 255), 0).astype(np.uint8), valid
