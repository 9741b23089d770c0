"""The toolkit's micro-benchmarks, one subcommand each (`python bench.py <subcommand> --help`).

losses: forward+backward time of every named loss configuration (`losses.LOSS_CONFIGS`) on one batch of
random logits and targets with ~10% NaN (unannotated) voxels, next to the unmasked reference pair MONAI
DiceLoss(sigmoid=True) + torch BCEWithLogitsLoss on the same logits (NaN replaced by 0: it cannot mask).
After a warm-up, the configurations run interleaved, round by round in a rotating order, so machine noise
hits them all alike; the table gives each one's median time and its ratio to the reference pair.

loader: training samples/s of the data backends (`toolkit`: the cached path training uses; `cellmap-data`:
the reference path of cellmap_backend.py) for one model config, each backend x worker count built once and
timed in interleaved repeats (rotating order) after a warm-up batch; the table gives medians, the ratio
toolkit / cellmap-data per worker count, and memory: the main process's peak RSS and PSS (one process
hosts every configuration of the run, so these include the others' state) and each worker's peak PSS
from /proc/<pid>/smaps_rollup, which splits pages shared through fork and the cache's memory maps among
the processes that map them (RSS would count them once per worker).

train, gpu: training images/s and memory, and the prepared check of a GPU machine (bench_train.py).

cache, sliding: fresh cache preparation (time, memory, size, missing raw, extrapolation to the train
manifest) and the sliding window against MONAI's (bench_data.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable

import torch

import bench_data
import bench_train
import config_shenron as C
import losses
from bench_support import (MemoryPeaks, child_pids, data_setup, parse_list, resolve_device, run_cache, run_spec,
                           set_threads, time_loader, time_once)
from errors import DataError
from loaders import train_loader


def bench_losses(args: argparse.Namespace) -> int:
    """Time forward+backward of every named loss next to the MONAI Dice + torch BCE reference pair."""
    from monai.losses import DiceLoss as MonaiDiceLoss  # a reference only: imported where it is used

    device = resolve_device(args.device)
    if not 1 <= args.classes <= len(C.ALL_CLASSES):
        raise SystemExit(f"--classes must be between 1 and {len(C.ALL_CLASSES)}, got {args.classes}")
    classes = C.ALL_CLASSES[: args.classes]
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.classes, args.size, args.size)
    logits = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    positive_rate = torch.linspace(0.02, 0.4, args.classes).view(1, -1, 1, 1)
    target = (torch.rand(shape, generator=generator) < positive_rate).float()
    target[torch.rand(shape, generator=generator) < args.nan_fraction] = float("nan")
    target = target.to(device)
    reference_target = torch.nan_to_num(target, nan=0.0)
    annotated = ~torch.isnan(target)
    frequencies = (torch.nan_to_num(target).sum((0, 2, 3)) / annotated.sum((0, 2, 3))).tolist()
    class_frequencies = dict(zip(classes, frequencies))

    monai_dice = MonaiDiceLoss(sigmoid=True)
    torch_bce = torch.nn.BCEWithLogitsLoss()
    reference = "monai_dice+bce"
    steps: dict[str, Callable[[], torch.Tensor]] = {
        reference: lambda: monai_dice(logits, reference_target) + torch_bce(logits, reference_target)}
    for name in losses.LOSS_CONFIGS:
        loss = losses.build_loss(name, classes, class_frequencies=class_frequencies).to(device)
        steps[name] = lambda loss=loss: loss(logits, target)

    def run(name: str) -> None:
        logits.grad = None
        steps[name]().backward()

    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: allocator, kernels, lazy imports
        run(name)
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(lambda: run(name), device))

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"batch {shape}: B={args.batch} C={args.classes} {args.size}x{args.size}, "
          f"{args.nan_fraction:.0%} NaN voxels, {args.repeats} interleaved repeats after a warm-up")
    reference_ms = statistics.median(times[reference]) * 1e3
    print(f"{'loss':30s} {'median ms':>10s} {'ratio':>7s}")
    for name in names:
        median_ms = statistics.median(times[name]) * 1e3
        print(f"{name:30s} {median_ms:10.1f} {median_ms / reference_ms:7.2f}")
    ratio = statistics.median(times["per_class_weighted"]) * 1e3 / reference_ms
    verdict = "yes" if ratio <= 1.0 else "NO"
    print(f"per_class_weighted (masked, weighted) ratio {ratio:.2f} to the unmasked MONAI pair <= 1.0: {verdict}")
    return 0


def add_losses_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("losses", help="forward+backward time of every named loss")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--size", type=int, default=256, help="patch height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nan-fraction", type=float, default=0.1, help="share of unannotated voxels")
    parser.set_defaults(handler=bench_losses)


# ----------------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------------
BACKENDS = ("toolkit", "cellmap-data")
# Issue 6: toolkit / cellmap-data samples/s at 0 workers, 256x256, 14 classes, batch 8.
LOADER_TARGET_RATIO = {"unet_2d": 10.0, "unet_25d": 5.0}


def bench_loader(args: argparse.Namespace) -> int:
    """Samples/s and memory of each data backend x worker count, interleaved, medians and ratios."""
    from tqdm import tqdm

    set_threads(args.threads)
    backends = BACKENDS if args.backend == "both" else parse_list(args.backend, "--backend", choices=BACKENDS)
    backends = list(dict.fromkeys(backends))
    worker_counts = list(dict.fromkeys(parse_list(args.workers, "--workers", int)))
    if any(w < 0 for w in worker_counts) or min(args.batches, args.batch_size, args.repeats) < 1:
        raise ValueError("--workers must be >= 0 and --batches, --batch-size, --repeats >= 1")
    root, csv_path, entries = data_setup(args.data_root)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"  # the profile training here would use
    configs = [(b, w) for w in worker_counts for b in backends]
    loaders, peaks, rates = {}, {}, {c: [] for c in configs}
    for config in configs:
        backend, workers = config
        cfg = C.config_from_options(device_type, root, model=args.model, classes=args.classes, patch_yx=args.patch_yx,
                         batch_size=args.batch_size, workers=workers, data_backend=backend, epochs=1,
                         iterations=args.batches + 1)
        spec = run_spec(cfg)
        before = child_pids()
        loaders[config] = train_loader(cfg, run_cache(entries, cfg), spec, csv_path)
        loader, sampler = loaders[config]
        sampler.set_epoch(0)
        next(iter(loader))  # warm-up: starts the (persistent) workers, opens files
        peaks[config] = MemoryPeaks(child_pids() - before)
    bar = tqdm(total=args.repeats * len(configs), desc="loader repeats", unit="run", file=sys.stderr)
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for config in configs[shift:] + configs[:shift]:
            with peaks[config]:
                rates[config].append(time_loader(*loaders[config], epoch=repeat + 1, batches=args.batches))
            bar.update()
    bar.close()

    print(f"loader: {args.model} patch {spec.raw_shape}, {len(cfg.classes)} classes ({args.classes}), batch "
          f"{args.batch_size}, {args.batches} batches x {args.repeats} interleaved repeats after a warm-up batch; "
          f"data {root}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"{'backend':13s} {'workers':>7s} {'samples/s':>10s} {'min':>8s} {'max':>8s} {'main RSS MB':>12s} "
          f"{'main PSS MB':>12s} {'PSS MB/worker':>14s} {'total PSS MB':>13s}")
    medians = {}
    for config in configs:
        backend, workers = config
        medians[config] = statistics.median(rates[config])
        memory = peaks[config]
        per_worker = statistics.mean(memory.worker_pss.values()) if memory.worker_pss else 0.0
        total = memory.pss + sum(memory.worker_pss.values())
        print(f"{backend:13s} {workers:7d} {medians[config]:10.1f} {min(rates[config]):8.1f} {max(rates[config]):8.1f} "
              f"{memory.rss:12.0f} {memory.pss:12.0f} {per_worker:14.0f} {total:13.0f}")
    if len(backends) == 2:
        issue_setting = args.classes == "all" and spec.raw_shape[1:] == (256, 256) and args.batch_size == 8
        target = LOADER_TARGET_RATIO.get(args.model) if issue_setting else None
        for workers in worker_counts:
            ratio = medians[("toolkit", workers)] / medians[("cellmap-data", workers)]
            verdict = ""
            if target and workers == 0:
                verdict = f" (issue 6 target >= {target:g}x: {'yes' if ratio >= target else 'NO'})"
            print(f"toolkit / cellmap-data at {workers} workers: {ratio:.1f}x{verdict}")
    return 0


def add_loader_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("loader", help="training samples/s and memory of the data backends")
    parser.add_argument("--data-root", help="CellMap data root (default: as train_local.py, else the synthetic set)")
    parser.add_argument("--model", choices=list(C.MODELS), default="unet_2d")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0", help="worker count or comma list for a sweep, e.g. 0,1,2")
    parser.add_argument("--backend", default="toolkit",
                        help=f"{', '.join(BACKENDS)}, a comma list, or 'both' (side by side)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per repeat")
    parser.add_argument("--classes", choices=list(C.CLASS_SETS), default="all")
    parser.add_argument("--patch-yx", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's)")
    parser.set_defaults(handler=bench_loader)


COMMANDS = (add_losses_command, add_loader_command, bench_train.add_train_command, bench_train.add_gpu_command,
            bench_data.add_cache_command, bench_data.add_sliding_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subcommands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
