"""The training engine: one optimiser step (`training_step`), one epoch of steps (`train_epoch`) and one
validation pass (`validate`), over a `Trainer` that holds the model, loss, optimiser, schedule and AMP
state of a run.

Metrics come from TP/FP/FN pooled over every validation tile and all-reduced across DDP ranks (nnU-Net
style, metrics.py); the training loss of an epoch is the mean over its finite steps, all-reduced too.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import config_shenron as C
from metrics import ConfusionCounter
from models import unet_for_run
from runtime import DistributedEnv, autocast_for, log
from sampling import batch_sanity_line, to_model_inputs


class TrainingFailed(RuntimeError):
    """The run cannot continue (too many non-finite steps, terminated); recorded as status 'failed'."""


@dataclass
class Trainer:
    """What one optimiser step needs. `model` may be the DDP wrapper; `raw_model` is the module itself."""

    model: torch.nn.Module
    raw_model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable
    device: torch.device
    ddp: bool
    channels_last: bool
    grad_clip: float
    ema: torch.optim.swa_utils.AveragedModel | None = None   # exponential moving average of the weights

    def state_dict(self) -> dict:
        state = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def build_trainer(cfg: C.RunConfig, loss_fn: torch.nn.Module, device: torch.device, env: DistributedEnv) -> Trainer:
    """The UNet (DDP-wrapped under torchrun), AdamW, the OneCycle schedule, the GradScaler and autocast."""
    model = unet_for_run(cfg).to(device)
    if cfg.channels_last and C.MODELS[cfg.model].dims == 2:
        model = model.to(memory_format=torch.channels_last)
    if uses_sync_batchnorm(cfg, device, env):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    if env.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    # fused AdamW (CUDA) takes the GradScaler's overflow check inside its kernel: no host sync per step
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            raw_model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    # OneCycle is stepped once per optimiser step (batch), over the whole run; warm-up is 10% of the
    # steps but at least 2 (OneCycleLR divides by zero when the warm-up rounds to no step).
    total_steps = cfg.epochs * cfg.iterations
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                    pct_start=min(0.5, max(0.1, 2.5 / total_steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")
    autocast = autocast_for(cfg.precision if device.type == "cuda" else "fp32", device)
    return Trainer(model, raw_model, loss_fn, optimizer, scheduler, scaler, autocast, device, env.ddp,
                   cfg.channels_last, cfg.grad_clip, ema)


def uses_sync_batchnorm(cfg: C.RunConfig, device: torch.device, env: DistributedEnv) -> bool:
    """SyncBatchNorm: BatchNorm models under DDP on CUDA, with --sync-bn on, or auto for 3D models (batches of
    2 per GPU make per-GPU statistics noisy)."""
    wanted = cfg.sync_bn == "on" or (cfg.sync_bn == "auto" and C.MODELS[cfg.model].dims == 3)
    return wanted and cfg.norm == "batch" and env.ddp and device.type == "cuda"


class StepResult(NamedTuple):
    loss: float               # the step's loss on the host (NaN or inf when it was not finite)
    per_class: torch.Tensor   # detached float32 [C] per-class loss, on the device
    stepped: bool             # the parameters were updated
    nonfinite: bool           # a non-finite loss, or (without a GradScaler) a non-finite gradient: skipped, counts
    backoff: bool             # fp16: the GradScaler found non-finite gradients of a finite loss and lowered its scale


def training_step(model, raw_model, loss_fn, optimizer, scaler, autocast, x: torch.Tensor, y: torch.Tensor,
                  grad_clip: float, sync: bool = False, ema=None) -> StepResult:
    """One optimiser step: autocast forward, masked loss, scaled backward, gradient clipping, update, and the
    EMA of the weights when `ema` is given.

    One host synchronisation per step: the loss and the finiteness of loss and gradient norm come back
    together, after the backward pass (a non-finite loss gives non-finite gradients, which nothing applies).
    A non-finite step (non-finite loss, or non-finite gradients without a GradScaler) is skipped and leaves no trace:
    no update, and the BatchNorm statistics its forward pass changed are restored. With fp16, non-finite
    gradients of a finite loss are the GradScaler's normal back-off (it lowers its scale and skips the
    update): not counted as non-finite. With `sync` (DDP) every rank skips when any rank's loss is not finite (gradients are
    all-reduced, so their norm agrees anyway). `model` may be the DDP wrapper; `raw_model` is the module.
    """
    buffers_before = [b.detach().clone() for b in raw_model.buffers()]  # tiny: norm statistics only
    with autocast():
        logits = model(x)
    loss, per_class = loss_fn(logits, y, return_per_class=True)
    loss_ok = torch.isfinite(loss.detach()).float()
    if sync:
        dist.all_reduce(loss_ok, op=dist.ReduceOp.MIN)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    value, finite_loss, finite_grad = torch.stack([loss.detach().float(), loss_ok,
                                                   torch.isfinite(grad_norm).float()]).tolist()
    stepped = bool(finite_loss and finite_grad)
    if stepped:
        scaler.step(optimizer)  # fused AdamW on CUDA takes the scaler's inf check without a host sync
        if ema is not None:
            ema.update_parameters(raw_model)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    nonfinite = not finite_loss or (not finite_grad and not scaler.is_enabled())
    if nonfinite:
        with torch.no_grad():
            for buffer, before in zip(raw_model.buffers(), buffers_before):
                buffer.copy_(before)
    return StepResult(value, per_class, stepped, nonfinite, bool(finite_loss and not finite_grad and scaler.is_enabled()))


@dataclass
class EpochLoss:
    """An epoch's training loss, all-reduced over ranks; None where no step counted."""

    train_loss: float | None
    per_class: dict[str, float | None]
    nonfinite_steps: int
    lr: float            # the rate of the epoch's last step
    seconds: float       # time of the training steps (validation excluded)
    scaler_backoffs: int = 0


