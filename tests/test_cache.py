"""cache.py, crop_prep.py and crop_store.py: reads match zarr (area rule for fine crops against an independent
supersampling reference, nearest for coarse classes stored at their own resolution), missing raw chunks are a
mask and never EM, crops without raw at the training scale are skipped with the fix, one cache serves every
class subset and split, parallel and concurrent preparation, integrity checks, disk full and interruption."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

import config_shenron as C
import crop_prep
import crop_store
from cache import UNANNOTATED, CachedCrop, crops_table, data_report, prepare_cache, share_text, split_overlaps
from conftest import REPO, TINY_RUN_OPTIONS
from datasplit import CropEntry
from errors import DataError
from ngff import multiscales_attrs, read_levels
from sampling import PatchSpec, TrainPatches, cut_patch

from test_resample import reference_area


def iso_crop(cache, split=None) -> CachedCrop:
    crops = [c for c in cache.crops if c.name.startswith("synth_iso") and (split is None or c.split == split)]
    return max(crops, key=lambda c: int(c.annotated.sum()) * 10**9 + int(np.prod(c.shape)))


def write_level(group_path: Path, levels, chunks=(8, 8, 8), write_empty=True) -> None:
    """An OME-NGFF group with levels [(data, scale, translation)] as s0, s1, ..."""
    group = zarr.open_group(str(group_path), mode="w")
    for k, (data, _, _) in enumerate(levels):
        group.create_dataset(f"s{k}", data=data, chunks=chunks, write_empty_chunks=write_empty)
    group.attrs.update(multiscales_attrs([(f"s{k}", scale, trans) for k, (_, scale, trans) in enumerate(levels)]))


def entry(root: Path, crop: str, classes, split="train") -> CropEntry:
    zarr_dir = root / "ds" / "ds.zarr"
    return CropEntry(split, str(zarr_dir / "recon-1/em/fibsem-uint8"),
                     str(zarr_dir / f"recon-1/labels/groundtruth/{crop}"), tuple(classes))


# ---------------------------------------------------------------------------------------------- synthetic data
def test_cached_raw_equals_zarr_on_the_8nm_grid(cache, synthetic_root):
    crop = iso_crop(cache)
    raw = zarr.open_array(str(synthetic_root / "synth_iso/synth_iso.zarr/recon-1/em/fibsem-uint8/s0"), mode="r")
    g = np.array(crop.grid_start)
    window, valid = crop.raw_window((0, 0, 0), crop.shape)
    assert valid.all()
    assert np.array_equal(window, raw[g[0]: g[0] + crop.shape[0], g[1]: g[1] + crop.shape[1], g[2]: g[2] + crop.shape[2]])


def test_coarse_class_is_stored_at_its_resolution_and_upsampled_by_nearest(cache, entries):
    e = next(e for e in entries if "nuc" in e.classes and read_levels(Path(e.crop_path) / "nuc")[0].scale == (16.0,) * 3)
    crop = next(c for c in cache.crops if c.name == e.name)
    k = cache.classes.index("nuc")
    info = crop.stored[k]
    coarse = np.asarray(zarr.open_array(str(Path(e.crop_path) / "nuc" / "s0"), mode="r")) > 0
    stored = np.load(crop.directory / info["file"])
    assert info["storage"] == "native" and stored.shape == coarse.shape[:2] + (-(-coarse.shape[2] // 8),)
    lab = crop.labels[k]
    up = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: lab.shape[0], : lab.shape[1], : lab.shape[2]]
    assert np.array_equal(lab, up.astype(np.uint8))


def test_fine_labels_follow_the_area_rule(cache, entries):
    """synth_aniso is 6 x 4 x 4 nm: each 8 nm voxel is foreground where at least half of the fine voxels it
    covers are, and unannotated where less than half of it is covered (at the crop's edge)."""
    e = next(e for e in entries if e.name == "synth_aniso/crop203")
    crop = next(c for c in cache.crops if c.name == e.name)
    for cls in ("mito_mem", "nuc"):
        level = read_levels(Path(e.crop_path) / cls)[0]
        fine = np.asarray(zarr.open_array(level.path, mode="r")) > 0
        start = crop.grid_start
        fraction = reference_area(fine, level.scale, level.translation, start, crop.shape, C.TRAIN_SCALE_NM)
        covered = reference_area(np.ones_like(fine), level.scale, level.translation, start, crop.shape, C.TRAIN_SCALE_NM)
        expected = np.where(covered >= 0.5, fraction >= covered / 2, UNANNOTATED).astype(np.uint8)
        got = crop.labels[cache.classes.index(cls)]
        # the reference's supersampling is exact to 1/400 of a voxel: voxels within that of a tie may differ
        near_tie = (np.abs(fraction - covered / 2) < 5e-3) | (np.abs(covered - 0.5) < 5e-3)
        assert np.array_equal(got[~near_tie], expected[~near_tie]), cls
        assert (got == UNANNOTATED).any() and (got == 1).any()


def test_fine_raw_is_area_averaged(cache, entries):
    e = next(e for e in entries if e.name == "synth_aniso/crop203")
    crop = next(c for c in cache.crops if c.name == e.name)
    level = read_levels(e.raw_path)[0]  # 6 x 4 x 4: finer than 8 nm on every axis
    raw = np.asarray(zarr.open_array(level.path, mode="r")).astype(np.float64)
    window, valid = crop.raw_window((0, 0, 0), crop.shape)
    expected = reference_area(raw, level.scale, level.translation, crop.grid_start, crop.shape, C.TRAIN_SCALE_NM)
    assert valid.mean() > 0.95
    assert np.abs(window[valid].astype(np.float64) - np.rint(expected[valid])).max() <= 1


def test_instance_ids_are_binarised_and_unannotated_code(cache):
    for crop in cache.crops:
        labels = crop.labels
        assert set(np.unique(labels).tolist()) <= {0, 1, UNANNOTATED}
        for k, annotated in enumerate(crop.annotated):
            if not annotated:
                assert (labels[k] == UNANNOTATED).all()


def test_one_cache_serves_every_class_subset_and_split(entries, cache_dir, cache):
    few = [e for e in entries if e.name.startswith("synth_iso")][:2]
    subset = prepare_cache(few, ("nuc", "pm"), C.TRAIN_SCALE_NM, cache_root=cache_dir, progress=False)
    moved = [CropEntry("validate" if e.split == "train" else "train", e.raw_path, e.crop_path, e.classes, e.row)
             for e in reversed(few)]
    other = prepare_cache(moved, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, cache_root=cache_dir, progress=False, build=False)
    full = {c.name: c for c in cache.crops}
    for crop in subset.crops:
        assert crop.directory == full[crop.name].directory  # the same files, not a copy
        ref = full[crop.name].labels
        assert np.array_equal(crop.labels, ref[[cache.classes.index(c) for c in ("nuc", "pm")]])
    assert {c.name: c.split for c in other.crops} == {e.name: e.split for e in moved}


def test_cache_is_rebuilt_when_a_source_changes_or_the_scale_differs(entries, tmp_path):
    few = [e for e in entries if e.name.startswith("synth_iso")][:1]
    first = prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, cache_root=tmp_path, progress=False)
    other = prepare_cache(few, C.QUICK_CLASSES, (16.0, 16.0, 16.0), cache_root=tmp_path, progress=False)
    assert other.crops[0].directory != first.crops[0].directory
    changed = Path(few[0].crop_path) / "nuc" / "s0"
    before = changed.stat()
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a changed source array
    try:
        rebuilt = prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, cache_root=tmp_path, progress=False)
        assert rebuilt.crops[0].directory != first.crops[0].directory
    finally:  # the synthetic set is shared by the session: restore it
        os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_labels_are_stored_only_for_annotated_classes_and_bit_packed(cache):
    crop = next(c for c in cache.crops if c.name == "synth_aniso/crop202")  # 8 of the 14 classes
    files = sorted(p.name for p in crop.directory.glob("label_*.npy"))
    assert files == sorted(f"label_{c}.npy" for c, a in zip(cache.classes, crop.annotated) if a) and len(files) == 8
    info = crop.stored[cache.classes.index("nuc")]
    assert np.load(crop.directory / info["file"]).nbytes <= np.prod(info["box_shape"]) / 8 + np.prod(info["box_shape"][:2])


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


