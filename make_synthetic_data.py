"""Synthetic CellMap-format dataset: the toolkit's embedded default and the test suite's data.

    python make_synthetic_data.py --out DIR [--seed N] [--force]

Writes two datasets in the exact on-disk layout of the CellMap challenge (zarr v2, OME-NGFF 0.4
multiscales), a quoted `datasplit.csv`, and `SYNTHETIC_VERSION` last (its presence marks a complete set):

    DIR/<ds>/<ds>.zarr/recon-1/em/fibsem-uint8/s0, s1                 raw EM, uint8
    DIR/<ds>/<ds>.zarr/recon-1/labels/groundtruth/crop<N>/<class>/s0   0/1 uint8 (nuc: instance ids)

`synth_iso` has 8 nm voxels; `synth_aniso` has 6x4x4 nm (z, y, x). One 3D geometry per dataset (cells with
plasma membrane and extracellular space, nuclei, mitochondria with membrane, lumen and ribosome granules,
Golgi stacks, vesicles, endosomes, ER tubes) is painted into a compartment map; labels and EM-like
intensities (dark membranes, distinct lumen grey levels, chromatin texture, blur, noise) both come from it.

The z-context known answer: beside true nuclei (large, many slices thick), cells hold *decoys*: stacks of
thin cylinders (at most 24 nm = 3 slices at 8 nm) with a nucleus's envelope ring and chromatin texture.
Within one slice a decoy is a nucleus cross-section; across 5 slices it appears and vanishes. Decoys are
not labelled `nuc`, so a 2.5D model can beat a 2D one on `nuc` by construction.

Translations follow OME-NGFF: the physical centre of voxel 0 (a 2x level is shifted by half a fine voxel).
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from ngff import multiscales_attrs

SYNTHETIC_FORMAT_VERSION = "1"
CLASSES = ("ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "golgi_mem", "golgi_lum", "ves_mem", "ves_lum",
           "endo_mem", "endo_lum", "er_mem", "er_lum", "nuc")

# Compartments of the painted map; each maps to at most one class (nuc gathers envelope + interior).
CYTOSOL, ECS, PM, NUC_ENV, NUC_IN, DECOY_ENV, DECOY_IN, MITO_MEM, MITO_LUM, MITO_RIBO, GOLGI_MEM, GOLGI_LUM, \
    VES_MEM, VES_LUM, ENDO_MEM, ENDO_LUM, ER_MEM, ER_LUM = range(18)
COMPARTMENT_CLASS = {ECS: "ecs", PM: "pm", MITO_MEM: "mito_mem", MITO_LUM: "mito_lum", MITO_RIBO: "mito_ribo",
                     GOLGI_MEM: "golgi_mem", GOLGI_LUM: "golgi_lum", VES_MEM: "ves_mem", VES_LUM: "ves_lum",
                     ENDO_MEM: "endo_mem", ENDO_LUM: "endo_lum", ER_MEM: "er_mem", ER_LUM: "er_lum",
                     NUC_ENV: "nuc", NUC_IN: "nuc"}
# Mean grey level of each compartment (membranes dark, lumens and cytosol distinct, ECS bright).
GREY = np.zeros(18, dtype=np.float32)
GREY[[CYTOSOL, ECS, PM, NUC_ENV, NUC_IN, DECOY_ENV, DECOY_IN, MITO_MEM, MITO_LUM, MITO_RIBO, GOLGI_MEM, GOLGI_LUM,
      VES_MEM, VES_LUM, ENDO_MEM, ENDO_LUM, ER_MEM, ER_LUM]] = \
    [160, 205, 55, 50, 128, 50, 128, 45, 105, 35, 60, 180, 65, 190, 55, 118, 62, 145]
CHROMATIN_DARKENING = 40.0   # heterochromatin patches inside nuclei and decoys
NOISE_SD = 10.0
BLUR_NM = 5.0
ENVELOPE_NM = 20.0           # nuclear envelope thickness (also the decoy's ring)
DECOY_MAX_NM = 24.0          # at most 3 slices at 8 nm
CHUNKS = (32, 128, 128)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    voxel: tuple[float, float, float]   # nm (z, y, x) at s0
    shape: tuple[int, int, int]
    crops: tuple                        # (id, split, (z0,y0,x0), (dz,dy,dx) in s0 voxels, classes or None=all, nuc_coarse)


DATASETS = (
    DatasetSpec("synth_iso", (8.0, 8.0, 8.0), (80, 384, 384), (
        (101, "train", (4, 0, 0), (48, 192, 192), None, False),             # touches the volume edge
        (102, "train", (16, 0, 192), (48, 192, 192),
         ("ecs", "pm", "mito_mem", "mito_lum", "er_mem", "er_lum", "nuc"), False),
        (103, "validate", (16, 192, 0), (48, 192, 192), None, False),
        (104, "train", (0, 208, 208), (24, 160, 160), None, False),         # smaller than a 256x256 patch
        (105, "train", (32, 192, 192), (48, 192, 192), None, True),         # nuc labelled at 16 nm only
    )),
    DatasetSpec("synth_aniso", (6.0, 4.0, 4.0), (80, 576, 576), (
        (201, "train", (0, 0, 0), (64, 288, 288), None, False),
        (202, "train", (16, 0, 288), (64, 288, 288),
         ("nuc", "mito_mem", "mito_lum", "mito_ribo", "golgi_mem", "golgi_lum", "ves_mem", "ves_lum"), False),
        (203, "validate", (8, 288, 0), (64, 288, 576), None, False),
    )),
)


@dataclass
class Geometry:
    """The painted volume and where the nuclei and decoys are (for tests and inspection)."""

    compartments: np.ndarray                     # uint8 [Z,Y,X]
    nucleus_ids: np.ndarray                      # uint8 [Z,Y,X], instance id inside nuclei
    nuclei: list = field(default_factory=list)   # (centre nm (z,y,x), semi-axes nm (z,y,x))
    decoys: list = field(default_factory=list)   # (centre nm (z,y,x), radius nm, thickness nm)


# ----------------------------------------------------------------------------------------------------
# Painting helpers: each works on the bounding box of one object only.
# ----------------------------------------------------------------------------------------------------
class Painter:
    def __init__(self, shape, voxel):
        self.shape, self.voxel = shape, np.asarray(voxel)
        self.comp = np.full(shape, CYTOSOL, dtype=np.uint8)

    def box(self, centre, extent):
        """Index slices and voxel-centre coordinates (nm, relative to `centre`) of a bounding box."""
        lo = np.maximum(np.floor((np.asarray(centre) - extent) / self.voxel).astype(int), 0)
        hi = np.minimum(np.ceil((np.asarray(centre) + extent) / self.voxel).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None, None
        axes = [np.arange(lo[a], hi[a]) * self.voxel[a] - centre[a] for a in range(3)]
        return tuple(slice(l, h) for l, h in zip(lo, hi)), np.meshgrid(*axes, indexing="ij", sparse=True)

    def shell(self, where, signed_distance, shell_nm, shell_id, inside_id, only=None):
        """Paint voxels with signed distance < 0 (inside): the outer `shell_nm` as shell, the rest as lumen."""
        region = self.comp[where]
        inside = signed_distance < 0
        if only is not None:
            inside &= np.isin(region, only)
        region[inside & (signed_distance >= -shell_nm)] = shell_id
        if inside_id is not None:
            region[inside & (signed_distance < -shell_nm)] = inside_id
        return inside

    def ellipsoid(self, centre, semi, shell_nm, shell_id, inside_id, only=None):
        semi = np.asarray(semi, dtype=float)
        where, grid = self.box(centre, semi)
        if where is None:
            return None, None
        z, y, x = grid
        q = np.sqrt((z / semi[0]) ** 2 + (y / semi[1]) ** 2 + (x / semi[2]) ** 2)
        inside = self.shell(where, (q - 1) * semi.min(), shell_nm, shell_id, inside_id, only)
        return where, inside

    def capsule(self, a, b, radius, shell_nm, shell_id, inside_id, only=None):
        a, b = np.asarray(a, float), np.asarray(b, float)
        centre, half = (a + b) / 2, np.abs(b - a) / 2 + radius
        where, grid = self.box(centre, half)
        if where is None:
            return
        z, y, x = grid
        d = b - a
        pz, py, px = z + centre[0] - a[0], y + centre[1] - a[1], x + centre[2] - a[2]
        t = np.clip((pz * d[0] + py * d[1] + px * d[2]) / max(d @ d, 1e-9), 0, 1)
        dist = np.sqrt((pz - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (px - t * d[2]) ** 2)
        self.shell(where, dist - radius, shell_nm, shell_id, inside_id, only)


def _cells(p: Painter, rng) -> np.ndarray:
    """Columnar cells from a jittered Voronoi tiling of y/x: ECS gaps and plasma membrane at the borders.
    Returns the cell seeds (nm, y/x) as a [rows, columns, 2] grid."""
    _, ny, nx = p.shape
    size_y, size_x = ny * p.voxel[1], nx * p.voxel[2]
    n = max(2, int(round(size_y / 1100))), max(2, int(round(size_x / 1100)))
    gy, gx = np.meshgrid((np.arange(n[0]) + 0.5) * size_y / n[0], (np.arange(n[1]) + 0.5) * size_x / n[1], indexing="ij")
    seeds = np.stack([gy.ravel(), gx.ravel()], 1) + rng.uniform(-120, 120, (gy.size, 2))
    yy = (np.arange(ny) * p.voxel[1])[:, None, None]
    xx = (np.arange(nx) * p.voxel[2])[None, :, None]
    d = np.sqrt((yy - seeds[:, 0]) ** 2 + (xx - seeds[:, 1]) ** 2)
    d.sort(axis=2)
    gap = d[..., 1] - d[..., 0]   # zero on a Voronoi border
    ecs2d = gap < 30
    pm2d = (gap >= 30) & (gap < 30 + 2 * 14)
    p.comp[:, ecs2d] = ECS
    p.comp[:, pm2d] = PM
    return seeds.reshape(n[0], n[1], 2)


def seeds_grid(seeds: np.ndarray) -> list[tuple[int, int]]:
    """(row, column) of each seed of `seeds.reshape(-1, 2)`, in that order."""
    return [(r, c) for r in range(seeds.shape[0]) for c in range(seeds.shape[1])]


def _organelles(p: Painter, seeds, rng) -> None:
    z_size = p.shape[0] * p.voxel[0]
    cytosol = [CYTOSOL]

    def spot(seed, spread=420):
        return np.array([rng.uniform(0, z_size), *(seed + rng.uniform(-spread, spread, 2))])

    for seed in seeds.reshape(-1, 2):
        for _ in range(24):  # ER tubes
            a = spot(seed, 480)
            b = a + np.array([rng.uniform(-60, 60), *rng.uniform(-300, 300, 2)])
            p.capsule(a, b, rng.uniform(22, 32), 9, ER_MEM, ER_LUM, only=cytosol)
        for _ in range(7):   # mitochondria with ribosome granules
            semi = (rng.uniform(50, 90), rng.uniform(70, 150), rng.uniform(70, 150))
            centre = spot(seed)
            where, inside = p.ellipsoid(centre, semi, 12, MITO_MEM, MITO_LUM, only=cytosol)
            for _ in range(4):
                offset = rng.uniform(-0.5, 0.5, 3) * np.array(semi)
                p.ellipsoid(centre + offset, (12, 12, 12), 0, MITO_RIBO, MITO_RIBO, only=[MITO_LUM])
        # one Golgi stack: cisternae flattened in y, stacked along y
        centre = spot(seed, 350)
        for k in range(5):
            c = centre + np.array([0, (k - 2) * 42, 0])
            p.ellipsoid(c, (rng.uniform(90, 130), 13, rng.uniform(150, 230)), 7, GOLGI_MEM, GOLGI_LUM, only=cytosol)
        for _ in range(40):  # vesicles
            p.ellipsoid(spot(seed, 480), (rng.uniform(20, 32),) * 3, 7, VES_MEM, VES_LUM, only=cytosol)
        for _ in range(4):   # endosomes
            p.ellipsoid(spot(seed), (rng.uniform(60, 100),) * 3, 10, ENDO_MEM, ENDO_LUM, only=cytosol)


def _nuclei_and_decoys(p: Painter, seeds, rng, geometry: Geometry) -> None:
    """Cells in a checkerboard get a true nucleus or a column of decoy disks (every crop sees both kinds);
    both carve out whatever organelles are there."""
    z_size = p.shape[0] * p.voxel[0]
    nucleus_id = 0
    for (row, col), seed in zip(seeds_grid(seeds), seeds.reshape(-1, 2)):
        radius = rng.uniform(330, 480)
        if (row + col) % 2 == 1:
            semi = (rng.uniform(0.55, 0.7) * z_size, radius, radius * rng.uniform(0.85, 1.0))
            centre = np.array([z_size * rng.uniform(0.4, 0.6), *seed])
            where, inside = p.ellipsoid(centre, semi, ENVELOPE_NM, NUC_ENV, NUC_IN, only=None)
            if where is None:
                continue
            nucleus_id += 1
            geometry.nucleus_ids[where][inside] = nucleus_id
            geometry.nuclei.append((centre, np.array(semi)))
            continue
        # Decoy column: thin cylinders (no caps: only the lateral ring is dark, as in a nucleus slice).
        z = rng.uniform(0, 40)
        while z < z_size:
            thickness = rng.choice([16.0, 24.0]) if p.voxel[0] == 8 else DECOY_MAX_NM
            r = radius * np.sqrt(rng.uniform(0.35, 1.0))   # like cross-sections of a sphere of this radius
            centre = np.array([z + thickness / 2, *(seed + rng.uniform(-40, 40, 2))])
            where, grid = p.box(centre, np.array([thickness / 2, r, r]))
            if where is not None:
                dz, dy, dx = grid
                radial = np.sqrt(dy ** 2 + dx ** 2) - r
                in_slab = np.abs(dz) < thickness / 2
                region = p.comp[where]
                inside = in_slab & (radial < 0)
                region[inside] = DECOY_IN
                region[inside & (radial >= -ENVELOPE_NM)] = DECOY_ENV
                geometry.decoys.append((centre, r, thickness))
            z += thickness + rng.uniform(40, 56)   # gap of at least 5 slices at 8 nm


def build_geometry(spec: DatasetSpec, rng: np.random.Generator) -> Geometry:
    p = Painter(spec.shape, spec.voxel)
    geometry = Geometry(p.comp, np.zeros(spec.shape, dtype=np.uint8))
    seeds = _cells(p, rng)
    _organelles(p, seeds, rng)
    membranes = p.comp == PM
    ecs = p.comp == ECS
    _nuclei_and_decoys(p, seeds, rng, geometry)
    # Cell borders win over anything that grew across them.
    p.comp[ecs] = ECS
    p.comp[membranes] = PM
    geometry.nucleus_ids[ecs | membranes] = 0
    return geometry


def render_em(geometry: Geometry, voxel, rng: np.random.Generator) -> np.ndarray:
    """EM-like uint8: compartment grey levels, chromatin texture, blur and noise."""
    comp = geometry.compartments
    image = GREY[comp]
    sigma_texture = [40.0 / v for v in voxel]
    texture = gaussian_filter(rng.standard_normal(comp.shape).astype(np.float32), sigma_texture)
    texture /= texture.std() + 1e-9
    chromatin = np.isin(comp, [NUC_IN, DECOY_IN]) & (texture > 0.6)
    image[chromatin] -= CHROMATIN_DARKENING
    # Blur in-plane only: z blur would mix a thin decoy with the cytosol above and below and give it away
    # within a single slice (FIB-SEM blur is mostly in the imaging plane anyway).
    image = gaussian_filter(image, [0.0, BLUR_NM / voxel[1], BLUR_NM / voxel[2]])
    image += rng.normal(0.0, NOISE_SD, comp.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def _write_array(group, name: str, data: np.ndarray) -> None:
    from numcodecs import Blosc, blosc

    blosc.use_threads = False  # multi-threaded Blosc output bytes vary from run to run; the data do not
    group.create_dataset(name, data=data, chunks=tuple(min(c, s) for c, s in zip(CHUNKS, data.shape)),
                         compressor=Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE), overwrite=True)


def _block_mean(a: np.ndarray) -> np.ndarray:
    z, y, x = (n // 2 * 2 for n in a.shape)
    b = a[:z, :y, :x].astype(np.float32).reshape(z // 2, 2, y // 2, 2, x // 2, 2).mean(axis=(1, 3, 5))
    return np.rint(b).astype(np.uint8)


def synthesize(spec: DatasetSpec, seed: int, index: int) -> tuple[Geometry, np.ndarray]:
    """The geometry and raw EM of one dataset (deterministic for seed and dataset index)."""
    rng = np.random.default_rng([seed, index])
    geometry = build_geometry(spec, rng)
    return geometry, render_em(geometry, spec.voxel, rng)


def write_dataset(out: Path, spec: DatasetSpec, seed: int, index: int) -> list[list[str]]:
    """Write one dataset's zarr container; returns its datasplit rows."""
    import zarr

    geometry, raw = synthesize(spec, seed, index)
    zarr_path = out / spec.name / f"{spec.name}.zarr"
    root = zarr.open_group(str(zarr_path), mode="w")
    em = root.require_group("recon-1/em/fibsem-uint8")
    _write_array(em, "s0", raw)
    _write_array(em, "s1", _block_mean(raw))
    voxel = np.array(spec.voxel)
    em.attrs.update(multiscales_attrs([("s0", voxel, (0, 0, 0)), ("s1", 2 * voxel, voxel / 2)]))

    rows = []
    for crop_id, split, start, size, classes, nuc_coarse in spec.crops:
        classes = tuple(c for c in CLASSES if classes is None or c in classes)
        sl = tuple(slice(s, s + n) for s, n in zip(start, size))
        comp = geometry.compartments[sl]
        group = root.require_group(f"recon-1/labels/groundtruth/crop{crop_id}")
        for cls in classes:
            if cls == "nuc":
                label = geometry.nucleus_ids[sl]
            else:
                ids = [k for k, c in COMPARTMENT_CLASS.items() if c == cls]
                label = np.isin(comp, ids).astype(np.uint8)
            scale, trans = voxel, np.array(start) * voxel
            if cls == "nuc" and nuc_coarse:  # labelled at 2x the voxel size, as large classes often are
                label, scale, trans = label[::2, ::2, ::2], 2 * voxel, trans + voxel / 2
            class_group = group.require_group(cls)
            _write_array(class_group, "s0", label)
            class_group.attrs.update(multiscales_attrs([("s0", scale, trans)]))
        rows.append([split, str(zarr_path.resolve()), "recon-1/em/fibsem-uint8", str(zarr_path.resolve()),
                     f"recon-1/labels/groundtruth/crop{crop_id}/[{','.join(classes)}]"])
    return rows


def generate(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the synthetic dataset into `out_dir`; returns the datasplit path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, spec in enumerate(DATASETS):
        rows += write_dataset(out, spec, seed, index)
    csv_path = out / "datasplit.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    (out / "SYNTHETIC_VERSION").write_text(f"{SYNTHETIC_FORMAT_VERSION} seed={seed}\n")
    return csv_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the synthetic CellMap-format dataset.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty; choose another --out or add --force to replace it", file=sys.stderr)
        return 2
    if out.exists() and args.force:
        import shutil

        shutil.rmtree(out)
    csv_path = generate(out, args.seed)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {csv_path} ({len(csv_path.read_text().splitlines())} crops, {size / 2**20:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
