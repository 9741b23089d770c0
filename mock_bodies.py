"""The organelles of the mock world (mock_world.py): drafting them inside one cytoplasm site, and painting
many of them at once onto a grid of voxel centres.

A site (a cube of `site_nm`) holds, in this order and in numbers drawn per cubic micrometre: mitochondria
(membrane, lumen, ribosome granules), Golgi stacks of four cisternae, lysosomes, lipid droplets, endosomes,
peroxisomes, ER sheets, ER tubes, microtubules (wall and lumen), ER exit sites at tube ends, vesicles. Each
lies wholly inside its site, so organelles of different sites never meet. Shapes are ellipsoids (spheres
included) and capsules, with an approximate signed distance (negative inside): the outer `thickness` nm is
membrane, the rest lumen.

A `BodyTable` holds bodies as rows of arrays, in painting order. Painting order decides overlaps: a body
paints only voxels that are still cytosol of its own cell, so an earlier body wins over a later one.
`paint_bodies` keeps that rule while evaluating runs of small bodies in one go (the earliest body of a run
claims a voxel they share).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crop_manifest import read_class_table

CLASS_IDS = {name: entry.class_id for name, entry in read_class_table().items()}
CYTO, MITO_LUM, MITO_RIBO = CLASS_IDS["cyto"], CLASS_IDS["mito_lum"], CLASS_IDS["mito_ribo"]
# Bodies whose box holds more voxels than BIG_BOX are painted one at a time (on broadcasting axes); runs of
# smaller ones together, up to BATCH_VOXELS candidate voxels at once (Python overhead would dominate them).
BIG_BOX = 1 << 15
BATCH_VOXELS = 1 << 18

# Float columns: bounding radius; the core radius is the thinnest half-width (a ball about the centre that
# the body fills: min semi-axis, or a capsule's tube radius); rotation columns are the body's axes in the
# world (a capsule's axis in column 0). A body is stored as tiles, rows that share its shape but each bound
# a part of it (box centre and half extent): small boxes to search, as thin bodies have huge bounding boxes.
CENTRE, RADIUS, THICKNESS, HALF_LENGTH, SEMI, CORE, ROTATION, BOX_CENTRE, EXTENT = \
    slice(0, 3), 3, 4, 5, slice(6, 9), 9, slice(10, 19), slice(19, 22), slice(22, 25)
FLOATS = 25
GID, CELL, MEMBRANE, LUMEN, HEAD = range(5)  # int columns; HEAD = the row of the body's first tile
INTS = 5


@dataclass(frozen=True)
class BodyTable:
    """Bodies as rows of tiles: floats [n, FLOATS], ints [n, INTS]; ribosome granules: floats [g, 4]
    (world centre, radius) and the head row of the mitochondrion each lies in."""

    floats: np.ndarray
    ints: np.ndarray
    granules: np.ndarray
    granule_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.floats)

    def heads(self) -> np.ndarray:
        """The first row of each body."""
        return np.nonzero(self.ints[:, HEAD] == np.arange(len(self)))[0]

    def select(self, heads: np.ndarray) -> "BodyTable":
        """The bodies whose head rows are `heads`, with all their tiles."""
        rows = np.nonzero(np.isin(self.ints[:, HEAD], heads))[0]
        renumber = np.full(len(self), -1)
        renumber[rows] = np.arange(len(rows))
        ints = self.ints[rows].copy()
        ints[:, HEAD] = renumber[ints[:, HEAD]]
        keep = renumber[self.granule_rows] >= 0
        return BodyTable(self.floats[rows], ints, self.granules[keep], renumber[self.granule_rows[keep]])

    @staticmethod
    def join(tables) -> "BodyTable":
        offsets = np.cumsum([0] + [len(t) for t in tables])
        ints = np.concatenate([t.ints + np.eye(INTS, dtype=np.int64)[HEAD] * o for t, o in zip(tables, offsets)])
        return BodyTable(np.concatenate([t.floats for t in tables]).reshape(-1, FLOATS).astype(np.float32),
                         ints.reshape(-1, INTS),
                         np.concatenate([t.granules for t in tables]).reshape(-1, 4),
                         np.concatenate([t.granule_rows + o for t, o in zip(tables, offsets)]).astype(np.int64))


def unit_vectors(rng, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _rotations(rng, n: int) -> np.ndarray:
    """Uniformly random rotation matrices [n, 3, 3] (from random unit quaternions)."""
    q = rng.standard_normal((n, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                     np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                     np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)


class _Draft:
    """Rows of a site's bodies as they are drafted (ids and cells are set once they are kept)."""

    def __init__(self, rng, origin: np.ndarray, site_nm: float):
        self.rng, self.origin, self.site_nm = rng, origin, site_nm
        self.floats, self.ints, self.granules, self.granule_rows, self.count = [], [], [], [], 0

    def place(self, radii: np.ndarray) -> np.ndarray:
        """Centres [n, 3] that keep balls of `radii` inside the site."""
        r = np.asarray(radii, float)[:, None]
        return self.origin + r + self.rng.random((len(r), 3)) * (self.site_nm - 2 * r)

    def add(self, kind: str, thickness: float, centres, semis, rotations, core, radius, half_length=None,
            tiles=(1, 1, 1)) -> np.ndarray:
        """Bodies of one kind, each as `tiles` (per axis of its own frame) rows; returns their head rows."""
        n, per_body = len(centres), int(np.prod(tiles))
        capsule = half_length is not None
        if capsule:    # a cylinder piece along the axis: its end centres, widened by the tube radius
            whole = np.abs(rotations[:, :, 0]) * half_length[:, None] + core[:, None]
        else:          # the exact bounding box of the ellipsoid
            whole = np.sqrt(((rotations * semis[:, None, :]) ** 2).sum(2))
        boxes, extent = centres[:, None, :], whole[:, None, :]
        if per_body > 1:
            half = np.stack([half_length + core, core, core], 1) if capsule else semis   # in its own frame
            tile_half = half / np.asarray(tiles)
            index = np.stack(np.meshgrid(*(np.arange(t) for t in tiles), indexing="ij"), -1).reshape(-1, 3)
            local = -half[:, None, :] + (2 * index[None] + 1) * tile_half[:, None, :]     # [n, tiles, 3]
            if capsule:
                boxes = centres[:, None, :] + local[:, :, :1] * rotations[:, None, :, 0]
                extent = np.abs(rotations[:, :, 0]) * tile_half[:, :1] + core[:, None]
            else:
                boxes = centres[:, None, :] + np.einsum("nta,nia->nti", local, rotations)
                extent = np.einsum("nia,na->ni", np.abs(rotations), tile_half)
            # a tile's box, clipped to the whole body's box
            lo = np.maximum(boxes - extent[:, None], (centres - whole)[:, None])
            hi = np.minimum(boxes + extent[:, None], (centres + whole)[:, None])
            boxes, extent = (lo + hi) / 2, np.maximum(hi - lo, 0) / 2
        rows = np.zeros((n, per_body, FLOATS))
        rows[..., CENTRE], rows[..., RADIUS], rows[..., THICKNESS] = centres[:, None], radius[:, None], thickness
        rows[..., HALF_LENGTH] = half_length[:, None] if capsule else 0.0
        rows[..., SEMI], rows[..., CORE] = semis[:, None], core[:, None]
        rows[..., ROTATION] = rotations.reshape(n, 1, 9)
        rows[..., BOX_CENTRE], rows[..., EXTENT] = boxes, extent
        membrane, lumen = (CLASS_IDS[f"{kind}_mem"], CLASS_IDS[f"{kind}_lum"]) if kind != "mt" else \
            (CLASS_IDS["mt_out"], CLASS_IDS["mt_in"])
        heads = self.count + np.arange(n) * per_body
        ints = np.zeros((n, per_body, INTS), np.int64)
        ints[..., MEMBRANE], ints[..., LUMEN], ints[..., HEAD] = membrane, lumen, heads[:, None]
        self.floats.append(rows.reshape(-1, FLOATS))
        self.ints.append(ints.reshape(-1, INTS))
        self.count += n * per_body
        return heads

    def spheres(self, kind: str, thickness: float, radii, centres=None):
        radii = np.asarray(radii, float)
        centres = self.place(radii) if centres is None else centres
        identity = np.broadcast_to(np.eye(3), (len(radii), 3, 3))
        return self.add(kind, thickness, centres, radii[:, None] * np.ones(3), identity, radii, radii)

    def ellipsoids(self, kind: str, thickness: float, semis: np.ndarray, rotations: np.ndarray, centres=None,
                   tiles=(1, 1, 1)):
        radius = semis.max(1)
        centres = self.place(radius) if centres is None else centres
        return self.add(kind, thickness, centres, semis, rotations, semis.min(1), radius, tiles=tiles)

    def capsules(self, kind: str, thickness: float, tube_radii, half_lengths, axes, tiles: int) -> np.ndarray:
        """Capsules along unit `axes`; returns their centres."""
        radius = half_lengths + tube_radii
        centres = self.place(radius)
        rotations = axes[:, :, None] * np.eye(3)[0]          # the axis in column 0
        self.add(kind, thickness, centres, tube_radii[:, None] * np.ones(3), rotations, tube_radii, radius,
                 half_lengths, (tiles, 1, 1))
        return centres

    def table(self) -> BodyTable:
        """float32 is precise to 0.03 nm even 400 um from the origin."""
        return BodyTable(np.concatenate(self.floats).reshape(-1, FLOATS).astype(np.float32),
                         np.concatenate(self.ints).reshape(-1, INTS),
                         np.array(self.granules, float).reshape(-1, 4), np.array(self.granule_rows, np.int64))


