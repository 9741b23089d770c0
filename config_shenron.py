"""The toolkit's one configuration module: classes, hardware profiles, model configs, run modes, paths, and
the options table from which a run's command line, its `RunConfig`, the resume check and the README's
options table are all made.

`OPTIONS` lists every `train_local.py` option once: flag, type, default (a value, or a rule that reads the
hardware profile, model config, mode and device), help, the range rule, the `RunConfig` field it sets and
what a `--resume` may do with it. Adding an option is one entry there. The resolution rules:
1. the profile comes from `--profile` (auto: by the visible GPU), the model config from `--model`, the
   schedule from `--mode`;
2. every other option given on the command line wins; an option not given takes its default, read from
   the profile, model config, mode or device where the table says so;
3. range rules, then the cross-field rules of `check_config`, turn bad values into one ValueError line;
4. on `--resume` the run's stored config is used as it is; an option given explicitly must resolve to the
   stored value (else the resume is refused, naming both), except the options marked `free`.
The `RunConfig` is stored in the checkpoint and in results.json and compared field by field on resume.

Conventions:
- spatial tuples are always (z, y, x); scales are in nanometres;
- `iterations` counts optimiser steps (batches) per epoch on each rank, not samples (cellmap-data's
  `iterations_per_epoch` counts samples, a trap noted in the facts page);
- `batch_size` is per GPU/process; the effective batch is `batch_size * world_size`.

`python config_shenron.py --readme` rewrites the options table in README.md from `OPTIONS`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import asdict, dataclass, fields, make_dataclass, replace
from pathlib import Path
from typing import Any, Callable

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
# Training voxel size: every crop is resampled to this grid (see cache.py).
TRAIN_SCALE_NM: tuple[float, float, float] = (8.0, 8.0, 8.0)

PRECISIONS = ("fp16", "bf16", "fp32")  # autocast dtype of a run (fp16 with a GradScaler)
NORMS = ("batch", "instance", "group")   # normalisation layer of the UNet


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


def choose_profile(requested: str = "auto", device: str = "auto") -> HardwareProfile:
    """Pick the hardware profile: explicit name, else by the visible hardware."""
    if requested != "auto":
        if requested not in PROFILES:
            raise ValueError(f"unknown profile {requested!r}; valid: {', '.join(PROFILES)}")
        return PROFILES[requested]
    import torch  # only here: the tables above are read by code that must not pay for importing torch

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


# The named loss configurations of the loss comparison: "loss" names a class of losses.py, the rest are its
# keyword arguments. class_weights may be "seed", a frequency scheme (needs class frequencies) or a dict.
LOSS_CONFIGS: dict[str, dict[str, Any]] = {
    "baseline_bce": {"loss": "BCELoss"},
    "dice": {"loss": "DiceLoss", "batch_dice": True},
    "dice_bce": {"loss": "DiceBCELoss"},
    "focal": {"loss": "FocalLoss", "gamma": 2.0, "alpha": None},
    "tversky_precision": {"loss": "TverskyLoss", "alpha": 0.7, "beta": 0.3},
    "tversky_recall": {"loss": "TverskyLoss", "alpha": 0.3, "beta": 0.7},
    "combo": {"loss": "ComboLoss", "dice_weight": 1.0, "focal_weight": 1.0},
    "per_class_weighted": {"loss": "PerClassComboLoss", "class_weights": "seed"},
    "per_class_weighted_focal": {"loss": "PerClassComboLoss", "class_weights": "seed", "bce_weight": 0.0,
                                 "focal_weight": 1.0},
    "per_class_tversky_precision": {"loss": "PerClassTverskyLoss", "class_weights": "seed", "alpha": 0.7,
                                    "beta": 0.3},
    "boundary": {"loss": "BoundaryLoss", "boundary_width": 3, "boundary_gain": 4.0},
    "per_class_weighted_freq": {"loss": "PerClassComboLoss", "class_weights": "sqrt_inverse"},
}


# ----------------------------------------------------------------------------------------------------
# The options table
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """What defaults are read from: the resolved profile, model config, mode, device type and data root."""

    profile: HardwareProfile
    model: ModelConfig
    mode: ModeConfig
    device: str
    data_root: str


@dataclass(frozen=True)
class Derived:
    """A default read from the context; `text` describes it in --help and the README."""

    text: str
    rule: Callable[[Context], Any]


@dataclass(frozen=True)
class Option:
    """One `train_local.py` option.

    `field` is the RunConfig field it sets (None: not part of the run's config); `to_config` turns the
    command-line value into the field's value (default: unchanged). `rule` = (test, text) checks the field's
    value. `on_resume`: "fixed" (a resume must not change it), "free" (a resume may change it), "new" (only
    for a new run); options outside the config that a resume must match name the stored value in `stored`.
    """

    flag: str
    help: str
    default: Any = None
    type: Callable = str
    choices: tuple | None = None
    field: str | None = None
    to_config: Callable[[Context, Any], Any] | None = None
    rule: tuple[Callable[[Any], bool], str] | None = None
    on_resume: str = "fixed"
    stored: Callable[[Any], Any] | None = None
    metavar: str | None = None
    repeatable: bool = False

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    def default_text(self) -> str:
        if isinstance(self.default, Derived):
            return self.default.text
        return "-" if self.default is None else str(self.default)

    def resolve(self, ctx: Context, given):
        """The config value of this option for a command-line value (None: not given)."""
        value = given
        if value is None:
            value = self.default.rule(ctx) if isinstance(self.default, Derived) else self.default
        return self.to_config(ctx, value) if self.to_config else value


AUTO_BATCH_MEMORY_FRACTION = 0.85


def batch_size_value(text: str):
    """--batch-size: a number, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a whole number, or auto") from None


def parse_loss_options(items: list[str]) -> dict:
    """`--loss-option KEY=VALUE` items as a dict: numbers as float, true/false/none as such, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--loss-option {item!r} must look like KEY=VALUE")
        special = {"true": True, "false": False, "none": None}
        try:
            out[key] = special[value.lower()] if value.lower() in special else float(value)
        except ValueError:
            out[key] = value
    return out


def _patch_shape(ctx: Context, patch_yx: int) -> tuple[int, int, int]:
    return (ctx.model.patch_shape(ctx.profile)[0], patch_yx, patch_yx)


def _positive(text: str = "at least 1"):
    return (lambda v: v >= 1, text)


OPTIONS: tuple[Option, ...] = (
    Option("--model", "model config: unet_2d (1 slice), unet_25d (5 slices as channels), unet_3d",
           "unet_2d", choices=tuple(MODELS), field="model"),
    Option("--loss", "named loss (`python losses.py` lists their settings)", "per_class_weighted",
           choices=tuple(LOSS_CONFIGS), field="loss"),
    Option("--mode", "schedule (epochs x iterations): " + ", ".join(MODES), "quick", choices=tuple(MODES),
           field="mode"),
    Option("--profile", "hardware profile: auto (by the visible GPU), " + ", ".join(PROFILES), "auto",
           choices=("auto", *PROFILES), field="profile",
           to_config=lambda ctx, v: choose_profile(v, ctx.device).name),
    Option("--classes", "class set: quick (nuc, mito_mem, er_mem, pm, golgi_mem) or all (14 classes)", "quick",
           choices=tuple(CLASS_SETS), field="classes", to_config=lambda ctx, v: CLASS_SETS[v]),
    Option("--data-root", "CellMap data root", Derived(f"$CELLMAP_DATA_ROOT, else {DEFAULT_DATA_ROOT}, else "
                                                       f"the synthetic set", lambda ctx: ctx.data_root),
           field="data_root", to_config=lambda ctx, v: str(Path(v).resolve())),
    Option("--datasplit", "datasplit CSV", Derived("DATA_ROOT/datasplit.csv, else one written into the cache "
                                                   "folder", lambda ctx: None),
           stored=lambda run: str(run.datasplit), to_config=lambda ctx, v: v and str(Path(v).resolve())),
    Option("--data-backend", "training sampler: the cached toolkit path or cellmap-data directly (slow)",
           "toolkit", choices=("toolkit", "cellmap-data"), field="data_backend"),
    Option("--epochs", "epochs", Derived("the mode's", lambda ctx: ctx.mode.schedule(ctx.profile)[0]), int,
           field="epochs", rule=_positive()),
    Option("--iterations", "optimiser steps per epoch on each rank",
           Derived("the mode's", lambda ctx: ctx.mode.schedule(ctx.profile)[1]), int, field="iterations",
           rule=_positive()),
    Option("--batch-size", "samples per step per GPU/process; auto: the largest that fits "
           f"{AUTO_BATCH_MEMORY_FRACTION:.0%} of the GPU's memory (CUDA; the profile's on the CPU)",
           Derived("the profile's per model, e.g. 12 (2D) / 8 (2.5D) on shenron",
                   lambda ctx: ctx.profile.batch_size[ctx.model.name]), batch_size_value, field="batch_size",
           rule=(lambda v: v == "auto" or v >= 1, "at least 1, or auto")),
    Option("--lr", "peak learning rate of AdamW + OneCycle", 1e-3, float, field="lr",
           rule=(lambda v: 0 < v <= 1, "in (0, 1]")),
    Option("--weight-decay", "AdamW weight decay", 1e-4, float, field="weight_decay", rule=(lambda v: v >= 0, ">= 0")),
    Option("--grad-clip", "gradient clipping norm", 1.0, float, field="grad_clip", rule=(lambda v: v > 0, "> 0")),
    Option("--seed", "seed of initialisation and sampling", 0, int, field="seed", rule=(lambda v: v >= 0, ">= 0")),
    Option("--precision", "autocast precision: fp16 (GradScaler), bf16, fp32",
           Derived("the profile's on CUDA, fp32 on CPU",
                   lambda ctx: ctx.profile.precision if ctx.device == "cuda" else "fp32"),
           choices=PRECISIONS, field="precision"),
    Option("--workers", "loader worker processes per rank", Derived("the profile's", lambda ctx: ctx.profile.workers_per_gpu),
           int, field="workers", rule=(lambda v: v >= 0, ">= 0"), on_resume="free"),
    Option("--patch-yx", "y/x patch size in voxels at 8 nm",
           Derived("the profile's: 256 on GPU, 128 on CPU", lambda ctx: ctx.profile.patch_yx), int,
           field="patch_shape", to_config=_patch_shape),
    Option("--base-channels", "UNet width (channels of the first level)",
           Derived("the profile's", lambda ctx: ctx.profile.base_channels), int, field="base_channels",
           rule=(lambda v: v >= 1, ">= 1")),
    Option("--depth", "UNet resolution levels", Derived("the profile's", lambda ctx: ctx.profile.depth), int,
           field="depth", rule=(lambda v: v >= 1, ">= 1")),
    Option("--norm", "normalisation layer of the UNet", "batch", choices=NORMS, field="norm"),
    Option("--sync-bn", "synchronise BatchNorm statistics across GPUs (SyncBatchNorm; CUDA under DDP): auto = on "
           "for 3D models, whose batches per GPU are small", "auto", choices=("auto", "on", "off"), field="sync_bn"),
    Option("--ema", "decay of an exponential moving average of the weights, validated and saved as ema.pt every "
           "epoch (0 = off)", 0.0, float, field="ema", rule=(lambda v: 0 <= v < 1, "in [0, 1)")),
    Option("--max-missing-raw", "largest share of a training patch's raw that may be missing (never-fetched EM, "
           "masked out of the loss); patches above it are drawn again", 0.25, float, field="max_missing_raw",
           rule=(lambda v: 0 <= v < 1, "in [0, 1)")),
    Option("--val-budget", "validation tiles per epoch, as a fraction of the epoch's training samples (a fixed "
           "seeded subset of the tiles, the same every epoch; 0 = every tile of every validation crop)", 0.25,
           float, field="val_budget", rule=(lambda v: v >= 0, ">= 0")),
    Option("--val-batch-size", "validation tiles per forward pass",
           Derived("the profile's batch size for the model", lambda ctx: ctx.profile.batch_size[ctx.model.name]),
           int, field="val_batch_size", rule=_positive()),
    Option("--val-patch-yx", "y/x size of validation tiles",
           Derived("the profile's patch size", lambda ctx: ctx.profile.patch_yx), int, field="val_patch_yx",
           rule=_positive()),
    Option("--final-evaluation", "at the end: the best and last checkpoints on every validation crop in full "
           "(8-nm metric) and, with official, the challenge's score at native resolution", "official",
           choices=("none", "full", "official"), field="final_evaluation"),
    Option("--final-tta-orthoplane", "the final evaluation also scores the best checkpoint with test-time "
           "augmentation (8 dihedral transforms) and orthoplane averaging, the strongest form of a 2D model: auto "
           "= on for unet_2d in --mode model_comparison (compare-models)", "auto", choices=("auto", "on", "off"),
           field="final_tta_orthoplane"),
    Option("--max-nonfinite", "stop after this many non-finite steps in a row", 25, int,
           field="max_consecutive_nonfinite", rule=(lambda v: v >= 1, ">= 1")),
    Option("--channels-last", "2D channels_last memory format", Derived("on for CUDA, off on CPU",
                                                                        lambda ctx: "on" if ctx.device == "cuda" else "off"),
           choices=("on", "off"), field="channels_last", to_config=lambda ctx, v: v == "on"),
    Option("--loss-option", "override a loss argument, e.g. alpha=0.6 or class_weights=log_inverse (repeatable)",
           metavar="KEY=VALUE", repeatable=True, stored=lambda run: run.loss_options,
           to_config=lambda ctx, v: parse_loss_options(v or [])),
    Option("--out-dir", "parent folder of run folders; each run gets OUT_DIR/RUN_NAME/, never overwritten",
           Derived("runs/ in the repository", lambda ctx: str(DEFAULT_OUT_DIR)),
           stored=lambda run: str(run.run_dir.resolve().parent), to_config=lambda ctx, v: str(Path(v).resolve())),
    Option("--run-name", "run folder name (`-2`, `-3` appended if taken)",
           Derived("MODEL-LOSS-sSEED-TIME", lambda ctx: None), stored=lambda run: run.run_dir.name),
    Option("--resume", "continue a run from its last completed epoch (same config)", metavar="RUN_DIR",
           on_resume="new"),
    Option("--device", "device", "auto", choices=("auto", "cpu", "cuda"), on_resume="free"),
)
# Fields of the config that no option sets: every run trains on this grid and with this sampler balance.
FIXED_FIELDS = {"scale_nm": TRAIN_SCALE_NM, "foreground_fraction": 0.5}
# Fields set from where the run executes (train_local.plan_run); a resume must match them.
RUNTIME_FIELDS = {"world_size": 1}


def _config_methods():
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"run config has unknown fields {sorted(unknown)}")
        missing = names - set(d)
        if missing:  # no default is guessed: an older run's behaviour is not always today's default
            raise ValueError(f"run config lacks {', '.join(sorted(missing))} (written by an older version of the "
                             f"toolkit; retrain, or use the version that wrote it)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def differences(self, other, ignore: tuple[str, ...] = ()) -> list[str]:
        """Human-readable `field: mine != theirs` for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k not in ignore and a[k] != b[k]]

    def with_overrides(self, **kw):
        return replace(self, **kw)

    return {"to_dict": to_dict, "from_dict": from_dict, "differences": differences, "with_overrides": with_overrides,
            "__doc__": "Everything that defines a run: one field per option of OPTIONS with a `field`, plus "
                       "FIXED_FIELDS. Stored in checkpoints and results.json; compared on resume."}


