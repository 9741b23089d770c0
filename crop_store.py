"""The on-disk format of one cached crop, and its integrity: where its files are, how they are written
(per-process temporary names, atomic renames, a lock while one process prepares it), how labels are packed,
and the sizes and checksums that are verified when a run opens it.

One folder per crop, named by a key of its source arrays (cache.crop_key):

    meta.json          written last: geometry, per-class storage, raw source, counts, file sizes and CRC-32s
    raw.npy            uint8 [z, y, x] raw EM at the training scale over the stored raw region
    raw_valid.npy      bit-packed bool: the raw voxels backed by EM chunks that exist (the rest is missing)
    coverage.npy       uint8 [blocks]: raw coverage (0-255) of 16^3-voxel blocks around the crop
    presence.npy       bool [chunks]: which chunks of the raw level exist (raw read on demand)
    label_<class>.npy  bit-packed bool: foreground of one annotated class over its box
    foreground.npy     int32 [N, 4]: class index, z, y, x of sampled foreground voxels (balanced sampling)

Labels are stored only for the classes a crop annotates, one bit per voxel packed along x (np.packbits):
a patch unpacks only the bytes it needs. Missing raw is a mask, never zeros passed off as EM.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from errors import DataError

META_FILE = "meta.json"
CHECKSUM_BLOCK = 1 << 24


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """bool [z, y, x] -> uint8 [z, y, ceil(x / 8)], big-endian bits along x."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=-1)


def unpack_bits(packed: np.ndarray, x0: int, x1: int) -> np.ndarray:
    """bool [..., x1 - x0] from packed bits (any leading slicing already applied): columns x0 .. x1 - 1."""
    first, last = x0 // 8, -(-x1 // 8)
    bits = np.unpackbits(np.asarray(packed[..., first:last]), axis=-1)
    return bits[..., x0 - 8 * first: x1 - 8 * first].astype(bool)


def file_checksum(path: Path) -> int:
    """CRC-32 of the whole file (zlib, ~1 GB/s): cheap enough to verify every crop a run opens."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHECKSUM_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


class CropStore:
    """One crop's cache folder."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @property
    def meta_path(self) -> Path:
        return self.directory / META_FILE

    def read_meta(self) -> dict | None:
        """The crop's metadata, or None if it was never completed."""
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"cache entry {self.directory} is corrupt ({META_FILE} is not valid JSON); delete that "
                            f"folder and run again to rebuild it") from None

    @contextmanager
    def locked(self):
        """Hold this crop's lock (waiting for another process that prepares it), with leftover temporary files
        of an interrupted preparation removed: only the lock holder writes here."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in self.directory.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
            yield

    def _tmp(self, name: str) -> Path:
        return self.directory / f".{name}.{os.getpid()}.tmp"

    def save_array(self, name: str, array: np.ndarray) -> None:
        """Write `name` atomically (a per-process temporary file, then a rename); DataError on a full disk."""
        tmp = self._tmp(name)
        try:
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, self.directory / name)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._write_error(name, err, array.nbytes) from None

    def open_array(self, name: str, shape: tuple[int, ...]) -> np.memmap:
        """A new array file to fill in slabs (for arrays too large to hold at once); `commit(name)` renames it."""
        tmp = self._tmp(name)
        try:
            return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._write_error(name, err, int(np.prod(shape))) from None

    def commit(self, name: str, array: np.memmap) -> None:
        try:
            array.flush()
            os.replace(self._tmp(name), self.directory / name)
        except OSError as err:
            self._tmp(name).unlink(missing_ok=True)
            raise self._write_error(name, err, 0) from None

    def write_meta(self, meta: dict) -> None:
        """Record every data file's size and CRC-32, then write meta.json last (the completion marker)."""
        files = sorted(p.name for p in self.directory.glob("*.npy"))
        meta = dict(meta, files={name: {"bytes": (self.directory / name).stat().st_size,
                                        "crc32": file_checksum(self.directory / name)} for name in files})
        tmp = self._tmp(META_FILE)
        try:
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.meta_path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._write_error(META_FILE, err, 0) from None

    def verify(self, meta: dict) -> None:
        """DataError naming the file and the fix if a data file is missing, truncated or changed."""
        for name, expected in meta.get("files", {}).items():
            path = self.directory / name
            fix = f"delete the cache entry {self.directory} and run again to rebuild it"
            if not path.is_file():
                raise DataError(f"cache file {path} is missing; {fix}")
            if path.stat().st_size != expected["bytes"]:
                raise DataError(f"cache file {path} has {path.stat().st_size} bytes, {expected['bytes']} were "
                                f"written (truncated?); {fix}")
            if file_checksum(path) != expected["crc32"]:
                raise DataError(f"cache file {path} changed since it was written (CRC-32 mismatch); {fix}")

    def load(self, name: str) -> np.ndarray:
        """A data file as a read-only memory map; DataError naming the file if it cannot be read."""
        path = self.directory / name
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"cache file {path} cannot be read ({err}); delete the cache entry {self.directory} "
                            f"and run again to rebuild it") from None

    def _write_error(self, name: str, err: OSError, nbytes: int) -> DataError:
        if err.errno == errno.ENOSPC:
            import shutil

            free = shutil.disk_usage(self.directory).free
            return DataError(f"disk full while writing the crop cache {self.directory / name} (about "
                             f"{nbytes / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free); free space or set "
                             f"$CELLMAP_CACHE_DIR to a larger disk, then run again (finished crops are kept)")
        return DataError(f"cannot write the crop cache {self.directory / name}: {err.strerror}; check the "
                         f"permissions of {self.directory} or set $CELLMAP_CACHE_DIR")