def train_epoch(trainer: Trainer, batches, epoch: int, cfg, consecutive_bad: int, on_step: Callable | None = None,
                first_batch_line: bool = False, progress: bool = False) -> tuple[EpochLoss, int]:
    """`cfg.iterations` optimiser steps on `batches` (an iterator of compact batches), with the OneCycle
    schedule stepped once per step. `on_step(global_step, step, lr, loss, stepped)` sees every step
    (TensorBoard). Raises TrainingFailed after `cfg.max_consecutive_nonfinite` skipped steps in a row (the
    count carries over epochs). Returns the epoch's loss summary and the running count of consecutive
    skipped steps."""
    iterations, classes = cfg.iterations, cfg.classes
    t0 = time.time()
    device = trainer.device
    loss_sum = 0.0
    class_loss_sum = torch.zeros(len(classes), device=device)
    class_steps = torch.zeros(len(classes), device=device)
    good_steps = bad_steps = backoffs = 0
    lr = trainer.scheduler.get_last_lr()[0]
    bar = tqdm(range(iterations), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="step", file=sys.stdout,
               leave=False)
    for step in bar:
        global_step = epoch * iterations + step
        x, y = to_model_inputs(next(batches), device, trainer.channels_last)
        if first_batch_line and step == 0:
            log(batch_sanity_line(x, y, classes))
        result = training_step(trainer.model, trainer.raw_model, trainer.loss_fn, trainer.optimizer, trainer.scaler,
                               trainer.autocast, x, y, trainer.grad_clip, sync=trainer.ddp, ema=trainer.ema)
        lr = trainer.scheduler.get_last_lr()[0]  # the rate this step used
        trainer.scheduler.step()
        if result.nonfinite:
            bad_steps += 1
            consecutive_bad += 1
            if consecutive_bad >= cfg.max_consecutive_nonfinite:
                raise TrainingFailed(f"{consecutive_bad} consecutive non-finite loss/gradient steps "
                                     f"(epoch {epoch + 1}, step {step + 1}); lower --lr or check the data")
        else:
            good_steps += 1
            consecutive_bad = 0
            backoffs += result.backoff
            loss_sum += result.loss
            # A class's mean loss counts only the steps where it had annotated voxels (its value is 0
            # otherwise): dividing by every step would dilute rarely annotated classes.
            counted = (~torch.isnan(y)).transpose(0, 1).flatten(1).any(1) & torch.isfinite(result.per_class)
            class_loss_sum += torch.where(counted, result.per_class.float(), 0.0)
            class_steps += counted
        if on_step is not None:
            on_step(global_step, step, lr, result.loss, not result.nonfinite)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
    seconds = time.time() - t0
    stats = torch.cat([torch.tensor([loss_sum, float(good_steps), float(backoffs)], device=device),
                       class_loss_sum, class_steps])
    if trainer.ddp:
        dist.all_reduce(stats)
    (loss_total, n_good, n_backoffs), (class_totals, class_counts) = stats[:3].tolist(), stats[3:].view(2, -1).tolist()
    per_class_loss = {cls: total / n if n else None for cls, total, n in zip(classes, class_totals, class_counts)}
    return (EpochLoss(loss_total / n_good if n_good else None, per_class_loss, bad_steps, lr, seconds, int(n_backoffs)),
            consecutive_bad)


@torch.no_grad()
def validate(model: torch.nn.Module, loader, classes, device, autocast=contextlib.nullcontext,
             channels_last: bool = False, progress: bool = False, heartbeat: Callable | None = None) -> dict:
    """Pooled TP/FP/FN over the loader's tiles (all-reduced across ranks) -> metrics report.

    Under DDP the module is run directly, after its buffers (BatchNorm statistics) are broadcast from rank 0,
    which is what the DDP wrapper's own forward would do: a rank with fewer tiles, or none, then never waits
    in a forward pass that the others skip (the wrapper's forward is a collective)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    counter = ConfusionCounter(len(classes), device)
    for batch in tqdm(loader, desc="validate", leave=False, disable=not progress, unit="batch"):
        x, y = to_model_inputs(batch, device, channels_last)
        with autocast():
            logits = model(x)
        counter.update(logits, y)
        if heartbeat is not None:
            heartbeat()
    counter.all_reduce()
    model.train(was_training)
    return counter.compute(classes)
