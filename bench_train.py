"""Training benchmarks, built exactly as train_local.py builds a run (engine.build_trainer, the run's loader
and loss):

train: training images/s of model configs with the data excluded (one real batch kept on the device) and
included (the toolkit loader feeding every step), and the peak memory (GPU: allocated by torch; CPU: the
process's peak RSS).

gpu: the prepared check of a GPU machine, one command of a few minutes: img/s and peak memory of 2D, 2.5D
and 3D at the hardware profile's batch sizes with the loader's own rate beside them; the agreement of the
mixed-precision and fp32 losses over the first steps from the same weights and batches; channels_last and
torch.compile on/off. It refuses to run without CUDA unless `--device cpu` asks for a dry run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import config_shenron as C
import losses
from bench_support import (RTX_2080_TI_BYTES, data_setup, parse_list, peak_memory_mb, reset_peak_memory,
                           resolve_device, run_cache, run_spec, set_threads, time_loader, time_once)
from engine import build_trainer, training_step
from loaders import train_loader
from runtime import DistributedEnv, autocast_for, check_precision
from sampling import to_model_inputs

GPU_CHECK_TARGET_S = 300           # issue 15: the GPU check takes at most 5 minutes
AGREEMENT_STEPS = 5                # first optimiser steps compared between mixed precision and fp32
AGREEMENT_TOLERANCE = 0.02         # largest relative loss difference still called agreement


class Setup:
    """One model config ready to train: its loader, the train_local.py step on device batches, and the
    conversion of loader batches to device inputs."""

    def __init__(self, cfg: C.RunConfig, device: torch.device, entries, csv_path, compile_model: bool = False,
                 precision: str | None = None):
        self.cfg, self.device = cfg, device
        cache = run_cache(entries, cfg)
        self.loader, self.sampler = train_loader(cfg, cache, run_spec(cfg), csv_path,
                                                 pin_memory=device.type == "cuda")
        torch.manual_seed(cfg.seed)  # the same initial weights for every setup of one config
        loss_fn = losses.build_loss(cfg.loss, cfg.classes, class_frequencies=cache.class_frequencies("train"))
        self.trainer = build_trainer(cfg, loss_fn.to(device), device, DistributedEnv())
        # build_trainer trains fp32 on the CPU; a benchmark may ask for CPU autocast (bf16) explicitly
        self.autocast = autocast_for(precision, device) if precision else self.trainer.autocast
        self.step_model = torch.compile(self.trainer.model) if compile_model else self.trainer.model
        self.warmup = 3 if compile_model else 1   # compilation happens in the first steps

    def step(self, x: torch.Tensor, y: torch.Tensor):
        t = self.trainer
        return training_step(self.step_model, t.raw_model, t.loss_fn, t.optimizer, t.scaler, self.autocast, x, y,
                             t.grad_clip)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_inputs(batch, self.device, self.cfg.channels_last)

    def first_batches(self, n: int, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        batches = iter(self.loader)
        return [self.inputs(next(batches)) for _ in range(n)]


def fixed_batch_rate(setup: Setup, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """img/s of `steps` steps on one batch already on the device: the model's rate, no data loading."""
    return steps * setup.cfg.batch_size / time_once(lambda: [setup.step(x, y) for _ in range(steps)], setup.device)


def measure_rates(setup: Setup, steps: int, repeats: int) -> tuple[float, float, float]:
    """(median img/s on one fixed device batch, median img/s fed by the loader, peak memory MB) over
    `repeats` alternating repeats of `steps` steps, after warm-up steps."""
    device, batch_size = setup.device, setup.cfg.batch_size
    reset_peak_memory(device)
    x_fixed, y_fixed = setup.first_batches(1)[0]
    for _ in range(setup.warmup):
        setup.step(x_fixed, y_fixed)
    without_data, with_data = [], []
    for repeat in range(repeats):
        without_data.append(fixed_batch_rate(setup, x_fixed, y_fixed, steps))
        setup.sampler.set_epoch(repeat + 1)
        batches = iter(setup.loader)
        for _ in range(setup.warmup):  # the loader's first batches: worker start-up
            setup.step(*setup.inputs(next(batches)))
        with_data.append(steps * batch_size / time_once(lambda: [setup.step(*setup.inputs(next(batches)))
                                                                 for _ in range(steps)], device))
    return statistics.median(without_data), statistics.median(with_data), peak_memory_mb(device)


def run_config(device: torch.device, root, args: argparse.Namespace, **options) -> C.RunConfig:
    """The RunConfig of a training run with the benchmark's common options and `options` on `device`."""
    common = dict(patch_yx=args.patch_yx, classes=args.classes, loss=args.loss, base_channels=args.base_channels,
                  depth=args.depth, workers=args.workers, epochs=3, iterations=4 + args.steps)
    return C.config_from_options(device.type, root, **dict(common, **options))


def device_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"


def memory_kind(device: torch.device) -> str:
    return "peak GPU MB" if device.type == "cuda" else "peak RSS MB"


