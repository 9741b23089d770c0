"""The report's figures: per-class Dice bars, training curves, precision vs recall, and the image panel of
validation slices (raw, truth, each arm's prediction coloured TP/FP/FN). Model loading and sliding-window
prediction for the panel come from inference.py; crops come from the crop cache, as in training.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import config_shenron as C
from cache import UNANNOTATED, prepare_cache
from comparison import UPSTREAM_BASELINE, Arm, Run
from datasplit import read_datasplit
from errors import DataError
from inference import load_run_model, predict_crop
from sampling import PatchSpec
from metrics import DEFAULT_THRESHOLD
from runfiles import RESULTS_FILE

PANEL_SLICES_PER_CLASS = 2
PANEL_MAX_CROP_VOXELS = 8_000_000  # prediction holds [classes, crop] in float64 while blending
SEED_LINESTYLES = ("-", "--", ":", "-.")


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
    if not run.datasplit:
        raise DataError(f"{run.directory / RESULTS_FILE} names no datasplit")
    entries = read_datasplit(run.datasplit)
    cache = prepare_cache(entries, cfg.classes, cfg.scale_nm, workers=cfg.workers)
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
        per_slice = (crop.labels[ci] == 1).sum(axis=(1, 2))
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
    ValueError/AttributeError when a checkpoint or the data are missing."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = None
    predictions: dict[int, dict] = {}
    for i, arm in enumerate(tqdm(arms, desc="panel", unit="arm", file=sys.stdout, leave=False)):
        run = arm.runs[0]  # the lowest seed stands for its arm
        cfg, model, _ = load_run_model(run.directory, which=which, device=device)
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
            probs = predict_crop(model, crops[crop_name], spec, device, batch_size=16, progress=True)
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
        raw = crop.raw_window((z, 0, 0), (1,) + tuple(crop.shape[1:]))[0][0]
        truth = crop.label_window((z, 0, 0), (1,) + tuple(crop.shape[1:]))[classes.index(cls), 0]
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