RunConfig = make_dataclass("RunConfig", [o.field for o in OPTIONS if o.field] + list(FIXED_FIELDS) +
                           list(RUNTIME_FIELDS), frozen=True, namespace=_config_methods())


def build_parser(description: str) -> argparse.ArgumentParser:
    """The train_local.py command line. Options default to None so that a resume can tell which were given;
    abbreviations are refused (--epoch 3 is not --epochs 3)."""
    p = OneLineErrorParser(description=description, allow_abbrev=False)
    for o in OPTIONS:
        help_text = f"{o.help} (default: {o.default_text()})" if o.default is not None else o.help
        kw = dict(action="append", default=[]) if o.repeatable else dict(type=o.type, default=None)
        p.add_argument(o.flag, choices=o.choices, help=help_text.replace("%", "%%"), metavar=o.metavar, **kw)
    return p


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad option (unknown choice, a non-number) as one `error:` line with exit code 2, like every
    other bad input, instead of argparse's usage dump."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def context_for(args: argparse.Namespace, device: str, data_root: str) -> Context:
    def given(name):
        value = getattr(args, name, None)
        return value if value is not None else OPTION[name].default

    profile = choose_profile(given("profile"), device)
    return Context(profile, lookup(MODELS, given("model"), "model"), lookup(MODES, given("mode"), "mode"),
                   device, data_root)


