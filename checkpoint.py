"""Run-folder files: atomic writes of checkpoints and results.json, safe loading, RNG state capture.

A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target, so a kill
at any moment leaves either the previous complete file or the new complete file, never a torn one.
"""
from __future__ import annotations

import errno
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CHECKPOINT_FORMAT_VERSION = 1
# Test hook: seconds to pause between writing the temporary file and renaming it, so a test can kill
# the process in the middle of a checkpoint write.
_PAUSE_ENV = "CELLMAP_DEBUG_PAUSE_IN_SAVE"


class RunFileError(RuntimeError):
    """A run file that cannot be read or written; the message names the file and the fix."""


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
        if pause:
            time.sleep(pause)
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