def draft_bodies(rng, origin: np.ndarray, site_nm: float) -> BodyTable:
    """The organelles of the site with corner `origin`, each wholly inside it, in painting order. Counts are
    per cubic micrometre of site (about half of which ends up kept: the rest falls in nuclei or membranes)."""
    d, volume = _Draft(rng, origin, site_nm), (site_nm / 1000.0) ** 3

    def count(per_um3: float) -> int:
        return int(rng.poisson(per_um3 * volume))

    n = count(0.87)                         # mitochondria with ribosome granules in the lumen
    semis = np.stack([rng.uniform(130, 200, n), rng.uniform(130, 200, n), rng.uniform(300, 560, n)], 1)
    rotations = _rotations(rng, n)
    centres = d.place(semis.max(1))
    heads = d.ellipsoids("mito", 14.0, semis, rotations, centres)
    for head, centre, semi, rotation in zip(heads, centres, semis, rotations):
        for _ in range(int(rng.integers(3, 7))):
            d.granules.append([*(centre + rotation @ (rng.uniform(-0.5, 0.5, 3) * semi)), rng.uniform(10, 16)])
            d.granule_rows.append(head)
    for _ in range(count(0.09)):            # Golgi stacks: four cisternae along their thin axis
        rotation, centre = _rotations(rng, 1)[0], d.place([420.0])[0]
        semis = np.stack([rng.uniform(14, 20, 4), rng.uniform(200, 300, 4), rng.uniform(200, 300, 4)], 1)
        centres = centre + rotation[:, 0] * ((np.arange(4) - 1.5) * 55.0)[:, None]
        d.ellipsoids("golgi", 7.0, semis, np.repeat(rotation[None], 4, 0), centres, tiles=(1, 6, 6))
    for kind, per_um3, radii, thickness in (("lyso", 0.12, (120, 220), 8.0), ("ld", 0.06, (120, 260), 4.0),
                                            ("endo", 0.2, (80, 160), 8.0), ("perox", 0.14, (80, 140), 7.0)):
        d.spheres(kind, thickness, rng.uniform(*radii, count(per_um3)))
    n = count(1.15)                         # ER sheets
    semis = np.stack([rng.uniform(20, 28, n), rng.uniform(250, 450, n), rng.uniform(250, 450, n)], 1)
    d.ellipsoids("er", 8.0, semis, _rotations(rng, n), tiles=(1, 6, 6))
    n = count(5.8)                          # ER tubes
    tube_radii, half_lengths, axes = rng.uniform(25, 40, n), rng.uniform(150, 400, n), unit_vectors(rng, n)
    tube_centres = d.capsules("er", 8.0, tube_radii, half_lengths, axes, tiles=8)
    n_mt = count(0.6)
    d.capsules("mt", 5.0, np.full(n_mt, 12.5), rng.uniform(300, 520, n_mt), unit_vectors(rng, n_mt), tiles=12)
    exit_radii = rng.uniform(30, 45, n)     # ER exit sites at some tube ends
    exit_centres = tube_centres + axes * (half_lengths + tube_radii + 0.6 * exit_radii)[:, None]
    inside = np.all((exit_centres - exit_radii[:, None] >= origin) &
                    (exit_centres + exit_radii[:, None] <= origin + site_nm), axis=1)
    chosen = (rng.random(n) < 0.3) & inside
    d.spheres("eres", 8.0, exit_radii[chosen], exit_centres[chosen])
    d.spheres("ves", 6.0, rng.uniform(18, 35, count(13.9)))
    return d.table()