# ---------------------------------------------------------------------------------------------- missing raw
@pytest.fixture
def holey_root(tmp_path) -> Path:
    """One dataset: raw at 8 nm (64^3, chunks of 16^3) with the chunks of one octant and of the top never
    written (as csc fetch-data leaves them), a coarser 32 nm level written everywhere, and three crops:
    crop1 (8 nm, over written and missing raw), crop2 (32 nm labels near raw that exists only at 32 nm),
    crop3 (8 nm, beyond the 8 nm level's extent) and crop4 (8 nm, a third of it over written raw)."""
    rng = np.random.default_rng(0)
    raw_dir = tmp_path / "ds/ds.zarr/recon-1/em/fibsem-uint8"
    raw = (rng.integers(40, 216, size=(64, 64, 64))).astype(np.uint8)
    group = zarr.open_group(str(raw_dir), mode="w")
    s0 = group.create_dataset("s0", shape=raw.shape, chunks=(16, 16, 16), dtype="uint8", write_empty_chunks=False)
    written = np.ones((4, 4, 4), dtype=bool)
    written[:2, :2, :2] = False     # an octant never fetched
    written[3] = False              # nor the top
    for c in np.argwhere(written):
        z, y, x = c * 16
        s0[z:z + 16, y:y + 16, x:x + 16] = raw[z:z + 16, y:y + 16, x:x + 16]
    group.create_dataset("s1", data=raw[::4, ::4, ::4], chunks=(16, 16, 16))  # "32 nm" (the average is irrelevant)
    group.attrs.update(multiscales_attrs([("s0", (8, 8, 8), (0, 0, 0)), ("s1", (32, 32, 32), (12, 12, 12))]))
    gt = tmp_path / "ds/ds.zarr/recon-1/labels/groundtruth"
    labels = (rng.random((48, 48, 48)) > 0.7).astype(np.uint8)
    write_level(gt / "crop1/mito_mem", [(labels, (8, 8, 8), (8, 8, 8))])
    write_level(gt / "crop1/nuc", [(labels[::-1].astype(np.uint32) * 70000, (8, 8, 8), (8, 8, 8))])
    write_level(gt / "crop2/nuc", [(np.ones((4, 4, 4), np.uint8), (32, 32, 32), (12, 12, 12))])
    write_level(gt / "crop3/nuc", [(np.ones((8, 8, 8), np.uint8), (8, 8, 8), (800, 0, 0))])
    # z 40..63, y/x 0..31: raw only at z 40..47 (below the octant's rows 32..47, above the missing top)
    write_level(gt / "crop4/nuc", [(np.ones((24, 32, 32), np.uint8), (8, 8, 8), (320, 0, 0))])
    np.save(tmp_path / "truth_raw.npy", raw)
    np.save(tmp_path / "written.npy", written)
    return tmp_path