def build_config(args: argparse.Namespace, device: str, data_root: str) -> RunConfig:
    """Resolve a new run's command line against defaults, the hardware profile, the model and the mode."""
    ctx = context_for(args, device, data_root)
    values = {o.field: o.resolve(ctx, getattr(args, o.dest)) for o in OPTIONS if o.field}
    for o in OPTIONS:
        if o.rule and not o.rule[0](values[o.field]):
            raise ValueError(f"{o.flag} {values[o.field]} is out of range: must be {o.rule[1]}")
    cfg = RunConfig(**values, **FIXED_FIELDS, **RUNTIME_FIELDS)
    check_config(cfg)
    return cfg


def config_from_options(device: str, data_root, **options) -> RunConfig:
    """The RunConfig a new `train_local.py` run with these options (keywords for flags, e.g. batch_size=8;
    None = not given) gets on this device: benchmarks and the environment check use what training uses."""
    argv = [str(part) for key, value in options.items() if value is not None
            for part in (f"--{key.replace('_', '-')}", value)]
    return build_config(build_parser("train_local.py").parse_args(argv), device, str(data_root))


def check_config(cfg: RunConfig) -> None:
    """Rules that tie several fields together; ValueError naming the options."""
    if cfg.epochs * cfg.iterations < 3:  # OneCycle needs a warm-up step and an annealing step
        raise ValueError(f"--epochs {cfg.epochs} x --iterations {cfg.iterations} gives {cfg.epochs * cfg.iterations} "
                         f"optimiser steps; the OneCycle schedule needs at least 3")
    multiple = 2 ** (cfg.depth - 1)
    z, y, _ = cfg.patch_shape
    if y % multiple:
        raise ValueError(f"--patch-yx {y} must be a multiple of {multiple} for a UNet of depth {cfg.depth}")
    if cfg.val_patch_yx % multiple:
        raise ValueError(f"--val-patch-yx {cfg.val_patch_yx} must be a multiple of {multiple} for a UNet of depth "
                         f"{cfg.depth}")
    if cfg.final_tta_orthoplane == "on" and MODELS[cfg.model].dims == 3:
        raise ValueError(f"--final-tta-orthoplane on averages 2D predictions along z, y and x: {cfg.model} is 3D")
    if MODELS[cfg.model].dims == 3 and z % multiple:
        raise ValueError(f"3D patch depth {z} must be a multiple of {multiple} for depth {cfg.depth}")


