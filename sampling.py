"""Patch sampling: what a model consumes (`PatchSpec`), training patches with class-balanced centres placed
where raw EM exists, and dihedral augmentation (`TrainPatches`, keyed by `EpochSampler`), deterministic
validation tiles (`ValidationTiles`: every validation crop in full, or a fixed seeded subset), the loaders,
and the conversion of a compact uint8 batch into model inputs (`to_model_inputs`).

2D patches hold 1 slice, 2.5D patches 5 slices centred on the target slice, 3D patches (D, H, W). Raw
context beyond a crop comes from around it where EM was fetched; labels beyond a crop, and under missing
raw, are UNANNOTATED (NaN in the target), so they count in no loss or metric.

Why not cellmap-data for sampling (facts page, section 4): it decodes ~25 zarr chunks per array per
sample (12-21 samples/s on 2 cores), its `transpose`/`rotate` transforms are wrong for 2D patches, its
sampler ignores the DDP rank, and it drops crops silently. It is kept as a reference backend in
`cellmap_backend.py`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cache import UNANNOTATED, CachedCrop, CropCache, split_overlaps
from ngff import box_intersection
from crop_prep import BLOCK
from errors import DataError

MAX_DRAWS = 20  # redraws of a training patch whose raw is too much missing


class Patch(NamedTuple):
    raw: np.ndarray        # uint8 [Dr, H, W]; missing raw filled with the mean of the patch's valid raw
    labels: np.ndarray     # uint8 [C, Dl, H, W]; UNANNOTATED where unannotated, beyond the crop, or raw missing
    missing: float         # fraction of the raw that is missing (no fetched EM)


def cut_patch(crop: CachedCrop, start: Sequence[int], raw_shape: Sequence[int], label_shape: Sequence[int]) -> Patch:
    """Raw [Dr,H,W] starting at crop-coordinate `start` and labels [C,Dl,H,W] for the same y/x window, their
    z extent centred in the raw's (Dl = 1 for 2D/2.5D). Where raw EM is missing the labels carry no
    supervision, and the raw is filled with the mean of the valid raw rather than zeros, which read as dark
    membrane in EM."""
    raw, valid = crop.raw_window(start, raw_shape)
    lz = (raw_shape[0] - label_shape[0]) // 2
    labels = crop.label_window((start[0] + lz, start[1], start[2]), label_shape)
    labels[:, ~valid[lz: lz + label_shape[0]]] = UNANNOTATED
    missing = 1.0 - float(valid.mean())
    if 0 < missing < 1:
        raw[~valid] = int(round(float(raw[valid].mean())))
    return Patch(raw, labels, missing)


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


class UsableCentres:
    """Where a training patch of `raw_shape` may be centred in a crop with at most `max_missing` of its raw
    missing: the BLOCK^3 blocks of the crop whose patch footprint (in blocks) is covered at least
    1 - max_missing on average (an estimate, checked exactly when a patch is cut), and inside the crop."""

    def __init__(self, crop: CachedCrop, raw_shape: Sequence[int], max_missing: float):
        from scipy.ndimage import uniform_filter

        coverage, self.origin = crop.coverage_blocks
        half = [2 * max(0, math.ceil(p / 2 / BLOCK - 0.5)) + 1 for p in raw_shape]
        score = uniform_filter(coverage, size=half, mode="constant", cval=0.0)
        # in-crop voxels of every block, per axis
        spans = []
        for a in range(3):
            lo = self.origin[a] + np.arange(coverage.shape[a]) * BLOCK
            spans.append((np.maximum(lo, 0), np.minimum(lo + BLOCK, crop.shape[a])))
        sizes = [np.clip(hi - lo, 0, None) for lo, hi in spans]
        volume = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
        self.usable = (score >= 1 - max_missing - 1e-6) & (volume > 0)
        self.spans = spans
        self.block_volume = np.where(self.usable, volume, 0).astype(np.float64)
        self.volume = float(self.block_volume.sum())
        self.best = np.unravel_index(int(np.argmax(np.where(volume > 0, score, -1))), score.shape)

    def block_of(self, coords: np.ndarray) -> np.ndarray:
        return (np.asarray(coords) - self.origin) // BLOCK

    def contains(self, coords: np.ndarray) -> np.ndarray:
        """[N] whether each crop voxel (z, y, x) lies in a usable block."""
        blocks = self.block_of(coords)
        inside = np.all((blocks >= 0) & (blocks < self.usable.shape), axis=1)
        ok = np.zeros(len(coords), dtype=bool)
        ok[inside] = self.usable[tuple(blocks[inside].T)]
        return ok

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """A uniform usable centre (crop coordinates)."""
        flat = self.block_volume.ravel()
        block = np.unravel_index(int(rng.choice(len(flat), p=flat / self.volume)), self.usable.shape)
        return np.array([rng.integers(self.spans[a][0][block[a]], self.spans[a][1][block[a]]) for a in range(3)])

    def fallback(self) -> np.ndarray:
        """The centre of the best-covered block (a patch there is checked when the sampler is built)."""
        return np.array([(self.spans[a][0][self.best[a]] + self.spans[a][1][self.best[a]] - 1) // 2
                         for a in range(3)])


class TrainPatches(Dataset):
    """Class-balanced random patches from the training crops, placed where raw EM exists.

    With probability `foreground_fraction` a sample is centred on a stored foreground voxel of a class
    drawn uniformly among classes with usable training positives (then a crop drawn uniformly among crops
    holding that class); otherwise a crop is drawn in proportion to its usable volume and the centre
    uniformly in it. A patch whose raw is more than `max_missing` missing is drawn again (MAX_DRAWS times at
    most, then the crop's best-covered centre, checked when the sampler is built); a crop with no usable
    centre is left out (`unusable`). The centre voxel is the target slice for 2D/2.5D. Different ranks get
    different samples.

    Where a training crop overlaps a validation crop (the real download nests fine crops in coarse ones, and
    a datasplit of one's own may split them), the shared voxels are held out: their labels are UNANNOTATED,
    no foreground centre lies there, and a patch more than `max_missing` held out is drawn again, so
    validation never scores labels the model was trained on (the raw there may still be seen as input).
    """

    def __init__(self, cache: CropCache, spec: PatchSpec, seed: int, rank: int = 0,
                 foreground_fraction: float = 0.5, augment: bool = True, max_missing: float = 0.25):
        self.spec, self.seed, self.rank = spec, seed, rank
        self.foreground_fraction, self.augment, self.max_missing = foreground_fraction, augment, max_missing
        self.crops, self.centres, self.unusable = [], [], []
        held: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for train, validate, _ in split_overlaps(cache):
            lo = np.array(validate.grid_start) - np.array(train.grid_start)   # in the training crop's coordinates
            held.setdefault(train.name, []).append((lo, lo + np.array(validate.shape)))
        for crop in cache.split("train"):
            centres = UsableCentres(crop, spec.raw_shape, max_missing)
            start = centres.fallback() - np.array(spec.raw_shape) // 2
            if centres.volume == 0 or cut_patch(crop, start, spec.raw_shape, spec.label_shape).missing > max_missing:
                self.unusable.append((crop.name, f"no patch centre with at most {max_missing:.0%} of a "
                                                 f"{'x'.join(map(str, spec.raw_shape))} patch's raw missing"))
                continue
            self.crops.append(crop)
            self.centres.append(centres)
        if not self.crops:
            raise DataError("no training crop has a usable patch centre (see the data report)")
        self.held_out = [held.get(c.name, []) for c in self.crops]
        self.foreground = [c.foreground[self.centres[i].contains(c.foreground[:, 1:])
                                        & ~inside_boxes(c.foreground[:, 1:], self.held_out[i])]
                           for i, c in enumerate(self.crops)]
        holders = np.stack([np.bincount(fg[:, 0], minlength=len(cache.classes)) > 0 for fg in self.foreground])
        self.fg_classes = np.nonzero(holders.any(axis=0))[0]
        self.crops_with_class = {int(k): np.nonzero(holders[:, k])[0] for k in self.fg_classes}
        volumes = np.array([c.volume for c in self.centres])
        self.volume_p = volumes / volumes.sum()

    def __len__(self) -> int:  # keys come from EpochSampler; the length is nominal
        return 1 << 30

    def sample_shares(self) -> dict[str, float]:
        """The expected share of samples drawn from each crop (the sampler's probabilities)."""
        fg = self.foreground_fraction if len(self.fg_classes) else 0.0
        share = (1 - fg) * self.volume_p
        for k in self.fg_classes:
            holders = self.crops_with_class[int(k)]
            share[holders] += fg / len(self.fg_classes) / len(holders)
        return {c.name: float(p) for c, p in zip(self.crops, share)}

    def _draw(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        if len(self.fg_classes) and rng.random() < self.foreground_fraction:
            k = int(rng.choice(self.fg_classes))
            ci = int(rng.choice(self.crops_with_class[k]))
            fg = self.foreground[ci]
            rows = np.nonzero(fg[:, 0] == k)[0]
            return ci, fg[rows[rng.integers(len(rows))], 1:]
        ci = int(rng.choice(len(self.crops), p=self.volume_p))
        return ci, self.centres[ci].draw(rng)

    def patch(self, key) -> tuple[Patch, np.random.Generator]:
        """The patch sample `key` = (epoch, i) is cut from (before augmentation), and its generator."""
        epoch, i = key
        rng = np.random.default_rng([self.seed, self.rank, epoch, i])
        half = np.array(self.spec.raw_shape) // 2
        for _ in range(MAX_DRAWS):
            ci, centre = self._draw(rng)
            patch, held = self._cut(ci, centre - half)
            if patch.missing <= self.max_missing and held <= self.max_missing:
                return patch, rng
        return self._cut(ci, self.centres[ci].fallback() - half)[0], rng

    def _cut(self, ci: int, start: np.ndarray) -> tuple[Patch, float]:
        """The patch at `start` with the labels of held-out voxels masked, and the share of them."""
        patch = cut_patch(self.crops[ci], start, self.spec.raw_shape, self.spec.label_shape)
        if not self.held_out[ci]:
            return patch, 0.0
        lz = (self.spec.raw_shape[0] - self.spec.label_shape[0]) // 2
        label_start = np.array(start) + np.array([lz, 0, 0])
        held = np.zeros(self.spec.label_shape, dtype=bool)
        for lo, hi in self.held_out[ci]:
            shared = box_intersection(lo - label_start, hi - label_start, 0, np.array(self.spec.label_shape))
            if shared is not None:
                held[tuple(slice(int(a), int(b)) for a, b in zip(*shared))] = True
        patch.labels[:, held] = UNANNOTATED
        return patch, float(held.mean())

    def __getitem__(self, key) -> dict:
        patch, rng = self.patch(key)
        raw, labels = patch.raw, patch.labels
        if self.augment:
            raw, labels = augment(raw, labels, rng, flip_z=True)
        return format_sample(raw, labels, self.spec.dims)


def inside_boxes(coords: np.ndarray, boxes: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[N] whether each voxel (z, y, x) lies in any of the [lo, hi) boxes."""
    inside = np.zeros(len(coords), dtype=bool)
    for lo, hi in boxes:
        inside |= np.all((coords >= lo) & (coords < hi), axis=1)
    return inside


def tile_starts(length: int, tile: int, step: int | None = None) -> list[int]:
    """Tile origins covering [0, length): a grid of `step` centred on the crop (overhang < tile/2 each side)."""
    step = step or tile
    n = max(1, math.ceil(max(length - tile, 0) / step) + 1)
    total = (n - 1) * step + tile
    first = -((total - length) // 2)
    return [first + k * step for k in range(n)]


class TileList(Sequence):
    """Validation tiles (crop index, z, y, x) as a lazy sequence: a large crop has millions of tiles."""

    def __init__(self, starts: list[list[np.ndarray]], indices: np.ndarray):
        self.starts, self.indices = starts, indices
        self.counts = np.array([np.prod([len(s) for s in crop]) for crop in starts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, int, int, int]:
        flat = int(self.indices[j])
        ci = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        z, y, x = np.unravel_index(flat - int(self.offsets[ci]), [len(s) for s in self.starts[ci]])
        sz, sy, sx = self.starts[ci]
        return ci, int(sz[z]), int(sy[y]), int(sx[x])


class ValidationTiles(Dataset):
    """Deterministic tiles over the validation crops: all of them (each annotated voxel covered exactly once),
    or a fixed subset of `max_tiles` drawn with `seed` (the same every epoch).

    2D/2.5D: one tile per (z slice, y/x tile) with the model's z context; 3D: (D,H,W) tiles. Tiles may
    overhang the crop: the overhang is UNANNOTATED in the labels, and its raw comes from around the crop
    where it exists (missing raw is masked, as in training).
    """

    def __init__(self, cache: CropCache, spec: PatchSpec, split: str = "validate", rank: int = 0,
                 world_size: int = 1, max_tiles: int | None = None, seed: int = 0):
        self.crops = cache.split(split)
        self.spec = spec
        starts = [[np.array(tile_starts(n, t)) for n, t in zip(crop.shape, spec.label_shape)] for crop in self.crops]
        total = self.total = int(sum(np.prod([len(s) for s in crop]) for crop in starts))
        indices = np.arange(total)
        if max_tiles is not None and max_tiles < total:
            indices = np.sort(np.random.default_rng(seed).choice(total, max_tiles, replace=False))
        self.all_tiles = TileList(starts, indices)
        self.tiles = TileList(starts, indices[rank::world_size])

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, j: int) -> dict:
        ci, z, y, x = self.tiles[j]
        z_raw = z - (self.spec.raw_shape[0] - self.spec.label_shape[0]) // 2
        patch = cut_patch(self.crops[ci], (z_raw, y, x), self.spec.raw_shape, self.spec.label_shape)
        return format_sample(patch.raw, patch.labels, self.spec.dims)


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