def _box_voxels(starts: np.ndarray, stops: np.ndarray):
    """Every voxel of each box [start, stop): (box row, z, y, x index), boxes in order."""
    lengths = stops - starts
    sizes = lengths.prod(1)
    row = np.repeat(np.arange(len(sizes)), sizes)
    local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    plane = (lengths[:, 1] * lengths[:, 2])[row]
    iz, rest = np.divmod(local, plane)
    iy, ix = np.divmod(rest, lengths[row, 2])
    return row, iz + starts[row, 0], iy + starts[row, 1], ix + starts[row, 2]


def _signed_distance(p: np.ndarray, dz, dy, dx) -> np.ndarray:
    """Signed distances for float32 parameter rows `p` [n, FLOATS] at offsets [n] from their centres, or for
    one row [FLOATS] at broadcasting offsets."""
    rot = p[..., ROTATION]
    local = [dz * rot[..., a] + dy * rot[..., 3 + a] + dx * rot[..., 6 + a] for a in range(3)]
    capsule = p[..., HALF_LENGTH] > 0
    if p.ndim == 1 and capsule:
        return _capsule_distance(p, local[0], dz, dy, dx)
    q2 = sum((local[a] / p[..., SEMI][..., a]) ** 2 for a in range(3))
    sd = (np.sqrt(q2) - 1) * p[..., CORE]
    if p.ndim == 2 and capsule.any():
        sd[capsule] = _capsule_distance(p[capsule], local[0][capsule], dz[capsule], dy[capsule], dx[capsule])
    return sd


