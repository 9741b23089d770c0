"""The toolkit's one configuration module: classes, hardware profiles, model configs, run modes, paths.

Everything a run needs is resolved here into one frozen `RunConfig`, which is stored in the checkpoint and
in `results.json` and compared field by field on `--resume`. Command-line parsing lives in
`train_local.py`; this module only holds the tables and the resolution rules.

Conventions:
- spatial tuples are always (z, y, x); scales are in nanometres;
- `iterations` counts optimiser steps (batches) per epoch on each rank, not samples (cellmap-data's
  `iterations_per_epoch` counts samples, a trap noted in the facts page);
- `batch_size` is per GPU/process; the effective batch is `batch_size * world_size`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent

# Challenge class names in the order used for every target tensor and table.
ALL_CLASSES: tuple[str, ...] = (
    "ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "golgi_mem", "golgi_lum",
    "ves_mem", "ves_lum", "endo_mem", "endo_lum", "er_mem", "er_lum", "nuc",
)
QUICK_CLASSES: tuple[str, ...] = ("nuc", "mito_mem", "er_mem", "pm", "golgi_mem")
CLASS_SETS: dict[str, tuple[str, ...]] = {"all": ALL_CLASSES, "quick": QUICK_CLASSES}
# The class the 2D-vs-2.5D question is about (large, 3D, needs z context).
KEY_CLASS = "nuc"

DEFAULT_DATA_ROOT = "/volatile/cellmap/data"
SYNTHETIC_DATA_DIR = REPO_DIR / "data" / "synthetic"
DEFAULT_OUT_DIR = REPO_DIR / "runs"
DEFAULT_CACHE_DIR = Path(os.environ.get("CELLMAP_CACHE_DIR", REPO_DIR / "cache"))
# Training voxel size: every crop is resampled to this grid (nearest neighbour; see data.py).
TRAIN_SCALE_NM: tuple[float, float, float] = (8.0, 8.0, 8.0)

PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class HardwareProfile:
    """What the machine can afford: precision, loader workers, batch sizes and model size."""

    name: str
    description: str
    precision: str              # fp16 (with GradScaler) | bf16 | fp32
    workers_per_gpu: int
    batch_size: dict[str, int]  # per model config name
    patch_yx: int               # y/x patch size in voxels at TRAIN_SCALE_NM
    patch_z_3d: int             # z extent of 3D patches
    base_channels: int
    depth: int
    reduced_schedule: bool      # use the short CPU schedule of each mode


PROFILES: dict[str, HardwareProfile] = {
    # Turing (RTX 2080 Ti) has no native bf16: fp16 with a GradScaler. Batch sizes are the seed's.
    "shenron": HardwareProfile(
        name="shenron", description="4x RTX 2080 Ti 11 GB, 32 CPU threads, 62 GB RAM",
        precision="fp16", workers_per_gpu=6,
        batch_size={"unet_2d": 12, "unet_25d": 8, "unet_3d": 2},
        patch_yx=256, patch_z_3d=32, base_channels=32, depth=5, reduced_schedule=False),
    # Any other CUDA machine (Ampere and newer have bf16).
    "gpu": HardwareProfile(
        name="gpu", description="generic CUDA GPU (bf16 when supported, else fp16)",
        precision="bf16", workers_per_gpu=6,
        batch_size={"unet_2d": 12, "unet_25d": 8, "unet_3d": 2},
        patch_yx=256, patch_z_3d=32, base_channels=32, depth=5, reduced_schedule=False),
    # Small enough that `./run.sh quick` finishes in minutes on 2 cores.
    "cpu": HardwareProfile(
        name="cpu", description="CPU only (small patches, narrow UNet, short schedules)",
        precision="fp32", workers_per_gpu=1,
        batch_size={"unet_2d": 8, "unet_25d": 8, "unet_3d": 2},
        patch_yx=128, patch_z_3d=16, base_channels=16, depth=4, reduced_schedule=True),
}


@dataclass(frozen=True)
class ModelConfig:
    """A model config: network dimensionality and how many z slices one input holds."""

    name: str
    dims: int           # 2: slices as channels; 3: volumetric convolutions
    input_slices: int   # z extent of the input patch (1 = 2D, 5 = 2.5D, D = 3D)
    description: str

    def patch_shape(self, profile: HardwareProfile) -> tuple[int, int, int]:
        z = profile.patch_z_3d if self.dims == 3 else self.input_slices
        return (z, profile.patch_yx, profile.patch_yx)

    @property
    def in_channels(self) -> int:
        return self.input_slices if self.dims == 2 else 1


MODELS: dict[str, ModelConfig] = {
    "unet_2d": ModelConfig("unet_2d", dims=2, input_slices=1, description="2D UNet, 1 slice"),
    "unet_25d": ModelConfig("unet_25d", dims=2, input_slices=5,
                            description="2.5D UNet, 5 adjacent z-slices as channels, predicts the centre"),
    "unet_3d": ModelConfig("unet_3d", dims=3, input_slices=0, description="3D UNet on (D,H,W) patches"),
}


@dataclass(frozen=True)
class ModeConfig:
    """A schedule: epochs x iterations (steps per epoch per rank), and the shorter CPU variant."""

    name: str
    epochs: int
    iterations: int
    cpu_epochs: int
    cpu_iterations: int
    description: str

    def schedule(self, profile: HardwareProfile) -> tuple[int, int]:
        if profile.reduced_schedule:
            return self.cpu_epochs, self.cpu_iterations
        return self.epochs, self.iterations


MODES: dict[str, ModeConfig] = {
    "quick": ModeConfig("quick", 3, 50, 3, 15, "smoke test of the whole pipeline"),
    "loss_comparison": ModeConfig("loss_comparison", 40, 200, 6, 30, "one arm of the loss comparison"),
    "model_comparison": ModeConfig("model_comparison", 60, 200, 12, 40, "one arm of 2D vs 2.5D"),
    "full": ModeConfig("full", 120, 300, 20, 50, "long training of one model"),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Stored in checkpoints and results.json; compared on resume."""

    model: str
    loss: str
    mode: str
    profile: str
    classes: tuple[str, ...]
    data_root: str
    data_backend: str
    epochs: int
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    grad_clip: float
    seed: int
    precision: str
    workers: int
    patch_shape: tuple[int, int, int]
    base_channels: int
    depth: int
    norm: str
    scale_nm: tuple[float, float, float]
    foreground_fraction: float
    max_consecutive_nonfinite: int
    channels_last: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"run config has unknown fields {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values)

    def differences(self, other: "RunConfig", ignore: tuple[str, ...] = ()) -> list[str]:
        """Human-readable `field: mine != theirs` for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k not in ignore and a[k] != b[k]]

    def with_overrides(self, **kw) -> "RunConfig":
        return replace(self, **kw)


def choose_profile(requested: str = "auto", device: str = "auto") -> HardwareProfile:
    """Pick the hardware profile: explicit name, else by the visible hardware."""
    if requested != "auto":
        if requested not in PROFILES:
            raise ValueError(f"unknown profile {requested!r}; valid: {', '.join(PROFILES)}")
        return PROFILES[requested]
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return PROFILES["cpu"]
    name = torch.cuda.get_device_name(0)
    if "2080" in name or torch.cuda.get_device_capability(0)[0] < 8:
        return PROFILES["shenron"]
    return PROFILES["gpu"]


def lookup(table: dict, name: str, what: str):
    """`table[name]`, or a ValueError that lists the valid names."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(table)}")
    return table[name]
