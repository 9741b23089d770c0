"""Checkpoint evaluation: a saved run's model re-scored over every validation crop, and the sliding window.

The command line re-evaluates a saved checkpoint:

    python evaluate.py runs/<run_name> [--checkpoint best|last] [--tiling both|training|sliding]
                       [--overlap 0.5] [--batch-size N] [--device auto|cpu|cuda]
                       [--data-root DIR] [--datasplit CSV] [--write-predictions] [--classes-to-write nuc ...]

It rebuilds the model from the checkpoint's stored config, reads the validation crops from the same crop
cache training used (same datasplit, classes, scale and raw margin; without --data-root/--datasplit the
run's own datasplit), and scores them in one or both tilings:
- training: exactly what training does (`ValidationTiles` + `validate`, the run's batch size). On a
  finished run this reproduces the metrics recorded in results.json (`best` for best.pt, the checkpoint's
  epoch in `history` for last.pt); the largest difference is reported.
- sliding: a sliding window over every validation crop in full, tiles of the training patch size that
  overlap by `--overlap` (0.5 = half a tile) and are blended with Gaussian importance weights (sigma = 1/8
  of the tile; tile centres, which saw the most context, count most). Probabilities are averaged, then
  thresholded at 0.5. 2D/2.5D models slide over every z slice with their 1 or 5 slices of z context; 3D
  models slide in z too. Context beyond the crop comes from the raw margin stored in the cache.
Both count TP/FP/FN over annotated voxels only, pooled over all crops (metrics.py states the definitions).

Output: `RUN_DIR/eval_<checkpoint>.json` (written atomically at the end; nothing is written on bad input)
with, per tiling, the full metrics report (per-class Dice/IoU/precision/recall/counts/status, absent
classes, the mean's definition, the threshold sweep labelled as tuned on validation), and for the training
tiling the recorded metrics and the largest difference from them. The tables are printed.

`--write-predictions` stores the sliding-window probabilities of every validation crop as OME-NGFF 0.4
zarr (v2) in `RUN_DIR/predictions/<checkpoint>/<dataset>/<crop>.zarr/<class>/s0`, uint8 =
round(255 * probability).
They go into the run folder, never into the data folder (which may be shared or read-only); their
multiscales metadata (8 nm scale, translation = the crop's position in the volume, in nm) makes them
overlay the raw `recon-1/em/fibsem-uint8` of the dataset when both are opened in neuroglancer or napari.
best and last write to separate folders; a later evaluation of the same checkpoint replaces them (the
root group's attributes name the run, checkpoint, epoch and overlap).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import config_shenron as C
from cache import CachedCrop, cache_margin, prepare_cache
from datasplit import datasplit_for, read_datasplit, resolve_data_root
from engine import validate
from errors import DataError, RunFileError
from inference import BLEND_FLOOR, BLEND_SIGMA, load_run_model, sliding_window_report
from metrics import format_table
from ngff import multiscales_attrs
from runfiles import CHECKPOINTS, RESULTS_FILE, load_json, save_json
from runtime import autocast_for
from sampling import PatchSpec, ValidationTiles, make_loader

TILINGS = ("training", "sliding")
REPRODUCTION_TOLERANCE = 1e-6
TILING_DESCRIPTIONS = {
    "training": "the training tiling: non-overlapping tiles of the training patch size (data.ValidationTiles), "
                "each annotated voxel predicted once, as validated during training",
    "sliding": "sliding window over every validation crop in full: tiles of the training patch size with "
               "overlap, Gaussian-weighted average of the probabilities, threshold 0.5",
}


def write_prediction_zarr(path: Path, probs: np.ndarray, classes: Sequence[str], write_classes: Sequence[str],
                          crop: CachedCrop, scale_nm: Sequence[float], provenance: dict) -> None:
    """Probabilities [C,Z,Y,X] as an OME-NGFF 0.4 zarr (v2) at `path` (replaced if present): one multiscale
    group per class with s0 uint8 = round(255 p), placed at the crop's position in the volume."""
    import zarr


    translation = [g * s for g, s in zip(crop.grid_start, scale_nm)]  # voxel centres, as ngff.py reads them
    root = zarr.open_group(str(path), mode="w")
    root.attrs["cellmap_prediction"] = dict(provenance, crop=crop.name, classes=list(write_classes),
                                            encoding="uint8 = round(255 * probability)")
    for cls in write_classes:
        group = root.create_group(cls)
        data = np.rint(probs[list(classes).index(cls)] * 255).astype(np.uint8)
        group.create_dataset("s0", data=data, chunks=tuple(min(64, n) for n in data.shape))
        group.attrs.update(multiscales_attrs([("s0", scale_nm, translation)]))


