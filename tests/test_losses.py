"""Tests of losses.py: MONAI/torch references, NaN masking, class weights, mixed precision, arguments."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss
from monai.losses import TverskyLoss as MonaiTverskyLoss
from monai.losses.focal_loss import sigmoid_focal_loss
from scipy import ndimage

import losses
from config_shenron import ALL_CLASSES as CLASSES
from losses import (
    LOSS_CONFIGS, SEED_CLASS_WEIGHTS, BCELoss, BoundaryLoss, ComboLoss, DiceBCELoss, DiceLoss, FocalLoss,
    PerClassComboLoss, PerClassTverskyLoss, TverskyLoss, build_loss, class_weights_from_frequencies, describe_loss,
)

TOL = dict(atol=1e-5, rtol=1e-5)
SMOOTH = 1e-5
CLASSES3 = CLASSES[:3]
FREQUENCIES = {name: 0.02 + 0.03 * i for i, name in enumerate(CLASSES)}


def make_batch(shape=(2, 3, 12, 12), nan_fraction=0.0, seed=0, positive_fraction=0.3):
    generator = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(shape, generator=generator)).requires_grad_(True)
    target = (torch.rand(shape, generator=generator) < positive_fraction).float()
    if nan_fraction:
        target[torch.rand(shape, generator=generator) < nan_fraction] = float("nan")
    return logits, target


def named_loss(name, classes=CLASSES3):
    return build_loss(name, classes, class_frequencies=FREQUENCIES)


def value_and_grad(loss_fn, logits, target):
    logits = logits.detach().clone().requires_grad_(True)
    value = loss_fn(logits, target)
    value.backward()
    return value.detach(), logits.grad


def assert_same_value_and_grad(ours, reference, logits, target, **tolerance):
    tolerance = tolerance or TOL
    value, grad = value_and_grad(ours, logits, target)
    ref_value, ref_grad = value_and_grad(reference, logits, target)
    torch.testing.assert_close(value, ref_value.float(), **tolerance)
    torch.testing.assert_close(grad, ref_grad, **tolerance)


# ---------------------------------------------------------------------------------------------------
# References without NaN: MONAI and torch


@pytest.mark.parametrize("batch_dice", [True, False])
def test_dice_matches_monai(batch_dice):
    logits, target = make_batch()
    monai = MonaiDiceLoss(sigmoid=True, smooth_nr=SMOOTH, smooth_dr=SMOOTH, batch=batch_dice)
    assert_same_value_and_grad(DiceLoss(smooth=SMOOTH, batch_dice=batch_dice), monai, logits, target)


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("alpha,beta", [(0.7, 0.3), (0.3, 0.7), (0.5, 0.5), (1.0, 0.0)])
def test_tversky_matches_monai(alpha, beta, batch_dice):
    logits, target = make_batch(seed=1)
    monai = MonaiTverskyLoss(sigmoid=True, alpha=alpha, beta=beta, smooth_nr=SMOOTH, smooth_dr=SMOOTH, batch=batch_dice)
    ours = TverskyLoss(alpha=alpha, beta=beta, smooth=SMOOTH, batch_dice=batch_dice)
    assert_same_value_and_grad(ours, monai, logits, target)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25, 0.75])
def test_focal_matches_monai(gamma, alpha):
    # MONAI 1.6 sigmoid focal: a_t (1-p_t)^gamma BCE with a_t = alpha t + (1-alpha)(1-t), mean over all elements.
    logits, target = make_batch(seed=2)
    monai = MonaiFocalLoss(gamma=gamma, alpha=alpha, use_softmax=False)
    assert_same_value_and_grad(FocalLoss(gamma=gamma, alpha=alpha), monai, logits, target)


def test_focal_without_focusing_is_bce():
    logits, target = make_batch(seed=3)
    assert_same_value_and_grad(FocalLoss(gamma=0.0, alpha=None), F.binary_cross_entropy_with_logits, logits, target)


def test_bce_matches_torch_with_and_without_pos_weight():
    logits, target = make_batch(seed=4)
    assert_same_value_and_grad(BCELoss(), F.binary_cross_entropy_with_logits, logits, target)
    per_class = torch.tensor([0.5, 2.0, 7.0])
    torch_weighted = lambda x, t: F.binary_cross_entropy_with_logits(x, t, pos_weight=per_class.view(3, 1, 1))
    assert_same_value_and_grad(BCELoss(pos_weight=per_class), torch_weighted, logits, target)
    as_dict = BCELoss(pos_weight={"ecs": 0.5, "pm": 2.0, "mito_mem": 7.0}, classes=CLASSES3)
    assert_same_value_and_grad(as_dict, torch_weighted, logits, target)
    # pos_weight is clamped to max_pos_weight
    assert_same_value_and_grad(BCELoss(pos_weight=100.0, max_pos_weight=3.0), BCELoss(pos_weight=3.0), logits, target)


def test_tversky_half_half_is_dice():
    logits, target = make_batch(seed=5)
    # Exact identity: Dice(smooth=s) = Tversky(0.5, 0.5, smooth=s/2); with a tiny shared smooth they agree too.
    assert_same_value_and_grad(TverskyLoss(0.5, 0.5, smooth=0.5), DiceLoss(smooth=1.0), logits, target)
    assert_same_value_and_grad(TverskyLoss(0.5, 0.5, smooth=SMOOTH), DiceLoss(smooth=SMOOTH), logits, target)


def test_compound_losses_are_sums_of_their_terms():
    logits, target = make_batch(seed=6, nan_fraction=0.2)
    dice, bce, focal = DiceLoss()(logits, target), BCELoss()(logits, target), FocalLoss(gamma=2.0)(logits, target)
    torch.testing.assert_close(DiceBCELoss(dice_weight=0.3, bce_weight=2.0)(logits, target), 0.3 * dice + 2.0 * bce)
    combo = ComboLoss(focal_weight=0.5, bce_weight=0.25)(logits, target)
    torch.testing.assert_close(combo, dice + 0.5 * focal + 0.25 * bce)
    combo_focal = PerClassComboLoss(CLASSES3, bce_weight=0.0, focal_weight=1.0)(logits, target)
    torch.testing.assert_close(combo_focal, dice + focal)


# ---------------------------------------------------------------------------------------------------
# Masked reference: per class, boolean indexing, MONAI/torch on the annotated voxels only


def reference_masked(logits, target, *, weights=None, dice=1.0, bce=1.0, focal=0.0, gamma=2.0, focal_alpha=None,
                     tversky=(0.5, 0.5), smooth=SMOOTH, dice_smooth=True, batch_dice=True, voxel_weight=None,
                     pos_weight=None):
    """Per-class loop with boolean indexing; a class with no annotated voxel is skipped, weights renormalised."""
    alpha, beta = tversky
    region_smooth = smooth / 2 if dice_smooth else smooth
    region = MonaiTverskyLoss(sigmoid=True, alpha=alpha, beta=beta, smooth_nr=region_smooth, smooth_dr=region_smooth)
    region_num, region_den, voxel_num, voxel_den = 0.0, 0.0, 0.0, 0.0
    for c in range(logits.shape[1]):
        valid = ~torch.isnan(target[:, c])
        if not valid.any():
            continue
        w = 1.0 if weights is None else float(weights[c])
        x, t = logits[:, c][valid], target[:, c][valid]
        if batch_dice:
            region_num = region_num + w * region(x.view(1, 1, -1), t.view(1, 1, -1))
            region_den += w
        else:
            for b in range(logits.shape[0]):
                vb = valid[b]
                if vb.any():
                    xb, tb = logits[b, c][vb], target[b, c][vb]
                    region_num = region_num + w * region(xb.view(1, 1, -1), tb.view(1, 1, -1))
                    region_den += w
        m = torch.ones_like(t) if voxel_weight is None else voxel_weight[:, c][valid]
        positive = None if pos_weight is None else torch.tensor(float(pos_weight[c]))
        voxel_bce = F.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=positive)
        term = bce * (m * voxel_bce).sum() / m.sum()
        term = term + focal * sigmoid_focal_loss(x, t, gamma, focal_alpha).mean()
        voxel_num = voxel_num + w * term
        voxel_den += w
    return dice * region_num / region_den + voxel_num / voxel_den


@pytest.mark.parametrize("batch_dice", [True, False])
def test_per_class_combo_matches_masked_reference(batch_dice):
    logits, target = make_batch(shape=(3, 4, 10, 10), nan_fraction=0.3, seed=7)
    target[:, 2] = float("nan")      # a class absent from the batch
    target[1, 0] = float("nan")      # a class absent from one sample
    classes = CLASSES[:4]
    weights = {"ecs": 2.0, "pm": 0.5, "mito_mem": 9.0, "mito_lum": 1.5}
    ours = PerClassComboLoss(classes, class_weights=weights, batch_dice=batch_dice, focal_weight=0.7, gamma=2.0,
                             alpha=0.6, pos_weight={"pm": 3.0, "mito_lum": 0.5})
    reference = lambda x, t: reference_masked(x, t, weights=list(weights.values()), batch_dice=batch_dice,
                                              focal=0.7, focal_alpha=0.6, pos_weight=[1.0, 3.0, 1.0, 0.5])
    assert_same_value_and_grad(ours, reference, logits, target)


def test_per_class_tversky_matches_masked_reference():
    logits, target = make_batch(shape=(2, 3, 10, 10), nan_fraction=0.3, seed=8)
    weights = {"ecs": 3.0, "mito_mem": 0.25}
    ours = PerClassTverskyLoss(CLASSES3, class_weights=weights, alpha=0.7, beta=0.3)
    reference = lambda x, t: reference_masked(x, t, weights=[3.0, 1.0, 0.25], bce=0.0, tversky=(0.7, 0.3),
                                              dice_smooth=False)
    assert_same_value_and_grad(ours, reference, logits, target)


def scipy_boundary_weights(target, width, gain):
    """1 + gain (W - d + 1)/W with d the chessboard distance to the nearest annotated voxel of the other label."""
    weights = np.zeros(target.shape, dtype=np.float32)
    for index in np.ndindex(*target.shape[:2]):
        t = target[index].numpy()
        valid = ~np.isnan(t)
        foreground, background = valid & (t >= 0.5), valid & (t < 0.5)
        distance = np.full(t.shape, np.inf)
        for own, other in ((foreground, background), (background, foreground)):
            if other.any():
                distance[own] = ndimage.distance_transform_cdt(~other, metric="chessboard")[own]
        closeness = np.where(distance <= width, width - distance + 1, 0.0)
        weights[index] = np.where(valid, 1.0 + gain * closeness / width, 0.0)
    return torch.from_numpy(weights)


@pytest.mark.parametrize("shape,width", [((2, 3, 14, 14), 3), ((2, 2, 6, 9, 9), 1)])
def test_boundary_loss_matches_distance_transform_reference(shape, width):
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(shape, generator=generator)
    # Blobby labels (a smoothed field thresholded) so that bands have interior and exterior.
    smooth = F.avg_pool2d if len(shape) == 4 else F.avg_pool3d
    field = smooth(torch.rand((shape[0] * shape[1], 1, *shape[2:]), generator=generator), 3, 1, 1)
    target = (field.reshape(shape) > 0.5).float()
    target[torch.rand(shape, generator=generator) < 0.15] = float("nan")
    target[0, 0, ..., :3] = float("nan")  # an unannotated slab must not create a boundary
    voxel_weight = scipy_boundary_weights(target, width=width, gain=4.0)
    assert (voxel_weight > 1).any() and (voxel_weight == 1).any()
    reference = lambda x, t: reference_masked(x, t, voxel_weight=voxel_weight)
    assert_same_value_and_grad(BoundaryLoss(boundary_width=width, boundary_gain=4.0), reference, logits, target)


# ---------------------------------------------------------------------------------------------------
# Behaviour of every named configuration


def test_loss_configs_cover_the_named_configurations():
    expected = {"baseline_bce", "dice", "dice_bce", "focal", "tversky_precision", "tversky_recall", "combo",
                "per_class_weighted", "per_class_weighted_focal", "per_class_tversky_precision", "boundary",
                "per_class_weighted_freq"}
    assert expected <= set(LOSS_CONFIGS)
    assert describe_loss("tversky_precision", CLASSES3)["kwargs"]["alpha"] == 0.7
    assert describe_loss("tversky_recall", CLASSES3)["kwargs"]["beta"] == 0.7
    assert describe_loss("per_class_weighted", CLASSES)["kwargs"]["class_weights"] == SEED_CLASS_WEIGHTS


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_describe_is_json_and_builds_the_same_loss(name):
    description = describe_loss(name, CLASSES3, class_frequencies=FREQUENCIES)
    assert json.loads(json.dumps(description)) == description
    rebuilt = losses.LOSS_CLASSES[description["loss"]](**description["kwargs"])
    logits, target = make_batch(nan_fraction=0.2, seed=10)
    torch.testing.assert_close(rebuilt(logits, target), named_loss(name)(logits, target))


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_perfect_logits_give_zero(name):
    generator = torch.Generator().manual_seed(11)
    target = (torch.rand(2, 3, 16, 16, generator=generator) < 0.4).float()
    logits = (40 * target - 20).requires_grad_(True)
    target[torch.rand(target.shape, generator=generator) < 0.2] = float("nan")
    assert named_loss(name)(logits, target).item() < 1e-4


def test_alpha_penalises_over_segmentation_more():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1.0
    over, under = target.clone(), target.clone()
    over[..., 2:4, 4:12] = 1.0    # 16 false positives
    under[..., 4:6, 4:12] = 0.0   # 16 false negatives
    precision, recall = TverskyLoss(alpha=0.7, beta=0.3), TverskyLoss(alpha=0.3, beta=0.7)
    to_logits = lambda mask: 40 * mask - 20
    assert precision(to_logits(over), target) > precision(to_logits(under), target)
    assert recall(to_logits(over), target) < recall(to_logits(under), target)


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_logits_at_unannotated_voxels_change_nothing(name):
    logits, target = make_batch(nan_fraction=0.3, seed=12)
    unannotated = torch.isnan(target)
    changed = torch.where(unannotated, 1e4 * torch.randn(logits.shape), logits.detach())
    loss = named_loss(name)
    value, grad = value_and_grad(loss, logits, target)
    changed_value, changed_grad = value_and_grad(loss, changed, target)
    assert torch.equal(value, changed_value)
    assert torch.equal(grad, changed_grad)
    assert torch.equal(grad[unannotated], torch.zeros_like(grad[unannotated]))


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
@pytest.mark.parametrize("axis", [-1, -2])
def test_appending_unannotated_voxels_changes_nothing(name, axis):
    logits, target = make_batch(nan_fraction=0.2, seed=13)
    padding_shape = list(target.shape)
    padding_shape[axis] = 5
    padded_logits = torch.cat([logits.detach(), 3 * torch.randn(padding_shape)], dim=axis)
    padded_target = torch.cat([target, torch.full(padding_shape, float("nan"))], dim=axis)
    loss = named_loss(name)
    value, grad = value_and_grad(loss, logits, target)
    padded_value, padded_grad = value_and_grad(loss, padded_logits, padded_target)
    torch.testing.assert_close(padded_value, value, **TOL)
    torch.testing.assert_close(padded_grad.narrow(axis, 0, target.shape[axis]), grad, **TOL)


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_unannotated_class_has_zero_gradient_and_all_nan_batch_is_finite(name):
    logits, target = make_batch(nan_fraction=0.2, seed=14)
    target[:, 1] = float("nan")
    loss = named_loss(name)
    value, grad = value_and_grad(loss, logits, target)
    assert torch.isfinite(value)
    assert torch.equal(grad[:, 1], torch.zeros_like(grad[:, 1]))
    assert grad[:, 0].abs().sum() > 0

    all_nan = torch.full_like(target, float("nan"))
    value, grad = value_and_grad(loss, logits, all_nan)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def _empty_class_case(seed):
    logits, target = make_batch(nan_fraction=0.1, seed=seed)
    target[:, 1] = torch.where(torch.isnan(target[:, 1]), target[:, 1], torch.zeros_like(target[:, 1]))
    logits = logits.detach().clone()
    logits[:, 1] = 3.0  # confidently predicted foreground on a class that is annotated but empty
    return logits, target


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_empty_class_in_one_sample_gets_a_gradient(name):
    logits, target = _empty_class_case(seed=15)
    positives = (torch.rand(12, 12, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    target[1, 1] = torch.where(torch.isnan(target[1, 1]), target[1, 1], positives)
    _, grad = value_and_grad(named_loss(name), logits, target)
    # pushes the false positives of sample 0 down, comparably to an ordinary class's gradient
    assert grad[0, 1].sum() > 0.01 * grad[:, 0].abs().sum()


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_class_empty_in_whole_batch(name):
    logits, target = _empty_class_case(seed=16)
    loss = named_loss(name)
    _, grad = value_and_grad(loss, logits, target)
    _, per_class = loss(logits, target, return_per_class=True)
    if loss.bce_weight > 0 or loss.focal_weight > 0:  # a per-voxel term sees every false positive
        assert grad[:, 1].sum() > 0.01 * grad[:, 0].abs().sum()
    else:
        # Pure Dice/Tversky: the empty class is penalised (loss ~1) but its gradient, smooth / (sum p)^2,
        # is positive yet vanishing (documented in DiceLoss and TverskyLoss).
        assert per_class[1] > 0.99
        assert 0 < grad[:, 1].sum() < 1e-6 * grad[:, 0].abs().sum()


# ---------------------------------------------------------------------------------------------------
# Class weights


def test_zero_class_weight_zeroes_its_gradient_and_ones_equal_unweighted():
    logits, target = make_batch(nan_fraction=0.2, seed=17)
    _, grad = value_and_grad(PerClassComboLoss(CLASSES3, class_weights={"pm": 0.0}), logits, target)
    assert torch.equal(grad[:, 1], torch.zeros_like(grad[:, 1])) and grad[:, 0].abs().sum() > 0
    _, grad = value_and_grad(PerClassTverskyLoss(CLASSES3, class_weights={"ecs": 0.0}), logits, target)
    assert torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))

    ones = {name: 1.0 for name in CLASSES3}
    assert_same_value_and_grad(PerClassComboLoss(CLASSES3, class_weights=ones), DiceBCELoss(), logits, target)
    assert_same_value_and_grad(PerClassComboLoss(CLASSES3, class_weights=ones), PerClassComboLoss(CLASSES3),
                               logits, target)
    assert_same_value_and_grad(PerClassTverskyLoss(CLASSES3, class_weights=ones, alpha=0.3, beta=0.7),
                               TverskyLoss(alpha=0.3, beta=0.7), logits, target)


def test_weights_are_renormalised_over_present_classes():
    logits, target = make_batch(shape=(2, 4, 10, 10), nan_fraction=0.2, seed=18)
    target[:, 2] = float("nan")
    weights = {"ecs": 1.0, "pm": 3.0, "mito_mem": 50.0, "mito_lum": 0.5}
    with_absent = PerClassComboLoss(CLASSES[:4], class_weights=weights)(logits, target)
    keep = [0, 1, 3]
    kept = [CLASSES[i] for i in keep]
    without = PerClassComboLoss(kept, class_weights={name: weights[name] for name in kept})
    torch.testing.assert_close(with_absent, without(logits[:, keep], target[:, keep]))


def test_class_weight_errors():
    with pytest.raises(ValueError, match="class_weights.*nucleus"):
        PerClassComboLoss(CLASSES3, class_weights={"nucleus": 2.0})
    with pytest.raises(ValueError, match="class_weights"):
        PerClassComboLoss(CLASSES3, class_weights={"ecs": -1.0})
    with pytest.raises(ValueError, match="the seed class-weight table has no weight for \\['cell'\\]"):
        build_loss("per_class_weighted", ["ecs", "cell"])
    with pytest.raises(ValueError, match="class_frequencies"):
        build_loss("per_class_weighted_freq", CLASSES3)
    with pytest.raises(ValueError, match="class_frequencies has no frequency for \\['pm'\\]"):
        build_loss("per_class_weighted_freq", CLASSES3, class_frequencies={"ecs": 0.1, "mito_mem": 0.2})
    with pytest.raises(ValueError, match="class_weights must be 'seed'"):
        build_loss("per_class_weighted", CLASSES3, class_weights="uniform")


@pytest.mark.parametrize("scheme", losses.FREQUENCY_SCHEMES)
def test_frequency_weights_favour_rare_classes(scheme):
    frequencies = {"nuc": 0.3, "pm": 0.01, "ecs": 0.05, "mito_ribo": 0.0}
    weights = class_weights_from_frequencies(frequencies, scheme)
    assert weights["mito_ribo"] > weights["pm"] > weights["ecs"] > weights["nuc"] > 0
    assert all(np.isfinite(list(weights.values())))
    assert np.mean(list(weights.values())) == pytest.approx(1.0)
    assert class_weights_from_frequencies({"a": 0.2, "b": 0.2}, scheme) == {"a": 1.0, "b": 1.0}


def test_frequency_weight_formulas_and_errors():
    weights = class_weights_from_frequencies({"a": 0.01, "b": 0.04}, "inverse")
    assert weights["a"] / weights["b"] == pytest.approx(4.0)
    weights = class_weights_from_frequencies({"a": 0.01, "b": 0.04}, "sqrt_inverse")
    assert weights["a"] / weights["b"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="scheme"):
        class_weights_from_frequencies({"a": 0.1}, "median")
    with pytest.raises(ValueError, match="frequencies"):
        class_weights_from_frequencies({"a": 1.5}, "inverse")
    built = build_loss("per_class_weighted_freq", CLASSES3, class_frequencies=FREQUENCIES)
    expected = class_weights_from_frequencies({c: FREQUENCIES[c] for c in CLASSES3}, "sqrt_inverse")
    torch.testing.assert_close(built.class_weight_vector, torch.tensor([expected[c] for c in CLASSES3]))


# ---------------------------------------------------------------------------------------------------
# Precision, shapes, per-class report, arguments


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_half_precision_matches_float32_beyond_fp16_range(name):
    # 2 x 240 x 240 voxels per class, 90% positive and mostly well predicted: per class, sum p, sum t and
    # sum p t all exceed 65504, the float16 maximum.
    noise, target = make_batch(shape=(2, 3, 240, 240), nan_fraction=0.05, seed=19, positive_fraction=0.9)
    logits = (3 * (2 * torch.nan_to_num(target) - 1) + noise.detach()).requires_grad_(True)
    assert (target == 1).sum((0, 2, 3)).min() > 65504
    assert (torch.sigmoid(logits.detach()) * torch.nan_to_num(target)).sum((0, 2, 3)).min() > 65504
    loss = named_loss(name)
    full = loss(logits, target)
    assert torch.isfinite(full)
    half_logits = logits.detach().half().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        under_autocast = loss(half_logits, target)
    under_autocast.backward()
    assert under_autocast.dtype == torch.float32 and torch.isfinite(half_logits.grad).all()
    torch.testing.assert_close(under_autocast, full.detach(), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(loss(half_logits, target), full.detach(), rtol=1e-3, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss(logits.detach().bfloat16(), target)
    torch.testing.assert_close(bf16, full.detach(), rtol=1e-2, atol=1e-6)


def test_finite_for_extreme_logits():
    logits, target = make_batch(nan_fraction=0.2, seed=20)
    extreme = torch.sign(logits.detach()) * 6e4
    for name in LOSS_CONFIGS:
        value, grad = value_and_grad(named_loss(name), extreme, target)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_3d_inputs(name):
    logits, target = make_batch(shape=(2, 3, 4, 8, 8), nan_fraction=0.2, seed=21)
    value, grad = value_and_grad(named_loss(name), logits, target)
    assert torch.isfinite(value) and value > 0 and grad.shape == logits.shape


def test_3d_dice_matches_monai():
    logits, target = make_batch(shape=(2, 3, 4, 8, 8), seed=22)
    monai = MonaiDiceLoss(sigmoid=True, smooth_nr=SMOOTH, smooth_dr=SMOOTH, batch=True)
    assert_same_value_and_grad(DiceLoss(), monai, logits, target)


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_per_class_report(name):
    logits, target = make_batch(nan_fraction=0.2, seed=23)
    target[:, 2] = float("nan")
    loss = named_loss(name)
    value, per_class = loss(logits, target, return_per_class=True)
    assert per_class.shape == (3,) and per_class.dtype == torch.float32 and not per_class.requires_grad
    assert per_class[2] == 0 and (per_class[:2] > 0).all()
    torch.testing.assert_close(value, loss(logits, target))
    if loss.class_weight_vector is None:  # unweighted, pooled: the loss is the mean over present classes
        torch.testing.assert_close(value.detach(), per_class[:2].mean())


@pytest.mark.parametrize("make_loss,argument", [
    (lambda: DiceLoss(smooth=0.0), "smooth"),
    (lambda: DiceLoss(batch_dice="yes"), "batch_dice"),
    (lambda: TverskyLoss(alpha=-0.1), "alpha"),
    (lambda: TverskyLoss(alpha=0.0, beta=0.0), "alpha \\+ beta"),
    (lambda: FocalLoss(gamma=-1.0), "gamma"),
    (lambda: FocalLoss(alpha=1.5), "alpha"),
    (lambda: BCELoss(pos_weight=0.0), "pos_weight"),
    (lambda: BCELoss(pos_weight=[1.0, 2.0], classes=CLASSES3), "pos_weight"),
    (lambda: BCELoss(max_pos_weight=0), "max_pos_weight"),
    (lambda: BoundaryLoss(boundary_width=0), "boundary_width"),
    (lambda: BoundaryLoss(boundary_gain=-1.0), "boundary_gain"),
    (lambda: DiceBCELoss(dice_weight=-1.0), "dice_weight"),
    (lambda: PerClassComboLoss(["ecs", "ecs"]), "classes"),
    (lambda: build_loss("softmax_ce", CLASSES3), "unknown loss 'softmax_ce'; valid: \\['baseline_bce'"),
    (lambda: build_loss("dice", CLASSES3, gama=2.0), "unknown override 'gama'.*valid: \\['smooth', 'batch_dice'\\]"),
    (lambda: build_loss("dice", CLASSES3, class_weights="seed"), "unknown override 'class_weights'"),
])
def test_bad_arguments_name_the_argument(make_loss, argument):
    with pytest.raises(ValueError, match=argument):
        make_loss()


def test_bad_inputs_are_rejected():
    loss = PerClassComboLoss(CLASSES3)
    logits, target = make_batch()
    with pytest.raises(ValueError, match="target shape"):
        loss(logits, target[:, :, :-1])
    with pytest.raises(ValueError, match="classes"):
        loss(logits[:, :2], target[:, :2])
    with pytest.raises(ValueError, match="logits must be"):
        loss(logits[0], target[0])
    with pytest.raises(ValueError, match="pos_weight"):
        BCELoss(pos_weight=[1.0, 2.0])(logits, target)


def test_overrides_reach_the_loss():
    loss = build_loss("per_class_weighted", CLASSES3, dice_weight=0.0, bce_weight=1.0, class_weights=None)
    logits, target = make_batch(nan_fraction=0.2, seed=24)
    torch.testing.assert_close(loss(logits, target), BCELoss()(logits, target))
