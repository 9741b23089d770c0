"""The official submission layout: the test manifest, writing the submission zarr, checking it, zipping it.

Layout (rules of official.RULES_VERSION; utils/submission.py, utils/eval_utils/{submission, zip_utils}.py and
utils/matched_crop.py of the challenge repository, read, not copied):

    submission.zarr/                 zarr v2 group (.zgroup)
      crop<N>/                       one group per test crop, N = crop_name of test_crop_manifest.csv
        <label>                      one zarr ARRAY per test label of that crop, (z, y, x)
          .zattrs  {"voxel_size": [z, y, x] nm, "translation": [z, y, x] nm (centre of voxel 0),
                    "shape": [z, y, x] voxels}

Semantic labels are uint8 0/1 (the evaluator counts any value > 0 as positive when the voxel size equals
the truth's, and a rescaled value > 0.5 otherwise); instance labels are integer ids, 0 = background (the
evaluator relabels them into 26-connected components). An array whose voxel size, translation or shape
differs from the manifest is resampled and shifted by the evaluator (official.resample_to_truth); writing
it on the truth's own grid means it is scored as written. The zip holds the zarr's contents at its root
(`.zgroup`, `crop<N>/...`), as the official `zip_submission` writes it; the evaluator unzips it into a
folder and reads that folder as the zarr.

What the evaluator tolerates and `check_submission` still reports: attribute aliases (resolution / scale,
offset) are read, OME-NGFF multiscale groups in place of arrays are read through cellmap-data, and labels
or crops outside the manifest are ignored. A crop or label missing from the submission scores 0 (rule 4 of
official.py).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr
from numcodecs import Blosc

from official import is_instance_class

MANIFEST_HEADER = "crop_name,dataset,class_label,voxel_size,translation,shape"
CHUNK_SIZE = 64                                    # the official writer's chunk edge
COMPRESSOR = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)
ATTRIBUTE_TOLERANCE_NM = 1e-3                      # voxel size / translation agreement with the manifest
VOXEL_SIZE_KEYS = ("voxel_size", "resolution", "scale")   # the evaluator's attribute names, first wins
TRANSLATION_KEYS = ("translation", "offset")


@dataclass(frozen=True)
class ManifestRow:
    """One test crop x label of test_crop_manifest.csv; vectors are (z, y, x), nm or voxels."""

    crop_id: int
    dataset: str
    label: str
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def crop_name(self) -> str:
        return f"crop{self.crop_id}"


def _parse_vector(text: str, kind, where: str) -> tuple:
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"{where}: {text!r} is not a vector: write it as [z;y;x]")
    try:
        values = tuple(kind(v) for v in text[1:-1].split(";"))
    except ValueError:
        raise ValueError(f"{where}: {text!r} holds a non-number: write it as [z;y;x]") from None
    if len(values) != 3:
        raise ValueError(f"{where}: {text!r} has {len(values)} entries: write it as [z;y;x]")
    return values


def read_test_manifest(csv_path: str | os.PathLike) -> list[ManifestRow]:
    """Rows of the official test_crop_manifest.csv: header crop_name,dataset,class_label,voxel_size,
    translation,shape; vectors as [z;y;x]. ValueError naming the file and line for a malformed one."""
    path = Path(csv_path)
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != MANIFEST_HEADER:
        raise ValueError(f"{path}: first line must be the header {MANIFEST_HEADER!r}: is this the test manifest?")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.split(",")
        if len(fields) != 6:
            raise ValueError(f"{where}: {len(fields)} fields, expected 6 ({MANIFEST_HEADER})")
        crop, dataset, label, voxel_size, translation, shape = (f.strip() for f in fields)
        if not crop.isdigit():
            raise ValueError(f"{where}: crop_name {crop!r} is not a crop number (e.g. 557)")
        rows.append(ManifestRow(int(crop), dataset, label, _parse_vector(voxel_size, float, where),
                                _parse_vector(translation, float, where), _parse_vector(shape, int, where)))
    return rows


def _stored_dtype(label: str, dtype) -> np.dtype:
    """The dtype a label is written with: uint8 for semantic labels (bool becomes uint8), an unsigned
    integer for instance ids (bool -> uint8, a signed type -> the unsigned type of its width)."""
    dtype = np.dtype(dtype)
    if is_instance_class(label):
        if dtype == np.bool_:
            return np.dtype(np.uint8)
        if np.issubdtype(dtype, np.integer):
            return np.dtype(f"u{dtype.itemsize}")
        raise ValueError(f"{label}: dtype {dtype} for an instance label: write integer ids (0 = background)")
    if dtype in (np.bool_, np.uint8):
        return np.dtype(np.uint8)
    raise ValueError(f"{label}: dtype {dtype} for a semantic label: write uint8 0/1 (threshold probabilities "
                     f"first; the evaluator counts any value > 0 as positive)")


class SubmissionWriter:
    """Writes `submission.zarr/crop<N>/<label>` arrays with the attributes the evaluator reads.

    `add` writes a whole numpy array (slab by slab, so no converted copy of it is held); `create` returns
    an empty array to be filled slab by slab (e.g. `array[z0:z1] = ids`) for crops too large for memory.
    Arrays are chunked 64^3 and Blosc-zstd compressed. An existing label is replaced only with overwrite=True.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.suffix != ".zarr":
            raise ValueError(f"{self.path}: a submission folder ends with .zarr (its zip is the same name .zip)")
        self.root = zarr.open_group(str(self.path), mode="a")

    def create(self, crop_id: int | str, label: str, shape: Sequence[int], dtype, voxel_size: Sequence[float],
               translation: Sequence[float], overwrite: bool = False) -> zarr.Array:
        """An empty (zero) array for `label` of crop `crop_id` (557 or "crop557") with its attributes."""
        stored = _stored_dtype(label, dtype)
        shape, voxel_size, translation = (tuple(int(n) for n in shape), [float(v) for v in voxel_size],
                                          [float(t) for t in translation])
        if len(shape) != 3 or min(shape) < 1 or len(voxel_size) != 3 or min(voxel_size) <= 0 or len(translation) != 3:
            raise ValueError(f"{label}: shape {shape}, voxel_size {voxel_size}, translation {translation}: pass "
                             f"three positive voxel counts, three positive nm sizes and three nm offsets (z, y, x)")
        crop = str(crop_id) if str(crop_id).startswith("crop") else f"crop{int(crop_id)}"
        group = self.root.require_group(crop)
        if label in group and not overwrite:
            raise ValueError(f"{self.path}/{crop}/{label} is already written: pass overwrite=True to replace it")
        array = group.zeros(label, shape=shape, dtype=stored, chunks=(CHUNK_SIZE,) * 3, compressor=COMPRESSOR,
                            overwrite=True)
        array.attrs.update({"voxel_size": voxel_size, "translation": translation, "shape": list(shape)})
        return array

    def add(self, crop_id: int | str, label: str, array: np.ndarray, voxel_size: Sequence[float],
            translation: Sequence[float], overwrite: bool = False) -> zarr.Array:
        """Write `array` (bool / uint8 0-1 for semantic labels, integer ids for instance labels)."""
        target = self.create(crop_id, label, array.shape, array.dtype, voxel_size, translation, overwrite)
        semantic = not is_instance_class(label)
        for z in range(0, target.shape[0], CHUNK_SIZE):
            slab = np.asarray(array[z:z + CHUNK_SIZE])
            if (semantic and slab.max(initial=0) > 1) or (slab.dtype.kind == "i" and slab.min(initial=0) < 0):
                raise ValueError(f"{label}: values outside {'0/1' if semantic else 'non-negative ids'} in z "
                                 f"{z}..{z + slab.shape[0]}: semantic labels are 0/1, instance ids are >= 0")
            target[z:z + slab.shape[0]] = slab.astype(target.dtype, copy=False)
        return target


