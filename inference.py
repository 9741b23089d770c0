"""Inference with a run's model: rebuilding it from a checkpoint, the blended sliding window over a cached
crop, and the metrics of the sliding window over a set of crops.

The sliding window tiles a crop with tiles of the training patch size that overlap by `overlap` (0.5 = half
a tile) and blends them with Gaussian importance weights (sigma = 1/8 of the tile; tile centres, which saw
the most context, count most); probabilities are averaged, then thresholded at 0.5 for the metrics. 2D/2.5D
models slide over every z slice with their 1 or 5 slices of z context; 3D models slide in z too. Context
beyond the crop comes from the raw margin stored in the cache. Inputs are cut and scaled exactly as for
training (`cut_patch`, `to_model_inputs`).
"""
from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import config_shenron as C
from cache import UNANNOTATED, CachedCrop
from errors import RunFileError
from metrics import ConfusionCounter
from models import unet_for_run
from runfiles import CHECKPOINTS, RESULTS_FILE, load_checkpoint
from sampling import PatchSpec, cut_patch, format_sample, tile_starts, to_model_inputs

BLEND_SIGMA = 1 / 8    # Gaussian sigma as a fraction of the tile size (nnU-Net's choice)
BLEND_FLOOR = 1e-3     # smallest weight: a voxel covered only by tile edges (at a crop border) still counts
COUNT_SLAB_VOXELS = 1 << 24  # probabilities x classes counted per host-to-device transfer


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


@torch.no_grad()
def predict_crop(model: torch.nn.Module, crop: CachedCrop, spec: PatchSpec, device, overlap: float = 0.5,
                 batch_size: int = 4, autocast=contextlib.nullcontext, progress: bool = False) -> np.ndarray:
    """Sliding-window probabilities float32 [C, Z, Y, X] over the crop box (see the module docstring).

    Inputs are cut and scaled exactly as for training (`cut_patch`, `to_model_inputs`). The weighted sums
    are accumulated in float64 from float32 weights, so where one tile covers a voxel (overlap 0) the
    result is bit-identical to that tile's sigmoid output; the sums take 8 bytes per voxel and class.
    ValueError if the cache margin is too small for the tiles' raw context."""
    from torch.utils.data import default_collate
    from tqdm import tqdm

    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap {overlap} must be in [0, 1)")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    label_shape = spec.label_shape
    context_z = (spec.raw_shape[0] - label_shape[0]) // 2
    origins = sliding_origins(crop.shape, label_shape, overlap)
    for axis in range(3):
        shift = context_z if axis == 0 else 0
        lo = min(o[axis] for o in origins) - shift
        hi = max(o[axis] for o in origins) - shift + spec.raw_shape[axis]
        if lo < -crop.margin[axis] or hi > crop.shape[axis] + crop.margin[axis]:
            raise ValueError(f"crop {crop.name}: its cache margin {crop.margin} is too small for tiles of "
                             f"{spec.raw_shape} (prepare the cache with cache.cache_margin for this patch size)")
    # float32 weights widened to float64: their products with float32 probabilities are exact.
    weights = blending_weights(label_shape).astype(np.float64)
    total = np.zeros((len(crop.annotated),) + tuple(crop.shape), dtype=np.float64)
    weight_sum = np.zeros(tuple(crop.shape), dtype=np.float64)

    was_training = model.training
    model.eval()
    batches = range(0, len(origins), batch_size)
    for first in tqdm(batches, desc=f"sliding {crop.name}", unit="batch", leave=False, disable=not progress):
        chunk = origins[first:first + batch_size]
        samples = [format_sample(*cut_patch(crop, (z - context_z, y, x), spec.raw_shape, label_shape), spec.dims)
                   for z, y, x in chunk]
        x_in, _ = to_model_inputs(default_collate(samples), device)
        with autocast():
            logits = model(x_in)
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        if spec.dims == 2:
            probs = probs[:, :, None]  # [B, C, 1, H, W]
        for origin, tile in zip(chunk, probs):
            inside = [slice(max(0, o), min(n, o + t)) for o, n, t in zip(origin, crop.shape, label_shape)]
            in_tile = tuple(slice(s.start - o, s.stop - o) for s, o in zip(inside, origin))
            w = weights[in_tile]
            total[(slice(None), *inside)] += tile[(slice(None), *in_tile)] * w
            weight_sum[tuple(inside)] += w
    model.train(was_training)
    return (total / weight_sum).astype(np.float32)


def count_crop(counter: ConfusionCounter, probs: np.ndarray, labels: np.ndarray) -> None:
    """Add one crop's probabilities [C,Z,Y,X] against its cached labels (UNANNOTATED excluded), in z slabs."""
    slab = max(1, COUNT_SLAB_VOXELS // (probs.shape[0] * probs.shape[2] * probs.shape[3]))
    for z in range(0, probs.shape[1], slab):
        p = torch.from_numpy(np.ascontiguousarray(probs[None, :, z:z + slab]))
        lab = torch.from_numpy(np.array(labels[None, :, z:z + slab]))  # a copy: the cache is read-only
        target = lab.float().masked_fill_(lab == UNANNOTATED, float("nan"))
        counter.update_probabilities(p, target)


def sliding_window_report(model: torch.nn.Module, crops: Sequence[CachedCrop], spec: PatchSpec, classes, device,
                          overlap: float, batch_size: int, autocast=contextlib.nullcontext,
                          on_prediction: Callable[[CachedCrop, np.ndarray], None] | None = None) -> dict:
    """Metrics report of the sliding window over `crops`, counts pooled over all of them (on `device`);
    `on_prediction(crop, probs)` receives each crop's probabilities (to write them)."""
    from tqdm import tqdm

    counter = ConfusionCounter(len(classes), device)
    for crop in tqdm(crops, desc="sliding window", unit="crop"):
        probs = predict_crop(model, crop, spec, device, overlap, batch_size, autocast, progress=True)
        count_crop(counter, probs, crop.labels)
        if on_prediction is not None:
            on_prediction(crop, probs)
    return counter.compute(classes)
