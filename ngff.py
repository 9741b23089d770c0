"""OME-NGFF 0.4 multiscale arrays (zarr v2): reading their levels, reading a box of one on the training grid,
and the metadata that writing one needs.

Coordinates follow OME-NGFF: a level's translation is the physical centre of its first voxel, so a 2x level
is offset by half a fine voxel (cellmap-data reads it as the corner). Every spatial tuple is (z, y, x) in nm.
The training grid at voxel size `scale` has voxel j centred at j * scale.

Only arrays stored z, y, x are read (CellMap's layout). An array whose metadata lists another axis order is
refused with the fix, not transposed: metadata and data cannot be told apart when only one of them is
reversed, and every reader here indexes [z, y, x].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from errors import DataError

ZYX = ("z", "y", "x")  # the one axis order read: arrays are indexed [z, y, x] everywhere


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

    def extent_text(self) -> str:
        """The world box for messages: `[z0..z1, y0..y1, x0..x1] nm`."""
        return "[" + ", ".join(f"{a:g}..{b:g}" for a, b in zip(*self.extent())) + "] nm"


def read_levels(group_path: str | Path) -> list[Level]:
    """Scale levels of one OME-NGFF multiscale group, finest first. DataError, naming the file, the level and
    the fix, for metadata that would misplace or mis-scale the data: axes other than z, y, x (the readers
    index arrays in that order, so any other order is refused rather than reinterpreted), an array that is
    not 3-D, a voxel size that is not finite and positive or a translation that is not finite, and a level
    whose shape does not cover the finest level's extent within one of its own voxels (the 2x rule of a
    pyramid, for any factor: a level's shape must agree with its scale)."""
    group_path = Path(group_path)
    attrs_file = group_path / ".zattrs"
    if not group_path.is_dir():
        raise DataError(f"zarr group not found: {group_path}")
    try:
        multiscales = json.loads(attrs_file.read_text())["multiscales"][0]
        datasets = multiscales["datasets"]
        axes = tuple(a["name"] if isinstance(a, dict) else str(a) for a in multiscales.get("axes", ZYX))
    except (OSError, KeyError, IndexError, TypeError, json.JSONDecodeError):
        raise DataError(f"{attrs_file}: missing or invalid OME-NGFF 'multiscales' metadata "
                        f"(each CellMap array group needs multiscales[0].datasets with scale/translation)")
    if axes != ZYX:
        raise DataError(f"{attrs_file}: axes {', '.join(axes)}; only arrays stored z, y, x are read (transpose the "
                        f"arrays, their scale and translation to z, y, x; if the data is stored z, y, x already, "
                        f"correct the axes in the metadata)")
    levels = sorted((_read_level(group_path, ds) for ds in datasets), key=lambda lv: np.prod(lv.scale))
    if not levels:
        raise DataError(f"{attrs_file}: multiscales lists no datasets")
    _check_level_extents(group_path, levels)
    return levels


def _read_level(group_path: Path, dataset: dict) -> Level:
    """One `multiscales[0].datasets` entry with its array's shape and dtype; DataError if unusable."""
    import zarr

    where = f"{group_path / '.zattrs'}: level {dataset.get('path')!r}"
    scale, translation = None, [0.0, 0.0, 0.0]
    for tx in dataset.get("coordinateTransformations", []):
        if tx.get("type") == "scale":
            scale = tx.get("scale")
        elif tx.get("type") == "translation":
            translation = tx.get("translation")
    if scale is None:
        raise DataError(f"{where} has no scale transformation")
    try:
        scale, translation = tuple(map(float, scale)), tuple(map(float, translation))
    except (TypeError, ValueError):
        raise DataError(f"{where}: scale {scale!r} and translation {translation!r} must be lists of numbers") from None
    if len(scale) != 3 or len(translation) != 3:
        raise DataError(f"{where}: scale {list(scale)} and translation {list(translation)} need one value per axis "
                        f"(z, y, x)")
    # A voxel size of 0, NaN or below 0 puts every voxel nowhere or mirrored: the targets would be silently wrong.
    if not all(np.isfinite(s) and s > 0 for s in scale):
        raise DataError(f"{where} has voxel size (scale) {list(scale)} nm; every voxel size must be finite and "
                        f"positive (fix the level's scale transformation)")
    if not all(np.isfinite(translation)):
        raise DataError(f"{where} has translation {list(translation)} nm; every translation must be finite")
    try:
        arr = zarr.open_array(str(group_path / dataset["path"]), mode="r")
    except Exception:
        raise DataError(f"zarr array missing or unreadable: {group_path / str(dataset.get('path'))}") from None
    if arr.ndim != 3:
        raise DataError(f"{where}: the array {group_path / dataset['path']} has {arr.ndim} dimensions; the axes "
                        f"z, y, x need 3")
    return Level(str(group_path / dataset["path"]), scale, translation, tuple(int(n) for n in arr.shape),
                 str(arr.dtype))


def _check_level_extents(group_path: Path, levels: Sequence[Level]) -> None:
    """Every level covers the finest level's box within one of its own voxels (a downsampled size rounds up
    or down); otherwise a shape or a scale in the metadata is wrong."""
    finest = levels[0]
    lo0, hi0 = finest.extent()
    for level in levels[1:]:
        lo, hi = level.extent()
        tolerance = np.array(level.scale) * (1 + 1e-6)
        if np.any(np.abs(lo - lo0) > tolerance) or np.any(np.abs(hi - hi0) > tolerance):
            raise DataError(f"{group_path}: level {Path(level.path).name!r} (shape {level.shape}, scale "
                            f"{list(level.scale)} nm) covers {level.extent_text()} but level "
                            f"{Path(finest.path).name!r} (shape {finest.shape}, scale {list(finest.scale)} nm) covers "
                            f"{finest.extent_text()}; a level's shape must agree with its scale (fix the scale in the "
                            f"metadata or the array)")


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


def box_intersection(lo_a, hi_a, lo_b, hi_b) -> tuple[np.ndarray, np.ndarray] | None:
    """The intersection [lo, hi) of two boxes [lo_a, hi_a) and [lo_b, hi_b) (per-axis arrays, any unit), or
    None when they share no volume (touching boxes share none)."""
    lo, hi = np.maximum(lo_a, lo_b), np.minimum(hi_a, hi_b)
    return (lo, hi) if np.all(hi > lo) else None


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