# ----------------------------------------------------------------------------- a mock of real manifest rows
@pytest.fixture(scope="module")
def suite_cache(mock_suite, tmp_path_factory):
    from datasplit import datasplit_for, read_datasplit

    root, _ = mock_suite
    cache_root = tmp_path_factory.mktemp("suite_cache")
    entries = read_datasplit(datasplit_for(root, cache_root))
    return entries, prepare_cache(entries, C.ALL_CLASSES, C.TRAIN_SCALE_NM, cache_root=cache_root, progress=False)


def test_mock_of_real_rows_fine_crops_follow_the_area_rule(suite_cache):
    """Crops 137 (8 nm), 142 (4 nm) and 9 (2.62 x 2 x 2 nm; nuc holds instance ids of uint16 to uint64): the
    cached classes equal the area rule of their s0 arrays (ids > 0 as foreground) computed here by
    supersampling (three classes per crop: the reference is slow)."""
    entries, cache = suite_cache
    for crop_id in (137, 142, 9):
        e = next(e for e in entries if e.crop_path.endswith(f"crop{crop_id}"))
        crop = next(c for c in cache.crops if c.name == e.name)
        covered = None
        for cls in ("nuc", "mito_mem", "er_mem"):
            k = cache.classes.index(cls)
            assert crop.annotated[k], (crop_id, cls)
            level = read_levels(Path(e.crop_path) / cls)[0]
            fine = np.asarray(zarr.open_array(level.path, mode="r")) > 0
            fraction = reference_area(fine, level.scale, level.translation, crop.grid_start, crop.shape,
                                      C.TRAIN_SCALE_NM)
            if covered is None:   # every class of a crop shares its geometry
                covered = reference_area(np.ones_like(fine), level.scale, level.translation, crop.grid_start,
                                         crop.shape, C.TRAIN_SCALE_NM)
            expected = np.where(covered >= 0.5, fraction >= covered / 2, UNANNOTATED).astype(np.uint8)
            near_tie = (np.abs(fraction - covered / 2) < 5e-3) | (np.abs(covered - 0.5) < 5e-3)
            got = crop.labels[k]
            assert np.array_equal(got[~near_tie], expected[~near_tie]), (crop_id, cls)
            assert set(np.unique(got)) <= {0, 1, UNANNOTATED}, (crop_id, cls)
        assert (crop.labels[cache.classes.index("nuc")] == 1).any(), crop_id


