"""The toolkit's training losses: masked multi-label segmentation losses and their named configurations.

Owns every loss module (`BCELoss`, `DiceLoss`, `DiceBCELoss`, `FocalLoss`, `TverskyLoss`, `ComboLoss`,
`PerClassComboLoss`, `PerClassTverskyLoss`, `BoundaryLoss`), the named configurations compared by the
experiment (`LOSS_CONFIGS`, built with `build_loss` and logged with `describe_loss`) and the class-weight
tables (`SEED_CLASS_WEIGHTS`, `class_weights_from_frequencies`). `python losses.py [--names]` lists the
named configurations.

Conventions shared by every loss:
- `forward(logits, target, return_per_class=False)`: logits [B, C, H, W] or [B, C, D, H, W], one sigmoid
  per class (multi-label, never a softmax); target of the same shape, float in [0, 1], NaN where the voxel
  is unannotated for that class. Returns a scalar, or `(scalar, per_class)` with `per_class` a detached
  float32 [C] tensor of each class's unweighted loss (the sum of its term values; 0 for a class with no
  annotated voxel in the batch, which contributes nothing).
- Unannotated voxels are excluded from every term after the activation: their probability, target and
  per-voxel loss count as 0 and they are left out of every count. A logit is never zeroed (sigmoid(0) is
  0.5, not "absent").
- Each term is reduced per class over annotated voxels, then averaged over the classes that have at least
  one annotated voxel in the batch, with class weights renormalised over those classes. A class with no
  annotated voxel contributes exactly 0 to the loss and to the gradient; an all-NaN batch gives a loss of
  0 that still backpropagates (zero gradient).
- Every sum runs in float32 with autocast disabled, whatever the logits' dtype (fp16 sums overflow past
  65504), and everything is vectorised over the class axis.

Implementation: loss_kernels.py computes the per-(sample, class) sums that Dice, Tversky and BCE need
(probability, overlap, BCE) in one autograd Function with a hand-written backward: one sigmoid, masks
applied by multiplication, few full-size temporaries, no host syncs. The losses here are small formulas on
those [B, C] sums; focal and the boundary band are the only extra per-voxel work.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from config_shenron import LOSS_CONFIGS  # the named configurations (data, no torch: the command lines check names)
from loss_kernels import Batch, boundary_weights, flatten_batch, focal_sums, masked_class_sums, safe_divide, tversky

# The seed's hand-set class weights (larger for the classes it found hard).
SEED_CLASS_WEIGHTS: dict[str, float] = {
    "endo_mem": 3.0, "endo_lum": 3.0, "nuc": 3.5, "pm": 2.5, "er_mem": 2.5, "er_lum": 2.0, "ves_mem": 2.0,
    "mito_mem": 1.8, "mito_lum": 1.5, "ves_lum": 1.5, "ecs": 1.5, "golgi_lum": 1.5, "mito_ribo": 1.0,
    "golgi_mem": 1.0,
}

FREQUENCY_SCHEMES: tuple[str, ...] = ("inverse", "sqrt_inverse", "log_inverse")
# A class never seen positive would get an infinite inverse weight; this floor bounds it.
FREQUENCY_FLOOR = 1e-4
# ENet's offset for log-inverse weights: bounds them to [1 / ln(2.02), 1 / ln(1.02)] = [1.42, 50.5].
LOG_INVERSE_OFFSET = 1.02

DEFAULT_SMOOTH = 1e-5
DEFAULT_MAX_POS_WEIGHT = 10.0


# ----------------------------------------------------------------------------------------------------
# Class weights


def class_weights_from_frequencies(frequencies: Mapping[str, float], scheme: str) -> dict[str, float]:
    """Class weights from class frequencies, normalised to mean 1 over the given classes.

    `frequencies[c]` is the positive fraction of class c's annotated training voxels, in [0, 1]. With
    f_c = max(frequencies[c], FREQUENCY_FLOOR):
      inverse:      w_c = k / f_c
      sqrt_inverse: w_c = k / sqrt(f_c)
      log_inverse:  w_c = k / ln(LOG_INVERSE_OFFSET + f_c)      (ENet; bounded, gentlest of the three)
    with k chosen so that mean_c w_c = 1. Rarer classes get larger weights under every scheme.
    """
    if scheme not in FREQUENCY_SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not one of {list(FREQUENCY_SCHEMES)}")
    if not frequencies:
        raise ValueError("frequencies is empty: give the positive fraction of annotated voxels per class")
    bad = {name: value for name, value in frequencies.items() if not 0.0 <= float(value) <= 1.0}
    if bad:
        raise ValueError(f"frequencies must lie in [0, 1] (positive fraction of annotated voxels); got {bad}")
    floored = {name: max(float(value), FREQUENCY_FLOOR) for name, value in frequencies.items()}
    if scheme == "inverse":
        raw = {name: 1.0 / f for name, f in floored.items()}
    elif scheme == "sqrt_inverse":
        raw = {name: 1.0 / math.sqrt(f) for name, f in floored.items()}
    else:
        raw = {name: 1.0 / math.log(LOG_INVERSE_OFFSET + f) for name, f in floored.items()}
    mean = sum(raw.values()) / len(raw)
    return {name: value / mean for name, value in raw.items()}


def _per_class_vector(values: Mapping[str, float], classes: Sequence[str] | None, argument: str) -> torch.Tensor:
    """A class-name -> value dict as a float32 [C] tensor in channel order; classes it omits get 1.0."""
    if classes is None:
        raise ValueError(f"{argument} given as a dict needs classes (the class names in channel order)")
    unknown = sorted(set(values) - set(classes))
    if unknown:
        raise ValueError(f"{argument} names unknown classes {unknown}; classes are {list(classes)}")
    return torch.tensor([float(values.get(name, 1.0)) for name in classes], dtype=torch.float32)


def _class_weight_vector(class_weights: Mapping[str, float] | None,
                         classes: Sequence[str] | None) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if not isinstance(class_weights, Mapping):
        raise ValueError(f"class_weights must be a dict class name -> weight or None, got {class_weights!r}")
    vector = _per_class_vector(class_weights, classes, "class_weights")
    if not bool(torch.isfinite(vector).all()) or bool((vector < 0).any()):
        raise ValueError(f"class_weights must be finite and >= 0, got {dict(class_weights)}")
    return vector


def _pos_weight_vector(pos_weight, classes: Sequence[str] | None, max_pos_weight: float) -> torch.Tensor | None:
    """pos_weight (float, [C] sequence/tensor or dict) as a float32 tensor of 1 or C values, clamped."""
    if not (isinstance(max_pos_weight, (int, float)) and max_pos_weight > 0):
        raise ValueError(f"max_pos_weight must be > 0, got {max_pos_weight!r}")
    if pos_weight is None:
        return None
    if isinstance(pos_weight, Mapping):
        vector = _per_class_vector(pos_weight, classes, "pos_weight")
    else:
        vector = torch.as_tensor(pos_weight, dtype=torch.float32).detach().cpu().reshape(-1)
        if classes is not None and vector.numel() not in (1, len(classes)):
            raise ValueError(f"pos_weight has {vector.numel()} values; expected 1 or {len(classes)} (one per class)")
    if vector.numel() == 0 or not bool(torch.isfinite(vector).all()) or bool((vector <= 0).any()):
        raise ValueError(f"pos_weight must be finite and > 0, got {pos_weight!r}")
    return vector.clamp(max=float(max_pos_weight))


# ----------------------------------------------------------------------------------------------------
# Loss modules


def _check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class _CompoundLoss(nn.Module):
    """Shared engine: a weighted sum of a Tversky/Dice region term, a (pos- and voxel-weighted) BCE term
    and a focal term, each reduced per class and averaged over the classes present in the batch:

        loss = sum_term lambda_term * sum_c w_c s_c L_term,c / sum_c w_c s_c

    where s_c is the class's support (1 if it has annotated voxels, 0 if not; for per-sample Dice the
    number of samples in which it has annotated voxels) and w_c the class weight (1 without weights).
    This equals the plain mean over present classes with the weights rescaled so that the weights of
    the present classes average 1. The public classes below fix which terms are on.
    """

    def __init__(self, *, classes: Sequence[str] | None = None, class_weights: Mapping[str, float] | None = None,
                 region_weight: float = 0.0, tversky_alpha: float = 0.5, tversky_beta: float = 0.5,
                 region_smooth: float = DEFAULT_SMOOTH, batch_dice: bool = True,
                 bce_weight: float = 0.0, pos_weight=None, max_pos_weight: float = DEFAULT_MAX_POS_WEIGHT,
                 focal_weight: float = 0.0, gamma: float = 2.0, focal_alpha: float | None = None,
                 boundary_width: int = 0, boundary_gain: float = 0.0):
        super().__init__()
        if classes is not None:
            classes = tuple(classes)
            if not classes or len(set(classes)) != len(classes) or not all(isinstance(c, str) for c in classes):
                raise ValueError(f"classes must be a non-empty sequence of distinct names, got {list(classes)}")
        self.classes = classes
        self.region_weight = _check_nonnegative("dice_weight", region_weight)
        self.bce_weight = _check_nonnegative("bce_weight", bce_weight)
        self.focal_weight = _check_nonnegative("focal_weight", focal_weight)
        self.tversky_alpha = _check_nonnegative("alpha", tversky_alpha)
        self.tversky_beta = _check_nonnegative("beta", tversky_beta)
        if self.tversky_alpha + self.tversky_beta <= 0:
            raise ValueError(f"alpha + beta must be > 0, got alpha={tversky_alpha!r}, beta={tversky_beta!r}")
        if _check_nonnegative("smooth", region_smooth) <= 0:
            raise ValueError(f"smooth must be > 0 (it keeps empty classes finite), got {region_smooth!r}")
        self.smooth = float(region_smooth)
        if not isinstance(batch_dice, bool):
            raise ValueError(f"batch_dice must be True or False, got {batch_dice!r}")
        self.batch_dice = batch_dice
        self.gamma = _check_nonnegative("gamma", gamma)
        if focal_alpha is not None and not (isinstance(focal_alpha, (int, float)) and 0.0 <= focal_alpha <= 1.0):
            raise ValueError(f"alpha (focal, weight of positives) must be in [0, 1] or None, got {focal_alpha!r}")
        self.focal_alpha = None if focal_alpha is None else float(focal_alpha)
        if isinstance(boundary_width, bool) or not isinstance(boundary_width, int) or boundary_width < 0:
            raise ValueError(f"boundary_width must be an integer >= 0 (voxels), got {boundary_width!r}")
        self.boundary_width = boundary_width
        self.boundary_gain = _check_nonnegative("boundary_gain", boundary_gain)
        self.register_buffer("class_weight_vector", _class_weight_vector(class_weights, classes), persistent=False)
        self.register_buffer("pos_weight_vector", _pos_weight_vector(pos_weight, classes, max_pos_weight),
                             persistent=False)
        if self.region_weight + self.bce_weight + self.focal_weight == 0:
            raise ValueError("at least one of the loss terms needs a weight > 0")

    def _check_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.dim() not in (4, 5):
            raise ValueError(f"logits must be [B, C, H, W] or [B, C, D, H, W], got shape {tuple(logits.shape)}")
        if target.shape != logits.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        if self.classes is not None and logits.shape[1] != len(self.classes):
            raise ValueError(f"logits have {logits.shape[1]} classes but classes names {len(self.classes)}")

    def _terms(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class values of the active terms, each times its lambda, and their supports; both [K, C].

        Voxel terms are means over the batch's annotated voxels (their norms are >= 1 wherever the class
        has one, so clamping at 1 only guards absent classes); the support of a class-level term is
        whether the class is present; per-sample Tversky averages the samples that have the class and
        its support counts them.
        """
        present = (batch.class_count > 0).float()
        values, supports = [], []
        if self.region_weight > 0 or self.bce_weight > 0:
            voxel_weight = None
            bce_norm = batch.class_count
            if self.bce_weight > 0 and self.boundary_width > 0:
                voxel_weight = boundary_weights(batch, self.boundary_width, self.boundary_gain)
                bce_norm = voxel_weight.sum((0, 2))
            pos_weight = None if self.pos_weight_vector is None else self.pos_weight_vector.to(batch.logits.device)
            prob_sum, overlap, bce_sum = masked_class_sums(batch, pos_weight, voxel_weight, self.bce_weight > 0)
            if self.region_weight > 0:
                tversky_args = (self.tversky_alpha, self.tversky_beta, self.smooth)
                if self.batch_dice:
                    region = tversky(prob_sum.sum(0), overlap.sum(0), batch.target_sum.sum(0), *tversky_args)
                    support = present
                else:
                    has_class = (batch.count > 0).float()
                    support = has_class.sum(0)
                    pair_loss = tversky(prob_sum, overlap, batch.target_sum, *tversky_args)
                    region = (pair_loss * has_class).sum(0) / support.clamp_min(1.0)
                values.append(self.region_weight * region)
                supports.append(support)
            if self.bce_weight > 0:
                values.append(self.bce_weight * bce_sum.sum(0) / bce_norm.clamp_min(1.0))
                supports.append(present)
        if self.focal_weight > 0:
            focal_sum = focal_sums(batch, self.gamma, self.focal_alpha).sum(0)
            values.append(self.focal_weight * focal_sum / batch.class_count.clamp_min(1.0))
            supports.append(present)
        return torch.stack(values), torch.stack(supports)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, return_per_class: bool = False):
        self._check_inputs(logits, target)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            batch = flatten_batch(logits, target)
            values, weight = self._terms(batch)
            if self.class_weight_vector is not None:
                weight = weight * self.class_weight_vector.to(logits.device)
            loss = safe_divide((weight * values).sum(1), weight.sum(1)).sum()
        if not return_per_class:
            return loss
        # Absent classes already have value 0 (their sums are 0), matching their contribution.
        return loss, values.detach().sum(0)