def _capsule_distance(p, along, dz, dy, dx):
    """`along` is the offset along the capsule's axis (its rotation's column 0)."""
    half = p[..., HALF_LENGTH]
    beyond = np.maximum(np.abs(along) - half, 0)
    radial2 = np.maximum(dz * dz + dy * dy + dx * dx - along * along, 0)
    return np.sqrt(radial2 + beyond * beyond) - p[..., CORE]


def _boxes(axes, centres: np.ndarray, extents: np.ndarray):
    starts = np.stack([np.searchsorted(c, centres[:, a] - extents[:, a], "left") for a, c in enumerate(axes)], 1)
    stops = np.stack([np.searchsorted(c, centres[:, a] + extents[:, a], "right") for a, c in enumerate(axes)], 1)
    return starts, stops


def _runs(starts, stops):
    """Rows with non-empty boxes, in order, as runs: a big box alone, consecutive small ones together up to
    BATCH_VOXELS."""
    rows = np.nonzero(np.all(stops > starts, axis=1))[0]
    sizes = (stops[rows] - starts[rows]).prod(1)
    big = sizes > BIG_BOX
    # a run key that changes at every big box and every BATCH_VOXELS of small ones
    part = np.cumsum(np.where(big, 0, sizes)) // BATCH_VOXELS
    key = np.where(big, -1 - np.arange(len(rows)), np.cumsum(big) * (len(rows) + 1) + part)
    cuts = np.nonzero(np.diff(key))[0] + 1
    return np.split(rows, cuts) if len(rows) else []


