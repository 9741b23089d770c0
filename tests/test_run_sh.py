"""run.sh: paths from the caller's directory, a quick options check without torch, GPUs counted without torch,
--seed with --seeds, --out-dir as the parent of a group, report folders named after their runs, two "nodes" on
localhost against the standalone run, and the SLURM templates with stub srun/scontrol (the torchrun command
they build, the requeue on SIGUSR1).

Most tests replace the virtual environment ($CELLMAP_VENV) by a fake one whose python records every
train_local.py / visualize_results.py call (and runs anything else with the real interpreter) and whose
torchrun records its command line; they check what run.sh launches without training anything."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_RUN_OPTIONS, epoch_metrics, run_training

RUN_SH = REPO / "run.sh"
SLURM = REPO / "slurm"
TINY = [o for i, o in enumerate(TINY_RUN_OPTIONS)  # without --mode (run.sh's commands set it)
        if "--mode" not in TINY_RUN_OPTIONS[max(i - 1, 0):i + 1]]

FAKE_TOOL = r'''
import json, os, signal, sys, time
prog, args = sys.argv[1], sys.argv[2:]
def record(entry):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")
record({"prog": prog, "cwd": os.getcwd(), "argv": args})
if prog == "torchrun" and os.environ.get("FAKE_HOLD"):
    def stop(signum, frame):
        record({"prog": prog, "event": "SIGTERM"})
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    record({"prog": prog, "event": "training"})
    while True:
        time.sleep(0.05)
if os.environ.get("FAKE_COMPLETE") and prog != "visualize_results.py":  # leave a completed run folder
    value = lambda flag: args[args.index(flag) + 1] if flag in args else None
    folder = value("--resume") or os.path.join(value("--out-dir"), value("--run-name"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"status": "completed", "history": [{"epoch": 1}], "config": {"epochs": 1}}, f)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''


@pytest.fixture
def fake(tmp_path, cli_env):
    """(environment, log reader): a fake venv on $CELLMAP_VENV, stub nvidia-smi/srun/scontrol on PATH (the GPU
    count comes from $FAKE_GPUS, default none)."""
    venv, stubs = tmp_path / "fake-venv", tmp_path / "stubs"
    (venv / "bin").mkdir(parents=True)
    stubs.mkdir()
    shutil.copy(REPO / ".venv" / ".requirements.sha256", venv / ".requirements.sha256")
    (venv / "fake_tool.py").write_text(FAKE_TOOL)
    real = sys.executable
    scripts = {
        venv / "bin" / "python": f'''#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_LOG.python"
case "${{1:-}}" in
    train_local.py|visualize_results.py) exec "{real}" "{venv}/fake_tool.py" "$@" ;;
esac
exec "{real}" "$@"
''',
        venv / "bin" / "torchrun": f'#!/usr/bin/env bash\nexec "{real}" "{venv}/fake_tool.py" torchrun "$@"\n',
        stubs / "nvidia-smi": '#!/usr/bin/env bash\n[[ "${1:-}" == -L ]] || exit 9\n'
                              'for ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: Fake (UUID: GPU-$i)"; done\n',
        stubs / "srun": '#!/usr/bin/env bash\nprintf "%s\\n" "srun $*" >> "$FAKE_LOG.slurm"\n'
                        'while [[ "${1:-}" == -* ]]; do shift; done\nexec "$@"\n',
        stubs / "scontrol": '#!/usr/bin/env bash\nprintf "%s\\n" "scontrol $*" >> "$FAKE_LOG.slurm"\n'
                            'if [[ "$1 $2" == "show hostnames" ]]; then echo gpu07; echo gpu08; fi\n',
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(0o755)
    log = tmp_path / "fake.log"
    env = dict(cli_env, CELLMAP_VENV=str(venv), FAKE_LOG=str(log), PATH=f"{stubs}:{cli_env['PATH']}",
               CELLMAP_RUNS_DIR=str(tmp_path / "default-runs"))  # never the repository's runs/
    env.pop("CUDA_VISIBLE_DEVICES", None)

    def calls(prog: str | None = None) -> list[dict]:
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        return [e for e in entries if prog is None or e["prog"] == prog]

    return env, calls


def run_sh(args, env, cwd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUN_SH), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def value(argv: list[str], flag: str):
    """The value after `flag` (also in --flag=value form), or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


