"""Data benchmarks: preparing the crop cache of a data root, and the sliding window against MONAI's.

cache: prepares a fresh cache of a data root (a temporary folder, removed at the end) and reports its time,
the peak memory of the preparation (this process and its worker processes: the largest PSS sum at one
instant, and the main process's peak RSS), the cache's size per crop and in all, and, for 2D, 2.5D and 3D
training patches drawn as training draws them, the fraction whose raw is at least half missing. It then
extrapolates the cache size to every crop of the official train manifest, under the default
`csc fetch-data` and with raw fetched at all resolutions: per crop, the raw region crop_prep.py keeps (the
chunks of the level it reads that the download holds for any crop of the dataset, as mock_plan.py models
it, within the crop +- its margin) at one byte per voxel plus its validity bits, the bit-packed labels of the toolkit's classes (on the
training grid for fine crops, at their own voxel size for coarse ones) and the foreground coordinates at
their maximum (crop_prep.FOREGROUND_SAMPLES per class: an overestimate for small crops). The same estimate is printed beside
the measured size of every measured crop that is a manifest row, so the model is checked where it can be.

sliding: the blended sliding window of inference.py against MONAI's `sliding_window_inference` with the
same model, tile, overlap and Gaussian blend on the same crop (MONAI is given the toolkit's weight map: its
own Gaussian, also sigma = tile / 8, floors the weights at 1e-3 before rather than after scaling the peak to
1, which moves probabilities near tile corners by ~1e-3), in interleaved repeats
(rotating order): median seconds, the ratio, the peak memory of each above what was held before it
(device memory on CUDA, the process's RSS on the CPU) as a multiple of the float32 output, and their
largest difference. The crop (random raw, every voxel backed by EM) defaults to a size that the tiles
cover exactly, so the two place the same tiles and should agree to float32 rounding.
"""
from __future__ import annotations

import argparse
import gc
import math
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import config_shenron as C
import crop_prep
import inference
import mock_plan
from bench_support import (MemoryPeaks, data_setup, peak_memory_mb, proc_fields_mb, reset_peak_memory,
                           resolve_device, set_threads, time_once)
from cache import cache_directory, crop_key, prepare_cache
from crop_manifest import TRAIN_CROP_MANIFEST, read_train_crops
from models import unet_for_run
from ngff import box_intersection
from sampling import PatchSpec, TrainPatches

MISSING_LIMIT = 0.5          # issue 12: a sample whose raw is at least this share missing is counted
CACHE_TARGET_GB = 15.0       # issue 12: the full train manifest's cache at 8 nm, all 14 classes
PREPARATION_TARGET_GB = 4.0  # issue 12: peak memory of preparing the cache
BYTES_PER_RAW_VOXEL = 1 + 1 / 8   # raw.npy (uint8) + raw_valid.npy (one bit per voxel)


# ----------------------------------------------------------------------------------------------------
# cache: estimate of one manifest crop
# ----------------------------------------------------------------------------------------------------
def _level_box_nm(level: mock_plan.RawLevel, ranges) -> tuple[np.ndarray, np.ndarray]:
    """The world box [lo, hi) nm of a range of chunks of a raw level."""
    grid = level.grid
    first = np.array([a for a, _ in ranges]) * level.chunks
    stop = np.minimum(np.array([b for _, b in ranges]) * level.chunks, grid.shape)
    corner = np.array(grid.translation) - np.array(grid.scale) / 2
    return corner + first * grid.scale, corner + stop * grid.scale


