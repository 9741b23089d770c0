"""Tests of bench.py's subcommands on tiny settings: they run and print their tables, the GPU check refuses a
machine without CUDA, the cache benchmark's estimate holds on a mock of real manifest rows, and the sliding
window benchmark agrees with MONAI."""
from __future__ import annotations

import functools
import re

import pytest

import bench
import bench_support
from cache import prepare_cache

NUMBER = r"-?\d+(?:\.\d+)?%?"


@pytest.fixture
def tmp_cache(monkeypatch, cache_dir):
    """bench.py prepares the crop cache where training would; in tests, in the session's cache folder."""
    monkeypatch.setattr(bench_support, "prepare_cache", functools.partial(prepare_cache, cache_root=cache_dir))


def table_rows(out: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header columns and the rows (split on 2+ spaces) of the table whose header starts so."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) < 3:
            break
        rows.append(cells)
    return re.split(r"\s{2,}", lines[start].strip()), rows


def test_loader_side_by_side_with_worker_sweep(tiny_root, tmp_cache, capsys):
    code = bench.main(["loader", "--data-root", str(tiny_root), "--model", "unet_25d", "--patch-yx", "32",
                       "--classes", "quick", "--batch-size", "2", "--batches", "2", "--repeats", "2",
                       "--backend", "both", "--workers", "0,1", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    header, rows = table_rows(out, "backend")
    assert header[:3] == ["backend", "workers", "samples/s"] and "PSS MB/worker" in header
    assert [(r[0], r[1]) for r in rows] == [("toolkit", "0"), ("cellmap-data", "0"), ("toolkit", "1"),
                                            ("cellmap-data", "1")]
    for row in rows:
        values = dict(zip(header, row))
        assert all(re.fullmatch(NUMBER, v) for v in row[1:]) and float(values["samples/s"]) > 0
        assert (float(values["PSS MB/worker"]) > 0) == (values["workers"] == "1")  # a worker's PSS is measured
    assert re.search(r"^toolkit / cellmap-data at 0 workers: [\d.]+x$", out, re.M)  # no verdict off the setting
    assert re.search(r"^toolkit / cellmap-data at 1 workers: [\d.]+x$", out, re.M)


def test_train_reports_both_rates_and_memory_per_model(tiny_root, tmp_cache, capsys):
    code = bench.main(["train", "--data-root", str(tiny_root), "--model", "unet_2d,unet_3d", "--batch-size", "2",
                       "--patch-yx", "32", "--steps", "1", "--base-channels", "4", "--depth", "2", "--workers", "0",
                       "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    header, rows = table_rows(out, "model")
    assert header == ["model", "batch", "patch", "img/s no data", "img/s with data", "data cost", "peak RSS MB"]
    assert [r[0] for r in rows] == ["unet_2d", "unet_3d"]
    for row in rows:
        values = dict(zip(header, row))
        assert float(values["img/s no data"]) > 0 and float(values["img/s with data"]) > 0
        assert float(values["peak RSS MB"]) > 100  # torch alone is larger; 0 would mean nothing was read


@pytest.mark.parametrize("argv, culprit", [
    (["loader", "--backend", "zarr"], "--backend"),
    (["sliding", "--tile", "9"], "--tile"),
    (["cache", "--manifest", "/nonexistent.csv"], "--manifest"),
    (["loader", "--workers", "0,x"], "--workers"),
    (["train", "--model", "unet_2d,unet_4d"], "--model"),
    (["train", "--batch-size", "2,2,2"], "--batch-size"),
])
def test_bad_options_exit_2_with_one_line(argv, culprit, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and "\n" not in err


TINY_TRAINING = ["--patch-yx", "32", "--steps", "1", "--base-channels", "4", "--depth", "2", "--workers", "0",
                 "--threads", "1"]


def test_gpu_check_is_refused_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(bench_support.torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no CUDA GPU" in err and "--device cpu" in err


def test_gpu_check_dry_run_measures_every_section(tiny_root, tmp_cache, capsys):
    code = bench.main(["gpu", "--device", "cpu", "--data-root", str(tiny_root), "--repeats", "1", "--compile", "off",
                       *TINY_TRAINING])
    out = capsys.readouterr().out
    assert code == 0, out
    header, rows = table_rows(out, "model     batch")
    assert "loader/GPU" in header and [r[0] for r in rows] == ["unet_2d", "unet_25d", "unet_3d"]
    assert all(float(dict(zip(header, r))["img/s no data"]) > 0 for r in rows)
    header, rows = table_rows(out, "model     step")
    assert len(rows) == 2 * bench.bench_train.AGREEMENT_STEPS
    assert re.search(r"^bf16 vs fp32 loss at the same weights, first 5 steps: largest relative difference \S+ "
                     r"\(agree", out, re.M)
    header, rows = table_rows(out, "model     channels_last")
    assert [(r[0], r[1]) for r in rows] == [("unet_2d", "off"), ("unet_2d", "on"), ("unet_25d", "off"), ("unet_25d", "on")]
    assert re.search(r"^gpu check took \d+ s \(target <= 300 s\)$", out, re.M)


def test_cache_benchmark_on_a_mock_of_real_rows(mock_suite, tmp_path, capsys):
    """Fresh preparation of the suite mock: time, memory and size are reported; the extrapolation's per-crop
    estimate of the raw and labels is within 5% of what was measured for every cached crop; the size
    extrapolated to the train manifest is at most 15 GB; no sample is half missing."""
    root, _ = mock_suite
    code = bench.main(["cache", "--data-root", str(root), "--workers", "1", "--samples", "100", "--cache-root",
                       str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"^preparation: [\d.]+ s; peak memory [\d.]+ GB .* cache [\d.]+ GB$", out, re.M)
    header, rows = table_rows(out, "crop")
    crops = {r[0].rsplit("/", 1)[-1]: dict(zip(header, r)) for r in rows}
    assert set(crops) == {"crop9", "crop142", "crop137", "crop410"}
    assert crops["crop410"]["status"] == "skipped"       # 32 nm labels, raw fetched only at 32 nm and coarser
    for name in ("crop9", "crop142", "crop137"):
        assert crops[name]["status"] == "used" and 0.95 <= float(crops[name]["est/meas"]) <= 1.05, crops[name]
    for label in ("default csc fetch-data", "EM fetched at all resolutions"):
        size = re.search(rf"^extrapolated to the 289 crops of train_crop_manifest.csv \({label}\): ([\d.]+) GB",
                         out, re.M)
        assert size and float(size.group(1)) <= 15.0        # issue 12: at most 15 GB at 8 nm, all 14 classes
    header, rows = table_rows(out, "model    ")
    assert [r[0] for r in rows] == ["unet_2d", "unet_25d", "unet_3d"]
    assert all(dict(zip(header, r))[">= 50% missing"] == "0.00%" for r in rows)
    assert not list(tmp_path.iterdir())   # the temporary cache is removed


def test_sliding_benchmark_agrees_with_monai_and_bounds_memory(capsys):
    code = bench.main(["sliding", "--shape", "64", "--tile", "16", "--depth", "2", "--base-channels", "2",
                       "--classes", "all", "--repeats", "1", "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    header, rows = table_rows(out, "window")
    assert [r[0] for r in rows] == ["toolkit", "MONAI"] and all(float(r[1]) > 0 for r in rows)
    difference = float(re.search(r"largest difference (\S+)$", out, re.M).group(1))
    assert difference < 1e-5
    # issue 13: at most 2x the float32 output (14 classes x 64^3 x 4 bytes = 14.7 MB) above what was held
    assert float(dict(zip(header, rows[0]))["x output"]) <= 2.0, out