def resume_conflicts(args: argparse.Namespace, run, device: str) -> list[str]:
    """Options given explicitly on a resume command that differ from the stored run (`run` has `config`,
    `loss_options`, `datasplit` and `run_dir`), each as `--flag value but the run has field=value`."""
    cfg = run.config
    ctx = Context(PROFILES[cfg.profile], MODELS[cfg.model], MODES[cfg.mode], device, cfg.data_root)
    conflicts = []
    for o in OPTIONS:
        given = getattr(args, o.dest)
        if o.on_resume != "fixed" or given is None or given == []:
            continue
        if o.field:
            name, stored = o.field, getattr(cfg, o.field)
        elif o.stored:
            name, stored = o.dest, o.stored(run)
        else:
            continue
        if o.resolve(ctx, given) != stored:
            shown = " ".join(given) if o.repeatable else repr(given)
            conflicts.append(f"{o.flag} {shown} but the run has {name}={stored!r}")
    return conflicts


def resume_overrides(args: argparse.Namespace, cfg: RunConfig, device: str) -> RunConfig:
    """The stored config with the `free` options given on the resume command applied."""
    ctx = Context(PROFILES[cfg.profile], MODELS[cfg.model], MODES[cfg.mode], device, cfg.data_root)
    changes = {o.field: o.resolve(ctx, getattr(args, o.dest)) for o in OPTIONS
               if o.on_resume == "free" and o.field and getattr(args, o.dest) is not None}
    return cfg.with_overrides(**changes)


