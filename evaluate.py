"""Validation and checkpoint evaluation.

`validate` runs a model over `ValidationTiles` (every validation crop in full, each annotated voxel once)
and returns the metrics report from counts pooled over all tiles and all DDP ranks. Training calls it every
epoch; the command line below re-evaluates a saved checkpoint.
"""
from __future__ import annotations

import contextlib

import torch

from data import to_model_inputs
from metrics import ConfusionCounter


@torch.no_grad()
def validate(model: torch.nn.Module, loader, classes, device, autocast=contextlib.nullcontext,
             channels_last: bool = False, progress: bool = False) -> dict:
    """Pooled TP/FP/FN over the loader's tiles (all-reduced across ranks) -> metrics report."""
    from tqdm import tqdm

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