class BCELoss(_CompoundLoss):
    """Masked binary cross-entropy with logits, one sigmoid per class.

    BCE_c = mean over annotated voxels of  w_c t softplus(-x) + (1 - t) softplus(x)
    (= -w_c t log p - (1-t) log(1-p), p = sigmoid(x)); loss = mean of BCE_c over the classes present.
    `pos_weight` w_c: a float, a [C] sequence/tensor or a dict class name -> weight (classes missing
    from the dict get 1; needs `classes`), clamped to `max_pos_weight`. Without NaN and pos_weight this
    equals torch's BCEWithLogitsLoss (mean).
    """

    def __init__(self, pos_weight=None, max_pos_weight: float = DEFAULT_MAX_POS_WEIGHT,
                 classes: Sequence[str] | None = None):
        super().__init__(classes=classes, bce_weight=1.0, pos_weight=pos_weight, max_pos_weight=max_pos_weight)


class DiceLoss(_CompoundLoss):
    """Masked soft Dice loss, one sigmoid per class.

    Dice = 1 - (2 TP + smooth) / (sum p + sum t + smooth), sums over annotated voxels (TP = sum p t);
    `batch_dice=True` pools the sums over the batch per class, `False` computes one Dice per (sample,
    class) and averages the (sample, class) pairs that have annotated voxels. Without NaN this equals
    MONAI's DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=batch_dice). It is the
    Tversky loss with alpha = beta = 0.5 and smooth/2.

    A class empty in the whole batch gets only a vanishing gradient (smooth / (sum p)^2): pure Dice does
    not push its false positives down; terms with a per-voxel part (BCE, focal) do.
    """

    def __init__(self, smooth: float = DEFAULT_SMOOTH, batch_dice: bool = True, classes: Sequence[str] | None = None):
        super().__init__(classes=classes, region_weight=1.0, region_smooth=_half(smooth, "smooth"),
                         batch_dice=batch_dice)


