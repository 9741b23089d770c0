"""Train one organelle segmentation model; single process or DDP under torchrun.

    python train_local.py --model unet_25d --loss per_class_weighted --mode quick
    torchrun --nproc_per_node=4 train_local.py --model unet_2d --mode model_comparison
    python train_local.py --resume runs/<run_name>

`main` reads top to bottom: plan the run (options, or the stored run on --resume) -> prepare the data (crop
cache, report, loss) -> process group -> loaders -> model and optimiser -> run folder -> epochs of training
and validation, each followed by checkpoints and results.json -> the final table. Only rank 0 prints and
writes. Bad input exits with status 2 and one line naming the culprit, before anything is written; a run
that fails is recorded in results.json and exits with status 1. The options are config_shenron.OPTIONS.
"""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import config_shenron as C
import runtime
from cache import CropCache, cache_margin, data_report, prepare_cache
from datasplit import CropEntry, datasplit_for, read_datasplit, resolve_data_root
from engine import Trainer, TrainingFailed, train_epoch, validate
from errors import DataError, RunFileError
from loaders import train_loader, validation_loader
from losses import build_loss, describe_loss
from metrics import format_table
from models import count_parameters, unet_for_run
from runfiles import (RESULTS_FILE, RunRecorder, StoredRun, check_writable, complete_from_checkpoint,
                      load_checkpoint, new_run_dir, read_run, restore_rng_state, rng_state)
from runtime import DistributedEnv, log
from sampling import PatchSpec


def main(argv=None) -> int:
    args = C.build_parser(__doc__.split("\n")[0]).parse_args(argv)
    env = DistributedEnv.from_environment()
    try:
        plan = plan_run(args, env)
        if plan.finished:
            return 0
        device = runtime.select_device(plan.device_type, env)
        data = prepare_data(plan, env)
    except (ValueError, DataError, RunFileError) as err:
        return runtime.report_error(err, env)
    runtime.init_process_group(env, device)
    run_dir = plan.run_dir or plan.out_dir / runtime.broadcast_from_main(
        new_run_dir(plan.out_dir, plan.cfg, args.run_name).name if env.is_main else None, env)
    train_batches, sampler, val_loader = build_loaders(plan.cfg, data, plan.datasplit, env, device)
    trainer = build_trainer(plan.cfg, data.loss_fn, device, env)
    progress = restore_progress(trainer, plan.resume_state, plan.cfg, run_dir)
    recorder = RunRecorder(run_dir, new_results(plan, data, trainer, env, progress, run_dir), env.is_main)
    try:
        recorder.open(new_run=plan.run_dir is None)
    except RunFileError as err:
        return runtime.report_error(err, env)
    log_run_header(recorder, plan.cfg, env)
    code = train(plan.cfg, trainer, train_batches, sampler, val_loader, recorder, progress, env)
    if code == 0 and env.is_main and progress.best is not None:
        log(f"\nbest epoch {progress.best_epoch} of {plan.cfg.epochs} (validation, threshold 0.5):")
        log(format_table(progress.best, plan.cfg.classes))
        log(f"results: {run_dir / RESULTS_FILE}")
    runtime.destroy_process_group(env)
    return code


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    """What the command line (or the stored run) asks for, checked before anything is written."""

    cfg: C.RunConfig | None = None
    loss_options: dict | None = None
    datasplit: Path | None = None
    entries: list[CropEntry] | None = None
    out_dir: Path | None = None
    run_dir: Path | None = None      # None for a new run (named once the process group exists)
    resume_state: dict | None = None
    device_type: str = "cpu"
    finished: bool = False           # a resumed run that had already completed: nothing to do


