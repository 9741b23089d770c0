"""Comparing runs: reading run folders (a folder that is still running, failed, missing or corrupt is
skipped with the reason), grouping runs into arms (same model, loss and result-relevant settings; seeds are
repeats, and a second run of a seed an arm already holds is set aside as a duplicate), per-class means and
seed-to-seed spreads of Dice, precision and recall at each run's best epoch, the paired statistics between
arms (per-seed differences, Student-t 95% intervals), and the report's tables (Markdown and terminal): Dice
per class, the loss ranking, precision and recall.

For exactly two arms the Dice table takes the seed's form (class | 2D | 2.5D | Improvement (%)), with the
paired difference beside the relative one. The key class (config_shenron.KEY_CLASS) is highlighted everywhere.
"""
from __future__ import annotations

import json
import re
import textwrap
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import config_shenron as C
from errors import RunFileError
from metrics import DEFAULT_THRESHOLD
from runfiles import RESULTS_FILE, load_json

# The seed project's upstream result (issue 5): a reference point from another pipeline, other data and
# another validation protocol, never a comparable arm. Its mean is over all 14 classes.
UPSTREAM_BASELINE = {
    "label": "upstream 2D ep88 †",
    "source": ("† upstream reference: the seed project's UNet 2D at epoch 88 (14 classes), trained and "
               "validated by another pipeline on other data (issue 5); not comparable run for run, and its "
               "mean is over its 14 classes"),
    "mean_dice": 0.252,
    "per_class": {"golgi_mem": 0.680, "mito_ribo": 0.643, "golgi_lum": 0.317, "ecs": 0.291, "ves_lum": 0.270,
                  "mito_lum": 0.257, "mito_mem": 0.218, "ves_mem": 0.193, "er_lum": 0.143, "er_mem": 0.116,
                  "pm": 0.113, "nuc": 0.111, "endo_lum": 0.099, "endo_mem": 0.081},
}
MODEL_LABELS = {"unet_2d": "2D", "unet_25d": "2.5D", "unet_3d": "3D"}
# Settings that do not change what a run learns: runs differing only in these belong to the same arm.
RESULT_NEUTRAL_FIELDS = ("seed", "workers", "channels_last")
KEY_MARK = "*"  # terminal marker of the key class (Markdown uses bold)
# tab10, then its light partners from tab20: a loss comparison has about a dozen arms.
ARM_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
              "tab:gray", "tab:olive", "tab:cyan", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
              "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")


class SkipRun(Exception):
    """A folder the report cannot use; the message says why in a few words."""


# ----------------------------------------------------------------------------------------------------
# Runs and arms
# ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    directory: Path
    name: str
    seed: int
    classes: list[str]
    best_epoch: int
    best: dict          # the metrics report at the best epoch
    history: list[dict]
    datasplit: str | None
    identity: dict      # everything that defines the arm: model, loss, settings, loss configuration
    final: dict | None = None   # results.json's final_evaluation: checkpoints scored on every validation crop
    validation: dict | None = None  # results.json's validation: the tiles the per-epoch numbers come from


def load_run(directory: Path) -> Run:
    """A completed run folder, or SkipRun saying why the folder cannot be used."""
    path = directory / RESULTS_FILE
    if not directory.is_dir():
        raise SkipRun("folder not found")
    if not path.is_file():
        raise SkipRun(f"no {RESULTS_FILE} (not a run folder, or the run has not started)")
    try:
        results = load_json(path)
    except RunFileError as err:
        raise SkipRun(str(err)) from None
    if not isinstance(results, dict):
        raise SkipRun(f"{path} does not hold a results object")
    status = results.get("status")
    if status == "running":
        epochs = (results.get("config") or {}).get("epochs", "?")
        raise SkipRun(f"status 'running' ({len(results.get('history') or [])}/{epochs} epochs done): still "
                      f"training, or stopped early (continue it with train_local.py --resume {directory})")
    if status == "failed":
        raise SkipRun(f"failed: {results.get('failure') or 'no reason recorded'}")
    if status != "completed":
        raise SkipRun(f"unknown status {status!r} in {path}")
    try:
        config, best, history = results["config"], results["best"], list(results["history"])
        if best is None or best["mean_dice"] is None:
            raise SkipRun("completed without a validation score (no class annotated in validation?)")
        [int(h["epoch"]) for h in history]  # every entry has its epoch
        if not isinstance(best["per_class"], dict) or not history:
            raise ValueError("'best.per_class' or 'history'")
        loss_config = results.get("loss_config") or {}
        identity = {"model": results["model"], "loss": results["loss"], "world_size": results.get("world_size", 1),
                    **{k: v for k, v in config.items() if k not in RESULT_NEUTRAL_FIELDS + ("model", "loss")},
                    **{f"loss.{k}": v for k, v in (loss_config.get("kwargs") or {}).items()}}
        return Run(directory=directory, name=results.get("run_name", directory.name), seed=int(results["seed"]),
                   classes=list(results["classes"]), best_epoch=int(results["best_epoch"]), best=best,
                   history=history, datasplit=results.get("datasplit"), identity=identity,
                   final=results.get("final_evaluation") or None, validation=results.get("validation"))
    except (KeyError, TypeError, ValueError) as err:
        raise SkipRun(f"{path} lacks a valid {err} (written by another version of the toolkit?)") from None


