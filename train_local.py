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

import os
import re
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import config_shenron as C
import runtime
from cache import CropCache, crops_table, data_report, prepare_cache
from datasplit import CropEntry, datasplit_for, read_datasplit, resolve_data_root
from engine import Trainer, TrainingFailed, build_trainer, train_epoch, training_step, uses_sync_batchnorm, validate
from errors import DataError, Interrupted, RunFileError
from loaders import train_loader, validation_description, validation_loader
from losses import build_loss, describe_loss
from metrics import format_table
from models import count_parameters
from runfiles import (RESULTS_FILE, RunRecorder, StoredRun, check_writable, complete_from_checkpoint,
                      create_run_dir, load_checkpoint, read_run, restore_best_checkpoint, restore_rng_state,
                      rng_state)
from runtime import DistributedEnv, log
from sampling import PatchSpec

# What a rank stopped by torchrun (because another rank failed) or by the job's SIGTERM records.
STOPPED_BY_SIGNAL = "terminated by a signal (another rank failed or the job was stopped)"


def main(argv=None) -> int:
    args = C.build_parser(__doc__.split("\n")[0]).parse_args(argv)
    env = DistributedEnv.from_environment()
    try:
        plan = plan_run(args, env)
        if plan.finished:
            return 0
        device = runtime.select_device(plan.device_type, env)
        data = prepare_data(plan, env)
        train_batches, sampler, val_loader = build_loaders(plan.cfg, data, plan.datasplit, env, device)
    except (ValueError, DataError, RunFileError) as err:
        return runtime.report_error(err, env)
    except Interrupted as err:
        return runtime.report_error(err, env, status=130)
    runtime.init_process_group(env, device)
    trainer = build_trainer(plan.cfg, data.loss_fn, device, env)
    progress = restore_progress(trainer, plan.resume_state, plan.cfg, plan.run_dir)
    try:
        run_dir = plan.run_dir or new_run_folder(plan, args.run_name, env)
        recorder = RunRecorder(run_dir, new_results(plan, data, trainer, env, progress, run_dir), env.is_main)
        recorder.open(new_run=plan.run_dir is None)
    except RunFileError as err:
        return runtime.report_error(err, env)
    log_run_header(recorder, plan.cfg, env)
    code = train(plan.cfg, trainer, train_batches, sampler, val_loader, recorder, progress, env)
    runtime.destroy_process_group(env)
    if code == 0 and env.is_main and progress.best is not None:
        log(f"\nbest epoch {progress.best_epoch} of {plan.cfg.epochs} (validation during training, "
            f"{recorder.results['validation']['metric']}; {recorder.results['validation']['subset']}):")
        log(format_table(progress.best, plan.cfg.classes))
        code = final_evaluation(plan, data, recorder, device)
        log(f"results: {run_dir / RESULTS_FILE}")
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
    run_dir: Path | None = None      # None for a new run (created once the model is built)
    resume_state: dict | None = None
    device_type: str = "cpu"
    finished: bool = False           # a resumed run that had already completed: nothing to do


def plan_run(args, env: DistributedEnv) -> RunPlan:
    """The run's config, loss options, datasplit and resume state; ValueError/DataError/RunFileError with
    one line for bad input."""
    device_type = runtime.device_type_for(args.device)
    if args.resume:
        plan = plan_resume(Path(args.resume), args, device_type, env)
        if plan.finished:
            return restore_best(plan, env)
    else:
        data_root, notice = resolve_data_root(args.data_root)
        cfg = C.build_config(args, device_type, str(data_root)).with_overrides(world_size=env.world_size)
        csv_path = (Path(args.datasplit) if args.datasplit else datasplit_for(data_root)).resolve()
        plan = RunPlan(cfg, C.parse_loss_options(args.loss_option), csv_path)
        if notice:
            log(notice)
    plan.device_type = device_type
    runtime.check_precision(plan.cfg.precision, device_type)
    if plan.cfg.sync_bn == "on" and device_type != "cuda":
        raise ValueError("--sync-bn on: SyncBatchNorm runs on GPUs under DDP only; use auto or off on the CPU")
    # Class frequencies only set class weights: placeholders let a bad loss option fail now rather than
    # after the (on real data, long) cache preparation.
    try:
        placeholder_loss(plan)
    except ValueError as err:
        raise ValueError(f"loss {plan.cfg.loss!r} with options {plan.loss_options}: {err}") from None
    plan.cfg = resolve_batch_size(plan, env)
    check_batch_fits_memory(plan.cfg, device_type)
    plan.entries = read_datasplit(plan.datasplit)
    plan.out_dir = Path(args.out_dir or C.DEFAULT_OUT_DIR)
    if plan.run_dir is None and env.is_main:
        check_writable(plan.out_dir)
    return restore_best(plan, env)


