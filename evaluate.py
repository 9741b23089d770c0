"""Evaluate a run's checkpoint over every validation crop: the toolkit's 8-nm metrics and, with --official,
the challenge's own score at native resolution (evaluation.py says what each number is).

    python evaluate.py runs/<run_name> [--checkpoint best|last] [--tiling both|training|sliding] [--official]
                       [--tta] [--orthoplane] [--tune-thresholds] [--min-size N] [--fill-holes]
                       [--overlap 0.5] [--batch-size N] [--device auto|cpu|cuda]
                       [--data-root DIR] [--datasplit CSV] [--write-predictions] [--classes-to-write nuc ...]

The model is rebuilt from the checkpoint's stored config; the validation crops come from the crop cache
(without --data-root/--datasplit, the run's own datasplit). Output: `RUN_DIR/eval_<checkpoint>.json`
(written atomically at the end; nothing is written on bad input) and the tables printed, each titled with its
metric. `--write-predictions` stores the sliding-window probabilities as OME-NGFF 0.4 zarr (v2) in
`RUN_DIR/predictions/<checkpoint>/<dataset>/<crop>.zarr/<class>/s0`, uint8 = round(255 * probability), placed
to overlay the dataset's raw in neuroglancer or napari: for viewing; a submission is made by submit.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import config_shenron as C
from cache import prepare_cache
from datasplit import datasplit_for, read_datasplit, resolve_data_root
from errors import DataError, RunFileError
from evaluation import EvalOptions, evaluate_checkpoint, official_table
from inference import load_run_model
from metrics import format_table
from runfiles import CHECKPOINTS, RESULTS_FILE, load_json, save_json

TILINGS = ("training", "sliding")


def parse_args(argv=None) -> argparse.Namespace:
    p = C.OneLineErrorParser(description="Evaluate a run's checkpoint over every validation crop (see evaluate.py's "
                                         "docstring for the metrics and the outputs).")
    p.add_argument("run_dir", help="run folder written by train_local.py (holds results.json, best.pt, last.pt)")
    p.add_argument("--checkpoint", choices=CHECKPOINTS,
                   help="which checkpoint (default best; last, with a note, when best.pt was removed)")
    p.add_argument("--tiling", choices=TILINGS + ("both",), default="both",
                   help="training: the tiles validation used (reproduces results.json); sliding: overlapping "
                        "blended window over every crop; both (default)")
    p.add_argument("--official", action="store_true",
                   help="also the challenge's score (official.py rules) at each crop's native resolution")
    p.add_argument("--tta", action="store_true", help="sliding window with the 8 dihedral transforms of the y/x plane")
    p.add_argument("--orthoplane", action="store_true",
                   help="2D/2.5D models: average the predictions of slices along z, y and x")
    p.add_argument("--tune-thresholds", action="store_true",
                   help="official score with per-class thresholds tuned on the other half of the validation crops")
    p.add_argument("--min-size", type=int, help="instance classes: smallest kept component in 8-nm voxels "
                                                "(default: from the instance sizes in the training labels)")
    p.add_argument("--fill-holes", action="store_true", help="instance classes: fill holes of each component")
    p.add_argument("--overlap", type=float, default=0.5,
                   help="sliding-window overlap as a fraction of a tile, in [0, 1) (default 0.5)")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default: the run's batch size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    p.add_argument("--data-root", help="CellMap data root (default: the one the run used)")
    p.add_argument("--datasplit", help="datasplit CSV (default: the run's own, or that of --data-root)")
    p.add_argument("--write-predictions", action="store_true",
                   help="write the sliding-window probabilities as OME-NGFF zarr under RUN_DIR/predictions/<checkpoint>/")
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


def plan(args: argparse.Namespace):
    """(device, cfg, model, checkpoint state, results, datasplit, entries, cache, options); bad input raises."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible (use --device cpu or auto)")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    run_dir = Path(args.run_dir)
    tilings = TILINGS if args.tiling == "both" else (args.tiling,)
    if not run_dir.is_dir():
        raise RunFileError(f"run folder {run_dir} not found")
    if args.checkpoint is None:
        args.checkpoint = "best"
        if not (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file():
            print(f"note: {run_dir / 'best.pt'} is missing: evaluating last.pt instead")
            args.checkpoint = "last"
    opts = EvalOptions(tilings, args.official, args.overlap, args.batch_size, args.tta, args.orthoplane,
                       args.tune_thresholds, args.min_size, args.fill_holes,
                       run_dir / "predictions" / args.checkpoint if args.write_predictions else None,
                       args.classes_to_write)
    opts.check()
    cfg, model, state = load_run_model(run_dir, args.checkpoint, device)
    if args.orthoplane and C.MODELS[cfg.model].dims != 2:
        raise ValueError(f"--orthoplane averages 2D predictions along z, y and x: {cfg.model} is a 3D model")
    results = load_json(run_dir / RESULTS_FILE)
    unknown = [c for c in (args.classes_to_write or ()) if c not in cfg.classes]
    if unknown:
        raise ValueError(f"--classes-to-write {' '.join(unknown)}: not among the run's classes ({', '.join(cfg.classes)})")
    csv_path = run_datasplit(args, cfg, results)
    entries = read_datasplit(csv_path)
    cache = prepare_cache(entries, cfg.classes, cfg.scale_nm, workers=cfg.workers)
    if not cache.split("validate"):
        raise DataError(f"{csv_path}: no validation crop left after preparation (check its 'validate' rows)")
    opts.provenance = {"run": results.get("run_name", run_dir.name), "checkpoint": args.checkpoint,
                       "epoch": state["epoch"], "overlap": args.overlap}
    return device, cfg, model, state, results, csv_path, entries, cache, opts


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    run_dir = Path(args.run_dir)
    try:
        device, cfg, model, state, results, csv_path, entries, cache, opts = plan(args)
    except (ValueError, RunFileError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"evaluating {run_dir.name}/{args.checkpoint}.pt (epoch {state['epoch']}, {cfg.model}) on "
          f"{len(cache.split('validate'))} validation crops from {csv_path} | {device}", flush=True)
    evaluation = evaluate_checkpoint(cfg, model, state["epoch"], results, cache, entries, device, opts,
                                     args.checkpoint, cfg.workers)
    evaluation.update(run_name=results.get("run_name", run_dir.name), run_dir=str(run_dir.resolve()),
                      datasplit=str(csv_path), elapsed_seconds=time.time() - started)
    out_path = run_dir / f"eval_{args.checkpoint}.json"
    try:
        save_json(out_path, evaluation)
    except RunFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_evaluation(evaluation, cfg, run_dir.name)
    print(f"\nevaluation: {out_path}")
    return 0


def print_evaluation(evaluation: dict, cfg, run_name: str) -> None:
    """Each table titled with its tiling and metric."""
    head = f"{run_name} {evaluation['checkpoint']}.pt (epoch {evaluation['epoch']})"
    training = evaluation["tilings"].get("training")
    if training:
        print(f"\n{head}, training tiling — {training['metric']}:")
        print(format_table(training, cfg.classes))
        line = f"recorded: {training['recorded_source']}"
        if training.get("recorded") is not None:
            line += (f" | max |difference| {training['max_abs_difference']:.2e}, counts "
                     f"{training['max_count_difference']}"
                     + (f", mismatched {', '.join(training['mismatched_fields'])}" if training["mismatched_fields"] else "")
                     + (" | reproduced" if training["reproduced"] else " | NOT reproduced"))
        print(line)
    sliding = evaluation["tilings"].get("sliding")
    if sliding:
        extras = "".join(f", {name}" for name in ("tta", "orthoplane") if sliding[name])
        print(f"\n{head}, sliding window (overlap {sliding['overlap']:g}, Gaussian blending{extras}) — "
              f"{sliding['metric']}:")
        print(format_table(sliding, cfg.classes))
    if evaluation.get("official"):
        print(f"\n{head}, official challenge score:")
        print(official_table(evaluation["official"]))
    if evaluation.get("predictions"):
        print(f"\npredictions: {evaluation['predictions']['directory']} ({len(evaluation['predictions']['crops'])} crops)")


if __name__ == "__main__":
    sys.exit(main())
