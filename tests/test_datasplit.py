"""datasplit.py: CSV errors name the row and the path, writing a datasplit from a root, resolving the data root."""
from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import zarr

from datasplit import read_datasplit, resolve_data_root, write_datasplit
from errors import DataError

# ---------------------------------------------------------------------------------------------- CSV
def _rows(csv_path):
    with open(csv_path, newline="") as f:
        return list(csv.reader(f))


def _write(path, rows, quote=True):
    with open(path, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL if quote else csv.QUOTE_MINIMAL).writerows(rows)
    return path


def test_csv_error_cases_name_row_and_path(synthetic_root, tmp_path):
    rows = _rows(synthetic_root / "datasplit.csv")
    good = rows[0]
    cases = {
        "missing zarr": (2, [good[0], good[1].replace("synth_iso.zarr", "nope.zarr"), good[2], good[3], good[4]], "nope.zarr"),
        "missing crop": (2, [good[0], good[1], good[2], good[3], good[4].replace("crop", "crop9")], "crop9"),
        "missing class": (2, [good[0], good[1], good[2], good[3], good[4][:-1] + ",perox]"], "perox"),
        "bad split": (2, ["training"] + good[1:], "training"),
        "no bracket": (2, good[:4] + [good[4].split("/[")[0]], "/[class"),
    }
    for label, (row_no, bad, culprit) in cases.items():
        path = _write(tmp_path / f"{label.replace(' ', '_')}.csv", [rows[1], bad])
        with pytest.raises(DataError) as info:
            read_datasplit(path)
        msg = str(info.value)
        assert f"row {row_no}" in msg and culprit in msg and str(path) in msg, (label, msg)
        assert "\n" not in msg
    unquoted = tmp_path / "unquoted.csv"
    unquoted.write_text(",".join(good) + "\n")
    with pytest.raises(DataError, match="row 1.*quote"):
        read_datasplit(unquoted)
    with pytest.raises(DataError, match="not found"):
        read_datasplit(tmp_path / "absent.csv")


def test_missing_multiscales_and_wrong_dtype_are_named(synthetic_root, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root / "synth_iso", copy / "synth_iso")
    rows = [r for r in _rows(synthetic_root / "datasplit.csv") if "synth_iso" in r[1]]
    rows = [[r[0], r[1].replace(str(synthetic_root), str(copy)), r[2], r[3].replace(str(synthetic_root), str(copy)), r[4]] for r in rows]
    csv_path = _write(tmp_path / "copy.csv", rows)
    attrs = copy / "synth_iso/synth_iso.zarr/recon-1/em/fibsem-uint8/.zattrs"
    attrs.write_text(json.dumps({"something": 1}))
    with pytest.raises(DataError, match=r"row 1.*\.zattrs.*multiscales"):
        read_datasplit(csv_path)
    shutil.rmtree(copy / "synth_iso/synth_iso.zarr/recon-1/em/fibsem-uint8")
    z = zarr.open_group(str(copy / "synth_iso/synth_iso.zarr/recon-1/em/fibsem-uint8"), mode="w")
    z.create_dataset("s0", shape=(4, 4, 4), dtype="float32")
    z.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                               "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [8, 8, 8]}]}]}]
    with pytest.raises(DataError, match="float32.*uint8"):
        read_datasplit(csv_path)


def test_write_datasplit_scans_root_and_splits_both_sides(synthetic_root, tmp_path):
    out, dropped = write_datasplit(synthetic_root, tmp_path / "split.csv", val_fraction=0.01, seed=5)
    assert dropped == []
    written = read_datasplit(out)
    original = read_datasplit(synthetic_root / "datasplit.csv")
    assert {e.crop_path for e in written} == {e.crop_path for e in original}
    assert {e.crop_path: e.classes for e in written} == {e.crop_path: e.classes for e in original}
    assert sum(e.split == "validate" for e in written) == 1 and sum(e.split == "train" for e in written) >= 1
    again = read_datasplit(write_datasplit(synthetic_root, tmp_path / "again.csv", val_fraction=0.01, seed=5)[0])
    assert [e.split for e in again] == [e.split for e in written]
    quoted_row = re.compile(r'^"[^"]*"(,"[^"]*"){4}$')
    assert all(quoted_row.match(line) for line in (tmp_path / "split.csv").read_text().splitlines())
    fine = read_datasplit(write_datasplit(synthetic_root, tmp_path / "fine.csv", max_scale_nm=6.0)[0])
    assert fine and all(e.name.startswith("synth_aniso") for e in fine)


