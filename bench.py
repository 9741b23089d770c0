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

train: training images/s of one or more model configs with the data excluded (one real batch kept on
the device) and included (the toolkit loader feeding every step), and the peak memory (GPU: allocated
by torch; CPU: the process's peak RSS). Model and loss are built as in train_local.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Callable

import torch

import config_shenron as C
import losses
from cache import prepare_cache
from datasplit import datasplit_for, read_datasplit, resolve_data_root
from engine import training_step
from errors import DataError
from loaders import train_loader
from models import unet_for_run
from runtime import autocast_for
from sampling import PatchSpec, to_model_inputs


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def _time_once(step: Callable[[], None], device: torch.device) -> float:
    """Seconds for one call of `step`, synchronising the device around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_losses(args: argparse.Namespace) -> int:
    """Time forward+backward of every named loss next to the MONAI Dice + torch BCE reference pair."""
    from monai.losses import DiceLoss as MonaiDiceLoss  # a reference only: imported where it is used

    device = _resolve_device(args.device)
    if not 1 <= args.classes <= len(losses.CLASSES):
        raise SystemExit(f"--classes must be between 1 and {len(losses.CLASSES)}, got {args.classes}")
    classes = losses.CLASSES[: args.classes]
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
            times[name].append(_time_once(lambda: run(name), device))

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
# Memory of this process and its loader workers (Linux /proc)
# ----------------------------------------------------------------------------------------------------
def _proc_fields_mb(pid: int | str, name: str, fields: tuple[str, ...]) -> list[float]:
    """`Field:  N kB` values of /proc/<pid>/<name> in MB (0 for a process that is gone)."""
    values = dict.fromkeys(fields, 0.0)
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return [values[k] for k in fields]


def child_pids() -> set[int]:
    """Live child processes of this process (DataLoader workers)."""
    me, children = os.getpid(), set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # field 4, after "pid (comm) state"
            children.add(int(entry.name))
    return children


class MemoryPeaks:
    """Peak RSS/PSS of this process and peak PSS of each given worker, sampled by a thread every
    `interval` seconds while a `with` block runs (and once at its end); peaks accumulate over blocks."""

    def __init__(self, workers: set[int], interval: float = 0.2):
        self.workers, self.interval = workers, interval
        self.rss = self.pss = 0.0
        self.worker_pss = dict.fromkeys(workers, 0.0)

    def sample(self) -> None:
        rss, pss = _proc_fields_mb("self", "smaps_rollup", ("Rss", "Pss"))
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        for pid in self.workers:
            self.worker_pss[pid] = max(self.worker_pss[pid], _proc_fields_mb(pid, "smaps_rollup", ("Pss",))[0])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemoryPeaks":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ----------------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------------
BACKENDS = ("toolkit", "cellmap-data")
# Issue 6: toolkit / cellmap-data samples/s at 0 workers, 256x256, 14 classes, batch 8.
LOADER_TARGET_RATIO = {"unet_2d": 10.0, "unet_25d": 5.0}


def parse_list(text: str, option: str, convert=str, choices: tuple | None = None) -> list:
    """A comma-separated option value; ValueError naming the option for a bad item."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = convert(item)
        except ValueError:
            raise ValueError(f"{option} {text!r}: {item!r} is not a valid {convert.__name__}") from None
        if choices is not None and value not in choices:
            raise ValueError(f"{option} {text!r}: {item!r} is not one of {', '.join(map(str, choices))}")
        items.append(value)
    return items


def data_setup(data_root: str | None):
    """The data a training run would use: (root, datasplit CSV, crop entries)."""
    root, notice = resolve_data_root(data_root)
    if notice:
        print(notice)
    csv_path = datasplit_for(root)
    return root, csv_path, read_datasplit(csv_path)


def run_cache(entries, cfg):
    """The crop cache a training run with this config would use (prepared on first use, then reopened)."""
    return prepare_cache(entries, cfg.classes, cfg.scale_nm, workers=cfg.workers)


def run_spec(cfg) -> PatchSpec:
    return PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)


def _time_loader(loader, sampler, epoch: int, batches: int) -> float:
    """Samples/s over `batches` batches of one epoch, after its first batch (worker start-up, first reads)."""
    sampler.set_epoch(epoch)
    iterator = iter(loader)
    next(iterator)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += next(iterator)["raw"].shape[0]
    return samples / (time.perf_counter() - start)


def _set_threads(threads: int | None) -> None:
    """--threads: on a shared machine, torch's default of one thread per core makes each parallel kernel
    wait for a busy core (on 2 loaded cores, batch collation's torch.stack of 7 MB of uint8 took 100 ms
    with 2 threads and 9 ms with 1)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} must be >= 1")
        torch.set_num_threads(threads)


def bench_loader(args: argparse.Namespace) -> int:
    """Samples/s and memory of each data backend x worker count, interleaved, medians and ratios."""
    from tqdm import tqdm

    _set_threads(args.threads)
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
                rates[config].append(_time_loader(*loaders[config], epoch=repeat + 1, batches=args.batches))
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


# ----------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------
RTX_2080_TI_BYTES = 11264 * 2**20  # 11 GiB: the memory of each of the target workstation's GPUs


def _reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's allocator peak on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_memory_mb(device: torch.device) -> float:
    """The peak since `_reset_peak_memory`, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_fields_mb("self", "status", ("VmHWM",))[0]