# ----------------------------------------------------------------------------------------------------
# Comparison with the metrics recorded during training
# ----------------------------------------------------------------------------------------------------
RATE_FIELDS = ("dice", "iou", "precision", "recall")
COUNT_FIELDS = ("tp", "fp", "fn", "tn")
SWEEP_FIELDS = ("best_threshold", "best_dice")


def recorded_metrics(results: dict, which: str, epoch: int) -> tuple[dict | None, str]:
    """The metrics results.json recorded for the checkpoint's epoch, and where they come from."""
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
        for field in RATE_FIELDS:
            add(f"{cls}.{field}", mine[field], theirs.get(field), rates)
        for field in COUNT_FIELDS:
            add(f"{cls}.{field}", mine[field], theirs.get(field), counts)
        tuned, tuned_then = report["threshold_sweep"][cls], (recorded.get("threshold_sweep") or {}).get(cls) or {}
        for field in SWEEP_FIELDS:
            add(f"{cls}.threshold_sweep.{field}", tuned[field], tuned_then.get(field), rates)
    max_abs = max(rates, default=0.0)
    return {"max_abs_difference": max_abs, "max_count_difference": int(max(counts, default=0)),
            "mismatched_fields": mismatched, "tolerance": REPRODUCTION_TOLERANCE,
            "reproduced": not mismatched and max_abs <= REPRODUCTION_TOLERANCE}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = C.OneLineErrorParser(description="Re-evaluate a run's checkpoint over every validation crop (see evaluate.py's "
                                  "docstring for the tilings and the outputs).")
    p.add_argument("run_dir", help="run folder written by train_local.py (holds results.json, best.pt, last.pt)")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="which checkpoint (default best)")
    p.add_argument("--tiling", choices=TILINGS + ("both",), default="both",
                   help="training: the tiles validation used (reproduces results.json); sliding: overlapping "
                        "blended window over every crop; both (default)")
    p.add_argument("--overlap", type=float, default=0.5,
                   help="sliding-window overlap as a fraction of a tile, in [0, 1) (default 0.5)")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default: the run's batch size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    p.add_argument("--data-root", help="CellMap data root (default: the one the run used)")
    p.add_argument("--datasplit", help="datasplit CSV (default: the run's own, or that of --data-root)")
    p.add_argument("--write-predictions", action="store_true",
                   help="write the sliding-window probabilities as OME-NGFF zarr under "
                        "RUN_DIR/predictions/<checkpoint>/")
    p.add_argument("--classes-to-write", nargs="+", metavar="CLASS",
                   help="classes whose probabilities --write-predictions stores (default: all of the run's)")
    return p.parse_args(argv)