def _attribute(attrs, keys: Sequence[str]):
    return next((attrs[k] for k in keys if k in attrs), None)


def _differs(value, expected) -> bool:
    try:
        return not np.allclose(np.asarray(value, dtype=float), expected, rtol=0, atol=ATTRIBUTE_TOLERANCE_NM)
    except (TypeError, ValueError):
        return True


def _array_problems(node, row: ManifestRow) -> list[str]:
    """Problems of one submitted node against its manifest row."""
    name = f"{row.crop_name}/{row.label}"
    if isinstance(node, zarr.Group):
        return [f"{name}: a group, not an array: write one single-scale array with voxel_size/translation attrs"]
    problems = []
    dtype, instance = node.dtype, is_instance_class(row.label)
    if instance and not (dtype == np.bool_ or np.issubdtype(dtype, np.integer)):
        problems.append(f"{name}: dtype {dtype}: instance labels are integer ids (0 = background)")
    if not instance and dtype not in (np.bool_, np.uint8):
        problems.append(f"{name}: dtype {dtype}: semantic labels are uint8 0/1 (any value > 0 counts as positive)")
    for keys, expected in ((VOXEL_SIZE_KEYS, row.voxel_size), (TRANSLATION_KEYS, row.translation)):
        value = _attribute(node.attrs, keys)
        if value is None:
            problems.append(f"{name}: attribute {keys[0]} missing: the evaluator then guesses the placement")
        elif _differs(value, expected):
            problems.append(f"{name}: {keys[0]} {value} != manifest {list(expected)}: the evaluator would resample "
                            f"or shift it; write it on the truth grid")
    if "shape" not in node.attrs:
        problems.append(f"{name}: attribute shape missing: set it to the array's shape {list(node.shape)}")
    elif list(node.attrs["shape"]) != list(node.shape):
        problems.append(f"{name}: attribute shape {node.attrs['shape']} != array shape {list(node.shape)}")
    if tuple(node.shape) != tuple(row.shape):
        problems.append(f"{name}: shape {list(node.shape)} != manifest {list(row.shape)}: the evaluator would crop "
                        f"or pad it")
    return problems