@pytest.fixture
def caller(tmp_path) -> Path:
    """A working directory away from the repository, holding a data folder, a CSV and a run folder."""
    here = tmp_path / "caller"
    (here / "synth_copy").mkdir(parents=True)
    (here / "split.csv").write_text("")
    for name in ("a", "b"):
        (here / "runs" / name).mkdir(parents=True)
        (here / "runs" / name / "results.json").write_text("{}")
    return here


# ----------------------------------------------------------------------------------------------------
# 1. Paths
# ----------------------------------------------------------------------------------------------------
def test_relative_paths_are_taken_from_the_callers_directory(fake, caller):
    env, calls = fake
    done = run_sh(["quick", "--data-root", "synth_copy", "--datasplit", "split.csv", "--out-dir", "runs2"], env, caller)
    assert done.returncode == 0, done.stderr
    (train,) = calls("train_local.py")
    assert train["cwd"] == str(REPO)  # python still runs in the repository
    argv = train["argv"]
    assert value(argv, "--data-root") == str(caller / "synth_copy")
    assert value(argv, "--datasplit") == str(caller / "split.csv")
    assert value(argv, "--out-dir") == str(caller / "runs2")
    assert f"--data-root {caller / 'synth_copy'}" in done.stdout + done.stderr  # the absolute paths are shown

    assert run_sh(["resume", "runs/a"], env, caller).returncode == 0
    assert value(calls("train_local.py")[-1]["argv"], "--resume") == str(caller / "runs" / "a")
    assert run_sh(["report", "runs/a"], env, caller).returncode == 0
    assert calls("visualize_results.py")[-1]["argv"][0] == str(caller / "runs" / "a")


def test_a_missing_relative_folder_names_the_directory_it_was_looked_for_in(fake, caller):
    env, calls = fake
    done = run_sh(["quick", "--data-root", "no_such_copy"], env, caller)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"error: --data-root {caller / 'no_such_copy'}: no such folder" in done.stderr
    assert str(caller) in done.stderr and not calls("train_local.py")


# ----------------------------------------------------------------------------------------------------
# 2. A mistyped option: reported at once, torch never imported
# ----------------------------------------------------------------------------------------------------
def test_a_mistyped_option_fails_in_well_under_a_second(cli_env, tmp_path):
    best = None
    for _ in range(2):  # the better of two: the machine is shared
        start = time.perf_counter()
        done = run_sh(["quick", "--epochz", "3"], cli_env, tmp_path)
        best = min(best or 1e9, time.perf_counter() - start)
    assert done.returncode == 2
    assert done.stderr == ("error: unknown option --epochz (did you mean --epochs?); train_local.py --help lists "
                           "the options\n")
    assert best < 1.5, f"time to the error: {best:.2f} s"


def test_no_torch_before_the_options_are_checked_and_no_silent_abbreviation(fake, tmp_path):
    env, calls = fake
    done = run_sh(["quick", "--epoch", "3"], env, tmp_path)  # argparse alone would take it as --epochs
    assert done.returncode == 2 and "unknown option --epoch (did you mean --epochs?)" in done.stderr
    assert calls() == []
    python_calls = Path(env["FAKE_LOG"] + ".python").read_text()
    assert "import torch" not in python_calls and python_calls.startswith("sweep.py check")


@pytest.mark.parametrize("gpus, visible, processes", [(2, None, 2), (4, "1,3", 2), (2, "", 0), (0, None, 0)])
def test_gpus_are_counted_without_torch(fake, tmp_path, gpus, visible, processes):
    env, calls = fake
    env["FAKE_GPUS"] = str(gpus)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    assert run_sh(["quick", "--epochs", "1"], env, tmp_path).returncode == 0
    if processes:
        (launch,) = calls("torchrun")
        assert "--standalone" in launch["argv"]
        assert (value(launch["argv"], "--nproc-per-node") or value(launch["argv"], "--nproc_per_node")) == str(processes)
    else:
        assert calls("torchrun") == [] and len(calls("train_local.py")) == 1