def plan_resume(run_dir: Path, args, device_type: str, env: DistributedEnv) -> RunPlan:
    """The stored run, refused when the command gives options that differ from it; `finished` when its
    last.pt already holds the final epoch (results.json is completed from it if a kill came in between)."""
    run: StoredRun = read_run(run_dir)
    conflicts = C.resume_conflicts(args, run, device_type)
    if conflicts:
        raise ValueError(f"--resume {run_dir}: the run's config differs from this command: " + "; ".join(conflicts))
    cfg = C.resume_overrides(args, run.config, device_type)
    if cfg.world_size != env.world_size:
        raise ValueError(f"--resume {run_dir}: the run was trained on {cfg.world_size} process(es) (effective batch "
                         f"{cfg.batch_size * cfg.world_size}) and this job has {env.world_size}: the effective batch "
                         f"and the samples drawn would change; resume it with {cfg.world_size} (./run.sh ... --gpus "
                         f"{cfg.world_size}, or torchrun --nproc_per_node={cfg.world_size})")
    plan = RunPlan(cfg, run.loss_options, run.datasplit, run_dir=run_dir)
    if (run_dir / "last.pt").is_file():
        plan.resume_state = load_checkpoint(run_dir / "last.pt")
        if plan.resume_state["epoch"] >= cfg.epochs:
            if env.is_main and complete_from_checkpoint(run, plan.resume_state):  # one writer
                log(f"run {run_dir.name} had finished all {cfg.epochs} epochs; {RESULTS_FILE} completed from last.pt")
            else:
                log(f"run {run_dir.name} already completed ({cfg.epochs} epochs); nothing to do")
            plan.finished = True
    return plan


def placeholder_loss(plan: RunPlan) -> torch.nn.Module:
    """The run's loss with placeholder class frequencies (the real ones come from the cache)."""
    cfg = plan.cfg
    return build_loss(cfg.loss, cfg.classes, class_frequencies=dict.fromkeys(cfg.classes, 0.5), **plan.loss_options)


def resolve_batch_size(plan: RunPlan, env: DistributedEnv) -> C.RunConfig:
    """--batch-size auto: on CUDA the largest batch whose training step (two of them: the optimiser's state
    comes with the first) peaks below AUTO_BATCH_MEMORY_FRACTION of the GPU's memory, found on this rank's GPU;
    on the CPU the profile's batch size."""
    cfg = plan.cfg
    if cfg.batch_size != "auto":
        return cfg
    default = C.PROFILES[cfg.profile].batch_size[cfg.model]
    if plan.device_type != "cuda":
        log(f"--batch-size auto: no GPU; the {cfg.profile} profile's {default}")
        return cfg.with_overrides(batch_size=default)
    device = torch.device("cuda", env.local_rank)
    total = torch.cuda.get_device_properties(device).total_memory
    model_cfg = C.MODELS[cfg.model]
    label_z = cfg.patch_shape[0] if model_cfg.dims == 3 else None

    def fits(batch: int) -> bool:
        trainer = build_trainer(cfg.with_overrides(batch_size=batch), placeholder_loss(plan).to(device), device,
                                DistributedEnv())
        x = torch.rand((batch, model_cfg.in_channels) + tuple(cfg.patch_shape[0 if model_cfg.dims == 3 else 1:]),
                       device=device)
        y = (torch.rand((batch, len(cfg.classes)) + ((label_z,) if label_z else ()) + tuple(cfg.patch_shape[1:]),
                        device=device) > 0.9).float()
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            training_step(trainer.model, trainer.raw_model, trainer.loss_fn, trainer.optimizer, trainer.scaler,
                          trainer.autocast, x, y, cfg.grad_clip)
        return torch.cuda.max_memory_allocated(device) <= C.AUTO_BATCH_MEMORY_FRACTION * total

    batch = runtime.largest_batch(fits, default)
    log(f"--batch-size auto: {batch} (the largest whose step fits {C.AUTO_BATCH_MEMORY_FRACTION:.0%} of the "
        f"{total / 2**30:.1f} GiB of {torch.cuda.get_device_name(device)})")
    return cfg.with_overrides(batch_size=batch)


