"""submission.py: the real test manifest, a writer -> check -> zip round trip on manifest rows, each layout
problem, and the zip layout the official unzip step reads (members at the zarr root, no links, no escapes)."""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

import submission as S
from conftest import REPO

REAL_MANIFEST = next((folder / "test_crop_manifest.csv" for folder in (REPO / "manifests",
                      Path("/work/shared/cellmap-manifests")) if (folder / "test_crop_manifest.csv").exists()),
                     REPO / "manifests" / "test_crop_manifest.csv")
# Real rows (crops 557 at 1.74 x 2 x 2 nm, 562 at 8 nm, 981 at 16 nm), with shapes shrunk to a few thousand
# voxels so that every array is written in milliseconds; everything else is copied from the manifest.
SMALL_ROWS = """crop_name,dataset,class_label,voxel_size,translation,shape
557,jrc_ctl-id8-1,nuc,[1.74;2.0;2.0],[23837.13;7599.0;35999.0],[12;20;18]
557,jrc_ctl-id8-1,er_mem,[1.74;2.0;2.0],[23837.13;7599.0;35999.0],[12;20;18]
562,jrc_zf-cardiac-1,mito,[8.0;8.0;8.0],[121600.0;105200.0;23200.0],[10;10;70]
562,jrc_zf-cardiac-1,ecs,[8.0;8.0;8.0],[121600.0;105200.0;23200.0],[10;10;70]
981,jrc_fly-vnc-1,mito,[16.0;16.0;16.0],[3206.0;1926.0;19206.0],[8;8;20]
"""


@pytest.fixture
def rows(tmp_path) -> list[S.ManifestRow]:
    csv = tmp_path / "small_manifest.csv"
    csv.write_text(SMALL_ROWS)
    return S.read_test_manifest(csv)


def label_data(row: S.ManifestRow, seed: int) -> np.ndarray:
    """Ids for an instance label, 0/1 for a semantic one, in the row's shape."""
    rng = np.random.default_rng(seed)
    if row.label in ("nuc", "mito"):
        return rng.integers(0, 300, row.shape).astype(np.uint32)   # ids beyond 255
    return (rng.random(row.shape) < 0.3).astype(np.uint8)


@pytest.fixture
def written(tmp_path, rows) -> Path:
    """A complete submission of `rows`, the semantic ones given as bool."""
    path = tmp_path / "submission.zarr"
    writer = S.SubmissionWriter(path)
    for seed, row in enumerate(rows):
        data = label_data(row, seed)
        writer.add(row.crop_id, row.label, data if row.label in ("nuc", "mito") else data.astype(bool),
                   row.voxel_size, row.translation)
    return path


def test_the_real_test_manifest_parses_into_typed_rows():
    if not REAL_MANIFEST.exists():
        pytest.skip(f"{REAL_MANIFEST} is not on this machine")
    rows = S.read_test_manifest(REAL_MANIFEST)
    assert len(rows) == 413 and len({r.crop_id for r in rows}) == 16
    assert rows[0] == S.ManifestRow(557, "jrc_ctl-id8-1", "perox_mem", (1.74, 2.0, 2.0), (23837.13, 7599.0, 35999.0),
                                    (600, 600, 600))
    assert rows[0].crop_name == "crop557"
    assert all(isinstance(v, int) for r in rows for v in r.shape)


def test_round_trip_writer_check_zip(tmp_path, rows, written):
    assert S.check_submission(written, rows) == []
    node = zarr.open(str(written / "crop562" / "mito"), mode="r")
    assert isinstance(node, zarr.Array) and node.dtype == np.uint32 and node.chunks == (64, 64, 64)
    assert dict(node.attrs) == {"voxel_size": [8.0, 8.0, 8.0], "translation": [121600.0, 105200.0, 23200.0],
                                "shape": [10, 10, 70]}
    assert zarr.open(str(written / "crop557" / "er_mem"), mode="r").dtype == np.uint8

    archive = S.zip_submission(written)
    assert archive == tmp_path / "submission.zip"
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
        infos = opened.infolist()
        # The official unzip step extracts into <zip stem>.zarr and reads that folder as the zarr root.
        unzipped = tmp_path / "server" / "submission.zarr"
        opened.extractall(unzipped)
    assert ".zgroup" in names and "crop557/.zgroup" in names and "crop557/nuc/.zarray" in names
    assert "crop981/mito/.zattrs" in names
    # No absolute or escaping member, no directory entry, and no nested *.zarr folder (which the evaluator
    # would move up to the root).
    assert not any(n.startswith("/") or ".." in n.split("/") or n.endswith("/") or
                   any(part.endswith(".zarr") for part in n.split("/")) for n in names)
    assert not any((info.external_attr >> 16) & 0o170000 == 0o120000 for info in infos)   # no symlinks
    assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in infos)
    assert S.check_submission(unzipped, rows) == []
    for seed, row in enumerate(rows):
        np.testing.assert_array_equal(zarr.open(str(unzipped / row.crop_name / row.label), mode="r")[:],
                                      label_data(row, seed))