class DiceBCELoss(_CompoundLoss):
    """dice_weight * Dice + bce_weight * BCE (see `DiceLoss`, `BCELoss`), no class weights."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = DEFAULT_SMOOTH,
                 batch_dice: bool = True, pos_weight=None, max_pos_weight: float = DEFAULT_MAX_POS_WEIGHT,
                 classes: Sequence[str] | None = None):
        super().__init__(classes=classes, region_weight=dice_weight, region_smooth=_half(smooth, "smooth"),
                         batch_dice=batch_dice, bce_weight=bce_weight, pos_weight=pos_weight,
                         max_pos_weight=max_pos_weight)


class FocalLoss(_CompoundLoss):
    """Masked sigmoid focal loss.

    FL = a_t (1 - p_t)^gamma BCE(x, t) averaged over annotated voxels per class, then over the classes
    present; p_t = p if t = 1 else 1 - p, a_t = alpha t + (1 - alpha)(1 - t) with `alpha` the weight of
    positives in [0, 1] (None: no weighting; note alpha < 0.5 down-weights the rare foreground).
    gamma = 0 and alpha None is BCE. Without NaN this equals MONAI's FocalLoss(gamma, alpha,
    use_softmax=False) with its default mean reduction.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, classes: Sequence[str] | None = None):
        super().__init__(classes=classes, focal_weight=1.0, gamma=gamma, focal_alpha=alpha)


