"""Environment check: a table of pass / warn / fail checks, each with the fix. Run by `./run.sh test`.

    python test_setup.py [--data-root DIR] [--profile auto|shenron|gpu|cpu]

A broken install fails (exit 1); missing real data or GPU on a CPU machine only warns.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import sys
import time
from pathlib import Path

PASS, WARN, FAIL = "pass", "warn", "FAIL"
REPO = Path(__file__).resolve().parent


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, name: str, status: str, detail: str, fix: str = "") -> None:
        self.rows.append((name, status, detail, fix))
        print(f"  {status:<4}  {name:<28} {detail}" + (f"\n        fix: {fix}" if fix and status != PASS else ""),
              flush=True)

    def check(self, name: str, fn, fix: str) -> object:
        """Run fn() -> (status, detail[, value]); an exception is a failure with its message."""
        try:
            out = fn()
        except Exception as err:  # the check's job is to report, not to crash
            self.add(name, FAIL, f"{type(err).__name__}: {err}".splitlines()[0][:160], fix)
            return None
        self.add(name, out[0], out[1], fix)
        return out[2] if len(out) > 2 else None


def check_packages() -> tuple[str, str]:
    from packaging.requirements import Requirement

    bad, found = [], []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{req.name} missing")
            continue
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req.name} {version} not {req.specifier}")
        found.append(f"{req.name} {version}")
    if bad:
        return FAIL, "; ".join(bad)
    return PASS, ", ".join(found[:4]) + f" (+{len(found) - 4} more, all within requirements.txt)"


def check_cuda() -> tuple[str, str, int]:
    import torch

    if not torch.cuda.is_available():
        return WARN, f"no CUDA GPU visible (torch {torch.__version__}); training runs on the CPU", 0
    n = torch.cuda.device_count()
    gpus = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        gpus.append(f"{p.name} {p.total_memory / 2**30:.1f} GiB")
    # Native bf16 needs compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() also says yes where it
    # would only emulate it (Turing, e.g. the RTX 2080 Ti), several times slower.
    bf16 = all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(n))
    return PASS, f"CUDA {torch.version.cuda}, {n} GPU(s): {'; '.join(gpus)}; bf16 {'yes' if bf16 else 'no (fp16 + GradScaler)'}", n


def check_nccl(n_gpus: int) -> tuple[str, str]:
    import torch.distributed as dist

    if n_gpus == 0:
        return (PASS if dist.is_gloo_available() else FAIL), "no GPU: DDP would use gloo " + \
            ("(available)" if dist.is_gloo_available() else "(missing)")
    return (PASS, "NCCL available") if dist.is_nccl_available() else (FAIL, "NCCL not available in this torch build")


def check_data(cli_root: str | None) -> tuple[str, str, object]:
    from datasplit import datasplit_for, read_datasplit, resolve_data_root

    root, notice = resolve_data_root(cli_root)
    csv_path = datasplit_for(root)
    entries = read_datasplit(csv_path)
    splits = {s: sum(e.split == s for e in entries) for s in ("train", "validate")}
    status = WARN if notice else PASS
    where = "synthetic dataset (no real data at the default root)" if notice else str(root)
    return status, f"{where}: {csv_path.name} valid, {splits['train']} train / {splits['validate']} validate crops", \
        (root, entries)


def check_annotation(entries, classes) -> tuple[str, str]:
    missing = []
    for split in ("train", "validate"):
        have = set().union(*[set(e.classes) for e in entries if e.split == split])
        lacking = [c for c in classes if c not in have]
        if lacking:
            missing.append(f"{split}: {', '.join(lacking)}")
    if missing:
        return WARN, "classes with no annotated crop: " + "; ".join(missing)
    return PASS, f"all {len(classes)} classes annotated in both splits"


def check_models(profile) -> tuple[str, str]:
    import torch

    import config_shenron as C
    from models import count_parameters, unet_for_run

    out = []
    for m in C.MODELS.values():
        # A small forward proves the wiring (memory is measured separately on GPU): 64x64, depth <= 4.
        cfg = C.config_from_options("cpu", "-", model=m.name, profile=profile.name, classes="all", patch_yx=64,
                                    depth=min(profile.depth, 4))
        net = unet_for_run(cfg)
        z, y, x = cfg.patch_shape
        shape = (1, m.in_channels, y, x) if m.dims == 2 else (1, 1, min(z, 16), y, x)
        with torch.no_grad():
            y_out = net(torch.rand(shape))
        if y_out.shape[1] != len(C.ALL_CLASSES) or not torch.isfinite(y_out).all():
            return FAIL, f"{m.name}: bad output {tuple(y_out.shape)}"
        out.append(f"{m.name} {count_parameters(net) / 1e6:.1f}M")
    return PASS, "forward OK: " + ", ".join(out)


def check_losses() -> tuple[str, str]:
    import torch

    import config_shenron as C
    from losses import LOSS_CONFIGS, build_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, len(C.ALL_CLASSES), 32, 32, generator=g, requires_grad=True)
    target = (torch.rand(2, len(C.ALL_CLASSES), 32, 32, generator=g) > 0.7).float()
    target[:, 3] = float("nan")
    target[..., :8] = float("nan")
    freqs = {c: 0.1 for c in C.ALL_CLASSES}
    bad = []
    for name in LOSS_CONFIGS:
        loss = build_loss(name, C.ALL_CLASSES, class_frequencies=freqs)(logits, target)
        loss.backward()
        if not torch.isfinite(loss) or not torch.isfinite(logits.grad).all():
            bad.append(name)
        logits.grad = None
    if bad:
        return FAIL, f"non-finite loss or gradient with NaN targets: {', '.join(bad)}"
    return PASS, f"{len(LOSS_CONFIGS)} named losses finite with NaN targets"


def check_disk(out_dir: Path) -> tuple[str, str]:
    probe = out_dir if out_dir.exists() else out_dir.parent
    free = shutil.disk_usage(probe).free / 2**30
    if free < 1:
        return FAIL, f"{free:.1f} GiB free under {probe}"
    return (WARN if free < 20 else PASS), f"{free:.0f} GiB free under {probe}"


def check_loader(root_entries, profile) -> tuple[str, str]:
    import config_shenron as C
    from cache import prepare_cache
    from sampling import EpochSampler, PatchSpec, TrainPatches, make_loader

    root, entries = root_entries
    try:
        cache = prepare_cache(entries, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, progress=False, build=False)
    except FileNotFoundError:
        if "synthetic" not in str(root):
            return WARN, "crop cache not prepared yet (the first training run builds it); throughput not measured"
        cache = prepare_cache(entries, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, progress=False)
    model = C.MODELS["unet_25d"]
    spec = PatchSpec(model.patch_shape(profile), model.dims)
    batch = profile.batch_size[model.name]
    loader = make_loader(TrainPatches(cache, spec, seed=0), batch, 0, EpochSampler(batch * 6))
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(b["raw"].shape[0] for b in it)
    rate = n / (time.perf_counter() - t0)
    return PASS, f"{rate:.0f} samples/s for unet_25d {spec.raw_shape} batch {batch}, 0 workers, {len(C.QUICK_CLASSES)} classes"


def check_gpu_step(profile) -> tuple[str, str]:
    import torch

    import config_shenron as C
    from losses import build_loss
    from models import unet_for_run

    out = []
    for name in ("unet_2d", "unet_25d"):
        cfg = C.config_from_options("cuda", "-", model=name, profile=profile.name, classes="all")
        b, (_, y, x) = cfg.batch_size, cfg.patch_shape
        net = unet_for_run(cfg).cuda()
        opt = torch.optim.AdamW(net.parameters())
        dtype = torch.bfloat16 if profile.precision == "bf16" and torch.cuda.get_device_capability()[0] >= 8 \
            else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        loss_fn = build_loss("per_class_weighted", C.ALL_CLASSES)
        torch.cuda.reset_peak_memory_stats()
        xb = torch.rand(b, C.MODELS[name].in_channels, y, x, device="cuda")
        yb = (torch.rand(b, len(C.ALL_CLASSES), y, x, device="cuda") > 0.8).float()
        with torch.autocast("cuda", dtype=dtype):
            loss = loss_fn(net(xb), yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        out.append(f"{name} batch {b}: {peak:.2f} of {total:.1f} GiB")
        del net, opt, xb, yb, loss
        torch.cuda.empty_cache()
    return PASS, "peak memory of one AMP step: " + "; ".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", help="CellMap data root (default: as training resolves it)")
    p.add_argument("--profile", default="auto")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    print("environment check")
    r = Report()
    r.add("python", PASS if sys.version_info >= (3, 10) else FAIL, sys.version.split()[0],
          "use Python 3.10 or newer (PYTHON=python3.11 ./setup_shenron.sh)")
    r.check("packages", check_packages, "./setup_shenron.sh (reinstalls requirements.txt into the venv)")
    n_gpus = r.check("cuda", check_cuda, "install the NVIDIA driver / a CUDA build of torch; CPU works, slowly") or 0
    r.check("distributed backend", lambda: check_nccl(n_gpus), "install a torch build with NCCL")
    import config_shenron as C

    device = "cuda" if n_gpus else "cpu"
    profile = r.check("hardware profile", lambda: (PASS, f"{C.choose_profile(args.profile, device).name}: "
                                                         f"{C.choose_profile(args.profile, device).description}",
                                                   C.choose_profile(args.profile, device)),
                      f"--profile one of {', '.join(C.PROFILES)}")
    root_entries = r.check("data root", lambda: check_data(args.data_root),
                           "set --data-root / $CELLMAP_DATA_ROOT to a CellMap root, or unset it for synthetic data")
    if root_entries:
        r.check("annotations", lambda: check_annotation(root_entries[1], C.ALL_CLASSES),
                "classes never annotated cannot be learned or scored; use --classes quick or more crops")
    if profile:
        r.check("models", lambda: check_models(profile), "reinstall torch (./setup_shenron.sh)")
    r.check("losses", check_losses, "losses.py is broken: run pytest tests/test_losses.py")
    r.check("disk for runs", lambda: check_disk(C.DEFAULT_OUT_DIR), "free space or use --out-dir on another disk")
    if root_entries and profile:
        r.check("loader throughput", lambda: check_loader(root_entries, profile), "see BENCHMARKS.md (bench.py loader)")
    if n_gpus and profile:
        r.check("GPU memory (AMP step)", lambda: check_gpu_step(profile), "lower --batch-size")
    fails = sum(row[1] == FAIL for row in r.rows)
    warns = sum(row[1] == WARN for row in r.rows)
    print(f"environment check: {len(r.rows) - fails - warns} pass, {warns} warn, {fails} fail")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
