"""The reference training data path through the `cellmap-data` package (`--data-backend cellmap-data`).

It exists to check the toolkit's cached path (cache.py, sampling.py) against the reader the CellMap challenge ships and
to measure the speed difference (`bench.py loader`). `CellMapTrainLoader` yields batches in the toolkit's
compact format ({"raw": uint8, "labels": uint8 with UNANNOTATED}), so `sampling.to_model_inputs` and the
training loop are shared with the toolkit path; validation always uses the toolkit's tiles.

Traps of cellmap-data 2026.3.20 (facts page, section 4) and what this module does about them:
- Its `transpose` and `rotate` spatial transforms are wrong for 2D/2.5D patches: no cellmap-data spatial
  transform is used; `sampling.augment` (the toolkit's dihedral flips/transposes and z mirror) is applied to
  each sample after reading. Brightness/contrast augmentations are not part of either path.
- Raw arrives as float 0..255 (its default `ToDtype(scale=True)` is a no-op on floats) with NaN as padding:
  value transforms are switched off and the raw is converted back to uint8 (padding -> 0, as in the
  toolkit's cache), so the same `/ 255` of `to_model_inputs` scales both paths.
- NaN in the target means "unannotated or outside the crop": it becomes UNANNOTATED; labels (instance ids
  for some classes) are binarised with > 0.
- `ClassBalancedSampler` has a fixed seed and no rank: a subclass seeds it from (seed, rank, epoch).
- `CellMapDataSplit` skips crops silently (construction errors are only logged, empty datasets dropped):
  the datasets are built here row by row from the validated datasplit, and every dropped crop is
  reported (`dropped`, and one line on stdout on rank 0).
- With `pad=True` cellmap-data also drops any crop whose centre lies within half a patch of the raw
  volume's edge, because it intersects the crop's centre box with the raw's; on the synthetic set that is
  every training crop at 256x256. Here only the labels bound the patch centres (the raw is padded), which
  is the toolkit's rule too; the rest of cellmap-data's centre rule is kept (a crop larger than the patch:
  centres at least half a patch from its edges; a smaller crop: its centre only).
Known differences that remain by design: cellmap-data picks the scale level nearest the training scale
(it may be coarser, e.g. 12 nm z resampled to 8 nm by repeating slices), reads an OME-NGFF translation as
the corner rather than the centre of voxel 0, starts a read at floor(centre - n/2) source voxels (on a
coarser level this can be one voxel off; at the raw's first z voxel it reads only padding and logs "Fully
out-of-bounds read"), and balances classes by the crops that annotate them, not by foreground voxels.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapMultiDataset, ClassBalancedSampler
from cellmap_data.utils.geometry import box_intersection

from cache import UNANNOTATED
from datasplit import read_datasplit
from errors import DataError
from sampling import PatchSpec, augment


class LabelBoundedDataset(CellMapDataset):
    """A cellmap-data dataset whose patch centres are bounded by the labelled crop only (see the module
    docstring); reading, resampling and padding are cellmap-data's own."""

    @cached_property
    def sampling_box(self) -> dict | None:
        box = None
        for source in self.target_sources.values():
            if source.bounding_box is None:  # an unannotated class (EmptyImage) does not constrain centres
                continue
            box = source.sampling_box if box is None else box_intersection(box, source.sampling_box)
            if box is None:
                return None
        return box


class RankedBalancedSampler(ClassBalancedSampler):
    """cellmap-data's class-balanced sampler, seeded per (seed, rank, epoch) so that DDP ranks draw
    different samples and an epoch is reproducible on resume."""

    def __init__(self, dataset, samples_per_epoch: int, seed: int, rank: int):
        super().__init__(dataset, samples_per_epoch)
        self.seed, self.rank = seed, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.rng = np.random.default_rng([self.seed, self.rank, epoch])


