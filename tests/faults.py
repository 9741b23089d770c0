"""Fault injection for the reliability tests: runs a toolkit script with faults patched in from outside, so
that no production code carries a test hook.

    python tests/faults.py [--nonfinite-steps 1,2] [--raise RANK:STEP] [--pause-in-save SECONDS] [--disk-full]
                           -- train_local.py ARGS...
    torchrun --standalone --nproc_per_node=2 tests/faults.py --raise 1:3 -- train_local.py ARGS...

--nonfinite-steps   the loss of these optimiser steps (counted from 0 in this process) is NaN
--raise RANK:STEP   rank RANK raises a RuntimeError at step STEP
--pause-in-save S   every atomic run-file write pauses S seconds between its temporary file and the rename
--disk-full         every fsync fails with ENOSPC (only run-file writes call it)
"""
from __future__ import annotations

import argparse
import errno
import itertools
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def patch_training_step(nonfinite_steps: set[int], raise_at: tuple[int, int] | None) -> None:
    import engine

    original = engine.training_step
    counter = itertools.count()
    rank = int(os.environ.get("RANK", 0))

    def faulty_step(model, raw_model, loss_fn, *args, **kwargs):
        step = next(counter)
        if raise_at is not None and raise_at == (rank, step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
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


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nonfinite-steps", default="")
    p.add_argument("--raise", dest="raise_at", default="")
    p.add_argument("--pause-in-save", type=float, default=0.0)
    p.add_argument("--disk-full", action="store_true")
    args = p.parse_args(argv[:split])
    script, script_args = argv[split + 1], argv[split + 2:]
    sys.path.insert(0, str(REPO))
    nonfinite = {int(s) for s in args.nonfinite_steps.split(",") if s}
    raise_at = tuple(int(v) for v in args.raise_at.split(":")) if args.raise_at else None
    if nonfinite or raise_at:
        patch_training_step(nonfinite, raise_at)
    if args.pause_in_save:
        patch_pause_in_save(args.pause_in_save)
    if args.disk_full:
        patch_disk_full()
    sys.argv = [script, *script_args]
    runpy.run_path(str(REPO / script), run_name="__main__")


if __name__ == "__main__":
    main()
