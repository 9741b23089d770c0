"""Predict the challenge's test crops with a run's checkpoint and write the official submission.

    python submit.py RUN_DIR [--manifest manifests/test_crop_manifest.csv] [--data-root DIR]
                     [--checkpoint best|last] [--out RUN_DIR/submission.zarr] [--crops 557,562]
                     [--tta] [--orthoplane] [--min-size N] [--fill-holes] [--overlap 0.5] [--batch-size N]
                     [--device auto|cpu|cuda]

For every crop of the test manifest (raw only, no labels): the raw EM around it is read on demand from
`<data-root>/<dataset>/<dataset>.zarr/recon-1/em/fibsem-uint8` (the level matching the training scale, or the
coarsest finer one; chunks that were never fetched are masked as in training), the blended sliding window
predicts the crop's box on the training grid, and every label of the manifest that the model predicts is
brought to the crop's own grid and post-processed (challenge.py) and written as
`submission.zarr/crop<N>/<label>` (uint8 0/1, or instance ids), with the attributes voxel_size, translation and
shape. Labels the model does not predict are left out (they score 0) and named in one line. The layout is
checked (submission.check_submission), then zipped next to it. Bad input (a missing raw volume or a crop
without raw at the training scale, an unknown crop) is one `error:` line naming it and the fix, before
anything is written; an existing submission is never overwritten.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import challenge
import config_shenron as C
import official
from cache import prepare_cache
from crop_prep import Skip, raw_level_for
from datasplit import RAW_SUBPATH, read_datasplit, resolve_data_root
from errors import DataError, RunFileError
from inference import crop_slabs, load_run_model
from resample import OnDemandRaw
from runfiles import CHECKPOINTS, RESULTS_FILE, load_json
from runtime import autocast_for
from sampling import PatchSpec
from submission import SubmissionWriter, check_submission, read_test_manifest, zip_submission

DEFAULT_MANIFEST = C.REPO_DIR / "manifests" / "test_crop_manifest.csv"
RAW_FETCH_FIX = "fetch the test crops' EM (csc fetch-data --crops test), or pass the --data-root that holds them"


@dataclass
class TestCrop:
    """A test crop's box on the training grid with raw read on demand: the window interface of CachedCrop."""

    name: str
    crop_id: int
    grid_start: tuple[int, int, int]
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    raw: OnDemandRaw
    annotated: np.ndarray

    def raw_window(self, start, shape):
        return self.raw.window(np.asarray(self.grid_start) + np.asarray(start), shape)


def grid_box(voxel, translation, shape, scale) -> tuple[np.ndarray, np.ndarray]:
    """(start, shape) of the training-grid voxels whose centres lie in the crop's extent, one more each side
    (so interpolation at the crop's edge has neighbours)."""
    lo = (np.asarray(translation) - np.asarray(voxel) / 2) / scale
    hi = (np.asarray(translation) + (np.asarray(shape) - 0.5) * np.asarray(voxel)) / scale
    start = np.ceil(lo - 1e-6).astype(int) - 1
    return start, np.ceil(hi - 1e-6).astype(int) + 1 - start


def parse_args(argv=None) -> argparse.Namespace:
    p = C.OneLineErrorParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="run folder written by train_local.py")
    p.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="test crop manifest (default: the shipped one)")
    p.add_argument("--data-root", help="CellMap root holding the test crops' EM (default: the run's data root)")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best")
    p.add_argument("--out", help="submission folder, ending in .zarr (default RUN_DIR/submission.zarr)")
    p.add_argument("--crops", help="comma-separated crop numbers to predict (default: every crop of the manifest)")
    p.add_argument("--tta", action="store_true", help="the 8 dihedral transforms of the y/x plane, averaged")
    p.add_argument("--orthoplane", action="store_true", help="2D/2.5D models: slices along z, y and x, averaged")
    p.add_argument("--min-size", type=int, help="instance labels: smallest kept component in 8-nm voxels (default: "
                                                "from the instance sizes in the run's training labels)")
    p.add_argument("--fill-holes", action="store_true", help="instance labels: fill holes of each component")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default: the run's batch size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p.parse_args(argv)


