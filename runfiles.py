"""A run folder's files: atomic writes of checkpoints and results.json, safe loading, RNG state capture, the
folder's name, reading a run back for `--resume`, and the recorder that rank 0 writes a run's files with.

    runs/<run_name>/results.json   status, config, data report, history, best metrics, failure
    runs/<run_name>/last.pt        every epoch: everything needed to resume (model, optimiser, scheduler,
    runs/<run_name>/best.pt        scaler, RNG states, history, config); best.pt at the best mean Dice
    runs/<run_name>/tensorboard/   per-step loss and learning rate, per-epoch validation Dice

A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target, so a kill
at any moment leaves either the previous complete file or the new complete file, never a torn one.
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import config_shenron as C
from errors import RunFileError

CHECKPOINT_FORMAT_VERSION = 1
RESULTS_FILE = "results.json"
CHECKPOINTS = ("best", "last")


# ----------------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise RunFileError(f"disk full while writing {path} (free space on {path.parent}; the previous "
                               f"{path.name} is intact)") from None
        raise RunFileError(f"cannot write {path}: {err.strerror} (check permissions of {path.parent})") from None


def save_json(path: Path, data: dict) -> None:
    payload = json.dumps(data, indent=1, allow_nan=False)
    _atomic_write(path, lambda f: f.write(payload), "w")


def load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunFileError(f"{path} is corrupt (not valid JSON)") from None


def save_checkpoint(path: Path, state: dict) -> None:
    state = dict(state, format_version=CHECKPOINT_FORMAT_VERSION)
    _atomic_write(path, lambda f: torch.save(state, f), "wb")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`; RunFileError if missing, truncated or foreign."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception:
        raise RunFileError(f"checkpoint {path} is corrupt or truncated (use the other checkpoint of the run, "
                           f"or start a new run)") from None
    if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise RunFileError(f"{path} is not a checkpoint of this toolkit (format version "
                           f"{state.get('format_version') if isinstance(state, dict) else '?'})")
    return state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_writable(directory: Path) -> None:
    """RunFileError unless `directory` (created if needed) accepts a file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise RunFileError(f"output folder {directory} is not writable ({err.strerror}); choose another "
                           f"--out-dir") from None


# ----------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------
def new_run_dir(out_dir: Path, cfg, run_name: str | None) -> Path:
    """A folder name under `out_dir` that is not taken: `run_name` or <model>-<loss>-s<seed>-<time>, with
    -2, -3, ... appended when it exists (a run folder is never overwritten)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = run_name or f"{cfg.model}-{cfg.loss}-s{cfg.seed}-{stamp}"
    candidate, n = out_dir / base, 1
    while candidate.exists():
        n += 1
        candidate = out_dir / f"{base}-{n}"
    return candidate


@dataclass
class StoredRun:
    """A run folder read back for --resume."""

    run_dir: Path
    results: dict
    config: Any          # config_shenron.RunConfig
    loss_options: dict
    datasplit: Path


def read_run(run_dir: Path) -> StoredRun:
    """The stored results, config, loss options and datasplit of a run folder; RunFileError otherwise."""
    if not (run_dir / RESULTS_FILE).is_file():
        raise RunFileError(f"--resume {run_dir}: no {RESULTS_FILE} there (not a run folder)")
    stored = load_json(run_dir / RESULTS_FILE)
    try:
        return StoredRun(run_dir, stored, C.RunConfig.from_dict(stored["config"]),
                         stored.get("loss_options", {}),  # absent from runs recorded before the options were stored
                         Path(stored["datasplit"]))
    except (KeyError, TypeError, ValueError) as err:
        raise RunFileError(f"{run_dir / RESULTS_FILE} is not a results file of this toolkit ({err}); "
                           f"start a new run instead of --resume") from None


def complete_from_checkpoint(run: StoredRun, state: dict) -> bool:
    """A run whose last.pt holds its final epoch: complete results.json from it if a kill came between the
    two writes. Returns True when results.json was completed, False when it already was."""
    if run.results["status"] == "completed":
        return False
    run.results.update(status="completed", failure=None,
                       **{k: state[k] for k in ("history", "best", "best_epoch", "elapsed_seconds")})
    save_json(run.run_dir / RESULTS_FILE, run.results)
    return True


class RunRecorder:
    """Rank 0's writer of a run folder: results.json, the checkpoints and TensorBoard. On other ranks every
    method but `record_failure` does nothing."""

    def __init__(self, run_dir: Path, results: dict, is_main: bool):
        self.run_dir, self.results, self.is_main = run_dir, results, is_main
        self.writer = None

    def open(self, new_run: bool) -> None:
        """Create the folder (a new run) and write the first results.json; RunFileError if that fails,
        leaving no half-made new folder behind."""
        if not self.is_main:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=not new_run)
            save_json(self.run_dir / RESULTS_FILE, self.results)
        except (OSError, RunFileError) as err:  # e.g. a full disk
            if new_run:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise RunFileError(str(err)) from None
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only rank 0 of a run needs it

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def epoch(self, state: dict, improved: bool, report: dict, train_loss: float | None, **fields) -> None:
        """After an epoch: best.pt (if improved), last.pt, results.json (with `fields`), TensorBoard."""
        if not self.is_main:
            return
        epoch = state["epoch"]
        if improved:
            save_checkpoint(self.run_dir / "best.pt", state)
        save_checkpoint(self.run_dir / "last.pt", state)
        self.results.update(**fields)
        save_json(self.run_dir / RESULTS_FILE, self.results)
        self.scalar("val/mean_dice", report["mean_dice"] or 0.0, epoch)
        if train_loss is not None:
            self.scalar("train/epoch_loss", train_loss, epoch)
        for cls, m in report["per_class"].items():
            if m["dice"] is not None:
                self.scalar(f"val_dice/{cls}", m["dice"], epoch)
        self.writer.flush()

    def record_failure(self, reason: str, rank: int, elapsed_seconds: float) -> tuple[str, bool]:
        """Record a failed run: a rank other than 0 leaves its reason in failure_rank<N>.txt; rank 0 adds the
        peers' reasons and writes results.json with status 'failed'. Returns (the full reason, whether a
        peer had failed)."""
        if rank != 0:
            (self.run_dir / f"failure_rank{rank}.txt").write_text(reason + "\n")
            return reason, False
        time.sleep(0.5)  # let a failing peer finish writing its reason
        peers = sorted(self.run_dir.glob("failure_rank*.txt"))
        if peers:
            reason += " | " + " | ".join(f"{p.stem}: {p.read_text().strip()}" for p in peers)
        self.results.update(status="failed", failure=reason, elapsed_seconds=elapsed_seconds)
        try:
            save_json(self.run_dir / RESULTS_FILE, self.results)
        except RunFileError as write_err:  # e.g. the disk that stopped the run is still full
            reason += f" (and the failure could not be recorded: {write_err})"
        return reason, bool(peers)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
