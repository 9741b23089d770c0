"""The toolkit's micro-benchmarks, one subcommand each (`python bench.py <subcommand> --help`).

losses: forward+backward time of every named loss configuration (`losses.LOSS_CONFIGS`) on one batch of
random logits and targets with ~10% NaN (unannotated) voxels, next to the unmasked reference pair MONAI
DiceLoss(sigmoid=True) + torch BCEWithLogitsLoss on the same logits (NaN replaced by 0: it cannot mask).
After a warm-up, the configurations run interleaved, round by round in a rotating order, so machine noise
hits them all alike; the table gives each one's median time and its ratio to the reference pair.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

import losses


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def _time_once(step: Callable[[], None], device: torch.device) -> float:
    """Seconds for one call of `step`, synchronising the device around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_losses(args: argparse.Namespace) -> int:
    """Time forward+backward of every named loss next to the MONAI Dice + torch BCE reference pair."""
    from monai.losses import DiceLoss as MonaiDiceLoss  # a reference only: imported where it is used

    device = _resolve_device(args.device)
    if not 1 <= args.classes <= len(losses.CLASSES):
        raise SystemExit(f"--classes must be between 1 and {len(losses.CLASSES)}, got {args.classes}")
    classes = losses.CLASSES[: args.classes]
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.classes, args.size, args.size)
    logits = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    positive_rate = torch.linspace(0.02, 0.4, args.classes).view(1, -1, 1, 1)
    target = (torch.rand(shape, generator=generator) < positive_rate).float()
    target[torch.rand(shape, generator=generator) < args.nan_fraction] = float("nan")
    target = target.to(device)
    reference_target = torch.nan_to_num(target, nan=0.0)
    annotated = ~torch.isnan(target)
    frequencies = (torch.nan_to_num(target).sum((0, 2, 3)) / annotated.sum((0, 2, 3))).tolist()
    class_frequencies = dict(zip(classes, frequencies))

    monai_dice = MonaiDiceLoss(sigmoid=True)
    torch_bce = torch.nn.BCEWithLogitsLoss()
    reference = "monai_dice+bce"
    steps: dict[str, Callable[[], torch.Tensor]] = {
        reference: lambda: monai_dice(logits, reference_target) + torch_bce(logits, reference_target)}
    for name in losses.LOSS_CONFIGS:
        loss = losses.build_loss(name, classes, class_frequencies=class_frequencies).to(device)
        steps[name] = lambda loss=loss: loss(logits, target)

    def run(name: str) -> None:
        logits.grad = None
        steps[name]().backward()

    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: allocator, kernels, lazy imports
        run(name)
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_time_once(lambda: run(name), device))

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"batch {shape}: B={args.batch} C={args.classes} {args.size}x{args.size}, "
          f"{args.nan_fraction:.0%} NaN voxels, {args.repeats} interleaved repeats after a warm-up")
    reference_ms = statistics.median(times[reference]) * 1e3
    print(f"{'loss':30s} {'median ms':>10s} {'ratio':>7s}")
    for name in names:
        median_ms = statistics.median(times[name]) * 1e3
        print(f"{name:30s} {median_ms:10.1f} {median_ms / reference_ms:7.2f}")
    ratio = statistics.median(times["per_class_weighted"]) * 1e3 / reference_ms
    verdict = "yes" if ratio <= 1.0 else "NO"
    print(f"per_class_weighted (masked, weighted) ratio {ratio:.2f} to the unmasked MONAI pair <= 1.0: {verdict}")
    return 0


def add_losses_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("losses", help="forward+backward time of every named loss")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--size", type=int, default=256, help="patch height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nan-fraction", type=float, default=0.1, help="share of unannotated voxels")
    parser.set_defaults(handler=bench_losses)


# Each entry adds one subcommand whose parser sets `handler(args) -> exit code`.
COMMANDS = (add_losses_command,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subcommands)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
