"""End-to-end tests of train_local.py on the tiny dataset: every named option takes effect, OneCycle steps once
per batch, resuming continues with identical state, and a 2-process torchrun (gloo) run writes its files once
and reports the same validation counts as a single-process evaluation of its checkpoints."""
from __future__ import annotations

import csv
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import config_shenron as C
from runfiles import load_checkpoint, load_json
from conftest import (TINY_RUN_OPTIONS, epoch_metrics, epochs_recorded, folder_digest, kill_when, run_training,
                      start_training)
from cache import cache_margin, prepare_cache
from datasplit import read_datasplit
from sampling import EpochSampler, PatchSpec, TrainPatches, ValidationTiles, batch_sanity_line, make_loader, to_model_inputs
from engine import validate
from models import UNet, unet_for_run

EPOCHS, ITERATIONS, BATCH, LR, SEED = 3, 2, 3, 0.004, 11


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def run_cache(results: dict, cache_dir: Path):
    """The crop cache a finished run trained on (reused, not rebuilt), with its config and patch spec."""
    cfg = C.RunConfig.from_dict(results["config"])
    margin = cache_margin(C.PROFILES[cfg.profile], cfg.patch_shape)
    cache = prepare_cache(read_datasplit(results["datasplit"]), cfg.classes, cfg.scale_nm, margin,
                          cache_root=cache_dir, progress=False)
    return cfg, cache, PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)


def load_model(cfg: C.RunConfig, checkpoint: Path) -> UNet:
    model = unet_for_run(cfg)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model


# ---------------------------------------------------------------------------------------------- options
def options_args(tiny_root: Path, datasplit: Path, out_dir: Path) -> list:
    """A non-default value for every named option."""
    return [*TINY_RUN_OPTIONS, "--model", "unet_25d", "--loss", "dice", "--mode", "loss_comparison",
            "--epochs", EPOCHS, "--iterations", ITERATIONS, "--batch-size", BATCH, "--lr", LR, "--seed", SEED,
            "--classes", "all", "--norm", "group", "--device", "cpu", "--data-root", tiny_root,
            "--datasplit", datasplit, "--out-dir", out_dir]


@pytest.fixture(scope="module")
def options_run(tiny_root, session_cli_env, tmp_path_factory):
    """(run folder, stdout, datasplit) of an uninterrupted run with non-default options. Its
    datasplit leaves golgi_lum unannotated in the training crops, to check the per-class training loss."""
    out = tmp_path_factory.mktemp("options")
    with open(tiny_root / "datasplit.csv", newline="") as f:
        rows = list(csv.reader(f))
    for row in rows:
        if row[0] == "train":
            row[4] = row[4].replace(",golgi_lum,", ",")
    datasplit = out / "split.csv"
    with open(datasplit, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    done = run_training(options_args(tiny_root, datasplit, out / "runs"), session_cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (out / "runs").iterdir()
    return run_dir, done.stdout, datasplit


# ---------------------------------------------------------------------------------------------- scheduler
def test_onecycle_steps_once_per_batch(options_run):
    run_dir = options_run[0]
    results = load_json(run_dir / "results.json")
    state = load_checkpoint(run_dir / "last.pt")["scheduler"]
    steps = EPOCHS * ITERATIONS
    assert state["total_steps"] == steps and state["last_epoch"] == steps and state["_step_count"] == steps + 1

    # Reference: torch's OneCycleLR over the same steps (warm-up length read from the run), stepped per batch.
    pct_start = (state["_schedule_phases"][0]["end_step"] + 1) / steps
    reference_opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=results["config"]["lr"], total_steps=steps,
                                                    pct_start=pct_start)
    expected = []  # the rate each step uses
    for _ in range(steps):
        expected.append(reference.get_last_lr()[0])
        reference_opt.step()
        reference.step()

    logged = tensorboard_scalars(run_dir, "train/lr")
    assert [s for s, _ in logged] == list(range(steps))
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-6)
    first_epoch = [v for _, v in logged[:ITERATIONS]]
    assert len(set(first_epoch)) == ITERATIONS, "the learning rate must change within an epoch"
    max_lr = results["config"]["lr"]
    assert logged[0][1] == pytest.approx(max_lr / 25) and max(v for _, v in logged) > 0.9 * max_lr
    assert logged[-1][1] < 1e-3 * max_lr, "the last step runs at the annealed minimum"
    assert [h["lr"] for h in results["history"]] == pytest.approx(expected[ITERATIONS - 1::ITERATIONS], rel=1e-9)


def test_every_named_option_takes_effect(options_run, tiny_root, cache_dir):
    run_dir, stdout, _ = options_run
    results = load_json(run_dir / "results.json")
    cfg = results["config"]
    assert (results["model"], results["loss"], results["loss_config"]["name"]) == ("unet_25d", "dice", "dice")
    assert (cfg["mode"], cfg["epochs"], cfg["iterations"], cfg["batch_size"], cfg["lr"], cfg["seed"]) == \
        ("loss_comparison", EPOCHS, ITERATIONS, BATCH, LR, SEED)
    assert results["classes"] == list(C.ALL_CLASSES) and results["seed"] == SEED and results["device"] == "cpu"
    assert cfg["data_root"] == str(tiny_root.resolve())
    assert run_dir.parent.name == "runs" and len(results["history"]) == EPOCHS

    state = load_checkpoint(run_dir / "last.pt")
    assert state["scheduler"]["last_epoch"] == EPOCHS * ITERATIONS
    assert state["optimizer"]["param_groups"][0]["max_lr"] == LR
    convs = [w for w in state["model"].values() if w.dim() == 4]
    assert convs[0].shape[1] == 5 and convs[-1].shape[0] == len(C.ALL_CLASSES)  # 2.5D input, 14 outputs
    assert cfg["norm"] == "group" and not any(k.endswith("running_mean") for k in state["model"])  # no BatchNorm

    # The logged first batch equals one built here from the seed, batch size, model, classes and data: so
    # --batch-size, --seed, --model, --classes and --data-root all reached the sampler.
    run_cfg, cache, spec = run_cache(results, cache_dir)
    patches = TrainPatches(cache, spec, seed=SEED, foreground_fraction=run_cfg.foreground_fraction)
    batch = next(iter(make_loader(patches, BATCH, 0, EpochSampler(ITERATIONS * BATCH))))
    x, y = to_model_inputs(batch, "cpu")
    assert list(x.shape) == [BATCH, 5, 32, 32]
    assert batch_sanity_line(x, y, run_cfg.classes) in stdout


