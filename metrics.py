"""Validation metrics from pooled confusion counts (nnU-Net style), and their report and table.

`ConfusionCounter` accumulates, per class, TP/FP/FN/TN over the annotated voxels (target not NaN) of the whole
validation set, on the model's device and without host synchronisation; `all_reduce` sums the counts over
DDP ranks; `compute` turns the pooled counts into a JSON-serialisable report. Metrics are computed once from
the pooled counts, never averaged over batches, tiles or ranks:

    Dice = 2TP / (2TP + FP + FN)      IoU = TP / (TP + FP + FN)
    precision = TP / (TP + FP)        recall = TP / (TP + FN)

A voxel is predicted positive when sigmoid(logit) >= threshold (probabilities in float32), and is positive in
truth when its target is > 0.5. Per class:
- "absent": no annotated validation voxel. Every metric is None and the class is left out of the means.
- "empty_agree": annotated, but TP + FP + FN == 0 (empty in truth and prediction). Dice = IoU = 1 (the
  challenge's convention); precision and recall are None (0/0).
- "scored": everything else. Precision is None when TP + FP == 0, recall None when TP + FN == 0.
mean_dice / mean_iou = unweighted (macro) mean over the non-absent classes; None when all are absent.

The threshold sweep reports, per class, the threshold in `sweep_thresholds` with the highest Dice. It is
tuned on the validation set itself, so it is optimistic. Ties go to the threshold closest to the default.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_THRESHOLD = 0.5
DEFAULT_SWEEP = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05, 0.10, ..., 0.95
MEAN_DEFINITION = ("macro mean over classes with annotated validation voxels, Dice from counts pooled over all "
                   "validation voxels and ranks: Dice = 2TP/(2TP+FP+FN), IoU = TP/(TP+FP+FN); a class annotated "
                   "but empty in truth and prediction scores 1")
SWEEP_NOTE = "thresholds tuned on the validation set (optimistic)"
STATUSES = ("absent", "empty_agree", "scored")


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """2TP/(2TP+FP+FN); 1.0 when TP+FP+FN == 0 (empty in truth and prediction)."""
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 1.0


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """TP/(TP+FP+FN); 1.0 when TP+FP+FN == 0 (empty in truth and prediction)."""
    denominator = tp + fp + fn
    return tp / denominator if denominator else 1.0


def class_metrics(tp: int, fp: int, fn: int, tn: int) -> dict:
    """One class's report entry from its pooled counts (Python ints)."""
    annotated = tp + fp + fn + tn
    if annotated == 0:
        status = "absent"
    elif tp + fp + fn == 0:
        status = "empty_agree"
    else:
        status = "scored"
    scored = status != "absent"
    return {
        "dice": dice_from_counts(tp, fp, fn) if scored else None,
        "iou": iou_from_counts(tp, fp, fn) if scored else None,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "annotated_voxels": annotated,
        "positive_voxels": tp + fn,
        "status": status,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class ConfusionCounter:
    """Per-class TP/FP/FN/TN pooled over every update (and, after `all_reduce`, every rank)."""

    def __init__(self, num_classes: int, device, threshold: float = DEFAULT_THRESHOLD,
                 sweep_thresholds=DEFAULT_SWEEP):
        if num_classes < 1:
            raise ValueError(f"num_classes {num_classes} must be >= 1")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold {threshold} must lie strictly between 0 and 1")
        sweep = tuple(float(t) for t in sweep_thresholds)
        if not sweep or any(not 0.0 < t < 1.0 for t in sweep) or list(sweep) != sorted(set(sweep)):
            raise ValueError(f"sweep_thresholds {sweep} must be strictly increasing values strictly between 0 and 1")
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.threshold = float(threshold)
        self.sweep_thresholds = sweep
        self._sweep_bounds = torch.tensor(sweep, dtype=torch.float32, device=self.device)
        self.reset()

    @property
    def _bins(self) -> int:
        # Bin b holds probabilities p with sweep[b-1] <= p < sweep[b]: b = number of sweep thresholds <= p.
        return len(self.sweep_thresholds) + 1

    def reset(self) -> None:
        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=self.device)

        self.tp, self.fp, self.fn, self.tn = (zeros(self.num_classes) for _ in range(4))
        # [negative/positive truth, class, probability bin] histogram for the threshold sweep.
        self.sweep_histogram = zeros(2, self.num_classes, self._bins)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: logits [B,C,...] (any float dtype), target [B,C,...] 0/1 with NaN = unannotated."""
        self.update_probabilities(torch.sigmoid(logits.to(self.device).float()), target)

    @torch.no_grad()
    def update_probabilities(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of probabilities [B,C,...] (e.g. blended sliding-window predictions, which have no
        logits), target as in `update`."""
        if probs.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(probs.shape)} != target shape {tuple(target.shape)}")
        if probs.ndim < 3 or probs.shape[1] != self.num_classes:
            raise ValueError(f"prediction shape {tuple(probs.shape)} must be [B, {self.num_classes}, *spatial]")
        probs = probs.to(self.device).float()
        target = target.to(self.device)
        valid = ~torch.isnan(target)
        positive = target > 0.5  # NaN compares False, so positive implies valid
        negative = valid & ~positive
        predicted = probs >= self.threshold
        sum_dims = (0, *range(2, probs.ndim))
        self.tp += (predicted & positive).sum(sum_dims)
        self.fp += (predicted & negative).sum(sum_dims)
        self.fn += (~predicted & positive).sum(sum_dims)
        self.tn += (~predicted & negative).sum(sum_dims)

        # One scatter_add over a flat [truth, class, bin] index; unannotated voxels go to a discarded extra
        # bin, so no boolean indexing (which would need the host to learn the output size).
        bins, classes = self._bins, self.num_classes
        class_offset = torch.arange(classes, device=self.device).view(1, classes, *([1] * (probs.ndim - 2)))
        # bucketize copies a non-contiguous input anyway (3D tiles arrive permuted); say so, without its warning
        index = torch.bucketize(probs.contiguous(), self._sweep_bounds, right=True) + class_offset * bins
        index += positive.long() * (classes * bins)
        discard = 2 * classes * bins
        index = torch.where(valid, index, discard).flatten()
        flat = torch.zeros(discard + 1, dtype=torch.int64, device=self.device)
        flat.scatter_add_(0, index, torch.ones(1, dtype=torch.int64, device=self.device).expand_as(index))
        self.sweep_histogram += flat[:discard].view(2, classes, bins)

    def _packed(self) -> torch.Tensor:
        return torch.cat([self.tp, self.fp, self.fn, self.tn, self.sweep_histogram.flatten()])

    def _unpack(self, packed: torch.Tensor) -> None:
        c = self.num_classes
        self.tp, self.fp, self.fn, self.tn = (packed[i * c:(i + 1) * c].clone() for i in range(4))
        self.sweep_histogram = packed[4 * c:].clone().view(2, c, self._bins)

    def all_reduce(self) -> None:
        """Sum every count over the ranks of the default process group (no-op without one)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        packed = self._packed()
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        self._unpack(packed)

    def _check_compatible(self, num_classes: int, threshold: float, sweep_thresholds) -> None:
        mine = (self.num_classes, self.threshold, self.sweep_thresholds)
        theirs = (num_classes, float(threshold), tuple(float(t) for t in sweep_thresholds))
        if mine != theirs:
            raise ValueError(f"incompatible counters: (num_classes, threshold, sweep) {theirs} != {mine}")

    def merge(self, other: ConfusionCounter) -> None:
        """Add another counter's counts (same classes and thresholds) to this one."""
        self._check_compatible(other.num_classes, other.threshold, other.sweep_thresholds)
        self._unpack(self._packed() + other._packed().to(self.device))

    def state_dict(self) -> dict:
        return {"num_classes": self.num_classes, "threshold": self.threshold,
                "sweep_thresholds": list(self.sweep_thresholds), "counts": self._packed().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self._check_compatible(state["num_classes"], state["threshold"], state["sweep_thresholds"])
        self._unpack(state["counts"].to(self.device, torch.int64))

    def compute(self, class_names) -> dict:
        """The metrics report (see the module docstring) from the pooled counts; one host transfer."""
        class_names = list(class_names)
        if len(class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {self.num_classes} classes")
        tp, fp, fn, tn = (t.tolist() for t in torch.stack([self.tp, self.fp, self.fn, self.tn]).cpu())
        # Voxels predicted positive at sweep threshold k are those in bins > k: reverse cumulative sums.
        at_or_above = self.sweep_histogram.flip(-1).cumsum(-1).flip(-1)[..., 1:].cpu()
        sweep_fp, sweep_tp = at_or_above.tolist()

        per_class, sweep = {}, {}
        for c, name in enumerate(class_names):
            metrics = class_metrics(tp[c], fp[c], fn[c], tn[c])
            per_class[name] = metrics
            sweep[name] = self._best_threshold(sweep_tp[c], sweep_fp[c], metrics)

        scored = [m for m in per_class.values() if m["status"] != "absent"]
        return {
            "per_class": per_class,
            "mean_dice": _mean([m["dice"] for m in scored]),
            "mean_iou": _mean([m["iou"] for m in scored]),
            "mean_definition": MEAN_DEFINITION,
            "absent_classes": [name for name, m in per_class.items() if m["status"] == "absent"],
            "threshold": self.threshold,
            "threshold_sweep": sweep,
            "sweep_note": SWEEP_NOTE,
        }

    def sweep_counts(self) -> list[dict[float, tuple[int, int, int]]]:
        """Per class, {sweep threshold: (TP, FP, FN)} of the pooled counts (to tune thresholds elsewhere)."""
        at_or_above = self.sweep_histogram.flip(-1).cumsum(-1).flip(-1)[..., 1:].cpu()
        fp_at, tp_at = at_or_above.tolist()
        positives = (self.tp + self.fn).tolist()
        return [{t: (tp, fp, positives[c] - tp) for t, tp, fp in zip(self.sweep_thresholds, tp_at[c], fp_at[c])}
                for c in range(self.num_classes)]

    def _best_threshold(self, tp_at: list[int], fp_at: list[int], metrics: dict) -> dict:
        if metrics["status"] == "absent":
            return {"best_threshold": None, "best_dice": None, "dice_at_default": None}
        positives = metrics["positive_voxels"]
        dice_at = [dice_from_counts(tp, fp, positives - tp) for tp, fp in zip(tp_at, fp_at)]
        best = max(range(len(dice_at)),
                   key=lambda k: (dice_at[k], -abs(self.sweep_thresholds[k] - self.threshold)))
        return {"best_threshold": self.sweep_thresholds[best], "best_dice": dice_at[best],
                "dice_at_default": metrics["dice"]}


def _cell(value, width: int, digits: int = 4) -> str:
    text = "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return text.rjust(width)


def format_table(report: dict, class_names) -> str:
    """Fixed-width per-class table of a `compute` report, then the means, their definition and absent classes."""
    missing = [name for name in class_names if name not in report["per_class"]]
    if missing:
        raise ValueError(f"classes {missing} are not in the report (it has {list(report['per_class'])})")
    sweep = report.get("threshold_sweep") or {}
    width = max(len("class"), *(len(name) for name in class_names))
    header = (f"{'class'.ljust(width)} {'dice':>7} {'iou':>7} {'prec':>7} {'recall':>7} {'annotated':>12} "
              f"{'status':>11}" + (f" {'best thr':>8} {'best dice':>9}" if sweep else ""))
    lines = [header, "-" * len(header)]
    for name in class_names:
        m = report["per_class"][name]
        line = (f"{name.ljust(width)} {_cell(m['dice'], 7)} {_cell(m['iou'], 7)} {_cell(m['precision'], 7)} "
                f"{_cell(m['recall'], 7)} {_cell(m['annotated_voxels'], 12)} {m['status']:>11}")
        if sweep:
            tuned = sweep[name]
            line += f" {_cell(tuned['best_threshold'], 8, 2)} {_cell(tuned['best_dice'], 9)}"
        lines.append(line)
    lines.append("-" * len(header))
    threshold = report.get("threshold", DEFAULT_THRESHOLD)
    lines.append(f"mean Dice {_cell(report['mean_dice'], 0)} | mean IoU {_cell(report['mean_iou'], 0)} "
                 f"(threshold {threshold})")
    lines.append(f"mean = {report['mean_definition']}")
    if sweep:
        lines.append(f"best thr / best dice: {report.get('sweep_note', SWEEP_NOTE)}")
    absent = report["absent_classes"]
    lines.append(f"absent classes (no annotated validation voxel, left out of the means): "
                 f"{', '.join(absent) if absent else 'none'}")
    return "\n".join(lines)