def estimate_crop_bytes(row, dataset: mock_plan.DatasetPlan, fetched: dict, scale) -> tuple[int, int, str]:
    """(bytes of raw and labels, bound on the foreground coordinates' bytes, state) the cache holds for one
    manifest crop, given the raw the download holds for its dataset
    (`fetched`: level path -> world boxes [lo, hi) nm of the chunks copied for any crop of the dataset: crops
    share a dataset's raw, so a coarse crop can find 8-nm raw fetched for a fine crop inside it). State:
    "cached", "on demand" (raw read from zarr, only its chunk presence kept), "skipped" (no raw at or below the
    training scale over it) or "no classes"."""
    scale = np.asarray(scale, dtype=float)
    classes = [c for c in C.ALL_CLASSES if c in row.classes]
    if not classes:
        return 0, 0, "no classes"
    lo_nm, hi_nm = (np.asarray(b) for b in row.box_nm())
    crop_lo, crop_hi = np.round(lo_nm / scale), np.round(hi_nm / scale)
    margin, block = np.asarray(crop_prep.RAW_MARGIN), crop_prep.BLOCK
    region_lo, region_hi = crop_lo - margin, crop_hi + margin

    # crop_prep.raw_level_for: the matching level, else the coarsest finer one, with raw over the crop itself
    fine = [lv for lv in dataset.levels if all(s <= t * (1 + crop_prep.SCALE_TOLERANCE)
                                               for s, t in zip(lv.grid.scale, scale))]
    fine.sort(key=lambda lv: (not np.allclose(lv.grid.scale, scale), -np.prod(lv.grid.scale)))
    boxes = None
    for level in fine:
        here = [(b_lo / scale, b_hi / scale) for b_lo, b_hi in fetched.get(level.path, ())]
        if any(box_intersection(crop_lo, crop_hi, *box) for box in here):
            boxes = [inter for box in here if (inter := box_intersection(region_lo, region_hi, *box))]
            break
    if boxes is None:
        return 0, 0, "skipped"
    # the kept raw region: the coverage blocks (from the region's corner) that hold raw
    kept_lo = region_lo + np.floor((np.min([b[0] for b in boxes], axis=0) - region_lo) / block) * block
    kept_hi = np.minimum(region_hi, region_lo + np.ceil((np.max([b[1] for b in boxes], axis=0) - region_lo)
                                                         / block) * block)
    kept = kept_hi - kept_lo
    raw_voxels = int(np.prod(kept))
    grid_labels = all(v <= s * (1 + crop_prep.SCALE_TOLERANCE) for v, s in zip(row.voxel_size, scale))
    label_shape = (crop_hi - crop_lo).astype(int) if grid_labels else np.asarray(row.shape)
    label_bytes = len(classes) * int(np.prod(label_shape[:2])) * math.ceil(label_shape[2] / 8)
    foreground_bound = len(classes) * crop_prep.FOREGROUND_SAMPLES * 4 * 4     # int32 (class, z, y, x)
    coverage_bytes = int(np.prod(np.ceil(kept / block)))
    if raw_voxels > crop_prep.RAW_CACHE_VOXELS:
        return label_bytes + coverage_bytes, foreground_bound, "on demand"
    return int(raw_voxels * BYTES_PER_RAW_VOXEL) + label_bytes + coverage_bytes, foreground_bound, "cached"


def manifest_estimates(manifest: Path, scale, all_resolutions: bool, crop_ids=None) -> dict[int, tuple]:
    """estimate_crop_bytes for the crops `crop_ids` of a train manifest (default: all), by crop id, with the raw
    a download of exactly those crops holds (mock_plan.py's model of `csc fetch-data`)."""
    rows = read_train_crops(manifest)
    datasets = {name: mock_plan.raw_pyramid(name, [r for r in rows.values() if r.dataset == name])
                for name in sorted({r.dataset for r in rows.values()})}
    chosen = [rows[i] for i in (rows if crop_ids is None else crop_ids) if i in rows]
    fetched: dict[tuple[str, str], list] = {}
    for row in chosen:
        dataset = datasets[row.dataset]
        plan = mock_plan.crop_plan(row, dataset, "ours", 0, all_resolutions)
        for level in dataset.levels:
            if level.path in plan.raw_chunks:
                fetched.setdefault((row.dataset, level.path), []).append(
                    _level_box_nm(level, plan.raw_chunks[level.path]))
    return {row.crop_id: estimate_crop_bytes(
        row, datasets[row.dataset], {path: boxes for (name, path), boxes in fetched.items() if name == row.dataset},
        scale) for row in chosen}


# ----------------------------------------------------------------------------------------------------
# cache: the measurement
# ----------------------------------------------------------------------------------------------------
SIDE_FILES = ("foreground.npy", "meta.json")   # not modelled by the estimate's raw and labels


def folder_bytes(path: Path, leave_out: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name not in leave_out)


def crop_id_of(crop_path: str) -> int | None:
    match = re.search(r"crop(\d+)$", str(crop_path).rstrip("/"))
    return int(match.group(1)) if match else None