def plan_run(args, env: DistributedEnv) -> RunPlan:
    """The run's config, loss options, datasplit and resume state; ValueError/DataError/RunFileError with
    one line for bad input."""
    device_type = runtime.device_type_for(args.device)
    if args.resume:
        plan = plan_resume(Path(args.resume), args, device_type)
        if plan.finished:
            return plan
    else:
        data_root, notice = resolve_data_root(args.data_root)
        cfg = C.build_config(args, device_type, str(data_root))
        csv_path = (Path(args.datasplit) if args.datasplit else datasplit_for(data_root)).resolve()
        plan = RunPlan(cfg, C.parse_loss_options(args.loss_option), csv_path)
        if notice:
            log(notice)
    plan.device_type = device_type
    # Class frequencies only set class weights: placeholders let a bad loss option fail now rather than
    # after the (on real data, long) cache preparation.
    try:
        build_loss(plan.cfg.loss, plan.cfg.classes, class_frequencies=dict.fromkeys(plan.cfg.classes, 0.5),
                   **plan.loss_options)
    except ValueError as err:
        raise ValueError(f"loss {plan.cfg.loss!r} with options {plan.loss_options}: {err}") from None
    plan.entries = read_datasplit(plan.datasplit)
    plan.out_dir = Path(args.out_dir or C.DEFAULT_OUT_DIR)
    if plan.run_dir is None and env.is_main:
        check_writable(plan.out_dir)
    return plan


def plan_resume(run_dir: Path, args, device_type: str) -> RunPlan:
    """The stored run, refused when the command gives options that differ from it; `finished` when its
    last.pt already holds the final epoch (results.json is completed from it if a kill came in between)."""
    run: StoredRun = read_run(run_dir)
    conflicts = C.resume_conflicts(args, run, device_type)
    if conflicts:
        raise ValueError(f"--resume {run_dir}: the run's config differs from this command: " + "; ".join(conflicts))
    cfg = C.resume_overrides(args, run.config, device_type)
    plan = RunPlan(cfg, run.loss_options, run.datasplit, run_dir=run_dir)
    if (run_dir / "last.pt").is_file():
        plan.resume_state = load_checkpoint(run_dir / "last.pt")
        if plan.resume_state["epoch"] >= cfg.epochs:
            if complete_from_checkpoint(run, plan.resume_state):
                log(f"run {run_dir.name} had finished all {cfg.epochs} epochs; {RESULTS_FILE} completed from last.pt")
            else:
                log(f"run {run_dir.name} already completed ({cfg.epochs} epochs); nothing to do")
            plan.finished = True
    return plan


@dataclass
class RunData:
    cache: CropCache
    spec: PatchSpec
    report: list[str]
    loss_fn: torch.nn.Module
    loss_config: dict


def prepare_data(plan: RunPlan, env: DistributedEnv) -> RunData:
    """The crop cache (rank 0 builds it, the others wait), the data report, and the loss with class
    frequencies from the training crops. DataError when a split has no usable crop."""
    cfg = plan.cfg
    spec = PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)
    margin = cache_margin(C.PROFILES[cfg.profile], cfg.patch_shape)
    cache = runtime.main_rank_first(
        lambda **kw: prepare_cache(plan.entries, cfg.classes, cfg.scale_nm, margin, **kw), env)
    report = data_report(plan.entries, cache, cfg.patch_shape[1:])
    for line in report:
        log(line)
    for split in ("train", "validate"):
        if not cache.split(split):
            raise DataError(f"{plan.datasplit}: no usable {split} crop left after preparation "
                            f"({sum(e.split == split for e in plan.entries)} listed; see the data report above)")
    frequencies = cache.class_frequencies("train")
    loss_fn = build_loss(cfg.loss, cfg.classes, class_frequencies=frequencies, **plan.loss_options)
    loss_config = describe_loss(cfg.loss, cfg.classes, class_frequencies=frequencies, **plan.loss_options)
    return RunData(cache, spec, report, loss_fn, loss_config)