OPTION = {o.dest: o for o in OPTIONS}


# ----------------------------------------------------------------------------------------------------
# The README's options table
# ----------------------------------------------------------------------------------------------------
README_BEGIN = "<!-- options table: generated by `python config_shenron.py --readme` from config_shenron.OPTIONS -->"
README_END = "<!-- end of options table -->"
RESUME_TEXT = {"fixed": "must match", "free": "may change", "new": "-"}


def options_markdown() -> str:
    lines = ["| option | meaning | default | on `--resume` |", "|---|---|---|---|"]
    for o in OPTIONS:
        listed = not o.choices or all(choice in o.help for choice in o.choices)
        meaning = o.help if listed else f"{o.help}: {', '.join(o.choices)}"
        lines.append(f"| `{o.flag}` | {meaning} | {o.default_text()} | {RESUME_TEXT[o.on_resume]} |")
    return "\n".join(lines)


def readme_with_options(text: str) -> str:
    """README text with the block between README_BEGIN and README_END replaced by `options_markdown()`."""
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md has no options block ({README_BEGIN} ... {README_END})")
    return pattern.sub(lambda _: f"{README_BEGIN}\n{options_markdown()}\n{README_END}", text)


if __name__ == "__main__":
    if sys.argv[1:] != ["--readme"]:
        sys.exit("usage: python config_shenron.py --readme   (rewrites the options table in README.md)")
    readme = REPO_DIR / "README.md"
    readme.write_text(readme_with_options(readme.read_text()))
    print(f"updated the options table in {readme}")
