"""Comparison reports over run folders: per-class tables, a loss ranking, plots and an image panel.

    python visualize_results.py RUN_DIR... [--out DIR] [--baseline] [--ranking]
                                [--panel-classes nuc,mito_mem] [--no-panel] [--checkpoint best|last]

Owns: reading any set of run folders (a folder that is still running, failed, missing or corrupt is named
in one line and skipped), grouping runs into arms (same model, loss and result-relevant settings; seeds
are repeats), the per-class mean and seed-to-seed spread of Dice, precision and recall at each run's best
epoch, and the report folder:

    comparison.md         the tables below, the runs used and skipped, the figures
    dice_bars.png         per-class Dice, one bar per arm, error bars = seed standard deviation
    training_curves.png   train loss, validation mean Dice and learning rate per epoch, one line per run
    precision_recall.png  precision vs recall per class, one marker per arm, iso-Dice contours
    panel.png             validation slices: raw, truth, and each arm's prediction coloured TP/FP/FN

For exactly two arms the table takes the seed's form (class | 2D | 2.5D | Improvement (%)). The key class
(config_shenron.KEY_CLASS) is highlighted everywhere. Model loading and sliding-window prediction for the
panel come from evaluate.py; crops come from data.py's cache, as in training.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import config_shenron as C
from checkpoint import RunFileError, load_json
from data import DataError
from metrics import DEFAULT_THRESHOLD
from train_local import RESULTS_FILE

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
PANEL_SLICES_PER_CLASS = 2
PANEL_MAX_CROP_VOXELS = 8_000_000  # prediction holds [classes, crop] in float64 while blending
TERMINAL_MAX_ARMS = 4  # beyond this the printed tables drop the spreads and the precision/recall table
KEY_MARK = "*"  # terminal marker of the key class (Markdown uses bold)
# tab10, then its light partners from tab20: a loss comparison has about a dozen arms.
ARM_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
              "tab:gray", "tab:olive", "tab:cyan", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
              "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
SEED_LINESTYLES = ("-", "--", ":", "-.")
FIGURE_FILES = {"dice_bars.png": "Per-class Dice (best epoch)", "training_curves.png": "Training curves",
                "precision_recall.png": "Precision vs recall per class", "panel.png": "Validation slices"}


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
                   history=history, datasplit=results.get("datasplit"), identity=identity)
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


def group_arms(runs: list[Run]) -> list[Arm]:
    """Arms in a stable order (model config order, then loss); labels name what differs between arms."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.identity, sort_keys=True), []).append(run)
    model_order = list(C.MODELS)
    arms = [Arm(sorted(rs, key=lambda r: (r.seed, r.name))) for rs in groups.values()]
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
        seeds = [r.seed for r in arm.runs]
        if len(set(seeds)) < len(seeds):
            lines.append(f"warning: arm {arm.label} has several runs with the same seed ({seeds}); they count "
                         f"as separate repeats")
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
    """Relative change of b over a in percent, marked when smaller than the seed-to-seed spread."""
    if a.mean is None or b.mean is None:
        return "-"
    if a.mean == 0:
        return "n/a (base 0)"
    text = f"{(b.mean - a.mean) / a.mean * 100:+.1f}"
    return text + (" (within noise)" if within_noise(a, b) else "")


def within_noise(a: Stat, b: Stat) -> bool:
    """|difference of the means| < the sum of the two seed standard deviations (needs >= 2 seeds each)."""
    return a.std is not None and b.std is not None and abs(b.mean - a.mean) < a.std + b.std


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


