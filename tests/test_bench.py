"""Smoke tests of `bench.py loader` and `bench.py train` on tiny settings: they run and print their tables."""
from __future__ import annotations

import functools
import re

import pytest

import bench
from cache import prepare_cache

NUMBER = r"-?\d+(?:\.\d+)?%?"


@pytest.fixture
def tmp_cache(monkeypatch, cache_dir):
    """bench.py prepares the crop cache where training would; in tests, in the session's cache folder."""
    monkeypatch.setattr(bench, "prepare_cache", functools.partial(prepare_cache, cache_root=cache_dir))


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
    (["loader", "--workers", "0,x"], "--workers"),
    (["train", "--model", "unet_2d,unet_4d"], "--model"),
    (["train", "--batch-size", "2,2,2"], "--batch-size"),
])
def test_bad_options_exit_2_with_one_line(argv, culprit, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and "\n" not in err
