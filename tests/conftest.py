"""Shared fixtures: one synthetic CellMap dataset and one crop cache per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import config_shenron as C  # noqa: E402

# Small patches keep the suite fast on 2 CPU cores.
TEST_PATCH_YX = 64
# train_local.py options for a run on `tiny_root` that takes seconds: a narrow, shallow UNet on 32x32 patches.
TINY_RUN_OPTIONS = ("--mode", "quick", "--batch-size", "2", "--patch-yx", "32", "--base-channels", "4",
                    "--depth", "2", "--workers", "0", "--device", "cpu", "--val-budget", "0", "--val-patch-yx", "32",
                    "--val-batch-size", "2", "--final-evaluation", "none")


# What an interrupted-then-resumed run must reproduce exactly, epoch by epoch.
EPOCH_METRICS = ("epoch", "train_loss", "train_loss_per_class", "mean_dice", "mean_iou", "per_class",
                 "threshold_sweep", "lr", "nonfinite_steps")


def run_script(args, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS...` in the repository with output captured as text, e.g. ["train_local.py", "--epochs", 2]."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def training_command(args, faults=()) -> list[str]:
    """`train_local.py ARGS...`, or with `faults` (tests/faults.py options) that script run under the fault
    injector."""
    script = ["train_local.py", *map(str, args)]
    return ["tests/faults.py", *map(str, faults), "--", *script] if faults else script


def run_training(args, env: dict, processes: int = 1, timeout: float = 300, faults=()) -> subprocess.CompletedProcess:
    """`python train_local.py ARGS...`, or with `processes` > 1 under `torchrun --standalone` (gloo on CPU)."""
    launcher = [sys.executable] if processes == 1 else \
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run([*launcher, *training_command(args, faults)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_training(args, env: dict, faults=()) -> subprocess.Popen:
    """`python train_local.py ARGS...` in the background, output discarded."""
    return subprocess.Popen([sys.executable, *training_command(args, faults)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 20 ms); fail if it ends first."""
    import signal
    import time

    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.time() < deadline, "kill point not reached in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def epochs_recorded(run_dir: Path) -> int:
    """Epochs in a run folder's results.json; -1 before it exists."""
    from runfiles import load_json

    results = run_dir / "results.json"
    return len(load_json(results)["history"]) if results.is_file() else -1


def epoch_metrics(history: list[dict]) -> list[dict]:
    return [{k: entry[k] for k in EPOCH_METRICS} for entry in history]


def folder_digest(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file under `folders`, to show that a command changed nothing."""
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from make_synthetic_data import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def entries(synthetic_root):
    from datasplit import read_datasplit

    return read_datasplit(synthetic_root / "datasplit.csv")


@pytest.fixture(scope="session")
def cache(entries, cache_dir):
    from cache import prepare_cache

    return prepare_cache(entries, C.ALL_CLASSES, C.TRAIN_SCALE_NM, cache_root=cache_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A CellMap-format root (one 8 nm dataset, two training crops, one small validation crop) small enough
    for end-to-end training runs in tests: a full validation pass takes about a second."""
    import csv

    from make_synthetic_data import DatasetSpec, write_dataset

    root = tmp_path_factory.mktemp("tiny")
    spec = DatasetSpec("tiny_iso", (8.0, 8.0, 8.0), (24, 128, 128), (
        (1, "train", (0, 0, 0), (24, 64, 128), None, False),
        (2, "train", (0, 64, 0), (24, 64, 64), None, False),
        (3, "validate", (8, 72, 72), (8, 48, 48), None, False),
    ))
    with open(root / "datasplit.csv", "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(write_dataset(root, spec, seed=0, index=0))
    return root


@pytest.fixture(scope="session")
def mock_suite(tmp_path_factory):
    """The mock of the real download's `suite` preset (crops 9, 142, 137, 410: 2.62x2x2, 4, 8 and 32 nm rows
    of the official manifest), generated once: (data root, make_mock_download.MockInfo)."""
    import make_mock_download

    root = tmp_path_factory.mktemp("mock_suite")
    return root, make_mock_download.build_mock(root, make_mock_download.PRESETS["suite"], label_classes="ours",
                                               seed=0, progress=False)


@pytest.fixture(scope="session")
def session_cli_env(cache_dir) -> dict:
    """Environment for running the toolkit's scripts as subprocesses (for module/session fixtures;
    do not modify it, tests take a copy through `cli_env`)."""
    env = dict(os.environ)
    env.update(CELLMAP_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("CELLMAP_DATA_ROOT", None)
    return env


@pytest.fixture
def cli_env(session_cli_env):
    """Environment for running the toolkit's scripts as subprocesses in tests (a copy a test may change)."""
    return dict(session_cli_env)
