"""The mock download's world: one deterministic 3D scene per dataset, in nanometres, that can be evaluated
at the voxel centres of any grid, so every label array and every raw EM level is painted from the same
objects and they agree at any scale.

The scene is analytic and generated lazily from (seed, dataset, lattice site), so any box is evaluated on
its own, in any order, with the same result:
- cells: the Voronoi tiling of jittered lattice seeds (CELL_SPACING_NM apart); every boundary is an
  extracellular gap (ecs) lined on both sides by plasma membrane (pm);
- one nucleus per cell, an ellipsoid well inside it: a double envelope (ne_mem, ne_lum, ne_mem) pierced by
  pores (np_out ring, np_in channel), a nucleolus, heterochromatin under the envelope and in patches,
  euchromatin, nucleoplasm;
- anchors: for (nearly) every training crop of the dataset, a cell whose nucleus surface crosses the crop
  near its centre (it replaces the lattice seeds that would crowd it), so a crop, however small, holds
  nucleus and cytoplasm, as annotated crops usually do;
- cytoplasm: a lattice of SUBCELL_NM sites, each holding organelles (mock_bodies.py) whose core lies in
  cytoplasm clear of the nucleus and the cell boundary; the rest is cytosol (cyto).

`World.evaluate` gives a `Scene`: per voxel the atomic class id (classes.csv), which cell (and nucleus) and
which organelle or pore it belongs to, with the objects' 64-bit ids; `IdSpace` turns those into small
per-crop ids; `render_raw` makes EM-like grey levels (dark membranes, distinct lumens, noise).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from crop_manifest import CropRow, read_class_table
from mock_bodies import CLASS_IDS as _CLASS_IDS, CELL, CENTRE, CORE, CYTO, GID, HEAD, BodyTable, draft_bodies, \
    paint_bodies, unit_vectors

ECS, PM = _CLASS_IDS["ecs"], _CLASS_IDS["pm"]
NE_MEM, NE_LUM, NP_OUT, NP_IN = (_CLASS_IDS[n] for n in ("ne_mem", "ne_lum", "np_out", "np_in"))
HCHROM, ECHROM, NUCPL, NUCLEO = (_CLASS_IDS[n] for n in ("hchrom", "echrom", "nucpl", "nucleo"))
NUCLEUS_IDS = read_class_table()["nuc"].atomic_ids

# Mean EM grey level of each atomic class: membranes dark, lumens distinct, extracellular space bright.
GREY = {"ecs": 205, "pm": 55, "cyto": 150, "mito_mem": 50, "mito_lum": 100, "mito_ribo": 35, "golgi_mem": 58,
        "golgi_lum": 178, "ves_mem": 62, "ves_lum": 188, "endo_mem": 58, "endo_lum": 122, "lyso_mem": 52,
        "lyso_lum": 82, "ld_mem": 70, "ld_lum": 218, "er_mem": 60, "er_lum": 138, "eres_mem": 60,
        "eres_lum": 132, "ne_mem": 48, "ne_lum": 128, "np_out": 40, "np_in": 92, "hchrom": 68, "echrom": 104,
        "nucpl": 118, "nucleo": 84, "mt_out": 45, "mt_in": 142, "perox_mem": 56, "perox_lum": 96}
GREY_LUT = np.zeros(256, np.float32)
for _name, _grey in GREY.items():
    GREY_LUT[_CLASS_IDS[_name]] = _grey

CELL_SPACING_NM = 8000.0
SEED_JITTER = 0.2                    # fraction of the spacing a lattice seed moves from its site's centre
NUCLEUS_RADIUS_NM = (2000.0, 2800.0)
MIN_NUCLEUS_RADIUS_NM = 700.0        # a cell squeezed smaller than this shows no nucleus
CLEARANCE_NM = 300.0                 # nucleus to cell boundary, at least
ECS_HALF_WIDTH_NM = 25.0
PM_THICKNESS_NM = 9.0
ENVELOPE_NM = (8.0, 32.0, 40.0)      # outer ne_mem ends, ne_lum ends, inner ne_mem ends (depth below surface)
PORE_SPACING_NM, PORE_RADIUS_NM, PORE_CHANNEL_NM = 400.0, 50.0, 25.0
PERIPHERAL_CHROMATIN_NM = 120.0
SUBCELL_NM = 2000.0
ORGANELLE_CLEARANCE_NM = 25.0        # organelle to nucleus / plasma membrane, at least
ANCHOR_OFFSET = 0.2                  # crop centre to its anchor nucleus's surface, in crop extents
ANCHOR_TRIES = 24
TILE = 32                            # voxels per axis of the smallest boxes of the cell tiling

# 64-bit object ids: lattice site (i, j, k), offset to be non-negative, then an index within the site.
_SITE_SPAN, _SITE_OFFSET = 1 << 16, 1 << 15
CELLS_PER_SITE = 16                  # the lattice seed and up to 15 anchors
BODIES_PER_SITE = 512
PORES_PER_NUCLEUS = 1024


def _site_key(i: int, j: int, k: int) -> int:
    return ((i + _SITE_OFFSET) * _SITE_SPAN + (j + _SITE_OFFSET)) * _SITE_SPAN + (k + _SITE_OFFSET)


def _object_id(site: tuple[int, int, int], index: int, per_site: int) -> int:
    return _site_key(*site) * per_site + index + 1     # 0 stays "no object"


@dataclass(frozen=True)
class IdSpace:
    """How one kind of object id is built, and its translation into small ids unique within a crop."""

    source: str              # the Scene field holding the objects: "cell" or "body"
    spacing_nm: float        # the lattice whose sites own the objects
    per_site: int
    reach: int               # sites beyond a box whose objects may still reach into it
    carriers: frozenset      # atomic ids of the voxels whose `source` object is of this kind

    def window(self, lo_nm: Sequence[float], hi_nm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """First site and site count per axis of every object that can touch the box [lo, hi)."""
        first = np.floor(np.asarray(lo_nm) / self.spacing_nm).astype(np.int64) - self.reach
        last = np.floor(np.asarray(hi_nm) / self.spacing_nm).astype(np.int64) + self.reach
        return first, last - first + 1

    def capacity(self, window) -> int:
        return int(np.prod(window[1])) * self.per_site

    def ids(self, scene: "Scene", window=None, base: int = 0) -> np.ndarray:
        """Per voxel carrying an object of this kind: its 64-bit id, or with a `window` `base` + the object's
        rank in the window; 0 elsewhere. ValueError for an object outside the window."""
        index = getattr(scene, self.source)
        table = getattr(scene, f"{self.source}_ids")
        carries = np.zeros(256, bool)
        carries[list(self.carriers)] = True
        index = np.where(carries[scene.atomic], index, 0)
        if window is not None:
            first, count = window
            site, within = np.divmod(np.maximum(table - 1, 0), self.per_site)
            rest, k = np.divmod(site, _SITE_SPAN)
            i, j = np.divmod(rest, _SITE_SPAN)
            i, j, k = i - _SITE_OFFSET - first[0], j - _SITE_OFFSET - first[1], k - _SITE_OFFSET - first[2]
            used = np.bincount(index.reshape(-1), minlength=len(table)) > 0
            used[0] = False
            if np.any(used & ((i < 0) | (i >= count[0]) | (j < 0) | (j >= count[1]) | (k < 0) | (k >= count[2]))):
                raise ValueError("an object reaches beyond its id window; widen IdSpace.reach")
            table = np.where(used, base + ((i * count[1] + j) * count[2] + k) * self.per_site + within, 0)
        return table[index]


@dataclass
class Scene:
    """A world evaluated on a grid. `cell` and `body` index the id tables `cell_ids` and `body_ids` (entry 0
    = none): the cell (and nucleus) and the organelle or nuclear pore of each voxel."""

    atomic: np.ndarray       # uint8 atomic class ids
    cell: np.ndarray         # int32
    body: np.ndarray         # int32
    cell_ids: np.ndarray     # int64
    body_ids: np.ndarray     # int64


CELL_IDS = IdSpace("cell", CELL_SPACING_NM, CELLS_PER_SITE, reach=2, carriers=frozenset(range(1, 256)))
PORE_IDS = IdSpace("body", CELL_SPACING_NM, CELLS_PER_SITE * PORES_PER_NUCLEUS, reach=2,
                   carriers=frozenset({NP_OUT, NP_IN}))
BODY_IDS = IdSpace("body", SUBCELL_NM, BODIES_PER_SITE, reach=0,
                   carriers=frozenset(range(1, 256)) - NUCLEUS_IDS - {ECS, PM, CYTO})
INSTANCE_ID_SPACES = {"nuc": CELL_IDS, "cell": CELL_IDS, "np": PORE_IDS}   # every other instance class: BODY_IDS


@dataclass(frozen=True)
class Nucleus:
    cell: int
    centre: np.ndarray
    semi: np.ndarray
    nucleolus_centre: np.ndarray
    nucleolus_radius: float

    def scaled_radius2(self, dz, dy, dx):
        """(offset / semi-axis)^2 summed over the axes, < 1 inside, for 1D offsets per axis (broadcast)."""
        return ((dz / float(self.semi[0])) ** 2)[:, None, None] + ((dy / float(self.semi[1])) ** 2)[None, :, None] + \
            ((dx / float(self.semi[2])) ** 2)[None, None, :]


@dataclass(frozen=True)
class Seeds:
    """Cell seeds: positions [n, 3], cell ids [n], nuclei (None for a cell without one) and, for vectorised
    tests, nucleus centres and semi-axes [n, 3] (NaN without a nucleus)."""

    positions: np.ndarray
    gids: np.ndarray
    nuclei: tuple
    nucleus_centres: np.ndarray
    nucleus_semis: np.ndarray


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))


def _sole_owner(positions: np.ndarray, candidates: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """The seed owning all of the box [lo, hi] with no plasma membrane in it, else None: the box lies on the
    seed's side of its bisector plane with every other candidate, farther than ECS and membrane."""
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    owner = candidates[np.argmin(np.linalg.norm(positions[candidates] - centre, axis=1))]
    others = positions[candidates[candidates != owner]]
    normal = others - positions[owner]
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    middle = (others + positions[owner]) / 2
    reach = normal @ centre + np.abs(normal) @ half - np.sum(normal * middle, axis=1)
    return owner if np.all(reach < -(ECS_HALF_WIDTH_NM + PM_THICKNESS_NM)) else None


