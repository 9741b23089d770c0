"""OME-NGFF 0.4 multiscale arrays (zarr v2): reading their levels, reading a box of one on the training grid,
and the metadata that writing one needs.

Coordinates follow OME-NGFF: a level's translation is the physical centre of its first voxel, so a 2x level
is offset by half a fine voxel (cellmap-data reads it as the corner). Every spatial tuple is (z, y, x) in nm.
The training grid at voxel size `scale` has voxel j centred at j * scale.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from errors import DataError


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