def expand_folders(folders: list[Path]) -> list[Path]:
    """A folder without results.json that holds run folders (a compare group, the runs folder) stands for them."""
    out = []
    for folder in folders:
        inside = sorted(p.parent for p in folder.rglob(RESULTS_FILE)) \
            if folder.is_dir() and not (folder / RESULTS_FILE).exists() else []
        out.extend(inside or [folder])
    return out


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1 denominator) over seeds; std is None for n < 2."""

    mean: float | None
    std: float | None
    n: int


def summarize(values) -> Stat:
    values = [float(v) for v in values if v is not None]
    if not values:
        return Stat(None, None, 0)
    return Stat(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None, len(values))


@dataclass
class Arm:
    """Runs that differ only by seed (or result-neutral settings)."""

    runs: list[Run]
    label: str = ""
    color: str = "tab:blue"
    duplicates: list[tuple[Run, str]] = field(default_factory=list)  # set aside: (run, why), not in any statistic

    @property
    def identity(self) -> dict:
        return self.runs[0].identity

    def trained_on(self, cls: str) -> bool:
        return any(cls in r.classes for r in self.runs)

    def stat(self, cls: str, metric: str) -> Stat:
        return summarize([r.best["per_class"].get(cls, {}).get(metric) for r in self.runs])

    def mean_dice(self) -> Stat:
        return summarize([r.best["mean_dice"] for r in self.runs])

    def final_mean_dice(self) -> Stat:
        return summarize([r.history[-1].get("mean_dice") for r in self.runs])

    def best_minus_final(self) -> Stat:
        return summarize([r.best["mean_dice"] - r.history[-1]["mean_dice"] for r in self.runs
                          if r.history[-1].get("mean_dice") is not None])


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def same_history(a: Run, b: Run) -> bool:
    """Two runs whose every epoch has the same training loss and validation mean Dice: one experiment twice
    (a CPU run is deterministic for its seed), whatever seeds their results.json name."""
    key = lambda r: [(h.get("train_loss"), h.get("mean_dice")) for h in r.history]
    return bool(a.history) and key(a) == key(b)


def split_duplicates(runs: list[Run]) -> tuple[list[Run], list[tuple[Run, str]]]:
    """(one run per seed, the others with the reason): a second run of a seed, or a run identical to another,
    repeats an experiment rather than sampling the seed-to-seed spread, so only the first (by name) counts."""
    unique, duplicates = [], []
    for run in sorted(runs, key=lambda r: (r.seed, r.name)):
        same_seed = next((u for u in unique if u.seed == run.seed), None)
        twin = next((u for u in unique if same_history(u, run)), None)
        if same_seed is not None:
            duplicates.append((run, f"seed {run.seed} again (the arm already holds {same_seed.name})"))
        elif twin is not None:
            duplicates.append((run, f"its history is identical to {twin.name} (seed {twin.seed}): the same "
                                    f"experiment under another seed label"))
        else:
            unique.append(run)
    return unique, duplicates


def group_arms(runs: list[Run]) -> list[Arm]:
    """Arms in a stable order (model config order, then loss); labels name what differs between arms. Each
    arm counts one run per seed (`split_duplicates`); the others are kept in `duplicates`."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.identity, sort_keys=True), []).append(run)
    model_order = list(C.MODELS)
    arms = [Arm(unique, duplicates=duplicates) for unique, duplicates in map(split_duplicates, groups.values())]
    arms.sort(key=lambda a: (model_order.index(a.identity["model"]) if a.identity["model"] in model_order else 99,
                             a.identity["loss"], json.dumps(a.identity, sort_keys=True)))
    # Model and loss name an arm; other settings join the label only as needed to tell arms apart, fewest
    # first (a model's own patch depth or batch size differs with the model and needs no mention).
    varying = differing_settings(arms)
    keys = [k for k in ("model", "loss") if k in varying] or ["model", "loss"]
    candidates = [k for k in varying if k not in keys]
    labels = [_label(a.identity, keys) for a in arms]
    while len(set(labels)) < len(arms) and candidates:
        best = max(candidates, key=lambda k: len({_label(a.identity, keys + [k]) for a in arms}))
        keys.append(best)
        candidates.remove(best)
        labels = [_label(a.identity, keys) for a in arms]
    for i, (arm, label) in enumerate(zip(arms, labels)):
        arm.label = label
        arm.color = ARM_COLORS[i % len(ARM_COLORS)]
    return arms


