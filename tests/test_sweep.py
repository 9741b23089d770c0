"""sweep.py: the quick options check, plans and their comparison, run states and actions, the loop with a stub
launcher, and a real sweep killed midway that, run again, trains only what is missing and reports exactly what
an uninterrupted sweep reports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sweep as S
from conftest import REPO, TINY_RUN_OPTIONS

TINY_SWEEP = [o for i, o in enumerate(TINY_RUN_OPTIONS)  # without --mode (the command's)
              if "--mode" not in TINY_RUN_OPTIONS[max(i - 1, 0):i + 1]] + ["--epochs", "2", "--iterations", "2"]


def sweep_cli(args, env=None, cwd=REPO, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sweep.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------
# The quick check
# ----------------------------------------------------------------------------------------------------
def test_check_makes_paths_absolute_against_the_given_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "split.csv").write_text("x")
    checked, notes = S.check_options(["--datasplit", "split.csv", "--data-root=data", "--epochs", "2",
                                      "--out-dir", "../elsewhere", "--loss-option", "alpha=0.6"], tmp_path)
    assert checked == ["--data-root", str(tmp_path / "data"), "--datasplit", str(tmp_path / "split.csv"),
                       "--epochs", "2", "--loss-option", "alpha=0.6", "--out-dir", str(tmp_path.parent / "elsewhere")]
    assert f"--data-root {tmp_path / 'data'}" in notes


@pytest.mark.parametrize("argv, message", [
    (["--epochz", "3"], "unknown option --epochz (did you mean --epochs?)"),
    (["--epoch", "3"], "unknown option --epoch (did you mean --epochs?)"),   # no silent abbreviation
    (["--epochs", "0"], "--epochs 0 is out of range: must be at least 1"),
    (["--data-root", "missing"], "--data-root {cwd}/missing: no such folder"),
    (["--resume", "."], "--resume {cwd}: not a run folder"),
])
def test_check_refuses_bad_options_with_one_line(tmp_path, argv, message):
    done = sweep_cli(["check", "--cwd", tmp_path, "--", *argv])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert message.format(cwd=tmp_path) in done.stderr


# ----------------------------------------------------------------------------------------------------
# Plans, states, actions
# ----------------------------------------------------------------------------------------------------
def plan_for(group: Path, seeds=(0, 1), options=("--epochs", "2"), losses=("dice", "focal")) -> dict:
    return S.make_plan(group, "compare", ["unet_2d"], list(losses), "loss_comparison", list(seeds), list(options))


def test_plan_lists_arms_times_seeds_with_the_real_seeds(tmp_path):
    plan = plan_for(tmp_path, seeds=(11, 12))
    assert [(r.index, r.arm, r.loss, r.seed, r.run_name) for r in map(lambda d: S.PlannedRun(**d), plan["runs"])] == [
        (0, 0, "dice", 11, "unet_2d-dice-s11"), (1, 0, "dice", 12, "unet_2d-dice-s12"),
        (2, 1, "focal", 11, "unet_2d-focal-s11"), (3, 1, "focal", 12, "unet_2d-focal-s12")]
    args = plan["runs"][1]["args"]
    assert S.option_value(args, "--seed") == "12" and S.option_value(args, "--out-dir") == str(tmp_path)
    assert S.option_value(args, "--mode") == "loss_comparison" and S.option_value(args, "--epochs") == "2"


def test_a_plan_refuses_options_the_sweep_sets_and_unknown_losses(tmp_path):
    with pytest.raises(S.InputError, match="--seed is set by the sweep"):
        plan_for(tmp_path, options=("--seed", "3"))
    with pytest.raises(S.InputError, match="unknown loss 'dise'"):
        plan_for(tmp_path, losses=("dise",))


def test_the_same_group_continues_only_with_the_same_plan(tmp_path):
    assert S.write_plan(tmp_path, plan_for(tmp_path)) == "new"
    assert S.write_plan(tmp_path, plan_for(tmp_path)) == "same"
    assert S.write_plan(tmp_path, plan_for(tmp_path, options=("--epochs", "2", "--workers", "3"))) == "same"
    with pytest.raises(S.InputError, match=r"options: stored --epochs 2, this command --epochs 3"):
        S.write_plan(tmp_path, plan_for(tmp_path, options=("--epochs", "3")))
    with pytest.raises(S.InputError, match=r"seeds: stored \[0, 1\], this command \[0, 1, 2\]"):
        S.write_plan(tmp_path, plan_for(tmp_path, seeds=(0, 1, 2)))


def write_results(folder: Path, status: str, epochs_done: int = 1, last_pt: bool = True) -> None:
    folder.mkdir(parents=True)
    history = [{"epoch": e + 1} for e in range(epochs_done)]
    (folder / "results.json").write_text(json.dumps({"status": status, "history": history, "config": {"epochs": 2},
                                                     "failure": "TrainingFailed: x" if status == "failed" else None}))
    if last_pt:
        (folder / "last.pt").write_bytes(b"x")


def test_each_folder_state_gets_its_action(tmp_path):
    S.write_plan(tmp_path, plan_for(tmp_path))
    plan = S.read_plan(tmp_path)
    runs = plan["runs"]
    write_results(tmp_path / runs[0].run_name, "completed", 2)
    write_results(tmp_path / runs[1].run_name, "running", 0, last_pt=False)   # killed before its first epoch
    write_results(tmp_path / runs[2].run_name, "failed", 1)
    states = [S.run_state(tmp_path, r) for r in runs]
    assert [s for s, _ in states] == ["completed", "running", "failed", "missing"]
    assert [S.ACTIONS[s] for s, _ in states] == ["skip", "resume", "resume", "new"]
    assert "no last.pt" in states[1][1]
    resume = S.run_args(tmp_path, runs[1], "resume")
    assert resume[-2:] == ["--resume", str(tmp_path / runs[1].run_name)] and resume[:-2] == list(runs[1].args)
    (tmp_path / runs[3].run_name).mkdir()        # a folder without results.json
    assert S.run_state(tmp_path, runs[3])[0] == "aborted"
    done = sweep_cli(["next", tmp_path])
    assert done.returncode == 0 and done.stdout.split() == ["1", "resume", runs[1].run_name]
    assert sweep_cli(["status", tmp_path, "--count", "runs"]).stdout.strip() == "4"
    assert sweep_cli(["status", tmp_path, "--complete"]).returncode == 1


STUB = """
import json, os, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
folder = os.path.join(value("--out-dir"), value("--run-name"))
os.makedirs(folder, exist_ok=True)
with open(os.path.join(os.path.dirname(folder), "stub.log"), "a") as f:
    f.write(json.dumps(args) + "\\n")