def missing_raw_fractions(cache, cfg: C.RunConfig, samples: int) -> tuple[float, float, float]:
    """(share of samples with raw at least MISSING_LIMIT missing, mean missing share, largest) over the
    first `samples` training draws of a run with this config (before augmentation, which moves no voxel
    in or out of a patch)."""
    patches = TrainPatches(cache, PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims), seed=cfg.seed,
                           foreground_fraction=cfg.foreground_fraction, augment=False,
                           max_missing=cfg.max_missing_raw)
    missing = np.array([patches.patch((0, i))[0].missing for i in range(samples)])
    return float((missing >= MISSING_LIMIT).mean()), float(missing.mean()), float(missing.max())


def bench_cache(args: argparse.Namespace) -> int:
    if args.samples < 1 or args.workers < 0:
        raise ValueError(f"--samples {args.samples} must be >= 1 and --workers {args.workers} >= 0")
    manifest = Path(args.manifest)
    if not manifest.is_file():
        raise ValueError(f"--manifest {manifest}: no such file (the shipped one is {TRAIN_CROP_MANIFEST})")
    root, _, entries = data_setup(args.data_root)
    cfg = C.config_from_options("cpu", root, classes=args.classes, profile=args.profile)
    scale = tuple(cfg.scale_nm)
    parent = Path(args.cache_root or C.DEFAULT_CACHE_DIR)
    parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=parent))
    try:
        peaks = MemoryPeaks(None)
        start = time.perf_counter()
        with peaks:
            cache = prepare_cache(entries, C.ALL_CLASSES, scale, cache_root=fresh, workers=args.workers)
        seconds = time.perf_counter() - start
        directory = cache_directory(scale, fresh)
        total = folder_bytes(directory)
        measured = {e.name: (crop_id_of(e.crop_path), folder_bytes(directory / crop_key(e, scale)),
                             folder_bytes(directory / crop_key(e, scale), SIDE_FILES)) for e in entries}
        states = {row["name"]: row["status"] for row in cache.rows}
        missing = {}
        for model in C.MODELS:
            run_cfg = C.config_from_options("cpu", root, classes=args.classes, profile=args.profile, model=model)
            run_cache = prepare_cache(entries, run_cfg.classes, scale, cache_root=fresh, progress=False)
            missing[model] = (tuple(run_cfg.patch_shape),) + missing_raw_fractions(run_cache, run_cfg, args.samples)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)

    estimates = {flag: manifest_estimates(manifest, scale, flag) for flag in (False, True)}
    measured_ids = [i for i, *_ in measured.values() if i is not None]
    here = manifest_estimates(manifest, scale, False, measured_ids)   # a download of exactly these crops
    print(f"cache: {len(entries)} crops of {root}; training scale {'x'.join(f'{s:g}' for s in scale)} nm, "
          f"all {len(C.ALL_CLASSES)} classes; {args.workers} preparation workers")
    print(f"preparation: {seconds:.1f} s; peak memory {peaks.total_pss / 1024:.2f} GB (PSS of this process and "
          f"its workers at one instant; target <= {PREPARATION_TARGET_GB:g} GB), main process peak RSS "
          f"{peaks.rss / 1024:.2f} GB; cache {total / 1e9:.3f} GB")
    print(f"{'crop':34s} {'status':>8s} {'measured MB':>12s} {'raw+labels MB':>14s} {'estimate MB':>12s} "
          f"{'est/meas':>9s}")
    for name, (crop_id, size, core) in measured.items():
        estimate = here.get(crop_id)
        est = f"{estimate[0] / 1e6:12.1f}" if estimate else f"{'-':>12s}"
        ratio = f"{estimate[0] / core:9.2f}" if estimate and core > 4096 else f"{'-':>9s}"
        print(f"{name:34s} {states.get(name, '?'):>8s} {size / 1e6:12.1f} {core / 1e6:14.1f} {est} {ratio}")
    known = [(here[i][0], core) for i, _, core in measured.values() if i in here]
    if known:
        print(f"estimate / measured raw and labels over the {len(known)} manifest crops measured here: "
              f"{sum(e for e, _ in known) / max(1, sum(c for _, c in known)):.2f} (estimate: a download of exactly "
              f"these crops; foreground coordinates and meta.json, {sum(s - c for _, s, c in measured.values()) / 1e6:.1f} "
              f"MB here, are added to the extrapolation at their bound)")
    for flag, label in ((False, "default csc fetch-data"), (True, "EM fetched at all resolutions")):
        values = estimates[flag].values()
        counts = {state: sum(1 for *_, s in values if s == state)
                  for state in ("cached", "on demand", "skipped", "no classes")}
        size = sum(b + bound for b, bound, _ in values) / 1e9
        print(f"extrapolated to the {len(values)} crops of {manifest.name} ({label}): {size:.1f} GB "
              f"(target <= {CACHE_TARGET_GB:g} GB); crops cached {counts['cached']}, raw on demand "
              f"{counts['on demand']}, skipped for want of raw {counts['skipped']}, without any of the "
              f"{len(C.ALL_CLASSES)} classes {counts['no classes']}")
    print(f"\ntraining samples whose raw is >= {MISSING_LIMIT:.0%} missing ({args.samples} draws per model, "
          f"--max-missing-raw {cfg.max_missing_raw:g}):")
    print(f"{'model':9s} {'patch':>16s} {'>= 50% missing':>15s} {'mean missing':>13s} {'max missing':>12s}")
    for model, (patch, share, mean, worst) in missing.items():
        print(f"{model:9s} {str(patch):>16s} {share:15.2%} {mean:13.2%} {worst:12.2%}")
    return 0


