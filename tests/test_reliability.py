"""Reliability of train_local.py through its real command line: SIGKILL at any point then --resume reproduces
the uninterrupted run, every bad input is one `error:` line with exit code 2 that changes no file, non-finite
steps are skipped and counted (many in a row stop the run), a failing DDP rank ends the whole run and a killed
one is named, a run that loses the race for its name takes the next one, a full disk during a checkpoint is
one line recorded in results.json, Ctrl-C names the command that resumes, and a resume says that best.pt is
missing."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import config_shenron as C
from runfiles import load_checkpoint, load_json
from conftest import (REPO, TINY_RUN_OPTIONS, epoch_metrics, epochs_recorded, folder_digest, kill_when, run_script,
                      run_training, start_training, training_command)
from ngff import multiscales_attrs
from losses import build_loss
from models import UNet
from engine import training_step
from runtime import oom_advice

BASE = [*TINY_RUN_OPTIONS, "--epochs", 3, "--iterations", 2, "--seed", 3]
GT = "tiny_iso/tiny_iso.zarr/recon-1/labels/groundtruth"


def assert_one_error_line(done: subprocess.CompletedProcess, *culprits: str) -> str:
    """stderr holds exactly one `error:` line naming every culprit, and nothing else but progress bars."""
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def reference(tiny_root, session_cli_env, tmp_path_factory) -> Path:
    """An uninterrupted run: the per-epoch metrics every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    done = run_training([*BASE, "--data-root", tiny_root, "--out-dir", out, "--run-name", "r"], session_cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "r"


# ---------------------------------------------------------------------------------------------- kills
def test_sigkill_at_any_point_then_resume_reproduces_the_uninterrupted_run(reference, tiny_root, session_cli_env,
                                                                          tmp_path):
    run_dir = tmp_path / "k"
    resume = ["--resume", run_dir]

    # 1. During epoch 1, before any checkpoint: results.json (written before training) is readable.
    first = [*BASE, "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "k"]
    kill_when(start_training(first, session_cli_env), lambda: epochs_recorded(run_dir) == 0)
    assert load_json(run_dir / "results.json")["status"] == "running" and not (run_dir / "last.pt").exists()

    # 2. In the middle of writing epoch 2's last.pt (paused between the temporary file and the rename).
    kill_when(start_training(resume, session_cli_env, faults=["--pause-in-save", 1]),
              lambda: (run_dir / ".last.pt.tmp").exists() and (run_dir / "last.pt").exists())
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert epochs_recorded(run_dir) == 1

    # 3. During epoch 3's training steps.
    kill_when(start_training(resume, session_cli_env), lambda: epochs_recorded(run_dir) == 2)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2

    # 4. Resume to the end: the same numbers as the run that was never interrupted.
    done = run_training(resume, session_cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming k at epoch 3/3" in done.stdout
    resumed, uninterrupted = load_json(run_dir / "results.json"), load_json(reference / "results.json")
    assert resumed["status"] == "completed"
    assert epoch_metrics(resumed["history"]) == epoch_metrics(uninterrupted["history"])
    assert (resumed["best_epoch"], resumed["best"]) == (uninterrupted["best_epoch"], uninterrupted["best"])


def test_resume_completes_results_of_a_run_killed_after_its_last_checkpoint(reference, session_cli_env, tmp_path):
    # The state a kill leaves between the final last.pt and the final results.json: results.json one epoch behind.
    run_dir = shutil.copytree(reference, tmp_path / "r")
    stale = load_json(run_dir / "results.json")
    stale.update(status="running", history=stale["history"][:-1])
    (run_dir / "results.json").write_text(json.dumps(stale))
    last_before = (run_dir / "last.pt").read_bytes()

    done = run_training(["--resume", run_dir], session_cli_env)
    assert done.returncode == 0 and "results.json completed from last.pt" in done.stdout, done.stderr[-3000:]
    completed = load_json(run_dir / "results.json")
    assert completed["status"] == "completed"
    assert completed["history"] == load_json(reference / "results.json")["history"]
    assert (run_dir / "last.pt").read_bytes() == last_before, "no epoch is trained again"


# ---------------------------------------------------------------------------------------------- bad input
def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    return path


def _add_array(group_path: Path, data: np.ndarray, translation_voxels, metadata: bool = True,
               voxel=(8.0, 8.0, 8.0), axes: str = "zyx") -> None:
    """One s0 array at 8 nm positions; `voxel` and `axes` as its metadata states them, written as plain JSON
    (so that NaN and negative sizes reach the reader as a file would hold them)."""
    group = zarr.open_group(str(group_path), mode="w")
    group.create_dataset("s0", data=data, chunks=data.shape)
    if metadata:
        attrs = multiscales_attrs([("s0", np.array(voxel), np.array(translation_voxels) * 8.0)])
        attrs["multiscales"][0]["axes"] = [{"name": a, "type": "space", "unit": "nanometer"} for a in axes]
        (group_path / ".zattrs").write_text(json.dumps(attrs))


@pytest.fixture(scope="module")
def bad_data(tiny_root, tmp_path_factory) -> dict[str, Path]:
    """A copy of the tiny dataset with broken additions, and one datasplit CSV per broken case."""
    base = tmp_path_factory.mktemp("bad")
    data = base / "data"
    shutil.copytree(tiny_root, data)
    gt = data / GT
    nuc = np.zeros((4, 16, 16), dtype=np.uint8)
    nuc[1:3, 4:12, 4:12] = 1
    _add_array(gt / "crop90/nuc", nuc, (1000, 0, 0))           # far outside the 24-slice raw volume
    _add_array(gt / "crop91/nuc", nuc, (8, 8, 8))              # inside, smaller than a 32x32 patch
    _add_array(gt / "crop92/nuc", nuc, (8, 8, 8), metadata=False)
    _add_array(data / "tiny_iso/tiny_iso.zarr/recon-1/em/fibsem-float", np.zeros((24, 128, 128), np.float32), (0, 0, 0))
    _add_array(gt / "crop93/nuc", nuc, (8, 8, 8), voxel=(8.0, -8.0, 8.0))
    _add_array(gt / "crop94/nuc", nuc, (8, 8, 8), voxel=(8.0, float("nan"), 8.0))
    _add_array(gt / "crop95/nuc", nuc, (8, 8, 8), voxel=(0.0, 8.0, 8.0))
    _add_array(gt / "crop96/nuc", nuc.transpose(2, 1, 0).copy(), (8, 8, 8), axes="xyz")  # legal OME-NGFF x,y,z
    _add_array(gt / "crop97/nuc", nuc, (8, 8, 8), axes="xyz")  # stored z,y,x, axes reversed in the metadata only
    _add_array(gt / "crop98/nuc", nuc, (8, 8, 8))
    _add_array(gt / "crop98/pm", nuc, (8, 20, 8))  # the crop's two class arrays 12 voxels apart

    with open(data / "datasplit.csv", newline="") as f:
        rows = [[field.replace(str(tiny_root), str(data)) for field in row] for row in csv.reader(f)]
    with open(data / "datasplit.csv", "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    train_rows = [r for r in rows if r[0] == "train"]

    def crop_row(split, crop, classes="nuc", raw="recon-1/em/fibsem-uint8"):
        zarr_path = str(data / "tiny_iso/tiny_iso.zarr")
        return [split, zarr_path, raw, zarr_path, f"recon-1/labels/groundtruth/{crop}/[{classes}]"]

    splits = base / "splits"
    splits.mkdir()
    first = rows[0]
    return {
        "data": data, "base": base,
        "report": _write_csv(splits / "report.csv", rows + [crop_row("train", "crop90"), crop_row("train", "crop91")]),
        "missing_zarr": _write_csv(splits / "missing_zarr.csv", [
            [first[0], first[1].replace("tiny_iso.zarr", "nope.zarr"), *first[2:]], *rows[1:]]),
        "missing_crop": _write_csv(splits / "missing_crop.csv", rows + [crop_row("train", "crop999")]),
        "missing_class": _write_csv(splits / "missing_class.csv", rows + [crop_row("train", "crop91", "nuc,perox")]),
        "wrong_dtype": _write_csv(splits / "wrong_dtype.csv",
                                  rows + [crop_row("train", "crop91", raw="recon-1/em/fibsem-float")]),
        "no_multiscales": _write_csv(splits / "no_multiscales.csv", rows + [crop_row("train", "crop92")]),
        "nothing_left": _write_csv(splits / "nothing_left.csv", train_rows + [crop_row("validate", "crop90")]),
        "negative_scale": _write_csv(splits / "negative_scale.csv", rows + [crop_row("train", "crop93")]),
        "nan_scale": _write_csv(splits / "nan_scale.csv", rows + [crop_row("train", "crop94")]),
        "zero_scale": _write_csv(splits / "zero_scale.csv", rows + [crop_row("train", "crop95")]),
        "xyz_stored": _write_csv(splits / "xyz_stored.csv", rows + [crop_row("train", "crop96")]),
        "xyz_metadata": _write_csv(splits / "xyz_metadata.csv", rows + [crop_row("train", "crop97")]),
        "boxes_disagree": _write_csv(splits / "boxes_disagree.csv", rows + [crop_row("train", "crop98", "nuc,pm")]),
        "duplicate": _write_csv(splits / "duplicate.csv", rows + [first]),
        "leak": _write_csv(splits / "leak.csv", rows + [["validate", *first[1:]]]),
        "empty_list": _write_csv(splits / "empty_list.csv", rows + [crop_row("train", "crop91", "")]),
        "no_validate": _write_csv(splits / "no_validate.csv", train_rows),
    }


@pytest.fixture(scope="module")
def broken_runs(reference, bad_data) -> Path:
    """Copies of the reference run whose last.pt is corrupt or truncated."""
    runs = bad_data["base"] / "runs"
    for name in ("corrupt", "truncated"):
        shutil.copytree(reference, runs / name)
    last = (runs / "corrupt" / "last.pt").read_bytes()
    (runs / "corrupt" / "last.pt").write_bytes(bytes(b ^ 0x5A for b in last[:4096]) + last[4096:])
    (runs / "truncated" / "last.pt").write_bytes(last[: len(last) // 2])
    return runs


NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")

# case -> (python arguments, extra environment, texts the error line must contain). Placeholders: {data} the
# broken dataset copy, {runs} a folder of existing runs, {tmp} a scratch folder, {<name>} a datasplit CSV.
TRAIN = ["train_local.py", *TINY_RUN_OPTIONS, "--epochs", "1", "--iterations", "3", "--out-dir", "{runs}"]
ON_DATA = [*TRAIN, "--data-root", "{data}"]
CHECK_CSV = ["data.py", "check-csv"]
BAD_INPUT = {
    "data root missing (--data-root)": ([*TRAIN, "--data-root", "{tmp}/nowhere"], {},
                                        ["--data-root", "{tmp}/nowhere", "does not exist"]),
    "data root missing ($CELLMAP_DATA_ROOT)": (TRAIN, {"CELLMAP_DATA_ROOT": "{tmp}/gone"},
                                               ["$CELLMAP_DATA_ROOT", "{tmp}/gone"]),
    "folder without CellMap data": ([*TRAIN, "--data-root", "{tmp}/empty"], {}, ["{tmp}/empty", "no CellMap data"]),
    "datasplit: missing zarr": ([*ON_DATA, "--datasplit", "{missing_zarr}"], {}, ["{missing_zarr} row 1", "nope.zarr"]),
    "datasplit: missing crop": ([*ON_DATA, "--datasplit", "{missing_crop}"], {}, ["{missing_crop} row 4", "crop999"]),
    "datasplit: missing class": ([*ON_DATA, "--datasplit", "{missing_class}"], {}, ["{missing_class} row 4", "perox"]),
    "unknown class set": ([*ON_DATA, "--classes", "most"], {}, ["--classes", "'most'", "quick"]),
    "unknown loss": ([*ON_DATA, "--loss", "dicey"], {}, ["'dicey'", "per_class_weighted"]),
    "unknown model": ([*ON_DATA, "--model", "unet_4d"], {}, ["--model", "'unet_4d'", "unet_25d"]),
    "unknown mode": ([*ON_DATA, "--mode", "fast"], {}, ["'fast'", "loss_comparison"]),
    "batch size 0": ([*ON_DATA, "--batch-size", "0"], {}, ["--batch-size 0", "at least 1"]),
    # Accepted before, then the machine swapped (the run seemed to hang); at the cpu profile's patch and width.
    "batch size beyond memory": ([*ON_DATA, "--batch-size", "100000", "--patch-yx", "128", "--base-channels", "16",
                                  "--depth", "4"], {}, ["--batch-size 100000", "GB", "host memory", "at most"]),
    "learning rate 0": ([*ON_DATA, "--lr", "0"], {}, ["--lr 0", "(0, 1]"]),
    "epochs 0": ([*ON_DATA, "--epochs", "0"], {}, ["--epochs 0"]),
    "schedule too short": ([*ON_DATA, "--epochs", "1", "--iterations", "2"], {}, ["--iterations 2", "at least 3"]),
    "Tversky alpha": ([*ON_DATA, "--loss", "tversky_precision", "--loss-option", "alpha=-1"], {}, ["alpha", "-1"]),
    "Tversky beta": ([*ON_DATA, "--loss", "tversky_recall", "--loss-option", "beta=-0.5"], {}, ["beta", "-0.5"]),
    "corrupt checkpoint": (["train_local.py", "--resume", "{runs}/corrupt"], {}, ["{runs}/corrupt/last.pt", "corrupt"]),
    "truncated checkpoint": (["train_local.py", "--resume", "{runs}/truncated"], {}, ["{runs}/truncated/last.pt", "truncated"]),
    "raw zarr of the wrong dtype": ([*ON_DATA, "--datasplit", "{wrong_dtype}"], {}, ["fibsem-float", "float32", "uint8"]),
    "missing multiscales metadata": ([*ON_DATA, "--datasplit", "{no_multiscales}"], {}, ["crop92", "multiscales"]),
    "output folder is a file": ([*ON_DATA, "--out-dir", "{tmp}/a-file"], {}, ["{tmp}/a-file", "not writable"]),
    "output folder read-only": ([*ON_DATA, "--out-dir", "{tmp}/read-only/runs"], {}, ["{tmp}/read-only", "not writable"]),
    "no validation crop left": ([*ON_DATA, "--datasplit", "{nothing_left}"], {},
                                ["{nothing_left}", "no usable validate crop", "1 listed"]),
    # A full disk, simulated in the real command: every fsync (only the run-file writes call it) fails.
    "full disk": (["tests/faults.py", "--disk-full", "--", *TRAIN, "--data-root", "{data}"], {},
                  ["disk full", "results.json"]),
    # Voxel sizes and axes (the same validation runs in check-csv and in training).
    "negative label voxel size": ([*ON_DATA, "--datasplit", "{negative_scale}"], {},
                                  ["{negative_scale} row 4", "crop93/nuc", "-8", "finite and positive"]),
    "label array stored x,y,z": ([*ON_DATA, "--datasplit", "{xyz_stored}"], {},
                                 ["{xyz_stored} row 4", "crop96/nuc", "x, y, z", "z, y, x"]),
    "check-csv: NaN voxel size": ([*CHECK_CSV, "{nan_scale}"], {}, ["{nan_scale} row 4", "crop94/nuc", "nan"]),
    "check-csv: zero voxel size": ([*CHECK_CSV, "{zero_scale}"], {},
                                   ["{zero_scale} row 4", "crop95/nuc", "finite and positive"]),
    "check-csv: axes reversed in the metadata only": ([*CHECK_CSV, "{xyz_metadata}"], {},
                                                      ["{xyz_metadata} row 4", "crop97/nuc", "x, y, z"]),
    "check-csv: class arrays of a crop disagree": ([*CHECK_CSV, "{boxes_disagree}"], {},
                                                   ["{boxes_disagree} row 4", "crop98", "'nuc'", "'pm'"]),
    # Split-level rules.
    "check-csv: duplicate row": ([*CHECK_CSV, "{duplicate}"], {}, ["{duplicate} rows 1 and 4", "twice"]),
    "check-csv: crop in train and validate": ([*CHECK_CSV, "{leak}"], {},
                                              ["{leak} rows 1 and 4", "train and validate"]),
    "check-csv: empty class list": ([*CHECK_CSV, "{empty_list}"], {}, ["{empty_list} row 4", "empty class list"]),
    "check-csv: no validate row": ([*CHECK_CSV, "{no_validate}"], {}, ["{no_validate}", "no 'validate' row"]),
    "datasplit: crop in train and validate": ([*ON_DATA, "--datasplit", "{leak}"], {},
                                              ["{leak} rows 1 and 4", "train and validate"]),
    "datasplit: no validate row": ([*ON_DATA, "--datasplit", "{no_validate}"], {}, ["{no_validate}", "no 'validate' row"]),
    "evaluate: corrupt checkpoint": (["evaluate.py", "{runs}/corrupt", "--checkpoint", "last"], {},
                                     ["{runs}/corrupt/last.pt", "corrupt"]),
    "evaluate: truncated checkpoint": (["evaluate.py", "{runs}/truncated", "--checkpoint", "last"], {},
                                       ["{runs}/truncated/last.pt", "truncated"]),
    "evaluate: overlap out of range": (["evaluate.py", "{runs}/corrupt", "--overlap", "1.5"], {}, ["--overlap 1.5"]),
}


@pytest.fixture(scope="module")
def bad_input_runs(bad_data, broken_runs, session_cli_env, tmp_path_factory):
    """Every case run as a real command (three at a time), with digests of all files before and after."""
    tmp = tmp_path_factory.mktemp("elsewhere")
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("not a dataset\n")
    (tmp / "a-file").write_text("a file where the output folder should be\n")
    (tmp / "read-only").mkdir(mode=0o555)
    places = {**{k: str(v) for k, v in bad_data.items()}, "runs": str(broken_runs), "tmp": str(tmp)}
    fill = lambda texts: [t.format(**places) for t in texts]
    cases = {name: (fill(args), {k: v.format(**places) for k, v in env.items()}, fill(culprits))
             for name, (args, env, culprits) in BAD_INPUT.items()
             if not (name == "output folder read-only" and os.geteuid() == 0)}
    watched = (bad_data["base"], tmp)
    before = folder_digest(*watched)
    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(cases, pool.map(lambda c: run_script(c[0], {**session_cli_env, **c[1]}), cases.values())))
    return cases, done, before, folder_digest(*watched)


@pytest.mark.parametrize("case", [pytest.param(n, marks=NOT_ROOT) if n == "output folder read-only" else n
                                  for n in BAD_INPUT])
def test_bad_input_is_one_error_line_with_exit_code_2(bad_input_runs, case):
    cases, done, _, _ = bad_input_runs
    result = done[case]
    assert result.returncode == 2, (case, result.stdout[-2000:], result.stderr[-2000:])
    assert_one_error_line(result, *cases[case][2])


def test_bad_input_changes_no_file(bad_input_runs):
    _, _, before, after = bad_input_runs
    assert after == before


def test_report_names_dropped_crop_when_nothing_is_left(bad_input_runs):
    _, done, _, _ = bad_input_runs
    assert "dropped tiny_iso/crop90 (labels at 8 x 8 x 8 nm): crop lies outside its raw volume" in done["no validation crop left"].stdout


# ---------------------------------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def nonfinite_runs(bad_data, session_cli_env, tmp_path_factory):
    """Two runs side by side: a few forced non-finite steps (on the datasplit with a dropped and a small
    crop), and a non-finite streak longer than --max-nonfinite starting in epoch 2."""
    out = tmp_path_factory.mktemp("nonfinite")
    some = [*TINY_RUN_OPTIONS, "--epochs", 2, "--iterations", 3, "--data-root", bad_data["data"],
            "--datasplit", bad_data["report"], "--out-dir", out, "--run-name", "some"]
    many = [*BASE, "--data-root", bad_data["data"], "--out-dir", out, "--run-name", "many", "--max-nonfinite", 3]
    runs = ((some, ["--nonfinite-steps", "1,2"]), (many, ["--nonfinite-steps", "2,3,4,5,6,7"]))
    with ThreadPoolExecutor(2) as pool:
        some_done, many_done = pool.map(lambda run: run_training(run[0], session_cli_env, faults=run[1]), runs)
    return out, some_done, many_done


def test_some_nonfinite_steps_are_skipped_and_counted(nonfinite_runs):
    out, done, _ = nonfinite_runs
    assert done.returncode == 0, done.stderr[-3000:]
    results = load_json(out / "some" / "results.json")
    assert results["status"] == "completed"
    assert [h["nonfinite_steps"] for h in results["history"]] == [2, 0]
    assert all(np.isfinite(h["train_loss"]) for h in results["history"])
    assert "2 non-finite steps skipped" in done.stdout


def test_data_report_counts_dropped_and_small_crops(nonfinite_runs):
    _, done, _ = nonfinite_runs
    assert "train: 3/4 crops used" in done.stdout, "the crop smaller than a patch is used, NaN-padded"
    assert "dropped tiny_iso/crop90 (labels at 8 x 8 x 8 nm): crop lies outside its raw volume" in done.stdout
    assert "WARNING: 1 of 5 crops dropped" in done.stdout


def test_a_nonfinite_streak_stops_the_run_with_a_usable_checkpoint(nonfinite_runs):
    out, _, done = nonfinite_runs
    assert done.returncode == 1
    line = assert_one_error_line(done, "run many failed", "3 consecutive non-finite", "last.pt")
    results = load_json(out / "many" / "results.json")
    assert results["status"] == "failed" and "3 consecutive non-finite" in results["failure"], line
    first, second = results["history"]
    assert (first["nonfinite_steps"], second["nonfinite_steps"]) == (0, 2) and second["train_loss"] is None
    # Skipped steps change nothing, BatchNorm statistics included: epoch 2 scores exactly like epoch 1.
    assert second["per_class"] == first["per_class"]
    last, best = load_checkpoint(out / "many" / "last.pt"), load_checkpoint(out / "many" / "best.pt")
    assert (last["epoch"], best["epoch"]) == (2, 1)
    assert all(torch.equal(last["model"][k], best["model"][k]) for k in best["model"])


def test_a_killed_ddp_rank_is_named_in_the_failure(tiny_root, session_cli_env, tmp_path):
    # Rank 1 dies as the out-of-memory killer would end it: it records nothing, and rank 0 only sees gloo's
    # "Connection reset by peer" in its next collective.
    done = run_training([*BASE, "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "killed"],
                        session_cli_env, processes=2, faults=["--kill", "1:3"])
    assert done.returncode != 0
    failure = load_json(tmp_path / "killed" / "results.json")["failure"]
    assert failure.startswith("rank 1 stopped without recording a reason"), failure
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: run killed failed: ")]
    assert len(lines) == 1 and "rank 1 stopped" in lines[0], done.stderr[-3000:]


def test_an_exception_on_one_ddp_rank_ends_the_run_promptly_and_is_recorded(tiny_root, session_cli_env, tmp_path):
    done = run_training([*BASE, "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "ddp"], session_cli_env,
                        processes=2, faults=["--raise", "1:3"])
    ended = time.time()
    run_dir = tmp_path / "ddp"
    assert done.returncode != 0
    assert ended - (run_dir / "failure_rank1.txt").stat().st_mtime < 60, "the other rank must not hang"
    results = load_json(run_dir / "results.json")
    assert results["status"] == "failed" and results["world_size"] == 2
    assert "injected failure on rank 1 at step 3" in results["failure"]
    assert len(results["history"]) == 1 and load_checkpoint(run_dir / "last.pt")["epoch"] == 1


def test_a_run_that_loses_the_race_for_its_name_takes_the_next_one_and_deletes_nothing(tiny_root, session_cli_env,
                                                                                     tmp_path):
    # The other run creates folder "race" between this run's choice of the name and its mkdir.
    winner = tmp_path / "race"
    done = run_training([*BASE, "--epochs", 1, "--iterations", 3, "--data-root", tiny_root, "--out-dir", tmp_path,
                         "--run-name", "race"], session_cli_env, faults=["--take-folder", winner])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (winner / "last.pt").read_bytes() == b"the other run's checkpoint"
    assert sorted(p.name for p in winner.iterdir()) == ["last.pt"]
    assert load_json(tmp_path / "race-2" / "results.json")["status"] == "completed"
    assert "run name race is taken" in done.stdout and str(tmp_path / "race-2") in done.stdout


def test_a_full_disk_during_a_checkpoint_is_one_line_recorded_and_keeps_the_previous_checkpoint(
        reference, tiny_root, session_cli_env, tmp_path):
    # The disk fills up after epoch 1's writes (results.json at the start; best.pt, last.pt, results.json): room
    # is left for half a checkpoint, enough to record the failure in results.json, not for epoch 2's checkpoint.
    checkpoint, results = (reference / "last.pt").stat().st_size, (reference / "results.json").stat().st_size
    assert results < checkpoint // 2
    done = run_training([*BASE, "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "full"],
                        session_cli_env, faults=["--disk-full-after", f"4:{checkpoint // 2}"])
    run_dir = tmp_path / "full"
    assert done.returncode == 1
    line = assert_one_error_line(done, "run full failed", f"disk full while writing {run_dir}/", "MB needed",
                                 "MB free on", f"last good checkpoint: {run_dir / 'last.pt'}")
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")], "temporary files are removed"
    results = load_json(run_dir / "results.json")
    assert results["status"] == "failed" and "disk full while writing" in results["failure"], line
    assert len(results["history"]) == 1
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1 and load_checkpoint(run_dir / "best.pt")["epoch"] == 1


def test_a_failing_final_evaluation_is_one_line_recorded_and_keeps_the_trained_run(tiny_root, session_cli_env,
                                                                                   tmp_path):
    # Found on the mock of the real download: the official scorer ran out of memory after training; the run
    # said "completed" and printed a raw traceback, with no record of the failed evaluation.
    done = run_training([*TINY_RUN_OPTIONS, "--epochs", 1, "--iterations", 3, "--seed", 3, "--final-evaluation", "official",
                         "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "fe"], session_cli_env,
                        faults=["--fail-official-scoring"])
    run_dir = tmp_path / "fe"
    assert done.returncode == 1
    assert_one_error_line(done, "the final evaluation failed (MemoryError", "the trained checkpoints are kept",
                          f"./run.sh evaluate {run_dir} --official")
    results = load_json(run_dir / "results.json")
    assert results["status"] == "completed" and len(results["history"]) == 1
    failure = results["final_evaluation"]["failure"]
    assert failure["reason"].startswith("MemoryError") and "out_of_memory" in failure["traceback"]
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 1


def test_ctrl_c_names_the_resume_command_that_continues_to_the_same_history(reference, tiny_root, session_cli_env,
                                                                            tmp_path):
    run_dir = tmp_path / "c"
    args = [*BASE, "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "c"]
    # Ctrl-C while epoch 1's first checkpoint is being written (paused between its temporary file and the rename):
    # the write finishes first (run files defer Ctrl-C and SIGTERM), then the run stops.
    proc = subprocess.Popen([sys.executable, *training_command(args, ["--pause-in-save", 5])], cwd=REPO,
                            env=session_cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / ".best.pt.tmp").exists():
        assert proc.poll() is None and time.time() < deadline, "the first checkpoint write was not reached"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 1
    line = assert_one_error_line(done, "run c failed: interrupted", "no checkpoint yet", "continue with: python ",
                                 f"train_local.py --resume {run_dir}")
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "results.json", "tensorboard"], \
        "the interrupted write completed, and no temporary file is left"
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 1
    assert load_json(run_dir / "results.json")["status"] == "failed"

    command = shlex.split(line.split("continue with: ")[1])
    resumed = run_script(command[1:], session_cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = load_json(run_dir / "results.json")["history"]
    assert epoch_metrics(history) == epoch_metrics(load_json(reference / "results.json")["history"])


def test_resume_says_that_best_pt_is_missing(nonfinite_runs, session_cli_env, tmp_path):
    out, _, _ = nonfinite_runs
    run_dir = shutil.copytree(out / "many", tmp_path / "many")  # failed in epoch 2; best epoch 1
    (run_dir / "best.pt").unlink()
    done = run_training(["--resume", run_dir], session_cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: {run_dir / 'best.pt'} is missing" in done.stdout, done.stdout[-3000:]
    assert "epoch 1" in done.stdout and "--checkpoint last" in done.stdout


# ---------------------------------------------------------------------------------------------- unit checks
def test_skipped_training_step_leaves_no_trace():
    """A non-finite step changes neither the weights, the optimiser state nor the BatchNorm statistics;
    a finite one changes all three."""
    torch.manual_seed(0)
    model = UNet(1, 2, dims=2, base_channels=4, depth=2)
    loss_fn = build_loss("dice_bce", C.QUICK_CLASSES[:2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x, y = torch.rand(2, 1, 16, 16), (torch.rand(2, 2, 16, 16) > 0.5).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(logits, target, **kw):  # what an overflowing batch gives
        loss, per_class = loss_fn(logits, target, **kw)
        return loss * float("nan"), per_class

    skipped = training_step(model, model, nan_loss, optimizer, scaler, contextlib.nullcontext, x, y, 1.0)
    assert not skipped.stepped and skipped.nonfinite and not skipped.backoff and not optimizer.state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    result = training_step(model, model, loss_fn, optimizer, scaler, contextlib.nullcontext, x, y, 1.0)
    assert result.stepped and not result.nonfinite and np.isfinite(result.loss) and result.per_class.shape == (2,)
    assert optimizer.state
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("weight") for k in changed)


class CountingScaler(torch.amp.GradScaler):
    """A GradScaler that reports every gradient as non-finite, as an fp16 overflow does (it needs CUDA to run
    for real): unscale_ records the overflow, step is skipped, update lowers the scale."""

    def __init__(self):
        super().__init__("cpu", init_scale=1024.0)
        self.updates = 0

    def unscale_(self, optimizer):
        for p in (p for group in optimizer.param_groups for p in group["params"] if p.grad is not None):
            p.grad.fill_(float("inf"))

    def update(self, new_scale=None):
        self.updates += 1


def test_a_grad_scaler_back_off_is_not_a_nonfinite_step():
    """fp16: non-finite gradients of a finite loss are the GradScaler's normal back-off (it skips the update
    and lowers its scale); only a non-finite loss, or non-finite gradients without a scaler, counts as a non-finite step."""
    torch.manual_seed(0)
    model = UNet(1, 2, dims=2, base_channels=4, depth=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(2, 1, 16, 16), (torch.rand(2, 2, 16, 16) > 0.5).float()
    scaler = CountingScaler()
    result = training_step(model, model, build_loss("dice_bce", C.QUICK_CLASSES[:2]), optimizer, scaler,
                           contextlib.nullcontext, x, y, 1.0)
    assert result.backoff and not result.nonfinite and not result.stepped and scaler.updates == 1
    assert np.isfinite(result.loss) and not optimizer.state


@pytest.mark.parametrize("batch, peak_gib, advice", [
    (12, 10.5, "try --batch-size 10"),  # peak recorded near the 11 GiB limit: scale, with 15% headroom
    (12, 2.0, "try --batch-size 6"),    # peak far below it (the failed allocation is not counted): halve
    (2, 10.9, "try --batch-size 1"),
    (1, 10.9, "lower --patch-yx or --base-channels"),
])
def test_out_of_memory_advice_names_a_smaller_batch(batch, peak_gib, advice):
    line = oom_advice(batch, int(peak_gib * 2**30), 11 * 2**30)
    assert line.startswith(f"GPU out of memory at --batch-size {batch} ({peak_gib:.1f} of 11.0 GiB)")
    assert line.endswith(advice)


def test_a_hung_ddp_rank_is_recorded_by_the_watchdog(tiny_root, session_cli_env, tmp_path):
    """Rank 1 stops responding (a process stuck in a driver call): under NCCL its peers could wait in a collective
    for ever. The watchdog records the failure on rank 0 and ends the run, well within the collectives' timeout."""
    env = dict(session_cli_env, CELLMAP_WATCHDOG_S="15", CELLMAP_DDP_TIMEOUT_MIN="10")
    started = time.time()
    done = run_training([*BASE, "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "hang"], env,
                        processes=2, faults=["--hang", "1:3"], timeout=180)
    assert done.returncode != 0 and time.time() - started < 120
    results = load_json(tmp_path / "hang" / "results.json")
    assert results["status"] == "failed" and "no progress for" in results["failure"] and "watchdog" in results["failure"]
    assert "rank 0" in results["failure"]
