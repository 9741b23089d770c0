"""Tests of the mock of the real download (make_mock_download.py, with mock_plan, mock_world, mock_bodies,
fetch_rule and crop_manifest): real manifest rows in the download's layout, raw chunks exactly where
`csc fetch-data` copies them (checked against a computation written here from the official rule), labels of
the real kinds, and raw and labels that agree."""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr

import config_shenron as C
import make_mock_download as M
from crop_manifest import INSTANCE_CLASSES, TRAIN_CROP_MANIFEST

OURS_EXTRA = {"mito", "cell"}
CLASS_TABLE = Path(TRAIN_CROP_MANIFEST).with_name("classes.csv")


@pytest.fixture(scope="session")
def suite(mock_suite):
    """The suite preset, generated once (conftest): (data root, MockInfo)."""
    return mock_suite


@pytest.fixture(scope="session")
def padded(tmp_path_factory):
    """Crop 9 with --raw-padding 3 and only its nuc array, twice (for determinism)."""
    roots = [tmp_path_factory.mktemp(f"mock_padded_{i}") for i in range(2)]
    return [(r, M.build_mock(r, [9], raw_padding=3, label_classes=("nuc",), seed=0, progress=False)) for r in roots]


def manifest_rows() -> dict[int, dict]:
    """The manifest read here with the csv module alone: crop id -> dataset, geometry, classes."""
    rows: dict[int, dict] = {}
    with open(TRAIN_CROP_MANIFEST, newline="") as f:
        for r in csv.DictReader(f):
            vector = [float(v) for v in r["voxel_size"].strip("[]").split(";")]
            crop = rows.setdefault(int(r["crop_name"]), {
                "dataset": r["dataset"], "voxel": vector, "classes": [],
                "translation": [float(v) for v in r["translation"].strip("[]").split(";")],
                "shape": [int(v) for v in r["shape"].strip("[]").split(";")]})
            crop["classes"].append(r["class_label"])
    return rows


def class_ids() -> dict[str, int]:
    with open(CLASS_TABLE, newline="") as f:
        return {name: int(class_id) for name, class_id, _ in csv.reader(f)}


def levels_of(group: Path) -> list[dict]:
    """Levels of an OME-NGFF group as written: path, scale, translation, shape, chunks."""
    multiscales = json.loads((group / ".zattrs").read_text())["multiscales"][0]
    assert [a["name"] for a in multiscales["axes"]] == ["z", "y", "x"]
    levels = []
    for ds in multiscales["datasets"]:
        transforms = {t["type"]: t[t["type"]] for t in ds["coordinateTransformations"]}
        meta = json.loads((group / ds["path"] / ".zarray").read_text())
        levels.append({"path": ds["path"], "scale": transforms["scale"], "translation": transforms["translation"],
                       "shape": meta["shape"], "chunks": meta["chunks"]})
    return levels


def chunk_files(array_dir: Path) -> set[tuple[int, int, int]]:
    """Chunk indices of the chunk files of an array written with "/" keys."""
    return {tuple(int(p) for p in f.relative_to(array_dir).parts) for f in array_dir.rglob("*")
            if f.is_file() and not f.name.startswith(".")}