def differing_settings(arms: list[Arm]) -> list[str]:
    keys = list(dict.fromkeys(k for a in arms for k in a.identity))
    return [k for k in keys if len({json.dumps(a.identity.get(k), sort_keys=True) for a in arms}) > 1]


def _label(identity: dict, keys: list[str]) -> str:
    parts = []
    for k in keys:
        value = identity.get(k)
        parts.append(MODEL_LABELS.get(value, value) if k == "model" else value if k == "loss"
                     else f"{k}={_short(value)}")
    return " ".join(str(p) for p in parts)


def ordered_classes(arms: list[Arm]) -> list[str]:
    """The first run's class order (the key class leads the quick set), then any others in canonical order."""
    first = arms[0].runs[0].classes
    others = {c for a in arms for r in a.runs for c in r.classes} - set(first)
    return first + sorted(others, key=lambda c: (C.ALL_CLASSES.index(c) if c in C.ALL_CLASSES else 99, c))


def warnings_for(arms: list[Arm]) -> list[str]:
    """Things that make the comparison weaker than it looks."""
    lines = []
    for arm in arms:
        for run, why in arm.duplicates:
            lines.append(f"warning: arm {arm.label}: run {run.name} is left out of every statistic: {why}")
    if len({tuple(r.classes) for a in arms for r in a.runs}) > 1:
        lines.append("warning: the runs were trained on different class sets, so their means cover different "
                     "classes; compare per class")
    return lines


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------
def fmt_stat(stat: Stat, spread: bool = True, digits: int = 3) -> str:
    if stat.mean is None:
        return "-"
    text = f"{stat.mean:.{digits}f}"
    return text + (f" ± {stat.std:.{digits}f}" if spread and stat.std is not None else "")


def class_cell(arm: Arm, cls: str, metric: str, spread: bool = True) -> str:
    if not arm.trained_on(cls):
        return "not trained"
    stat = arm.stat(cls, metric)
    if stat.mean is None:
        return "absent" if metric == "dice" else "-"
    return fmt_stat(stat, spread) + (f" (n={stat.n})" if stat.n != len(arm.runs) else "")


def improvement(a: Stat, b: Stat) -> str:
    """Relative change of b's mean over a's in percent (the absolute, paired difference is `difference_cell`)."""
    if a.mean is None or b.mean is None:
        return "-"
    if a.mean == 0:
        return "n/a (base 0)"
    return f"{(b.mean - a.mean) / a.mean * 100:+.1f}"


def within_noise(a: Stat, b: Stat) -> bool:
    """The unpaired rule, for arms without a common seed: |difference of the means| < the sum of the two seed
    standard deviations (needs >= 2 seeds each)."""
    return a.std is not None and b.std is not None and abs(b.mean - a.mean) < a.std + b.std