class TverskyLoss(_CompoundLoss):
    """Masked Tversky loss: 1 - (TP + smooth) / (TP + alpha FP + beta FN + smooth).

    `alpha` weights false positives (sum p (1 - t)), `beta` false negatives (sum (1 - p) t), as in
    MONAI: alpha > beta favours precision, alpha < beta recall. Sums over annotated voxels; `batch_dice`
    as in `DiceLoss`. Without NaN this equals MONAI's TverskyLoss(sigmoid=True, alpha, beta,
    smooth_nr=smooth, smooth_dr=smooth, batch=batch_dice). Like Dice, it gives a class empty in the
    whole batch only a vanishing gradient.
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, smooth: float = DEFAULT_SMOOTH,
                 batch_dice: bool = True, classes: Sequence[str] | None = None):
        super().__init__(classes=classes, region_weight=1.0, tversky_alpha=alpha, tversky_beta=beta,
                         region_smooth=smooth, batch_dice=batch_dice)


class ComboLoss(_CompoundLoss):
    """dice_weight * Dice + focal_weight * Focal (+ bce_weight * BCE), no class weights.

    Dice as in `DiceLoss`, focal (`gamma`, `alpha` = weight of positives) as in `FocalLoss`, BCE as in
    `BCELoss`; each term averaged over the classes present.
    """

    def __init__(self, dice_weight: float = 1.0, focal_weight: float = 1.0, bce_weight: float = 0.0,
                 gamma: float = 2.0, alpha: float | None = None, smooth: float = DEFAULT_SMOOTH,
                 batch_dice: bool = True, classes: Sequence[str] | None = None):
        super().__init__(classes=classes, region_weight=dice_weight, region_smooth=_half(smooth, "smooth"),
                         batch_dice=batch_dice, bce_weight=bce_weight, focal_weight=focal_weight, gamma=gamma,
                         focal_alpha=alpha)


class PerClassComboLoss(_CompoundLoss):
    """Per-class weighted dice_weight * Dice + bce_weight * BCE (+ focal_weight * Focal): the recommended loss.

    loss = sum_term lambda_term * sum_c w_c L_term,c / sum_c w_c over the classes c present in the batch,
    i.e. the class weights are renormalised so that the weights of the present classes average 1.
    `class_weights`: dict class name -> weight >= 0 (classes it omits get 1; unknown names raise), or
    None for equal weights. Dice as in `DiceLoss`, BCE (`pos_weight`) as in `BCELoss`, focal (`gamma`,
    `alpha`) as in `FocalLoss`.
    """

    def __init__(self, classes: Sequence[str], class_weights: Mapping[str, float] | None = None,
                 dice_weight: float = 1.0, bce_weight: float = 1.0, focal_weight: float = 0.0, gamma: float = 2.0,
                 alpha: float | None = None, pos_weight=None, max_pos_weight: float = DEFAULT_MAX_POS_WEIGHT,
                 smooth: float = DEFAULT_SMOOTH, batch_dice: bool = True):
        super().__init__(classes=classes, class_weights=class_weights, region_weight=dice_weight,
                         region_smooth=_half(smooth, "smooth"), batch_dice=batch_dice, bce_weight=bce_weight,
                         pos_weight=pos_weight, max_pos_weight=max_pos_weight, focal_weight=focal_weight,
                         gamma=gamma, focal_alpha=alpha)


class PerClassTverskyLoss(_CompoundLoss):
    """Per-class weighted Tversky loss: sum_c w_c Tversky_c / sum_c w_c over the classes present.

    Tversky as in `TverskyLoss` (alpha on false positives, beta on false negatives); class weights as
    in `PerClassComboLoss` (renormalised so that the present classes' weights average 1).
    """

    def __init__(self, classes: Sequence[str], class_weights: Mapping[str, float] | None = None,
                 alpha: float = 0.7, beta: float = 0.3, smooth: float = DEFAULT_SMOOTH, batch_dice: bool = True):
        super().__init__(classes=classes, class_weights=class_weights, region_weight=1.0, tversky_alpha=alpha,
                         tversky_beta=beta, region_smooth=smooth, batch_dice=batch_dice)


class BoundaryLoss(_CompoundLoss):
    """Boundary-aware loss: dice_weight * Dice + bce_weight * boundary-weighted BCE.

    BCE_c = sum m BCE / sum m over annotated voxels, with m = 1 + boundary_gain (W - d + 1) / W for
    voxels within Chebyshev distance d <= W = boundary_width of an annotated voxel of the other label,
    else 1. The band comes from max-pool (dilation) morphology on the target at every step, on the
    device, no distance transform; unannotated voxels are neither foreground nor background, so NaN
    regions create no boundary. Dice as in `DiceLoss`; optional class weights as in `PerClassComboLoss`.
    """

    def __init__(self, boundary_width: int = 3, boundary_gain: float = 4.0, dice_weight: float = 1.0,
                 bce_weight: float = 1.0, smooth: float = DEFAULT_SMOOTH, batch_dice: bool = True,
                 classes: Sequence[str] | None = None, class_weights: Mapping[str, float] | None = None):
        super().__init__(classes=classes, class_weights=class_weights, region_weight=dice_weight,
                         region_smooth=_half(smooth, "smooth"), batch_dice=batch_dice, bce_weight=bce_weight,
                         boundary_width=boundary_width, boundary_gain=boundary_gain)
        if self.boundary_width < 1:
            raise ValueError(f"boundary_width must be an integer >= 1 (voxels), got {boundary_width!r}")


def _half(smooth, name: str) -> float:
    """Dice's smooth term as the Tversky formula's: (2TP + s) / (2TP + FP + FN + s) = Tversky(0.5, 0.5, s/2)."""
    if _check_nonnegative(name, smooth) <= 0:
        raise ValueError(f"{name} must be > 0 (it keeps empty classes finite), got {smooth!r}")
    return float(smooth) / 2.0


# ----------------------------------------------------------------------------------------------------
# Named configurations

LOSS_CLASSES: dict[str, type[_CompoundLoss]] = {
    cls.__name__: cls for cls in (BCELoss, DiceLoss, DiceBCELoss, FocalLoss, TverskyLoss, ComboLoss,
                                  PerClassComboLoss, PerClassTverskyLoss, BoundaryLoss)
}

def _resolve_class_weights(spec, classes: Sequence[str], class_frequencies: Mapping[str, float] | None):
    """(weights dict or None, source label) for a class_weights spec."""
    if spec is None:
        return None, None
    if isinstance(spec, Mapping):
        return {name: float(value) for name, value in spec.items()}, "explicit"
    if spec == "seed":
        missing = [name for name in classes if name not in SEED_CLASS_WEIGHTS]
        if missing:
            raise ValueError(f"the seed class-weight table has no weight for {missing}")
        return {name: SEED_CLASS_WEIGHTS[name] for name in classes}, "seed"
    if spec in FREQUENCY_SCHEMES:
        if class_frequencies is None:
            raise ValueError(f"class_weights={spec!r} needs class_frequencies (positive fraction of annotated "
                             f"voxels per class in the training data)")
        missing = [name for name in classes if name not in class_frequencies]
        if missing:
            raise ValueError(f"class_frequencies has no frequency for {missing}")
        return class_weights_from_frequencies({name: class_frequencies[name] for name in classes}, spec), spec
    raise ValueError(f"class_weights must be 'seed', one of {list(FREQUENCY_SCHEMES)}, a dict or None; got {spec!r}")


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def describe_loss(name: str, classes: Sequence[str], class_frequencies: Mapping[str, float] | None = None,
                  **overrides) -> dict[str, Any]:
    """The resolved, JSON-serialisable configuration of a named loss (logged as `loss_config`).

    Returns {"name", "loss" (class name), "class_weights_source" ("seed", a frequency scheme,
    "explicit" or None), "kwargs" (every constructor argument, defaults filled in, class weights as a
    dict)}. `build_loss` builds exactly this.
    """
    if name not in LOSS_CONFIGS:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSS_CONFIGS)}")
    config = dict(LOSS_CONFIGS[name])
    loss_cls = LOSS_CLASSES[config.pop("loss")]
    parameters = inspect.signature(loss_cls).parameters
    settable = [p for p in parameters if p != "classes"]
    unknown = [key for key in overrides if key not in settable]
    if unknown:
        raise ValueError(f"unknown override {unknown[0]!r} for loss {name!r} ({loss_cls.__name__}); "
                         f"valid: {settable}")
    kwargs = {p: parameters[p].default for p in settable if parameters[p].default is not inspect.Parameter.empty}
    kwargs.update(config)
    kwargs.update(overrides)
    kwargs["classes"] = list(classes)
    source = None
    if "class_weights" in parameters:
        kwargs["class_weights"], source = _resolve_class_weights(kwargs.get("class_weights"), classes,
                                                                 class_frequencies)
    return {"name": name, "loss": loss_cls.__name__, "class_weights_source": source, "kwargs": _jsonable(kwargs)}


def build_loss(name: str, classes: Sequence[str], class_frequencies: Mapping[str, float] | None = None,
               **overrides) -> nn.Module:
    """Build the named loss of `LOSS_CONFIGS` for `classes` (channel order), with keyword overrides.

    `class_weights` (in the config or as an override) may be "seed" (`SEED_CLASS_WEIGHTS`), "inverse",
    "sqrt_inverse" or "log_inverse" (from `class_frequencies`, see `class_weights_from_frequencies`), a
    dict class name -> weight, or None.
    """
    description = describe_loss(name, classes, class_frequencies, **overrides)
    return LOSS_CLASSES[description["loss"]](**description["kwargs"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="List the named loss configurations.")
    parser.add_argument("--names", action="store_true", help="print only the names, one per line")
    args = parser.parse_args(argv)
    for name, config in LOSS_CONFIGS.items():
        print(name if args.names else f"{name:30s} {json.dumps(config)}")


if __name__ == "__main__":
    main()
