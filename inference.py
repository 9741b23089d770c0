"""Inference with a run's model: rebuilding it from a checkpoint, the blended sliding window over a crop
(streamed over z on the device), test-time augmentation and orthoplane averaging, and the 8-nm metrics of
the sliding window over a set of crops.

The sliding window tiles a crop with tiles of the training patch size that overlap by `overlap` (0.5 = half
a tile) and blends them with Gaussian importance weights (sigma = 1/8 of the tile; tile centres, which saw
the most context, count most); probabilities are averaged in float32, then thresholded at 0.5 for the
metrics. 2D/2.5D models slide over every z slice with their 1 or 5 slices of z context; 3D models slide in
z too. Raw comes from the crop's window (the cache, or raw read on demand); missing raw is filled per tile
as in training (sampling.cut_patch) and the labels under it are not counted; a tile with no EM at all is not
predicted (probability 0 where no other tile reaches: a coarse crop may have 8-nm EM over a small part only). With `tta` each tile is
predicted under the 8 dihedral transforms of its y/x plane and the probabilities averaged; with
`orthoplane` a 2D/2.5D model predicts slices along z, y and x (the training grid is isotropic, and training
augments every orientation of the plane) and the three are averaged: the official toolbox's default for 2D.
"""
from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

import config_shenron as C
from cache import UNANNOTATED
from errors import RunFileError
from metrics import ConfusionCounter
from models import unet_for_run
from runfiles import CHECKPOINTS, RESULTS_FILE, load_checkpoint
from sampling import PatchSpec, tile_starts

BLEND_SIGMA = 1 / 8    # Gaussian sigma as a fraction of the tile size (nnU-Net's choice)
BLEND_FLOOR = 1e-3     # smallest weight: a voxel covered only by tile edges (at a crop border) still counts
COUNT_SLAB_VOXELS = 1 << 24  # probabilities x classes per slab cut from a whole-crop prediction


def load_run_model(run_dir, which: str = "best", device="cpu"):
    """(RunConfig, model in eval mode on `device`, checkpoint dict) of a run folder's best.pt or last.pt,
    the model rebuilt exactly as train_local.py builds it. RunFileError for a folder that is not a run
    or a missing/corrupt checkpoint; ValueError for `which` other than best/last."""
    if which not in CHECKPOINTS:
        raise ValueError(f"--checkpoint {which!r} is not one of {', '.join(CHECKPOINTS)}")
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS_FILE).is_file():
        raise RunFileError(f"{run_dir} is not a run folder (no {RESULTS_FILE}); pass a folder written by "
                           f"train_local.py, e.g. runs/<run_name>")
    path = run_dir / f"{which}.pt"
    if not path.is_file():
        raise RunFileError(f"checkpoint {path} not found (the run has not completed an epoch yet, or the file "
                           f"was removed){'; try --checkpoint last' if which == 'best' else ''}")
    device = torch.device(device)
    state = load_checkpoint(path, map_location=device)
    try:
        cfg = C.RunConfig.from_dict(state["config"])
        model = unet_for_run(cfg)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise RunFileError(f"checkpoint {path} does not match its stored config ({type(err).__name__}: "
                           f"{str(err).splitlines()[0]})") from None
    model = model.to(device)
    if cfg.channels_last and model.dims == 2:
        model = model.to(memory_format=torch.channels_last)
    return cfg, model.eval(), state


# ----------------------------------------------------------------------------------------------------
# Sliding window
# ----------------------------------------------------------------------------------------------------
def blending_weights(label_shape: Sequence[int]) -> np.ndarray:
    """Gaussian importance map over one tile's output [lz, ly, lx], float32, 1 at the centre, at least
    BLEND_FLOOR (an axis of extent 1, the z of a 2D/2.5D output, has weight 1)."""
    weights = np.ones((), dtype=np.float64)
    for n in label_shape:
        offset = np.arange(n) - (n - 1) / 2
        weights = np.multiply.outer(weights, np.exp(-0.5 * (offset / (BLEND_SIGMA * n)) ** 2))
    return np.maximum(weights / weights.max(), BLEND_FLOOR).astype(np.float32)