def plan(args):
    """(cfg, model, crops: [(TestCrop, manifest rows)], output path, device); bad input raises."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible (use --device cpu or auto)")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    run_dir = Path(args.run_dir)
    if not (run_dir / RESULTS_FILE).is_file():
        raise RunFileError(f"{run_dir} is not a run folder (no {RESULTS_FILE}); pass a folder written by train_local.py")
    out = Path(args.out) if args.out else run_dir / "submission.zarr"
    if out.exists() or out.with_suffix(".zip").exists():
        raise RunFileError(f"{out} (or its .zip) exists; choose another --out or remove it first")
    if not 0.0 <= args.overlap < 1.0 or (args.min_size or 0) < 0:
        raise ValueError(f"--overlap {args.overlap} must be in [0, 1) and --min-size {args.min_size} >= 0")
    cfg, model, _ = load_run_model(run_dir, args.checkpoint, device)
    if args.orthoplane and C.MODELS[cfg.model].dims != 2:
        raise ValueError(f"--orthoplane averages 2D predictions along z, y and x: {cfg.model} is a 3D model")
    root = resolve_data_root(args.data_root)[0] if args.data_root else Path(load_json(run_dir / RESULTS_FILE)["config"]
                                                                            ["data_root"])
    rows = read_test_manifest(args.manifest)
    wanted = {int(c) for c in args.crops.split(",")} if args.crops else None
    by_crop: dict[int, list] = {}
    for row in rows:
        if wanted is None or row.crop_id in wanted:
            by_crop.setdefault(row.crop_id, []).append(row)
    missing = sorted((wanted or set()) - set(by_crop))
    if missing:
        raise ValueError(f"--crops {','.join(map(str, missing))}: not in {args.manifest}")
    crops = [(test_crop(root, rows_of, cfg), rows_of) for rows_of in by_crop.values()]
    min_sizes = ({c: args.min_size for c in cfg.classes} if args.min_size is not None
                 else training_min_sizes(run_dir, cfg))
    return cfg, model, crops, out, device, min_sizes


def training_min_sizes(run_dir: Path, cfg) -> dict[str, int]:
    """The instance minimum sizes from the run's training labels (its crop cache), or none if that cache is gone."""
    try:
        entries = read_datasplit(load_json(run_dir / RESULTS_FILE)["datasplit"])
        cache = prepare_cache(entries, cfg.classes, cfg.scale_nm, progress=False, build=False, verify=False)
    except (FileNotFoundError, DataError, KeyError):
        print("note: the run's crop cache is not available: no minimum instance size (pass --min-size N)")
        return {}
    return challenge.training_min_sizes(cache, cfg.classes)


def test_crop(root: Path, rows, cfg) -> TestCrop:
    """The crop's box on the training grid and its raw source; DataError naming the crop and the fix."""
    first = rows[0]
    start, shape = grid_box(first.voxel_size, first.translation, first.shape, cfg.scale_nm)
    raw_path = root / first.dataset / f"{first.dataset}.zarr" / RAW_SUBPATH
    if not raw_path.is_dir():
        raise DataError(f"test crop {first.crop_id} ({first.dataset}): no raw EM at {raw_path}; {RAW_FETCH_FIX}")
    try:
        level, grid, _ = raw_level_for(str(raw_path), start, shape, cfg.scale_nm)
    except Skip as skip:
        raise DataError(f"test crop {first.crop_id} ({first.dataset}): {skip.reason}; {RAW_FETCH_FIX}") from None
    return TestCrop(f"{first.dataset}/crop{first.crop_id}", first.crop_id, tuple(int(v) for v in start),
                    tuple(int(v) for v in shape), tuple(cfg.scale_nm), OnDemandRaw(level, grid, cfg.scale_nm),
                    np.ones(len(cfg.classes), dtype=bool))


def predict_and_write(cfg, model, crops, out: Path, device, args, post) -> dict[str, int]:
    """Predict every crop and write its labels; returns {label the model does not predict: crops}."""
    spec = PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)
    autocast = autocast_for(cfg.precision if device.type == "cuda" else "fp32", device)
    writer, not_predicted = SubmissionWriter(out), {}
    for crop, rows in tqdm(crops, desc="test crops", unit="crop", file=sys.stdout):
        probs = np.zeros((len(cfg.classes),) + crop.shape, dtype=np.float32)
        for z0, slab in crop_slabs(model, crop, spec, device, args.overlap, args.batch_size or cfg.batch_size,
                                   autocast, args.tta, args.orthoplane, progress=True):
            probs[:, z0:z0 + slab.shape[1]] = slab.cpu().numpy()
        prediction = challenge.CropPrediction(probs, crop.grid_start, crop.scale, tuple(cfg.classes))
        for row in rows:
            if row.label not in cfg.classes:
                not_predicted[row.label] = not_predicted.get(row.label, 0) + 1
                continue
            instance = official.is_instance_class(row.label)
            ids = prediction.instance_ids(row.label, post.threshold(row.label), post.min_sizes.get(row.label, 0),
                                          post.fill_holes) if instance else None
            target = writer.create(row.crop_id, row.label, row.shape, ids.dtype if instance else np.uint8,
                                   row.voxel_size, row.translation)
            challenge.label_on_truth_grid(prediction, row.label, post, row.voxel_size, row.translation, row.shape,
                                          ids, out=target)
    return not_predicted


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        cfg, model, crops, out, device, min_sizes = plan(args)
    except (ValueError, RunFileError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    post = challenge.Postprocessing(min_sizes=min_sizes, fill_holes=args.fill_holes)
    print(f"submission: {len(crops)} test crops, {sum(len(r) for _, r in crops)} crop x label pairs, "
          f"{args.run_dir}/{args.checkpoint}.pt ({cfg.model}, classes {', '.join(cfg.classes)}) | {device}", flush=True)
    not_predicted = predict_and_write(cfg, model, crops, out, device, args, post)
    if not_predicted:
        print("labels the model does not predict are left out (each scores 0): "
              + ", ".join(f"{label} ({n} crops)" for label, n in sorted(not_predicted.items())))
    written = [row for _, rows in crops for row in rows if row.label in cfg.classes]
    problems = check_submission(out, written)
    if problems:
        print("error: the submission's layout is not what the evaluator reads: " + "; ".join(problems), file=sys.stderr)
        return 1
    archive = zip_submission(out)
    print(f"wrote {out} ({len(written)} arrays, layout checked) and {archive} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
