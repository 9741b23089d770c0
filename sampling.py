"""Patch sampling: what a model consumes (`PatchSpec`), training patches with class-balanced centres and
dihedral augmentation (`TrainPatches`, keyed by `EpochSampler`), deterministic validation tiles over every
validation crop (`ValidationTiles`), the loaders, and the conversion of a compact uint8 batch into model
inputs (`to_model_inputs`).

2D patches hold 1 slice, 2.5D patches 5 slices centred on the target slice, 3D patches (D, H, W). Raw
context beyond a crop comes from the cache's margin; labels beyond a crop are UNANNOTATED (NaN in the
target), so they count in no loss or metric.

Why not cellmap-data for sampling (facts page, section 4): it decodes ~25 zarr chunks per array per
sample (12-21 samples/s on 2 cores), its `transpose`/`rotate` transforms are wrong for 2D patches, its
sampler ignores the DDP rank, and it drops crops silently. It is kept as a reference backend in
`cellmap_backend.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cache import UNANNOTATED, CachedCrop, CropCache
from errors import DataError


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
        return format_sample(raw, labels, self.spec.dims)


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


def batch_sanity_line(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str]) -> str:
    """First-batch check: input range, NaN fraction, positive fraction per class among valid voxels."""
    valid = ~torch.isnan(y)
    dims = [0] + list(range(2, y.dim()))
    pos = (torch.nan_to_num(y, nan=0.0) * valid).sum(dims) / valid.sum(dims).clamp_min(1)
    per_class = ", ".join(f"{c} {p:.3f}" for c, p in zip(classes, pos.tolist()))
    return (f"first batch: input {list(x.shape)} range {x.min().item():.3f}..{x.max().item():.3f}, "
            f"target NaN {1 - valid.float().mean().item():.1%}, positive fraction: {per_class}")