def check_submission(path: str | os.PathLike, manifest_rows: Sequence[ManifestRow]) -> list[str]:
    """One line per layout problem of the submission folder `path` against `manifest_rows`; [] when every
    manifest crop x label is an array that the evaluator reads as written (no resampling, no guessing)."""
    root = Path(path)
    if not root.is_dir():
        return [f"{root}: not a folder: pass the unzipped submission .zarr folder"]
    expected: dict[str, list[ManifestRow]] = {}
    for row in manifest_rows:
        expected.setdefault(row.crop_name, []).append(row)
    problems = []
    for crop, rows in expected.items():
        if not (root / crop).is_dir():
            problems.append(f"{crop}: missing: its {len(rows)} labels score 0")
            continue
        for row in rows:
            node_path = root / crop / row.label
            if not node_path.is_dir():
                problems.append(f"{crop}/{row.label}: missing: scores 0 and stays in the class mean")
                continue
            try:
                node = zarr.open(str(node_path), mode="r")
            except Exception as error:                      # zarr raises several types for unreadable nodes
                problems.append(f"{crop}/{row.label}: not readable as zarr ({type(error).__name__}): rewrite it")
                continue
            problems.extend(_array_problems(node, row))
        known = {row.label for row in rows}
        problems.extend(f"{crop}/{entry.name}: not a test label of {crop} (ignored by the evaluator)"
                        for entry in sorted((root / crop).iterdir())
                        if entry.is_dir() and entry.name not in known)
    problems.extend(f"{entry.name}: not a test crop of the manifest (ignored by the evaluator)"
                    for entry in sorted(root.iterdir())
                    if entry.is_dir() and entry.name not in expected)
    return problems


def zip_submission(path: str | os.PathLike) -> Path:
    """Zip the submission folder into the same name with .zip; members are relative to the zarr root
    (`.zgroup`, `crop<N>/<label>/...`), deflated, in sorted order; no directory entries or links."""
    root = Path(path)
    if not (root / ".zgroup").is_file():
        raise ValueError(f"{root}: no .zgroup: pass the submission .zarr folder written by SubmissionWriter")
    target = root.with_suffix(".zip")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder, subfolders, files in os.walk(root):
            subfolders.sort()
            for name in sorted(files):
                file = Path(folder) / name
                archive.write(file, file.relative_to(root).as_posix())
    return target
