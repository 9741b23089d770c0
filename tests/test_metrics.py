"""metrics.py against independent references: sklearn per-class scores, a numpy threshold sweep, and DDP pooling."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn import metrics as skm

from metrics import DEFAULT_SWEEP, ConfusionCounter, dice_from_counts, format_table

CLASSES = ["scored", "truth_empty", "pred_empty", "both_empty", "unannotated", "partly_nan"]


def make_batch(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Logits and NaN-holed targets for CLASSES; shape = (B, *spatial)."""
    b, spatial = shape[0], shape[1:]
    full = (b, len(CLASSES), *spatial)
    target = (rng.random(full) < 0.3).astype(np.float32)
    # Logits that agree with the truth more often than not, so Dice is neither 0 nor 1.
    logits = (rng.normal(size=full) + 1.5 * (2 * target - 1)).astype(np.float32)
    target[:, 1] = 0                   # annotated, no positive voxel; predictions stay random
    logits[:, 2] = -20                 # positives in truth, nothing predicted
    target[:, 3], logits[:, 3] = 0, -20  # empty in truth and prediction
    target[:, 4] = np.nan              # never annotated
    holes = rng.random(full) < 0.25
    holes[:, 1:4] = False
    target[holes] = np.nan
    target[:, 5, : max(1, b // 2)] = np.nan  # whole samples unannotated for one class
    return logits, target


def make_batches(seed: int, shapes) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_batch(rng, shape) for shape in shapes]


def count(batches, device="cpu", **kwargs) -> ConfusionCounter:
    counter = ConfusionCounter(len(CLASSES), device, **kwargs)
    for logits, target in batches:
        counter.update(torch.from_numpy(logits), torch.from_numpy(target))
    return counter


def per_class_voxels(batches):
    """For each class: (truth bool, probability float64) over its annotated voxels of every batch."""
    out = []
    for c in range(len(CLASSES)):
        logits = np.concatenate([lg[:, c].ravel() for lg, _ in batches]).astype(np.float64)
        target = np.concatenate([tg[:, c].ravel() for _, tg in batches])
        valid = ~np.isnan(target)
        out.append((target[valid] > 0.5, 1.0 / (1.0 + np.exp(-logits[valid]))))
    return out


def none_or(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


@pytest.mark.parametrize("shapes", [[(2, 12, 16), (3, 8, 8), (1, 16, 16)], [(2, 4, 8, 8), (1, 6, 8, 8)]],
                         ids=["2d", "3d"])
def test_matches_sklearn_on_pooled_voxels(shapes):
    batches = make_batches(0, shapes)
    report = count(batches).compute(CLASSES)
    reference_dice = []
    for name, (truth, prob) in zip(CLASSES, per_class_voxels(batches)):
        got = report["per_class"][name]
        if truth.size == 0:
            assert got["status"] == "absent"
            assert all(got[k] is None for k in ("dice", "iou", "precision", "recall"))
            continue
        pred = prob >= 0.5
        expected = {
            "dice": skm.f1_score(truth, pred, zero_division=1.0),
            "iou": skm.jaccard_score(truth, pred, zero_division=1.0),
            "precision": none_or(skm.precision_score(truth, pred, zero_division=np.nan)),
            "recall": none_or(skm.recall_score(truth, pred, zero_division=np.nan)),
        }
        tn, fp, fn, tp = skm.confusion_matrix(truth, pred, labels=[False, True]).ravel()
        assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (tp, fp, fn, tn), name
        assert got["annotated_voxels"] == truth.size and got["positive_voxels"] == truth.sum()
        for key, value in expected.items():
            assert got[key] == (None if value is None else pytest.approx(value, abs=1e-12)), (name, key)
        reference_dice.append(expected["dice"])
    per_class = report["per_class"]
    assert per_class["truth_empty"]["dice"] == 0 and per_class["truth_empty"]["recall"] is None
    assert per_class["pred_empty"]["dice"] == 0 and per_class["pred_empty"]["precision"] is None
    assert per_class["both_empty"]["status"] == "empty_agree"
    assert per_class["both_empty"]["dice"] == per_class["both_empty"]["iou"] == 1.0
    assert report["absent_classes"] == ["unannotated"]
    assert report["mean_dice"] == pytest.approx(np.mean(reference_dice), abs=1e-12)
    assert 0 < per_class["scored"]["dice"] < 1


def test_report_is_json_with_null_for_absent_and_null_means_when_all_absent():
    report = count(make_batches(1, [(2, 8, 8)])).compute(CLASSES)
    restored = json.loads(json.dumps(report))
    assert restored == report
    assert restored["per_class"]["unannotated"]["dice"] is None
    assert restored["threshold"] == 0.5 and "optimistic" in restored["sweep_note"]

    logits, target = make_batch(np.random.default_rng(2), (2, 8, 8))
    target[:] = np.nan
    empty = count([(logits, target)]).compute(CLASSES)
    assert empty["mean_dice"] is None and empty["mean_iou"] is None
    assert empty["absent_classes"] == CLASSES


def test_absent_class_excluded_from_mean_and_empty_agree_included():
    report = count(make_batches(3, [(2, 8, 8)])).compute(CLASSES)
    scored = [m["dice"] for m in report["per_class"].values() if m["status"] != "absent"]
    assert len(scored) == len(CLASSES) - 1 and 1.0 in scored
    assert report["mean_dice"] == pytest.approx(sum(scored) / len(scored))
    assert report["mean_iou"] == pytest.approx(
        np.mean([m["iou"] for m in report["per_class"].values() if m["status"] != "absent"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_the_same_counts(dtype):
    batches = make_batches(4, [(2, 16, 16), (1, 16, 16)])
    half = ConfusionCounter(len(CLASSES), "cpu")
    upcast = ConfusionCounter(len(CLASSES), "cpu")
    for logits, target in batches:
        rounded = torch.from_numpy(logits).to(dtype)
        half.update(rounded, torch.from_numpy(target))
        upcast.update(rounded.float(), torch.from_numpy(target))
    assert torch.equal(half.state_dict()["counts"], upcast.state_dict()["counts"])
    assert half.compute(CLASSES) == upcast.compute(CLASSES)


def away_from_thresholds(logits: np.ndarray, thresholds) -> np.ndarray:
    """Nudge logits whose probability lies within float32 rounding of a threshold, so the float64 reference
    and the float32 counter cannot disagree on which side of it they fall."""
    logit_at = np.log(np.array(thresholds) / (1 - np.array(thresholds)))
    near = (np.abs(logits[..., None] - logit_at) < 1e-4).any(-1)
    return np.where(near, logits + 1e-3, logits).astype(np.float32)


def test_threshold_sweep_matches_brute_force():
    batches = [(away_from_thresholds(lg, DEFAULT_SWEEP), tg)
               for lg, tg in make_batches(5, [(2, 16, 16), (2, 12, 12)])]
    report = count(batches).compute(CLASSES)
    for name, (truth, prob) in zip(CLASSES, per_class_voxels(batches)):
        sweep = report["threshold_sweep"][name]
        if truth.size == 0:
            assert sweep == {"best_threshold": None, "best_dice": None, "dice_at_default": None}
            continue
        curve = []
        for t in DEFAULT_SWEEP:
            pred = prob >= t
            tp, fp, fn = (truth & pred).sum(), (~truth & pred).sum(), (truth & ~pred).sum()
            curve.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        best = max(curve)
        candidates = [t for t, d in zip(DEFAULT_SWEEP, curve) if d == best]
        assert sweep["best_dice"] == pytest.approx(best, abs=1e-12), name
        assert sweep["best_threshold"] == min(candidates, key=lambda t: abs(t - 0.5)), name
        assert sweep["dice_at_default"] == report["per_class"][name]["dice"]
    assert report["threshold_sweep"]["both_empty"]["best_threshold"] == 0.5  # all tie: the default wins
    scored = report["threshold_sweep"]["scored"]
    assert scored["best_dice"] >= scored["dice_at_default"]


def test_merge_and_state_dict_round_trip():
    first, second = make_batches(6, [(2, 8, 8)]), make_batches(7, [(3, 8, 8)])
    together = count(first + second)
    merged = count(first)
    merged.merge(count(second))
    assert merged.compute(CLASSES) == together.compute(CLASSES)
    restored = ConfusionCounter(len(CLASSES), "cpu")
    restored.load_state_dict(together.state_dict())
    assert restored.compute(CLASSES) == together.compute(CLASSES)
    with pytest.raises(ValueError, match="incompatible"):
        ConfusionCounter(len(CLASSES), "cpu", threshold=0.4).merge(together)


def test_bad_arguments_raise_clear_errors():
    counter = ConfusionCounter(2, "cpu")
    with pytest.raises(ValueError, match="target shape"):
        counter.update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match=r"\[B, 2, \*spatial\]"):
        counter.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="class_names"):
        counter.compute(["a"])
    with pytest.raises(ValueError, match="threshold"):
        ConfusionCounter(2, "cpu", threshold=1.0)
    with pytest.raises(ValueError, match="sweep_thresholds"):
        ConfusionCounter(2, "cpu", sweep_thresholds=(0.5, 0.3))


def test_format_table_lists_classes_means_and_absent():
    report = count(make_batches(8, [(2, 8, 8)])).compute(CLASSES)
    table = format_table(report, CLASSES)
    lines = table.splitlines()
    assert all(any(line.startswith(name) for line in lines) for name in CLASSES)
    absent_row = next(line for line in lines if line.startswith("unannotated"))
    assert "absent" in absent_row and "-" in absent_row
    assert f"mean Dice {report['mean_dice']:.4f}" in table
    assert report["mean_definition"] in table and "absent classes" in lines[-1] and "unannotated" in lines[-1]
    # Training passes a trimmed copy of the report (no threshold or sweep note): it still formats.
    trimmed = {k: report[k] for k in ("per_class", "mean_dice", "mean_iou", "mean_definition", "absent_classes")}
    assert "best thr" not in format_table(trimmed, CLASSES)
    with pytest.raises(ValueError, match="not in the report"):
        format_table(report, ["nope"])


# ---- DDP pooling: two gloo ranks, each with its own shard ----

DDP_CLASSES = ["a", "b"]


def ddp_shard(rank: int):
    """Rank 0: many voxels, mediocre predictions. Rank 1: few voxels, perfect predictions. Pooled Dice then
    stays near rank 0's, far from the mean of the per-rank Dice."""
    rng = np.random.default_rng(100 + rank)
    shape = (4, 2, 32, 32) if rank == 0 else (1, 2, 4, 4)
    target = (rng.random(shape) < 0.4).astype(np.float32)
    signal, noise, bias = (1.0, 2.0, -1.0) if rank == 0 else (4.0, 0.0, 0.0)
    logits = (signal * (2 * target - 1) + noise * rng.normal(size=shape) + bias).astype(np.float32)
    target[..., :2, :] = np.nan
    return [(logits[:2], target[:2]), (logits[2:], target[2:])] if rank == 0 else [(logits, target)]


def ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        counter = ConfusionCounter(len(DDP_CLASSES), "cpu")
        for logits, target in ddp_shard(rank):
            counter.update(torch.from_numpy(logits), torch.from_numpy(target))
        counter.all_reduce()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(counter.compute(DDP_CLASSES), f)
    finally:
        dist.destroy_process_group()


def ddp_counter(batches) -> ConfusionCounter:
    counter = ConfusionCounter(len(DDP_CLASSES), "cpu")
    for logits, target in batches:
        counter.update(torch.from_numpy(logits), torch.from_numpy(target))
    return counter


@pytest.mark.timeout(120)
def test_ddp_all_reduce_pools_counts_across_ranks(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0] == reports[1]

    single = ddp_counter(ddp_shard(0) + ddp_shard(1)).compute(DDP_CLASSES)
    assert reports[0] == single

    per_rank = [ddp_counter(ddp_shard(r)).compute(DDP_CLASSES)["mean_dice"] for r in range(2)]
    assert per_rank[1] == 1.0
    assert abs(np.mean(per_rank) - single["mean_dice"]) > 0.1
    pooled = single["per_class"]["a"]
    assert pooled["dice"] == dice_from_counts(pooled["tp"], pooled["fp"], pooled["fn"])


def test_all_reduce_without_process_group_is_a_no_op():
    counter = count(make_batches(9, [(1, 8, 8)]))
    before = counter.state_dict()["counts"].clone()
    counter.all_reduce()
    assert torch.equal(counter.state_dict()["counts"], before)