def build_loaders(cfg: C.RunConfig, data: RunData, datasplit: Path, env: DistributedEnv, device: torch.device):
    """(training loader, object with set_epoch, validation loader). Seeds torch and numpy first: the model
    built next draws its initial weights from them."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    pin = device.type == "cuda"
    loader, sampler = train_loader(cfg, data.cache, data.spec, datasplit, env.rank, pin_memory=pin)
    return loader, sampler, validation_loader(cfg, data.cache, data.spec, env.rank, env.world_size, pin_memory=pin)


def build_trainer(cfg: C.RunConfig, loss_fn: torch.nn.Module, device: torch.device, env: DistributedEnv) -> Trainer:
    """The UNet (DDP-wrapped under torchrun), AdamW, the OneCycle schedule, the GradScaler and autocast."""
    model = unet_for_run(cfg).to(device)
    if cfg.channels_last and C.MODELS[cfg.model].dims == 2:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if env.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # OneCycle is stepped once per optimiser step (batch), over the whole run; warm-up is 10% of the
    # steps but at least 2 (OneCycleLR divides by zero when the warm-up rounds to no step).
    total_steps = cfg.epochs * cfg.iterations
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                    pct_start=min(0.5, max(0.1, 2.5 / total_steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")
    autocast = runtime.autocast_for(cfg.precision if device.type == "cuda" else "fp32", device)
    return Trainer(model, raw_model, loss_fn, optimizer, scheduler, scaler, autocast, device, env.ddp,
                   cfg.channels_last, cfg.grad_clip)


@dataclass
class Progress:
    """Where the run stands: epochs done, history, best metrics, time spent before this process."""

    start_epoch: int = 0
    history: list = None
    best: dict | None = None
    best_epoch: int | None = None
    elapsed_before: float = 0.0


def restore_progress(trainer: Trainer, state: dict | None, cfg: C.RunConfig, run_dir: Path) -> Progress:
    """A new run's progress, or the resumed run's with the trainer and RNG states restored from last.pt."""
    if state is None:
        return Progress(history=[])
    trainer.load_state_dict(state)
    restore_rng_state(state["rng"])
    log(f"resuming {run_dir.name} at epoch {state['epoch'] + 1}/{cfg.epochs}")
    return Progress(state["epoch"], state["history"], state["best"], state["best_epoch"], state["elapsed_seconds"])


def new_results(plan: RunPlan, data: RunData, trainer: Trainer, env: DistributedEnv, progress: Progress,
                run_dir: Path) -> dict:
    """The results.json of this run as it starts (see the README's results format)."""
    cfg, device = plan.cfg, trainer.device
    return {
        "run_name": run_dir.name, "status": "running", "model": cfg.model,
        "loss": cfg.loss, "loss_config": data.loss_config, "classes": list(cfg.classes), "seed": cfg.seed,
        "world_size": env.world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": cfg.to_dict(), "loss_options": plan.loss_options, "parameters": count_parameters(trainer.raw_model),
        "datasplit": str(plan.datasplit), "data_report": data.report, "best_epoch": progress.best_epoch,
        "best": progress.best, "history": progress.history, "elapsed_seconds": progress.elapsed_before,
        "failure": None,
    }


def log_run_header(recorder: RunRecorder, cfg: C.RunConfig, env: DistributedEnv) -> None:
    results = recorder.results
    log(f"run folder {recorder.run_dir} | {cfg.model} ({results['parameters']:,} parameters) | loss {cfg.loss} | "
        f"{env.world_size} x {results['device']} | {cfg.precision} | batch {cfg.batch_size} x {env.world_size} | "
        f"{cfg.epochs} epochs x {cfg.iterations} steps")


# ----------------------------------------------------------------------------------------------------
# The epoch loop and failure recording
# ----------------------------------------------------------------------------------------------------
def train(cfg: C.RunConfig, trainer: Trainer, train_batches, sampler, val_loader, recorder: RunRecorder,
          progress: Progress, env: DistributedEnv) -> int:
    """Epochs of training and validation from `progress.start_epoch`; 0 when done, 1 after a recorded failure."""
    failing = False

    def on_sigterm(signum, frame):  # torchrun stops the other ranks with SIGTERM when one fails
        if not failing:  # once failing, the signal must not cut the recording of the failure short
            raise TrainingFailed("terminated by a signal (another rank failed or the job was stopped)")

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.time()
    try:
        consecutive_bad = 0
        for epoch in range(progress.start_epoch, cfg.epochs):
            consecutive_bad = run_epoch(cfg, trainer, train_batches, sampler, val_loader, recorder, progress, env,
                                        epoch, consecutive_bad,
                                        elapsed=lambda: progress.elapsed_before + time.time() - started)
    except (Exception, KeyboardInterrupt) as err:
        failing = True
        return record_failure(err, cfg, trainer, recorder, env, progress.elapsed_before + time.time() - started)
    finally:
        recorder.close()
    return 0


def run_epoch(cfg, trainer: Trainer, train_batches, sampler, val_loader, recorder: RunRecorder, progress: Progress,
              env: DistributedEnv, epoch: int, consecutive_bad: int, elapsed) -> int:
    """One epoch: training steps, validation, best tracking, then (rank 0) checkpoints, results.json,
    TensorBoard and the epoch's line. Returns the running count of consecutive non-finite steps."""
    t0 = time.time()
    sampler.set_epoch(epoch)
    trainer.model.train()

    def on_step(global_step, step, lr, loss, ok):
        recorder.scalar("train/lr", lr, global_step)
        if ok and step % 10 == 0 and recorder.writer is not None:
            recorder.scalar("train/loss", loss.item(), global_step)

    summary, consecutive_bad = train_epoch(trainer, iter(train_batches), epoch, cfg, consecutive_bad, on_step,
                                           first_batch_line=epoch == progress.start_epoch, progress=recorder.is_main)
    report = validate(trainer.model, val_loader, cfg.classes, trainer.device, trainer.autocast, cfg.channels_last,
                      progress=recorder.is_main)
    entry = {  # losses are None for an epoch (or class) without a counted step
        "epoch": epoch + 1, "train_loss": summary.train_loss, "train_loss_per_class": summary.per_class,
        "mean_dice": report["mean_dice"], "mean_iou": report["mean_iou"], "per_class": report["per_class"],
        "threshold_sweep": report["threshold_sweep"], "absent_classes": report["absent_classes"], "lr": summary.lr,
        "samples_per_s": cfg.iterations * cfg.batch_size * env.world_size / summary.seconds,
        "seconds": time.time() - t0, "nonfinite_steps": summary.nonfinite_steps,
    }
    progress.history.append(entry)
    improved = report["mean_dice"] is not None and (progress.best is None or
                                                    report["mean_dice"] > progress.best["mean_dice"])
    if improved:
        progress.best_epoch = epoch + 1
        progress.best = {k: report[k] for k in ("mean_dice", "mean_iou", "mean_definition", "absent_classes",
                                                 "per_class", "threshold_sweep")}
    state = {"config": cfg.to_dict(), "epoch": epoch + 1, **trainer.state_dict(), "rng": rng_state(),
             "history": progress.history, "best": progress.best, "best_epoch": progress.best_epoch,
             "elapsed_seconds": elapsed(), "run_name": recorder.run_dir.name,
             "loss_config": recorder.results["loss_config"]}
    recorder.epoch(state, improved, report, entry["train_loss"], history=progress.history, best=progress.best,
                   best_epoch=progress.best_epoch, elapsed_seconds=state["elapsed_seconds"],
                   status="completed" if epoch + 1 == cfg.epochs else "running")
    dice = "n/a" if report["mean_dice"] is None else f"{report['mean_dice']:.4f}"
    train_loss = "n/a" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
    log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss} | val mean Dice {dice} | "
        f"{entry['samples_per_s']:.1f} samples/s | {entry['seconds']:.0f} s"
        + (f" | {summary.nonfinite_steps} non-finite steps skipped" if summary.nonfinite_steps else "")
        + (" | best" if improved else ""))
    return consecutive_bad