def dice_section(arms: list[Arm], classes: list[str], baseline: bool, spread: bool = True):
    two = len(arms) == 2
    header = ["class"] + [f"{a.label} (n={len(a.runs)})" for a in arms]
    if two:
        header.append("Improvement (%)")
    if baseline:
        header.append(UPSTREAM_BASELINE["label"])
    rows, key_rows = [], set()
    for cls in classes:
        row = [cls] + [class_cell(a, cls, "dice", spread) for a in arms]
        if two:
            row.append(improvement(arms[0].stat(cls, "dice"), arms[1].stat(cls, "dice")))
        if baseline:
            value = UPSTREAM_BASELINE["per_class"].get(cls)
            row.append("-" if value is None else f"{value:.3f}")
        if cls == C.KEY_CLASS:
            key_rows.add(len(rows))
        rows.append(row)
    mean_row = ["mean"] + [fmt_stat(a.mean_dice(), spread) for a in arms]
    if two:
        mean_row.append(improvement(arms[0].mean_dice(), arms[1].mean_dice()))
    if baseline:
        mean_row.append(f"{UPSTREAM_BASELINE['mean_dice']:.3f}")
    rows.append(mean_row)

    absent = sorted({c for a in arms for r in a.runs for c in r.best.get("absent_classes") or []},
                    key=lambda c: classes.index(c) if c in classes else 99)
    seeds = [len(a.runs) for a in arms]
    notes = [f"Dice at each run's best epoch (highest validation mean Dice, so chosen on the validation set "
             f"itself), threshold {DEFAULT_THRESHOLD}, TP/FP/FN pooled over the whole validation set.",
             f"mean = mean over the classes present (annotated) in the validation set; absent classes, left "
             f"out of the mean: {', '.join(absent) if absent else 'none'}.",
             "a ± s = mean and sample standard deviation (n - 1) over seeds; n = seeds per arm."
             if spread else "means over seeds (standard deviations in comparison.md); n = seeds per arm."]
    if two:
        notes.append(f"Improvement (%) = relative change ({arms[1].label} - {arms[0].label}) / {arms[0].label} x 100.")
        if min(seeds) > 1:
            notes.append("(within noise): |difference| < sum of the two arms' seed standard deviations.")
        else:
            notes.append("single seed in an arm: no spread estimate; repeat with --seeds N to mark differences "
                         "within the seed-to-seed noise.")
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
              f"{C.KEY_CLASS} Dice", "n", "vs rank 1"]
    top = ranked[0].mean_dice()

    def versus_top(i: int, arm: Arm) -> str:
        if i == 0:
            return "-"
        stat = arm.mean_dice()
        return f"{stat.mean - top.mean:+.3f}" + (" (within noise)" if within_noise(top, stat) else "")

    rows = [[str(i + 1), a.label, fmt_stat(a.mean_dice()), ", ".join(str(r.best_epoch) for r in a.runs),
             fmt_stat(a.final_mean_dice()), fmt_stat(a.best_minus_final()), class_cell(a, C.KEY_CLASS, "dice"),
             str(len(a.runs)), versus_top(i, a)] for i, a in enumerate(ranked)]
    notes = ["ranked by mean Dice at the best epoch; best epoch per seed; final-epoch mean Dice is the last "
             "epoch's, and best - final shows how much choosing the epoch on validation adds.",
             "vs rank 1: difference in mean Dice from the first arm; (within noise): smaller than the sum of the "
             "two arms' seed standard deviations, so the order of the two is not established (needs --seeds >= 2)."]
    return ("Ranking by mean Dice", header, rows, set(), notes)