def restore_best(plan: RunPlan, env: DistributedEnv) -> RunPlan:
    """A resumed run's missing best.pt (evaluate.py reads it by default): restored from last.pt when that
    holds the best epoch, else said (runfiles.restore_best_checkpoint). Rank 0 only, and only once the plan
    is checked: bad input leaves the run folder as it was."""
    if plan.resume_state is not None and env.is_main:
        note = restore_best_checkpoint(plan.run_dir, plan.resume_state)
        if note:
            log(note)
    return plan


# Tensors of a UNet training step kept at full resolution until the backward pass, in units of the first
# level's width: the first encoder block's two convolution outputs and their activations (4), and the last
# decoder block's concatenated input (2) with its two convolution outputs and activations (4). Coarser
# levels, gradients and the loss come on top (measured steps take about 3 times this).
FULL_RESOLUTION_TENSORS = 10


def check_batch_fits_memory(cfg: C.RunConfig, device_type: str) -> None:
    """ValueError when a lower bound of one training step's memory exceeds the machine's: the loader's uint8
    patches and labels in host memory (a batch in each worker; in the main process its samples and their
    collated copy), and the float inputs, targets and full-resolution activations in host memory on the CPU
    or in GPU memory on CUDA. A batch that large does not fail by itself: the loader gathers it sample by
    sample for minutes while memory fills, then the machine swaps, and the run seems to hang."""
    dims = C.MODELS[cfg.model].dims
    raw_voxels = int(np.prod(cfg.patch_shape))
    label_voxels = raw_voxels // cfg.patch_shape[0] if dims == 2 else raw_voxels
    classes = len(cfg.classes)
    loader = (2 + cfg.workers) * (raw_voxels + classes * label_voxels)  # uint8
    activation_bytes = 4 if device_type == "cpu" or cfg.precision == "fp32" else 2
    inputs_and_targets = 4 * (raw_voxels + classes * label_voxels)  # float32
    step = inputs_and_targets + label_voxels * FULL_RESOLUTION_TENSORS * cfg.base_channels * activation_bytes
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [("host memory", host, loader + (step if device_type == "cpu" else 0))]
    if device_type == "cuda":
        limits.append(("GPU memory", torch.cuda.get_device_properties(0).total_memory, step))
    for memory, available, per_sample in limits:
        if cfg.batch_size * per_sample > available:
            default = C.PROFILES[cfg.profile].batch_size[cfg.model]
            raise ValueError(
                f"--batch-size {cfg.batch_size} needs at least {cfg.batch_size * per_sample / 1e9:.1f} GB of "
                f"{memory} for one training step of {cfg.patch_shape} patches, more than the {available / 1e9:.1f} "
                f"GB here (it would swap, not fail): use a smaller --batch-size, at most {available // per_sample} "
                f"can fit at these settings (the {cfg.profile} profile uses {default} for {cfg.model})")


def new_run_folder(plan: RunPlan, run_name: str | None, env: DistributedEnv) -> Path:
    """Rank 0 creates the new run's folder (runfiles.create_run_dir: a taken name gets -2, -3, ...); every
    rank gets its path. Done once the model is built, so no failure before it can leave an empty folder."""
    name = None
    if env.is_main:
        name = create_run_dir(plan.out_dir, plan.cfg, run_name).name
        if run_name and name != run_name:
            log(f"run name {run_name} is taken in {plan.out_dir}: this run is {name}")
    return plan.out_dir / runtime.broadcast_from_main(name, env)


@dataclass
class RunData:
    cache: CropCache
    spec: PatchSpec
    report: list[str]
    loss_fn: torch.nn.Module
    loss_config: dict
    crops: list[dict] | None = None   # results.json's crops table, completed by build_loaders
    validation: dict | None = None    # what the per-epoch validation numbers are, from build_loaders