def sliding_origins(crop_shape: Sequence[int], label_shape: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Output-tile origins (z, y, x) covering the crop; consecutive tiles overlap by `overlap` of a tile
    (with overlap 0 these are exactly the training tiling's tiles, in the same order)."""
    steps = [max(1, round(n * (1 - overlap))) for n in label_shape]
    return list(itertools.product(*(tile_starts(length, n, step)
                                    for length, n, step in zip(crop_shape, label_shape, steps))))


DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))  # the 8 symmetries of the y/x plane
ORTHOPLANES = ((0, 1, 2), (1, 0, 2), (2, 1, 0))  # model slices along z, along y, along x


def _transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, k, dims=(-2, -1)) if k else x   # rot90 by 0 would still copy


def _untransform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1)) if k else x
    return torch.flip(x, dims=(-1,)) if flip else x


def _fill_missing(raw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per tile, missing raw = the rounded mean of its valid raw (as sampling.cut_patch does)."""
    if bool(valid.all()):  # the usual case: nothing to fill
        return raw
    dims = tuple(range(1, raw.dim()))
    count = valid.sum(dims, dtype=torch.float64)
    mean = torch.where(count > 0, (raw.double() * valid).sum(dims) / count.clamp_min(1), 0.0).round()
    shape = (-1,) + (1,) * (raw.dim() - 1)
    return torch.where(valid, raw, mean.to(raw.dtype).view(shape))


def _probabilities(model, x: torch.Tensor, autocast, tta: bool) -> torch.Tensor:
    """sigmoid(model(x)) in float32, averaged over the 8 dihedral transforms of the y/x plane with `tta`."""
    transforms = DIHEDRAL if tta else ((0, False),)
    total = None
    for k, flip in transforms:
        with autocast():
            logits = model(_transform(x, k, flip).contiguous())
        probs = _untransform(torch.sigmoid(logits.float()), k, flip)
        total = probs if total is None else total + probs
    return total / len(transforms)


def _ring_segments(lo: int, hi: int, depth: int) -> Iterator[tuple[int, int]]:
    """Crop planes [lo, hi) cut where they wrap around a ring buffer of `depth` planes (plane q sits at q % depth)."""
    while lo < hi:
        stop = min(hi, (lo // depth + 1) * depth)
        yield lo, stop
        lo = stop


@torch.inference_mode()
def stream_probabilities(model: torch.nn.Module, crop, spec: PatchSpec, device, overlap: float = 0.5,
                         batch_size: int = 4, autocast=contextlib.nullcontext, tta: bool = False,
                         progress: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """The blended sliding window over a crop, as (z0, float32 probabilities [C, dz, Y, X] on `device`)
    slabs in z order: only the planes still open to tiles are held, so memory is bounded for any crop. A slab
    is a view of that buffer, valid until the next one is requested: copy what is kept.

    For each row of tiles (one z origin) the raw they need is read once, tiles are cut from it on the
    device, missing raw is filled as in training, and each tile's probabilities, weighted by the Gaussian
    map, are added into a float32 ring buffer with the weights; a plane is divided and emitted once no later
    tile reaches it, then its place is reused. With overlap 0 every voxel has one tile: the result is that
    tile's sigmoid output."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap {overlap} must be in [0, 1)")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    device = torch.device(device)
    lz = spec.label_shape[0]
    shape = tuple(crop.shape)
    weights = torch.from_numpy(blending_weights(spec.label_shape)).to(device)
    rows: dict[int, list[tuple[int, int]]] = {}
    for z, y, x in sliding_origins(shape, spec.label_shape, overlap):
        rows.setdefault(z, []).append((y, x))
    row_starts = sorted(rows)
    # planes [lo, hi) open while row r is added: lo = the first plane not emitted, hi = the row's last plane
    emitted = [0] + [max(0, min(shape[0], z)) for z in row_starts[1:]]
    depth = max(min(shape[0], z + lz) - lo for z, lo in zip(row_starts, emitted))
    acc = torch.zeros((len(crop.annotated), depth) + shape[1:], device=device)
    wsum = torch.zeros((depth,) + shape[1:], device=device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(v) for v in rows.values()), desc=f"sliding {crop.name}", unit="tile", leave=False,
               disable=not progress)
    for r, z in enumerate(row_starts):
        _add_row(model, crop, spec, z, rows[z], acc, wsum, weights, batch_size, autocast, tta, device)
        bar.update(len(rows[z]))
        done = emitted[r + 1] if r + 1 < len(row_starts) else shape[0]
        for start, stop in _ring_segments(emitted[r], done, depth):   # planes no later row reaches
            a, b = start % depth, start % depth + stop - start
            slab = acc[:, a:b].div_(wsum[a:b].clamp_min_(1e-12))
            yield start, slab
            slab.zero_()
            wsum[a:b].zero_()
    bar.close()
    model.train(was_training)


