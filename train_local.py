"""Train one organelle segmentation model; single process or DDP under torchrun.

    python train_local.py --model unet_25d --loss per_class_weighted --mode quick
    torchrun --nproc_per_node=4 train_local.py --model unet_2d --mode model_comparison
    python train_local.py --resume runs/<run_name>

Read top to bottom: arguments -> config -> distributed setup -> data -> model/optimiser -> (resume) ->
epochs of training and full validation -> checkpoints and results.json. Only rank 0 prints and writes.
Bad input exits with status 2 and one line naming the culprit, before anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import config_shenron as C
from checkpoint import (RunFileError, check_writable, load_checkpoint, load_json, restore_rng_state,
                        rng_state, save_checkpoint, save_json)
from data import (DataError, EpochSampler, PatchSpec, TrainPatches, ValidationTiles, batch_sanity_line,
                  cache_margin, data_report, datasplit_for, make_loader, prepare_cache, read_datasplit,
                  resolve_data_root, to_model_inputs)
from evaluate import validate
from losses import LOSS_CONFIGS, build_loss, describe_loss
from metrics import format_table
from models import NORMS, count_parameters, unet_for_run

RESULTS_FILE = "results.json"


class TrainingFailed(RuntimeError):
    """The run cannot continue (too many non-finite steps, terminated); recorded as status 'failed'."""


# ----------------------------------------------------------------------------------------------------
# Arguments and config
# ----------------------------------------------------------------------------------------------------
class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad option (unknown model or class set, a non-number) as one `error:` line with exit code 2,
    like every other bad input, instead of argparse's usage dump."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineErrorParser(description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Options default to None so that `--resume` can tell which ones were given explicitly.
    p.add_argument("--model", choices=list(C.MODELS), help="model config (default unet_2d)")
    p.add_argument("--loss", help=f"named loss: {', '.join(LOSS_CONFIGS)} (default per_class_weighted)")
    p.add_argument("--loss-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a loss argument, e.g. alpha=0.6 (repeatable)")
    p.add_argument("--mode", help=f"schedule: {', '.join(C.MODES)} (default quick)")
    p.add_argument("--profile", help=f"hardware profile: auto, {', '.join(C.PROFILES)} (default auto)")
    p.add_argument("--classes", choices=list(C.CLASS_SETS), help="class set (default quick: 5 classes)")
    p.add_argument("--data-root", help=f"CellMap data root (default $CELLMAP_DATA_ROOT or {C.DEFAULT_DATA_ROOT})")
    p.add_argument("--datasplit", help="datasplit CSV (default <data-root>/datasplit.csv)")
    p.add_argument("--data-backend", choices=["toolkit", "cellmap-data"],
                   help="training sampler: the cached toolkit path (default) or cellmap-data directly")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations", type=int, help="optimiser steps per epoch on each rank")
    p.add_argument("--batch-size", type=int, help="samples per step per GPU/process")
    p.add_argument("--lr", type=float, help="peak learning rate of OneCycle (default 1e-3)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--workers", type=int, help="loader worker processes per rank")
    p.add_argument("--precision", choices=list(C.PRECISIONS), help="default: the profile's")
    p.add_argument("--base-channels", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--norm", choices=list(NORMS), help="normalisation layer of the UNet (default batch)")
    p.add_argument("--patch-yx", type=int, help="y/x patch size (default: the profile's)")
    p.add_argument("--channels-last", choices=["on", "off"], help="2D channels_last memory format")
    p.add_argument("--max-nonfinite", type=int, help="stop after this many non-finite steps in a row")
    p.add_argument("--seed", type=int)
    p.add_argument("--out-dir", help=f"parent folder of run folders (default {C.DEFAULT_OUT_DIR})")
    p.add_argument("--run-name", help="run folder name (default <model>-<loss>-s<seed>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last completed epoch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    # Fault injection for the reliability tests (hidden from --help).
    p.add_argument("--fault-nonfinite-steps", default="", help=argparse.SUPPRESS)
    p.add_argument("--fault-raise", default="", help=argparse.SUPPRESS)  # "RANK:GLOBAL_STEP"
    return p.parse_args(argv)


DEFAULTS = dict(model="unet_2d", loss="per_class_weighted", mode="quick", profile="auto", classes="quick",
                data_backend="toolkit", lr=1e-3, weight_decay=1e-4, grad_clip=1.0, seed=0, norm="batch",
                max_nonfinite=25)


def parse_loss_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--loss-option {item!r} must look like KEY=VALUE")
        try:
            out[key] = float(value) if value.lower() not in ("true", "false", "none") else \
                {"true": True, "false": False, "none": None}[value.lower()]
        except ValueError:
            out[key] = value
    return out


def build_config(args: argparse.Namespace, device: str, data_root: str) -> C.RunConfig:
    """Resolve the command line against defaults, the hardware profile, the model and the mode."""
    get = lambda name: getattr(args, name) if getattr(args, name) is not None else DEFAULTS.get(name)
    profile = C.choose_profile(get("profile"), device)
    model = C.lookup(C.MODELS, get("model"), "model")
    mode = C.lookup(C.MODES, get("mode"), "mode")
    if get("loss") not in LOSS_CONFIGS:
        raise ValueError(f"unknown loss {get('loss')!r}; valid: {', '.join(LOSS_CONFIGS)}")
    epochs, iterations = mode.schedule(profile)
    z, y, x = model.patch_shape(profile)
    if args.patch_yx is not None:
        y = x = args.patch_yx
    cfg = C.RunConfig(
        model=model.name, loss=get("loss"), mode=mode.name, profile=profile.name,
        classes=C.CLASS_SETS[get("classes")], data_root=data_root, data_backend=get("data_backend"),
        epochs=args.epochs if args.epochs is not None else epochs,
        iterations=args.iterations if args.iterations is not None else iterations,
        batch_size=args.batch_size if args.batch_size is not None else profile.batch_size[model.name],
        lr=get("lr"), weight_decay=get("weight_decay"), grad_clip=get("grad_clip"), seed=get("seed"),
        precision=args.precision or (profile.precision if device == "cuda" else "fp32"),
        workers=args.workers if args.workers is not None else profile.workers_per_gpu,
        patch_shape=(z, y, x),
        base_channels=args.base_channels if args.base_channels is not None else profile.base_channels,
        depth=args.depth if args.depth is not None else profile.depth, norm=get("norm"),
        scale_nm=C.TRAIN_SCALE_NM, foreground_fraction=0.5,
        max_consecutive_nonfinite=get("max_nonfinite"),
        channels_last=(args.channels_last or ("on" if device == "cuda" else "off")) == "on")
    checks = [("--epochs", cfg.epochs >= 1, "at least 1"), ("--iterations", cfg.iterations >= 1, "at least 1"),
              ("--batch-size", cfg.batch_size >= 1, "at least 1"), ("--lr", 0 < cfg.lr <= 1, "in (0, 1]"),
              ("--weight-decay", cfg.weight_decay >= 0, ">= 0"), ("--grad-clip", cfg.grad_clip > 0, "> 0"),
              ("--workers", cfg.workers >= 0, ">= 0"), ("--max-nonfinite", cfg.max_consecutive_nonfinite >= 1, ">= 1"),
              ("--base-channels", cfg.base_channels >= 1, ">= 1"), ("--depth", cfg.depth >= 1, ">= 1")]
    for flag, ok, rule in checks:
        if not ok:
            value = {"--epochs": cfg.epochs, "--iterations": cfg.iterations, "--batch-size": cfg.batch_size,
                     "--lr": cfg.lr, "--weight-decay": cfg.weight_decay, "--grad-clip": cfg.grad_clip,
                     "--workers": cfg.workers, "--max-nonfinite": cfg.max_consecutive_nonfinite,
                     "--base-channels": cfg.base_channels, "--depth": cfg.depth}[flag]
            raise ValueError(f"{flag} {value} is out of range: must be {rule}")
    if cfg.epochs * cfg.iterations < 3:  # OneCycle needs a warm-up step and an annealing step
        raise ValueError(f"--epochs {cfg.epochs} x --iterations {cfg.iterations} gives {cfg.epochs * cfg.iterations} "
                         f"optimiser steps; the OneCycle schedule needs at least 3")
    multiple = 2 ** (cfg.depth - 1)
    if y % multiple:
        raise ValueError(f"--patch-yx {y} must be a multiple of {multiple} for a UNet of depth {cfg.depth}")
    if model.dims == 3 and z % multiple:
        raise ValueError(f"3D patch depth {z} must be a multiple of {multiple} for depth {cfg.depth}")
    return cfg


def explicit_overrides(args: argparse.Namespace, run_dir: Path, cfg: C.RunConfig, loss_options: dict,
                       datasplit: Path) -> list[str]:
    """Differences between the stored run (folder, config, loss options, datasplit) and the options given
    explicitly on a resume command."""
    flag_to_field = {"model": "model", "loss": "loss", "mode": "mode", "epochs": "epochs",
                     "iterations": "iterations", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
                     "weight_decay": "weight_decay", "grad_clip": "grad_clip", "precision": "precision",
                     "base_channels": "base_channels", "depth": "depth", "norm": "norm",
                     "data_backend": "data_backend", "profile": "profile"}
    diffs = []
    for flag, fld in flag_to_field.items():
        given = getattr(args, flag)
        if given is not None and given != getattr(cfg, fld):
            diffs.append(f"--{flag.replace('_', '-')} {given!r} but the run has {fld}={getattr(cfg, fld)!r}")
    if args.classes is not None and C.CLASS_SETS[args.classes] != cfg.classes:
        diffs.append(f"--classes {args.classes!r} but the run has classes={list(cfg.classes)}")
    if args.data_root is not None and str(Path(args.data_root).resolve()) != cfg.data_root:
        diffs.append(f"--data-root {args.data_root!r} but the run has data_root={cfg.data_root!r}")
    if args.patch_yx is not None and args.patch_yx != cfg.patch_shape[1]:
        diffs.append(f"--patch-yx {args.patch_yx} but the run has patch_shape={list(cfg.patch_shape)}")
    if args.max_nonfinite is not None and args.max_nonfinite != cfg.max_consecutive_nonfinite:
        diffs.append(f"--max-nonfinite {args.max_nonfinite} but the run has "
                     f"max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}")
    if args.channels_last is not None and (args.channels_last == "on") != cfg.channels_last:
        diffs.append(f"--channels-last {args.channels_last} but the run has channels_last={cfg.channels_last}")
    if args.loss_option and parse_loss_options(args.loss_option) != loss_options:
        diffs.append(f"--loss-option {' '.join(args.loss_option)} but the run has loss options {loss_options}")
    if args.datasplit is not None and Path(args.datasplit).resolve() != datasplit:
        diffs.append(f"--datasplit {args.datasplit!r} but the run has datasplit {str(datasplit)!r}")
    run_dir = run_dir.resolve()
    if args.out_dir is not None and Path(args.out_dir).resolve() != run_dir.parent:
        diffs.append(f"--out-dir {args.out_dir!r} but the run folder is in {str(run_dir.parent)!r} "
                     f"(a resumed run stays in its folder)")
    if args.run_name is not None and args.run_name != run_dir.name:
        diffs.append(f"--run-name {args.run_name!r} but the run is {run_dir.name!r}")
    return diffs


def read_run(run_dir: Path) -> tuple[dict, C.RunConfig, dict, Path]:
    """(results, config, loss options, datasplit CSV) of an existing run folder, for --resume."""
    if not (run_dir / RESULTS_FILE).is_file():
        raise RunFileError(f"--resume {run_dir}: no {RESULTS_FILE} there (not a run folder)")
    stored = load_json(run_dir / RESULTS_FILE)
    try:
        return (stored, C.RunConfig.from_dict(stored["config"]),
                stored.get("loss_options", {}),  # absent from runs recorded before the options were stored
                Path(stored["datasplit"]))
    except (KeyError, TypeError, ValueError) as err:
        raise RunFileError(f"{run_dir / RESULTS_FILE} is not a results file of this toolkit ({err}); "
                           f"start a new run instead of --resume") from None


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, flush=True)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


def new_run_dir(out_dir: Path, cfg: C.RunConfig, run_name: str | None) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = run_name or f"{cfg.model}-{cfg.loss}-s{cfg.seed}-{stamp}"
    candidate, n = out_dir / base, 1
    while candidate.exists():  # never overwrite a run folder
        n += 1
        candidate = out_dir / f"{base}-{n}"
    return candidate


def wait_for_cache(prepare, rank: int):
    """Rank 0 prepares the cache; the others poll for it (torchrun stops them all if rank 0 fails)."""
    if rank == 0:
        return prepare(progress=True)
    while True:
        try:
            return prepare(progress=False, build=False)
        except FileNotFoundError:
            time.sleep(2)


def oom_advice(batch_size: int, peak_bytes: int, total_bytes: int) -> str:
    """The failure line of a CUDA out-of-memory error, with a batch size likely to fit: scaled from the
    peak when the peak was recorded near the limit, else halved (the failed allocation is not in the peak)."""
    used = f"({peak_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB)"
    if batch_size == 1:
        return f"GPU out of memory at --batch-size 1 {used}; lower --patch-yx or --base-channels"
    if peak_bytes > total_bytes / 2:
        fit = int(batch_size * 0.85 * total_bytes / peak_bytes)
    else:
        fit = batch_size // 2
    fit = min(max(fit, 1), batch_size - 1)
    return f"GPU out of memory at --batch-size {batch_size} {used}; try --batch-size {fit}"


def training_step(model, raw_model, loss_fn, optimizer, scaler, autocast, x: torch.Tensor, y: torch.Tensor,
                  grad_clip: float, sync: bool = False, poison: bool = False):
    """One optimiser step: autocast forward, masked loss, scaled backward, gradient clipping, update.

    A step whose loss or gradient norm is not finite is skipped and leaves no trace: no parameter update,
    and the BatchNorm statistics its forward pass changed are restored (an overflowing batch would otherwise
    poison them). With `sync` (DDP) every rank skips when any rank's loss is not finite, or the gradient
    all-reduce would desynchronise. `poison` makes the loss NaN (fault injection for the tests).
    `model` may be the DDP wrapper; `raw_model` is the module itself. Returns (loss, per-class loss, stepped).
    """
    buffers_before = [b.detach().clone() for b in raw_model.buffers()]  # tiny: norm statistics only
    with autocast():
        logits = model(x)
    loss, per_class = loss_fn(logits, y, return_per_class=True)
    if poison:
        loss = loss * float("nan")
    finite = torch.isfinite(loss.detach()).float()
    if sync:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    stepped = bool(finite.item())
    if stepped:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        stepped = bool(torch.isfinite(grad_norm))  # the same on every rank: gradients are all-reduced
        if stepped:
            scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if not stepped:
        with torch.no_grad():
            for buffer, before in zip(raw_model.buffers(), buffers_before):
                buffer.copy_(before)
    return loss, per_class, stepped



# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    ddp = world_size > 1

    # ---- config, resume state and data root (bad input: one line, exit 2, nothing written) ----
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is visible (use --device cpu or auto)")
        device_type = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
        resume_state, run_dir = None, None
        if args.resume:
            run_dir = Path(args.resume)
            stored, cfg, loss_overrides, csv_path = read_run(run_dir)
            diffs = explicit_overrides(args, run_dir, cfg, loss_overrides, csv_path)
            if diffs:
                raise ValueError(f"--resume {run_dir}: the run's config differs from this command: "
                                 + "; ".join(diffs))
            if args.workers is not None:  # the one field a resume may change: samples do not depend on it
                cfg = cfg.with_overrides(workers=args.workers)
            if (run_dir / "last.pt").is_file():
                resume_state = load_checkpoint(run_dir / "last.pt")
                if resume_state["epoch"] >= cfg.epochs:
                    if stored["status"] != "completed":  # stopped between its last checkpoint and results.json
                        stored.update(status="completed", failure=None, **{k: resume_state[k] for k in (
                            "history", "best", "best_epoch", "elapsed_seconds")})
                        save_json(run_dir / RESULTS_FILE, stored)
                        log(f"run {run_dir.name} had finished all {cfg.epochs} epochs; {RESULTS_FILE} completed "
                            f"from last.pt")
                    else:
                        log(f"run {run_dir.name} already completed ({cfg.epochs} epochs); nothing to do")
                    return 0
            notice = None
        else:
            data_root, notice = resolve_data_root(args.data_root)
            cfg = build_config(args, device_type, str(data_root))
            loss_overrides = parse_loss_options(args.loss_option)
            csv_path = (Path(args.datasplit) if args.datasplit else datasplit_for(data_root)).resolve()
        # Class frequencies only set class weights: placeholders let a bad loss option fail now rather than
        # after the (on real data, long) cache preparation.
        try:
            build_loss(cfg.loss, cfg.classes, class_frequencies=dict.fromkeys(cfg.classes, 0.5), **loss_overrides)
        except ValueError as err:
            raise ValueError(f"loss {cfg.loss!r} with options {loss_overrides}: {err}") from None
        entries = read_datasplit(csv_path)
        out_dir = Path(args.out_dir or C.DEFAULT_OUT_DIR)
        if run_dir is None and rank == 0:
            check_writable(out_dir)
    except (ValueError, DataError, RunFileError) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if notice:
        log(notice)

    # ---- distributed setup ----
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    model_cfg = C.MODELS[cfg.model]
    spec = PatchSpec(cfg.patch_shape, model_cfg.dims)
    profile = C.PROFILES[cfg.profile]
    margin = cache_margin(profile, cfg.patch_shape)
    try:
        cache = wait_for_cache(lambda **kw: prepare_cache(entries, cfg.classes, cfg.scale_nm, margin, **kw), rank)
        report_lines = data_report(entries, cache, cfg.patch_shape[1:])
        for line in report_lines:
            log(line)
        for split in ("train", "validate"):
            if not cache.split(split):
                raise DataError(f"{csv_path}: no usable {split} crop left after preparation "
                                f"({sum(e.split == split for e in entries)} listed; see the data report above)")
        frequencies = cache.class_frequencies("train")
        loss_fn = build_loss(cfg.loss, cfg.classes, class_frequencies=frequencies, **loss_overrides)
        loss_config = describe_loss(cfg.loss, cfg.classes, class_frequencies=frequencies, **loss_overrides)
    except (DataError, ValueError) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=dt.timedelta(minutes=int(os.environ.get("CELLMAP_DDP_TIMEOUT_MIN", 30))))
    new_run = run_dir is None
    if new_run:
        name = [new_run_dir(out_dir, cfg, args.run_name).name if rank == 0 else None]
        if ddp:
            dist.broadcast_object_list(name, src=0)
        run_dir = out_dir / name[0]

    # ---- data loaders ----
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.data_backend == "toolkit":
        train_set = TrainPatches(cache, spec, seed=cfg.seed, rank=rank, foreground_fraction=cfg.foreground_fraction)
        sampler = EpochSampler(cfg.iterations * cfg.batch_size)
        train_loader = make_loader(train_set, cfg.batch_size, cfg.workers, sampler, pin_memory=device_type == "cuda")
    else:
        from cellmap_backend import CellMapTrainLoader

        train_loader = CellMapTrainLoader(csv_path, cfg.classes, spec, cfg.scale_nm, cfg.batch_size, cfg.workers,
                                          seed=cfg.seed, rank=rank, samples_per_epoch=cfg.iterations * cfg.batch_size)
        sampler = train_loader
    val_set = ValidationTiles(cache, spec, rank=rank, world_size=world_size)
    val_loader = make_loader(val_set, cfg.batch_size, cfg.workers, pin_memory=device_type == "cuda")

    # ---- model, loss, optimiser ----
    model = unet_for_run(cfg).to(device)
    if cfg.channels_last and model_cfg.dims == 2:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # OneCycle is stepped once per optimiser step (batch), over the whole run; warm-up is 10% of the
    # steps but at least 2 (OneCycleLR divides by zero when the warm-up rounds to no step).
    total_steps = cfg.epochs * cfg.iterations
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                    pct_start=min(0.5, max(0.1, 2.5 / total_steps)))
    use_scaler = cfg.precision == "fp16" and device_type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    autocast = autocast_for(cfg.precision if device_type == "cuda" else "fp32", device)

    history, best, best_epoch, start_epoch, elapsed_before = [], None, None, 0, 0.0
    if resume_state is not None:
        raw_model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        restore_rng_state(resume_state["rng"])
        history, best, best_epoch = resume_state["history"], resume_state["best"], resume_state["best_epoch"]
        start_epoch, elapsed_before = resume_state["epoch"], resume_state["elapsed_seconds"]
        log(f"resuming {run_dir.name} at epoch {start_epoch + 1}/{cfg.epochs}")

    results = {
        "run_name": run_dir.name, "status": "running", "model": cfg.model, "loss": cfg.loss,
        "loss_config": loss_config, "classes": list(cfg.classes), "seed": cfg.seed, "world_size": world_size,
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu",
        "config": cfg.to_dict(), "loss_options": loss_overrides, "parameters": count_parameters(raw_model),
        "datasplit": str(csv_path),
        "data_report": report_lines, "best_epoch": best_epoch, "best": best, "history": history,
        "elapsed_seconds": elapsed_before, "failure": None,
    }
    writer = None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=not new_run)
            save_json(run_dir / RESULTS_FILE, results)
        except (OSError, RunFileError) as err:  # e.g. a full disk: leave no half-made run folder behind
            if new_run:
                shutil.rmtree(run_dir, ignore_errors=True)
            print(f"error: {err}", file=sys.stderr)
            return 2
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
        log(f"run folder {run_dir} | {cfg.model} ({results['parameters']:,} parameters) | loss {cfg.loss} | "
            f"{world_size} x {results['device']} | {cfg.precision} | batch {cfg.batch_size} x {world_size} | "
            f"{cfg.epochs} epochs x {cfg.iterations} steps")

    fault_steps = {int(s) for s in args.fault_nonfinite_steps.split(",") if s}
    fault_rank, _, fault_step = args.fault_raise.partition(":")

    failing = False

    def on_sigterm(signum, frame):  # torchrun stops the other ranks with SIGTERM when one fails
        if not failing:  # once failing, the signal must not cut the recording of the failure short
            raise TrainingFailed("terminated by a signal (another rank failed or the job was stopped)")

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.time()
    try:
        consecutive_bad = 0
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            model.train()
            t0 = time.time()
            loss_sum = torch.zeros((), device=device)
            class_loss_sum = torch.zeros(len(cfg.classes), device=device)
            class_steps = torch.zeros(len(cfg.classes), device=device)
            good_steps, bad_steps = 0, 0
            batches = iter(train_loader)
            from tqdm import tqdm

            bar = tqdm(range(cfg.iterations), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0,
                       unit="step", file=sys.stdout, leave=False)
            for step in bar:
                global_step = epoch * cfg.iterations + step
                x, y = to_model_inputs(next(batches), device, cfg.channels_last)
                if epoch == start_epoch and step == 0:
                    log(batch_sanity_line(x, y, cfg.classes))
                if fault_step and int(fault_rank) == rank and int(fault_step) == global_step:
                    raise RuntimeError(f"injected failure on rank {rank} at step {global_step}")
                loss, per_class, ok = training_step(model, raw_model, loss_fn, optimizer, scaler, autocast, x, y,
                                                    cfg.grad_clip, sync=ddp, poison=global_step in fault_steps)
                lr = scheduler.get_last_lr()[0]  # the rate this step used (logged below)
                scheduler.step()
                if ok:
                    good_steps += 1
                    consecutive_bad = 0
                    loss_sum += loss.detach().float()
                    # A class's mean loss counts only the steps where it had annotated voxels (its value is
                    # 0 otherwise): dividing by every step would dilute rarely annotated classes.
                    counted = (~torch.isnan(y)).transpose(0, 1).flatten(1).any(1) & torch.isfinite(per_class)
                    class_loss_sum += torch.where(counted, per_class.float(), 0.0)
                    class_steps += counted
                else:
                    bad_steps += 1
                    consecutive_bad += 1
                    if consecutive_bad >= cfg.max_consecutive_nonfinite:
                        raise TrainingFailed(f"{consecutive_bad} consecutive non-finite loss/gradient steps "
                                             f"(epoch {epoch + 1}, step {step + 1}); lower --lr or check the data")
                if writer is not None:
                    writer.add_scalar("train/lr", lr, global_step)
                    if ok and step % 10 == 0:
                        writer.add_scalar("train/loss", loss.item(), global_step)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            train_seconds = time.time() - t0
            stats = torch.cat([torch.stack([loss_sum, torch.tensor(float(good_steps), device=device)]),
                               class_loss_sum, class_steps])
            if ddp:
                dist.all_reduce(stats)
            (loss_total, n_good), (class_totals, class_counts) = stats[:2].tolist(), stats[2:].view(2, -1).tolist()
            report = validate(model, val_loader, cfg.classes, device, autocast, cfg.channels_last, progress=rank == 0)
            entry = {  # losses are None for an epoch (or class) without a counted step
                "epoch": epoch + 1, "train_loss": loss_total / n_good if n_good else None,
                "train_loss_per_class": {cls: total / n if n else None
                                         for cls, total, n in zip(cfg.classes, class_totals, class_counts)},
                "mean_dice": report["mean_dice"], "mean_iou": report["mean_iou"],
                "per_class": report["per_class"], "threshold_sweep": report["threshold_sweep"],
                "absent_classes": report["absent_classes"], "lr": lr,
                "samples_per_s": cfg.iterations * cfg.batch_size * world_size / train_seconds,
                "seconds": time.time() - t0, "nonfinite_steps": bad_steps,
            }
            history.append(entry)
            improved = report["mean_dice"] is not None and (best is None or report["mean_dice"] > best["mean_dice"])
            if improved:
                best_epoch = epoch + 1
                best = {"mean_dice": report["mean_dice"], "mean_iou": report["mean_iou"],
                        "mean_definition": report["mean_definition"], "absent_classes": report["absent_classes"],
                        "per_class": report["per_class"], "threshold_sweep": report["threshold_sweep"]}
            if rank == 0:
                elapsed = elapsed_before + time.time() - started
                state = {"config": cfg.to_dict(), "epoch": epoch + 1, "model": raw_model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng_state(), "history": history, "best": best,
                         "best_epoch": best_epoch, "elapsed_seconds": elapsed, "run_name": run_dir.name,
                         "loss_config": loss_config}
                if improved:
                    save_checkpoint(run_dir / "best.pt", state)
                save_checkpoint(run_dir / "last.pt", state)
                results.update(history=history, best=best, best_epoch=best_epoch, elapsed_seconds=elapsed,
                               status="completed" if epoch + 1 == cfg.epochs else "running")
                save_json(run_dir / RESULTS_FILE, results)
                writer.add_scalar("val/mean_dice", report["mean_dice"] or 0.0, epoch + 1)
                if entry["train_loss"] is not None:
                    writer.add_scalar("train/epoch_loss", entry["train_loss"], epoch + 1)
                for cls, m in report["per_class"].items():
                    if m["dice"] is not None:
                        writer.add_scalar(f"val_dice/{cls}", m["dice"], epoch + 1)
                writer.flush()
                dice = "n/a" if report["mean_dice"] is None else f"{report['mean_dice']:.4f}"
                train_loss = "n/a" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
                log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss} | val mean Dice {dice} | "
                    f"{entry['samples_per_s']:.1f} samples/s | {entry['seconds']:.0f} s"
                    + (f" | {bad_steps} non-finite steps skipped" if bad_steps else "")
                    + (" | best" if improved else ""))
    except (Exception, KeyboardInterrupt) as err:
        failing = True
        # Loader workers die with the job (Ctrl-C and SIGTERM reach the whole process group); the
        # DataLoader's SIGCHLD handler would then raise again while the failure is being recorded.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        reason = f"{type(err).__name__}: {err}"
        if device_type == "cuda" and isinstance(err, torch.cuda.OutOfMemoryError):
            reason = oom_advice(cfg.batch_size, torch.cuda.max_memory_allocated(device),
                                torch.cuda.get_device_properties(device).total_memory)
        if rank != 0:
            (run_dir / f"failure_rank{rank}.txt").write_text(reason + "\n")
            raise
        time.sleep(0.5)  # let a failing peer finish writing its reason
        peers = sorted(run_dir.glob("failure_rank*.txt"))
        if peers:
            reason += " | " + " | ".join(f"{p.stem}: {p.read_text().strip()}" for p in peers)
        results.update(status="failed", failure=reason,
                       elapsed_seconds=elapsed_before + time.time() - started)
        try:
            save_json(run_dir / RESULTS_FILE, results)
        except RunFileError as write_err:  # e.g. the disk that stopped the run is still full
            reason += f" (and the failure could not be recorded: {write_err})"
        print(f"error: run {run_dir.name} failed: {reason} (last good checkpoint: {run_dir / 'last.pt'})",
              file=sys.stderr)
        expected = (TrainingFailed, RunFileError, KeyboardInterrupt, torch.cuda.OutOfMemoryError)
        if not peers and not isinstance(err, expected):  # a bug here: show where (a peer's failure is reported)
            raise
        return 1
    finally:
        if writer is not None:
            writer.close()

    if rank == 0 and best is not None:
        log(f"\nbest epoch {best_epoch} of {cfg.epochs} (validation, threshold 0.5):")
        log(format_table(best, cfg.classes))
        log(f"results: {run_dir / RESULTS_FILE}")
    if ddp:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
