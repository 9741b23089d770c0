"""Where a run executes: the torchrun environment (rank, local rank, world size), the device, the process
group and its teardown, autocast, rank-0 logging and the advice for a CUDA out-of-memory error.

DDP is detected from the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE); a plain `python` run is
rank 0 of a world of 1. The process group is NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

DDP_TIMEOUT_ENV = "CELLMAP_DDP_TIMEOUT_MIN"  # minutes a collective may wait for a peer (default 30)


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in the job, as torchrun describes it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> "DistributedEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def log(msg: str) -> None:
    """Print on rank 0 only (every rank runs the same code)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, flush=True)


def report_error(err: Exception, env: DistributedEnv) -> int:
    """Bad input: one `error:` line on rank 0; the exit status 2."""
    if env.is_main:
        print(f"error: {err}", file=sys.stderr)
    return 2


def device_type_for(requested: str | None) -> str:
    """"cuda" or "cpu" for --device auto/cpu/cuda; ValueError for cuda without a GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible (use --device cpu or auto)")
    return "cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu"


def select_device(device_type: str, env: DistributedEnv) -> torch.device:
    """This rank's device: its local GPU, or the CPU."""
    if device_type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_process_group(env: DistributedEnv, device: torch.device) -> None:
    if env.ddp:
        minutes = int(os.environ.get(DDP_TIMEOUT_ENV, 30))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=dt.timedelta(minutes=minutes))


def destroy_process_group(env: DistributedEnv) -> None:
    if env.ddp and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(value, env: DistributedEnv):
    """Rank 0's `value` on every rank (a picklable object)."""
    if not env.ddp:
        return value
    box = [value if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def autocast_for(precision: str, device: torch.device):
    """A context factory: autocast to fp16/bf16 on `device`, or no autocast for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


def main_rank_first(prepare, env: DistributedEnv):
    """Rank 0 runs `prepare(progress=True)` (e.g. builds the crop cache); the other ranks poll
    `prepare(progress=False, build=False)` until it succeeds (torchrun stops them all if rank 0 fails).
    The process group does not exist yet, so this cannot use a barrier."""
    if env.is_main:
        return prepare(progress=True)
    while True:
        try:
            return prepare(progress=False, build=False)
        except FileNotFoundError:
            time.sleep(2)


def oom_advice(batch_size: int, peak_bytes: int, total_bytes: int) -> str:
    """The failure line of a CUDA out-of-memory error, with a batch size likely to fit: scaled from the
    peak when the peak was recorded near the limit, else halved (the failed allocation is not in the peak)."""
    used = f"({peak_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB)"
    if batch_size == 1:
        return f"GPU out of memory at --batch-size 1 {used}; lower --patch-yx or --base-channels"
    if peak_bytes > total_bytes / 2:
        fit = int(batch_size * 0.85 * total_bytes / peak_bytes)
    else:
        fit = batch_size // 2
    fit = min(max(fit, 1), batch_size - 1)
    return f"GPU out of memory at --batch-size {batch_size} {used}; try --batch-size {fit}"