def test_write_datasplit_keeps_overlapping_crops_on_one_side(tmp_path):
    """Found on the mock of the real download: crop 289 (1000^3 at 32 nm, training) holds validation crop 266,
    so training saw the nucleus validation scored. Overlapping crops of a dataset now share one side."""
    import make_synthetic_data as S

    spec = S.DatasetSpec("nest", (8.0, 8.0, 8.0), (24, 128, 128), (
        (1, "train", (0, 0, 0), (24, 64, 32), ("nuc",), False),        # x 0..31: holds crop 2
        (2, "train", (4, 8, 8), (8, 16, 16), ("nuc",), False),
        (3, "train", (4, 20, 24), (8, 16, 16), ("nuc",), False),        # x 24..39: overlaps crops 1 and 6
        (4, "train", (0, 64, 0), (24, 64, 64), ("nuc",), False),
        (5, "train", (0, 64, 64), (24, 64, 64), ("nuc",), False),       # touches crop 4: no shared voxel
        (6, "train", (0, 0, 36), (24, 64, 28), ("nuc",), False),        # x 36..63: joins crop 1 through crop 3
    ))
    S.write_dataset(tmp_path / "root", spec, seed=0, index=0)
    nested = {"nest/crop1", "nest/crop2", "nest/crop3", "nest/crop6"}
    sides = set()
    for seed in range(12):
        out, lines = write_datasplit(tmp_path / "root", tmp_path / f"s{seed}.csv", val_fraction=0.67, seed=seed)
        split = {e.name: e.split for e in read_datasplit(out)}
        assert len({split[name] for name in nested}) == 1, split
        assert "train" in split.values() and 1 <= list(split.values()).count("validate") <= 4
        sides.add(split["nest/crop1"])
        assert "kept 4 crops that overlap in 1 group(s)" in lines[-1], lines
        assert "nest/crop1, nest/crop2, nest/crop3, nest/crop6" in lines[-1]
    assert sides == {"train", "validate"}, "the group is drawn like any crop"


def test_write_datasplit_filters_classes_and_scales_like_the_official_tool_and_says_what_it_dropped(
        synthetic_root, tmp_path):
    """The official make-datasplit keeps a class array whose voxel size is at most --scale on every axis:
    crop105's nuc (16 nm) goes, its 8-nm classes stay; a class filter keeps only the classes asked for."""
    out, dropped = write_datasplit(synthetic_root, tmp_path / "s.csv", max_scale_nm=8.0, classes=("nuc", "pm"))
    rows = {e.name: e.classes for e in read_datasplit(out)}
    assert rows["synth_iso/crop105"] == ("pm",) and rows["synth_iso/crop101"] == ("nuc", "pm")
    assert rows["synth_aniso/crop202"] == ("nuc",)
    assert dropped[0] == "dropped 1 class arrays coarser than --max-scale 8 nm (e.g. synth_iso/crop105/nuc at 16 x 16 x 16 nm)"
    assert dropped[1].startswith("left out 12 classes that are not requested: ecs, endo_lum")
    out, dropped = write_datasplit(synthetic_root, tmp_path / "t.csv", max_scale_nm=6.0, classes=("nuc", "pm"))
    assert "dropped 5 crops with none of the requested classes left (e.g. synth_iso/crop101)" in dropped
    with pytest.raises(DataError, match="found 0 labelled crop"):
        write_datasplit(synthetic_root, tmp_path / "u.csv", max_scale_nm=2.0)


