"""config_shenron.py: the options table resolves a run's config (profile, model and mode defaults; explicit
options win; range rules), the resume check names every explicit difference, and the README's options table
is the one the table generates."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import config_shenron as C
from conftest import REPO


def parse(*argv):
    return C.build_parser("test").parse_args([str(a) for a in argv])


def test_defaults_come_from_the_profile_model_and_mode():
    cfg = C.build_config(parse("--model", "unet_25d", "--mode", "model_comparison", "--profile", "shenron"),
                         "cuda", "/data")
    shenron, mode = C.PROFILES["shenron"], C.MODES["model_comparison"]
    assert (cfg.epochs, cfg.iterations) == (mode.epochs, mode.iterations)
    assert cfg.batch_size == shenron.batch_size["unet_25d"] and cfg.patch_shape == (5, 256, 256)
    assert (cfg.precision, cfg.channels_last, cfg.workers) == ("fp16", True, shenron.workers_per_gpu)
    cpu = C.build_config(parse("--model", "unet_3d"), "cpu", "/data")
    assert cpu.profile == "cpu" and cpu.precision == "fp32" and not cpu.channels_last
    assert cpu.patch_shape == (C.PROFILES["cpu"].patch_z_3d, 128, 128)
    assert (cpu.epochs, cpu.iterations) == C.MODES["quick"].schedule(C.PROFILES["cpu"])


def test_explicit_options_win_and_convert_to_config_values(tmp_path):
    cfg = C.build_config(parse("--patch-yx", 64, "--classes", "all", "--channels-last", "on", "--lr", 0.01,
                               "--max-nonfinite", 4, "--data-root", tmp_path), "cpu", str(tmp_path))
    assert cfg.patch_shape == (1, 64, 64) and cfg.classes == C.ALL_CLASSES and cfg.channels_last
    assert cfg.lr == 0.01 and cfg.max_consecutive_nonfinite == 4 and cfg.data_root == str(tmp_path.resolve())
    assert (cfg.scale_nm, cfg.foreground_fraction) == (C.TRAIN_SCALE_NM, 0.5)


@pytest.mark.parametrize("argv, message", [
    (("--batch-size", 0), "--batch-size 0 is out of range: must be at least 1"),
    (("--grad-clip", 0), "--grad-clip 0.0 is out of range: must be > 0"),
    (("--epochs", 1, "--iterations", 2), "the OneCycle schedule needs at least 3"),
    (("--patch-yx", 100, "--depth", 4), "--patch-yx 100 must be a multiple of 8"),
    (("--model", "unet_3d", "--final-tta-orthoplane", "on"), "--final-tta-orthoplane on averages 2D predictions"),
])
def test_bad_values_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        C.build_config(parse(*argv), "cpu", "/data")


def stored_run(tmp_path: Path, **options):
    cfg = C.build_config(parse(*[str(v) for kv in options.items() for v in kv]), "cpu", "/data")
    return SimpleNamespace(config=cfg, loss_options={}, datasplit=tmp_path / "split.csv", run_dir=tmp_path / "runs" / "r")


def test_resume_conflicts_name_each_explicit_difference(tmp_path):
    run = stored_run(tmp_path, **{"--lr": 0.004, "--patch-yx": 32})
    same = parse("--lr", 0.004, "--patch-yx", 32, "--workers", 3, "--out-dir", tmp_path / "runs", "--run-name", "r",
                 "--datasplit", tmp_path / "split.csv")
    assert C.resume_conflicts(same, run, "cpu") == []
    differ = parse("--lr", 0.01, "--patch-yx", 64, "--classes", "all", "--loss-option", "alpha=0.6",
                   "--out-dir", tmp_path / "elsewhere", "--run-name", "other")
    conflicts = C.resume_conflicts(differ, run, "cpu")
    assert "--lr 0.01 but the run has lr=0.004" in conflicts
    assert "--patch-yx 64 but the run has patch_shape=(1, 32, 32)" in conflicts
    assert any(c.startswith("--classes 'all' but the run has classes=('nuc',") for c in conflicts)
    assert any(c.startswith("--loss-option alpha=0.6 but the run has loss_option={}") for c in conflicts)
    assert any(c.startswith("--out-dir") and "elsewhere" in c for c in conflicts)
    assert "--run-name 'other' but the run has run_name='r'" in conflicts
    assert len(conflicts) == 6


def test_a_resume_may_change_the_free_options_only(tmp_path):
    run = stored_run(tmp_path)
    resumed = C.resume_overrides(parse("--workers", 5), run.config, "cpu")
    assert resumed.workers == 5 and resumed.with_overrides(workers=run.config.workers) == run.config
    assert {o.flag for o in C.OPTIONS if o.on_resume == "free"} == {"--workers", "--device"}


def test_run_config_round_trips_through_json():
    cfg = C.build_config(parse(), "cpu", "/data")
    import json

    assert C.RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        C.RunConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_readme_options_table_is_generated_from_the_table():
    readme = (REPO / "README.md").read_text()
    assert C.readme_with_options(readme) == readme, "run `python config_shenron.py --readme`"
    for o in C.OPTIONS:
        assert f"| `{o.flag}` |" in readme