# ----------------------------------------------------------------------------------------------------
# 3 and 4. --out-dir with a group; --seed with --seeds
# ----------------------------------------------------------------------------------------------------
def test_seeds_start_at_the_given_seed_and_name_the_runs(fake, tmp_path):
    env, calls = fake
    run_sh(["compare-models", "--seed", "11", "--seeds", "2", "--epochs", "1"], env, tmp_path)
    runs = [(value(c["argv"], "--model"), value(c["argv"], "--seed"), value(c["argv"], "--run-name"))
            for c in calls("train_local.py")]
    assert runs == [("unet_2d", "11", "unet_2d-per_class_weighted-s11"), ("unet_2d", "12", "unet_2d-per_class_weighted-s12"),
                    ("unet_25d", "11", "unet_25d-per_class_weighted-s11"),
                    ("unet_25d", "12", "unet_25d-per_class_weighted-s12")]
    run_sh(["quick", "--seed", "5", "--seeds", "2"], env, tmp_path)
    assert [value(c["argv"], "--seed") for c in calls("train_local.py")[4:]] == ["5", "6"]


def test_compare_models_out_dir_is_the_parent_of_the_group_and_its_report(fake, caller):
    env, calls = fake
    env["FAKE_COMPLETE"] = "1"  # each fake run leaves a completed results.json, so the sweep reports
    done = run_sh(["compare-models", "--out-dir", "outs", "--epochs", "1"], env, caller)
    assert done.returncode == 0, done.stdout + done.stderr
    (group,) = (caller / "outs").glob("compare-models-*")
    assert (group / "sweep.json").is_file() and f"group folder {group}" in done.stdout
    assert [value(c["argv"], "--out-dir") for c in calls("train_local.py")] == [str(group), str(group)]
    (report,) = calls("visualize_results.py")
    assert report["argv"][:3] == [str(group), "--out", str(group / "report")]


# ----------------------------------------------------------------------------------------------------
# 6. Report folders
# ----------------------------------------------------------------------------------------------------
def test_reports_on_different_runs_never_share_a_folder(fake, caller):
    """run.sh passes the run folders (absolute, from the caller's directory) and leaves the report folder to
    visualize_results.py, which names it after the runs (tests/test_visualize.py)."""
    env, calls = fake
    for args in (["runs/a"], ["runs/a", "runs/b"], ["runs/a", "--out", "elsewhere"]):
        assert run_sh(["report", *args], env, caller).returncode == 0
    argvs = [c["argv"] for c in calls("visualize_results.py")]
    assert [a for a in argvs[0] if not a.startswith("-")][-1] == str(caller / "runs" / "a")
    assert "--out" not in argvs[0] and "--out" not in argvs[1]
    assert value(argvs[2], "--out") == str(caller / "elsewhere")


