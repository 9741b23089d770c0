"""Tests of make_synthetic_data.py: CellMap layout, determinism, cellmap-data compatibility, the decoys."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import make_synthetic_data as S

REPO = Path(__file__).resolve().parent.parent


def _rows(root: Path) -> list[list[str]]:
    with open(root / "datasplit.csv", newline="") as f:
        return list(csv.reader(f))


def _array_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and any(part.endswith(".zarr") for part in p.parts)}


def test_layout_metadata_and_csv(synthetic_root):
    lines = (synthetic_root / "datasplit.csv").read_text().splitlines()
    assert all(re.match(r'^"[^"]*"(,"[^"]*"){4}$', line) for line in lines)
    rows = _rows(synthetic_root)
    assert {r[0] for r in rows} == {"train", "validate"}
    for ds in ("synth_iso", "synth_aniso"):
        assert sum(r[0] == "validate" and ds in r[1] for r in rows) >= 1
        assert sum(r[0] == "train" and ds in r[1] for r in rows) >= 2
    for split, zarr_dir, raw_sub, _, label_sub in rows:
        raw_group = Path(zarr_dir) / raw_sub
        ms = json.loads((raw_group / ".zattrs").read_text())["multiscales"][0]
        assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
        assert all(a["type"] == "space" and a["unit"] == "nanometer" for a in ms["axes"])
        assert [d["path"] for d in ms["datasets"]] == ["s0", "s1"]
        s0, s1 = (d["coordinateTransformations"] for d in ms["datasets"])
        assert s0[1]["translation"] == [0, 0, 0]
        assert s1[0]["scale"] == [2 * v for v in s0[0]["scale"]]
        assert s1[1]["translation"] == [v / 2 for v in s0[0]["scale"]]  # centre of the first 2x voxel
        assert zarr.open_array(str(raw_group / "s0"), mode="r").dtype == np.uint8
        crop_path, listed = label_sub.rsplit("/[", 1)
        listed = listed.rstrip("]").split(",")
        crop = Path(zarr_dir) / crop_path
        assert sorted(p.name for p in crop.iterdir() if p.is_dir()) == sorted(listed)
        assert listed == [c for c in S.CLASSES if c in listed]
        for cls in listed:
            cms = json.loads((crop / cls / ".zattrs").read_text())["multiscales"][0]
            arr = zarr.open_array(str(crop / cls / "s0"), mode="r")
            assert arr.dtype == np.uint8 and (cms["datasets"][0]["path"] == "s0")
            assert len(cms["datasets"][0]["coordinateTransformations"]) == 2


def test_crop_variety(synthetic_root):
    rows = _rows(synthetic_root)
    listed = [r[4].rsplit("/[", 1)[1].rstrip("]").split(",") for r in rows]
    assert any(len(c) == 14 for c in listed) and any(len(c) < 14 for c in listed)
    shapes = []
    for r in rows:
        crop = Path(r[3]) / r[4].rsplit("/[", 1)[0]
        arr = zarr.open_array(str(crop / "pm" / "s0"), mode="r") if (crop / "pm").is_dir() else None
        if arr is not None:
            shapes.append(arr.shape)
    assert any(s[1] < 256 and s[2] < 256 for s in shapes)
    nuc = zarr.open_array(str(synthetic_root / "synth_iso/synth_iso.zarr/recon-1/labels/groundtruth/crop101/nuc/s0"), "r")
    assert np.asarray(nuc).max() >= 2  # instance ids, not 0/1


def test_deterministic_for_a_seed(synthetic_root, tmp_path):
    again = tmp_path / "again"
    S.generate(again, seed=0)
    assert _array_files(again) == _array_files(synthetic_root)
    other = tmp_path / "other"
    S.generate(other, seed=1)
    a, b = _array_files(other), _array_files(synthetic_root)
    assert a.keys() == b.keys() and a != b


def test_cli_refuses_non_empty_out_and_is_fast_and_small(tmp_path):
    out = tmp_path / "cli"
    t0 = time.time()
    done = subprocess.run([sys.executable, "make_synthetic_data.py", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert time.time() - t0 < 40
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 100 * 2**20
    assert (out / "SYNTHETIC_VERSION").read_text().split()[0] == S.SYNTHETIC_FORMAT_VERSION
    refused = subprocess.run([sys.executable, "make_synthetic_data.py", "--out", str(out)], cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--force" in refused.stderr and "Traceback" not in refused.stderr


def test_cellmap_data_opens_every_crop(synthetic_root):
    from cellmap_data import CellMapDataSplit, CellMapImage

    for r in _rows(synthetic_root):
        crop_path, listed = r[4].rsplit("/[", 1)
        for cls in listed.rstrip("]").split(","):
            image = CellMapImage(path=str(Path(r[3]) / crop_path / cls), target_class=cls,
                                 target_scale=[8.0, 8.0, 8.0], target_voxel_shape=[1, 64, 64])
            centre = {ax: (lo + hi) / 2 for ax, (lo, hi) in image.bounding_box.items()}
            patch = image[centre]
            assert tuple(patch.shape) == (1, 64, 64) and np.isfinite(patch.numpy()).all()
    split = CellMapDataSplit(input_arrays={"input": {"shape": (1, 128, 128), "scale": (8, 8, 8)}},
                             target_arrays={"output": {"shape": (1, 128, 128), "scale": (8, 8, 8)}},
                             classes=list(S.CLASSES), pad=True, csv_path=str(synthetic_root / "datasplit.csv"))
    assert len(split.train_datasets) >= 1 and len(split.validation_datasets) >= 1


@pytest.fixture(scope="module")
def iso():
    spec = S.DATASETS[0]
    assert spec.voxel == (8.0, 8.0, 8.0)
    return spec, *S.synthesize(spec, seed=0, index=0)


def _disc(shape, centre_px, radius_px):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre_px[0]) ** 2 + (xx - centre_px[1]) ** 2 <= radius_px ** 2


def test_decoys_look_like_nucleus_sections_in_one_slice_but_not_across_five(iso):
    spec, geometry, raw = iso
    v = spec.voxel[0]
    comp = geometry.compartments
    compared = 0
    for centre, radius, thickness in geometry.decoys:
        z = int(round(centre[0] / v))  # the painter puts voxel k at k * voxel
        if not (2 <= z < raw.shape[0] - 2) or thickness / v > 3:
            continue
        decoy_in = comp[z] == S.DECOY_IN
        decoy_in &= _disc(comp.shape[1:], centre[1:] / v, radius / v - 4)
        nucleus_in = (comp[z - 2: z + 3] == S.NUC_IN).all(axis=0)  # nucleus interior through all 5 slices
        if decoy_in.sum() < 500 or nucleus_in.sum() < 500:
            continue
        d, n = raw[z][decoy_in].astype(float), raw[z][nucleus_in].astype(float)
        # same grey level and chromatin texture: the means agree within one noise standard deviation
        assert abs(d.mean() - n.mean()) < S.NOISE_SD and abs(d.std() / n.std() - 1) < 0.3
        ring_d = raw[z][comp[z] == S.DECOY_ENV].astype(float)
        ring_n = raw[z][comp[z] == S.NUC_ENV].astype(float)
        # the rings agree within one noise standard deviation (the oblique nuclear envelope is a bit wider)
        assert abs(ring_d.mean() - ring_n.mean()) < S.NOISE_SD
        for dz in (-2, 2):  # two slices away the decoy is gone, the nucleus is not
            assert abs(raw[z + dz][decoy_in].mean() - d.mean()) > 10
            assert abs(raw[z + dz][nucleus_in].mean() - n.mean()) < 5
        compared += 1
    assert compared >= 3


def test_decoys_are_thin_and_not_nucleus(iso):
    spec, geometry, _ = iso
    comp = geometry.compartments
    decoy = np.isin(comp, [S.DECOY_IN, S.DECOY_ENV])
    assert decoy.any() and not geometry.nucleus_ids[decoy].any()
    for centre, radius, thickness in geometry.decoys:
        assert thickness <= S.DECOY_MAX_NM and thickness / spec.voxel[0] <= 3
    # run length along z of decoy voxels never exceeds 3 slices
    runs = np.zeros(comp.shape[1:], dtype=int)
    longest = 0
    for z in range(comp.shape[0]):
        runs = np.where(decoy[z], runs + 1, 0)
        longest = max(longest, int(runs.max()))
    assert 1 <= longest <= 3
    nuclei_depth = [2 * semi[0] / spec.voxel[0] for _, semi in geometry.nuclei]
    assert min(nuclei_depth) > 25


def test_decoy_area_comparable_to_nuclei(iso):
    _, geometry, _ = iso
    comp = geometry.compartments
    decoy = np.isin(comp, [S.DECOY_IN, S.DECOY_ENV]).sum()
    nuclei = np.isin(comp, [S.NUC_IN, S.NUC_ENV]).sum()
    assert 0.15 < decoy / nuclei < 1.5
