"""Comparison reports over run folders: per-class tables, a loss ranking, plots and an image panel.

    python visualize_results.py RUN_DIR... [--out DIR] [--baseline] [--ranking]
                                [--panel-classes nuc,mito_mem] [--no-panel] [--checkpoint best|last]

Writes the report folder (default: <common parent of the runs>/report):

    comparison.md         the tables, the runs used and skipped, the figures
    dice_bars.png         per-class Dice, one bar per arm, error bars = seed standard deviation
    training_curves.png   train loss, validation mean Dice and learning rate per epoch, one line per run
    precision_recall.png  precision vs recall per class, one marker per arm, iso-Dice contours
    panel.png             validation slices: raw, truth, and each arm's prediction coloured TP/FP/FN

comparison.py reads the runs and makes the tables; plots.py draws the figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

import config_shenron as C
from comparison import (Report, SkipRun, dice_section, expand_folders, final_section, group_arms, load_run,
                        ordered_classes, precision_recall_section, ranking_section, runs_markdown, warnings_for)
from errors import DataError, RunFileError
from plots import plot_dice_bars, plot_precision_recall, plot_training_curves, write_panel

TERMINAL_MAX_ARMS = 4  # beyond this the printed tables drop the spreads and the precision/recall table
FIGURE_FILES = {"dice_bars.png": "Per-class Dice (best epoch)", "training_curves.png": "Training curves",
                "precision_recall.png": "Precision vs recall per class", "panel.png": "Validation slices"}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (or a folder of run folders)")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report for one folder, else "
                                 "PARENT/report-<run>+<run>...)")
    p.add_argument("--baseline", action="store_true", help="add the upstream reference column (other pipeline)")
    p.add_argument("--ranking", action="store_true", help="rank the arms by mean Dice (loss comparison)")
    p.add_argument("--panel-classes", help=f"classes shown in panel.png (default {C.KEY_CLASS} and one more)")
    p.add_argument("--no-panel", action="store_true", help="skip panel.png (it loads checkpoints and data)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="checkpoint for the panel")
    return p.parse_args(argv)


def default_report_dir(given: list[Path]) -> Path:
    """GROUP/report for one group (or run) folder, else PARENT/report-<name>+<name>... (a checksum instead when
    the names are long): reports on different runs never overwrite each other."""
    given = [g.resolve() for g in given]
    if len(given) == 1:
        return given[0] / "report"
    parent = Path(os.path.commonpath([str(g.parent) for g in given]))
    names = "+".join(g.name for g in given)
    if len(names) > 80:
        names = f"{given[0].name}+{len(given) - 1}-more-{zlib.crc32(names.encode()):08x}"
    return parent / f"report-{names}"


def main(argv=None) -> int:
    args = parse_args(argv)
    folders = expand_folders([Path(d) for d in args.run_dirs])
    out = Path(args.out) if args.out else default_report_dir([Path(d) for d in args.run_dirs])
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
    section = final_section(arms)
    final = [section] if section else []
    report = Report([dice_section(arms, classes, args.baseline), *ranking, *final,
                     precision_recall_section(arms, classes)])
    # Many arms: the terminal gets means only and no precision/recall table, which stay in the Markdown.
    compact = len(arms) > TERMINAL_MAX_ARMS
    terminal = Report([dice_section(arms, classes, args.baseline, spread=not compact), *ranking, *final]
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