def _add_row(model, crop, spec: PatchSpec, z: int, tiles, acc, wsum, weights, batch_size: int, autocast, tta: bool,
             device) -> None:
    """Predict one row of tiles (z origin `z`) and add their weighted probabilities into the ring buffers."""
    lz, ly, lx = spec.label_shape
    shape, depth = tuple(crop.shape), wsum.shape[0]
    context_z = (spec.raw_shape[0] - lz) // 2
    y0, x0 = min(t[0] for t in tiles), min(t[1] for t in tiles)
    y1, x1 = max(t[0] for t in tiles) + ly, max(t[1] for t in tiles) + lx
    raw, valid = crop.raw_window((z - context_z, y0, x0), (spec.raw_shape[0], y1 - y0, x1 - x0))
    if not valid.all():  # tiles without any EM are not predicted: their voxels keep probability 0
        tiles = [(y, x) for y, x in tiles if valid[:, y - y0: y - y0 + ly, x - x0: x - x0 + lx].any()]
        if not tiles:
            return
    raw, valid = torch.from_numpy(raw).to(device), torch.from_numpy(valid).to(device)
    # Batches of near-equal size (25 tiles at batch 4: 4,4,4,4,3,3,3, not 4 x 6 + 1): on the CPU a batch of one
    # tile costs about 7 tiles' time in batches of 4.
    count = -(-len(tiles) // batch_size)
    bounds = [round(i * len(tiles) / count) for i in range(count + 1)]
    segments = list(_ring_segments(max(0, z), min(shape[0], z + lz), depth))
    for first, stop in zip(bounds[:-1], bounds[1:]):
        batch = tiles[first:stop]
        cut = lambda a: torch.stack([a[:, y - y0: y - y0 + ly, x - x0: x - x0 + lx] for y, x in batch])
        x_in = _fill_missing(cut(raw), cut(valid)).float().div_(255.0)
        if spec.dims == 3:
            x_in = x_in[:, None]
        probs = _probabilities(model, x_in, autocast, tta)
        if spec.dims == 2:
            probs = probs[:, :, None]             # [B, C, 1, H, W]
        for (y, x), tile in zip(batch, probs):
            ys, xs = slice(max(0, y), min(shape[1], y + ly)), slice(max(0, x), min(shape[2], x + lx))
            inner_yx = (slice(ys.start - y, ys.stop - y), slice(xs.start - x, xs.stop - x))
            for start, stop in segments:
                a, b = start % depth, start % depth + stop - start
                w = weights[(slice(start - z, stop - z), *inner_yx)]
                acc[:, a:b, ys, xs].addcmul_(tile[(slice(None), slice(start - z, stop - z), *inner_yx)], w)
                wsum[a:b, ys, xs] += w


class AxisView:
    """A crop seen with its axes in `order` (e.g. (1, 0, 2): the view's z is the crop's y), with the window
    interface of cache.CachedCrop: a 2D model predicts slices along any axis of it (orthoplane)."""

    def __init__(self, crop, order: Sequence[int]):
        self.crop, self.order = crop, tuple(order)
        self.inverse = tuple(int(i) for i in np.argsort(order))
        self.name, self.annotated = f"{crop.name} (axes {order})", crop.annotated
        self.shape = tuple(crop.shape[a] for a in order)

    def _crop_box(self, start, shape):
        return [start[i] for i in self.inverse], [shape[i] for i in self.inverse]

    def raw_window(self, start, shape):
        raw, valid = self.crop.raw_window(*self._crop_box(start, shape))
        return raw.transpose(self.order).copy(), valid.transpose(self.order).copy()


@torch.no_grad()
def predict_crop(model: torch.nn.Module, crop, spec: PatchSpec, device, overlap: float = 0.5, batch_size: int = 4,
                 autocast=contextlib.nullcontext, tta: bool = False, orthoplane: bool = False,
                 progress: bool = False) -> np.ndarray:
    """Sliding-window probabilities float32 [C, Z, Y, X] over the crop, on the host (`stream_probabilities`).
    With `orthoplane` (2D/2.5D models) the average of slicing along z, y and x."""
    if orthoplane and spec.dims != 2:
        raise ValueError("--orthoplane averages 2D predictions along z, y and x: it needs a 2D or 2.5D model")
    out = np.empty((len(crop.annotated),) + tuple(crop.shape), dtype=np.float32)  # the first pass fills it all
    # Written through a torch view: torch's copy is threaded, numpy's slice assignment is not (measured: 1.3 s
    # against 0.09 s for a 192^3 x 14-class output, 5% of the whole window's time on 2 CPU threads).
    out_t = torch.from_numpy(out)
    for first, order in enumerate(ORTHOPLANES if orthoplane else ORTHOPLANES[:1]):
        view = AxisView(crop, order) if order != (0, 1, 2) else crop
        # the output with its axes in the view's order: the view's slabs go straight into it, no second array
        out_view = out_t.permute((0,) + tuple(1 + a for a in order))
        for z0, probs in stream_probabilities(model, view, spec, device, overlap, batch_size, autocast, tta, progress):
            slab = out_view[:, z0:z0 + probs.shape[1]]
            if first == 0:
                slab.copy_(probs)
            else:
                slab.add_(probs.cpu())
    if orthoplane:
        out_t.div_(len(ORTHOPLANES))
    return out


def crop_slabs(model: torch.nn.Module, crop, spec: PatchSpec, device, overlap: float, batch_size: int,
               autocast=contextlib.nullcontext, tta: bool = False, orthoplane: bool = False,
               progress: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """(z0, probabilities [C, dz, Y, X] on `device`) slabs of a crop: streamed, or (orthoplane) cut from the
    averaged whole-crop prediction, which then is the one full-size float32 array held."""
    if not orthoplane:
        yield from stream_probabilities(model, crop, spec, device, overlap, batch_size, autocast, tta, progress)
        return
    probs = predict_crop(model, crop, spec, device, overlap, batch_size, autocast, tta, True, progress)
    step = max(1, COUNT_SLAB_VOXELS // (probs.shape[0] * probs.shape[2] * probs.shape[3]))
    for z0 in range(0, probs.shape[1], step):
        yield z0, torch.from_numpy(probs[:, z0:z0 + step]).to(device)


def labels_for_counting(crop, z0: int, depth: int) -> torch.Tensor:
    """Target [1, C, dz, Y, X] of a crop's z slab: labels, NaN where unannotated or where raw is missing
    (as training and the training tiling count them)."""
    labels = crop.label_window((z0, 0, 0), (depth,) + tuple(crop.shape[1:]))
    valid = crop.raw_window((z0, 0, 0), (depth,) + tuple(crop.shape[1:]))[1]
    target = torch.from_numpy(labels).float().masked_fill_(torch.from_numpy((labels == UNANNOTATED) | ~valid),
                                                            float("nan"))
    return target[None]


def sliding_window_report(model: torch.nn.Module, crops: Sequence, spec: PatchSpec, classes, device,
                          overlap: float, batch_size: int, autocast=contextlib.nullcontext, tta: bool = False,
                          orthoplane: bool = False,
                          on_slab: Callable[[object, int, torch.Tensor], None] | None = None) -> dict:
    """Metrics report of the sliding window over `crops` (8-nm training grid), counts pooled over all of them
    on `device`; `on_slab(crop, z0, probs)` also receives every slab (to write or score it)."""
    counter = ConfusionCounter(len(classes), device)
    for crop in tqdm(crops, desc="sliding window", unit="crop"):
        for z0, probs in crop_slabs(model, crop, spec, device, overlap, batch_size, autocast, tta, orthoplane, True):
            counter.update_probabilities(probs[None], labels_for_counting(crop, z0, probs.shape[1]).to(device))
            if on_slab is not None:
                on_slab(crop, z0, probs)
    return counter.compute(classes)
