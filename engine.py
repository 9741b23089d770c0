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
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from metrics import ConfusionCounter
from runtime import log
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

    def state_dict(self) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def training_step(model, raw_model, loss_fn, optimizer, scaler, autocast, x: torch.Tensor, y: torch.Tensor,
                  grad_clip: float, sync: bool = False):
    """One optimiser step: autocast forward, masked loss, scaled backward, gradient clipping, update.

    A step whose loss or gradient norm is not finite is skipped and leaves no trace: no parameter update,
    and the BatchNorm statistics its forward pass changed are restored (an overflowing batch would otherwise
    poison them). With `sync` (DDP) every rank skips when any rank's loss is not finite, or the gradient
    all-reduce would desynchronise. `model` may be the DDP wrapper; `raw_model` is the module itself.
    Returns (loss, per-class loss, stepped).
    """
    buffers_before = [b.detach().clone() for b in raw_model.buffers()]  # tiny: norm statistics only
    with autocast():
        logits = model(x)
    loss, per_class = loss_fn(logits, y, return_per_class=True)
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


@dataclass
class EpochLoss:
    """An epoch's training loss, all-reduced over ranks; None where no step counted."""

    train_loss: float | None
    per_class: dict[str, float | None]
    nonfinite_steps: int
    lr: float            # the rate of the epoch's last step
    seconds: float       # time of the training steps (validation excluded)


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
    loss_sum = torch.zeros((), device=device)
    class_loss_sum = torch.zeros(len(classes), device=device)
    class_steps = torch.zeros(len(classes), device=device)
    good_steps = bad_steps = 0
    lr = trainer.scheduler.get_last_lr()[0]
    bar = tqdm(range(iterations), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="step", file=sys.stdout,
               leave=False)
    for step in bar:
        global_step = epoch * iterations + step
        x, y = to_model_inputs(next(batches), device, trainer.channels_last)
        if first_batch_line and step == 0:
            log(batch_sanity_line(x, y, classes))
        loss, per_class, ok = training_step(trainer.model, trainer.raw_model, trainer.loss_fn, trainer.optimizer,
                                            trainer.scaler, trainer.autocast, x, y, trainer.grad_clip, sync=trainer.ddp)
        lr = trainer.scheduler.get_last_lr()[0]  # the rate this step used
        trainer.scheduler.step()
        if ok:
            good_steps += 1
            consecutive_bad = 0
            loss_sum += loss.detach().float()
            # A class's mean loss counts only the steps where it had annotated voxels (its value is 0
            # otherwise): dividing by every step would dilute rarely annotated classes.
            counted = (~torch.isnan(y)).transpose(0, 1).flatten(1).any(1) & torch.isfinite(per_class)
            class_loss_sum += torch.where(counted, per_class.float(), 0.0)
            class_steps += counted
        else:
            bad_steps += 1
            consecutive_bad += 1
            if consecutive_bad >= cfg.max_consecutive_nonfinite:
                raise TrainingFailed(f"{consecutive_bad} consecutive non-finite loss/gradient steps "
                                     f"(epoch {epoch + 1}, step {step + 1}); lower --lr or check the data")
        if on_step is not None:
            on_step(global_step, step, lr, loss, ok)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
    seconds = time.time() - t0
    stats = torch.cat([torch.stack([loss_sum, torch.tensor(float(good_steps), device=device)]),
                       class_loss_sum, class_steps])
    if trainer.ddp:
        dist.all_reduce(stats)
    (loss_total, n_good), (class_totals, class_counts) = stats[:2].tolist(), stats[2:].view(2, -1).tolist()
    per_class_loss = {cls: total / n if n else None for cls, total, n in zip(classes, class_totals, class_counts)}
    return EpochLoss(loss_total / n_good if n_good else None, per_class_loss, bad_steps, lr, seconds), consecutive_bad


@torch.no_grad()
def validate(model: torch.nn.Module, loader, classes, device, autocast=contextlib.nullcontext,
             channels_last: bool = False, progress: bool = False) -> dict:
    """Pooled TP/FP/FN over the loader's tiles (all-reduced across ranks) -> metrics report."""
    was_training = model.training
    model.eval()
    counter = ConfusionCounter(len(classes), device)
    for batch in tqdm(loader, desc="validate", leave=False, disable=not progress, unit="batch"):
        x, y = to_model_inputs(batch, device, channels_last)
        with autocast():
            logits = model(x)
        counter.update(logits, y)
    counter.all_reduce()
    model.train(was_training)
    return counter.compute(classes)
