"""Fault injection for the reliability tests: runs a toolkit script with faults patched in from outside, so
that no production code carries a test hook.

    python tests/faults.py [--nonfinite-steps 1,2] [--raise RANK:STEP] [--kill RANK:STEP] [--hang RANK:STEP]
                           [--pause-in-save SECONDS]
                           [--disk-full] [--disk-full-after WRITES:BYTES] [--take-folder PATH]
                           [--fail-official-scoring] -- train_local.py ARGS...
    torchrun --standalone --nproc_per_node=2 tests/faults.py --raise 1:3 -- train_local.py ARGS...

--nonfinite-steps   the loss of these optimiser steps (counted from 0 in this process) is NaN
--raise RANK:STEP   rank RANK raises a RuntimeError at step STEP
--kill RANK:STEP    rank RANK is killed at step STEP (SIGKILL, as the out-of-memory killer does): it records nothing
--hang RANK:STEP    rank RANK stops responding at step STEP (as a process stuck in a driver call): its peers wait
--pause-in-save S   every atomic run-file write pauses S seconds between its temporary file and the rename
--disk-full         every fsync fails with ENOSPC (only run-file writes call it)
--disk-full-after WRITES:BYTES
                    after WRITES run-file writes the disk has room for BYTES more bytes than the run folder's files
                    take then: a later write that would go past that fails with ENOSPC where the data is written
                    (inside torch.save too), as on a full disk; a temporary file removed gives its space back
--take-folder PATH  another run creates the folder PATH, with a last.pt in it, just before this run first tries to
                    create it (the other run won the race for the name)
--fail-official-scoring
                    the official scorer runs out of memory on its first crop (as it did on instance ids far from 1..N)
"""
from __future__ import annotations

import argparse
import errno
import itertools
import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def patch_training_step(nonfinite_steps: set[int], raise_at: tuple[int, int] | None,
                        kill_at: tuple[int, int] | None, hang_at: tuple[int, int] | None = None) -> None:
    import engine

    original = engine.training_step
    counter = itertools.count()
    rank = int(os.environ.get("RANK", 0))

    def faulty_step(model, raw_model, loss_fn, *args, **kwargs):
        step = next(counter)
        if raise_at is not None and raise_at == (rank, step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        if kill_at is not None and kill_at == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if hang_at is not None and hang_at == (rank, step):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a process stuck in a driver call: only a kill ends it
            while True:
                time.sleep(1)
        if step in nonfinite_steps:
            def nan_loss(logits, target, **kw):
                loss, per_class = loss_fn(logits, target, **kw)
                return loss * float("nan"), per_class

            return original(model, raw_model, nan_loss, *args, **kwargs)
        return original(model, raw_model, loss_fn, *args, **kwargs)

    engine.training_step = faulty_step


def patch_pause_in_save(seconds: float) -> None:
    import runfiles

    replace = os.replace

    def slow_replace(src, dst, *args, **kwargs):
        if Path(src).name.endswith(".tmp"):
            time.sleep(seconds)
        return replace(src, dst, *args, **kwargs)

    runfiles.os.replace = slow_replace


def patch_disk_full() -> None:
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.fsync = full


def patch_disk_full_after(writes: int, room: int) -> None:
    """Run-file writes (runfiles opens every file it writes with `open`) after the first `writes` go through a
    file that refuses the bytes that would take the run folder's files `room` bytes past their size at that
    moment, raising ENOSPC from `write` as a full disk does."""
    import builtins

    import runfiles

    opened = itertools.count(1)
    limit = None

    def folder_bytes(folder: Path, leaving_out: Path) -> int:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p != leaving_out)

    class FillingFile:
        def __init__(self, path, mode="r", *args, **kwargs):
            nonlocal limit
            self.path = Path(path).absolute()
            if next(opened) == writes + 1:
                limit = folder_bytes(self.path.parent, self.path) + room
            self.file = builtins.open(path, mode, *args, **kwargs)
            self.written = 0

        def write(self, data):
            if limit is not None and folder_bytes(self.path.parent, self.path) + self.written + len(data) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.file.write(data)

        def __getattr__(self, name):  # flush, fileno, close, ...
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

    runfiles.open = FillingFile


def patch_take_folder(folder: Path) -> None:
    """The other run creates `folder` (with a checkpoint) right before this run's first os.mkdir of it."""
    mkdir = os.mkdir
    folder = Path(os.path.abspath(folder))

    def mkdir_after_the_other_run(path, *args, **kwargs):
        if Path(os.path.abspath(path)) == folder and not folder.exists():
            mkdir(folder)
            (folder / "last.pt").write_bytes(b"the other run's checkpoint")
        return mkdir(path, *args, **kwargs)

    os.mkdir = mkdir_after_the_other_run


def patch_fail_official_scoring() -> None:
    import numpy as np
    import official

    def out_of_memory(*args, **kwargs):
        np.zeros(1 << 62, dtype=np.uint8)  # numpy's own MemoryError, as the real failure raised

    official.score_crop_label = out_of_memory


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nonfinite-steps", default="")
    p.add_argument("--raise", dest="raise_at", default="")
    p.add_argument("--kill", dest="kill_at", default="")
    p.add_argument("--hang", dest="hang_at", default="")
    p.add_argument("--pause-in-save", type=float, default=0.0)
    p.add_argument("--disk-full", action="store_true")
    p.add_argument("--disk-full-after", default="")
    p.add_argument("--take-folder", type=Path, default=None)
    p.add_argument("--fail-official-scoring", action="store_true")
    args = p.parse_args(argv[:split])
    script, script_args = argv[split + 1], argv[split + 2:]
    sys.path.insert(0, str(REPO))
    nonfinite = {int(s) for s in args.nonfinite_steps.split(",") if s}
    raise_at = tuple(int(v) for v in args.raise_at.split(":")) if args.raise_at else None
    kill_at = tuple(int(v) for v in args.kill_at.split(":")) if args.kill_at else None
    hang_at = tuple(int(v) for v in args.hang_at.split(":")) if args.hang_at else None
    if nonfinite or raise_at or kill_at or hang_at:
        patch_training_step(nonfinite, raise_at, kill_at, hang_at)
    if args.pause_in_save:
        patch_pause_in_save(args.pause_in_save)
    if args.disk_full:
        patch_disk_full()
    if args.disk_full_after:
        patch_disk_full_after(*(int(v) for v in args.disk_full_after.split(":")))
    if args.take_folder is not None:
        patch_take_folder(args.take_folder)
    if args.fail_official_scoring:
        patch_fail_official_scoring()
    sys.argv = [script, *script_args]
    runpy.run_path(str(REPO / script), run_name="__main__")


if __name__ == "__main__":
    main()
