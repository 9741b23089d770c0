"""Tests of cellmap_backend.py: batches read through cellmap-data carry the toolkit's semantics (compact format,
UNANNOTATED/NaN, input scaling, 2.5D context centred on the labelled slice, per-rank and per-epoch sampling,
reported crop drops), checked against the zarr arrays read directly; and a training run on this backend."""
from __future__ import annotations

import bisect
import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import cellmap_backend
import config_shenron as C
from cellmap_backend import CellMapTrainLoader
from conftest import TEST_PATCH_YX, TINY_RUN_OPTIONS
from cache import UNANNOTATED, prepare_cache
from ngff import read_levels
from runfiles import load_json
from sampling import EpochSampler, PatchSpec, TrainPatches, make_loader, to_model_inputs

P = TEST_PATCH_YX
SPECS = {"unet_2d": PatchSpec((1, P, P), 2), "unet_25d": PatchSpec((5, P, P), 2), "unet_3d": PatchSpec((16, P, P), 3)}


class CropTaggedDataset(cellmap_backend.CellMapMultiDataset):
    """The concatenated crops; each sample also says which crop it came from (cellmap-data's own "idx" is the
    index inside that crop's dataset)."""

    def __getitem__(self, idx: int) -> dict:
        sample = super().__getitem__(idx)
        sample["crop"] = torch.tensor(bisect.bisect_right(self.cumulative_sizes, idx))
        return sample


class CropTaggedLoader(CellMapTrainLoader):
    """The backend with "crop" (the index into `crop_names`) in every batch, to check samples against zarr."""

    def to_compact(self, batch: dict, rng) -> dict:
        return {**super().to_compact(batch, rng), "crop": batch["crop"]}


@pytest.fixture(autouse=True)
def crop_tags(monkeypatch):
    monkeypatch.setattr(cellmap_backend, "CellMapMultiDataset", CropTaggedDataset)


def backend(root: Path, spec: PatchSpec, classes=C.QUICK_CLASSES, batch_size=4, samples=8, **kw) -> CellMapTrainLoader:
    return CropTaggedLoader(root / "datasplit.csv", classes, spec, C.TRAIN_SCALE_NM, batch_size, 0,
                            samples_per_epoch=samples, **kw)


def epoch_batches(loader: CellMapTrainLoader, epoch: int = 0) -> list[dict]:
    loader.set_epoch(epoch)
    return list(loader)


def read_window(path: str, start, shape, fill: int) -> np.ndarray:
    """Array voxels [start, start+shape) of a zarr array, `fill` outside it."""
    array = zarr.open_array(path, mode="r")
    out = np.full(shape, fill, dtype=np.uint8)
    lo = [max(0, s) for s in start]
    hi = [min(n, s + k) for n, s, k in zip(array.shape, start, shape)]
    if all(h > l for l, h in zip(lo, hi)):
        out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = \
            np.asarray(array[tuple(slice(l, h) for l, h in zip(lo, hi))])
    return out


@pytest.mark.parametrize("model", list(SPECS))
def test_batches_have_the_toolkit_format(synthetic_root, entries, cache_dir, model):
    spec = SPECS[model]
    cache = prepare_cache(entries, C.QUICK_CLASSES, C.TRAIN_SCALE_NM, cache_root=cache_dir, progress=False)
    toolkit = next(iter(make_loader(TrainPatches(cache, spec, seed=0), 4, 0, EpochSampler(4))))
    ours = epoch_batches(backend(synthetic_root, spec, samples=4))[0]
    for key in ("raw", "labels"):
        assert ours[key].shape == toolkit[key].shape and ours[key].dtype == toolkit[key].dtype == torch.uint8
    x, y = to_model_inputs(ours, "cpu")
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5  # scaled once: 0..255 -> 0..1
    assert set(torch.unique(y[~torch.isnan(y)]).tolist()) <= {0.0, 1.0}
    assert torch.equal(torch.isnan(y), ours["labels"] == UNANNOTATED)


def window_start(centre: dict, translation, shape) -> list[int]:
    """First voxel of the `shape` window centred on a world point (8 nm voxels, cellmap-data's corner origin)."""
    return [int(np.floor((centre[a] - t) / 8.0 - n / 2)) for a, t, n in zip("zyx", translation, shape)]