def record_failure(err: BaseException, cfg, trainer: Trainer, recorder: RunRecorder, env: DistributedEnv,
                   elapsed: float) -> int:
    """Record why the run stopped (results.json on rank 0, failure_rank<N>.txt on the others) and print
    one line; re-raise a failure that is a bug here (its traceback shows where), else return 1."""
    # Loader workers die with the job (Ctrl-C and SIGTERM reach the whole process group); the
    # DataLoader's SIGCHLD handler would then raise again while the failure is being recorded.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    reason = f"{type(err).__name__}: {err}"
    device = trainer.device
    if device.type == "cuda" and isinstance(err, torch.cuda.OutOfMemoryError):
        reason = runtime.oom_advice(cfg.batch_size, torch.cuda.max_memory_allocated(device),
                                    torch.cuda.get_device_properties(device).total_memory)
    reason, peers_failed = recorder.record_failure(reason, env.rank, elapsed)
    if not env.is_main:
        raise err
    run_dir = recorder.run_dir
    print(f"error: run {run_dir.name} failed: {reason} (last good checkpoint: {run_dir / 'last.pt'})", file=sys.stderr)
    expected = (TrainingFailed, RunFileError, KeyboardInterrupt, torch.cuda.OutOfMemoryError)
    if not peers_failed and not isinstance(err, expected):  # a bug here: show where (a peer's failure is reported)
        raise err
    return 1


if __name__ == "__main__":
    sys.exit(main())
