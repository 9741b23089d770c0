"""A mock of the real CellMap download (`csc fetch-data`), built from real manifest rows, to test the data
path on data laid out, and missing, as a new user's would be.

    python make_mock_download.py --out DIR [--preset suite|benchmark] [--crops 289,345,...]
        [--raw-padding N] [--fetch-all-em-resolutions] [--classes all|ours] [--seed 0] [--force] [--dry-run]

    build_mock(out_dir, crops, raw_padding=0, all_em_resolutions=False, label_classes="ours", seed=0) -> MockInfo
    plan_mock(crops, ...) -> MockInfo     (the same, without writing)

Writes, for the chosen training crops (real rows of manifests/train_crop_manifest.csv), exactly the layout
of the real download (zarr v2, "/" chunk keys, OME-NGFF 0.4 multiscales, translations at voxel centres):

    DIR/<ds>/<ds>.zarr/recon-1/em/fibsem-uint8/s0..sK                    raw EM pyramid, uint8
    DIR/<ds>/<ds>.zarr/recon-1/labels/groundtruth/crop<N>/<class>/s0..s2 labels (and `all`)
    DIR/MOCK_DOWNLOAD.json                                               what was written (MockInfo), last

and its quirks:
- the raw pyramid starts at the dataset's native voxel size, derived from the manifest (mock_plan.py),
  and spans every training crop of the dataset; every level's .zarray exists, but chunks exist only where
  `csc fetch-data` copies them (fetch_rule.py: levels > 0.8 x the label voxel size, the crop's extent plus
  --raw-padding voxels; every level near the crop with --fetch-all-em-resolutions). The rest is absent
  and reads as the fill value 0;
- labels: semantic classes 0/1 uint8; instance classes ids of uint16/uint32/uint64 (>= 1000); the
  composite `nuc` as its own array; `all` = the finest annotated class id per voxel; classes beyond the
  toolkit's 14; all classes of a crop at its voxel size; all-zero label chunks not written;
- content: raw and every label array are painted from one deterministic world per dataset
  (mock_world.py), so raw and labels, fine and coarse, describe the same objects.
Work goes block by block (BLOCK^3 voxels), so memory stays bounded whatever the crop's size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Sequence

import numpy as np

from crop_manifest import ALL_IDS_ARRAY, INSTANCE_CLASSES, TRAIN_CROP_MANIFEST, read_class_table, read_train_crops
from mock_plan import INSTANCE_ID_BASE, LABEL_CHUNKS, CropPlan, DatasetPlan, crop_plan, raw_pyramid
from mock_world import BODY_IDS, INSTANCE_ID_SPACES, World, render_raw
from ngff import multiscales_attrs

PRESETS: dict[str, tuple[int, ...]] = {
    # 2.62x2x2 (jrc_hela-2), 4 nm and 8 nm (jrc_mus-liver), 32 nm 200^3 (jrc_mus-liver-zon-1): the smallest
    # real crops of each kind (no 2 nm crop is small: the smallest is 243x400x400)
    "suite": (9, 142, 137, 410),
    # adds crop 289 (1000^3 at 32 nm, nuc only) with 32, 8 and 4 nm (400^3) crops of its dataset, a 2 nm 400^3
    # crop (jrc_cos7-1a), a second anisotropic one, and 4 / 8 nm crops of two more datasets
    "benchmark": (289, 345, 270, 266, 234, 9, 13, 146, 132, 139),
}
BLOCK = 128
MOCK_INFO_FILE = "MOCK_DOWNLOAD.json"
RAW_NOISE_SD = 12.0          # at s0; halved per level, as averaging would


@dataclass
class MockInfo:
    """What a mock holds: per crop its row, arrays and copied raw chunks, per dataset its raw pyramid."""

    out_dir: str
    seed: int
    raw_padding: int
    all_em_resolutions: bool
    label_classes: object
    crops: tuple[CropPlan, ...]
    datasets: dict[str, DatasetPlan]
    raw_chunks: dict[str, dict[str, int]]            # dataset -> level path -> chunk files
    bytes_on_disk: int = 0
    seconds: float = 0.0

    def crop(self, crop_id: int) -> CropPlan:
        return next(c for c in self.crops if c.row.crop_id == crop_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=list)


def _zarr_codecs():
    from numcodecs import Blosc, Zstd, blosc

    blosc.use_threads = False   # multi-threaded Blosc output varies from run to run; a mock must not
    # raw: zstd as the real s0 (level 6 there; the level changes only speed and size), labels: Blosc zstd
    return Zstd(level=1), Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)


def _coords(grid, start, stop) -> tuple[np.ndarray, ...]:
    return tuple(grid.coords(a)[start[a]:stop[a]] for a in range(3))


def _raw_chunk_sets(dataset: DatasetPlan, crops: Sequence[CropPlan]) -> dict[str, set]:
    """Per raw level, the chunk indices copied for any of the crops."""
    chunks: dict[str, set] = {}
    for plan in crops:
        for path, ranges in plan.raw_chunks.items():
            chunks.setdefault(path, set()).update(product(*(range(a, b) for a, b in ranges)))
    return chunks


def _write_raw(root, dataset: DatasetPlan, world: World, chunk_sets: dict[str, set], seed: int, bar) -> None:
    """Every level's metadata, then the copied chunks, rendered block by block."""
    raw_codec, _ = _zarr_codecs()
    em = root.require_group("recon-1/em/fibsem-uint8")
    em.attrs.update(multiscales_attrs([(lv.path, lv.grid.scale, lv.grid.translation) for lv in dataset.levels]))
    for index, level in enumerate(dataset.levels):
        array = em.create_dataset(level.path, shape=level.grid.shape, chunks=level.chunks, dtype="uint8",
                                  compressor=raw_codec, fill_value=0, dimension_separator="/", overwrite=True)
        wanted = chunk_sets.get(level.path, set())
        per_block = tuple(max(1, BLOCK // c) for c in level.chunks)
        blocks = sorted({tuple(i // p for i, p in zip(chunk, per_block)) for chunk in wanted})
        for block in blocks:
            members = [c for c in product(*(range(b * p, (b + 1) * p) for b, p in zip(block, per_block)))
                       if c in wanted]
            start = np.min(members, 0) * level.chunks
            stop = np.minimum((np.max(members, 0) + 1) * level.chunks, level.grid.shape)
            scene = world.evaluate(*_coords(level.grid, start, stop))
            for chunk in members:
                lo = np.asarray(chunk) * level.chunks
                hi = np.minimum(lo + level.chunks, level.grid.shape)
                rng = np.random.default_rng([seed, world.key, 4, index, *chunk])
                local = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
                array[tuple(slice(a, b) for a, b in zip(lo, hi))] = render_raw(
                    scene.atomic[local], rng, RAW_NOISE_SD / 2 ** index)
                bar.update(int(np.prod(hi - lo)))


class _LabelPainter:
    """Turns scenes into the values of each label array of one crop."""

    def __init__(self, plan: CropPlan):
        table = read_class_table()
        by_id = {e.class_id: e for e in table.values()}
        annotated = [table[c] for c in plan.row.classes if c in table]
        self.finest_annotated = np.zeros(256, np.uint8)   # the `all` value of each atomic id
        for atomic in range(256):
            if atomic in by_id and by_id[atomic].name in plan.row.classes:
                self.finest_annotated[atomic] = atomic
                continue
            holders = [e for e in annotated if atomic in e.atomic_ids]
            if holders:
                self.finest_annotated[atomic] = min(holders, key=lambda e: len(e.atomic_ids)).class_id
        self.members = {}            # per class: 1 for the atomic ids it is made of
        for array in plan.arrays:
            if array.name != ALL_IDS_ARRAY:
                lut = np.zeros(256, np.uint8)
                lut[list(table[array.name].atomic_ids)] = 1
                self.members[array.name] = lut
        self.windows = {name: INSTANCE_ID_SPACES.get(name, BODY_IDS).window(*plan.row.box_nm())
                        for name in self.members}

    def values(self, name: str, dtype: str, scene, instance_ids: dict) -> np.ndarray:
        """The array `name` over a scene; `instance_ids` caches the scene's object ids by id space."""
        if name == ALL_IDS_ARRAY:
            return self.finest_annotated[scene.atomic]
        inside = self.members[name][scene.atomic]
        if name not in INSTANCE_CLASSES:
            return inside
        space = INSTANCE_ID_SPACES.get(name, BODY_IDS)
        # uint64 arrays keep the world's 64-bit ids; narrower ones number the objects per crop
        key = (space, dtype == "uint64")
        if key not in instance_ids:
            instance_ids[key] = space.ids(scene) if dtype == "uint64" else \
                space.ids(scene, self.windows[name], INSTANCE_ID_BASE)
        return np.where(inside.view(bool), instance_ids[key], 0).astype(dtype)


def _write_labels(root, plan: CropPlan, world: World, bar) -> None:
    _, label_codec = _zarr_codecs()
    crop_group = root.require_group(f"recon-1/labels/groundtruth/crop{plan.row.crop_id}")
    painter = _LabelPainter(plan)
    arrays = {}
    for array in plan.arrays:
        group = crop_group.require_group(array.name)
        group.attrs.update(multiscales_attrs([(f"s{k}", g.scale, g.translation) for k, g in enumerate(array.levels)]))
        arrays[array.name] = [group.create_dataset(
            f"s{k}", shape=g.shape, chunks=tuple(min(c, n) for c, n in zip(LABEL_CHUNKS, g.shape)), dtype=array.dtype,
            compressor=label_codec, fill_value=0, dimension_separator="/", write_empty_chunks=False, overwrite=True)
            for k, g in enumerate(array.levels)]
    for k, grid in enumerate(plan.arrays[0].levels):
        for block in product(*(range(0, n, BLOCK) for n in grid.shape)):
            stop = np.minimum(np.asarray(block) + BLOCK, grid.shape)
            scene = world.evaluate(*_coords(grid, block, stop), organelles=plan.organelles)
            where, instance_ids = tuple(slice(a, b) for a, b in zip(block, stop)), {}
            for array in plan.arrays:
                arrays[array.name][k][where] = painter.values(array.name, array.dtype, scene, instance_ids)
            bar.update(int(np.prod(stop - np.asarray(block))))


def plan_mock(crops: Sequence[int], raw_padding: int = 0, all_em_resolutions: bool = False, label_classes="ours",
              seed: int = 0, out_dir="") -> MockInfo:
    """What `build_mock` would write, without writing it. ValueError for an unknown crop id."""
    manifest = read_train_crops()
    unknown = [c for c in crops if c not in manifest]
    if unknown:
        raise ValueError(f"crops {unknown} are not in {TRAIN_CROP_MANIFEST}")
    rows = [manifest[c] for c in dict.fromkeys(crops)]
    names = sorted({r.dataset for r in rows})
    datasets = {n: raw_pyramid(n, [r for r in manifest.values() if r.dataset == n]) for n in names}
    plans = tuple(crop_plan(r, datasets[r.dataset], label_classes, raw_padding, all_em_resolutions) for r in rows)
    chunks = {n: {path: len(found) for path, found in
                  _raw_chunk_sets(datasets[n], [p for p in plans if p.row.dataset == n]).items()} for n in names}
    return MockInfo(str(out_dir), seed, raw_padding, all_em_resolutions, label_classes, plans, datasets, chunks)


def voxels_to_render(info: MockInfo) -> tuple[int, int]:
    """(raw voxels, label voxels) that building the mock evaluates."""
    raw = 0
    for name, dataset in info.datasets.items():
        sets = _raw_chunk_sets(dataset, [p for p in info.crops if p.row.dataset == name])
        for level in dataset.levels:
            for chunk in sets.get(level.path, ()):
                lo = np.asarray(chunk) * level.chunks
                raw += int(np.prod(np.minimum(lo + level.chunks, level.grid.shape) - lo))
    labels = sum(int(np.prod(g.shape)) for p in info.crops if p.arrays for g in p.arrays[0].levels)
    return raw, labels


def build_mock(out_dir, crops: Sequence[int], raw_padding: int = 0, all_em_resolutions: bool = False,
               label_classes="ours", seed: int = 0, progress: bool = True) -> MockInfo:
    """Write the mock of the download of `crops` (training crop ids) into `out_dir` (created; datasets
    already there are overwritten); returns what it wrote. ValueError for an unknown crop id."""
    import zarr
    from tqdm import tqdm

    started = time.time()
    out = Path(out_dir)
    info = plan_mock(crops, raw_padding, all_em_resolutions, label_classes, seed, out.resolve())
    manifest = read_train_crops()
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(voxels_to_render(info)), unit="voxel", unit_scale=True, desc="mock download",
              disable=not progress, file=sys.stdout, mininterval=1.0) as bar:
        for name, dataset in info.datasets.items():
            world = World(name, seed, [r for r in manifest.values() if r.dataset == name])
            crops_here = [p for p in info.crops if p.row.dataset == name]
            root = zarr.open_group(str(out / name / f"{name}.zarr"), mode="a")
            _write_raw(root, dataset, world, _raw_chunk_sets(dataset, crops_here), seed, bar)
            for plan in crops_here:
                if plan.arrays:
                    _write_labels(root, plan, world, bar)
    info.bytes_on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    info.seconds = round(time.time() - started, 2)
    (out / MOCK_INFO_FILE).write_text(info.to_json())
    return info


def summary(info: MockInfo) -> str:
    chunks = sum(n for levels in info.raw_chunks.values() for n in levels.values())
    arrays = sum(len(c.arrays) for c in info.crops)
    lines = [f"mock download in {info.out_dir}: {len(info.crops)} crops in {len(info.datasets)} datasets, "
             f"{arrays} label arrays, {chunks} raw chunks, {info.bytes_on_disk / 2 ** 20:.1f} MiB, "
             f"{info.seconds:.1f} s"]
    for crop in info.crops:
        row = crop.row
        lines.append(f"  crop{row.crop_id} {row.dataset}: {len(crop.arrays)} arrays at {list(row.voxel_size)} nm, "
                     f"shape {list(row.shape)}; raw chunks on {', '.join(crop.raw_chunks) or 'no level'}")
    for ds in info.datasets.values():
        lines.append(f"  {ds.name}: raw s0 {list(ds.native_voxel)} nm ({ds.native_rule} rule), "
                     f"levels s0..s{len(ds.levels) - 1}")
    return "\n".join(lines)


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the option ("--classes: invalid choice ..."), exit 2."""
        print(f"error: {message.removeprefix('argument ')}", file=sys.stderr)
        sys.exit(2)


def _parse_crops(text: str, parser) -> list[int]:
    manifest = read_train_crops()
    crops = []
    for token in text.split(","):
        token = token.strip()
        if not token.isdigit() or int(token) not in manifest:
            parser.error(f"--crops: {token!r} is not a training crop id; give comma-separated ids from "
                         f"manifests/train_crop_manifest.csv, e.g. --crops 289,345")
        crops.append(int(token))
    return crops


def main(argv=None) -> int:
    parser = _OneLineErrors(description="Write a mock of the real CellMap download from real manifest rows.")
    parser.add_argument("--out", required=True, help="output folder (the data root)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of crops (default: suite)")
    parser.add_argument("--crops", help="comma-separated training crop ids, instead of a preset")
    parser.add_argument("--raw-padding", type=int, default=0, help="raw voxels copied around each crop, as csc")
    parser.add_argument("--fetch-all-em-resolutions", action="store_true", help="raw chunks on every level, as csc")
    parser.add_argument("--classes", choices=("all", "ours"), default="all",
                        help="all: every class of each crop; ours: the toolkit's 14, all, mito and cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    args = parser.parse_args(argv)
    if args.preset and args.crops:
        parser.error("--preset and --crops: give one of them")
    if args.raw_padding < 0:
        parser.error(f"--raw-padding: {args.raw_padding} is negative; give 0 or more voxels")
    crops = _parse_crops(args.crops, parser) if args.crops else list(PRESETS[args.preset or "suite"])
    out = Path(args.out)
    if args.dry_run:
        info = plan_mock(crops, args.raw_padding, args.fetch_all_em_resolutions, args.classes, args.seed, out)
        raw, labels = voxels_to_render(info)
        print(summary(info) + f"\nwould render {raw:,} raw and {labels:,} label voxels; nothing written")
        return 0
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.force:
            parser.error(f"--out: {out} is not empty; choose another folder or add --force to replace it")
        shutil.rmtree(out)
    info = build_mock(out, crops, args.raw_padding, args.fetch_all_em_resolutions, args.classes, args.seed)
    print(summary(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