def test_samples_match_zarr_and_25d_context_is_centred_on_the_labelled_slice(synthetic_root):
    """Without augmentation every synth_iso sample (8 nm = the training grid) equals the zarr raw and labels
    in windows centred on its patch centre; the 5 raw slices are the labelled slice and 2 on each side."""
    spec = SPECS["unet_25d"]
    loader = backend(synthetic_root, spec, batch_size=8, samples=24, augment=False)
    loader.set_epoch(0)
    indices = list(loader.sampler)  # the sampler is reseeded by set_epoch: the loader draws the same ones
    samples = [(b, row) for b in epoch_batches(loader) for row in range(len(b["crop"]))]
    raw_level = read_levels(synthetic_root / "synth_iso/synth_iso.zarr/recon-1/em/fibsem-uint8")[0]
    checked = 0
    for index, (batch, row) in zip(indices, samples):
        crop = int(batch["crop"][row])
        name = loader.crop_names[crop]
        if not name.startswith("synth_iso") or name.endswith("crop105"):  # crop105 has nuc at 16 nm only
            continue
        local = index - (loader.dataset.cumulative_sizes[crop - 1] if crop else 0)
        centre = loader.dataset.datasets[crop]._idx_to_center(local)  # cellmap-data's world centre (nm)
        raw_start = window_start(centre, raw_level.translation, spec.raw_shape)
        expected_raw = read_window(raw_level.path, raw_start, spec.raw_shape, fill=0)
        assert np.array_equal(batch["raw"][row].numpy(), expected_raw), name
        crop_dir = synthetic_root / "synth_iso/synth_iso.zarr/recon-1/labels/groundtruth" / name.split("/")[1]
        for j, cls in enumerate(C.QUICK_CLASSES):
            labels = batch["labels"][row, j].numpy()
            if not (crop_dir / cls).is_dir():
                assert (labels == UNANNOTATED).all(), (name, cls)
                continue
            level = read_levels(crop_dir / cls)[0]
            label_start = window_start(centre, level.translation, spec.label_shape)
            # the labelled slice, in the volume's z, is the raw's centre slice (index 2 of 5)
            assert label_start[0] + round(level.translation[0] / 8.0) == raw_start[0] + 2
            expected = read_window(level.path, label_start, spec.label_shape, fill=UNANNOTATED)[0]
            expected = np.where(expected == UNANNOTATED, UNANNOTATED, expected > 0).astype(np.uint8)
            assert np.array_equal(labels, expected), (name, cls)
        checked += 1
    assert checked >= 4


def test_unannotated_classes_are_nan_and_annotated_ones_are_not(synthetic_root):
    classes = ("ecs", "pm", "nuc")  # crop202 annotates nuc but not ecs or pm
    loader = backend(synthetic_root, SPECS["unet_2d"], classes=classes, batch_size=8, samples=32)
    seen = set()
    for batch in epoch_batches(loader):
        _, y = to_model_inputs(batch, "cpu")
        for row, crop in enumerate(batch["crop"].tolist()):
            name = loader.crop_names[crop]
            seen.add(name)
            nan = torch.isnan(y[row]).flatten(1).all(1).tolist()
            # label-bounded centres keep a 64x64 window inside every crop, so annotated means no NaN at all
            assert nan == [name == "synth_aniso/crop202" and c != "nuc" for c in classes], name
            assert not torch.isnan(y[row, classes.index("nuc")]).any()
    assert "synth_aniso/crop202" in seen


def test_augmentation_transforms_raw_and_labels_together(synthetic_root):
    spec = SPECS["unet_25d"]
    plain = epoch_batches(backend(synthetic_root, spec, batch_size=8, augment=False))[0]
    augmented = epoch_batches(backend(synthetic_root, spec, batch_size=8, augment=True))[0]
    changed = 0
    for row in range(8):
        raw, labels = plain["raw"][row], plain["labels"][row][:, None]  # labels as [C, 1, H, W]
        matches = []
        for flip_z, flip_y, flip_x, swap in itertools.product((False, True), repeat=4):
            r, lab = raw, labels
            dims = [d for d, f in ((0, flip_z), (1, flip_y), (2, flip_x)) if f]
            r, lab = r.flip(dims), lab.flip([d + 1 for d in dims])
            if swap:
                r, lab = r.transpose(1, 2), lab.transpose(2, 3)
            if torch.equal(r, augmented["raw"][row]) and torch.equal(lab[:, 0], augmented["labels"][row]):
                matches.append((flip_z, flip_y, flip_x, swap))
        assert matches, f"sample {row}: raw and labels were not transformed together"
        changed += (False, False, False, False) not in matches
    assert changed >= 1


def test_ranks_and_epochs_draw_different_samples(synthetic_root):
    first = lambda rank, epoch: epoch_batches(backend(synthetic_root, SPECS["unet_2d"], rank=rank, seed=3), epoch)[0]
    reference = first(0, 0)
    assert not torch.equal(reference["raw"], first(1, 0)["raw"])
    assert not torch.equal(reference["raw"], first(0, 1)["raw"])
    again = first(0, 0)
    assert torch.equal(reference["raw"], again["raw"]) and torch.equal(reference["labels"], again["labels"])


def test_dropped_crops_are_reported(synthetic_root, capsys):
    loader = backend(synthetic_root, SPECS["unet_2d"], classes=("ecs",))
    assert [name for name, _ in loader.dropped] == ["synth_aniso/crop202"]
    out = capsys.readouterr().out
    assert "5/6 training crops used" in out and "dropped synth_aniso/crop202" in out
    # the 256x256 patch that cellmap-data's own rule drops every synthetic training crop for keeps them here
    assert backend(synthetic_root, PatchSpec((1, 256, 256), 2)).dropped == []


def test_training_run_on_the_cellmap_data_backend(tiny_root, cache_dir, tmp_path, monkeypatch):
    import train_local

    monkeypatch.setattr(train_local, "prepare_cache", functools.partial(prepare_cache, cache_root=cache_dir))
    code = train_local.main([*TINY_RUN_OPTIONS, "--data-root", str(tiny_root), "--out-dir", str(tmp_path), "--run-name",
                             "cm", "--epochs", "1", "--iterations", "4", "--data-backend", "cellmap-data"])
    assert code == 0
    results = load_json(tmp_path / "cm" / "results.json")
    assert results["status"] == "completed" and results["config"]["data_backend"] == "cellmap-data"
    assert len(results["history"]) == 1 and results["best"]["mean_dice"] is not None