def add_cache_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("cache", help="fresh cache preparation: time, peak memory, size, missing raw, "
                                                  "extrapolation to the train manifest")
    parser.add_argument("--data-root", help="CellMap data root (default: as train_local.py, else the synthetic set)")
    parser.add_argument("--workers", type=int, default=2, help="preparation worker processes")
    parser.add_argument("--classes", choices=list(C.CLASS_SETS), default="all",
                        help="the class set of the training runs whose patches are drawn")
    parser.add_argument("--profile", choices=list(C.PROFILES), default="shenron",
                        help="hardware profile whose patch sizes are drawn (default: the workstation's)")
    parser.add_argument("--samples", type=int, default=2000, help="training draws per model")
    parser.add_argument("--manifest", default=str(TRAIN_CROP_MANIFEST), help="train manifest to extrapolate to")
    parser.add_argument("--cache-root", help="folder for the temporary cache (default: the toolkit's cache folder)")
    parser.set_defaults(handler=bench_cache)


# ----------------------------------------------------------------------------------------------------
# sliding: ours against MONAI's
# ----------------------------------------------------------------------------------------------------
class ArrayCrop:
    """A crop held in memory with the window interface of cache.CachedCrop, raw backed by EM everywhere in it
    and missing beyond it."""

    def __init__(self, raw: np.ndarray, classes: int):
        self.raw, self.name, self.shape = raw, "bench crop", raw.shape
        self.annotated = np.ones(classes, bool)

    def raw_window(self, start, shape):
        out, valid = np.zeros(shape, np.uint8), np.zeros(shape, bool)
        src = tuple(slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, shape, self.shape))
        dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
        if all(a.stop > a.start for a in src):
            out[dst], valid[dst] = self.raw[src], True
        return out, valid


class SliceModel(torch.nn.Module):
    """A 2D model seen by MONAI as a 3D predictor over tiles one slice deep."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x[:, :, 0])[:, :, None]


def measure(call, device: torch.device) -> tuple[float, float, object]:
    """(seconds, peak memory MB above what was held before, result) of one call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) / 2**20
    else:
        held = proc_fields_mb("self", "status", ("VmRSS",))[0]
    reset_peak_memory(device)
    result = []
    seconds = time_once(lambda: result.append(call()), device)
    return seconds, peak_memory_mb(device) - held, result[0]