def test_mock_of_real_rows_coarse_crop_and_missing_raw(suite_cache):
    """Crop 410 (32 nm labels; the default download copies raw only at 32 nm and coarser) is skipped with the
    fix; the others keep raw where chunks were copied and mark the rest missing."""
    entries, cache = suite_cache
    rows = {r["name"].rsplit("/", 1)[1]: r for r in cache.rows}
    assert rows["crop410"]["status"] == "skipped"
    assert "no raw EM at 8 x 8 x 8 nm or finer" in rows["crop410"]["reason"]
    assert "--fetch-all-em-resolutions" in rows["crop410"]["fix"]
    for name in ("crop9", "crop137", "crop142"):
        assert rows[name]["status"] == "used" and 0.5 < rows[name]["raw_coverage"] <= 1.0
        crop = next(c for c in cache.crops if c.name.endswith(name))
        window, valid = crop.raw_window(-np.array(crop_prep.RAW_MARGIN), np.array(crop.shape) + 2 * np.array(
            crop_prep.RAW_MARGIN))
        assert valid.any() and not valid.all() and (window[~valid] == 0).all()


def test_missing_raw_chunks_are_a_mask_not_zeros(holey_root, tmp_path):
    cache = prepare_cache([entry(holey_root, "crop1", ("mito_mem", "nuc"))], ("mito_mem", "nuc"), C.TRAIN_SCALE_NM,
                          cache_root=tmp_path / "cache", progress=False)
    (crop,) = cache.crops
    raw, written = np.load(holey_root / "truth_raw.npy"), np.load(holey_root / "written.npy")
    g = crop.grid_start  # the labels start at 8 nm: grid voxel 1 (voxel j is centred at j x 8 nm), raw voxel 1
    assert g == (1, 1, 1) and crop.shape == (48, 48, 48)
    window, valid = crop.raw_window(tuple(-v for v in g), (64, 64, 64))  # the whole raw volume
    expected_valid = written.repeat(16, 0).repeat(16, 1).repeat(16, 2)
    assert np.array_equal(valid, expected_valid[:, :, :] & _stored(crop, g))
    assert np.array_equal(window[valid], raw[valid]) and (window[~valid] == 0).all()
    assert crop.raw_coverage == pytest.approx(expected_valid[1:49, 1:49, 1:49].mean(), abs=0.02)
    # A patch over the hole: labels under missing raw are masked; the raw there is the valid mean, not 0.
    patch = cut_patch(crop, (0, 0, 0), (1, 32, 32), (1, 32, 32))
    hole = ~expected_valid[1, 1:33, 1:33]
    assert hole.any() and (patch.labels[:, 0][:, hole] == UNANNOTATED).all()
    assert (patch.labels[:, 0][:, ~hole] != UNANNOTATED).all()
    assert patch.missing == pytest.approx(hole.mean()) and len(np.unique(patch.raw[0][hole])) == 1
    assert patch.raw[0][hole][0] == round(float(raw[1, 1:33, 1:33][~hole].mean()))


def _stored(crop, g) -> np.ndarray:
    """The raw volume's voxels inside the region stored around the crop (crop box + margin, where raw exists)."""
    inside = np.zeros((64, 64, 64), dtype=bool)
    lo = np.array(crop.raw["region_start"]) + g
    hi = lo + np.array(crop.raw["region_shape"])
    inside[tuple(slice(max(0, a), min(64, b)) for a, b in zip(lo, hi))] = True
    return inside


def test_the_report_never_rounds_a_small_raw_coverage_to_zero(holey_root, tmp_path):
    """Found on the mock: crop 289 (1000^3 at 32 nm, 8-nm raw only around two small crops inside it) was
    reported as 'raw EM covers 0% of the crop', and the split's voxel count did not say how few had raw."""
    assert [share_text(f) for f in (0.000393216, 0.0042, 0.94, 0.0, 1.0)] == ["0.039%", "0.42%", "94%", "0%", "100%"]
    entries = [entry(holey_root, "crop1", ("mito_mem", "nuc"))]
    cache = prepare_cache(entries, ("mito_mem", "nuc"), C.TRAIN_SCALE_NM, cache_root=tmp_path / "cache", progress=False)
    (crop,) = cache.crops
    lines = data_report(entries, cache)
    with_raw = round(48 ** 3 * crop.raw_coverage)
    assert 0 < with_raw < 48 ** 3
    assert any(f"{48 ** 3:,} voxels at the training scale ({with_raw:,} with raw EM)" in line for line in lines), lines


