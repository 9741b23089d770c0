"""Evaluating a checkpoint on the validation crops, with each number labelled for what it is:

- "training tiling" (8-nm training grid, toolkit metric): exactly what validation during training does
  (`ValidationTiles` over every crop in full + `engine.validate`); on a finished run it reproduces the
  metrics recorded in results.json (the largest difference is reported);
- "sliding window" (8-nm training grid, toolkit metric): the blended sliding window over every crop
  (inference.py), optionally with test-time augmentation and orthoplane averaging;
- "official" (the challenge's rules, official.RULES_VERSION): the sliding-window probabilities brought to
  each validation crop's native grid and post-processed (challenge.py), scored with official.py: IoU for
  semantic classes, F1 x Hausdorff for instance classes (nuc), counts pooled in native voxels, overall =
  sqrt(instance mean x semantic mean). Per-class thresholds can be tuned two-fold (each half of the crops
  takes the thresholds of the other half), never on the crops they score.

evaluate.py runs this on demand; train_local.py runs it for the chosen checkpoints at the end of training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import challenge
import config_shenron as C
import official
from cache import CropCache
from engine import validate
from inference import BLEND_FLOOR, BLEND_SIGMA, crop_slabs, labels_for_counting
from metrics import ConfusionCounter
from ngff import multiscales_attrs
from runtime import autocast_for
from sampling import PatchSpec, ValidationTiles, make_loader

METRIC_8NM = "8-nm training grid (toolkit metric): Dice/IoU from TP/FP/FN pooled over annotated voxels"
METRIC_OFFICIAL = f"official challenge score ({official.RULES_VERSION}), at each crop's native resolution"
TILING_DESCRIPTIONS = {
    "training": "the training tiling: non-overlapping tiles of the training patch size (sampling.ValidationTiles), "
                "each annotated voxel predicted once, as validated during training",
    "sliding": "sliding window over every validation crop in full: tiles of the training patch size with "
               "overlap, Gaussian-weighted average of the probabilities, threshold 0.5",
}
REPRODUCTION_TOLERANCE = 1e-6
RATE_FIELDS = ("dice", "iou", "precision", "recall")
COUNT_FIELDS = ("tp", "fp", "fn", "tn")
SWEEP_FIELDS = ("best_threshold", "best_dice")


@dataclass
class EvalOptions:
    tilings: tuple[str, ...] = ("training", "sliding")
    official: bool = False
    overlap: float = 0.5
    batch_size: int | None = None
    tta: bool = False
    orthoplane: bool = False
    tune_thresholds: bool = False
    min_size: int | None = None          # instance classes, training-grid voxels; None = from the training labels
    fill_holes: bool = False
    predictions_dir: Path | None = None  # write the sliding-window probabilities here
    write_classes: Sequence[str] | None = None
    provenance: dict = field(default_factory=dict)

    def check(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"--overlap {self.overlap} must be in [0, 1)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be at least 1")
        if (self.predictions_dir or self.tta or self.orthoplane or self.official) and "sliding" not in self.tilings:
            raise ValueError("--write-predictions, --tta, --orthoplane and --official use the sliding window: "
                             "use --tiling sliding or both")
        if self.tune_thresholds and not self.official:
            raise ValueError("--tune-thresholds tunes the thresholds of the official score: add --official")
        if self.min_size is not None and self.min_size < 0:
            raise ValueError(f"--min-size {self.min_size} must be >= 0")


def evaluate_checkpoint(cfg, model, epoch: int, results: dict, cache: CropCache, entries, device, opts: EvalOptions,
                        which: str = "best", workers: int = 0) -> dict:
    """The evaluation of one checkpoint (see the module docstring) as a JSON-serialisable dict."""
    spec = PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)
    batch_size = opts.batch_size or cfg.batch_size
    autocast = _autocast(cfg, device)
    crops = cache.split("validate")
    out = {"checkpoint": which, "epoch": epoch, "model": cfg.model, "classes": list(cfg.classes),
           "validation_crops": [c.name for c in crops], "device": str(device), "batch_size": batch_size,
           "tilings": {}, "official": None, "predictions": None}
    if "training" in opts.tilings:
        out["tilings"]["training"] = training_tiling(model, cache, spec, cfg, device, autocast, batch_size, workers,
                                                     results, which, epoch)
    if "sliding" in opts.tilings:
        paths = {e.name: e.crop_path for e in entries}
        sliding = sliding_and_official(model, crops, spec, cfg, device, autocast, batch_size, opts, cache, paths)
        out["tilings"].update(sliding.pop("tilings"))
        out.update(sliding)
    return out


def _autocast(cfg, device):
    return autocast_for(cfg.precision if torch.device(device).type == "cuda" else "fp32", torch.device(device))


def training_tiling(model, cache, spec, cfg, device, autocast, batch_size, workers, results, which, epoch) -> dict:
    tiles = ValidationTiles(cache, spec)
    loader = make_loader(tiles, batch_size, workers, pin_memory=torch.device(device).type == "cuda")
    report = validate(model, loader, cfg.classes, device, autocast, cfg.channels_last, progress=True)
    recorded, source = recorded_metrics(results, which, epoch)
    entry = {**report, "metric": METRIC_8NM, "description": TILING_DESCRIPTIONS["training"], "tiles": len(tiles),
             "recorded_source": source,
             "recorded": None if recorded is None else {k: recorded.get(k) for k in
                                                        ("mean_dice", "mean_iou", "per_class", "threshold_sweep",
                                                         "absent_classes")}}
    if recorded is not None:
        entry.update(compare_with_recorded(report, recorded))
    return entry


def sliding_and_official(model, crops, spec, cfg, device, autocast, batch_size, opts: EvalOptions, cache,
                         crop_paths: dict) -> dict:
    """The sliding-window 8-nm metrics and, with opts.official, the official scores (one pass; two with
    opts.tune_thresholds, the first to learn each crop's threshold sweep)."""
    post = challenge.Postprocessing(fill_holes=opts.fill_holes)
    if opts.official:
        post.min_sizes = ({c: opts.min_size for c in cfg.classes if official.is_instance_class(c)}
                          if opts.min_size is not None else challenge.training_min_sizes(cache, cfg.classes))
    per_crop_thresholds = {}
    if opts.tune_thresholds:
        per_crop_thresholds = _two_fold_thresholds(model, crops, spec, cfg, device, autocast, batch_size, opts)
    counter = ConfusionCounter(len(cfg.classes), device)
    entries, written = [], {}
    write_classes = list(opts.write_classes or cfg.classes)
    for crop in crops:
        keep = np.zeros((len(cfg.classes),) + tuple(crop.shape), np.float32) if opts.official else None
        writer = _prediction_writer(opts, crop, cfg, write_classes, written) if opts.predictions_dir else None
        for z0, probs in crop_slabs(model, crop, spec, device, opts.overlap, batch_size, autocast, opts.tta,
                                    opts.orthoplane, progress=True):
            counter.update_probabilities(probs[None], labels_for_counting(crop, z0, probs.shape[1]).to(device))
            host = probs.cpu().numpy()
            if keep is not None:
                keep[:, z0:z0 + host.shape[1]] = host
            if writer is not None:
                writer(z0, host)
        if keep is not None:
            post.thresholds = per_crop_thresholds.get(crop.name, {})
            prediction = challenge.CropPrediction(keep, tuple(crop.grid_start), tuple(crop.scale), tuple(cfg.classes))
            entries += challenge.score_validation_crop(prediction, crop.name, crop_paths[crop.name], cfg.classes, post)
    sliding = {**counter.compute(cfg.classes), "metric": METRIC_8NM, "description": TILING_DESCRIPTIONS["sliding"],
               "overlap": opts.overlap, "tile": list(spec.label_shape), "tta": opts.tta, "orthoplane": opts.orthoplane,
               "blending": f"Gaussian importance weights, sigma = {BLEND_SIGMA:g} of the tile per axis, floored at "
                           f"{BLEND_FLOOR:g} of the centre weight"}
    result = {"tilings": {"sliding": sliding}}
    if opts.official:
        post.thresholds = {}
        result["official"] = {**official.aggregate(entries), "metric": METRIC_OFFICIAL,
                              "postprocessing": {**post.describe(), "thresholds": per_crop_thresholds or
                                                 "0.5 for every class", "tta": opts.tta,
                                                 "orthoplane": opts.orthoplane}}
    if opts.predictions_dir:
        result["predictions"] = {"directory": str(opts.predictions_dir), "crops": written, "classes": write_classes,
                                 "format": "OME-NGFF 0.4 zarr v2, <class>/s0 uint8 = round(255 * probability); "
                                           "for viewing, not a submission (see submit.py)"}
    return result


def _two_fold_thresholds(model, crops, spec, cfg, device, autocast, batch_size, opts) -> dict:
    """Per crop, per class: the threshold of the best pooled Dice on the other half of the crops (seeded halves)."""
    if len(crops) < 2:
        raise ValueError("--tune-thresholds needs at least 2 validation crops (thresholds are tuned on the other "
                         "half of the crops than they are applied to)")
    order = np.random.default_rng(0).permutation(len(crops))
    folds = {crops[i].name: int(rank % 2) for rank, i in enumerate(order)}
    sweeps = {}
    for crop in crops:
        counter = ConfusionCounter(len(cfg.classes), device)
        for z0, probs in crop_slabs(model, crop, spec, device, opts.overlap, batch_size, autocast, opts.tta,
                                    opts.orthoplane):
            counter.update_probabilities(probs[None], labels_for_counting(crop, z0, probs.shape[1]).to(device))
        sweeps[crop.name] = {cls: counts for cls, counts, annotated in
                             zip(cfg.classes, counter.sweep_counts(), crop.annotated) if annotated}
    return challenge.tune_thresholds(sweeps, folds)


def _prediction_writer(opts: EvalOptions, crop, cfg, write_classes, written: dict):
    """A slab writer of one crop's probabilities as OME-NGFF 0.4 zarr (v2): one multiscale group per class,
    s0 uint8 = round(255 p), placed at the crop's position in the volume (it overlays the raw)."""
    import zarr

    path = opts.predictions_dir / f"{crop.name}.zarr"
    translation = [g * s for g, s in zip(crop.grid_start, crop.scale)]  # voxel centres, as ngff.py reads them
    root = zarr.open_group(str(path), mode="w")
    root.attrs["cellmap_prediction"] = dict(opts.provenance, crop=crop.name, classes=list(write_classes),
                                            encoding="uint8 = round(255 * probability)")
    arrays = {}
    for cls in write_classes:
        group = root.create_group(cls)
        arrays[cls] = group.create_dataset("s0", shape=tuple(crop.shape), dtype="uint8",
                                           chunks=tuple(min(64, n) for n in crop.shape))
        group.attrs.update(multiscales_attrs([("s0", crop.scale, translation)]))
    written[crop.name] = str(path)

    def write(z0: int, probs: np.ndarray) -> None:
        for cls in write_classes:
            arrays[cls][z0:z0 + probs.shape[1]] = np.rint(probs[list(cfg.classes).index(cls)] * 255).astype(np.uint8)

    return write


# ----------------------------------------------------------------------------------------------------
# Comparison with the metrics recorded during training
# ----------------------------------------------------------------------------------------------------
def recorded_metrics(results: dict, which: str, epoch: int) -> tuple[dict | None, str]:
    """The metrics results.json recorded for the checkpoint's epoch, and where they come from (none when they
    were measured on a subset of the tiles: they are not the full tiling's)."""
    validation = results.get("validation") or {}
    if validation and validation.get("tiles") != validation.get("of_tiles"):
        return None, (f"results.json's per-epoch metrics come from {validation['tiles']} of the "
                      f"{validation['of_tiles']} validation tiles: not comparable with the full tiling")
    if which == "best" and results.get("best_epoch") == epoch and results.get("best"):
        return results["best"], f"results.json best (epoch {epoch})"
    for entry in results.get("history") or []:
        if entry.get("epoch") == epoch:
            return entry, f"results.json history (epoch {epoch})"
    return None, f"results.json holds no metrics for epoch {epoch}"


def compare_with_recorded(report: dict, recorded: dict) -> dict:
    """Largest |difference| between a report and recorded metrics over the means, per-class Dice/IoU/
    precision/recall and tuned sweep values (max_abs_difference), and over the counts (max_count_difference);
    fields present on one side only (or None on one side) are listed as mismatched."""
    rates, counts, mismatched = [], [], []

    def add(name, mine, theirs, into):
        if mine is None and theirs is None:
            return
        if mine is None or theirs is None:
            mismatched.append(name)
        else:
            into.append(abs(mine - theirs))

    for key in ("mean_dice", "mean_iou"):
        add(key, report[key], recorded.get(key), rates)
    for cls, mine in report["per_class"].items():
        theirs = (recorded.get("per_class") or {}).get(cls) or {}
        for name in RATE_FIELDS:
            add(f"{cls}.{name}", mine[name], theirs.get(name), rates)
        for name in COUNT_FIELDS:
            add(f"{cls}.{name}", mine[name], theirs.get(name), counts)
        tuned, tuned_then = report["threshold_sweep"][cls], (recorded.get("threshold_sweep") or {}).get(cls) or {}
        for name in SWEEP_FIELDS:
            add(f"{cls}.threshold_sweep.{name}", tuned[name], tuned_then.get(name), rates)
    max_abs = max(rates, default=0.0)
    return {"max_abs_difference": max_abs, "max_count_difference": int(max(counts, default=0)),
            "mismatched_fields": mismatched, "tolerance": REPRODUCTION_TOLERANCE,
            "reproduced": not mismatched and max_abs <= REPRODUCTION_TOLERANCE}


def official_table(report: dict) -> str:
    """Per-class official scores and the overall score as a fixed-width table."""
    lines = [f"{'class':12s} {'kind':9s} {'score':>7s} {'iou':>7s} {'f1':>7s} {'hausdorff':>9s} {'crops':>5s}"]
    for cls, c in report["classes"].items():
        score = c.get("iou") if c["kind"] == "semantic" else c.get("combined")
        cell = lambda v: "-".rjust(7) if v is None else f"{v:7.4f}"
        lines.append(f"{cls:12s} {c['kind']:9s} {cell(score)} {cell(c.get('iou'))} {cell(c.get('f1'))} "
                     f"{cell(c.get('normalized_hausdorff')):>9s} {c['crops']:5d}")
    lines.append(f"overall {report['overall']:.4f} = sqrt(instance mean {report['instance_mean']:.4f} x semantic "
                 f"mean {report['semantic_mean']:.4f}) | {report['metric']}")
    return "\n".join(lines)
