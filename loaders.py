"""A run's data loaders: the training loader of either backend (the cached toolkit path, or cellmap-data
through cellmap_backend.py) and the validation loader over the toolkit's tiles. train_local.py and
bench.py build them here, so a benchmark measures exactly what training runs."""
from __future__ import annotations

from pathlib import Path

from cache import CropCache
from sampling import EpochSampler, PatchSpec, TrainPatches, ValidationTiles, make_loader


def train_loader(cfg, cache: CropCache, spec: PatchSpec, datasplit: Path, rank: int = 0, pin_memory: bool = False):
    """(loader, object with set_epoch) yielding `cfg.iterations` compact batches per epoch for `cfg.data_backend`,
    seeded by (cfg.seed, rank, epoch)."""
    samples = cfg.iterations * cfg.batch_size
    if cfg.data_backend == "toolkit":
        dataset = TrainPatches(cache, spec, seed=cfg.seed, rank=rank, foreground_fraction=cfg.foreground_fraction)
        sampler = EpochSampler(samples)
        return make_loader(dataset, cfg.batch_size, cfg.workers, sampler, pin_memory=pin_memory), sampler
    from cellmap_backend import CellMapTrainLoader  # imports cellmap-data (seconds): only this backend needs it

    loader = CellMapTrainLoader(datasplit, cfg.classes, spec, cfg.scale_nm, cfg.batch_size, cfg.workers,
                                seed=cfg.seed, rank=rank, samples_per_epoch=samples)
    return loader, loader


def validation_loader(cfg, cache: CropCache, spec: PatchSpec, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False):
    """Every validation crop in full, tiled (`ValidationTiles`), this rank's share of the tiles."""
    tiles = ValidationTiles(cache, spec, rank=rank, world_size=world_size)
    return make_loader(tiles, cfg.batch_size, cfg.workers, pin_memory=pin_memory)