def test_resolve_data_root_errors_for_explicit_bad_roots(tmp_path, monkeypatch):
    monkeypatch.delenv("CELLMAP_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match="--data-root .*does not exist"):
        resolve_data_root(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="--data-root .*holds no CellMap data"):
        resolve_data_root(str(tmp_path))
    monkeypatch.setenv("CELLMAP_DATA_ROOT", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"\$CELLMAP_DATA_ROOT .*does not exist"):
        resolve_data_root(None)


# ---------------------------------------------------------------------------------------------- split-level rules
def _split_rows(synthetic_root):
    """(a train row, another train row, a validate row) of the synthetic datasplit."""
    rows = _rows(synthetic_root / "datasplit.csv")
    train = [r for r in rows if r[0] == "train"]
    return train[0], train[1], next(r for r in rows if r[0] == "validate")


def test_duplicate_rows_and_a_crop_in_both_splits_are_refused(synthetic_root, tmp_path):
    first, second, val = _split_rows(synthetic_root)
    duplicate = _write(tmp_path / "duplicate.csv", [first, second, val, first])
    with pytest.raises(DataError) as info:
        read_datasplit(duplicate)
    assert re.search(rf"{re.escape(str(duplicate))} rows 1 and 4: .*crop.*twice", str(info.value)), str(info.value)
    leak = _write(tmp_path / "leak.csv", [first, val, ["validate", *first[1:]]])
    with pytest.raises(DataError) as info:
        read_datasplit(leak)
    message = str(info.value)
    assert f"{leak} rows 1 and 3" in message and "train and validate" in message, message


def test_an_empty_class_list_is_refused(synthetic_root, tmp_path):
    first, _, val = _split_rows(synthetic_root)
    empty = [*first[:4], re.sub(r"\[.*\]$", "[]", first[4])]
    path = _write(tmp_path / "empty.csv", [val, empty])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} row 2: .*empty class list"):
        read_datasplit(path)


@pytest.mark.parametrize("missing", ["validate", "train"])
def test_a_split_with_no_row_is_refused(synthetic_root, tmp_path, missing):
    rows = [r for r in _split_rows(synthetic_root) if r[0] != missing]
    path = _write(tmp_path / "one-sided.csv", rows)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: no '{missing}' row"):
        read_datasplit(path)


# ---------------------------------------------------------------------------------------------- how a row is read
def test_relative_paths_are_resolved_against_the_csv_folder(synthetic_root, tmp_path, monkeypatch):
    rows = [[r[0], os.path.relpath(r[1], tmp_path), r[2], os.path.relpath(r[3], tmp_path), r[4]]
            for r in _split_rows(synthetic_root)]
    path = _write(tmp_path / "relative.csv", rows)
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # where the relative paths lead nowhere
    entries = read_datasplit(path)
    assert entries[0].raw_path == str(synthetic_root / "synth_iso/synth_iso.zarr/recon-1/em/fibsem-uint8")
    missing = _write(tmp_path / "missing.csv", [["train", "nowhere.zarr", *rows[0][2:]], *rows[1:]])
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'nowhere.zarr'))}.*relative paths .* "
                                        rf"{re.escape(str(tmp_path))}"):
        read_datasplit(missing)


def test_a_utf8_byte_order_mark_is_ignored(synthetic_root, tmp_path):
    plain = _write(tmp_path / "plain.csv", _split_rows(synthetic_root))
    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_datasplit(with_bom) == read_datasplit(plain)


def test_spaces_after_the_commas_are_accepted(synthetic_root, tmp_path):
    plain = _write(tmp_path / "plain.csv", _split_rows(synthetic_root))
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("\n".join(", ".join(f'"{field}"' for field in row) for row in _rows(plain)) + "\n")
    assert read_datasplit(spaced) == read_datasplit(plain)


def test_write_datasplit_writes_absolute_paths_for_a_relative_root(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(synthetic_root.parent)
    out, _ = write_datasplit(synthetic_root.name, tmp_path / "split.csv")
    assert all(os.path.isabs(r[1]) and os.path.isabs(r[3]) for r in _rows(out))
    assert read_datasplit(out)


# ---------------------------------------------------------------------------------------------- a crop's arrays
def test_the_class_arrays_of_a_crop_must_cover_the_same_box(synthetic_root, tmp_path):
    from ngff import multiscales_attrs

    def add_class(cls, translation_voxels):
        group = zarr.open_group(str(tmp_path / f"labels.zarr/crop7/{cls}"), mode="w")
        group.create_dataset("s0", data=np.zeros((4, 16, 16), np.uint8), chunks=(4, 16, 16))
        group.attrs.update(multiscales_attrs([("s0", (8, 8, 8), np.array(translation_voxels) * 8.0)]))

    add_class("nuc", (0, 0, 0))
    add_class("pm", (0, 6, 0))  # 6 voxels off in y
    first, _, val = _split_rows(synthetic_root)
    path = _write(tmp_path / "shifted.csv", [val, [first[0], first[1], first[2], str(tmp_path / "labels.zarr"),
                                                   "crop7/[nuc,pm]"]])
    with pytest.raises(DataError) as info:
        read_datasplit(path)
    message = str(info.value)
    assert "row 2" in message and "'nuc'" in message and "'pm'" in message and "box" in message, message
