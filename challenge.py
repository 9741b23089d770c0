"""From the toolkit's predictions to the challenge's numbers: a crop's probabilities on the 8-nm training
grid brought to a truth crop's own grid (its voxel size, translation and shape), instance post-processing,
and scoring under the official rules (official.py) or writing the official submission (submission.py).

Semantic labels: the 8-nm probabilities are interpolated trilinearly at the truth's voxel centres (world
coordinates, OME-NGFF voxel-centre convention; beyond the 8-nm box the edge value), then thresholded (0.5,
or a per-class threshold tuned on other crops). Instance labels (official.is_instance_class, nuc here):
threshold, 3D connected components on the 8-nm grid, components smaller than a minimum size removed
(default: a low quantile of the instance sizes in the training labels), optional hole filling, then ids
taken by the nearest 8-nm voxel of each truth voxel. The arrays handed to the scorer or the submission are
on the truth's grid already, so the evaluator's own resampling (which snaps translations to whole voxels and
drops corners of upsampled blocks) does not touch them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

import official
from cache import CropCache
from ngff import read_levels

SLAB = 32  # truth z slices produced at a time


@dataclass
class CropPrediction:
    """Probabilities [C, Z, Y, X] (float32, host) of one crop box on the training grid."""

    probs: np.ndarray
    grid_start: tuple[int, int, int]
    scale: tuple[float, float, float]
    classes: tuple[str, ...]

    def _axis_weights(self, axis: int, voxel: float, translation: float, n: int):
        """(lower index, upper index, upper weight) of linear interpolation at the truth voxel centres."""
        u = (translation + np.arange(n) * voxel) / self.scale[axis] - self.grid_start[axis]
        last = self.probs.shape[axis + 1] - 1
        u = np.clip(u, 0, last)
        lo = np.minimum(np.floor(u).astype(np.int64), max(last - 1, 0))
        return lo, np.minimum(lo + 1, last), (u - lo).astype(np.float32)

    def on_grid(self, cls: str, voxel, translation, shape, z0: int = 0, z1: int | None = None) -> np.ndarray:
        """float32 [z1 - z0, Y, X]: the class's probability at truth voxel centres z0 .. z1 - 1."""
        z1 = shape[0] if z1 is None else z1
        p = self.probs[self.classes.index(cls)]
        (zl, zh, zw), (yl, yh, yw), (xl, xh, xw) = (self._axis_weights(a, voxel[a], translation[a], shape[a])
                                                    for a in range(3))
        zl, zh, zw = zl[z0:z1], zh[z0:z1], zw[z0:z1]
        along_z = p[zl] * (1 - zw)[:, None, None] + p[zh] * zw[:, None, None]
        along_y = along_z[:, yl] * (1 - yw)[None, :, None] + along_z[:, yh] * yw[None, :, None]
        return along_y[:, :, xl] * (1 - xw)[None, None, :] + along_y[:, :, xh] * xw[None, None, :]

    def instance_ids(self, cls: str, threshold: float, min_size: int, fill_holes: bool) -> np.ndarray:
        """Instance ids of a class on the training grid (official.postprocess_instances)."""
        return official.postprocess_instances(self.probs[self.classes.index(cls)], threshold=threshold,
                                              min_size_voxels=min_size, fill_holes=fill_holes)

    def ids_on_grid(self, ids: np.ndarray, voxel, translation, shape, z0: int = 0, z1: int | None = None):
        """Instance ids at truth voxel centres z0 .. z1 - 1: those of the nearest training-grid voxel."""
        z1 = shape[0] if z1 is None else z1
        index = []
        for a in range(3):
            u = (translation[a] + np.arange(shape[a]) * voxel[a]) / self.scale[a] - self.grid_start[a]
            index.append(np.clip(np.floor(u + 0.5).astype(np.int64), 0, ids.shape[a] - 1))
        return ids[np.ix_(index[0][z0:z1], index[1], index[2])]


@dataclass
class Postprocessing:
    """How probabilities become the labels the challenge scores."""

    thresholds: dict[str, float] = field(default_factory=dict)   # per class; 0.5 where absent
    min_sizes: dict[str, int] = field(default_factory=dict)      # instance classes, in training-grid voxels
    fill_holes: bool = False

    def threshold(self, cls: str) -> float:
        return self.thresholds.get(cls, 0.5)

    def describe(self) -> dict:
        return {"thresholds": self.thresholds or "0.5 for every class", "min_size_voxels_8nm": self.min_sizes,
                "fill_holes": self.fill_holes}