status = "failed" if "focal" in folder else "completed"
json.dump({"status": status, "history": [{"epoch": 1}], "config": {"epochs": 1}}, open(os.path.join(folder, "results.json"), "w"))
sys.exit(1 if status == "failed" else 0)
"""


def test_run_trains_the_selected_runs_once_each_and_moves_aborted_folders_aside(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    group = tmp_path / "g"
    S.write_plan(group, plan_for(group))
    runs = S.read_plan(group)["runs"]
    (group / runs[1].run_name).mkdir()
    (group / runs[1].run_name / "notes.txt").write_text("kept")
    # One array task: run 1 only (its aborted folder is moved aside, not deleted).
    assert S.run_sweep(group, index=1, launcher=[sys.executable, str(stub)]) == 0
    calls = [json.loads(line) for line in (group / "stub.log").read_text().splitlines()]
    assert [S.option_value(c, "--run-name") for c in calls] == [runs[1].run_name]
    aside = [p for p in group.iterdir() if p.name.startswith(runs[1].run_name + ".aborted-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "kept"
    assert not (group / "report").exists()          # the rest of the sweep is not done yet
    # The whole sweep: run 1 is skipped, the focal runs fail (tried once each), run 0 is trained.
    assert S.run_sweep(group, launcher=[sys.executable, str(stub)]) == 1
    calls = [json.loads(line) for line in (group / "stub.log").read_text().splitlines()]
    assert [S.option_value(c, "--run-name") for c in calls[1:]] == [runs[0].run_name, runs[2].run_name,
                                                                   runs[3].run_name]
    # Again: only the failed runs are tried, with --resume.
    assert S.run_sweep(group, arm=1, launcher=[sys.executable, str(stub)]) == 1
    calls = [json.loads(line) for line in (group / "stub.log").read_text().splitlines()]
    assert [(S.option_value(c, "--run-name"), "--resume" in c) for c in calls[4:]] == [
        (runs[2].run_name, True), (runs[3].run_name, True)]
    log = (group / S.LOG_FILE).read_text().splitlines()
    assert sum(" start " in line for line in log) == 6


# ----------------------------------------------------------------------------------------------------
# A real sweep, killed while its second run trains, then run again
# ----------------------------------------------------------------------------------------------------
def sweep_command(group: Path, data_root: Path) -> list[str]:
    return [str(REPO / "run.sh"), "compare", "--losses", "dice,baseline_bce,focal", "--group", str(group),
            "--data-root", str(data_root), *TINY_SWEEP]


def report_tables(group: Path) -> str:
    text = (group / "report" / "comparison.md").read_text().replace(str(group), "GROUP")
    return text.split("## Figures")[0]


def test_a_killed_sweep_trains_only_what_is_missing_and_reports_the_same(tiny_root, cli_env, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(sweep_command(whole, tiny_root), env=cli_env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(sweep_command(killed, tiny_root), env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    second = killed / "unet_2d-baseline_bce-s0" / "results.json"

    def second_run_half_done() -> bool:
        try:
            return len(json.loads(second.read_text())["history"]) == 1
        except (OSError, ValueError, KeyError):
            return False

    deadline = time.time() + 180
    try:
        while not second_run_half_done():
            assert proc.poll() is None, "the sweep ended before the kill point"
            assert time.time() < deadline, "kill point not reached"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep at once, as a crash or a lost node would
    finally:
        proc.wait()
    assert json.loads(second.read_text())["status"] == "running"
    starts_before = (killed / S.LOG_FILE).read_text().count(" start ")
    assert starts_before == 2

    again = subprocess.run(sweep_command(killed, tiny_root), env=cli_env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (killed / S.LOG_FILE).read_text().splitlines()
    rerun = [line.split()[1:5] for line in log if " start " in line][starts_before:]
    assert rerun == [["start", "1", "unet_2d-baseline_bce-s0", "resume"], ["start", "2", "unet_2d-focal-s0", "new"]]
    assert report_tables(killed) == report_tables(whole)
    assert "## Ranking by mean Dice" in report_tables(killed)
