"""The numerical kernels behind losses.py: per-(sample, class) sums over annotated voxels with hand-written
backward passes, for the region (Dice/Tversky), BCE and focal terms, and the boundary band weights.

With p = sigmoid(x) set to 0 on unannotated voxels and t the target (0 there), every loss in losses.py is a
small formula on these [B, C] sums. Everything runs in float32 (fp16 sums overflow past 65504), vectorised
over the class axis, with masks applied by multiplication, few full-size temporaries and no host syncs.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class Batch(NamedTuple):
    """A batch flattened to [B, C, N] in float32, with unannotated voxels made inert."""
    logits: torch.Tensor        # [B, C, N]
    target: torch.Tensor        # [B, C, N], 0 at unannotated voxels
    valid: torch.Tensor         # [B, C, N], 1.0 annotated / 0.0 unannotated
    count: torch.Tensor         # [B, C] annotated voxels
    class_count: torch.Tensor   # [C] annotated voxels in the batch
    target_sum: torch.Tensor    # [B, C] sum of the target over annotated voxels
    spatial_shape: tuple[int, ...]


def flatten_batch(logits: torch.Tensor, target: torch.Tensor) -> Batch:
    batch, channels = logits.shape[:2]
    flat_target = target.float().reshape(batch, channels, -1)
    annotated = ~torch.isnan(flat_target)
    valid = annotated.float()
    clean_target = torch.nan_to_num(flat_target, nan=0.0)
    count = valid.sum(-1)
    return Batch(
        logits=logits.float().reshape(batch, channels, -1),
        target=clean_target,
        valid=valid,
        count=count,
        class_count=count.sum(0),
        target_sum=clean_target.sum(-1),
        spatial_shape=tuple(logits.shape[2:]),
    )


class _MaskedClassSums(torch.autograd.Function):
    """Per (sample, class) sums over annotated voxels, with the gradient w.r.t. the logits by hand.

    With p = sigmoid(x) set to 0 on unannotated voxels, t the target (0 there), m a voxel weight
    (the annotation mask, or a boundary weight that is 0 on unannotated voxels) and w the positive weight:
      prob_sum = sum p,  overlap = sum p t,
      bce_sum  = sum m [ w t softplus(-x) + (1 - t) softplus(x) ]     (0 unless with_bce)
    each [B, C]. Backward: d/dx = p(1-p)(g_prob + g_overlap t) + g_bce m [ p (1 + (w-1) t) - w t ], which is
    0 on unannotated voxels because p and t are 0 there. Computed in place on one full-size buffer.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, pos_weight, voxel_weight, with_bce):
        prob = torch.sigmoid(logits).mul_(valid)
        if not with_bce:
            bce_sum = logits.new_zeros(logits.shape[:2])
        else:
            # softplus(x) (1 + (w-1) t) - w x t is the BCE-with-logits for targets in [0, 1].
            bce = F.softplus(logits)
            positive_target = target if pos_weight is None else target * pos_weight
            if pos_weight is not None:
                bce.addcmul_(bce, positive_target - target)
            bce.addcmul_(logits, positive_target, value=-1.0)
            bce_sum = bce.mul_(valid if voxel_weight is None else voxel_weight).sum(-1)
        ctx.with_bce = with_bce
        ctx.save_for_backward(prob, target, pos_weight, voxel_weight)
        return prob.sum(-1), torch.einsum("bcn,bcn->bc", prob, target), bce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_prob, grad_overlap, grad_bce):
        prob, target, pos_weight, voxel_weight = ctx.saved_tensors
        grad_prob, grad_overlap, grad_bce = grad_prob[..., None], grad_overlap[..., None], grad_bce[..., None]
        grad = torch.addcmul(grad_prob, grad_overlap, target)
        grad.addcmul_(grad, prob, value=-1.0)  # (g_prob + g_overlap t)(1 - p)
        if ctx.with_bce:
            grad_positive = grad_bce if pos_weight is None else grad_bce * pos_weight
            if voxel_weight is None:
                grad.add_(grad_bce)
                if pos_weight is not None:
                    grad.addcmul_(target, grad_positive - grad_bce)
                grad.mul_(prob)
                grad.addcmul_(target, grad_positive, value=-1.0)
            else:
                weighted = torch.addcmul(grad_bce, target, grad_positive - grad_bce).mul_(voxel_weight)
                grad.add_(weighted).mul_(prob)
                grad.addcmul_(torch.mul(target, voxel_weight, out=weighted), grad_positive, value=-1.0)
        else:
            grad.mul_(prob)
        return grad, None, None, None, None, None