def test_a_validation_crop_mostly_without_raw_is_skipped_with_the_fix(holey_root, tmp_path):
    """Validation tiles and predicts whole crops: crop 289 of the real download (0.039% raw at 8 nm) would be
    millions of tiles without EM. A validation crop needs raw over at least half of it; as a training crop
    the same crop is used where raw exists."""
    cache = prepare_cache([entry(holey_root, "crop1", ("nuc",)), entry(holey_root, "crop4", ("nuc",), "validate")],
                          ("nuc",), C.TRAIN_SCALE_NM, cache_root=tmp_path / "cache", progress=False)
    row = next(r for r in cache.rows if r["name"] == "ds/crop4")
    assert row["status"] == "skipped" and "a validation crop needs raw EM over most of it; it has 33%" in row["reason"]
    assert "put it in the train split" in row["fix"] and not cache.split("validate")
    trained = prepare_cache([entry(holey_root, "crop4", ("nuc",))], ("nuc",), C.TRAIN_SCALE_NM,
                            cache_root=tmp_path / "cache", progress=False)
    assert [c.name for c in trained.split("train")] == ["ds/crop4"]
    assert trained.crops[0].raw_coverage == pytest.approx(1 / 3, abs=0.02)


def test_labels_a_training_crop_shares_with_a_validation_crop_are_held_out(holey_root, tmp_path):
    """A datasplit of one's own may split nested crops (the official make-datasplit does): training crop4
    (z 40..63, y/x 0..31 on the 8-nm grid) overlaps validation crop1 (1..48 on every axis). No training
    label inside crop1 is shown, and no foreground centre lies there."""
    cache = prepare_cache([entry(holey_root, "crop4", ("nuc",)), entry(holey_root, "crop1", ("nuc",), "validate")],
                          ("nuc",), C.TRAIN_SCALE_NM, cache_root=tmp_path / "cache", progress=False)
    (train,), (validate,) = cache.split("train"), cache.split("validate")
    lo = np.array(validate.grid_start) - np.array(train.grid_start)   # crop1's box in crop4's coordinates
    hi = lo + np.array(validate.shape)
    assert tuple(hi) == (9, 49, 49) and (lo <= 1).all()
    patches = TrainPatches(cache, PatchSpec((1, 16, 16), 2), seed=0, augment=False, max_missing=0.9)
    fg = patches.foreground[0][:, 1:]
    assert not np.all((fg >= lo) & (fg < hi), axis=1).any()
    assert np.all((train.foreground[:, 1:] >= lo) & (train.foreground[:, 1:] < hi), axis=1).any()
    rng, seen = np.random.default_rng(1), 0
    for _ in range(200):
        start = np.array([rng.integers(0, 24), rng.integers(-8, 28), rng.integers(-8, 28)])
        patch, held = patches._cut(0, start)
        z, ys, xs = start[0], np.arange(start[1], start[1] + 16), np.arange(start[2], start[2] + 16)
        inside = (lo[0] <= z < hi[0]) & ((ys >= lo[1]) & (ys < hi[1]))[:, None] & ((xs >= lo[2]) & (xs < hi[2]))[None]
        assert (patch.labels[0, 0][inside] == UNANNOTATED).all()
        assert held == pytest.approx(inside.mean())
        seen += int((patch.labels[0, 0][~inside] != UNANNOTATED).sum())
    assert seen > 0, "labels outside the validation crop are still trained on"
    patches.patch((0, 0))                                              # a draw ends, held out or not


