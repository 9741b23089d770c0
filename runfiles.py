"""A run folder's files: atomic writes of checkpoints and results.json, safe loading, RNG state capture,
creating the folder under a free name, reading a run back for `--resume`, and the recorder that rank 0 writes
a run's files with.

    runs/<run_name>/results.json   status, config, data report, history, best metrics, failure
    runs/<run_name>/last.pt        every epoch: everything needed to resume (model, optimiser, scheduler,
    runs/<run_name>/best.pt        scaler, RNG states, history, config); best.pt at the best mean Dice
    runs/<run_name>/tensorboard/   per-step loss and learning rate, per-epoch validation Dice

A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target, so a kill
at any moment leaves either the previous complete file or the new complete file, never a torn one. A write
that fails (a full disk, Ctrl-C) removes its temporary file and leaves the previous file as it was.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import errno
import itertools
import json
import os
import random
import shutil
import signal
import threading
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
CHECKPOINTS = ("best", "last", "ema")  # ema.pt: the moving average of the weights (--ema)


# ----------------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C and SIGTERM wait until a run file is written: arriving inside torch.save they would surface as a
    RuntimeError from its writer instead of the interruption they are. While writing, the main thread's
    handlers only note the signal; the previous handler then runs on it. (Blocking the signal would not do:
    other threads, e.g. TensorBoard's writer, would still take it.) Other threads write without deferral."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in noted[:1]:
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    with _interrupts_deferred():
        _write_and_rename(Path(path), write, mode)


def _write_and_rename(path: Path, write: Callable[[Any], None], mode: str) -> None:
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
    except BaseException as err:  # Ctrl-C and torch.save's RuntimeError included
        # A temporary file left behind would keep a full disk full (and the failure unrecordable).
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if _is_disk_full(err):
            raise RunFileError(_disk_full_message(path, written)) from None
        if isinstance(err, OSError):
            raise RunFileError(f"cannot write {path}: {err.strerror} (check permissions of {path.parent})") from None
        raise


def _is_disk_full(err: BaseException) -> bool:
    """Whether ENOSPC (or a full quota) caused `err`: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _disk_full_message(path: Path, written: int) -> str:
    """The line for a write that did not fit: the space it needs (the size of the file it replaces, at least
    what was written before the disk filled up) and the space left."""
    needed = max(written, path.stat().st_size if path.exists() else 0)
    free = shutil.disk_usage(path.parent).free
    kept = f"; the previous {path.name} is intact" if path.exists() else ""
    return (f"disk full while writing {path}: about {needed / 1e6:,.2f} MB needed, {free / 1e6:,.2f} MB free on "
            f"{path.parent} (free some space{kept})")


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
def create_run_dir(out_dir: Path, cfg, run_name: str | None) -> Path:
    """Create a new run folder under `out_dir` and return it: `run_name` or <model>-<loss>-s<seed>-<time>, with
    -2, -3, ... appended while the name is taken. Checking a name and taking it are one step (mkdir fails on
    an existing folder), so runs racing for one name get a folder each and never touch another's."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = run_name or f"{cfg.model}-{cfg.loss}-s{cfg.seed}-{stamp}"
    for n in itertools.count(1):
        candidate = out_dir / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
        except OSError as err:
            raise RunFileError(f"cannot create the run folder {candidate}: {err.strerror} (choose another "
                               f"--out-dir)") from None


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


def restore_best_checkpoint(run_dir: Path, last_state: dict) -> str | None:
    """For a resumed run whose best.pt is gone: copy last.pt to best.pt when last.pt holds the best epoch.
    Returns the line to show, or None when best.pt is there or no epoch has been best yet."""
    best, best_epoch = run_dir / "best.pt", last_state.get("best_epoch")
    if best.is_file() or best_epoch is None:
        return None
    if best_epoch == last_state["epoch"]:
        with open(run_dir / "last.pt", "rb") as last:
            _atomic_write(best, lambda f: shutil.copyfileobj(last, f), "wb")
        return f"{best} was missing: restored it from last.pt, which holds the best epoch ({best_epoch})"
    return (f"warning: {best} is missing: the best so far, epoch {best_epoch} (mean Dice "
            f"{last_state['best']['mean_dice']:.4f}), cannot be restored; best.pt is written again when a later epoch "
            f"beats it, until then evaluate the run with --checkpoint last")


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
        # What results.json holds: a failure is recorded on top of it. `results` itself may run ahead (its
        # history is the caller's list, appended to before the epoch's checkpoints are written).
        self.recorded = copy.deepcopy(results)
        self.writer = None
        # failure_rank<N>.txt files from before this attempt (a resumed run's earlier failure) are not its own;
        # the second of slack covers file systems whose timestamps lag the clock.
        self.started = time.time() - 1.0

    def open(self, new_run: bool) -> None:
        """Write the first results.json into the run folder (`create_run_dir` made a new run's) and start
        TensorBoard. RunFileError if the write fails (e.g. a full disk), after removing a new run's folder if
        it is still empty: only what this run created, never a file of another."""
        if not self.is_main:
            return
        try:
            self._save_results()
        except RunFileError:
            if new_run:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only rank 0 of a run needs it

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def save_ema(self, state: dict) -> None:
        """ema.pt: a checkpoint whose model is the moving average of the weights (evaluate.py --checkpoint ema)."""
        if self.is_main:
            save_checkpoint(self.run_dir / "ema.pt", state)

    def save(self) -> None:
        """Write results.json as it stands (rank 0)."""
        if self.is_main:
            self._save_results()

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
        self._save_results()
        self.scalar("val/mean_dice", report["mean_dice"] or 0.0, epoch)
        if train_loss is not None:
            self.scalar("train/epoch_loss", train_loss, epoch)
        for cls, m in report["per_class"].items():
            if m["dice"] is not None:
                self.scalar(f"val_dice/{cls}", m["dice"], epoch)
        self.writer.flush()

    def record_failure(self, reason: str, rank: int, elapsed_seconds: float, world_size: int = 1,
                       lost_peer: bool = False) -> tuple[str, bool]:
        """Record a failed run: a rank other than 0 leaves its reason in failure_rank<N>.txt; rank 0 adds the
        peers' reasons and rewrites results.json as last written (the epochs of the last checkpoint) with
        status 'failed'. When rank 0 failed because it lost a peer (`lost_peer`: a collective broke), the
        peers come first, and those that left no reason are named as stopped without one (killed by SIGKILL or
        the out-of-memory killer, or crashed). Returns (the full reason, whether a peer failed or was lost)."""
        if rank != 0:
            (self.run_dir / f"failure_rank{rank}.txt").write_text(reason + "\n")
            return reason, False
        if world_size > 1:
            time.sleep(0.5)  # let a failing peer finish writing its reason
        peers = {int(p.stem[len("failure_rank"):]): p.read_text().strip()
                 for p in self.run_dir.glob("failure_rank*.txt") if p.stat().st_mtime >= self.started}
        parts = [f"rank {r}: {text}" for r, text in sorted(peers.items())]
        silent = [str(r) for r in range(1, world_size) if r not in peers] if lost_peer else []
        if silent:
            parts.insert(0, f"rank {', '.join(silent)} stopped without recording a reason (killed by SIGKILL or the "
                            f"out-of-memory killer, or crashed: see its output)")
        reason = " | ".join(parts + [f"rank 0: {reason}"] if lost_peer else [reason] + parts)
        self.recorded.update(status="failed", failure=reason, elapsed_seconds=elapsed_seconds)
        try:
            save_json(self.run_dir / RESULTS_FILE, self.recorded)
        except RunFileError as write_err:  # e.g. the disk that stopped the run is still full
            reason += f" (and the failure could not be recorded: {write_err})"
        return reason, bool(peers) or lost_peer

    def _save_results(self) -> None:
        save_json(self.run_dir / RESULTS_FILE, self.results)
        self.recorded = copy.deepcopy(self.results)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
