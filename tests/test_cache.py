"""cache.py on freshly generated synthetic CellMap data: reads match zarr, coarse labels resampled, instance
ids binarised, reuse and rebuild, the data report, class frequencies."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

import config_shenron as C
from conftest import TEST_MARGIN, TEST_PATCH_YX
from cache import UNANNOTATED, CachedCrop, data_report, prepare_cache
from ngff import read_levels
from sampling import PatchSpec

P = TEST_PATCH_YX
SPECS = {"unet_2d": PatchSpec((1, P, P), 2), "unet_25d": PatchSpec((5, P, P), 2), "unet_3d": PatchSpec((16, P, P), 3)}


def iso_crop(cache, split=None) -> CachedCrop:
    crops = [c for c in cache.crops if c.name.startswith("synth_iso") and (split is None or c.split == split)]
    return max(crops, key=lambda c: int(c.annotated.sum()) * 10**9 + int(np.prod(c.shape)))


def raw_s0(synthetic_root: Path) -> zarr.Array:
    return zarr.open_array(str(synthetic_root / "synth_iso/synth_iso.zarr/recon-1/em/fibsem-uint8/s0"), mode="r")



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
