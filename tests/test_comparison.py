"""comparison.py's statistics: the paired Student-t interval against a hand calculation, the unpaired fallback,
the absolute difference beside the relative one, the schedule and metric in every report, and runs that repeat
one experiment (same seed, or identical histories) set aside instead of counted as seed repeats."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

import comparison as K
import config_shenron as C

CLASSES = ["nuc", "mito_mem"]


def fake_run(loss: str, seed: int, mean_dice: float, nuc: float | None = None, model: str = "unet_2d",
             history: list[dict] | None = None, name: str | None = None) -> K.Run:
    """A completed run with the given best-epoch mean Dice (and nuc Dice; mito_mem makes up the mean)."""
    nuc = mean_dice if nuc is None else nuc
    per_class = {"nuc": {"dice": nuc, "precision": 0.5, "recall": 0.5},
                 "mito_mem": {"dice": 2 * mean_dice - nuc, "precision": 0.5, "recall": 0.5}}
    identity = {"model": model, "loss": loss, "world_size": 1, "epochs": 6, "iterations": 30, "batch_size": 8}
    history = history or [{"epoch": 1, "train_loss": 1.0 + seed + hash(loss) % 97 / 100, "mean_dice": mean_dice}]
    return K.Run(directory=Path("/nonexistent") / (name or f"{model}-{loss}-s{seed}"),
                 name=name or f"{model}-{loss}-s{seed}", seed=seed, classes=CLASSES, best_epoch=1,
                 best={"mean_dice": mean_dice, "per_class": per_class, "absent_classes": []}, history=history,
                 datasplit=None, identity=identity)


def arm(loss: str, values: dict[int, float], **kw) -> K.Arm:
    return K.Arm([fake_run(loss, seed, v, **kw) for seed, v in sorted(values.items())], label=loss)


def test_t_quantile_is_students():
    assert K.t_quantile(2) == pytest.approx(4.302653, abs=1e-6)
    assert K.t_quantile(1) == pytest.approx(12.706205, abs=1e-6)


def test_paired_interval_matches_a_hand_calculation():
    # Per-seed differences b - a: 0.02, 0.05, -0.01. Mean 0.02; deviations 0, 0.03, -0.03, so
    # sd = sqrt((0 + 0.0009 + 0.0009) / 2) = 0.03; t(0.975, 2) = 4.302653; half width = 4.302653 * 0.03 / sqrt(3)
    # = 0.074524; interval [-0.054524, 0.094524]: it contains 0.
    a = arm("dice", {0: 0.40, 1: 0.50, 2: 0.60})
    b = arm("combo", {0: 0.42, 1: 0.55, 2: 0.59})
    paired = K.paired_difference(a.runs, b.runs, K.mean_dice_of)
    assert paired.n == 3
    assert paired.mean == pytest.approx(0.02, abs=1e-12)
    assert paired.sd == pytest.approx(0.03, abs=1e-12)
    assert paired.low == pytest.approx(0.02 - 0.074524, abs=1e-6)
    assert paired.high == pytest.approx(0.02 + 0.074524, abs=1e-6)
    assert paired.distinguishable is False
    cell = K.difference_cell(a, b, K.mean_dice_of, (a.mean_dice(), b.mean_dice()))
    assert cell == "+0.020 [-0.055, +0.095] not distinguishable"


def test_a_consistent_difference_is_distinguishable_although_the_seed_spread_is_large():
    # Seeds spread by 0.10 in both arms, but b is 0.10, 0.12, 0.11 above a seed by seed: mean 0.11, sd 0.01,
    # half width 4.302653 * 0.01 / sqrt(3) = 0.024841 -> [0.085159, 0.134841].
    a = arm("dice", {0: 0.30, 1: 0.40, 2: 0.50})
    b = arm("combo", {0: 0.40, 1: 0.52, 2: 0.61})
    paired = K.paired_difference(a.runs, b.runs, K.mean_dice_of)
    assert (paired.low, paired.high) == pytest.approx((0.11 - 0.024841, 0.11 + 0.024841), abs=1e-6)
    assert paired.distinguishable is True
    assert K.within_noise(a.mean_dice(), b.mean_dice())  # the unpaired rule would have called it noise
    assert K.difference_cell(a, b, K.mean_dice_of, (a.mean_dice(), b.mean_dice())) == "+0.110 [+0.085, +0.135]"


def test_arms_without_common_seeds_fall_back_to_the_unpaired_rule():
    a = arm("dice", {0: 0.40, 1: 0.44})
    b = arm("combo", {5: 0.41, 6: 0.47})
    assert K.paired_difference(a.runs, b.runs, K.mean_dice_of).n == 0
    cell = K.difference_cell(a, b, K.mean_dice_of, (a.mean_dice(), b.mean_dice()))
    assert cell == "+0.020 (unpaired) (within noise)"
    one = K.difference_cell(arm("dice", {0: 0.40}), arm("combo", {0: 0.45}), K.mean_dice_of,
                            (arm("dice", {0: 0.40}).mean_dice(), arm("combo", {0: 0.45}).mean_dice()))
    assert one == "+0.050"  # one common seed: the difference, no interval


def test_improvement_gives_the_absolute_difference_beside_the_relative_one():
    # 0.007 -> 0.038 is +443% but only +0.031 in Dice; the table must show both.
    a, b = arm("dice", {0: 0.007, 1: 0.007}, nuc=0.5), arm("combo", {0: 0.038, 1: 0.038}, nuc=0.5)
    for x, label in ((a, "2D"), (b, "2.5D")):
        x.label = label
    title, header, rows, _, notes = K.dice_section([a, b], CLASSES, baseline=False)
    assert header[3:5] == ["Improvement (%)", "2.5D - 2D (paired 95% CI)"]
    mean_row = rows[-1]
    assert mean_row[0] == "mean" and mean_row[3] == "+442.9"
    assert mean_row[4] == "+0.031 [+0.031, +0.031]"
    assert not any("within noise" in cell for row in rows for cell in row)
    text = " ".join(notes)
    assert "Student t with n-1 degrees of freedom" in text and "not distinguishable" in text


def test_every_report_states_the_schedule_and_the_metric():
    a, b = arm("dice", {0: 0.4, 1: 0.5}), arm("combo", {0: 0.45, 1: 0.52})
    for section in (K.dice_section([a, b], CLASSES, baseline=False), K.ranking_section([a, b])):
        notes = section[4]
        assert any(n.startswith("metric: 8-nm training-grid Dice, validation") for n in notes)
        assert "schedule: 6 epochs x 30 steps x batch 8, seeds 0, 1 (every arm)." in notes


def test_the_metric_note_names_the_validation_tiles_the_runs_used():
    """Found on the mock: the Dice table said 'every validation crop ... pooled over all its voxels' while the
    best epoch was chosen on a quarter-epoch subset of the validation tiles."""
    a, b = arm("dice", {0: 0.4}), arm("combo", {0: 0.45})
    for run in a.runs + b.runs:
        run.validation = {"subset": "a fixed subset drawn with seed 0, the same every epoch", "tiles": 80,
                          "of_tiles": 3200, "tile": [1, 128, 128]}
    (note,) = [n for n in K.dice_section([a, b], CLASSES, baseline=False)[4] if n.startswith("metric:")]
    assert "a fixed subset drawn with seed 0, the same every epoch (80 of 3200 tiles of 1 x 128 x 128 voxels)" in note
    assert "every validation crop" not in note
    b.runs[0].validation = None                                # a run from before the subset: said apart
    (note,) = [n for n in K.ranking_section([a, b])[4] if n.startswith("metric:")]
    assert "(80 of 3200 tiles" in note and "every validation crop in full (a run from before" in note


def test_ranking_compares_each_arm_with_the_first_seed_by_seed():
    top = arm("combo", {0: 0.60, 1: 0.64, 2: 0.62}, nuc=0.9)
    close = arm("dice", {0: 0.59, 1: 0.65, 2: 0.60}, nuc=0.9)
    low = arm("focal", {0: 0.30, 1: 0.33, 2: 0.31}, nuc=0.5)
    _, header, rows, _, notes = K.ranking_section([low, close, top])
    assert header[8:] == ["vs rank 1: mean Dice (paired 95% CI)", f"vs rank 1: {C.KEY_CLASS} Dice (paired 95% CI)"]
    assert [r[1] for r in rows] == ["combo", "dice", "focal"]
    assert rows[0][8:] == ["-", "-"]
    assert rows[1][8].endswith("not distinguishable")
    # focal - combo per seed: -0.30, -0.31, -0.31 -> mean -0.306667, sd 0.005774, half 0.014342
    assert rows[2][8] == "-0.307 [-0.321, -0.292]"
    assert rows[2][9] == "-0.400 [-0.400, -0.400]"


def test_a_repeated_seed_is_set_aside_not_counted_as_a_second_seed():
    # What the 0.373 +- 0.000 of BENCHMARKS.md looks like: two runs of one experiment in one arm (today's run.sh
    # gave every --seeds repeat the user's --seed). They used to count as two seeds with no spread.
    history = [{"epoch": 1, "train_loss": 1.2, "mean_dice": 0.373}]
    runs = [fake_run("per_class_weighted", 0, 0.373, history=history, name="unet_2d-per_class_weighted-s0"),
            fake_run("per_class_weighted", 0, 0.373, history=history, name="unet_2d-per_class_weighted-s1")]
    (a,) = K.group_arms(runs)
    assert [r.name for r in a.runs] == ["unet_2d-per_class_weighted-s0"]
    assert a.mean_dice().n == 1 and a.mean_dice().std is None
    assert K.fmt_stat(a.mean_dice()) == "0.373"
    assert [r.name for r, _ in a.duplicates] == ["unet_2d-per_class_weighted-s1"]
    notes = K.dice_section([a], CLASSES, baseline=False)[4]
    assert any("unet_2d-per_class_weighted-s1 is left out of every statistic: seed 0 again" in n for n in notes)


def test_identical_histories_under_different_seed_labels_are_one_experiment():
    history = [{"epoch": 1, "train_loss": 1.2, "mean_dice": 0.373}, {"epoch": 2, "train_loss": 1.1, "mean_dice": 0.4}]
    runs = [fake_run("dice", 0, 0.4, history=history), fake_run("dice", 1, 0.4, history=history),
            fake_run("dice", 2, 0.5)]
    (a,) = K.group_arms(runs)
    assert [r.seed for r in a.runs] == [0, 2]
    assert "identical to unet_2d-dice-s0" in a.duplicates[0][1]
    assert math.isclose(a.mean_dice().mean, 0.45)