def runs_markdown(arms: list[Arm], skipped: list[tuple[Path, str]]) -> str:
    lines = ["## Runs", ""]
    varying = differing_settings(arms)
    for arm in arms:
        runs = ", ".join(f"`{r.name}` (seed {r.seed}, best epoch {r.best_epoch}/{len(r.history)})" for r in arm.runs)
        settings = "; ".join(f"{k}={json.dumps(arm.identity.get(k))}" for k in varying)
        lines.append(f"- **{arm.label}**: {runs}" + (f"  \n  settings that differ between arms: {settings}"
                                                     if settings else ""))
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- `{path}`: {reason}" for path, reason in skipped]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice_bars(arms: list[Arm], classes: list[str], path: Path, baseline: bool) -> None:
    plt = _pyplot()
    names = classes + ["mean"]
    series = len(arms) + (1 if baseline else 0)
    width = 0.8 / series
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.3 * len(names) * series + 2)), 5.5))
    if C.KEY_CLASS in classes:
        k = classes.index(C.KEY_CLASS)
        ax.axvspan(k - 0.5, k + 0.5, color="gold", alpha=0.25, lw=0, label=f"key class ({C.KEY_CLASS})")
    for i, arm in enumerate(arms):
        stats = [arm.stat(c, "dice") for c in classes] + [arm.mean_dice()]
        means = np.array([np.nan if s.mean is None else s.mean for s in stats])
        errors = np.array([s.std or 0.0 for s in stats])
        offset = (i - (series - 1) / 2) * width
        ax.bar(x + offset, means, width, yerr=errors if errors.any() else None, capsize=3, color=arm.color,
               edgecolor="black", linewidth=0.4, label=f"{arm.label} (n={len(arm.runs)})")
    for xi, cls in zip(x, classes):  # one label per class absent from validation, or per arm if only some
        absent = [i for i, a in enumerate(arms) if a.trained_on(cls) and a.stat(cls, "dice").mean is None]
        offsets = [0.0] if len(absent) == len(arms) else [(i - (series - 1) / 2) * width for i in absent]
        for offset in offsets:
            ax.text(xi + offset, 0.01, "absent", rotation=90, fontsize=7, ha="center", va="bottom")
    if baseline:
        values = [UPSTREAM_BASELINE["per_class"].get(c, np.nan) for c in classes] + [UPSTREAM_BASELINE["mean_dice"]]
        ax.bar(x + (series - 1) / 2 * width, values, width, color="lightgray", hatch="//", edgecolor="gray",
               label="upstream UNet 2D ep88 (other pipeline and data)")
    ax.axvline(len(classes) - 0.5, color="black", linestyle=":", linewidth=0.8)
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    for tick in ax.get_xticklabels():
        if tick.get_text() == C.KEY_CLASS:
            tick.set_fontweight("bold")
            tick.set_color("darkred")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice at best epoch (validation)")
    seeds = max(len(a.runs) for a in arms)
    ax.set_title("Per-class validation Dice at the best epoch\n"
                 + ("error bars: std over seeds; " if seeds > 1 else "single seed; ")
                 + "mean = over classes present in validation", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * math.ceil(len(labels) / 4) + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(arms: list[Arm], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [("train_loss", "train loss", "linear"), ("mean_dice", "validation mean Dice", "linear"),
              ("lr", "learning rate (end of epoch)", "log")]
    for arm in arms:
        for j, run in enumerate(arm.runs):
            epochs = [h["epoch"] for h in run.history]
            style = SEED_LINESTYLES[j % len(SEED_LINESTYLES)]
            for ax, (key, _, _) in zip(axes, panels):
                values = [np.nan if h.get(key) is None else h[key] for h in run.history]
                ax.plot(epochs, values, style, color=arm.color, marker="o", markersize=3,
                        label=f"{arm.label} s{run.seed}" if key == "train_loss" else None)
            best = next((h for h in run.history if h["epoch"] == run.best_epoch), None)
            if best is not None:
                axes[1].plot(best["epoch"], best["mean_dice"], "*", color=arm.color, markersize=12,
                             markeredgecolor="black")
    for ax, (key, title, scale) in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes[1].plot([], [], "*", color="gray", markeredgecolor="black", markersize=12, label="best epoch")
    axes[1].legend(fontsize=8, loc="lower right")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    rows = math.ceil(len(labels) / 6)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_precision_recall(arms: list[Arm], classes: list[str], path: Path) -> None:
    plt = _pyplot()
    cols = min(5, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows + 0.8), squeeze=False)
    grid = np.linspace(0.005, 1, 200)
    recall, precision = np.meshgrid(grid, grid)
    iso_dice = 2 * precision * recall / (precision + recall)
    markers = "osD^vP*Xh<>"
    for ax, cls in zip(axes.flat, classes):
        contours = ax.contour(recall, precision, iso_dice, levels=[0.2, 0.4, 0.6, 0.8], colors="0.6",
                              linewidths=0.8, linestyles="--")
        ax.clabel(contours, fmt=lambda v: f"{v:.1f}", fontsize=7)
        shown = 0
        for i, arm in enumerate(arms):
            p, r = arm.stat(cls, "precision"), arm.stat(cls, "recall")
            if p.mean is None or r.mean is None:
                continue
            shown += 1
            ax.errorbar(r.mean, p.mean, xerr=r.std, yerr=p.std, marker=markers[i % len(markers)], color=arm.color,
                        markersize=7, markeredgecolor="black", capsize=2, linestyle="none")
        if not shown:
            ax.text(0.5, 0.5, "absent in validation\nor undefined (0/0)", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes, bbox={"facecolor": "white", "edgecolor": "0.6"})
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
        if cls == C.KEY_CLASS:
            ax.set_title(f"{cls} (key class)", fontweight="bold", color="darkred")
            for spine in ax.spines.values():
                spine.set_edgecolor("darkred")
                spine.set_linewidth(2)
        else:
            ax.set_title(cls)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker=markers[i % len(markers)], color=a.color, markeredgecolor="black",
                          linestyle="none", markersize=7, label=f"{a.label} (n={len(a.runs)})")
               for i, a in enumerate(arms)]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(arms)), fontsize=8, frameon=False)
    fig.suptitle("Precision vs recall at the best epoch (error bars: std over seeds; dashed: iso-Dice lines)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Image panel
# ----------------------------------------------------------------------------------------------------
def _validation_crops(run: Run, cfg) -> dict:
    """The run's validation crops from the cache, prepared exactly as training prepared them."""
    from data import cache_margin, prepare_cache, read_datasplit

    if not run.datasplit:
        raise DataError(f"{run.directory / RESULTS_FILE} names no datasplit")
    entries = read_datasplit(run.datasplit)
    margin = cache_margin(C.PROFILES[cfg.profile], cfg.patch_shape)
    cache = prepare_cache(entries, cfg.classes, cfg.scale_nm, margin)
    return {crop.name: crop for crop in cache.split("validate")}


def choose_slices(crops: dict, classes: list[str], panel_classes: list[str]) -> list[tuple[str, str, int]]:
    """(class, crop name, z) rows: per class, the validation crop with most positives of it (among crops of
    at most PANEL_MAX_CROP_VOXELS, else the smallest holding it: the whole crop is predicted) and
    PANEL_SLICES_PER_CLASS slices spread over the z range where the class is present."""
    rows = []
    for cls in panel_classes:
        if cls not in classes:
            continue
        ci = classes.index(cls)
        holders = [c for c in crops.values() if c.positives[ci] > 0]
        if not holders:
            continue
        small = [c for c in holders if np.prod(c.shape) <= PANEL_MAX_CROP_VOXELS]
        crop = max(small, key=lambda c: c.positives[ci]) if small else min(holders, key=lambda c: np.prod(c.shape))
        per_slice = (np.asarray(crop.labels[ci]) == 1).sum(axis=(1, 2))
        present = np.nonzero(per_slice)[0]
        picks = np.linspace(0, len(present) - 1, PANEL_SLICES_PER_CLASS + 2)[1:-1].round().astype(int)
        rows += [(cls, crop.name, int(present[i])) for i in dict.fromkeys(picks.tolist())]
    return rows


def _overlay(raw: np.ndarray, masks: list[tuple[np.ndarray, tuple]]) -> np.ndarray:
    rgb = np.repeat((raw.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
    for mask, color in masks:
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(color)
    return rgb


def write_panel(arms: list[Arm], panel_classes: list[str], path: Path, which: str) -> str:
    """Render panel.png; returns a one-line description. Raises RunFileError/DataError/OSError/
    ValueError/AttributeError when a checkpoint, the data or evaluate.py's functions are missing."""
    import torch
    from tqdm import tqdm

    import evaluate
    from data import UNANNOTATED, PatchSpec

    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_model, predict = evaluate.load_run_model, evaluate.predict_crop
    reference = None
    predictions: dict[int, dict] = {}
    for i, arm in enumerate(tqdm(arms, desc="panel", unit="arm", file=sys.stdout, leave=False)):
        run = arm.runs[0]  # the lowest seed stands for its arm
        cfg, model, _ = load_model(run.directory, which=which, device=device)
        crops = _validation_crops(run, cfg)
        if reference is None:
            rows = choose_slices(crops, list(cfg.classes), panel_classes)
            if not rows:
                raise ValueError(f"none of the panel classes {', '.join(panel_classes)} has positive voxels in "
                                 f"the validation crops of {run.name}")
            reference = (crops, list(cfg.classes), rows)
        spec = PatchSpec(tuple(cfg.patch_shape), C.MODELS[cfg.model].dims)
        predictions[i] = {}
        for crop_name in dict.fromkeys(name for _, name, _ in reference[2]):
            ref_crop = reference[0][crop_name]
            # Slices are compared in crop coordinates: skip a crop boxed differently (another class set).
            if crop_name not in crops or (crops[crop_name].grid_start, crops[crop_name].shape) != \
                    (ref_crop.grid_start, ref_crop.shape):
                continue
            probs = predict(model, crops[crop_name], spec, device, batch_size=16, progress=True)
            for cls, name, z in reference[2]:
                if name == crop_name and cls in cfg.classes:
                    predictions[i][(cls, name, z)] = probs[list(cfg.classes).index(cls), z] >= DEFAULT_THRESHOLD
        del model

    crops, classes, rows = reference
    plt = _pyplot()
    cols = 2 + len(arms)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.7 * cols, 2.8 * len(rows) + 0.6), squeeze=False)
    for r, (cls, name, z) in enumerate(rows):
        crop = crops[name]
        m = crop.margin
        raw = np.asarray(crop.raw[z + m[0], m[1]:m[1] + crop.shape[1], m[2]:m[2] + crop.shape[2]])
        truth = np.asarray(crop.labels[classes.index(cls), z])
        annotated, positive = truth != UNANNOTATED, truth == 1
        unannotated = (~annotated, (0.5, 0.5, 0.5))
        axes[r, 0].imshow(raw, cmap="gray", vmin=0, vmax=255)
        axes[r, 1].imshow(_overlay(raw, [(positive, (1.0, 0.85, 0.0)), unannotated]))
        for i, arm in enumerate(arms):
            ax = axes[r, 2 + i]
            predicted = predictions[i].get((cls, name, z))
            if predicted is None:
                ax.imshow(raw, cmap="gray", vmin=0, vmax=255, alpha=0.3)
                ax.text(0.5, 0.5, f"{arm.label}: no prediction\n(class not trained, or crop\nnot in its "
                        f"validation set)", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                continue
            tp, fp, fn = predicted & positive, predicted & annotated & ~positive, ~predicted & positive
            ax.imshow(_overlay(raw, [(tp, (0.0, 0.8, 0.0)), (fp, (1.0, 0.0, 0.0)), (fn, (0.1, 0.3, 1.0)),
                                     unannotated]))
            denominator = 2 * tp.sum() + fp.sum() + fn.sum()
            dice = f"{2 * tp.sum() / denominator:.2f}" if denominator else "empty"
            ax.set_title(f"{arm.label}: slice Dice {dice}", fontsize=8)
        axes[r, 0].set_title("raw", fontsize=8)
        axes[r, 1].set_title(f"truth: {cls}", fontsize=8)
        key = cls == C.KEY_CLASS
        axes[r, 0].set_ylabel(f"{cls}{' (key)' if key else ''}\n{name}\nz={z}", fontsize=8,
                              fontweight="bold" if key else "normal", color="darkred" if key else "black")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    legend = [plt.Rectangle((0, 0), 1, 1, color=c, label=l) for c, l in
              [((1.0, 0.85, 0.0), "truth"), ((0.0, 0.8, 0.0), "TP"), ((1.0, 0.0, 0.0), "FP"),
               ((0.1, 0.3, 1.0), "FN"), ((0.5, 0.5, 0.5), "not annotated")]]
    fig.legend(handles=legend, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"Validation slices ({which} checkpoint of each arm's lowest seed; threshold {DEFAULT_THRESHOLD})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{len(rows)} slices of {', '.join(dict.fromkeys(c for c, _, _ in rows))}, {which} checkpoints"


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (or a folder of run folders)")
    p.add_argument("--out", help="report folder (default: <common parent of the runs>/report)")
    p.add_argument("--baseline", action="store_true", help="add the upstream reference column (other pipeline)")
    p.add_argument("--ranking", action="store_true", help="rank the arms by mean Dice (loss comparison)")
    p.add_argument("--panel-classes", help=f"classes shown in panel.png (default {C.KEY_CLASS} and one more)")
    p.add_argument("--no-panel", action="store_true", help="skip panel.png (it loads checkpoints and data)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="checkpoint for the panel")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    folders = expand_folders([Path(d) for d in args.run_dirs])
    parents = [str(f.resolve().parent) for f in folders]
    out = Path(args.out) if args.out else Path(os.path.commonpath(parents)) / "report"
    runs, skipped = [], []
    for folder in folders:
        if folder.resolve() == out.resolve():
            continue  # this report's own folder, globbed in with the runs by a second `report`
        try:
            runs.append(load_run(folder))
        except SkipRun as reason:
            skipped.append((folder, str(reason)))
            print(f"skipped {folder}: {reason}")
    if not runs:
        print(f"error: no usable run among {len(folders)} folder(s) (see above); pass folders of completed "
              f"runs (results.json with status 'completed')", file=sys.stderr)
        return 2
    arms = group_arms(runs)
    classes = ordered_classes(arms)
    panel_classes = [c.strip() for c in args.panel_classes.split(",") if c.strip()] if args.panel_classes else \
        [C.KEY_CLASS] + [c for c in classes if c != C.KEY_CLASS][:1]
    unknown = [c for c in panel_classes if c not in classes]
    if unknown:
        print(f"error: --panel-classes {','.join(unknown)}: not a class of these runs ({', '.join(classes)})",
              file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create report folder {out}: {err.strerror} (choose another --out)", file=sys.stderr)
        return 2
    for line in warnings_for(arms):
        print(line)

    ranking = [ranking_section(arms)] if args.ranking else []
    report = Report([dice_section(arms, classes, args.baseline), *ranking, precision_recall_section(arms, classes)])
    # Many arms: the terminal gets means only and no precision/recall table, which stay in the Markdown.
    compact = len(arms) > TERMINAL_MAX_ARMS
    terminal = Report([dice_section(arms, classes, args.baseline, spread=not compact), *ranking]
                      + ([] if compact else [precision_recall_section(arms, classes)]))
    plot_dice_bars(arms, classes, out / "dice_bars.png", args.baseline)
    plot_training_curves(arms, out / "training_curves.png")
    plot_precision_recall(arms, classes, out / "precision_recall.png")

    def write_markdown(panel_note: str) -> None:
        figures = [f"![{title}]({name})" for name, title in FIGURE_FILES.items() if (out / name).is_file()]
        text = "\n\n".join(["# Run comparison", report.text(markdown=True), runs_markdown(arms, skipped),
                            "## Figures", f"Panel: {panel_note}", "\n\n".join(figures)])
        (out / "comparison.md").write_text(text + "\n")

    (out / "panel.png").unlink(missing_ok=True)  # never leave a stale panel from an earlier report
    if args.no_panel:
        panel_note = "skipped (--no-panel)"
    else:
        write_markdown("not rendered yet (the panel step did not finish)")
        try:
            panel_note = write_panel(arms, panel_classes, out / "panel.png", args.checkpoint)
        except (RunFileError, DataError, OSError, ValueError, KeyError, AttributeError) as err:
            panel_note = f"not written: {err}"
            print(f"warning: panel.png {panel_note}")
    write_markdown(panel_note)

    print()
    print(terminal.text(markdown=False))
    if compact:
        print(f"\nprecision, recall and standard deviations: {out / 'comparison.md'}")
    print(f"\nreport folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
