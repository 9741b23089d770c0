"""The official challenge manifests shipped in manifests/ (copied from the challenge repository at 6b9ad68):
the training crops, one `CropRow` per crop with its class list, and the class table (name, id, atomic ids).

Spatial tuples are (z, y, x) in nm; a translation is the centre of voxel 0 (OME-NGFF).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"
TRAIN_CROP_MANIFEST = MANIFEST_DIR / "train_crop_manifest.csv"
CLASS_TABLE = MANIFEST_DIR / "classes.csv"

# Classes the challenge scores as instances (config.INSTANCE_CLASSES at 6b9ad68, whose last entry "instance"
# is a placeholder, not a class). Their arrays hold object ids; every other class is 0/1.
INSTANCE_CLASSES: tuple[str, ...] = ("nuc", "vim", "ves", "endo", "lyso", "ld", "perox", "mito", "np", "mt",
                                     "cell")
# The array of atomic class ids that every downloaded crop holds beside its classes (not in the manifest).
ALL_IDS_ARRAY = "all"


@dataclass(frozen=True)
class CropRow:
    """One training crop: every class of a crop shares its voxel size, translation and shape."""

    crop_id: int
    dataset: str
    classes: tuple[str, ...]                 # in manifest order
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]
    shape: tuple[int, int, int]

    def box_nm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The world box [lo, hi) the crop's voxels cover."""
        lo = tuple(t - v / 2 for t, v in zip(self.translation, self.voxel_size))
        return lo, tuple(a + n * v for a, n, v in zip(lo, self.shape, self.voxel_size))

    def centre_nm(self) -> tuple[float, float, float]:
        lo, hi = self.box_nm()
        return tuple((a + b) / 2 for a, b in zip(lo, hi))


@dataclass(frozen=True)
class ClassEntry:
    name: str
    class_id: int
    atomic_ids: frozenset[int]               # {class_id} for an atomic class

    @property
    def is_composite(self) -> bool:
        return self.atomic_ids != frozenset({self.class_id})


def _vector(text: str, kind):
    return tuple(kind(v) for v in text.strip("[]").split(";"))


@cache
def read_train_crops(path: Path = TRAIN_CROP_MANIFEST) -> dict[int, CropRow]:
    """Every training crop of the manifest by crop id (read once; do not modify the dict); ValueError if a
    crop's rows disagree on geometry."""
    geometry: dict[int, tuple] = {}
    classes: dict[int, list[str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            crop_id = int(row["crop_name"])
            here = (row["dataset"], _vector(row["voxel_size"], float), _vector(row["translation"], float),
                    _vector(row["shape"], int))
            if geometry.setdefault(crop_id, here) != here:
                raise ValueError(f"{path}: crop {crop_id} has rows with different dataset or geometry")
            classes.setdefault(crop_id, []).append(row["class_label"])
    return {crop_id: CropRow(crop_id, ds, tuple(classes[crop_id]), vs, tr, sh)
            for crop_id, (ds, vs, tr, sh) in geometry.items()}


@cache
def read_class_table(path: Path = CLASS_TABLE) -> dict[str, ClassEntry]:
    """The class table by name (read once; do not modify the dict). The file has no header: name, id,
    quoted comma-separated atomic ids."""
    table = {}
    with open(path, newline="") as f:
        for name, class_id, atomic in csv.reader(f):
            ids = frozenset(int(v) for v in atomic.split(",") if v.strip()) or frozenset({int(class_id)})
            table[name] = ClassEntry(name, int(class_id), ids)
    return table