def test_per_class_training_loss_averages_only_steps_where_the_class_is_annotated(options_run):
    run_dir = options_run[0]
    for entry in load_json(run_dir / "results.json")["history"]:
        per_class = entry["train_loss_per_class"]
        assert per_class["golgi_lum"] is None, "a class never annotated in training has no training loss"
        assert all(v is not None and math.isfinite(v) and v > 0 for c, v in per_class.items() if c != "golgi_lum")


# ---------------------------------------------------------------------------------------------- resume
def test_resume_after_kill_continues_at_next_epoch_with_identical_state(options_run, tiny_root, session_cli_env,
                                                                       tmp_path):
    uninterrupted_dir, _, datasplit = options_run
    run_dir = tmp_path / "k"
    kill_when(start_training([*options_args(tiny_root, datasplit, tmp_path), "--run-name", "k"], session_cli_env),
              lambda: epochs_recorded(run_dir) == 2)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2, "the kill must land during epoch 3"

    done = run_training(["--resume", run_dir], session_cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming k at epoch 3/{EPOCHS}" in done.stdout
    resumed, uninterrupted = load_json(run_dir / "results.json"), load_json(uninterrupted_dir / "results.json")
    assert resumed["status"] == "completed"
    assert epoch_metrics(resumed["history"]) == epoch_metrics(uninterrupted["history"])
    assert (resumed["best_epoch"], resumed["best"]) == (uninterrupted["best_epoch"], uninterrupted["best"])
    model_a = load_checkpoint(uninterrupted_dir / "last.pt")["model"]
    model_k = load_checkpoint(run_dir / "last.pt")["model"]
    assert all(torch.equal(model_a[k], model_k[k]) for k in model_a)


@pytest.fixture(scope="module")
def resume_commands(options_run, session_cli_env):
    """Two resume commands on the completed run, side by side: plain, and with options that differ from the
    run's; with the run folder's digest before and after."""
    run_dir = options_run[0]
    before = folder_digest(run_dir)
    commands = {"plain": ["--resume", run_dir, "--out-dir", run_dir.parent, "--run-name", run_dir.name],
                "different": ["--resume", run_dir, "--lr", 0.01, "--batch-size", 4, "--loss", "per_class_weighted",
                              "--out-dir", run_dir.parent / "elsewhere", "--run-name", "other"]}
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(commands, pool.map(lambda args: run_training(args, session_cli_env), commands.values())))
    return done, before, folder_digest(run_dir)


def test_resuming_a_completed_run_does_nothing(resume_commands):
    done, before, after = resume_commands
    assert done["plain"].returncode == 0 and "already completed" in done["plain"].stdout, done["plain"].stderr
    assert after == before


def test_resume_with_different_options_is_refused_naming_them(resume_commands):
    done, before, after = resume_commands
    refused = done["different"]
    assert refused.returncode == 2 and "Traceback" not in refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error:")
    for culprit in ("--lr 0.01", f"lr={LR}", "--batch-size 4", f"batch_size={BATCH}", "--loss 'per_class_weighted'",
                    "--out-dir", "elsewhere", "--run-name 'other'"):
        assert culprit in line, (culprit, line)
    assert after == before


# ---------------------------------------------------------------------------------------------- DDP
@pytest.fixture(scope="module")
def ddp_run(tiny_root, session_cli_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    done = run_training([*TINY_RUN_OPTIONS, "--epochs", 2, "--iterations", 2, "--data-root", tiny_root,
                         "--out-dir", out], session_cli_env, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_torchrun_two_processes_writes_everything_once(ddp_run):
    out, stdout = ddp_run
    (run_dir,) = out.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "last.pt", "results.json", "tensorboard"]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    results = load_json(run_dir / "results.json")
    assert results["world_size"] == 2 and results["status"] == "completed" and len(results["history"]) == 2
    assert stdout.count("run folder ") == 1 and stdout.count("epoch 1/2: train loss") == 1  # rank 0 only


def test_torchrun_validation_equals_single_process_evaluation(ddp_run, cache_dir):
    out, _ = ddp_run
    (run_dir,) = out.iterdir()
    results = load_json(run_dir / "results.json")
    cfg, cache, spec = run_cache(results, cache_dir)
    loader = make_loader(ValidationTiles(cache, spec, rank=0, world_size=1), cfg.batch_size, 0)
    for checkpoint, logged in (("best.pt", results["best"]), ("last.pt", results["history"][-1])):
        report = validate(load_model(cfg, run_dir / checkpoint), loader, cfg.classes, "cpu")
        for cls in cfg.classes:
            mine, theirs = report["per_class"][cls], logged["per_class"][cls]
            assert (mine["tp"], mine["fp"], mine["fn"]) == (theirs["tp"], theirs["fp"], theirs["fn"]), (checkpoint, cls)
            assert mine["dice"] == pytest.approx(theirs["dice"], abs=1e-9)
        assert report["mean_dice"] == pytest.approx(logged["mean_dice"], abs=1e-9)