# ----------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------
def bench_train(args: argparse.Namespace) -> int:
    """Training images/s with data excluded and included, and peak memory, for each model config."""
    set_threads(args.threads)
    device = resolve_device(args.device)
    models = parse_list(args.model, "--model", choices=tuple(C.MODELS))
    batch_sizes = parse_list(args.batch_size, "--batch-size", int) if args.batch_size else [None]
    if len(batch_sizes) == 1:
        batch_sizes *= len(models)
    if len(batch_sizes) != len(models) or min(b or 1 for b in batch_sizes) < 1 or min(args.steps, args.repeats) < 1:
        raise ValueError(f"--batch-size {args.batch_size!r}: give one value >= 1 or one per model "
                         f"({len(models)}); --steps and --repeats must be >= 1")
    if args.precision in ("fp16", "bf16") and device.type == "cpu":
        raise ValueError(f"--precision {args.precision} needs a CUDA device; use fp32 on CPU")
    root, csv_path, entries = data_setup(args.data_root)
    rows = []
    for model_name, batch_size in zip(models, batch_sizes):
        cfg = run_config(device, root, args, model=model_name, batch_size=batch_size, precision=args.precision,
                         channels_last=args.channels_last)
        check_precision(cfg.precision, device.type)
        setup = Setup(cfg, device, entries, csv_path, compile_model=args.compile)
        rows.append((model_name, cfg.batch_size, tuple(cfg.patch_shape)) + measure_rates(setup, args.steps,
                                                                                           args.repeats))
        del setup

    print(f"train: {device_line(device)}; {cfg.precision}, channels_last {'on' if cfg.channels_last else 'off'}, "
          f"compile {'on' if args.compile else 'off'}; {len(cfg.classes)} classes ({args.classes}), loss {cfg.loss}, "
          f"UNet base {cfg.base_channels} depth {cfg.depth}; {args.steps} steps x {args.repeats} repeats, toolkit "
          f"loader with {cfg.workers} workers; data {root}")
    print(f"{'model':9s} {'batch':>5s} {'patch':>16s} {'img/s no data':>14s} {'img/s with data':>16s} "
          f"{'data cost':>10s} {memory_kind(device):>12s}")
    for name, batch_size, patch, without, with_, memory in rows:
        print(f"{name:9s} {batch_size:5d} {str(patch):>16s} {without:14.1f} {with_:16.1f} "
              f"{1 - with_ / without:10.0%} {memory:12.0f}")
    if device.type == "cuda":
        for name, batch_size, _, _, _, memory in rows:
            print(f"{name} at batch {batch_size}: {memory * 2**20 / RTX_2080_TI_BYTES:.0%} of an 11 GiB RTX 2080 Ti")
    return 0


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patch-yx", type=int, help="y/x patch size (default: the profile's)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per repeat")
    parser.add_argument("--classes", choices=list(C.CLASS_SETS), default="quick")
    parser.add_argument("--loss", default="per_class_weighted", choices=list(C.LOSS_CONFIGS))
    parser.add_argument("--base-channels", type=int, help="default: the profile's")
    parser.add_argument("--depth", type=int, help="default: the profile's")
    parser.add_argument("--workers", type=int, help="loader workers for the data-included run (default: the profile's)")
    parser.add_argument("--data-root", help="CellMap data root (default: as train_local.py, else the synthetic set)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")


def add_train_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("train", help="training images/s (data excluded and included) and peak memory")
    parser.add_argument("--model", default="unet_2d", help=f"model config or comma list: {', '.join(C.MODELS)}")
    parser.add_argument("--batch-size", help="one value or one per model (default: the hardware profile's)")
    parser.add_argument("--precision", choices=list(C.PRECISIONS), help="default: the profile's on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--channels-last", choices=["on", "off"], help="default: on for CUDA, off on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_common_options(parser)
    parser.set_defaults(handler=bench_train)


# ----------------------------------------------------------------------------------------------------
# gpu: the prepared check of a GPU machine
# ----------------------------------------------------------------------------------------------------
def throughput_section(device, root, csv_path, entries, args) -> None:
    """img/s without and with data, the loader's own rate and peak memory per model at the profile's batch."""
    print(f"{'model':9s} {'batch':>5s} {'patch':>16s} {'precision':>10s} {'img/s no data':>14s} "
          f"{'img/s with data':>16s} {'loader img/s':>13s} {'loader/GPU':>11s} {memory_kind(device):>12s} "
          f"{'of 11 GiB':>10s}")
    for model_name in C.MODELS:
        cfg = run_config(device, root, args, model=model_name)
        setup = Setup(cfg, device, entries, csv_path)
        without, with_, memory = measure_rates(setup, args.steps, args.repeats)
        loader_rate = time_loader(setup.loader, setup.sampler, epoch=args.repeats + 1, batches=args.steps)
        share = f"{memory * 2**20 / RTX_2080_TI_BYTES:.0%}" if device.type == "cuda" else "-"
        precision = cfg.precision if device.type == "cuda" else "fp32"
        print(f"{model_name:9s} {cfg.batch_size:5d} {str(tuple(cfg.patch_shape)):>16s} {precision:>10s} "
              f"{without:14.1f} {with_:16.1f} {loader_rate:13.1f} {loader_rate / without:10.2f}x {memory:12.0f} "
              f"{share:>10s}")
        del setup


def agreement_section(device, root, csv_path, entries, args) -> bool:
    """The first steps of an fp32 run: at each step's weights and batch, the loss under the profile's mixed
    precision (bf16 on the CPU) beside the fp32 loss; and the losses of the same steps trained in mixed
    precision (the GradScaler's back-offs, which skip updates, make these drift apart by design)."""
    low = "bf16" if device.type == "cpu" else C.choose_profile(device=device.type).precision
    print(f"{'model':9s} {'step':>4s} {'fp32 loss':>10s} {low + ' same weights':>18s} {'rel diff':>9s} "
          f"{'trained in ' + low:>16s}")
    worst = 0.0
    for model_name in ("unet_2d", "unet_3d"):
        cfg = run_config(device, root, args, model=model_name)
        full = Setup(cfg.with_overrides(precision="fp32"), device, entries, csv_path, precision="fp32")
        mixed_autocast = autocast_for(low, device)
        batches = full.first_batches(AGREEMENT_STEPS)
        rows = []
        for x, y in batches:
            with torch.no_grad(), mixed_autocast():
                mixed = float(full.trainer.loss_fn(full.trainer.model(x), y))
            rows.append((full.step(x, y).loss, mixed))
        del full
        trained = Setup(cfg.with_overrides(precision=low), device, entries, csv_path, precision=low)
        results = [trained.step(x, y) for x, y in batches]
        del trained
        for step, ((loss, mixed), result) in enumerate(zip(rows, results)):
            diff = abs(mixed - loss) / max(abs(loss), 1e-12)
            worst = max(worst, diff)
            note = " (scaler back-off)" if result.backoff else ""
            print(f"{model_name:9s} {step:4d} {loss:10.5f} {mixed:18.5f} {diff:9.2e} {result.loss:16.5f}{note}")
    agree = worst <= AGREEMENT_TOLERANCE
    print(f"{low} vs fp32 loss at the same weights, first {AGREEMENT_STEPS} steps: largest relative difference "
          f"{worst:.2e} ({'agree' if agree else 'DISAGREE'}: tolerance {AGREEMENT_TOLERANCE:g})")
    return agree


def layout_section(device, root, csv_path, entries, args) -> None:
    """img/s of the 2D and 2.5D models (one fixed batch) with channels_last and torch.compile on and off."""
    compile_options = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    print(f"{'model':9s} {'channels_last':>13s} {'compile':>7s} {'img/s no data':>14s}")
    for model_name in ("unet_2d", "unet_25d"):
        for channels_last in ("off", "on"):
            for compile_model in compile_options:
                cfg = run_config(device, root, args, model=model_name, channels_last=channels_last, workers=0)
                setup = Setup(cfg, device, entries, csv_path, compile_model=compile_model)
                x, y = setup.first_batches(1)[0]
                for _ in range(setup.warmup):
                    setup.step(x, y)
                rate = statistics.median(fixed_batch_rate(setup, x, y, args.steps) for _ in range(args.repeats))
                print(f"{model_name:9s} {channels_last:>13s} {'on' if compile_model else 'off':>7s} {rate:14.1f}")


def bench_gpu(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.device == "auto" and not torch.cuda.is_available():
        raise ValueError("bench.py gpu: no CUDA GPU is visible; run it on the GPU machine, or pass --device cpu "
                         "for a dry run of the same steps on the CPU")
    if min(args.steps, args.repeats) < 1:
        raise ValueError("--steps and --repeats must be >= 1")
    device = resolve_device("cuda" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training (runtime.select_device)
    start = time.perf_counter()
    root, csv_path, entries = data_setup(args.data_root)
    profile = C.choose_profile(device=device.type)
    print(f"gpu check: {device_line(device)}; profile {profile.name}; {args.classes} classes, loss {args.loss}; "
          f"{args.steps} steps x {args.repeats} repeats per measurement; data {root}")
    sections = (("training throughput at the profile's batch sizes", throughput_section),
                ("mixed precision vs fp32", agreement_section),
                ("channels_last and torch.compile", layout_section))
    agree = True
    for title, section in sections:
        print(f"\n== {title} ==")
        agree = section(device, root, csv_path, entries, args) is not False and agree
    elapsed = time.perf_counter() - start
    print(f"\ngpu check took {elapsed:.0f} s (target <= {GPU_CHECK_TARGET_S} s)")
    return 0 if agree else 1


def add_gpu_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("gpu", help="the prepared GPU check: img/s, memory, AMP agreement, "
                                                "channels_last/compile, loader vs GPU (a few minutes)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA, refused without it; cpu: a dry run of the same steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", choices=("both", "on", "off"), default="both",
                        help="torch.compile settings the layout section measures")
    add_common_options(parser)
    parser.set_defaults(handler=bench_gpu, steps=8)
