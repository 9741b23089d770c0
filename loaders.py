"""A run's data loaders: the training loader of either backend (the cached toolkit path, or cellmap-data
through cellmap_backend.py) and the validation loader over the toolkit's tiles. train_local.py and
bench.py build them here, so a benchmark measures exactly what training runs."""
from __future__ import annotations

import math
from pathlib import Path

from cache import CropCache
from sampling import EpochSampler, PatchSpec, TrainPatches, ValidationTiles, make_loader


def train_loader(cfg, cache: CropCache, spec: PatchSpec, datasplit: Path, rank: int = 0, pin_memory: bool = False):
    """(loader, object with set_epoch) yielding `cfg.iterations` compact batches per epoch for `cfg.data_backend`,
    seeded by (cfg.seed, rank, epoch)."""
    samples = cfg.iterations * cfg.batch_size
    if cfg.data_backend == "toolkit":
        dataset = TrainPatches(cache, spec, seed=cfg.seed, rank=rank, foreground_fraction=cfg.foreground_fraction,
                               max_missing=cfg.max_missing_raw)
        sampler = EpochSampler(samples)
        return make_loader(dataset, cfg.batch_size, cfg.workers, sampler, pin_memory=pin_memory), sampler
    from cellmap_backend import CellMapTrainLoader  # imports cellmap-data (seconds): only this backend needs it

    loader = CellMapTrainLoader(datasplit, cfg.classes, spec, cfg.scale_nm, cfg.batch_size, cfg.workers,
                                seed=cfg.seed, rank=rank, samples_per_epoch=samples)
    return loader, loader


def validation_spec(cfg, spec: PatchSpec) -> PatchSpec:
    """Validation tiles: the training patch's z extent with the validation y/x size (`--val-patch-yx`)."""
    return PatchSpec((spec.raw_shape[0], cfg.val_patch_yx, cfg.val_patch_yx), spec.dims)


def validation_loader(cfg, cache: CropCache, spec: PatchSpec, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False):
    """The per-epoch validation: a fixed subset of the validation tiles (`--val-budget` x the epoch's training
    samples, seed 0; all tiles with 0), this rank's share, `--val-batch-size` tiles per batch."""
    budget = math.ceil(cfg.val_budget * cfg.iterations * cfg.batch_size) if cfg.val_budget > 0 else None
    tiles = ValidationTiles(cache, validation_spec(cfg, spec), rank=rank, world_size=world_size, max_tiles=budget)
    return make_loader(tiles, cfg.val_batch_size, cfg.workers, pin_memory=pin_memory)


def validation_description(loader) -> dict:
    """What the per-epoch validation numbers are, for results.json."""
    tiles = loader.dataset
    return {"metric": "8-nm training grid (toolkit metric): Dice/IoU from TP/FP/FN pooled over the annotated voxels "
                      "of the tiles below, all ranks", "tiles": len(tiles.all_tiles), "of_tiles": tiles.total,
            "subset": "every tile of every validation crop" if len(tiles.all_tiles) == tiles.total else
                      "a fixed subset drawn with seed 0, the same every epoch",
            "tile": list(tiles.spec.label_shape), "crops": [c.name for c in tiles.crops]}
