"""loaders.py: the validation loader has its own batch and tile size and a bounded, fixed subset of tiles."""
from __future__ import annotations

import math

import config_shenron as C
from loaders import validation_loader
from sampling import PatchSpec


def run_config(root, **options):
    return C.config_from_options("cpu", root, **options)


def test_shrinking_training_does_not_multiply_validation_batches(cache, synthetic_root):
    """`--batch-size 2 --patch-yx 64` used to make validation 64 x 64 tiles in batches of 2 (576 batches); the
    validation tiles and batches keep their own defaults (the profile's) and the budget bounds their number."""
    cfg = run_config(synthetic_root, batch_size=2, patch_yx=64)
    profile = C.PROFILES[cfg.profile]
    assert (cfg.val_batch_size, cfg.val_patch_yx) == (profile.batch_size[cfg.model], profile.patch_yx)
    loader = validation_loader(cfg, cache, PatchSpec(cfg.patch_shape, 2))
    tiles = loader.dataset
    assert loader.batch_size == cfg.val_batch_size and tiles.spec.raw_shape[1:] == (cfg.val_patch_yx,) * 2
    budget = math.ceil(cfg.val_budget * cfg.iterations * cfg.batch_size)
    assert len(tiles) == min(budget, tiles.total) < tiles.total
    assert len(loader) == math.ceil(len(tiles) / cfg.val_batch_size)


def test_the_validation_subset_is_the_same_every_time_and_all_tiles_with_budget_zero(cache, synthetic_root):
    cfg = run_config(synthetic_root, val_budget=0.5)
    spec = PatchSpec(cfg.patch_shape, 2)
    first, again = (list(validation_loader(cfg, cache, spec).dataset.all_tiles) for _ in range(2))
    assert first == again
    every = validation_loader(run_config(synthetic_root, val_budget=0), cache, spec).dataset
    assert len(every) == every.total
