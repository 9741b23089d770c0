"""sampling.py on freshly generated synthetic CellMap data: batches, the 2.5D context, NaN where unannotated,
one input scaling, augmentation, per-rank sampling, validation tiles."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import TEST_PATCH_YX
from cache import CachedCrop
from sampling import (EpochSampler, PatchSpec, TrainPatches, ValidationTiles, augment, cut_patch, make_loader,
                      tile_starts, to_model_inputs)

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


def test_nan_exactly_where_unannotated_outside_crop_or_raw_missing(cache):
    spec = SPECS["unet_2d"]
    tiles = ValidationTiles(cache, spec, split="train")
    partial = [ci for ci, c in enumerate(tiles.crops) if not c.annotated.all()]
    assert partial, "synthetic data must have a crop with unannotated classes"
    seen_outside = seen_missing = False
    for j, (ci, z, y, x) in enumerate(tiles.tiles):
        crop = tiles.crops[ci]
        _, target = to_model_inputs({k: v[None] for k, v in tiles[j].items()}, "cpu")
        yy, xx = np.meshgrid(np.arange(y, y + P), np.arange(x, x + P), indexing="ij")
        inside = (yy >= 0) & (yy < crop.shape[1]) & (xx >= 0) & (xx < crop.shape[2])
        raw_ok = crop.raw_window((z, y, x), (1, P, P))[1][0]   # the edge of synth_aniso's raw volume is partial
        seen_missing |= bool((inside & ~raw_ok).any())
        for k in range(len(cache.classes)):
            nan = torch.isnan(target[0, k])
            if crop.annotated[k]:
                assert torch.equal(nan, torch.from_numpy(~(inside & raw_ok)))
            else:
                assert nan.all()
        seen_outside |= bool((~inside).any())
        if ci in partial and seen_outside and seen_missing:
            break
    assert seen_outside and seen_missing


def test_same_input_scaling_in_training_and_validation(cache):
    crop = iso_crop(cache, "validate")
    spec = SPECS["unet_25d"]
    val = ValidationTiles(cache, spec, split="validate")
    ci, z, y, x = val.tiles[len(val.tiles) // 2]
    train_raw = cut_patch(val.crops[ci], (z - 2, y, x), spec.raw_shape, spec.label_shape).raw
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
    assert sorted(t for part in parts for t in part) == sorted(full)


@pytest.mark.parametrize("length,tile", [(1, 64), (64, 64), (65, 64), (200, 64), (37, 5)])
def test_tile_starts_cover_once_with_bounded_overhang(length, tile):
    starts = tile_starts(length, tile)
    cover = np.zeros(length + 2 * tile, dtype=int)
    for s in starts:
        cover[s + tile: s + 2 * tile] += 1
    assert (cover[tile: tile + length] == 1).all()
    assert starts[0] > -tile / 2 - 1 and starts[-1] + tile - length <= tile / 2