def bench_train(args: argparse.Namespace) -> int:
    """Training images/s with data excluded and included, and peak memory, for each model config."""
    _set_threads(args.threads)
    device = _resolve_device(args.device)
    models = parse_list(args.model, "--model", choices=tuple(C.MODELS))
    batch_sizes = parse_list(args.batch_size, "--batch-size", int) if args.batch_size else [None]
    if len(batch_sizes) == 1:
        batch_sizes *= len(models)
    if len(batch_sizes) != len(models) or min(b or 1 for b in batch_sizes) < 1 or min(args.steps, args.repeats) < 1:
        raise ValueError(f"--batch-size {args.batch_size!r}: give one value >= 1 or one per model "
                         f"({len(models)}); --steps and --repeats must be >= 1")
    if args.precision in ("fp16", "bf16") and device.type == "cpu":
        raise ValueError(f"--precision {args.precision} needs a CUDA device; use fp32 on CPU")
    warmup = 3 if args.compile else 1
    root, csv_path, entries = data_setup(args.data_root)
    rows = []
    for model_name, batch_size in zip(models, batch_sizes):
        cfg = C.config_from_options(device.type, root, model=model_name, batch_size=batch_size, precision=args.precision,
                         patch_yx=args.patch_yx, channels_last=args.channels_last, classes=args.classes,
                         loss=args.loss, base_channels=args.base_channels, depth=args.depth, workers=args.workers,
                         epochs=3, iterations=warmup + args.steps)
        cache = run_cache(entries, cfg)
        loader, sampler = train_loader(cfg, cache, run_spec(cfg), csv_path, pin_memory=device.type == "cuda")
        model = unet_for_run(cfg).to(device)
        if cfg.channels_last and C.MODELS[cfg.model].dims == 2:
            model = model.to(memory_format=torch.channels_last)
        step_model = torch.compile(model) if args.compile else model
        loss_fn = losses.build_loss(cfg.loss, cfg.classes, class_frequencies=cache.class_frequencies("train")).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")
        autocast = autocast_for(cfg.precision, device)
        step = lambda x, y: training_step(step_model, model, loss_fn, optimizer, scaler, autocast, x, y,
                                          cfg.grad_clip)  # train_local.py's step
        inputs = lambda batch: to_model_inputs(batch, device, cfg.channels_last)

        _reset_peak_memory(device)
        sampler.set_epoch(0)
        x_fixed, y_fixed = inputs(next(iter(loader)))
        for _ in range(warmup):
            step(x_fixed, y_fixed)
        without_data, with_data = [], []
        for repeat in range(args.repeats):
            without_data.append(args.steps * cfg.batch_size / _time_once(
                lambda: [step(x_fixed, y_fixed) for _ in range(args.steps)], device))
            sampler.set_epoch(repeat + 1)
            batches = iter(loader)
            for _ in range(warmup):  # the loader's first batches: worker start-up
                step(*inputs(next(batches)))
            with_data.append(args.steps * cfg.batch_size / _time_once(
                lambda: [step(*inputs(next(batches))) for _ in range(args.steps)], device))
        rows.append((model_name, cfg.batch_size, tuple(cfg.patch_shape), statistics.median(without_data),
                     statistics.median(with_data), _peak_memory_mb(device)))
        del loader, model, step_model, optimizer

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory_kind = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    print(f"train: device {device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{cfg.precision}, channels_last {'on' if cfg.channels_last else 'off'}, "
          f"compile {'on' if args.compile else 'off'}; {len(cfg.classes)} classes ({args.classes}), loss {cfg.loss}, "
          f"UNet base {cfg.base_channels} depth {cfg.depth}; {args.steps} steps x {args.repeats} repeats, toolkit "
          f"loader with {cfg.workers} workers; data {root}")
    print(f"{'model':9s} {'batch':>5s} {'patch':>16s} {'img/s no data':>14s} {'img/s with data':>16s} "
          f"{'data cost':>10s} {memory_kind:>12s}")
    for name, batch_size, patch, without, with_, memory in rows:
        print(f"{name:9s} {batch_size:5d} {str(patch):>16s} {without:14.1f} {with_:16.1f} "
              f"{1 - with_ / without:10.0%} {memory:12.0f}")
    if device.type == "cuda":
        for name, batch_size, _, _, _, memory in rows:
            print(f"{name} at batch {batch_size}: {memory * 2**20 / RTX_2080_TI_BYTES:.0%} of an 11 GiB RTX 2080 Ti")
    return 0


def add_train_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("train", help="training images/s (data excluded and included) and peak memory")
    parser.add_argument("--model", default="unet_2d", help=f"model config or comma list: {', '.join(C.MODELS)}")
    parser.add_argument("--batch-size", help="one value or one per model (default: the hardware profile's)")
    parser.add_argument("--precision", choices=list(C.PRECISIONS), help="default: the profile's on CUDA, fp32 on CPU")
    parser.add_argument("--patch-yx", type=int, help="y/x patch size (default: the profile's)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per repeat")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--channels-last", choices=["on", "off"], help="default: on for CUDA, off on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--classes", choices=list(C.CLASS_SETS), default="quick")
    parser.add_argument("--loss", default="per_class_weighted", choices=list(losses.LOSS_CONFIGS))
    parser.add_argument("--base-channels", type=int, help="default: the profile's")
    parser.add_argument("--depth", type=int, help="default: the profile's")
    parser.add_argument("--workers", type=int, help="loader workers for the data-included run (default: the profile's)")
    parser.add_argument("--data-root", help="CellMap data root (default: as train_local.py, else the synthetic set)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.set_defaults(handler=bench_train)


# Each entry adds one subcommand whose parser sets `handler(args) -> exit code`.
COMMANDS = (add_losses_command, add_loader_command, add_train_command)


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