def _candidates(shape, starts, stops, rows):
    """The voxels of the boxes of `rows`: (row of each, flat voxel index, (z, y, x) indices)."""
    box_row, iz, iy, ix = _box_voxels(starts[rows], stops[rows])
    return rows[box_row], (iz * shape[1] + iy) * shape[2] + ix, (iz, iy, ix)


def paint_bodies(atomic: np.ndarray, cell: np.ndarray, body: np.ndarray, axes, table: BodyTable,
                 cells: np.ndarray, first_index: int) -> None:
    """Paint the bodies of `table` (in order) onto the scene arrays (C-contiguous, shape of the axes):
    `cells` = the scene's cell value of each row's body, whose voxels get body value first_index + its head row.
    The tiles of one body share its shape, so whichever paints a voxel paints it alike."""
    shape = atomic.shape
    flat_atomic, flat_cell, flat_body = atomic.reshape(-1), cell.reshape(-1), body.reshape(-1)
    params = table.floats
    no_claim = np.iinfo(np.int32).max
    claim = np.full(flat_atomic.size, no_claim, np.int32)
    starts, stops = _boxes(axes, table.floats[:, BOX_CENTRE], table.floats[:, EXTENT])
    for rows in _runs(starts, stops):
        if len(rows) == 1 and (stops[rows[0]] - starts[rows[0]]).prod() > BIG_BOX:
            _paint_one(atomic, cell, body, axes, table, params, rows[0], starts[rows[0]], stops[rows[0]],
                       cells[rows[0]], first_index)
            continue
        row, voxel, index = _candidates(shape, starts, stops, rows)
        offsets = [(axes[a][i] - table.floats[row, a]).astype(np.float32) for a, i in enumerate(index)]
        sd = _signed_distance(params[row], *offsets)
        free = (sd < 0) & (flat_atomic[voxel] == CYTO) & (flat_cell[voxel] == cells[row])
        row, voxel, sd = row[free], voxel[free], sd[free]
        np.minimum.at(claim, voxel, row.astype(np.int32))   # the earliest body claims a voxel several reach
        won = claim[voxel] == row
        row, voxel, sd = row[won], voxel[won], sd[won]
        claim[voxel] = no_claim
        flat_atomic[voxel] = np.where(sd < -params[row, THICKNESS], table.ints[row, LUMEN], table.ints[row, MEMBRANE])
        flat_body[voxel] = first_index + table.ints[row, HEAD]
    _paint_granules(flat_atomic, flat_body, axes, shape, table, first_index)


def _paint_one(atomic, cell, body, axes, table: BodyTable, params, row, start, stop, own_cell, first_index) -> None:
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    offsets = [(c[s] - table.floats[row, a]).astype(np.float32) for a, (c, s) in enumerate(zip(axes, box))]
    sd = _signed_distance(params[row], offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :])
    sd = np.broadcast_to(sd, tuple(b - a for a, b in zip(start, stop)))
    here = atomic[box]
    inside = (sd < 0) & (here == CYTO) & (cell[box] == own_cell)
    here[inside] = np.where(sd[inside] < -params[row, THICKNESS], table.ints[row, LUMEN], table.ints[row, MEMBRANE])
    body[box][inside] = first_index + table.ints[row, HEAD]


def _paint_granules(flat_atomic, flat_body, axes, shape, table: BodyTable, first_index: int) -> None:
    """Ribosome granules: small spheres that turn their mitochondrion's lumen into mito_ribo."""
    if not len(table.granule_rows):
        return
    radius = table.granules[:, 3]
    starts, stops = _boxes(axes, table.granules[:, :3], np.repeat(radius[:, None], 3, 1))
    for rows in _runs(starts, stops):
        row, voxel, index = _candidates(shape, starts, stops, rows)
        d2 = sum((axes[a][i] - table.granules[row, a]) ** 2 for a, i in enumerate(index))
        granule = (d2 < radius[row] ** 2) & (flat_atomic[voxel] == MITO_LUM) & \
                  (flat_body[voxel] == first_index + table.granule_rows[row])
        flat_atomic[voxel[granule]] = MITO_RIBO