# ----------------------------------------------------------------------------------------------------
# Bad input at run.sh's level
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["compare", "--loss", "dice"], "error: --loss is set by the sweep for each run; compare trains every loss"),
    (["quick", "--nodes", "2"], "error: --nodes 2 needs --node-rank R"),
    (["quick", "--nodes", "2", "--node-rank", "1"], "error: --nodes 2 needs --master HOST:PORT"),
    (["quick", "--seeds", "two"], "error: --seeds two must be a positive integer"),
    (["train", "--seeds", "2"], "error: --seeds is for the training commands"),
    (["sweep", "nowhere"], "sweep.json not found"),
])
def test_bad_launcher_input_is_one_error_line(fake, tmp_path, args, message):
    env, calls = fake
    done = run_sh(args, env, tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert calls("train_local.py") == [] and calls("torchrun") == []


# ----------------------------------------------------------------------------------------------------
# 8. Two nodes on localhost
# ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_what_the_standalone_run_trains(tiny_root, cli_env, tmp_path):
    options = ["--data-root", tiny_root, *TINY, "--mode", "quick", "--epochs", "1", "--iterations", "3", "--seed", "5",
               "--out-dir", tmp_path]
    master = f"127.0.0.1:{free_port()}"
    nodes = []
    for rank in (0, 1):  # c10d orders the nodes by (host, agent pid): node 0 starts first so that it gets rank 0
        nodes.append(subprocess.Popen([str(RUN_SH), "train", "--nodes", "2", "--node-rank", str(rank), "--master",
                                       master, "--gpus", "1", *map(str, options), "--run-name", "two-nodes"],
                                      cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        time.sleep(1.0)
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "c10d rendezvous at " + master in outputs[1]
    alone = run_training([*options, "--run-name", "standalone"], cli_env, processes=2, timeout=240)
    assert alone.returncode == 0, alone.stderr[-2000:]
    two, one = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("two-nodes", "standalone"))
    assert two["world_size"] == one["world_size"] == 2
    assert epoch_metrics(two["history"]) == epoch_metrics(one["history"])


# ----------------------------------------------------------------------------------------------------
# 9. SLURM templates
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", sorted(p.name for p in SLURM.glob("*.sbatch")) + ["requeue.sh"])
def test_slurm_templates_parse(template):
    done = subprocess.run(["bash", "-n", str(SLURM / template)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def slurm_env(env: dict, tmp_path: Path, **more) -> dict:
    return dict(env, SLURM_JOB_ID="4242", SLURM_JOB_NAME="test", SLURM_SUBMIT_DIR=str(REPO), FAKE_GPUS="4",
                CUDA_VISIBLE_DEVICES="0,1,2,3", CELLMAP_GROUP=str(tmp_path / "group"), **more)


def test_multinode_template_builds_the_c10d_torchrun_command(fake, tmp_path):
    env, calls = fake
    env = slurm_env(env, tmp_path, SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]")
    for node in ("0", "1"):  # what srun runs on each node (node 0 writes the sweep file, node 1 reads it)
        done = subprocess.run(["bash", str(SLURM / "train_multinode.sbatch"), "quick", "--epochs", "1"], cwd=tmp_path,
                              env=dict(env, SLURM_NODEID=node), capture_output=True, text=True, timeout=120)
        assert f"run.sh: node {node} of 2, 4 process(es) here, c10d rendezvous at gpu07:29642" in done.stdout, \
            done.stdout + done.stderr
    launches = [c["argv"] for c in calls("torchrun")]
    assert len(launches) == 2
    for node, argv in enumerate(launches):
        assert argv[:argv.index("train_local.py")] == [
            "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "4", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "gpu07:29642", "--rdzv-id", "4242-unet_2d-per_class_weighted-s0"]
        assert value(argv, "--out-dir") == str(tmp_path / "group")
    assert launches[0][launches[0].index("train_local.py"):] == launches[1][launches[1].index("train_local.py"):]
    slurm_log = Path(env["FAKE_LOG"] + ".slurm").read_text()
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1" in slurm_log and "requeue" not in slurm_log


def test_1node_template_requeues_after_the_run_has_stopped_on_sigusr1(fake, tmp_path):
    env, calls = fake
    env = slurm_env(env, tmp_path, FAKE_HOLD="1")
    job = subprocess.Popen(["bash", str(SLURM / "train_1node.sbatch"), "quick", "--epochs", "1"], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not any(c.get("event") == "training" for c in calls("torchrun")):
        assert job.poll() is None and time.time() < deadline, job.communicate()[0]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` delivers to the batch shell
    output = job.communicate(timeout=60)[0]
    assert job.returncode == 0, output
    launch = calls("torchrun")[0]["argv"]
    assert launch[:3] == ["--standalone", "--nproc-per-node", "4"]
    assert value(launch, "--out-dir") == str(tmp_path / "group")
    assert [c.get("event") for c in calls("torchrun")][1:] == ["training", "SIGTERM"]
    slurm_log = Path(env["FAKE_LOG"] + ".slurm").read_text().splitlines()
    assert slurm_log == ["scontrol requeue 4242"]
    assert "SIGUSR1: training stopped after saving" in output
    # The requeued job runs the same command on the same group: the run is resumed, not started anew.
    assert (tmp_path / "group" / "sweep.json").is_file()