class World:
    """The scene of one dataset; `anchor_crops` are the dataset's training crops (all of them, so the scene
    does not depend on which crops a mock holds)."""

    def __init__(self, dataset: str, seed: int, anchor_crops: Sequence[CropRow]):
        self.dataset, self.seed = dataset, seed
        self.key = zlib.crc32(dataset.encode())
        waves = np.random.default_rng([seed, self.key, 3])
        self._waves = [(direction * 2 * np.pi / waves.uniform(250, 600), waves.uniform(0, 2 * np.pi))
                       for direction in unit_vectors(waves, 4)]
        self._anchors: dict[tuple[int, int, int], list[Nucleus]] = {}
        self._place_anchors(sorted(anchor_crops, key=lambda c: c.crop_id))
        self._lattice_seed = lru_cache(maxsize=16384)(self._lattice_seed_uncached)
        self._site_seeds = lru_cache(maxsize=8192)(self._site_seeds_uncached)
        self._neighbourhood = lru_cache(maxsize=256)(self._neighbourhood_uncached)
        self._site_bodies = lru_cache(maxsize=1024)(self._site_bodies_uncached)

    # --- cells and nuclei ------------------------------------------------------------------------------
    def _place_anchors(self, crops: Sequence[CropRow]) -> None:
        """One nucleus per crop, its surface crossing the crop a fifth of the crop's least extent from the
        centre (so the crop holds more cytoplasm than nucleus); several directions are tried so that it keeps
        clear of the nuclei placed for earlier crops. A crop for which none fits gets no anchor."""
        placed: list[Nucleus] = []
        for crop in crops:
            rng = np.random.default_rng([self.seed, self.key, 2, crop.crop_id])
            radius = rng.uniform(*NUCLEUS_RADIUS_NM)
            semi = radius * rng.uniform(0.85, 1.0, 3)
            semi[int(np.argmax(semi))] = radius
            lo, hi = crop.box_nm()
            offset = ANCHOR_OFFSET * min(b - a for a, b in zip(lo, hi))
            for u in unit_vectors(rng, ANCHOR_TRIES):
                reach = 1.0 / np.sqrt(np.sum((u / semi) ** 2))       # centre to surface along u
                centre = np.asarray(crop.centre_nm()) + (reach + offset) * u
                if all(np.linalg.norm(centre - n.centre) >= 2 * (max(radius, n.semi.max()) + CLEARANCE_NM)
                       for n in placed):
                    break
            else:
                continue
            site = tuple(int(v) for v in np.floor(centre / CELL_SPACING_NM))
            bucket = self._anchors.setdefault(site, [])
            if len(bucket) == CELLS_PER_SITE - 1:
                continue
            nucleolus = centre + 0.3 * radius * unit_vectors(rng, 1)[0]
            nucleus = Nucleus(_object_id(site, len(bucket) + 1, CELLS_PER_SITE), centre, semi, nucleolus,
                              0.28 * radius)
            bucket.append(nucleus)
            placed.append(nucleus)

    def _nearby_anchors(self, site) -> list[Nucleus]:
        i, j, k = site
        return [n for di in (-1, 0, 1) for dj in (-1, 0, 1) for dk in (-1, 0, 1)
                for n in self._anchors.get((i + di, j + dj, k + dk), ())]

    def _lattice_seed_uncached(self, site):
        """The site's own seed (position, nominal nucleus) or None where an anchor took its place."""
        rng = np.random.default_rng([self.seed, self.key, 0, _site_key(*site)])
        position = (np.asarray(site) + 0.5 + rng.uniform(-SEED_JITTER, SEED_JITTER, 3)) * CELL_SPACING_NM
        radius = rng.uniform(*NUCLEUS_RADIUS_NM)
        shape, offset = rng.uniform(0.85, 1.0, 3), unit_vectors(rng, 1)[0]
        if any(np.linalg.norm(position - a.centre) < 2 * (a.semi.max() + CLEARANCE_NM)
               for a in self._nearby_anchors(site)):
            return None
        return position, radius, shape, offset

    def _site_seeds_uncached(self, site) -> tuple[tuple[np.ndarray, int, Nucleus | None], ...]:
        """(position, cell id, nucleus) of every seed of a lattice site."""
        seeds = [(a.centre, a.cell, a) for a in self._anchors.get(site, ())]
        own = self._lattice_seed(site)
        if own is not None:
            position, nominal, shape, offset = own
            i, j, k = site
            others = [p for di in (-1, 0, 1) for dj in (-1, 0, 1) for dk in (-1, 0, 1) if (di, dj, dk) != (0, 0, 0)
                      for p in [self._lattice_seed((i + di, j + dj, k + dk))] if p is not None]
            nearest = min([np.linalg.norm(position - p[0]) for p in others] +
                          [np.linalg.norm(position - a.centre) for a in self._nearby_anchors(site)])
            radius = min(nominal, nearest / 2 - CLEARANCE_NM)
            gid = _object_id(site, 0, CELLS_PER_SITE)
            nucleus = None
            if radius >= MIN_NUCLEUS_RADIUS_NM:
                semi = radius * shape / shape.max()
                nucleus = Nucleus(gid, position, semi, position + 0.3 * radius * offset, 0.28 * radius)
            seeds.append((position, gid, nucleus))
        return tuple(seeds)

    def _seeds(self, lo, hi) -> Seeds:
        """Every seed of the lattice sites overlapping [lo, hi]."""
        first = np.floor(np.asarray(lo) / CELL_SPACING_NM).astype(int)
        last = np.floor(np.asarray(hi) / CELL_SPACING_NM).astype(int)
        seeds = [s for i in range(first[0], last[0] + 1) for j in range(first[1], last[1] + 1)
                 for k in range(first[2], last[2] + 1) for s in self._site_seeds((i, j, k))]
        nuclei = tuple(s[2] for s in seeds)
        nan = np.full(3, np.nan)
        return Seeds(np.array([s[0] for s in seeds]), np.array([s[1] for s in seeds], np.int64), nuclei,
                     np.array([nan if n is None else n.centre for n in nuclei]),
                     np.array([nan if n is None else n.semi for n in nuclei]))

    def _neighbourhood_uncached(self, site) -> Seeds:
        """The seeds of the 5 x 5 x 5 lattice sites around `site`: all that can own a point of `site`."""
        centre = (np.asarray(site) + 0.5) * CELL_SPACING_NM
        return self._seeds(centre - 2 * CELL_SPACING_NM, centre + 2 * CELL_SPACING_NM)

    def cells_at(self, points: np.ndarray):
        """For points [n, 3] close together: owning cell id, distance to the cell boundary, signed distance
        to the owner's nucleus (inf without one)."""
        seeds = self._neighbourhood(tuple(int(v) for v in np.floor(points.mean(0) / CELL_SPACING_NM)))
        d = np.linalg.norm(points[:, None, :] - seeds.positions[None], axis=2)
        order = np.argpartition(d, 1, axis=1)
        first, second = order[:, 0], order[:, 1]
        rows = np.arange(len(points))
        separation = np.linalg.norm(seeds.positions[first] - seeds.positions[second], axis=1)
        boundary = np.abs(d[rows, second] ** 2 - d[rows, first] ** 2) / (2 * separation)
        semi = seeds.nucleus_semis[first]
        q = np.sqrt(np.sum(((points - seeds.nucleus_centres[first]) / semi) ** 2, axis=1))
        nucleus = np.where(np.isnan(q), np.inf, (q - 1) * semi.min(axis=1))
        return seeds.gids[first], boundary, nucleus

    # --- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, organelles: bool = True) -> Scene:
        """The scene at the voxel centres z x y x (increasing nm). Without `organelles` only the nuclei are
        painted (cells inside them, cyto elsewhere): enough for arrays of nucleus classes, and much faster."""
        axes = (z, y, x)
        shape = (len(z), len(y), len(x))
        lo, hi = np.array([z[0], y[0], x[0]]), np.array([z[-1], y[-1], x[-1]])
        seeds = self._seeds(lo - 2 * CELL_SPACING_NM, hi + 2 * CELL_SPACING_NM)
        scene = Scene(np.full(shape, CYTO, np.uint8), np.zeros(shape, np.int32), np.zeros(shape, np.int32),
                      np.concatenate([[0], seeds.gids]), np.zeros(1, np.int64))
        if organelles:
            separation = np.linalg.norm(seeds.positions[:, None] - seeds.positions[None], axis=2)
            self._paint_cells(scene, axes, (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2])),
                              seeds.positions, np.arange(len(seeds.positions)), separation)
        touching = np.all((seeds.nucleus_centres + seeds.nucleus_semis >= lo) &
                          (seeds.nucleus_centres - seeds.nucleus_semis <= hi), axis=1)   # False where NaN
        body_ids = [scene.body_ids]
        for n in np.nonzero(touching)[0]:
            pores = self._paint_nucleus(scene, axes, seeds.nuclei[n], int(n) + 1, sum(len(t) for t in body_ids))
            body_ids.append(pores)
        if organelles:
            first, last = np.floor(lo / SUBCELL_NM).astype(int), np.floor(hi / SUBCELL_NM).astype(int)
            table = BodyTable.join([self._site_bodies((i, j, k)) for i in range(first[0], last[0] + 1)
                                    for j in range(first[1], last[1] + 1) for k in range(first[2], last[2] + 1)])
            order = np.argsort(seeds.gids)
            found = np.minimum(np.searchsorted(seeds.gids[order], table.ints[:, CELL]), len(order) - 1)
            cells = np.where(seeds.gids[order][found] == table.ints[:, CELL], order[found] + 1, -1)
            paint_bodies(scene.atomic, scene.cell, scene.body, axes, table, cells, sum(len(t) for t in body_ids))
            body_ids.append(table.ints[:, GID])
        scene.body_ids = np.concatenate(body_ids).astype(np.int64)
        return scene

    def _paint_cells(self, scene: Scene, axes, box, positions, candidates, separation) -> None:
        """ECS and plasma membrane along the Voronoi faces, and cells, over `box` (an octree: a box that one
        cell owns with no membrane in it is filled at once, the others are split down to TILE voxels). Only
        the seeds that can be nearest or second nearest somewhere in a box are measured there."""
        coords = [a[s] for a, s in zip(axes, box)]
        lo, hi = np.array([c[0] for c in coords]), np.array([c[-1] for c in coords])
        here = positions[candidates]
        near = np.linalg.norm(here - np.clip(here, lo, hi), axis=1)
        far = np.linalg.norm(np.maximum(np.abs(here - lo), np.abs(here - hi)), axis=1)
        candidates = candidates[near <= np.partition(far, 1)[1]]
        owner = _sole_owner(positions, candidates, lo, hi)
        if owner is not None:
            scene.cell[box] = owner + 1
            return
        if max(len(c) for c in coords) > TILE:
            halves = [[s] if s.stop - s.start <= TILE else
                      [slice(s.start, (s.start + s.stop) // 2), slice((s.start + s.stop) // 2, s.stop)] for s in box]
            for sz in halves[0]:
                for sy in halves[1]:
                    for sx in halves[2]:
                        self._paint_cells(scene, axes, (sz, sy, sx), positions, candidates, separation)
            return
        shape = tuple(len(c) for c in coords)
        d1, d2 = np.full(shape, np.inf, np.float32), np.full(shape, np.inf, np.float32)
        o1, o2 = np.zeros(shape, np.intp), np.zeros(shape, np.intp)
        for c in candidates:
            sq = [((coords[a] - positions[c, a]) ** 2).astype(np.float32) for a in range(3)]
            d = sq[0][:, None, None] + sq[1][None, :, None] + sq[2][None, None, :]
            closer, second = d < d1, d < d2
            o2 = np.where(closer, o1, np.where(second, c, o2))
            d2 = np.where(closer, d1, np.minimum(d2, d))
            o1 = np.where(closer, c, o1)
            d1 = np.minimum(d1, d)
        # distance to the bisector plane of the nearest two seeds (exact on the cell's faces)
        boundary = (d2 - d1) / (2 * separation[o1, o2]).astype(np.float32)
        ecs = boundary < ECS_HALF_WIDTH_NM
        atomic = scene.atomic[box]
        atomic[ecs] = ECS
        atomic[~ecs & (boundary < ECS_HALF_WIDTH_NM + PM_THICKNESS_NM)] = PM
        scene.cell[box] = np.where(ecs, 0, o1 + 1)

    def _chromatin(self, z, y, x) -> np.ndarray:
        """A smooth texture of unit spread (a few plane waves) that places chromatin inside nuclei."""
        total = np.zeros((len(z), len(y), len(x)), np.float32)
        for k, phase in self._waves:
            parts = [((k[a] * c + (phase if a == 0 else 0.0)) % (2 * np.pi)).astype(np.float32)
                     for a, c in enumerate((z, y, x))]
            total += np.cos(parts[0][:, None, None] + (parts[1][:, None] + parts[2][None, :])[None])
        return total * np.float32(1 / np.sqrt(len(self._waves) / 2))

    def _paint_nucleus(self, scene: Scene, axes, n: Nucleus, cell: int, first_pore: int) -> np.ndarray:
        """Paint one nucleus (its voxels get `cell`, its pores body values from `first_pore`); returns the
        pores' ids."""
        box = tuple(_index_range(c, n.centre[a] - n.semi[a], n.centre[a] + n.semi[a]) for a, c in enumerate(axes))
        offsets = [(c[s] - n.centre[a]).astype(np.float32) for a, (c, s) in enumerate(zip(axes, box))]
        q2 = n.scaled_radius2(*offsets)
        inside = q2 < 1
        if not inside.any():
            return np.zeros(0, np.int64)
        outer, lumen, inner = ENVELOPE_NM
        to_nucleolus = [(o - np.float32(n.nucleolus_centre[a] - n.centre[a])) ** 2 for a, o in enumerate(offsets)]
        nucleolus = (to_nucleolus[0][:, None, None] + to_nucleolus[1][None, :, None] + to_nucleolus[2][None, None, :]
                     < np.float32(n.nucleolus_radius ** 2))
        noise = self._chromatin(*(c[s] for c, s in zip(axes, box)))
        values = np.where(noise > 0.9, HCHROM, np.where(noise > 0.3, ECHROM, NUCPL)).astype(np.uint8)
        values[np.broadcast_to(nucleolus, values.shape)] = NUCLEO
        # the envelope and the peripheral heterochromatin, on the outer shell only (depth needs a sqrt)
        shell = np.nonzero(inside & (q2 > (1 - (inner + PERIPHERAL_CHROMATIN_NM) / n.semi.min()) ** 2))
        depth = (1 - np.sqrt(q2[shell])) * np.float32(n.semi.min())
        layer = np.select([depth < outer, depth < lumen, depth < inner], [NE_MEM, NE_LUM, NE_MEM], 0)
        layer[(layer == 0) & (noise[shell] > -0.4) & (values[shell] != NUCLEO)] = HCHROM
        changed = layer != 0
        values[tuple(s[changed] for s in shell)] = layer[changed]
        pores = np.zeros(values.shape, np.int32)
        on_envelope = tuple(s[depth < inner] for s in shell)
        channel, in_pore, index = self._pores(n, offsets, on_envelope)
        pore_voxels = tuple(s[in_pore] for s in on_envelope)
        values[pore_voxels] = np.where(channel, NP_IN, NP_OUT)
        pores[pore_voxels] = first_pore + index
        scene.atomic[box][inside] = values[inside]
        scene.cell[box][inside] = cell
        scene.body[box][inside] = pores[inside]
        return (n.cell - 1) * PORES_PER_NUCLEUS + np.arange(PORES_PER_NUCLEUS, dtype=np.int64) + 1

    @staticmethod
    def _pores(n: Nucleus, offsets, shell):
        """Nuclear pores on a grid of cells in (polar angle, azimuth) about PORE_SPACING_NM apart, one pore at
        the centre of each: for the envelope voxels `shell`, (in the channel, in a pore, pore index) of those
        inside a pore."""
        w = np.stack([offsets[a][shell[a]] / np.float32(n.semi[a]) for a in range(3)])
        w /= np.maximum(np.linalg.norm(w, axis=0), 1e-12)
        theta, phi = np.arccos(np.clip(w[0], -1, 1)), np.arctan2(w[1], w[2])
        radius = float(n.semi.max())
        step = PORE_SPACING_NM / radius
        rings = max(2, int(round(np.pi / step)))
        ring_theta = (np.arange(rings) + 0.5) * np.pi / rings
        per_ring = np.maximum(1, np.round(2 * np.pi * np.sin(ring_theta) / step)).astype(int)
        first_of_ring = np.concatenate([[0], np.cumsum(per_ring)])
        ring = np.minimum((theta / (np.pi / rings)).astype(int), rings - 1)
        slots = per_ring[ring]
        slot = np.floor((phi + np.pi) / (2 * np.pi / slots)).astype(int) % slots
        centre_theta, centre_phi = ring_theta[ring], (slot + 0.5) * 2 * np.pi / slots - np.pi
        cosine = (w[0] * np.cos(centre_theta) + np.sin(centre_theta) *
                  (w[1] * np.sin(centre_phi) + w[2] * np.cos(centre_phi)))
        arc = np.arccos(np.clip(cosine, -1, 1)) * radius
        in_pore = arc < PORE_RADIUS_NM
        return arc[in_pore] < PORE_CHANNEL_NM, in_pore, (first_of_ring[ring] + slot)[in_pore]

    # --- organelles ----------------------------------------------------------------------------------------
    def _site_bodies_uncached(self, site) -> BodyTable:
        """The organelles of one cytoplasm site: drafted at random inside the site, kept where their core lies
        in cytoplasm clear of the nucleus and the cell boundary (what reaches beyond is clipped when painted:
        a body paints only its own cell's cytosol)."""
        rng = np.random.default_rng([self.seed, self.key, 1, _site_key(*site)])
        drafts = draft_bodies(rng, np.asarray(site, float) * SUBCELL_NM, SUBCELL_NM)
        heads = drafts.heads()
        if len(heads) > BODIES_PER_SITE:
            raise ValueError(f"site {site} drafted {len(heads)} bodies, more than BODIES_PER_SITE")
        cells, boundary, nucleus = self.cells_at(drafts.floats[heads, CENTRE])
        core = drafts.floats[heads, CORE]
        kept = (boundary > core + ECS_HALF_WIDTH_NM + PM_THICKNESS_NM + ORGANELLE_CLEARANCE_NM) & \
               (nucleus > core + ORGANELLE_CLEARANCE_NM)
        body = np.searchsorted(heads, drafts.ints[:, HEAD])       # each row's body, in draft order
        drafts.ints[:, GID] = _site_key(*site) * BODIES_PER_SITE + body + 1     # as _object_id
        drafts.ints[:, CELL] = cells[body]
        return drafts.select(heads[kept])


def render_raw(atomic: np.ndarray, rng: np.random.Generator, noise_sd: float) -> np.ndarray:
    """EM-like uint8 from atomic class ids: the class's grey level plus Gaussian noise."""
    grey = GREY_LUT[atomic] + rng.standard_normal(atomic.shape, dtype=np.float32) * np.float32(noise_sd)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