def label_on_truth_grid(pred: CropPrediction, cls: str, post: Postprocessing, voxel, translation, shape,
                        ids: np.ndarray | None = None, out=None):
    """The array to score or submit for one class: uint8 0/1 (semantic) or instance ids, on the truth's grid,
    built in z slabs (into `out`, e.g. a submission's zarr array, or a new numpy array). `ids` are the class's
    instance ids on the training grid (computed once per crop)."""
    instance = official.is_instance_class(cls)
    if out is None:
        out = np.zeros(tuple(shape), dtype=ids.dtype if instance else np.uint8)
    for z0 in range(0, shape[0], SLAB):
        z1 = min(shape[0], z0 + SLAB)
        if instance:
            out[z0:z1] = pred.ids_on_grid(ids, voxel, translation, shape, z0, z1)
        else:
            out[z0:z1] = pred.on_grid(cls, voxel, translation, shape, z0, z1) >= post.threshold(cls)
    return out


def score_validation_crop(pred: CropPrediction, crop_name: str, crop_path: str, classes: Sequence[str],
                          post: Postprocessing) -> list[dict]:
    """official.score_crop_label entries of one validation crop: every class of `classes` it annotates, scored
    at the truth's native resolution against its groundtruth array (and `<class>_mask` where there is one)."""
    import zarr

    entries = []
    for cls in classes:
        class_dir = Path(crop_path) / cls
        if not class_dir.is_dir():
            continue
        level = read_levels(class_dir)[0]
        truth = zarr.open_array(level.path, mode="r")
        mask_dir = Path(crop_path) / f"{cls}_mask"
        mask = zarr.open_array(read_levels(mask_dir)[0].path, mode="r") if mask_dir.is_dir() else None
        ids = (pred.instance_ids(cls, post.threshold(cls), post.min_sizes.get(cls, 0), post.fill_holes)
               if official.is_instance_class(cls) else None)
        array = label_on_truth_grid(pred, cls, post, level.scale, level.translation, level.shape, ids)
        entries.append(official.score_crop_label(crop_name, cls, truth, level.scale, level.translation, pred=array,
                                                 mask=mask))
    return entries


def training_min_sizes(cache: CropCache, classes: Sequence[str], largest_crop: int = 1 << 27) -> dict[str, int]:
    """Per instance class, official.typical_min_size of the connected components of its training labels on the
    training grid (crops over `largest_crop` voxels are left out of this statistic)."""
    import cc3d

    sizes: dict[str, list[int]] = {}
    for cls in classes:
        if not official.is_instance_class(cls):
            continue
        k = cache.classes.index(cls)
        for crop in cache.split("train"):
            if not crop.annotated[k] or np.prod(crop.shape) > largest_crop:
                continue
            labels = crop.label_window((0, 0, 0), crop.shape)[k]
            components = cc3d.connected_components(labels == 1, connectivity=26)
            sizes.setdefault(cls, []).extend(np.bincount(components.ravel())[1:].tolist())
    return {cls: official.typical_min_size(s) for cls, s in sizes.items() if s}


def tune_thresholds(sweeps: dict[str, dict], folds: dict[str, int]) -> dict[str, dict[str, float]]:
    """Two-fold thresholds: for the crops of each fold, per class, the threshold of the best pooled 8-nm Dice on
    the crops of the other fold (never on the crops they are applied to). `sweeps[crop]` = per class
    {threshold: (tp, fp, fn)}; returns per crop {class: threshold}."""
    out = {}
    for crop, fold in folds.items():
        others = [c for c, f in folds.items() if f != fold]
        chosen = {}
        for cls in sweeps[crop]:
            pooled: dict[float, np.ndarray] = {}
            for other in others:
                for t, counts in sweeps[other].get(cls, {}).items():
                    pooled[t] = pooled.get(t, 0) + np.asarray(counts, dtype=np.int64)
            scored = {t: (2 * c[0] / (2 * c[0] + c[1] + c[2]) if (2 * c[0] + c[1] + c[2]) else 1.0)
                      for t, c in pooled.items()}
            if scored:
                chosen[cls] = max(sorted(scored), key=lambda t: (scored[t], -abs(t - 0.5)))
        out[crop] = chosen
    return out