# ----------------------------------------------------------------------------------------------------
# Paired statistics: the same seed means the same training samples and initialisation in both arms
# ----------------------------------------------------------------------------------------------------
CONFIDENCE = 0.95


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value, e.g. t(0.975, 2) = 4.302653."""
    from scipy.stats import t  # only the reports need scipy

    return float(t.ppf(0.5 + confidence / 2, df))


@dataclass(frozen=True)
class Paired:
    """Per-seed differences b - a over the seeds both arms hold: their mean, sample standard deviation and
    the Student-t interval mean +- t(0.975, n - 1) * sd / sqrt(n) (sd, low, high are None for n < 2)."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None

    @property
    def distinguishable(self) -> bool | None:
        """Whether the interval excludes 0 (None without an interval)."""
        return None if self.low is None else not (self.low <= 0 <= self.high)


def paired_difference(a: list[Run], b: list[Run], value, value_b=None) -> Paired:
    """The paired comparison of b against a; `value(run)` is the metric (None = not scored, left out), and
    `value_b` b's when it differs (another evaluation of b's runs)."""
    va = {r.seed: value(r) for r in a}
    vb = {r.seed: (value_b or value)(r) for r in b}
    diffs = [vb[s] - va[s] for s in sorted(set(va) & set(vb)) if va[s] is not None and vb[s] is not None]
    n = len(diffs)
    if n == 0:
        return Paired(0, None, None, None, None)
    mean = float(np.mean(diffs))
    if n == 1:
        return Paired(1, mean, None, None, None)
    sd = float(np.std(diffs, ddof=1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Paired(n, mean, sd, mean - half, mean + half)


def mean_dice_of(run: Run):
    return run.best["mean_dice"]


def class_dice_of(cls: str):
    return lambda run: run.best["per_class"].get(cls, {}).get("dice")


def difference_cell(a: Arm, b: Arm, value, unpaired: tuple[Stat, Stat], value_b=None) -> str:
    """b - a: paired over common seeds with its 95% interval, 'not distinguishable' when the interval holds 0;
    one common seed: the difference alone; no common seed: the difference of the means, marked '(unpaired)'
    and '(within noise)' by the unpaired rule. `value_b`: b's metric when it differs from a's."""
    paired = paired_difference(a.runs, b.runs, value, value_b)
    if paired.n == 0:
        sa, sb = unpaired
        if sa.mean is None or sb.mean is None:
            return "-"
        return f"{sb.mean - sa.mean:+.3f} (unpaired)" + (" (within noise)" if within_noise(sa, sb) else "")
    if paired.low is None:
        return f"{paired.mean:+.3f}"
    return (f"{paired.mean:+.3f} [{paired.low:+.3f}, {paired.high:+.3f}]"
            + ("" if paired.distinguishable else " not distinguishable"))


PAIRED_NOTE = ("paired over the seeds both arms hold (the same seed draws the same training samples and, for "
               "the same model, the same initial weights): mean of the per-seed differences [95% confidence "
               "interval: mean +- t(0.975, n-1) x sd / sqrt(n), Student t with n-1 degrees of freedom over the "
               "n per-seed differences]; 'not distinguishable' when the interval contains 0. One common seed: "
               "the difference alone, no interval (repeat with --seeds N). Arms without a common seed fall back "
               "to the unpaired difference of the means, '(within noise)' when it is smaller than the sum of the "
               "two arms' seed standard deviations.")


def render(header: list[str], rows: list[list[str]], markdown: bool, key_rows: set[int] = frozenset()) -> str:
    """A Markdown table, or a fixed-width text table with the key rows marked."""
    if markdown:
        bold = lambda i, row: [f"**{c}**" for c in row] if i in key_rows else row
        align = ["---"] + ["---:"] * (len(header) - 1)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(bold(i, row)) + " |" for i, row in enumerate(rows)]
        return "\n".join(lines)
    rows = [[row[0] + (f" {KEY_MARK}" if i in key_rows else "")] + row[1:] for i, row in enumerate(rows)]
    # Long headers (arm labels) wrap at '_' and ' ' onto several lines rather than widen their column.
    cell_widths = [max(len(r[j]) for r in rows) for j in range(len(header))]
    wrapped = [_wrap(h, max(w, 10)) for h, w in zip(header, cell_widths)]
    widths = [max(w, *(len(line) for line in h)) for w, h in zip(cell_widths, wrapped)]
    depth = max(len(h) for h in wrapped)
    header_lines = [[([""] * (depth - len(h)) + h)[k] for h in wrapped] for k in range(depth)]
    fmt = lambda row: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
    rule = "-" * len(fmt(header_lines[-1]))
    return "\n".join([fmt(h) for h in header_lines] + [rule] + [fmt(r) for r in rows] + [rule])


def _wrap(text: str, width: int) -> list[str]:
    lines = [""]
    for token in re.findall(r"[^_ ]+[_ ]?|[_ ]", text):
        if lines[-1] and len((lines[-1] + token).rstrip()) > width:
            lines.append("")
        lines[-1] += token
    return [line.rstrip() for line in lines]


@dataclass
class Report:
    """The tables of a report as (title, header, rows, key rows, notes), rendered twice."""

    sections: list[tuple[str, list[str], list[list[str]], set[int], list[str]]]

    def text(self, markdown: bool) -> str:
        parts = []
        for title, header, rows, key_rows, notes in self.sections:
            parts.append(f"## {title}" if markdown else title)
            parts.append(render(header, rows, markdown, key_rows))
            parts.append("\n".join(f"- {n}" if markdown else textwrap.fill(n, 110, subsequent_indent="  ")
                                   for n in notes))
        return "\n\n".join(p for p in parts if p)


def metric_note(arms: list[Arm]) -> str:
    """What the per-epoch numbers are: the 8-nm metric over the validation tiles the runs recorded."""
    def tiles(v: dict | None) -> str:
        if not v:
            return "every validation crop in full (a run from before the validation subset)"
        return f"{v['subset']} ({v['tiles']} of {v['of_tiles']} tiles of {' x '.join(map(str, v['tile']))} voxels)"
    used = sorted({tiles(r.validation) for a in arms for r in a.runs})
    return ("metric: 8-nm training-grid Dice, validation (not the challenge's own evaluation), TP/FP/FN pooled "
            "over the annotated voxels of " + "; ".join(used))


def seed_list(arm: Arm) -> str:
    return ", ".join(str(r.seed) for r in arm.runs)


def schedule_note(arms: list[Arm]) -> str:
    """'schedule: E epochs x S steps x batch B (x P processes), seeds ...', once when every arm shares it."""
    def one(arm: Arm) -> str:
        i = arm.identity
        procs = i.get("world_size", 1)
        return (f"{i.get('epochs', '?')} epochs x {i.get('iterations', '?')} steps x batch {i.get('batch_size', '?')}"
                + (f" x {procs} processes" if procs != 1 else "") + f", seeds {seed_list(arm)}")

    texts = [one(a) for a in arms]
    if len(set(texts)) == 1:
        return f"schedule: {texts[0]}" + (" (every arm)" if len(arms) > 1 else "")
    return "schedule: " + "; ".join(f"{a.label}: {t}" for a, t in zip(arms, texts))


def dice_section(arms: list[Arm], classes: list[str], baseline: bool, spread: bool = True):
    two = len(arms) == 2
    header = ["class"] + [f"{a.label} (n={len(a.runs)})" for a in arms]
    if two:
        header += ["Improvement (%)", f"{arms[1].label} - {arms[0].label} (paired 95% CI)"]
    if baseline:
        header.append(UPSTREAM_BASELINE["label"])
    rows, key_rows = [], set()
    for cls in classes:
        row = [cls] + [class_cell(a, cls, "dice", spread) for a in arms]
        if two:
            stats = (arms[0].stat(cls, "dice"), arms[1].stat(cls, "dice"))
            row += [improvement(*stats), difference_cell(arms[0], arms[1], class_dice_of(cls), stats)]
        if baseline:
            value = UPSTREAM_BASELINE["per_class"].get(cls)
            row.append("-" if value is None else f"{value:.3f}")
        if cls == C.KEY_CLASS:
            key_rows.add(len(rows))
        rows.append(row)
    mean_row = ["mean"] + [fmt_stat(a.mean_dice(), spread) for a in arms]
    if two:
        stats = (arms[0].mean_dice(), arms[1].mean_dice())
        mean_row += [improvement(*stats), difference_cell(arms[0], arms[1], mean_dice_of, stats)]
    if baseline:
        mean_row.append(f"{UPSTREAM_BASELINE['mean_dice']:.3f}")
    rows.append(mean_row)

    absent = sorted({c for a in arms for r in a.runs for c in r.best.get("absent_classes") or []},
                    key=lambda c: classes.index(c) if c in classes else 99)
    notes = [metric_note(arms) + ".", schedule_note(arms) + ".",
             f"Dice at each run's best epoch (highest validation mean Dice, so chosen on the validation set "
             f"itself), threshold {DEFAULT_THRESHOLD}.",
             f"mean = mean over the classes present (annotated) in the validation set; absent classes, left "
             f"out of the mean: {', '.join(absent) if absent else 'none'}.",
             "a ± s = mean and sample standard deviation (n - 1) over seeds; n = seeds per arm."
             if spread else "means over seeds (standard deviations in comparison.md); n = seeds per arm."]
    if two:
        notes.append(f"Improvement (%) = relative change of the means ({arms[1].label} - {arms[0].label}) / "
                     f"{arms[0].label} x 100; {arms[1].label} - {arms[0].label} = the absolute difference in Dice, "
                     + PAIRED_NOTE)
    notes += warnings_for(arms)
    notes.append(f"key class: {C.KEY_CLASS} (bold in Markdown, {KEY_MARK} in the terminal).")
    if baseline:
        notes.append(UPSTREAM_BASELINE["source"] + ".")
    return ("Dice per class", header, rows, key_rows, notes)


def precision_recall_section(arms: list[Arm], classes: list[str], spread: bool = True):
    header = ["class"] + [f"{a.label} {m}" for a in arms for m in ("precision", "recall")]
    rows, key_rows = [], set()
    for cls in classes:
        if cls == C.KEY_CLASS:
            key_rows.add(len(rows))
        rows.append([cls] + [class_cell(a, cls, m, spread) for a in arms for m in ("precision", "recall")])
    notes = ["precision = TP/(TP+FP), recall = TP/(TP+FN) at the best epoch; '-' where undefined (0/0)."]
    return ("Precision and recall per class", header, rows, key_rows, notes)


def ranking_section(arms: list[Arm]):
    ranked = sorted(arms, key=lambda a: a.mean_dice().mean, reverse=True)
    header = ["rank", "arm", "mean Dice (best)", "best epoch", "final-epoch mean Dice", "best - final",
              f"{C.KEY_CLASS} Dice", "n", "vs rank 1: mean Dice (paired 95% CI)",
              f"vs rank 1: {C.KEY_CLASS} Dice (paired 95% CI)"]
    top = ranked[0]

    def versus_top(i: int, arm: Arm, value, stat) -> str:
        return "-" if i == 0 else difference_cell(top, arm, value, (stat(top), stat(arm)))

    key_dice = class_dice_of(C.KEY_CLASS)
    rows = [[str(i + 1), a.label, fmt_stat(a.mean_dice()), ", ".join(str(r.best_epoch) for r in a.runs),
             fmt_stat(a.final_mean_dice()), fmt_stat(a.best_minus_final()), class_cell(a, C.KEY_CLASS, "dice"),
             str(len(a.runs)), versus_top(i, a, mean_dice_of, Arm.mean_dice),
             versus_top(i, a, key_dice, lambda arm: arm.stat(C.KEY_CLASS, "dice"))] for i, a in enumerate(ranked)]
    notes = [metric_note(ranked) + ".", schedule_note(ranked) + ".",
             "ranked by mean Dice at the best epoch; best epoch per seed; final-epoch mean Dice is the last "
             "epoch's, and best - final shows how much choosing the epoch on validation adds.",
             "vs rank 1: this arm minus the first, in mean Dice and in " + C.KEY_CLASS + " Dice, " + PAIRED_NOTE
             + " The ranking orders the means; only arms distinguishable from rank 1 are established as below it."]
    return ("Ranking by mean Dice", header, rows, set(), notes)


# Final evaluation: the chosen checkpoint on every validation crop (8-nm sliding window, official score)
FINAL_VARIANTS = (("best", ""), ("best_tta_orthoplane", " + TTA + orthoplane"))


def _official_score(evaluation: dict, cls: str):
    entry = evaluation["official"]["classes"][cls]
    return entry["combined"] if "combined" in entry else entry["iou"]


FINAL_COLUMNS = (
    ("8-nm mean Dice", lambda e: e["tilings"]["sliding"]["mean_dice"]),
    (f"8-nm {C.KEY_CLASS} Dice", lambda e: e["tilings"]["sliding"]["per_class"][C.KEY_CLASS]["dice"]),
    ("official overall", lambda e: e["official"]["overall"]),
    (f"official {C.KEY_CLASS}", lambda e: _official_score(e, C.KEY_CLASS)),
    ("official semantic IoU", lambda e: e["official"]["semantic_mean"]),
    ("official instance", lambda e: e["official"]["instance_mean"]),
)


def final_value(key: str, pick):
    """value(run): `pick` of the run's final evaluation `key`, None where it has none or lacks the entry."""
    def value(run: Run):
        try:
            return pick(run.final[key])
        except (KeyError, TypeError):
            return None
    return value


def final_section(arms: list[Arm]):
    """Each arm's best checkpoint (and a 2D model's with TTA + orthoplane) on every validation crop, in both
    metrics, with the paired difference from the strongest 2D row; None when no run has a final evaluation."""
    rows = [(arm, key, arm.label + suffix) for arm in arms for key, suffix in FINAL_VARIANTS
            if any(final_value(key, lambda e: e)(r) for r in arm.runs)]
    if not rows:
        return None
    strong = [row for row in rows if row[1] == FINAL_VARIANTS[1][0]]
    reference = strong[0] if len(strong) == 1 else rows[0]
    pick_key = FINAL_COLUMNS[3][1]
    header = ["checkpoint", "n"] + [name for name, _ in FINAL_COLUMNS] + [
        f"official {C.KEY_CLASS} vs reference (paired 95% CI)"]
    table = []
    for arm, key, label in rows:
        stats = [summarize([final_value(key, pick)(r) for r in arm.runs]) for _, pick in FINAL_COLUMNS]
        if (arm, key) == reference[:2]:
            versus = "reference"
        else:
            versus = difference_cell(reference[0], arm, final_value(reference[1], pick_key),
                                     (summarize([final_value(reference[1], pick_key)(r) for r in reference[0].runs]),
                                      stats[3]), value_b=final_value(key, pick_key))
        table.append([label, str(stats[0].n)] + [fmt_stat(s) for s in stats] + [versus])
    notes = ["after training, the best checkpoint on every validation crop in full: 8-nm = the sliding window "
             "(overlap 0.5, Gaussian blend) scored on the 8-nm training grid (toolkit metric); official = the "
             "challenge's score at each crop's native resolution (official.py rules: semantic IoU pooled in "
             f"native voxels, instance classes such as {C.KEY_CLASS} by F1 x Hausdorff after connected components, "
             "overall = sqrt(instance x semantic)).",
             "+ TTA + orthoplane: the same 2D checkpoint predicting under the 8 dihedral transforms of the y/x "
             "plane along z, y and x, averaged: the strongest 2D the comparison holds 2.5D against.",
             f"the last column: this row minus the reference row ({reference[2]}) in the official {C.KEY_CLASS} "
             "score, " + PAIRED_NOTE]
    return ("Final evaluation: both metrics", header, table, set(), notes)


def runs_markdown(arms: list[Arm], skipped: list[tuple[Path, str]]) -> str:
    lines = ["## Runs", ""]
    varying = differing_settings(arms)
    for arm in arms:
        runs = ", ".join(f"`{r.name}` (seed {r.seed}, best epoch {r.best_epoch}/{len(r.history)})" for r in arm.runs)
        settings = "; ".join(f"{k}={json.dumps(arm.identity.get(k))}" for k in varying)
        lines.append(f"- **{arm.label}**: {runs}" + (f"  \n  settings that differ between arms: {settings}"
                                                     if settings else ""))
        lines += [f"  - set aside, in no statistic: `{run.name}` (seed {run.seed}): {why}" for run, why in arm.duplicates]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- `{path}`: {reason}" for path, reason in skipped]
    return "\n".join(lines)