def test_training_patches_respect_the_missing_raw_limit(holey_root, tmp_path):
    cache = prepare_cache([entry(holey_root, "crop1", ("mito_mem", "nuc"))], ("mito_mem", "nuc"), C.TRAIN_SCALE_NM,
                          cache_root=tmp_path / "cache", progress=False)
    spec = PatchSpec((5, 32, 32), 2)
    patches = TrainPatches(cache, spec, seed=0, augment=False, max_missing=0.25)
    crop = cache.crops[0]
    missing = []
    for i in range(200):
        rng = np.random.default_rng([0, 0, 0, i])
        ci, centre = patches._draw(rng)
        missing.append(cut_patch(crop, centre - np.array(spec.raw_shape) // 2, spec.raw_shape, spec.label_shape).missing)
        sample = patches[(0, i)]
        assert sample["raw"].shape == (5, 32, 32)
    assert np.mean(np.array(missing) > 0.25) < 0.2  # the block estimate places most draws; the rest are redrawn
    fallback = patches.centres[0].fallback() - np.array(spec.raw_shape) // 2
    assert cut_patch(crop, fallback, spec.raw_shape, spec.label_shape).missing <= 0.25
    assert patches.sample_shares() == {crop.name: 1.0}


def test_crop_without_raw_at_the_training_scale_is_skipped_with_the_fix(holey_root, tmp_path):
    tracemalloc.start()
    cache = prepare_cache([entry(holey_root, "crop1", ("nuc",)), entry(holey_root, "crop2", ("nuc",)),
                           entry(holey_root, "crop3", ("nuc",), split="validate")], ("nuc",), C.TRAIN_SCALE_NM,
                          cache_root=tmp_path / "cache", progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20
    rows = {r["name"]: r for r in cache.rows}
    assert rows["ds/crop1"]["status"] == "used"
    assert rows["ds/crop2"]["status"] == "skipped" and "no raw EM at 8 x 8 x 8 nm or finer" in rows["ds/crop2"]["reason"]
    assert "only at 32 x 32 x 32 nm" in rows["ds/crop2"]["reason"] and "--fetch-all-em-resolutions" in rows["ds/crop2"]["fix"]
    assert rows["ds/crop3"]["status"] == "skipped" and rows["ds/crop3"]["reason"] == "crop lies outside its raw volume"
    text = "\n".join(data_report([entry(holey_root, c, ("nuc",)) for c in ("crop1", "crop2", "crop3")], cache))
    assert "dropped ds/crop2 (labels at 32 x 32 x 32 nm): no raw EM" in text and "fix: fetch its EM" in text
    table = crops_table(cache, {"ds/crop1": 1.0}, {})
    assert [(r["name"], r["status"], r["sample_share"]) for r in table] == [
        ("ds/crop1", "used", 1.0), ("ds/crop2", "skipped", None), ("ds/crop3", "skipped", None)]
    assert table[0]["label_voxel_size"] == [8.0, 8.0, 8.0] and table[0]["raw_coverage"] < 1


def test_coarse_crop_with_raw_reads_it_on_demand(holey_root, tmp_path, monkeypatch):
    """A crop whose raw region is too large to cache keeps only the chunk presence and reads raw per patch."""
    import crop_prep

    monkeypatch.setattr(crop_prep, "RAW_CACHE_VOXELS", 1000)
    cache = prepare_cache([entry(holey_root, "crop1", ("nuc",))], ("nuc",), C.TRAIN_SCALE_NM,
                          cache_root=tmp_path / "cache", progress=False)
    (crop,) = cache.crops
    assert crop.raw["mode"] == "zarr" and not (crop.directory / "raw.npy").exists()
    raw, written = np.load(holey_root / "truth_raw.npy"), np.load(holey_root / "written.npy")
    window, valid = crop.raw_window((0, 0, 0), crop.shape)
    expected_valid = written.repeat(16, 0).repeat(16, 1).repeat(16, 2)[1:49, 1:49, 1:49]
    assert np.array_equal(valid, expected_valid) and np.array_equal(window[valid], raw[1:49, 1:49, 1:49][valid])


# ---------------------------------------------------------------------------------------------- preparation
def test_parallel_preparation_gives_the_same_cache(entries, tmp_path, cache):
    few = [e for e in entries if e.name in ("synth_iso/crop104", "synth_aniso/crop202", "synth_iso/crop105")]
    parallel = prepare_cache(few, C.ALL_CLASSES, C.TRAIN_SCALE_NM, cache_root=tmp_path, workers=2, progress=False)
    serial = {c.name: c for c in cache.crops}
    for crop in parallel.crops:
        assert np.array_equal(crop.labels, serial[crop.name].labels)
        assert np.array_equal(crop.raw_window((0, 0, 0), crop.shape)[0],
                              serial[crop.name].raw_window((0, 0, 0), crop.shape)[0])


PREPARE = ("import sys; sys.path.insert(0, {repo!r}); import config_shenron as C; from cache import prepare_cache;"
           "from datasplit import read_datasplit; prepare_cache(read_datasplit({csv!r}), C.QUICK_CLASSES, "
           "C.TRAIN_SCALE_NM, cache_root={root!r}, progress=False); print('ok')")


def test_two_processes_preparing_the_same_cache_share_it(synthetic_root, tmp_path):
    code = PREPARE.format(repo=str(REPO), csv=str(synthetic_root / "datasplit.csv"), root=str(tmp_path / "c"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    metas = list((tmp_path / "c").rglob("meta.json"))
    assert len(metas) == 8 and not list((tmp_path / "c").rglob("*.tmp"))


def test_interrupted_preparation_is_one_line_and_resumes(synthetic_root, tmp_path, cli_env):
    """SIGTERM while a training run prepares the cache: one line, exit 130, finished crops kept for the next run."""
    cli_env["CELLMAP_CACHE_DIR"] = str(tmp_path / "c")
    proc = subprocess.Popen([sys.executable, "train_local.py", *TINY_RUN_OPTIONS, "--workers", "1", "--data-root",
                             str(synthetic_root), "--out-dir", str(tmp_path / "runs")], cwd=REPO, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "c").rglob("meta.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert proc.returncode == 130 and len(lines) == 1, err
    assert lines[0].startswith("error: interrupted while preparing the crop cache") and "run again" in lines[0]
    code = PREPARE.format(repo=str(REPO), csv=str(synthetic_root / "datasplit.csv"), root=str(tmp_path / "c"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and len(list((tmp_path / "c").rglob("meta.json"))) == 8
    assert not list((tmp_path / "c").rglob("*.tmp"))


def test_corrupt_cache_files_are_named_with_the_fix(entries, tmp_path):
    few = [e for e in entries if e.name == "synth_iso/crop104"]
    crop = prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, cache_root=tmp_path, progress=False).crops[0]
    raw_file = crop.directory / "raw.npy"
    data = bytearray(raw_file.read_bytes())
    data[len(data) // 2] ^= 0xFF                       # one changed byte
    raw_file.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{raw_file}.*changed since it was written.*delete the cache entry"):
        prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, cache_root=tmp_path, progress=False)
    raw_file.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(DataError, match=f"{raw_file} has .* bytes.*truncated"):
        prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, cache_root=tmp_path, progress=False)


def test_disk_full_while_preparing_is_one_line_and_leaves_no_temporary_file(entries, tmp_path, monkeypatch):
    real_save = np.save

    def full_disk(f, array, *args, **kwargs):
        if getattr(f, "name", "").endswith(".tmp") and "foreground" in f.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(f, array, *args, **kwargs)

    monkeypatch.setattr(crop_store.np, "save", full_disk)
    few = [e for e in entries if e.name == "synth_iso/crop104"]
    with pytest.raises(DataError, match="disk full while writing the crop cache .*foreground.npy.*MB free"):
        prepare_cache(few, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, cache_root=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("meta.json"))


def test_a_training_crop_overlapping_a_validation_crop_is_named():
    """In the mock of the real download, validation crop 266 (400^3 at 4 nm) lies inside training crop 289
    (1000^3 at 32 nm): training saw the raw that validation scored, and nothing said so."""
    def crop(name, split, start, shape):
        return SimpleNamespace(name=name, split=split, grid_start=start, shape=shape)

    crops = [crop("ds/crop289", "train", (0, 0, 0), (4000, 4000, 4000)),
             crop("ds/crop266", "validate", (100, 200, 300), (200, 200, 200)),
             crop("ds/crop270", "train", (3990, 0, 0), (200, 200, 200)),       # outside crop 266
             crop("other/crop9", "train", (100, 200, 300), (200, 200, 200))]   # same box, another dataset
    cache = SimpleNamespace(split=lambda s: [c for c in crops if c.split == s],
                            rows=[{"name": c.name, "split": c.split, "status": "used"} for c in crops])
    ((train, validate, voxels),) = split_overlaps(cache)
    assert (train.name, validate.name, voxels) == ("ds/crop289", "ds/crop266", 200 ** 3)
    rows = {r["name"]: r for r in crops_table(cache, {}, {})}
    assert rows["ds/crop266"]["overlapping_train_crops"] == ["ds/crop289"]
    assert "overlapping_train_crops" not in rows["ds/crop270"]