def run_datasplit(args: argparse.Namespace, cfg, results: dict) -> Path:
    """The datasplit to evaluate on: --datasplit, else that of --data-root, else the one the run used."""
    root = resolve_data_root(args.data_root)[0] if args.data_root else None
    if args.datasplit:
        return Path(args.datasplit)
    if root is not None:
        return datasplit_for(root)
    if results.get("datasplit"):
        path = Path(results["datasplit"])
        if not path.is_file():
            raise DataError(f"the run's datasplit {path} no longer exists; pass --datasplit or --data-root")
        return path
    if not Path(cfg.data_root).is_dir():
        raise DataError(f"the run's data root {cfg.data_root} no longer exists; pass --data-root or --datasplit")
    return datasplit_for(Path(cfg.data_root))


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    tilings = TILINGS if args.tiling == "both" else (args.tiling,)
    run_dir = Path(args.run_dir)
    # ---- bad input: one line, exit 2, nothing written ----
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is visible (use --device cpu or auto)")
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        if not 0.0 <= args.overlap < 1.0:
            raise ValueError(f"--overlap {args.overlap} must be in [0, 1)")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
        if args.write_predictions and "sliding" not in tilings:
            raise ValueError("--write-predictions stores the sliding-window probabilities: use --tiling sliding or both")
        if not run_dir.is_dir():
            raise RunFileError(f"run folder {run_dir} not found")
        cfg, model, state = load_run_model(run_dir, args.checkpoint, device)
        results = load_json(run_dir / RESULTS_FILE)
        write_classes = args.classes_to_write or list(cfg.classes)
        unknown = [c for c in write_classes if c not in cfg.classes]
        if unknown:
            raise ValueError(f"--classes-to-write {' '.join(unknown)}: not among the run's classes "
                             f"({', '.join(cfg.classes)})")
        csv_path = run_datasplit(args, cfg, results)
        entries = read_datasplit(csv_path)
        # The margin training used (cache.cache_margin), so training's cache is found and reused.
        cache = prepare_cache(entries, cfg.classes, cfg.scale_nm, cache_margin(C.PROFILES[cfg.profile], cfg.patch_shape))
        crops = cache.split("validate")
        if not crops:
            raise DataError(f"{csv_path}: no validation crop left after preparation (check its 'validate' rows)")
    except (ValueError, RunFileError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2

    spec = PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)
    batch_size = args.batch_size or cfg.batch_size
    autocast = autocast_for(cfg.precision if device.type == "cuda" else "fp32", device)
    epoch = state["epoch"]
    print(f"evaluating {run_dir.name}/{args.checkpoint}.pt (epoch {epoch}, {cfg.model}) on {len(crops)} validation "
          f"crops from {csv_path} | {device} | batch {batch_size}", flush=True)
    evaluation = {
        "run_name": results.get("run_name", run_dir.name), "run_dir": str(run_dir.resolve()),
        "checkpoint": args.checkpoint, "epoch": epoch, "model": cfg.model, "classes": list(cfg.classes),
        "datasplit": str(csv_path), "validation_crops": [c.name for c in crops], "device": str(device),
        "batch_size": batch_size, "tilings": {}, "predictions": None,
    }
    tables, written = [], {}
    predictions_dir = run_dir / "predictions" / args.checkpoint
    if "training" in tilings:
        tiles = ValidationTiles(cache, spec)
        loader = make_loader(tiles, batch_size, cfg.workers, pin_memory=device.type == "cuda")
        report = validate(model, loader, cfg.classes, device, autocast, cfg.channels_last, progress=True)
        recorded, source = recorded_metrics(results, args.checkpoint, epoch)
        entry = {**report, "description": TILING_DESCRIPTIONS["training"], "tiles": len(tiles),
                 "recorded_source": source,
                 "recorded": None if recorded is None else {k: recorded.get(k) for k in
                                                            ("mean_dice", "mean_iou", "per_class", "threshold_sweep",
                                                             "absent_classes")}}
        line = f"recorded: {source}"
        if recorded is not None:
            entry.update(compare_with_recorded(report, recorded))
            line += (f" | max |difference| {entry['max_abs_difference']:.2e}, counts {entry['max_count_difference']}"
                     + (f", mismatched {', '.join(entry['mismatched_fields'])}" if entry["mismatched_fields"] else "")
                     + (" | reproduced" if entry["reproduced"] else " | NOT reproduced"))
        evaluation["tilings"]["training"] = entry
        tables.append(("training tiling", report, line))
    if "sliding" in tilings:
        on_prediction = None
        if args.write_predictions:
            provenance = {"run": evaluation["run_name"], "checkpoint": args.checkpoint, "epoch": epoch,
                          "overlap": args.overlap}

            def on_prediction(crop, probs):
                path = predictions_dir / f"{crop.name}.zarr"
                write_prediction_zarr(path, probs, cfg.classes, write_classes, crop, cfg.scale_nm, provenance)
                written[crop.name] = str(path)

        report = sliding_window_report(model, crops, spec, cfg.classes, device, args.overlap, batch_size, autocast,
                                       on_prediction)
        evaluation["tilings"]["sliding"] = {
            **report, "description": TILING_DESCRIPTIONS["sliding"], "overlap": args.overlap,
            "tile": list(spec.label_shape),
            "blending": f"Gaussian importance weights, sigma = {BLEND_SIGMA:g} of the tile per axis, "
                        f"floored at {BLEND_FLOOR:g} of the centre weight"}
        if args.write_predictions:
            evaluation["predictions"] = {"directory": str(predictions_dir), "crops": written,
                                         "classes": list(write_classes),
                                         "format": "OME-NGFF 0.4 zarr v2, <class>/s0 uint8 = round(255 * probability)"}
        tables.append((f"sliding window (overlap {args.overlap:g}, Gaussian blending)", report, None))
    evaluation["elapsed_seconds"] = time.time() - started

    out_path = run_dir / f"eval_{args.checkpoint}.json"
    try:
        save_json(out_path, evaluation)
    except RunFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for title, report, line in tables:
        print(f"\n{run_dir.name} {args.checkpoint}.pt (epoch {epoch}), {title}:")
        print(format_table(report, cfg.classes))
        if line:
            print(line)
    if written:
        print(f"\npredictions: {predictions_dir} ({len(written)} crops)")
    print(f"\nevaluation: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