def prepare_data(plan: RunPlan, env: DistributedEnv) -> RunData:
    """The crop cache (rank 0 builds it, the others wait), the data report, and the loss with class
    frequencies from the training crops. DataError when a split has no usable crop."""
    cfg = plan.cfg
    spec = PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)
    cache = runtime.main_rank_first(
        lambda main: prepare_cache(plan.entries, cfg.classes, cfg.scale_nm, workers=cfg.workers, progress=main,
                                   build=main, verify=main), env, C.DEFAULT_CACHE_DIR)
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
    built next draws its initial weights from them. Completes the data report and the crops table with the
    training crops the sampler cannot use and each crop's expected share of the samples."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    pin = device.type == "cuda"
    loader, sampler = train_loader(cfg, data.cache, data.spec, datasplit, env.rank, pin_memory=pin)
    patches = getattr(loader, "dataset", None)
    unusable = dict(getattr(patches, "unusable", []))
    for name, reason in unusable.items():
        line = (f"  train: {name} is not sampled: {reason}; fix: allow more with --max-missing-raw, use a smaller "
                f"--patch-yx, or fetch more context (csc fetch-data --raw-padding)")
        log(line)
        data.report.append(line)
    shares = patches.sample_shares() if hasattr(patches, "sample_shares") else {}
    data.crops = crops_table(data.cache, shares, unusable)
    val_loader = validation_loader(cfg, data.cache, data.spec, env.rank, env.world_size, pin_memory=pin)
    data.validation = validation_description(val_loader)
    return loader, sampler, val_loader


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
        "world_size": env.world_size, "sync_batchnorm": uses_sync_batchnorm(cfg, device, env),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": cfg.to_dict(), "loss_options": plan.loss_options, "parameters": count_parameters(trainer.raw_model),
        "datasplit": str(plan.datasplit), "data_report": data.report, "crops": data.crops,
        "validation": data.validation, "final_evaluation": None, "best_epoch": progress.best_epoch,
        "best": progress.best, "history": progress.history, "elapsed_seconds": progress.elapsed_before,
        "failure": None,
    }


def log_run_header(recorder: RunRecorder, cfg: C.RunConfig, env: DistributedEnv) -> None:
    results = recorder.results
    log(f"run folder {recorder.run_dir} | {cfg.model} ({results['parameters']:,} parameters) | loss {cfg.loss} | "
        f"{env.world_size} x {results['device']} | {cfg.precision} | batch {cfg.batch_size} x {env.world_size} | "
        f"{cfg.epochs} epochs x {cfg.iterations} steps")


TTA_ORTHOPLANE = "best_tta_orthoplane"   # final_evaluation's entry of the best checkpoint with TTA and orthoplane


def uses_tta_orthoplane(cfg: C.RunConfig) -> bool:
    """--final-tta-orthoplane: on, or auto for the 1-slice 2D model in the model comparison (the baseline 2.5D
    is measured against; 24 predictions per tile, so not in the other modes by default)."""
    return cfg.final_tta_orthoplane == "on" or (cfg.final_tta_orthoplane == "auto" and cfg.model == "unet_2d"
                                                and cfg.mode == "model_comparison")


def final_evaluation(plan: RunPlan, data: RunData, recorder: RunRecorder, device: torch.device) -> int:
    """The chosen checkpoints (best, and last when it is another epoch) on every validation crop in full
    (8-nm metric) and, with --final-evaluation official, under the challenge's rules; into results.json.

    The training is complete by now: a failure here (or Ctrl-C) is recorded under final_evaluation.failure,
    with what was evaluated before it, and reported in one line with the command that redoes it."""
    cfg = plan.cfg
    if cfg.final_evaluation == "none":
        return 0
    results, evaluations, code = recorder.results, {}, 0
    try:
        score_chosen_checkpoints(plan, data, recorder.run_dir, results, device, evaluations)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - any failure is recorded, then reported
        interrupted = isinstance(err, KeyboardInterrupt)
        reason = "interrupted (Ctrl-C)" if interrupted else f"{type(err).__name__}: {err}"
        redo = f"./run.sh evaluate {recorder.run_dir}" + (" --official" if cfg.final_evaluation == "official" else "")
        evaluations["failure"] = {"reason": reason, "traceback": traceback.format_exc(), "redo": redo}
        print(f"error: the final evaluation failed ({reason.splitlines()[0][:300]}); the trained checkpoints "
              f"are kept; redo it with: {redo}", file=sys.stderr)
        code = 130 if interrupted else 1
    results["final_evaluation"] = evaluations
    try:
        recorder.save()
    except RunFileError as err:
        print(f"error: the final evaluation could not be recorded: {err}", file=sys.stderr)
        return 1
    return code


