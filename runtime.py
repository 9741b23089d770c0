"""Where a run executes: the torchrun environment (rank, local rank, world size), the device, the process
group and its teardown, autocast, rank-0 logging and the advice for a CUDA out-of-memory error.

DDP is detected from the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE); a plain `python` run is
rank 0 of a world of 1. The process group is NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from errors import NodeDataError

DDP_TIMEOUT_ENV = "CELLMAP_DDP_TIMEOUT_MIN"  # minutes a collective may wait for a peer (default 10)
DDP_TIMEOUT_MIN = 10
WATCHDOG_ENV = "CELLMAP_WATCHDOG_S"          # seconds without progress before a DDP run records a hang


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


def report_error(err: Exception, env: DistributedEnv, status: int = 2) -> int:
    """One `error:` line on rank 0 (every rank sees the same bad input), or where it was seen (NodeDataError);
    the exit status (2: bad input)."""
    if env.is_main or isinstance(err, NodeDataError):
        print(f"error: {err}", file=sys.stderr)
    return status


def device_type_for(requested: str | None) -> str:
    """"cuda" or "cpu" for --device auto/cpu/cuda; ValueError for cuda without a GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible (use --device cpu or auto)")
    return "cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu"


def select_device(device_type: str, env: DistributedEnv) -> torch.device:
    """This rank's device: its local GPU (cuDNN picks the fastest convolution for the fixed patch shape), or
    the CPU."""
    if device_type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        return device
    return torch.device("cpu")


def check_precision(precision: str, device_type: str) -> None:
    """ValueError for bf16 on a GPU without native bf16 (compute capability below 8.0, e.g. Turing's
    RTX 2080 Ti): torch emulates it there, several times slower than fp16."""
    if precision == "bf16" and device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) "
                             f"has no native bf16 and would emulate it, several times slower; use --precision fp16 "
                             f"(with a GradScaler) or fp32")


def largest_batch(fits, start: int, limit: int = 4096) -> int:
    """The largest batch size for which `fits(batch)` holds (True, False, or raises torch.OutOfMemoryError),
    by doubling from `start` then bisecting; at least 1 (checked by the caller's first step)."""
    def ok(batch):
        try:
            return fits(batch)
        except torch.OutOfMemoryError:
            return False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    low, high = 0, None
    batch = max(1, start)
    while high is None and batch <= limit:
        if ok(batch):
            low, batch = batch, batch * 2
        else:
            high = batch
    high = high or limit + 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    return max(low, 1)


def ddp_timeout_s() -> float:
    return 60.0 * float(os.environ.get(DDP_TIMEOUT_ENV, DDP_TIMEOUT_MIN))


def init_process_group(env: DistributedEnv, device: torch.device) -> None:
    """NCCL on CUDA, gloo on the CPU, collectives bounded by $CELLMAP_DDP_TIMEOUT_MIN. On NCCL a timeout aborts
    the communicator and the waiting call raises (TORCH_NCCL_ASYNC_ERROR_HANDLING=2), so the run can record
    the failure; torch's default tears the process down without a word."""
    if env.ddp:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=dt.timedelta(seconds=ddp_timeout_s()))


class Watchdog:
    """Notices a DDP run that stopped making progress (a rank blocked for good in a collective or in a host
    synchronisation with a dead peer: NCCL can wait for ever there) and calls `on_hang(seconds)` once, from a
    thread, then ends the process: the failure is recorded rather than the job hanging silently.
    `kick()` after every step and validation batch; off unless `seconds` > 0."""

    def __init__(self, seconds: float, on_hang):
        import threading

        self.seconds, self.on_hang = seconds, on_hang
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True) if seconds > 0 else None
        if self._thread:
            self._thread.start()

    def kick(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.seconds / 4)):
            idle = time.monotonic() - self.last
            if idle > self.seconds:
                try:
                    self.on_hang(idle)
                finally:
                    os._exit(1)

    def stop(self) -> None:
        self._stop.set()


def watchdog_seconds(env: DistributedEnv) -> float:
    """DDP runs: a minute more than the collectives' timeout (their own error comes first when there is one);
    $CELLMAP_WATCHDOG_S overrides it. 0 (off) for a single process."""
    if not env.ddp:
        return 0.0
    return float(os.environ.get(WATCHDOG_ENV, ddp_timeout_s() + 60))


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


CACHE_PER_NODE_ENV = "CELLMAP_CACHE_PER_NODE"   # 1: every node prepares its own crop cache
CACHE_SHARE_WAIT_ENV = "CELLMAP_CACHE_SHARE_WAIT_S"


def main_rank_first(prepare, env: DistributedEnv, cache_root: Path):
    """Rank 0 runs `prepare(main=True)` (builds the crop cache); the other ranks poll `prepare(main=False)`,
    which raises FileNotFoundError until the cache is complete (torchrun stops them all if rank 0 fails). The
    process group does not exist yet, so this cannot use a barrier.

    Several nodes: the cache must be on a file system all nodes share, or each node builds its own
    ($CELLMAP_CACHE_PER_NODE=1: the first process of every node prepares it). Rank 0 leaves a marker named
    after the job in the cache folder; the first process of another node that does not see it within a
    minute stops with one line, instead of waiting forever for a cache that nobody builds on its node."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    marker = Path(cache_root) / f".job-{run_id}"
    if env.is_main:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank 0 of job {run_id} on {socket.gethostname()}\n")
        return prepare(main=True)
    other_node = env.local_rank == 0 and int(os.environ.get("GROUP_RANK", 0)) != 0
    if other_node and os.environ.get(CACHE_PER_NODE_ENV) == "1":
        return prepare(main=True)
    if other_node and run_id:
        wait = float(os.environ.get(CACHE_SHARE_WAIT_ENV, 60))
        deadline = time.time() + wait
        while not marker.is_file():
            if time.time() > deadline:
                raise NodeDataError(f"the crop cache {cache_root} is not shared with rank 0's node (its marker "
                                f"{marker.name} did not appear here within {wait:g} s): put $CELLMAP_CACHE_DIR on a "
                                f"file system all nodes share, or set {CACHE_PER_NODE_ENV}=1 so that every node "
                                f"prepares its own")
            time.sleep(1)
    while True:
        try:
            return prepare(main=False)
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
