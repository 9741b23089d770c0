"""visualize_results.py: tables against hand computation, skipped folders, ranking, PNGs, the image panel."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

import config_shenron as C
import comparison
import plots
import visualize_results as V
from conftest import TINY_RUN_OPTIONS, run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["nuc", "mito_mem", "er_mem"]  # er_mem: absent from validation in every fake run

# Known numbers: (model, seed) -> per-class (dice, precision, recall); er_mem is absent.
FAKE = {
    ("unet_2d", 0): {"nuc": (0.40, 0.30, 0.90), "mito_mem": (0.60, 0.55, 0.70)},
    ("unet_2d", 1): {"nuc": (0.50, 0.40, 0.80), "mito_mem": (0.62, 0.60, 0.66)},
    ("unet_25d", 0): {"nuc": (0.70, 0.65, 0.80), "mito_mem": (0.61, 0.58, 0.68)},
    ("unet_25d", 1): {"nuc": (0.80, 0.75, 0.86), "mito_mem": (0.63, 0.61, 0.66)},
}


def fake_results(model: str, loss: str, seed: int, per_class: dict, status: str = "completed",
                 epochs: int = 3, final_drop: float = 0.05) -> dict:
    """A results.json as train_local.py writes it, with the given best-epoch metrics."""
    report = {cls: {"dice": None, "iou": None, "precision": None, "recall": None, "tp": 0, "fp": 0, "fn": 0,
                    "tn": 0, "annotated_voxels": 0, "positive_voxels": 0, "status": "absent"} for cls in CLASSES}
    for cls, (dice, precision, recall) in per_class.items():
        report[cls].update(dice=dice, iou=dice / (2 - dice), precision=precision, recall=recall, status="scored")
    mean = statistics.mean(d for d, _, _ in per_class.values())
    best_epoch = epochs - 1
    history = [{"epoch": e, "train_loss": 1.0 / e, "mean_dice": mean * e / best_epoch if e <= best_epoch
                else mean - final_drop, "per_class": report, "lr": 1e-3 / e} for e in range(1, epochs + 1)]
    config = {"model": model, "loss": loss, "mode": "model_comparison", "profile": "cpu", "classes": CLASSES,
              "epochs": epochs, "iterations": 2, "batch_size": 2, "lr": 1e-3, "seed": seed, "workers": 0,
              "patch_shape": [5 if model == "unet_25d" else 1, 32, 32], "base_channels": 4, "depth": 2}
    return {"run_name": f"{model}-{loss}-s{seed}", "status": status, "model": model, "loss": loss,
            "loss_config": {"name": loss, "kwargs": {}}, "classes": CLASSES, "seed": seed, "world_size": 1,
            "device": "cpu", "config": config, "datasplit": "/nonexistent/datasplit.csv", "best_epoch": best_epoch,
            "best": {"mean_dice": mean, "mean_iou": None, "mean_definition": "macro mean", "absent_classes": ["er_mem"],
                     "per_class": report}, "history": history, "elapsed_seconds": 1.0, "failure": None}


def write_run(group: Path, results: dict | str) -> Path:
    name = results["run_name"] if isinstance(results, dict) else results
    run = group / name
    run.mkdir(parents=True)
    if isinstance(results, dict):
        (run / "results.json").write_text(json.dumps(results))
    return run


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory):
    """Report over 2 arms x 2 seeds plus a running, a failed, a corrupt and an empty folder."""
    group = tmp_path_factory.mktemp("group")
    for (model, seed), per_class in FAKE.items():
        write_run(group, fake_results(model, "dice", seed, per_class))
    running = fake_results("unet_2d", "dice", 2, FAKE[("unet_2d", 0)], status="running")
    running["run_name"] = "running-run"
    write_run(group, running)
    failed = fake_results("unet_25d", "dice", 2, FAKE[("unet_25d", 0)], status="failed")
    failed.update(run_name="failed-run", failure="TrainingFailed: 25 consecutive non-finite steps")
    write_run(group, failed)
    (write_run(group, "corrupt-run") / "results.json").write_text('{"status": "compl')
    write_run(group, "empty-run")
    out = group / "report"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = V.main([str(p) for p in sorted(group.iterdir())] + [str(group / "missing-run"), "--out", str(out),
                                                                   "--baseline"])
    return code, stdout.getvalue(), out


def stat_text(values) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table_row(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{markdown}")


def test_table_numbers_match_hand_computation(mixed_report):
    code, stdout, out = mixed_report
    assert code == 0
    md = (out / "comparison.md").read_text()
    header = table_row(md, "class")
    assert header[:5] == ["class", "2D (n=2)", "2.5D (n=2)", "Improvement (%)", "2.5D - 2D (paired 95% CI)"]
    assert header[5] == comparison.UPSTREAM_BASELINE["label"]
    for cls in ("nuc", "mito_mem"):
        a = [FAKE[("unet_2d", s)][cls][0] for s in (0, 1)]
        b = [FAKE[("unet_25d", s)][cls][0] for s in (0, 1)]
        row = table_row(md, f"**{cls}**" if cls == C.KEY_CLASS else cls)
        cells = [c.strip("*") for c in row]
        assert cells[1] == stat_text(a) and cells[2] == stat_text(b)
        change = (statistics.mean(b) - statistics.mean(a)) / statistics.mean(a) * 100
        assert cells[3] == f"{change:+.1f}"
    # Paired by seed: nuc +0.30 on both seeds, mito_mem +0.01 on both (its unpaired spread, 0.014 per arm, would
    # have called it noise): the intervals have no width and exclude 0.
    assert table_row(md, "**nuc**")[3:5] == ["**+66.7**", "**+0.300 [+0.300, +0.300]**"]
    assert table_row(md, "mito_mem")[3:5] == ["+1.6", "+0.010 [+0.010, +0.010]"]
    assert table_row(md, "er_mem")[1:3] == ["absent", "absent"]
    means_a = [statistics.mean(d for d, _, _ in FAKE[("unet_2d", s)].values()) for s in (0, 1)]
    means_b = [statistics.mean(d for d, _, _ in FAKE[("unet_25d", s)].values()) for s in (0, 1)]
    mean_row = table_row(md, "mean")
    assert mean_row[1:3] == [stat_text(means_a), stat_text(means_b)]
    assert mean_row[5] == "0.252"
    assert "absent classes, left out of the mean: er_mem" in md
    precision_row = [c.strip("*") for c in table_row(md.split("Precision and recall")[1], "**nuc**")]
    assert precision_row[1] == stat_text([0.30, 0.40]) and precision_row[4] == stat_text([0.80, 0.86])


def test_key_class_highlighted_and_table_printed(mixed_report):
    code, stdout, out = mixed_report
    md = (out / "comparison.md").read_text()
    assert all(c.startswith("**") for c in table_row(md, "**nuc**"))
    assert not table_row(md, "mito_mem")[1].startswith("**")
    nuc_lines = [line for line in stdout.splitlines() if line.startswith("nuc ")]
    assert nuc_lines and nuc_lines[0].startswith(f"nuc {comparison.KEY_MARK}")
    assert stdout.rstrip().endswith(f"report folder: {out}")
    assert "other pipeline" in md and "upstream" in md


def test_unusable_folders_are_reported_and_skipped(mixed_report):
    code, stdout, out = mixed_report
    skipped = {line.split(":")[0].split("/")[-1]: line for line in stdout.splitlines() if line.startswith("skipped ")}
    assert set(skipped) == {"running-run", "failed-run", "corrupt-run", "empty-run", "missing-run"}
    assert "running" in skipped["running-run"] and "non-finite" in skipped["failed-run"]
    assert "corrupt" in skipped["corrupt-run"] and "no results.json" in skipped["empty-run"]
    assert "not found" in skipped["missing-run"]
    md = (out / "comparison.md").read_text()
    assert "running-run" in md.split("Skipped:")[1]
    # Without checkpoints the panel fails soft: one warning line, every other output written.
    assert sum("warning: panel.png" in line for line in stdout.splitlines()) == 1
    assert not (out / "panel.png").exists()


def test_pngs_are_valid_and_nontrivial(mixed_report):
    import matplotlib.image

    code, stdout, out = mixed_report
    for name in ("dice_bars.png", "training_curves.png", "precision_recall.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 20_000
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05


def test_ranking_order(tmp_path, capsys):
    mean_dice = {"dice": 0.55, "baseline_bce": 0.35, "tversky_recall": 0.65}
    for loss, value in mean_dice.items():
        write_run(tmp_path, fake_results("unet_2d", loss, 0, {"nuc": (value, 0.5, 0.5), "mito_mem": (value, 0.5, 0.5)}))
    assert V.main([str(tmp_path), "--out", str(tmp_path / "report"), "--ranking", "--no-panel"]) == 0
    md = (tmp_path / "report" / "comparison.md").read_text()
    ranking = md.split("## Ranking by mean Dice")[1].split("##")[0]
    ranked = [table_row(ranking, str(k))[1] for k in (1, 2, 3)]
    assert ranked == sorted(mean_dice, key=mean_dice.get, reverse=True)
    first = table_row(ranking, "1")
    assert first[2] == "0.650" and first[3] == "2" and first[4] == f"{0.65 - 0.05:.3f}" and first[5] == "0.050"
    assert "Ranking by mean Dice" in capsys.readouterr().out
    assert first[8] == "-" and table_row(ranking, "2")[8] == f"{0.55 - 0.65:+.3f}"  # one seed: no noise verdict


def test_ranking_pairs_the_arms_seed_by_seed(tmp_path):
    seeds = {"combo": (0.60, 0.64), "dice": (0.58, 0.60), "focal": (0.30, 0.32)}  # combo sd 0.028, dice sd 0.014
    for loss, values in seeds.items():
        for seed, value in enumerate(values):
            write_run(tmp_path, fake_results("unet_2d", loss, seed, {"nuc": (value, 0.5, 0.5)}))
    assert V.main([str(tmp_path), "--out", str(tmp_path / "report"), "--ranking", "--no-panel"]) == 0
    ranking = (tmp_path / "report" / "comparison.md").read_text().split("## Ranking by mean Dice")[1].split("##")[0]
    # dice - combo per seed: -0.02, -0.04 -> mean -0.030, sd 0.01414, t(0.975, 1) = 12.706 -> +-0.127;
    # focal - combo: -0.30, -0.32 -> -0.310 +- 0.127.
    assert [table_row(ranking, str(k))[8] for k in (1, 2, 3)] == [
        "-", "-0.030 [-0.157, +0.097] not distinguishable", "-0.310 [-0.437, -0.183]"]


def fake_final(mean_dice: float, nuc_dice: float, overall: float, nuc: float) -> dict:
    """A final_evaluation entry as evaluation.py writes it (the fields the report reads)."""
    return {"tilings": {"sliding": {"mean_dice": mean_dice, "per_class": {"nuc": {"dice": nuc_dice}}}},
            "official": {"overall": overall, "semantic_mean": overall ** 2 / nuc, "instance_mean": nuc,
                         "classes": {"nuc": {"kind": "instance", "combined": nuc}}}}


def test_final_evaluation_section_holds_2d_tta_against_25d(tmp_path):
    """Both metrics side by side, 2D + TTA + orthoplane as its own row and the reference of the paired
    official-nuc difference (hand-computed per seed)."""
    official_nuc = {("unet_2d", 0): 0.50, ("unet_2d", 1): 0.56, ("unet_25d", 0): 0.70, ("unet_25d", 1): 0.72}
    tta_nuc = {0: 0.60, 1: 0.62}
    for (model, seed), per_class in FAKE.items():
        results = fake_results(model, "dice", seed, per_class)
        results["final_evaluation"] = {"best": fake_final(0.5, 0.6, 0.4, official_nuc[(model, seed)])}
        if model == "unet_2d":
            results["final_evaluation"]["best_tta_orthoplane"] = fake_final(0.55, 0.65, 0.45, tta_nuc[seed])
        write_run(tmp_path, results)
    assert V.main([str(tmp_path), "--out", str(tmp_path / "report"), "--no-panel"]) == 0
    md = (tmp_path / "report" / "comparison.md").read_text()
    section = md.split("## Final evaluation: both metrics")[1].split("##")[0]
    header = table_row(section, "checkpoint")
    assert header[2:8] == ["8-nm mean Dice", "8-nm nuc Dice", "official overall", "official nuc",
                           "official semantic IoU", "official instance"]
    plain, tta, deeper = (table_row(section, label) for label in ("2D", "2D + TTA + orthoplane", "2.5D"))
    assert plain[5] == stat_text([0.50, 0.56]) and tta[5] == stat_text([0.60, 0.62]) and deeper[5] == stat_text([0.70, 0.72])
    assert tta[2] == "0.550 ± 0.000" and tta[8] == "reference"
    # 2.5D - (2D + TTA) per seed: +0.10, +0.10 -> +0.100, no spread; 2D - (2D + TTA): -0.10, -0.06 -> -0.080,
    # sd 0.02828, t(0.975, 1) = 12.706 -> +-0.254.
    assert deeper[8] == "+0.100 [+0.100, +0.100]"
    assert plain[8] == "-0.080 [-0.334, +0.174] not distinguishable"
    assert "official = the challenge's score at each crop's native resolution" in section


def test_nothing_usable_exits_2(tmp_path, capsys):
    write_run(tmp_path, fake_results("unet_2d", "dice", 0, FAKE[("unet_2d", 0)], status="running"))
    write_run(tmp_path, "empty-run")
    code = V.main([str(tmp_path / "unet_2d-dice-s0"), str(tmp_path / "empty-run"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no usable run") and err.count("\n") == 1


def test_panel_slices_hold_the_class():
    import numpy as np

    labels = np.zeros((2, 10, 4, 4), dtype=np.uint8)
    labels[0, 3:8, 1, 1] = 1          # class 0 present on slices 3..7 of the big crop
    labels[1] = 255                   # class 1 unannotated
    small = np.zeros_like(labels)
    small[0, 0, 0, 0] = 1
    # "huge" holds the most positives but is too large to predict whole for a panel.
    crops = {"big": SimpleNamespace(name="big", positives=np.array([5, 0]), labels=labels, shape=(10, 4, 4)),
             "small": SimpleNamespace(name="small", positives=np.array([1, 0]), labels=small, shape=(10, 4, 4)),
             "huge": SimpleNamespace(name="huge", positives=np.array([10**6, 0]), labels=None,
                                     shape=(plots.PANEL_MAX_CROP_VOXELS, 2, 1))}
    rows = plots.choose_slices(crops, ["nuc", "pm"], ["nuc", "pm"])
    assert [(cls, name) for cls, name, _ in rows] == [("nuc", "big")] * plots.PANEL_SLICES_PER_CLASS
    zs = [z for _, _, z in rows]
    assert len(set(zs)) == len(zs) and all(labels[0, z].any() for z in zs)


def test_panel_from_a_tiny_real_run(tiny_root, cli_env, tmp_path):
    done = run_script(["train_local.py", *TINY_RUN_OPTIONS, "--data-root", tiny_root, "--out-dir", tmp_path,
                       "--epochs", 1, "--iterations", 3, "--run-name", "tiny"], cli_env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "report"
    shown = run_script(["visualize_results.py", tmp_path / "tiny", "--out", out, "--panel-classes", "nuc"], cli_env,
                       timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "warning" not in shown.stdout
    panel = out / "panel.png"
    assert panel.read_bytes()[:8] == PNG_SIGNATURE and panel.stat().st_size > 20_000
    md = (out / "comparison.md").read_text()
    assert "![Validation slices](panel.png)" in md
    assert f"Panel: {plots.PANEL_SLICES_PER_CLASS} slices of nuc, best checkpoints" in md

    # The same run with its data gone: the panel fails soft with one warning, the rest is written.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "tiny", moved)
    results = json.loads((moved / "results.json").read_text())
    (moved / "results.json").write_text(json.dumps(dict(results, datasplit=str(tmp_path / "gone.csv"))))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert V.main([str(moved), "--out", str(tmp_path / "report2")]) == 0
    warnings = [line for line in stdout.getvalue().splitlines() if line.startswith("warning: panel.png")]
    assert len(warnings) == 1 and "gone.csv" in warnings[0]
    assert (tmp_path / "report2" / "dice_bars.png").is_file() and not (tmp_path / "report2" / "panel.png").exists()


def test_reports_on_different_runs_never_share_a_folder(tmp_path):
    runs = tmp_path / "runs"
    assert V.default_report_dir([runs / "a"]) == runs / "a" / "report"
    assert V.default_report_dir([runs]) == runs / "report"
    assert V.default_report_dir([runs / "a", runs / "b"]) == runs / "report-a+b"
    many = [runs / f"run-with-a-long-name-{i}" for i in range(5)]
    folder = V.default_report_dir(many)
    assert folder.parent == runs and folder.name.startswith("report-run-with-a-long-name-0+4-more-")
    assert folder != V.default_report_dir(many[:4] + [runs / "another"])