def test_create_fills_a_large_label_slab_by_slab(tmp_path, rows):
    row = rows[0]                                                   # nuc of crop 557
    writer = S.SubmissionWriter(tmp_path / "submission.zarr")
    array = writer.create("crop557", row.label, row.shape, np.uint64, row.voxel_size, row.translation)
    for z in range(row.shape[0]):
        array[z] = z
    stored = zarr.open(str(tmp_path / "submission.zarr" / "crop557" / "nuc"), mode="r")
    assert stored[:, 0, 0].tolist() == list(range(row.shape[0])) and stored.dtype == np.uint64
    assert S.check_submission(tmp_path / "submission.zarr", [row]) == []


def replace_by_group(path: Path) -> None:
    shutil.rmtree(path / "crop562" / "ecs")
    zarr.open_group(str(path / "crop562")).create_group("ecs")


def rewrite_as_float(path: Path) -> None:
    node = zarr.open_group(str(path / "crop557")).zeros("er_mem", shape=(12, 20, 18), dtype="f4", overwrite=True)
    node.attrs.update({"voxel_size": [1.74, 2, 2], "translation": [23837.13, 7599.0, 35999.0], "shape": [12, 20, 18]})


def set_attribute(key, value):
    return lambda path: zarr.open(str(path / "crop981" / "mito")).attrs.update({key: value})


def delete_translation(path: Path) -> None:
    del zarr.open(str(path / "crop981" / "mito")).attrs["translation"]


def shrink(path: Path) -> None:
    node = zarr.open(str(path / "crop562" / "mito"))
    node.resize(10, 10, 69)
    node.attrs["shape"] = [10, 10, 69]


@pytest.mark.parametrize("damage, expected", [
    (replace_by_group, "crop562/ecs: a group, not an array"),
    (rewrite_as_float, "crop557/er_mem: dtype float32"),
    (set_attribute("voxel_size", [8.0, 8.0, 8.0]), "crop981/mito: voxel_size [8.0, 8.0, 8.0] != manifest [16.0,"),
    (set_attribute("translation", [3206.0, 1926.0, 19214.0]), "crop981/mito: translation [3206.0, 1926.0, 19214.0]"),
    (delete_translation, "crop981/mito: attribute translation missing"),
    (set_attribute("shape", [8, 8, 21]), "crop981/mito: attribute shape [8, 8, 21] != array shape [8, 8, 20]"),
    (shrink, "crop562/mito: shape [10, 10, 69] != manifest [10, 10, 70]"),
    (lambda path: shutil.rmtree(path / "crop557" / "nuc"), "crop557/nuc: missing: scores 0"),
    (lambda path: shutil.rmtree(path / "crop981"), "crop981: missing: its 1 labels score 0"),
    (lambda path: zarr.open_group(str(path / "crop557")).zeros("mito", shape=(1, 1, 1), dtype="u1"),
     "crop557/mito: not a test label of crop557"),
    (lambda path: zarr.open_group(str(path)).create_group("crop1"), "crop1: not a test crop"),
])
def test_each_layout_problem_is_reported_once(written, rows, damage, expected):
    damage(written)
    problems = S.check_submission(written, rows)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_writer_refuses_what_the_evaluator_would_misread(tmp_path, rows):
    writer = S.SubmissionWriter(tmp_path / "submission.zarr")
    row = rows[1]                                                   # er_mem, semantic
    with pytest.raises(ValueError, match="er_mem: dtype float32 for a semantic label"):
        writer.add(row.crop_id, row.label, np.full(row.shape, 0.7, np.float32), row.voxel_size, row.translation)
    with pytest.raises(ValueError, match="values outside 0/1"):
        writer.add(row.crop_id, row.label, np.full(row.shape, 2, np.uint8), row.voxel_size, row.translation,
                   overwrite=True)
    writer.add(row.crop_id, row.label, np.ones(row.shape, np.uint8), row.voxel_size, row.translation, overwrite=True)
    with pytest.raises(ValueError, match="already written"):
        writer.add(row.crop_id, row.label, np.ones(row.shape, np.uint8), row.voxel_size, row.translation)
    with pytest.raises(ValueError, match="non-negative ids"):
        writer.add(row.crop_id, "nuc", -np.ones(row.shape, np.int32), row.voxel_size, row.translation)
    assert writer.add(row.crop_id, "nuc", np.ones(row.shape, np.int16), row.voxel_size, row.translation,
                      overwrite=True).dtype == np.uint16
    with pytest.raises(ValueError, match="ends with .zarr"):
        S.SubmissionWriter(tmp_path / "submission")


@pytest.mark.parametrize("text, words", [
    ("crop,dataset\n", "header"),
    (S.MANIFEST_HEADER + "\n557,ds,nuc,[1;2],[0;0;0],[1;1;1]\n", r"bad\.csv:2: '\[1;2\]' has 2 entries"),
    (S.MANIFEST_HEADER + "\n557,ds,nuc,1;2;3,[0;0;0],[1;1;1]\n", "is not a vector"),
    (S.MANIFEST_HEADER + "\nx557,ds,nuc,[1;2;3],[0;0;0],[1;1;1]\n", "not a crop number"),
])
def test_malformed_manifests_name_the_line(tmp_path, text, words):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=words):
        S.read_test_manifest(csv)


def test_zip_refuses_a_folder_that_is_not_a_submission(tmp_path):
    os.makedirs(tmp_path / "other.zarr")
    with pytest.raises(ValueError, match="no .zgroup"):
        S.zip_submission(tmp_path / "other.zarr")