def expected_chunks(level: dict, crop: dict, padding: int, all_resolutions: bool) -> set:
    """The chunks csc fetch-data copies from one raw level for one crop (cli/fetch_data.py at 6b9ad68):
    levels finer than 0.8 x the labels' voxel are skipped; the slice runs from the level voxel nearest the
    crop's first voxel centre to the one nearest its last (exclusive; ties to the higher index), padded."""
    ratios = [round(s, 4) / round(v, 4) for s, v in zip(level["scale"], crop["voxel"])]
    if not all(r > (0 if all_resolutions else 0.8) for r in ratios) or min(level["shape"]) <= 1:
        return set()
    ranges = []
    for a in range(3):
        centres = np.arange(level["shape"][a]) * level["scale"][a] + level["translation"][a]
        ends = []
        for value in (crop["translation"][a], crop["translation"][a] + (crop["shape"][a] - 1) * crop["voxel"][a]):
            distance = np.abs(centres - value)
            ends.append(int(np.nonzero(distance == distance.min())[0].max()))
        start, stop = max(ends[0] - padding, 0), min(ends[1] + padding, level["shape"][a])
        if stop <= start:
            return set()
        ranges.append(range(start // level["chunks"][a], math.ceil(stop / level["chunks"][a])))
    return {(i, j, k) for i in ranges[0] for j in ranges[1] for k in ranges[2]}


def raw_group(root: Path, dataset: str) -> Path:
    return root / dataset / f"{dataset}.zarr" / "recon-1" / "em" / "fibsem-uint8"


def crop_group(root: Path, dataset: str, crop_id: int) -> Path:
    return root / dataset / f"{dataset}.zarr" / "recon-1" / "labels" / "groundtruth" / f"crop{crop_id}"


def check_raw_chunks(root: Path, crop_ids, padding: int, all_resolutions: bool) -> None:
    rows = manifest_rows()
    for dataset in {rows[c]["dataset"] for c in crop_ids}:
        group = raw_group(root, dataset)
        for level in levels_of(group):
            wanted = set().union(*(expected_chunks(level, rows[c], padding, all_resolutions)
                                   for c in crop_ids if rows[c]["dataset"] == dataset))
            assert chunk_files(group / level["path"]) == wanted, (dataset, level["path"])


def test_every_crop_has_its_manifest_rows_geometry_and_classes(suite):
    root, info = suite
    rows = manifest_rows()
    assert {c.row.crop_id for c in info.crops} == set(M.PRESETS["suite"])
    assert len({rows[c]["dataset"] for c in M.PRESETS["suite"]}) >= 2
    kinds = {tuple(rows[c]["voxel"]) for c in M.PRESETS["suite"]}
    assert {(4.0,) * 3, (8.0,) * 3, (32.0,) * 3, (2.62, 2.0, 2.0)} <= kinds
    for crop_id in M.PRESETS["suite"]:
        row = rows[crop_id]
        group = crop_group(root, row["dataset"], crop_id)
        written = {p.name for p in group.iterdir() if p.is_dir()}
        wanted = {c for c in row["classes"] if c in set(C.ALL_CLASSES) | OURS_EXTRA} | {"all"}
        assert written == wanted, crop_id
        for name in written:
            s0 = levels_of(group / name)[0]
            assert s0["scale"] == row["voxel"] and s0["translation"] == row["translation"], (crop_id, name)
            assert s0["shape"] == row["shape"], (crop_id, name)


def test_label_pyramids_follow_the_voxel_centre_convention(suite):
    root, info = suite
    rows = manifest_rows()
    for crop_id in M.PRESETS["suite"]:
        row = rows[crop_id]
        levels = levels_of(crop_group(root, row["dataset"], crop_id) / "nuc")
        assert [lv["path"] for lv in levels] == ["s0", "s1", "s2"]
        for k, level in enumerate(levels):
            assert np.allclose(level["scale"], np.array(row["voxel"]) * 2 ** k)
            shift = (2 ** k - 1) / 2 * np.array(row["voxel"])
            assert np.allclose(level["translation"], np.array(row["translation"]) + shift)
            assert level["shape"] == [n // 2 ** k for n in row["shape"]]


def test_label_values_are_of_the_real_kinds(suite):
    root, info = suite
    rows, ids = manifest_rows(), class_ids()
    widths = set()
    for crop_id in M.PRESETS["suite"]:
        row = rows[crop_id]
        group = zarr.open_group(str(crop_group(root, row["dataset"], crop_id)), mode="r")
        for name in group.group_keys():
            values = group[name]["s0"][:]
            if name in INSTANCE_CLASSES:
                assert np.issubdtype(values.dtype, np.unsignedinteger), (crop_id, name)
                widths.add(values.dtype.itemsize)
                assert int(values[values > 0].min(initial=np.iinfo(values.dtype).max)) > 255, (crop_id, name)
            elif name == "all":   # the finest annotated class id: an atomic one, or a composite of the crop
                assert values.dtype == np.uint8
                assert set(np.unique(values).tolist()) - {0} <= {ids[c] for c in row["classes"]}, crop_id
            else:
                assert values.dtype == np.uint8 and set(np.unique(values).tolist()) <= {0, 1}, (crop_id, name)
    assert len(widths) >= 2
    nuc = zarr.open_array(str(crop_group(root, "jrc_mus-liver", 137) / "nuc" / "s0"), mode="r")[:]
    assert (nuc > 0).mean() > 0.05                # the composite nuc is its own, non-empty array


def test_all_zero_label_chunks_are_not_written(suite):
    root, _ = suite
    ecs = crop_group(root, "jrc_mus-liver", 137) / "ecs" / "s0"
    values = zarr.open_array(str(ecs), mode="r")[:]
    assert values.max() == 0 and chunk_files(ecs) == set()


def test_raw_pyramid_metadata_and_extent(suite):
    root, info = suite
    rows = manifest_rows()
    natives = {"jrc_hela-2": [5.24, 4.0, 4.0], "jrc_mus-liver": [8.0] * 3, "jrc_mus-liver-zon-1": [8.0] * 3}
    for dataset, native in natives.items():
        levels = levels_of(raw_group(root, dataset))
        s0 = np.array(levels[0]["scale"])
        assert np.allclose(s0, native)
        for k, level in enumerate(levels):
            assert level["path"] == f"s{k}" and np.allclose(level["scale"], s0 * 2 ** k)
            assert np.allclose(level["translation"], np.array(levels[0]["translation"]) + (2 ** k - 1) / 2 * s0)
        assert min(levels[-1]["scale"]) >= 64 > min(levels[-2]["scale"])
        for crop_id in (c for c in M.PRESETS["suite"] if rows[c]["dataset"] == dataset):
            row = rows[crop_id]
            for level in levels:
                lo = np.array(level["translation"]) - np.array(level["scale"]) / 2
                hi = lo + np.array(level["shape"]) * np.array(level["scale"])
                crop_lo = np.array(row["translation"]) - np.array(row["voxel"]) / 2
                assert np.all(lo <= crop_lo) and np.all(crop_lo + np.array(row["shape"]) * row["voxel"] <= hi)


def test_raw_chunks_exist_exactly_where_fetch_data_copies_them(suite):
    root, info = suite
    check_raw_chunks(root, M.PRESETS["suite"], padding=0, all_resolutions=False)
    # the 32 nm crop gets no raw at 8 or 16 nm at all, and reading there gives the fill value
    s0 = raw_group(root, "jrc_mus-liver-zon-1") / "s0"
    assert chunk_files(s0) == set()
    assert (s0 / ".zarray").is_file()
    level = next(lv for lv in info.crop(410).raw_chunks)
    assert level == "s2"
    array = zarr.open_array(str(s0), mode="r")
    assert array[:64, :64, :64].max() == 0


def test_raw_padding_adds_exactly_the_padded_chunks(padded):
    (root, info), _ = padded
    check_raw_chunks(root, [9], padding=3, all_resolutions=False)


def test_all_resolutions_plan_follows_the_rule(tmp_path):
    """Every level near a coarse crop with --fetch-all-em-resolutions (its 8 nm raw alone would be 800^3
    voxels, too many to render here, so the plan is checked against the rule, with the level metadata the
    build writes: the build writes exactly the plan, as the tests above show)."""
    info = M.plan_mock([410, 9], all_em_resolutions=True)
    plain = M.plan_mock([410, 9])
    rows = manifest_rows()
    for crop in info.crops:
        dataset = info.datasets[crop.row.dataset]
        for level in dataset.levels:
            as_written = {"path": level.path, "scale": list(level.grid.scale),
                          "translation": list(level.grid.translation), "shape": list(level.grid.shape),
                          "chunks": list(level.chunks)}
            got = crop.raw_chunks.get(level.path)
            found = set() if got is None else {(i, j, k) for i in range(*got[0]) for j in range(*got[1])
                                               for k in range(*got[2])}
            assert found == expected_chunks(as_written, rows[crop.row.crop_id], 0, True), (crop.row.crop_id, level.path)
    assert set(info.crop(410).raw_chunks) == {"s0", "s1", "s2", "s3"}
    assert set(plain.crop(410).raw_chunks) == {"s2", "s3"}


def test_the_mock_is_deterministic_for_a_seed(padded):
    (first, _), (second, _) = padded

    def digest(root: Path) -> dict:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != M.MOCK_INFO_FILE}

    assert digest(first) == digest(second)
    from mock_world import World

    axis = np.arange(8, dtype=float) * 500.0 + 20000.0
    scenes = [World("jrc_hela-2", seed, []).evaluate(axis, axis, axis) for seed in (0, 1)]
    assert not np.array_equal(scenes[0].atomic, scenes[1].atomic)


def _raw_at_label_voxels(root: Path, dataset: str, label_level: dict, raw_level: dict) -> np.ndarray:
    """Raw grey at the centre of every voxel of a label level (nearest raw voxel)."""
    array = zarr.open_array(str(raw_group(root, dataset) / raw_level["path"]), mode="r")
    index = []
    for a in range(3):
        centres = np.arange(label_level["shape"][a]) * label_level["scale"][a] + label_level["translation"][a]
        index.append(np.rint((centres - raw_level["translation"][a]) / raw_level["scale"][a]).astype(int))
    lo = [int(i.min()) for i in index]
    block = array[lo[0]:index[0].max() + 1, lo[1]:index[1].max() + 1, lo[2]:index[2].max() + 1]
    return block[np.ix_(*(i - l for i, l in zip(index, lo)))]


@pytest.mark.parametrize("dataset, crop_id, label_path, raw_path", [
    ("jrc_mus-liver", 142, "s1", "s0"),          # 4 nm labels (their 8 nm level) on 8 nm raw
    ("jrc_mus-liver-zon-1", 410, "s0", "s2"),    # 32 nm labels on the 32 nm raw level
])
def test_raw_and_labels_agree(suite, dataset, crop_id, label_path, raw_path):
    root, _ = suite
    group = crop_group(root, dataset, crop_id)
    label_level = next(lv for lv in levels_of(group / "nuc") if lv["path"] == label_path)
    raw_level = next(lv for lv in levels_of(raw_group(root, dataset)) if lv["path"] == raw_path)
    assert np.allclose(label_level["scale"], raw_level["scale"])
    nuc = zarr.open_array(str(group / "nuc" / label_path), mode="r")[:] > 0
    raw = _raw_at_label_voxels(root, dataset, label_level, raw_level).astype(float)
    assert 0.05 < nuc.mean() < 0.95
    assert (raw == 0).mean() < 0.001                       # backed by fetched chunks (0 = fill value)
    assert raw[~nuc].mean() - raw[nuc].mean() > 20         # nuclei are darker than cytoplasm


def test_fine_and_coarse_labels_describe_the_same_nucleus(suite):
    root, _ = suite
    group = crop_group(root, "jrc_mus-liver", 142) / "nuc"
    fine, coarse = (zarr.open_array(str(group / p), mode="r")[:] > 0 for p in ("s0", "s2"))
    # s2 voxel centres sit between s0 voxels: compare with the s0 voxel just below each (4 x 4 x 4 blocks)
    below = fine[1::4, 1::4, 1::4][tuple(slice(0, n) for n in coarse.shape)]
    assert (below == coarse).mean() > 0.97


def test_command_line_errors_are_one_line_with_exit_2(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [["--out", str(tmp_path / "a"), "--crops", "99999"], ["--out", str(tmp_path / "a"), "--raw-padding", "-2"],
             ["--out", str(tmp_path / "full")], ["--out", str(tmp_path / "a"), "--preset", "suite", "--crops", "9"],
             ["--out", str(tmp_path / "a"), "--classes", "some"]]
    for argv in cases:
        with pytest.raises(SystemExit) as stop:
            M.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: --"), (argv, err)
    assert not (tmp_path / "a").exists()


def test_the_info_file_lists_what_was_written(suite):
    root, info = suite
    written = json.loads((root / M.MOCK_INFO_FILE).read_text())
    assert [c["row"]["crop_id"] for c in written["crops"]] == list(M.PRESETS["suite"])
    assert written["datasets"]["jrc_hela-2"]["native_voxel"] == [5.24, 4.0, 4.0]
    assert info.bytes_on_disk > 0


def test_native_raw_voxel_sizes_fit_every_crop_of_every_dataset():
    from mock_plan import raw_pyramid

    rows = manifest_rows()
    datasets = sorted({r["dataset"] for r in rows.values()})
    assert len(datasets) == 22
    from crop_manifest import read_train_crops

    crops = read_train_crops()
    plans = {d: raw_pyramid(d, [c for c in crops.values() if c.dataset == d]) for d in datasets}
    assert all(p.native_rule == "lattice" for p in plans.values())
    assert plans["jrc_hela-2"].native_voxel == (5.24, 4.0, 4.0)          # the facts page
    assert plans["jrc_cos7-1a"].native_voxel == (2.0, 2.0, 2.0)          # its s0 .zarray, as described publicly
    assert plans["jrc_mus-liver-zon-1"].native_voxel == (8.0, 8.0, 8.0)
    for crop in crops.values():                  # every crop starts inside its raw volume
        s0 = plans[crop.dataset].levels[0].grid
        assert all(lo >= -v / 2 - 1e-6 for lo, v in zip(crop.box_nm()[0], s0.scale)), crop.crop_id


def test_the_world_is_the_same_however_it_is_cut_into_blocks():
    from crop_manifest import read_train_crops
    from mock_world import World

    crops = read_train_crops()
    world = World("jrc_mus-liver", 0, [c for c in crops.values() if c.dataset == "jrc_mus-liver"])
    axes = [t + np.arange(48) * 8.0 for t in crops[142].translation]
    whole = world.evaluate(*axes)
    parts = [world.evaluate(axes[0][s], axes[1], axes[2]) for s in (slice(0, 19), slice(19, 48))]
    assert np.array_equal(np.concatenate([p.atomic for p in parts]), whole.atomic)
    assert np.array_equal(np.concatenate([p.cell_ids[p.cell] for p in parts]), whole.cell_ids[whole.cell])
    assert np.array_equal(np.concatenate([p.body_ids[p.body] for p in parts]), whole.body_ids[whole.body])


def test_nearest_level_voxel_ties_go_to_the_higher_index():
    from fetch_rule import nearest_index

    coords = np.array([0.0, 2.0, 4.0])
    assert [nearest_index(coords, v) for v in (1.0, 3.0, 2.9, -5.0, 10.0, 4.0)] == [1, 2, 1, 0, 2, 2]
