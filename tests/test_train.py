"""End-to-end tests of train_local.py on the tiny dataset: every named option takes effect, OneCycle steps once
per batch, resuming continues with identical state, and a 2-process torchrun (gloo) run writes its files once
and reports the same validation counts as a single-process evaluation of its checkpoints."""
from __future__ import annotations

import csv
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import config_shenron as C
from runfiles import load_checkpoint, load_json
from conftest import (TINY_RUN_OPTIONS, epoch_metrics, epochs_recorded, folder_digest, kill_when, run_training,
                      start_training)
from cache import prepare_cache
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
    cache = prepare_cache(read_datasplit(results["datasplit"]), cfg.classes, cfg.scale_nm, cache_root=cache_dir,
                          progress=False)
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


# ---------------------------------------------------------------------------------------------- validation
@pytest.fixture(scope="module")
def subset_run(tiny_root, session_cli_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("subset")
    done = run_training([*TINY_RUN_OPTIONS, "--epochs", 2, "--iterations", 2, "--val-budget", "0.5",
                         "--final-evaluation", "official", "--final-tta-orthoplane", "on", "--data-root", tiny_root,
                         "--out-dir", out, "--run-name", "s"], session_cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "s", done.stdout


def test_validation_during_training_is_a_fixed_subset_and_the_end_is_in_full(subset_run, cache_dir):
    run_dir, stdout = subset_run
    results = load_json(run_dir / "results.json")
    validation = results["validation"]
    assert validation["tiles"] == 2 < validation["of_tiles"]      # ceil(0.5 x 2 steps x batch 2) tiles
    assert "fixed subset" in validation["subset"] and validation["metric"].startswith("8-nm training grid")
    final = results["final_evaluation"]
    assert set(final) <= {"best", "last", "best_tta_orthoplane"} and "best" in final
    full = final["best"]["tilings"]["training"]
    assert full["tiles"] == validation["of_tiles"] and full["metric"].startswith("8-nm training grid")
    assert full["recorded"] is None and "not comparable" in full["recorded_source"]
    official = final["best"]["official"]
    assert official["rules_version"].startswith("cellmap-segmentation-challenge") and "nuc" in official["classes"]
    assert "final evaluation of best.pt" in stdout and "overall" in stdout
    strongest = final["best_tta_orthoplane"]          # the 2D model's strongest form, scored in both metrics
    sliding = strongest["tilings"]["sliding"]
    assert sliding["tta"] and sliding["orthoplane"] and sliding["metric"].startswith("8-nm training grid")
    assert strongest["official"]["overall"] is not None and strongest["epoch"] == final["best"]["epoch"]
    assert "with test-time augmentation and orthoplane averaging" in stdout


def test_results_name_every_crop_and_the_sampler_settings(subset_run):
    """results.json's `crops`: one row per datasplit row with its split, status and expected share of the
    training samples; the sampler's settings are in the config."""
    run_dir, _ = subset_run
    results = load_json(run_dir / "results.json")
    rows = {r["name"]: r for r in results["crops"]}
    assert set(rows) == {"tiny_iso/crop1", "tiny_iso/crop2", "tiny_iso/crop3"}
    assert all(r["status"] == "used" and r["label_voxel_size"] == [8.0, 8.0, 8.0] for r in rows.values())
    train = [r for r in rows.values() if r["split"] == "train"]
    assert len(train) == 2 and sum(r["sample_share"] for r in train) == pytest.approx(1.0)
    assert rows["tiny_iso/crop3"]["split"] == "validate" and rows["tiny_iso/crop3"]["sample_share"] is None
    config = results["config"]
    assert (config["foreground_fraction"], config["max_missing_raw"], config["seed"]) == (0.5, 0.25, 0)


def test_ddp_validation_with_a_rank_without_tiles_completes_and_counts_like_one_process(tiny_root, session_cli_env,
                                                                                          tmp_path, cache_dir):
    """One validation tile for 2 ranks (3D): rank 1 validates nothing. The DDP wrapper's forward is a collective,
    so validating through it waited forever; the module, with rank 0's BatchNorm statistics, gives the counts a
    single process gets from the checkpoint."""
    done = run_training([*TINY_RUN_OPTIONS, "--model", "unet_3d", "--epochs", 1, "--iterations", 3,
                         "--val-budget", "0.01", "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "d"],
                        dict(session_cli_env, CELLMAP_DDP_TIMEOUT_MIN="1"), processes=2, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = load_json(tmp_path / "d" / "results.json")
    assert results["validation"]["tiles"] == 1 and results["world_size"] == 2
    cfg, cache, spec = run_cache(results, cache_dir)
    from loaders import validation_loader

    loader = validation_loader(cfg, cache, spec)
    report = validate(load_model(cfg, tmp_path / "d" / "last.pt"), loader, cfg.classes, "cpu")
    for cls in cfg.classes:
        mine, logged = report["per_class"][cls], results["history"][-1]["per_class"][cls]
        assert (mine["tp"], mine["fp"], mine["fn"]) == (logged["tp"], logged["fp"], logged["fn"]), cls


# ---------------------------------------------------------------------------------------------- GPU readiness
def test_bf16_is_refused_on_a_gpu_without_native_bf16(monkeypatch):
    import runtime
    import test_setup

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 2080 Ti")
    with pytest.raises(ValueError, match=r"--precision bf16: NVIDIA GeForce RTX 2080 Ti \(compute capability 7.5\) "
                                         r"has no native bf16.*use --precision fp16"):
        runtime.check_precision("bf16", "cuda")
    runtime.check_precision("fp16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a: True)  # what torch says on Turing
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"name": "NVIDIA GeForce RTX 2080 Ti", "total_memory": 11 * 2**30}))
    assert "bf16 no (fp16 + GradScaler)" in test_setup.check_cuda()[1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    runtime.check_precision("bf16", "cuda")


def test_largest_batch_doubles_then_bisects():
    import runtime

    tried = []

    def fits(batch):
        tried.append(batch)
        if batch > 37:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch <= 37

    assert runtime.largest_batch(fits, 8) == 37
    assert tried[:4] == [8, 16, 32, 64] and len(tried) <= 10
    assert runtime.largest_batch(lambda b: False, 8) == 1


def test_ema_is_validated_and_saved_and_batch_auto_falls_back_on_the_cpu(tiny_root, session_cli_env, tmp_path):
    done = run_training([*TINY_RUN_OPTIONS, "--epochs", 2, "--iterations", 2, "--ema", "0.5", "--batch-size", "auto",
                         "--data-root", tiny_root, "--out-dir", tmp_path, "--run-name", "e"], session_cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--batch-size auto: no GPU; the cpu profile's 8" in done.stdout
    results = load_json(tmp_path / "e" / "results.json")
    assert results["config"]["batch_size"] == 8 and results["config"]["ema"] == 0.5
    assert all("ema" in h and h["ema"]["mean_dice"] is not None for h in results["history"])
    ema = load_checkpoint(tmp_path / "e" / "ema.pt")
    last = load_checkpoint(tmp_path / "e" / "last.pt")
    assert ema["epoch"] == 2 and any(not torch.equal(ema["model"][k], last["model"][k]) for k in last["model"])
    assert "ema" in last  # the average resumes with the run


def test_a_resume_on_another_number_of_processes_is_refused(options_run, session_cli_env):
    run_dir = options_run[0]
    done = run_training(["--resume", run_dir], session_cli_env, processes=2, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and "trained on 1 process(es)" in errors[0] and "this job has 2" in errors[0]
    assert "--nproc_per_node=1" in errors[0]


def test_sync_batchnorm_on_the_cpu_is_refused(tiny_root, session_cli_env, tmp_path):
    done = run_training([*TINY_RUN_OPTIONS, "--sync-bn", "on", "--data-root", tiny_root, "--out-dir", tmp_path],
                        session_cli_env)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --sync-bn on: SyncBatchNorm runs on GPUs")


def two_nodes(args, env_of_node, timeout=240, stop_node0=False):
    """Two torchrun "nodes" on this machine (c10d rendezvous on loopback, one process each): (node 0, node 1)
    CompletedProcess-like (returncode, stdout, stderr), and the seconds node 1 took. With `stop_node0`, node 0
    is stopped once node 1 has ended (as a cluster's scheduler ends a job one of whose nodes failed: rank 0
    would otherwise wait in the process group's rendezvous until its timeout)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs, started = [], time.time()
    for node in (0, 1):
        cmd = [torchrun, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}", "train_local.py", *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env=env_of_node(node),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    node1 = procs[1].communicate(timeout=timeout)
    seconds = time.time() - started
    if stop_node0:
        procs[0].terminate()
    node0 = procs[0].communicate(timeout=timeout)
    return (procs[0].returncode, *node0), (procs[1].returncode, *node1), seconds


def test_per_node_caches_without_a_shared_file_system_fail_within_a_minute(tiny_root, session_cli_env, tmp_path):
    args = [*TINY_RUN_OPTIONS, "--epochs", 1, "--iterations", 3, "--data-root", tiny_root, "--out-dir", tmp_path / "runs"]
    env = lambda node: dict(session_cli_env, CELLMAP_CACHE_DIR=str(tmp_path / f"cache{node}"),
                            CELLMAP_CACHE_SHARE_WAIT_S="10")
    _, (code, _, err), seconds = two_nodes(args, env, stop_node0=True)
    assert code != 0 and seconds < 60
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines and "is not shared with rank 0's node" in lines[0] and "CELLMAP_CACHE_PER_NODE=1" in lines[0]
    per_node = lambda node: dict(env(node), CELLMAP_CACHE_PER_NODE="1")
    (code0, out0, err0), (code1, _, err1), _ = two_nodes([*args[:-1], tmp_path / "runs2"], per_node)
    assert code0 == 0 and code1 == 0, (err0[-2000:], err1[-2000:])
    assert list((tmp_path / "cache1").rglob("meta.json")), "node 1 prepared its own cache"