class CellMapTrainLoader:
    """Training batches read by cellmap-data: `set_epoch(epoch)`, then `iter(loader)` yields
    `samples_per_epoch / batch_size` compact batches; `crop_names` lists the crops used, in the order of
    `dataset.datasets`."""

    def __init__(self, csv_path: str | Path, classes: Sequence[str], spec: PatchSpec,
                 scale_nm: Sequence[float], batch_size: int, workers: int, seed: int = 0, rank: int = 0,
                 samples_per_epoch: int = 1000, augment: bool = True):
        self.spec, self.seed, self.rank, self.augment = spec, seed, rank, augment
        self.epoch = 0
        input_arrays = {"input": {"shape": tuple(spec.raw_shape), "scale": tuple(scale_nm)}}
        target_arrays = {"output": {"shape": tuple(spec.label_shape), "scale": tuple(scale_nm)}}
        entries = [e for e in read_datasplit(csv_path) if e.split == "train"]
        datasets, self.crop_names, self.dropped = [], [], []
        for e in entries:
            try:
                dataset = LabelBoundedDataset(
                    raw_path=e.raw_path, target_path=f"{e.crop_path}/[{','.join(e.classes)}]",
                    classes=list(classes), input_arrays=input_arrays, target_arrays=target_arrays, pad=True,
                    raw_value_transforms=None, target_value_transforms=None)
                usable = len(dataset) > 0
            except Exception as err:  # cellmap-data's own errors (e.g. zarr GroupNotFoundError) vary
                self.dropped.append((e.name, f"cellmap-data cannot read it: {type(err).__name__}: {err}"))
                continue
            if not usable:
                self.dropped.append((e.name, "no patch centre (none of the requested classes is annotated in it)"))
                continue
            datasets.append(dataset)
            self.crop_names.append(e.name)
        if rank == 0:
            print(f"cellmap-data backend: {len(datasets)}/{len(entries)} training crops used"
                  + "".join(f"; dropped {name}: {reason}" for name, reason in self.dropped), flush=True)
        if not datasets:
            raise DataError(f"{csv_path}: cellmap-data can use none of the training crops (see above)")
        self.dataset = CellMapMultiDataset(datasets, list(classes), input_arrays, target_arrays)
        self.sampler = RankedBalancedSampler(self.dataset, samples_per_epoch, seed, rank)
        self.loader = CellMapDataLoader(self.dataset, classes=list(classes), batch_size=batch_size,
                                        num_workers=workers, sampler=self.sampler, is_train=True,
                                        persistent_workers=workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # Augmentation draws happen here, in batch order, so they do not depend on the worker count.
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, 1])
        for batch in self.loader:
            yield self.to_compact(batch, rng)

    def to_compact(self, batch: dict, rng: np.random.Generator) -> dict:
        """cellmap-data batch -> compact batch: raw [B,S,H,W] (2D/2.5D) or [B,1,D,H,W] (3D) uint8,
        labels [B,C,(D,)H,W] uint8 with UNANNOTATED where the target is NaN."""
        raw, target = batch["input"], batch["output"]
        if self.spec.dims == 2:  # [B,1,H,W] (1 slice) or [B,1,5,H,W] (5 slices): slices become channels
            raw = raw.reshape(raw.shape[0], self.spec.raw_shape[0], *raw.shape[-2:])
        raw = torch.nan_to_num(raw, nan=0.0).clamp_(0, 255).round_().to(torch.uint8)
        labels = (target > 0).to(torch.uint8)
        labels[torch.isnan(target)] = UNANNOTATED
        if self.augment:
            raw, labels = self._augment(raw.numpy(), labels.numpy(), rng)
        return {"raw": raw, "labels": labels}

    def _augment(self, raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        """The toolkit's `sampling.augment` on each sample: it takes raw [Z,H,W] and labels [C,Z,H,W]."""
        raws, labs = [], []
        for r, lab in zip(raw, labels):
            if self.spec.dims == 2:
                r, lab = augment(r, lab[:, None], rng, flip_z=True)
                lab = lab[:, 0]
            else:
                r, lab = augment(r[0], lab, rng, flip_z=True)
                r = r[None]
            raws.append(r)
            labs.append(lab)
        return torch.from_numpy(np.stack(raws)), torch.from_numpy(np.stack(labs))
