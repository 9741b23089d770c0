"""./run.sh submit (submit.py) end to end: a manifest built from the synthetic validation crops (one at 8 nm, one at
6 x 4 x 4 nm, as test crops are listed: crop number, dataset, label, voxel size, translation, shape) is
predicted from raw only and written in the official layout: arrays (not groups), uint8 0/1 for semantic
labels and integer ids for instance labels, attrs voxel_size/translation/shape, zipped."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import REPO, TINY_RUN_OPTIONS, run_script
from ngff import read_levels
from submission import check_submission, read_test_manifest

HEADER = "crop_name,dataset,class_label,voxel_size,translation,shape"


def vector(values, kind=float) -> str:
    return "[" + ";".join(f"{kind(v):g}" if kind is float else str(int(v)) for v in values) + "]"


@pytest.fixture(scope="module")
def manifest(synthetic_root, tmp_path_factory) -> Path:
    lines = [HEADER]
    for dataset, crop in (("synth_iso", 103), ("synth_aniso", 203)):
        crop_dir = synthetic_root / f"{dataset}/{dataset}.zarr/recon-1/labels/groundtruth/crop{crop}"
        for label in ("nuc", "pm", "mito_mem", "lyso_lum"):   # lyso_lum: a label the model does not predict
            level = read_levels(crop_dir / ("nuc" if label == "lyso_lum" else label))[0]
            lines.append(f"{crop},{dataset},{label},{vector(level.scale)},{vector(level.translation)},"
                         f"{vector(level.shape, int)}")
    path = tmp_path_factory.mktemp("manifest") / "test_crop_manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def submitted(manifest, tiny_root, synthetic_root, session_cli_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("submit")
    trained = run_script(["train_local.py", *TINY_RUN_OPTIONS, "--data-root", tiny_root, "--out-dir", out,
                          "--run-name", "r", "--epochs", "1", "--iterations", "3"], session_cli_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    # through the launcher, from another folder, with paths relative to it
    env = dict(session_cli_env, CELLMAP_VENV=str(Path(sys.executable).parent.parent))
    done = subprocess.run([str(REPO / "run.sh"), "submit", "r", "--manifest", os.path.relpath(manifest, out),
                           "--data-root", os.path.relpath(synthetic_root, out), "--batch-size", "8"], cwd=out, env=env,
                          capture_output=True, text=True, timeout=600)
    return out / "r", done


def test_submission_layout_dtypes_and_attrs_match_the_official_format(submitted, manifest):
    run_dir, done = submitted
    assert done.returncode == 0, done.stderr[-3000:]
    assert "labels the model does not predict are left out (each scores 0): lyso_lum (2 crops)" in done.stdout
    rows = [r for r in read_test_manifest(manifest) if r.label != "lyso_lum"]
    root = zarr.open_group(str(run_dir / "submission.zarr"), mode="r")
    for row in rows:
        array = root[f"crop{row.crop_id}/{row.label}"]
        assert isinstance(array, zarr.Array)
        assert array.shape == row.shape
        assert array.dtype == (np.uint8 if row.label != "nuc" else array.dtype) and array.dtype.kind == "u"
        assert array.attrs["voxel_size"] == list(row.voxel_size) and array.attrs["translation"] == list(row.translation)
        assert array.attrs["shape"] == list(row.shape)
        if row.label != "nuc":
            assert set(np.unique(array[:]).tolist()) <= {0, 1}
    assert check_submission(run_dir / "submission.zarr", rows) == []
    with zipfile.ZipFile(run_dir / "submission.zip") as archive:
        names = archive.namelist()
    assert "crop103/pm/.zarray" in names and "crop203/nuc/.zattrs" in names and not any("lyso" in n for n in names)


def test_missing_raw_is_one_line_and_writes_nothing(submitted, manifest, synthetic_root, tmp_path, session_cli_env):
    run_dir, _ = submitted
    root = tmp_path / "root"
    root.mkdir()
    (root / "synth_iso").symlink_to(synthetic_root / "synth_iso")   # synth_aniso's EM was never fetched
    done = run_script(["submit.py", run_dir, "--manifest", manifest, "--data-root", root, "--out",
                       tmp_path / "s.zarr"], session_cli_env)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: test crop 203 (synth_aniso): no raw EM at "), lines
    assert "csc fetch-data --crops test" in lines[0] and not (tmp_path / "s.zarr").exists()
