"""runfiles.py: a run folder is created under a free name in one step (runs racing for a name never touch
each other's folders), a write that fails (a full disk inside torch.save, Ctrl-C) leaves no temporary file
and the previous file intact, a missing best.pt is restored or reported on resume, and rank 0 names the
peers that failed or died."""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import runfiles
from errors import RunFileError
from runfiles import (RunRecorder, create_run_dir, load_checkpoint, load_json, restore_best_checkpoint,
                      save_checkpoint)

CFG = SimpleNamespace(model="unet_2d", loss="dice", seed=0)


# ---------------------------------------------------------------------------------------------- run folders
def test_a_taken_name_gets_the_next_free_suffix_and_the_taken_folder_is_untouched(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "last.pt").write_bytes(b"another run")
    (tmp_path / "r-2").mkdir()
    assert create_run_dir(tmp_path, CFG, "r") == tmp_path / "r-3" and (tmp_path / "r-3").is_dir()
    assert (tmp_path / "r" / "last.pt").read_bytes() == b"another run"
    assert create_run_dir(tmp_path, CFG, None).name.startswith("unet_2d-dice-s0-")


def test_runs_racing_for_one_name_get_one_folder_each(tmp_path):
    start = threading.Barrier(6)
    made = []

    def claim():
        start.wait()
        made.append(create_run_dir(tmp_path, CFG, "race"))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in made) == sorted(["race"] + [f"race-{n}" for n in range(2, 7)])


def test_a_failed_first_write_removes_only_the_empty_folder_this_run_created(tmp_path, monkeypatch):
    monkeypatch.setattr(runfiles.os, "fsync", _fail_with(errno.ENOSPC))
    run_dir = create_run_dir(tmp_path, CFG, "r")
    with pytest.raises(RunFileError, match="disk full while writing"):
        RunRecorder(run_dir, {"status": "running"}, is_main=True).open(new_run=True)
    assert not run_dir.exists()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes(b"kept")
    with pytest.raises(RunFileError):
        RunRecorder(resumed, {"status": "running"}, is_main=True).open(new_run=False)
    assert (resumed / "last.pt").read_bytes() == b"kept"


# ---------------------------------------------------------------------------------------------- failed writes
class DiskWithRoomFor:
    """`open` for runfiles on a disk that takes `room` more bytes: a write past them raises ENOSPC the way
    a full disk does, inside torch.save's zip writer too."""

    def __init__(self, room: int):
        self.room = room

    def __call__(self, path, mode="r"):
        return _FillingFile(path, mode, self)


class _FillingFile:
    def __init__(self, path, mode, disk):
        self.file, self.disk = open(path, mode), disk

    def write(self, data):
        if len(data) > self.disk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


def _fail_with(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


def test_a_full_disk_inside_torch_save_is_one_line_naming_the_space_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.zeros(10_000)})
    monkeypatch.setattr(runfiles, "open", DiskWithRoomFor(20_000), raising=False)
    with pytest.raises(RunFileError) as info:
        save_checkpoint(path, {"epoch": 2, "w": torch.ones(10_000)})
    message = str(info.value)
    assert message.startswith(f"disk full while writing {path}: about 0.04 MB needed, "), message
    assert "MB needed" in message and f"MB free on {tmp_path}" in message and "previous last.pt is intact" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"], "the temporary file is removed"
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    class Interrupting:
        def __reduce__(self):
            raise KeyboardInterrupt

    path = tmp_path / "best.pt"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "object": Interrupting(), "w": torch.zeros(1000)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    assert load_checkpoint(path)["epoch"] == 1


# ---------------------------------------------------------------------------------------------- resume
def _last(run_dir: Path, epoch: int, best_epoch: int | None) -> dict:
    state = {"epoch": epoch, "best_epoch": best_epoch, "best": {"mean_dice": 0.5} if best_epoch else None}
    save_checkpoint(run_dir / "last.pt", state)
    return load_checkpoint(run_dir / "last.pt")


def test_a_missing_best_checkpoint_is_restored_when_last_holds_the_best_epoch(tmp_path):
    state = _last(tmp_path, epoch=2, best_epoch=2)
    note = restore_best_checkpoint(tmp_path, state)
    assert note == f"{tmp_path / 'best.pt'} was missing: restored it from last.pt, which holds the best epoch (2)"
    assert (tmp_path / "best.pt").read_bytes() == (tmp_path / "last.pt").read_bytes()
    assert restore_best_checkpoint(tmp_path, state) is None, "nothing to say once best.pt is there"


def test_a_missing_best_checkpoint_of_an_earlier_epoch_is_reported(tmp_path):
    note = restore_best_checkpoint(tmp_path, _last(tmp_path, epoch=3, best_epoch=1))
    assert note.startswith(f"warning: {tmp_path / 'best.pt'} is missing: the best so far, epoch 1 (mean Dice 0.5000)")
    assert "--checkpoint last" in note and not (tmp_path / "best.pt").exists()
    assert restore_best_checkpoint(tmp_path, _last(tmp_path, epoch=1, best_epoch=None)) is None


# ---------------------------------------------------------------------------------------------- failures
def test_rank_0_names_the_peers_that_failed_and_those_that_died_without_a_reason(tmp_path):
    recorder = RunRecorder(tmp_path, {"status": "running"}, is_main=True)
    recorder.record_failure("RuntimeError: injected", rank=2, elapsed_seconds=1.0)
    reason, peer_failed = recorder.record_failure("RuntimeError: Connection reset by peer", rank=0,
                                                  elapsed_seconds=2.0, world_size=4, lost_peer=True)
    assert reason == ("rank 1, 3 stopped without recording a reason (killed by SIGKILL or the out-of-memory killer, "
                      "or crashed: see its output) | rank 2: RuntimeError: injected | "
                      "rank 0: RuntimeError: Connection reset by peer")
    assert peer_failed and load_json(tmp_path / "results.json")["failure"] == reason


def test_rank_0_ignores_failure_records_of_an_earlier_attempt(tmp_path):
    (tmp_path / "failure_rank1.txt").write_text("RuntimeError: from the attempt before the resume\n")
    os.utime(tmp_path / "failure_rank1.txt", (0, 0))
    recorder = RunRecorder(tmp_path, {"status": "running"}, is_main=True)
    reason, peer_failed = recorder.record_failure("TrainingFailed: 25 non-finite steps", rank=0, elapsed_seconds=1.0,
                                                  world_size=2)
    assert reason == "TrainingFailed: 25 non-finite steps" and not peer_failed