def masked_class_sums(batch: Batch, pos_weight: torch.Tensor | None, voxel_weight: torch.Tensor | None,
                       with_bce: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum p, sum p t, sum m bce (0 unless with_bce)), each [B, C]; see `_MaskedClassSums`."""
    if pos_weight is not None:
        channels = batch.logits.shape[1]
        if pos_weight.numel() not in (1, channels):
            raise ValueError(f"pos_weight has {pos_weight.numel()} values but logits have {channels} classes")
        pos_weight = pos_weight.view(1, -1, 1)
    return _MaskedClassSums.apply(batch.logits, batch.target, batch.valid, pos_weight, voxel_weight, with_bce)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (numerators are 0 there), finite gradients."""
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def tversky(prob_sum, overlap, target_sum, alpha: float, beta: float, smooth: float) -> torch.Tensor:
    """Tversky loss from sums over annotated voxels, elementwise:

    TP = sum p t, FP = sum p (1-t) = sum p - TP, FN = sum (1-p) t = sum t - TP,
    loss = 1 - (TP + smooth) / (TP + alpha FP + beta FN + smooth).
    """
    false_pos = prob_sum - overlap
    false_neg = target_sum - overlap
    return 1.0 - (overlap + smooth) / (overlap + alpha * false_pos + beta * false_neg + smooth)


class _FocalSums(torch.autograd.Function):
    """Per (sample, class) sum of the sigmoid focal loss over annotated voxels, [B, C], backward by hand.

    FL = a_t q^gamma BCE with q = 1 - p_t = sigmoid(x (1 - 2t)) (also for soft targets),
    BCE = softplus(x) - x t, and the target-only factor a_t v (v the annotation mask) given as
    `voxel_factor`. d FL / dx = a_t v q^gamma [gamma (1 - q)(1 - 2t) BCE + sigmoid(x) - t], which keeps
    gamma < 1 finite where q -> 0.
    """

    @staticmethod
    def forward(ctx, logits, target, voxel_factor, gamma):
        bce = F.softplus(logits).addcmul_(logits, target, value=-1.0)
        not_p_t = torch.addcmul(logits, logits, target, value=-2.0).sigmoid_()
        voxel_weight = not_p_t.pow(gamma).mul_(voxel_factor)
        ctx.gamma = gamma
        ctx.save_for_backward(logits, target, bce, not_p_t, voxel_weight)
        return torch.einsum("bcn,bcn->bc", bce, voxel_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums):
        logits, target, bce, not_p_t, voxel_weight = ctx.saved_tensors
        grad = torch.rsub(not_p_t, 1.0)
        grad.addcmul_(grad, target, value=-2.0).mul_(bce).mul_(ctx.gamma)
        grad.add_(torch.sigmoid(logits)).sub_(target)
        grad.mul_(voxel_weight).mul_(grad_sums.unsqueeze(-1))
        return grad, None, None, None


def focal_sums(batch: Batch, gamma: float, alpha: float | None) -> torch.Tensor:
    """Per (sample, class) focal-loss sums [B, C]; a_t = alpha t + (1 - alpha)(1 - t) (alpha weights
    positives; None: a_t = 1)."""
    voxel_factor = batch.valid
    if alpha is not None:
        voxel_factor = batch.valid * ((1.0 - alpha) + (2.0 * alpha - 1.0) * batch.target)
    return _FocalSums.apply(batch.logits, batch.target, voxel_factor, gamma)


def _dilate(mask: torch.Tensor, spatial_dims: Sequence[int]) -> torch.Tensor:
    """Binary dilation by one voxel in every spatial direction (a 3x3(x3) max-pool, done separably)."""
    for dim in spatial_dims:
        size = mask.shape[dim]
        if size < 2:
            continue
        grown = mask.clone()
        grown.narrow(dim, 1, size - 1).logical_or_(mask.narrow(dim, 0, size - 1))
        grown.narrow(dim, 0, size - 1).logical_or_(mask.narrow(dim, 1, size - 1))
        mask = grown
    return mask


def boundary_weights(batch: Batch, width: int, gain: float) -> torch.Tensor:
    """Per-voxel weight 1 + gain (width - d + 1) / width within Chebyshev distance d <= width of the
    other label, 1 farther away, 0 on unannotated voxels; [B, C, N].

    Foreground and background are annotated voxels with t >= 0.5 and t < 0.5; unannotated voxels belong
    to neither, so NaN regions and the patch edge never create a boundary.
    """
    shape = (2, *batch.target.shape[:2], *batch.spatial_shape)
    foreground = batch.target >= 0.5
    background = (batch.valid > 0) & ~foreground
    near = torch.stack((foreground, background)).reshape(shape)
    spatial_dims = range(3, len(shape))
    closeness = torch.zeros(shape[1:], dtype=torch.uint8, device=near.device)
    for _ in range(width):  # radius by radius: ring d is counted width - d + 1 times
        near = _dilate(near, spatial_dims)
        closeness += near[0] & near[1]
    weight = closeness.reshape(batch.target.shape).float().mul_(gain / width).add_(1.0)
    return weight.mul_(batch.valid)