def score_chosen_checkpoints(plan: RunPlan, data: RunData, run_dir: Path, results: dict, device: torch.device,
                             evaluations: dict) -> None:
    """final_evaluation's work: each chosen checkpoint into `evaluations` as soon as it is scored."""
    from evaluation import EvalOptions, evaluate_checkpoint, official_table  # loads the scorer: only needed here
    from inference import load_run_model

    cfg = plan.cfg
    official = cfg.final_evaluation == "official"
    last_epoch = results["history"][-1]["epoch"]
    chosen = ("best", "last") if last_epoch != results["best_epoch"] else ("best",)
    if not (run_dir / "best.pt").is_file():  # removed by hand; the resume said so
        chosen = ("last",)
    # (entry in final_evaluation, checkpoint, options, tiling printed, what is said), each checkpoint loaded once
    jobs = [(which, which, EvalOptions(("training", "sliding") if official else ("training",), official=official),
             "training", "on every validation crop in full") for which in chosen]
    if uses_tta_orthoplane(cfg) and "best" in chosen:
        jobs.insert(1, (TTA_ORTHOPLANE, "best", EvalOptions(("sliding",), official=official, tta=True, orthoplane=True),
                        "sliding", "with test-time augmentation and orthoplane averaging"))
    loaded = None
    for key, which, opts, shown, how in jobs:
        if loaded is None or loaded[0] != which:
            loaded = (which, *load_run_model(run_dir, which, device)[1:])
        _, model, state = loaded
        log(f"final evaluation of {which}.pt (epoch {state['epoch']}) {how}")
        evaluations[key] = evaluate_checkpoint(cfg, model, state["epoch"], results, data.cache, plan.entries,
                                               device, opts, which, cfg.workers)
        log(format_table(evaluations[key]["tilings"][shown], cfg.classes))
        if official:
            log(official_table(evaluations[key]["official"]))


# ----------------------------------------------------------------------------------------------------
# The epoch loop and failure recording
# ----------------------------------------------------------------------------------------------------
def train(cfg: C.RunConfig, trainer: Trainer, train_batches, sampler, val_loader, recorder: RunRecorder,
          progress: Progress, env: DistributedEnv) -> int:
    """Epochs of training and validation from `progress.start_epoch`; 0 when done, 1 after a recorded failure."""
    failing = False

    def on_sigterm(signum, frame):  # torchrun stops the other ranks with SIGTERM when one fails
        if not failing:  # once failing, the signal must not cut the recording of the failure short
            raise TrainingFailed(STOPPED_BY_SIGNAL)

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.time()
    elapsed = lambda: progress.elapsed_before + time.time() - started
    watchdog = runtime.Watchdog(runtime.watchdog_seconds(env), lambda idle: record_hang(idle, recorder, env, elapsed()))
    try:
        consecutive_bad = 0
        for epoch in range(progress.start_epoch, cfg.epochs):
            consecutive_bad = run_epoch(cfg, trainer, train_batches, sampler, val_loader, recorder, progress, env,
                                        epoch, consecutive_bad, elapsed, watchdog.kick)
    except (Exception, KeyboardInterrupt) as err:
        failing = True
        watchdog.stop()
        return record_failure(err, cfg, trainer, recorder, env, elapsed())
    finally:
        watchdog.stop()
        recorder.close()
    return 0


def record_hang(idle: float, recorder: RunRecorder, env: DistributedEnv, elapsed: float) -> None:
    """The watchdog's record of a run that stopped making progress (it then ends the process)."""
    reason, _ = recorder.record_failure(f"no progress for {idle:.0f} s on rank {env.rank}: a peer stopped or died and "
                                        f"the collectives wait for it (stopped by the watchdog)", env.rank, elapsed)
    if env.is_main:
        print(f"error: run {recorder.run_dir.name} failed: {reason}", file=sys.stderr, flush=True)


