"""Tests of data.py on freshly generated synthetic CellMap data: CSV, cache, patches, validation tiles."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import config_shenron as C
from conftest import TEST_MARGIN, TEST_PATCH_YX
from data import (UNANNOTATED, CachedCrop, DataError, EpochSampler, PatchSpec, TrainPatches, ValidationTiles,
                  augment, cut_patch, data_report, make_loader, prepare_cache, read_datasplit, read_levels,
                  resolve_data_root, tile_starts, to_model_inputs, write_datasplit)

P = TEST_PATCH_YX
SPECS = {"unet_2d": PatchSpec((1, P, P), 2), "unet_25d": PatchSpec((5, P, P), 2), "unet_3d": PatchSpec((16, P, P), 3)}


def iso_crop(cache, split=None) -> CachedCrop:
    crops = [c for c in cache.crops if c.name.startswith("synth_iso") and (split is None or c.split == split)]
    return max(crops, key=lambda c: int(c.annotated.sum()) * 10**9 + int(np.prod(c.shape)))


def raw_s0(synthetic_root: Path) -> zarr.Array:
    return zarr.open_array(str(synthetic_root / "synth_iso/synth_iso.zarr/recon-1/em/fibsem-uint8/s0"), mode="r")


# ---------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("model", list(SPECS))
def test_batch_shapes_and_dtypes(cache, model):
    spec = SPECS[model]
    train = TrainPatches(cache, spec, seed=0)
    batch = next(iter(make_loader(train, 3, 0, EpochSampler(3))))
    x, y = to_model_inputs(batch, "cpu")
    C_ = len(cache.classes)
    if spec.dims == 2:
        assert batch["raw"].shape == (3, spec.raw_shape[0], P, P) and batch["labels"].shape == (3, C_, P, P)
    else:
        assert batch["raw"].shape == (3, 1, 16, P, P) and batch["labels"].shape == (3, C_, 16, P, P)
    assert batch["raw"].dtype == torch.uint8 and batch["labels"].dtype == torch.uint8
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    finite = y[~torch.isnan(y)]
    assert set(finite.unique().tolist()) <= {0.0, 1.0}


def test_25d_channels_are_consecutive_slices_around_target(cache, synthetic_root):
    crop = iso_crop(cache)
    tiles = ValidationTiles(cache, SPECS["unet_25d"], split=crop.split)
    raw = raw_s0(synthetic_root)
    ci = tiles.crops.index(next(c for c in tiles.crops if c.name == crop.name))
    checked = 0
    for j, (tci, z, y, x) in enumerate(tiles.tiles):
        if tci != ci or y < 0 or x < 0 or y + P > crop.shape[1] or x + P > crop.shape[2] or z < 2:
            continue
        gz, gy, gx = np.array(crop.grid_start) + (z, y, x)
        sample = tiles[j]
        expected = raw[gz - 2: gz + 3, gy: gy + P, gx: gx + P]  # isotropic 8 nm: the grid is s0
        assert np.array_equal(sample["raw"].numpy(), expected)
        x_in, _ = to_model_inputs({k: v[None] for k, v in sample.items()}, "cpu")
        assert torch.allclose(x_in[0, 2], torch.from_numpy(expected[2]).float() / 255)  # centre = target
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_nan_exactly_where_unannotated_or_outside_crop(cache):
    spec = SPECS["unet_2d"]
    tiles = ValidationTiles(cache, spec, split="train")
    partial = [ci for ci, c in enumerate(tiles.crops) if not c.annotated.all()]
    assert partial, "synthetic data must have a crop with unannotated classes"
    seen_outside = False
    for j, (ci, z, y, x) in enumerate(tiles.tiles):
        crop = tiles.crops[ci]
        _, target = to_model_inputs({k: v[None] for k, v in tiles[j].items()}, "cpu")
        yy, xx = np.meshgrid(np.arange(y, y + P), np.arange(x, x + P), indexing="ij")
        inside = torch.from_numpy((yy >= 0) & (yy < crop.shape[1]) & (xx >= 0) & (xx < crop.shape[2]))
        for k in range(len(cache.classes)):
            nan = torch.isnan(target[0, k])
            if crop.annotated[k]:
                assert torch.equal(nan, ~inside)
            else:
                assert nan.all()
        seen_outside |= bool((~inside).any())
        if ci in partial and seen_outside:
            break
    assert seen_outside


def test_same_input_scaling_in_training_and_validation(cache):
    crop = iso_crop(cache, "validate")
    spec = SPECS["unet_25d"]
    val = ValidationTiles(cache, spec, split="validate")
    ci, z, y, x = val.tiles[len(val.tiles) // 2]
    train_raw, _ = cut_patch(val.crops[ci], (z - 2, y, x), spec.raw_shape, spec.label_shape)
    x_train, _ = to_model_inputs({"raw": torch.from_numpy(train_raw)[None], "labels": torch.zeros(1, 1, P, P, dtype=torch.uint8)}, "cpu")
    x_val, _ = to_model_inputs({k: v[None] for k, v in val[len(val.tiles) // 2].items()}, "cpu")
    assert torch.equal(x_train, x_val)
    assert crop is not None


@pytest.mark.parametrize("flip_z", [False, True])
def test_augmentation_keeps_input_and_target_aligned(flip_z):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(5, 32, 32), dtype=np.uint8)
    labels = np.stack([(raw > 128).astype(np.uint8), (raw % 7 == 0).astype(np.uint8)])  # a function of raw
    seen = set()
    for seed in range(64):
        r, lab = augment(raw, labels, np.random.default_rng(seed), flip_z=flip_z)
        assert np.array_equal(lab[0], (r > 128).astype(np.uint8))
        assert np.array_equal(lab[1], (r % 7 == 0).astype(np.uint8))
        seen.add(r.tobytes())
    assert len(seen) == (16 if flip_z else 8)  # all 8 dihedral transforms of the y/x plane (x2 with z mirror)


def test_ranks_draw_different_samples_and_epochs_are_reproducible(cache):
    spec = SPECS["unet_2d"]

    def first_batch(rank, epoch):
        sampler = EpochSampler(4)
        sampler.set_epoch(epoch)
        return next(iter(make_loader(TrainPatches(cache, spec, seed=3, rank=rank), 4, 0, sampler)))["raw"]

    assert not torch.equal(first_batch(0, 0), first_batch(1, 0))
    assert not torch.equal(first_batch(0, 0), first_batch(0, 1))
    assert torch.equal(first_batch(1, 2), first_batch(1, 2))


def test_same_samples_with_and_without_workers(cache):
    spec = SPECS["unet_2d"]
    a = next(iter(make_loader(TrainPatches(cache, spec, seed=1), 4, 0, EpochSampler(4))))
    b = next(iter(make_loader(TrainPatches(cache, spec, seed=1), 4, 2, EpochSampler(4))))
    assert torch.equal(a["raw"], b["raw"]) and torch.equal(a["labels"], b["labels"])


def test_class_balanced_sampling_oversamples_rare_classes(cache):
    spec = SPECS["unet_2d"]
    balanced = TrainPatches(cache, spec, seed=0, foreground_fraction=1.0, augment=False)
    uniform = TrainPatches(cache, spec, seed=0, foreground_fraction=0.0, augment=False)
    k = cache.classes.index("mito_ribo")

    def centre_positive_rate(ds):
        hits = 0
        for i in range(200):
            lab = ds[(0, i)]["labels"][k]
            hits += int(lab[P // 2, P // 2] == 1)
        return hits / 200

    assert centre_positive_rate(balanced) > 2 * centre_positive_rate(uniform) + 0.02


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("model", list(SPECS))
def test_validation_covers_every_annotated_voxel_exactly_once(cache, model):
    spec = SPECS[model]
    tiles = ValidationTiles(cache, spec)
    assert len(tiles.crops) >= 2 and {c.name.split("/")[0] for c in tiles.crops} == {"synth_iso", "synth_aniso"}
    for ci, crop in enumerate(tiles.crops):
        cover = np.zeros(crop.shape, dtype=np.int32)
        for tci, z, y, x in tiles.tiles:
            if tci != ci:
                continue
            lz, ly, lx = spec.label_shape
            zs, ys, xs = slice(max(z, 0), z + lz), slice(max(y, 0), y + ly), slice(max(x, 0), x + lx)
            cover[zs, ys, xs] += 1
        assert (cover == 1).all(), f"{crop.name}: coverage {np.unique(cover)}"


def test_validation_tiles_split_across_ranks_without_overlap(cache):
    spec = SPECS["unet_2d"]
    full = ValidationTiles(cache, spec).tiles
    parts = [ValidationTiles(cache, spec, rank=r, world_size=3).tiles for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(full)


@pytest.mark.parametrize("length,tile", [(1, 64), (64, 64), (65, 64), (200, 64), (37, 5)])
def test_tile_starts_cover_once_with_bounded_overhang(length, tile):
    starts = tile_starts(length, tile)
    cover = np.zeros(length + 2 * tile, dtype=int)
    for s in starts:
        cover[s + tile: s + 2 * tile] += 1
    assert (cover[tile: tile + length] == 1).all()
    assert starts[0] > -tile / 2 - 1 and starts[-1] + tile - length <= tile / 2


# ---------------------------------------------------------------------------------------------- cache
def test_cache_reads_match_zarr_and_coarse_labels_are_resampled(cache, synthetic_root, entries):
    crop = iso_crop(cache)
    raw = raw_s0(synthetic_root)
    m = np.array(crop.margin)
    g = np.array(crop.grid_start)
    inner = crop.raw[m[0]: m[0] + crop.shape[0], m[1]: m[1] + crop.shape[1], m[2]: m[2] + crop.shape[2]]
    assert np.array_equal(inner, raw[g[0]: g[0] + crop.shape[0], g[1]: g[1] + crop.shape[1], g[2]: g[2] + crop.shape[2]])
    # A class labelled at 16 nm: each coarse voxel covers 2x2x2 voxels of the 8 nm grid.
    for e in entries:
        nuc = Path(e.crop_path) / "nuc"
        if "nuc" in e.classes and read_levels(nuc)[0].scale == (16.0, 16.0, 16.0):
            cached = next(c for c in cache.crops if c.name == e.name)
            coarse = np.asarray(zarr.open_array(str(nuc / "s0"), mode="r")) > 0
            k = cache.classes.index("nuc")
            lab = np.asarray(cached.labels[k])
            up = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: lab.shape[0], : lab.shape[1], : lab.shape[2]]
            assert np.array_equal(lab, up.astype(np.uint8))
            break
    else:
        pytest.fail("synthetic data should hold a crop with nuc labelled at 16 nm")


def test_instance_ids_are_binarised_and_unannotated_code(cache):
    for crop in cache.crops:
        values = set(np.unique(np.asarray(crop.labels)).tolist())
        assert values <= {0, 1, UNANNOTATED}
        for k, annotated in enumerate(crop.annotated):
            if not annotated:
                assert (np.asarray(crop.labels[k]) == UNANNOTATED).all()


def test_cache_is_reused_and_rebuilt_when_stale(entries, tmp_path):
    few = [e for e in entries if e.name.startswith("synth_iso")][:2]
    first = prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, TEST_MARGIN, cache_root=tmp_path, progress=False)
    again = prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, TEST_MARGIN, cache_root=tmp_path, progress=False)
    assert again.directory == first.directory
    other = prepare_cache(few, C.QUICK_CLASSES, (16.0, 16.0, 16.0), TEST_MARGIN, cache_root=tmp_path, progress=False)
    assert other.directory != first.directory
    changed = Path(few[0].crop_path) / "nuc"
    before = changed.stat()
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a changed source array
    try:
        rebuilt = prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, TEST_MARGIN, cache_root=tmp_path, progress=False)
        assert rebuilt.directory != first.directory
    finally:  # the synthetic set is shared by the session: restore it
        os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_small_crop_is_kept_and_report_names_splits(cache, entries):
    small = [c for c in cache.crops if min(c.shape[1:]) < 256]
    assert small, "the crop smaller than a 256x256 patch must be kept (NaN-padded)"
    text = "\n".join(data_report(entries, cache, (256, 256)))
    assert "train:" in text and "validate:" in text
    for crop in small:  # named, with its size, as smaller than the patch
        assert f"{crop.name} is {crop.shape[1]}x{crop.shape[2]} voxels, smaller than the 256x256 patch" in text
    assert "smaller than" not in "\n".join(data_report(entries, cache, (16, 16)))


def test_frequencies_in_unit_interval(cache):
    freq = cache.class_frequencies("train")
    assert set(freq) == set(cache.classes) and all(0 < f < 1 for f in freq.values())


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