def bench_sliding(args: argparse.Namespace) -> int:
    from monai.inferers import sliding_window_inference  # the reference: imported where it is used

    set_threads(args.threads)
    device = resolve_device(args.device)
    dims = C.MODELS[args.model].dims
    if dims == 2 and C.MODELS[args.model].input_slices != 1:
        raise ValueError(f"--model {args.model}: MONAI's window cannot give a tile z context; use unet_2d or unet_3d")
    if min(args.shape, args.tile, args.batch_size, args.repeats) < 1 or not 0 <= args.overlap < 1:
        raise ValueError("--shape, --tile, --batch-size and --repeats must be >= 1, --overlap in [0, 1)")
    multiple = 2 ** (args.depth - 1)
    if args.tile % multiple:
        raise ValueError(f"--tile {args.tile} must be a multiple of {multiple} for a UNet of depth {args.depth}")
    torch.manual_seed(0)
    cfg = C.config_from_options(device.type, "", model=args.model, classes=args.classes,
                                base_channels=args.base_channels, depth=args.depth)
    model = unet_for_run(cfg).to(device).eval()
    classes = len(cfg.classes)
    tile = (args.tile if dims == 3 else 1, args.tile, args.tile)
    spec = PatchSpec(tile, dims)
    raw = np.random.default_rng(0).integers(0, 256, size=(args.shape,) * 3, dtype=np.uint8)
    crop = ArrayCrop(raw, classes)
    predictor = model if dims == 3 else SliceModel(model)
    volume = torch.from_numpy(raw).to(device)[None, None]
    weights = torch.from_numpy(inference.blending_weights(tile)).to(device)  # the same blend for both

    def ours():
        return inference.predict_crop(model, crop, spec, device, overlap=args.overlap, batch_size=args.batch_size)

    @torch.no_grad()
    def monai():
        x = volume.float().div_(255.0)
        out = sliding_window_inference(x, tile, args.batch_size, lambda t: torch.sigmoid(predictor(t)),
                                       overlap=args.overlap, roi_weight_map=weights, padding_mode="constant",
                                       cval=0.0, sw_device=device, device=device)
        return out[0].cpu().numpy()

    calls = {"toolkit": ours, "MONAI": monai}
    ours(), monai()  # warm-up: allocator, kernels
    times, peaks, outputs = {k: [] for k in calls}, {k: 0.0 for k in calls}, {}
    for repeat in range(args.repeats):
        names = list(calls)[repeat % 2:] + list(calls)[:repeat % 2]
        for name in names:
            seconds, peak, outputs[name] = measure(calls[name], device)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    output_mb = classes * raw.size * 4 / 2**20
    difference = float(np.abs(outputs["toolkit"] - outputs["MONAI"]).max())
    where = "GPU memory" if device.type == "cuda" else "RSS"
    print(f"sliding: {args.model} (UNet base {args.base_channels}, depth {args.depth}), crop {args.shape}^3, tile "
          f"{tile}, overlap {args.overlap:g}, Gaussian blend sigma {inference.BLEND_SIGMA:g} x tile, batch "
          f"{args.batch_size}, {classes} classes ({args.classes}); {args.repeats} interleaved repeats; device {device}, torch "
          f"threads {torch.get_num_threads()}; float32 output {output_mb:.0f} MB")
    print(f"{'window':8s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'peak ' + where + ' MB':>18s} {'x output':>9s}")
    for name in calls:
        print(f"{name:8s} {statistics.median(times[name]):9.2f} {min(times[name]):7.2f} {max(times[name]):7.2f} "
              f"{peaks[name]:18.0f} {peaks[name] / output_mb:9.2f}")
    ratio = statistics.median(times["toolkit"]) / statistics.median(times["MONAI"])
    print(f"toolkit / MONAI time: {ratio:.2f}x (target <= 1.0x); toolkit peak memory "
          f"{peaks['toolkit'] / output_mb:.2f}x the float32 output (target <= 2x); largest difference "
          f"{difference:.1e}")
    return 0


def add_sliding_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("sliding", help="the toolkit's sliding window against MONAI's: time, memory, "
                                                    "agreement")
    parser.add_argument("--model", choices=("unet_2d", "unet_3d"), default="unet_3d", help="default: %(default)s")
    parser.add_argument("--shape", type=int, default=192, help="crop edge in voxels (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=64, help="tile edge, y/x and z for 3D (default: %(default)s)")
    parser.add_argument("--overlap", type=float, default=0.5, help="tile overlap fraction (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default: %(default)s)")
    parser.add_argument("--classes", choices=list(C.CLASS_SETS), default="all", help="output classes (default: %(default)s)")
    parser.add_argument("--base-channels", type=int, default=8, help="UNet width (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=3, help="UNet depth (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.set_defaults(handler=bench_sliding)
