"""What the benchmarks share: the device, timing with device synchronisation, process memory (peak RSS/PSS of
this process and its loader workers, from /proc), comma-list options, and the data, cache and patch a training
run with given options would use (so a benchmark measures what training runs)."""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch

import config_shenron as C
from cache import prepare_cache
from datasplit import datasplit_for, read_datasplit, resolve_data_root
from sampling import PatchSpec

RTX_2080_TI_BYTES = 11264 * 2**20  # 11 GiB: the memory of each of the target workstation's GPUs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def time_once(step: Callable[[], None], device: torch.device) -> float:
    """Seconds for one call of `step`, synchronising the device around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_loader(loader, sampler, epoch: int, batches: int) -> float:
    """Samples/s over `batches` batches of one epoch, after its first batch (worker start-up, first reads)."""
    sampler.set_epoch(epoch)
    iterator = iter(loader)
    next(iterator)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += next(iterator)["raw"].shape[0]
    return samples / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------
# Memory of this process and its loader workers (Linux /proc)
# ----------------------------------------------------------------------------------------------------
def proc_fields_mb(pid: int | str, name: str, fields: tuple[str, ...]) -> list[float]:
    """`Field:  N kB` values of /proc/<pid>/<name> in MB (0 for a process that is gone)."""
    values = dict.fromkeys(fields, 0.0)
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return [values[k] for k in fields]


def child_pids() -> set[int]:
    """Live child processes of this process (DataLoader workers)."""
    me, children = os.getpid(), set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # field 4, after "pid (comm) state"
            children.add(int(entry.name))
    return children


class MemoryPeaks:
    """Peak RSS/PSS of this process and peak PSS of each given worker, sampled by a thread every
    `interval` seconds while a `with` block runs (and once at its end); peaks accumulate over blocks.
    With `workers=None` the children are looked up at every sample (processes a pool starts and ends), and
    `total_pss` is the peak of this process's PSS plus its children's at one instant."""

    def __init__(self, workers: set[int] | None, interval: float = 0.2):
        self.workers, self.interval = workers, interval
        self.rss = self.pss = self.total_pss = 0.0
        self.worker_pss = dict.fromkeys(workers or (), 0.0)

    def sample(self) -> None:
        rss, pss = proc_fields_mb("self", "smaps_rollup", ("Rss", "Pss"))
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        total = pss
        for pid in (child_pids() if self.workers is None else self.workers):
            worker = proc_fields_mb(pid, "smaps_rollup", ("Pss",))[0]
            self.worker_pss[pid] = max(self.worker_pss.get(pid, 0.0), worker)
            total += worker
        self.total_pss = max(self.total_pss, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemoryPeaks":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def parse_list(text: str, option: str, convert=str, choices: tuple | None = None) -> list:
    """A comma-separated option value; ValueError naming the option for a bad item."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = convert(item)
        except ValueError:
            raise ValueError(f"{option} {text!r}: {item!r} is not a valid {convert.__name__}") from None
        if choices is not None and value not in choices:
            raise ValueError(f"{option} {text!r}: {item!r} is not one of {', '.join(map(str, choices))}")
        items.append(value)
    return items


def data_setup(data_root: str | None):
    """The data a training run would use: (root, datasplit CSV, crop entries)."""
    root, notice = resolve_data_root(data_root)
    if notice:
        print(notice)
    csv_path = datasplit_for(root)
    return root, csv_path, read_datasplit(csv_path)


def run_cache(entries, cfg):
    """The crop cache a training run with this config would use (prepared on first use, then reopened)."""
    return prepare_cache(entries, cfg.classes, cfg.scale_nm, workers=cfg.workers)


def run_spec(cfg) -> PatchSpec:
    return PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)


def set_threads(threads: int | None) -> None:
    """--threads: on a shared machine, torch's default of one thread per core makes each parallel kernel
    wait for a busy core (on 2 loaded cores, batch collation's torch.stack of 7 MB of uint8 took 100 ms
    with 2 threads and 9 ms with 1)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} must be >= 1")
        torch.set_num_threads(threads)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's allocator peak on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    """The peak since `reset_peak_memory`, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc_fields_mb("self", "status", ("VmHWM",))[0]