def run_epoch(cfg, trainer: Trainer, train_batches, sampler, val_loader, recorder: RunRecorder, progress: Progress,
              env: DistributedEnv, epoch: int, consecutive_bad: int, elapsed, heartbeat) -> int:
    """One epoch: training steps, validation, best tracking, then (rank 0) checkpoints, results.json,
    TensorBoard and the epoch's line. Returns the running count of consecutive non-finite steps."""
    t0 = time.time()
    sampler.set_epoch(epoch)
    trainer.model.train()

    def on_step(global_step, step, lr, loss, ok):
        heartbeat()
        recorder.scalar("train/lr", lr, global_step)
        if ok and step % 10 == 0:
            recorder.scalar("train/loss", loss, global_step)

    summary, consecutive_bad = train_epoch(trainer, iter(train_batches), epoch, cfg, consecutive_bad, on_step,
                                           first_batch_line=epoch == progress.start_epoch, progress=recorder.is_main)
    report = validate(trainer.model, val_loader, cfg.classes, trainer.device, trainer.autocast, cfg.channels_last,
                      progress=recorder.is_main, heartbeat=heartbeat)
    entry = {  # losses are None for an epoch (or class) without a counted step
        "epoch": epoch + 1, "train_loss": summary.train_loss, "train_loss_per_class": summary.per_class,
        "mean_dice": report["mean_dice"], "mean_iou": report["mean_iou"], "per_class": report["per_class"],
        "threshold_sweep": report["threshold_sweep"], "absent_classes": report["absent_classes"], "lr": summary.lr,
        "samples_per_s": cfg.iterations * cfg.batch_size * env.world_size / summary.seconds,
        "seconds": time.time() - t0, "nonfinite_steps": summary.nonfinite_steps,
        "scaler_backoffs": summary.scaler_backoffs,
    }
    if trainer.ema is not None:  # the averaged weights, validated on the same tiles
        ema_report = validate(trainer.ema.module, val_loader, cfg.classes, trainer.device, trainer.autocast,
                              cfg.channels_last, heartbeat=heartbeat)
        entry["ema"] = {k: ema_report[k] for k in ("mean_dice", "mean_iou", "per_class", "absent_classes")}
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
    if trainer.ema is not None:
        recorder.save_ema(dict(state, model=trainer.ema.module.state_dict()))
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
    """Record why the run stopped (results.json on rank 0, failure_rank<N>.txt on the others) and print one
    line with the last good checkpoint and the command that continues the run; re-raise a failure that is a
    bug here (its traceback shows where), else return 1."""
    # Loader workers die with the job (Ctrl-C and SIGTERM reach the whole process group); the
    # DataLoader's SIGCHLD handler would then raise again while the failure is being recorded.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    reason = failure_reason(err, cfg, trainer.device)
    reason, peers_failed = recorder.record_failure(reason, env.rank, elapsed, env.world_size,
                                                   lost_peer=env.ddp and lost_a_peer(err))
    if not env.is_main:
        raise err
    run_dir = recorder.run_dir
    last = run_dir / "last.pt"
    checkpoint = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint yet"
    print(f"error: run {run_dir.name} failed: {reason} ({checkpoint}); continue with: {resume_command(run_dir, env)}",
          file=sys.stderr)
    expected = (TrainingFailed, RunFileError, KeyboardInterrupt, torch.cuda.OutOfMemoryError)
    if not peers_failed and not isinstance(err, expected):  # a bug here: show where (a peer's failure is reported)
        raise err
    return 1


def failure_reason(err: BaseException, cfg, device: torch.device) -> str:
    """One line saying why this rank stopped."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if device.type == "cuda" and isinstance(err, torch.cuda.OutOfMemoryError):
        return runtime.oom_advice(cfg.batch_size, torch.cuda.max_memory_allocated(device),
                                  torch.cuda.get_device_properties(device).total_memory)
    lines = str(err).strip().splitlines()
    # gloo and c10 prefix their messages with the C++ source line ("[.../pair.cc:545] Read error ...").
    first = re.sub(r"^\[[^\]]+\.(?:cc|cpp|h):\d+\]\s*", "", lines[0]) if lines else ""
    return f"{type(err).__name__}: {first}"


# What a collective raises on a rank whose peer is gone (gloo reports the closed socket; NCCL raises a
# DistError), and the SIGTERM with which torchrun stops the others when a rank exits (`train`'s handler).
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", STOPPED_BY_SIGNAL)


def lost_a_peer(err: BaseException) -> bool:
    return isinstance(err, torch.distributed.DistError) or any(text in str(err) for text in PEER_LOST)


def resume_command(run_dir: Path, env: DistributedEnv) -> str:
    """The command that continues the run from its last checkpoint (under torchrun again for DDP)."""
    launcher = f"torchrun --standalone --nproc_per_node={env.world_size}" if env.ddp else "python"
    return f"{launcher} {shlex.quote(sys.argv[0])} --resume {shlex.quote(str(run_dir.absolute()))}"


if __name__ == "__main__":
    sys.exit(main())
