"""datasplit.py: CSV errors name the row and the path, writing a datasplit from a root, resolving the data root."""
from __future__ import annotations

import csv
import json
import re

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
    out = write_datasplit(synthetic_root, tmp_path / "split.csv", val_fraction=0.01, seed=5)
    written = read_datasplit(out)
    original = read_datasplit(synthetic_root / "datasplit.csv")
    assert {e.crop_path for e in written} == {e.crop_path for e in original}
    assert {e.crop_path: e.classes for e in written} == {e.crop_path: e.classes for e in original}
    assert sum(e.split == "validate" for e in written) == 1 and sum(e.split == "train" for e in written) >= 1
    again = read_datasplit(write_datasplit(synthetic_root, tmp_path / "again.csv", val_fraction=0.01, seed=5))
    assert [e.split for e in again] == [e.split for e in written]
    quoted_row = re.compile(r'^"[^"]*"(,"[^"]*"){4}$')
    assert all(quoted_row.match(line) for line in (tmp_path / "split.csv").read_text().splitlines())
    fine = read_datasplit(write_datasplit(synthetic_root, tmp_path / "fine.csv", max_scale_nm=6.0))
    assert fine and all(e.name.startswith("synth_aniso") for e in fine)


def test_resolve_data_root_errors_for_explicit_bad_roots(tmp_path, monkeypatch):
    monkeypatch.delenv("CELLMAP_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match="--data-root .*does not exist"):
        resolve_data_root(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="--data-root .*holds no CellMap data"):
        resolve_data_root(str(tmp_path))
    monkeypatch.setenv("CELLMAP_DATA_ROOT", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"\$CELLMAP_DATA_ROOT .*does not exist"):
        resolve_data_root(None)
