"""resample.py against independent numpy references: the area rule by midpoint supersampling of each grid
voxel, the nearest rule by explicit centre lookup, chunk presence by listing the files zarr wrote."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from ngff import Level
from resample import apply_area, level_area_maps, nearest_index, present_chunks, present_fraction, read_window

SUB = 400  # supersampling points per grid voxel and axis in the reference


def reference_area(source: np.ndarray, src_scale, src_translation, start, shape, scale):
    """Each grid voxel's average of `source` by midpoint supersampling: per axis, the share of SUB evenly spaced
    points of each grid voxel that fall in each source voxel (points outside the array count for nothing),
    applied axis by axis as a dense matrix (the area rule is separable)."""
    out = source.astype(np.float64)
    for a in range(3):
        points = ((start[a] + np.arange(shape[a]))[:, None] * scale[a] - scale[a] / 2
                  + (np.arange(SUB)[None, :] + 0.5) * scale[a] / SUB)
        index = np.floor((points - src_translation[a]) / src_scale[a] + 0.5).astype(int)
        weights = np.zeros((shape[a], source.shape[a]))
        for j in range(shape[a]):
            inside = index[j][(index[j] >= 0) & (index[j] < source.shape[a])]
            np.add.at(weights[j], inside, 1.0 / SUB)
        out = np.moveaxis(np.tensordot(weights, np.moveaxis(out, a, 0), axes=(1, 0)), 0, a)
    return out


def level_of(array: np.ndarray, scale, translation, path="x") -> Level:
    return Level(path, tuple(map(float, scale)), tuple(map(float, translation)), array.shape, str(array.dtype))


@pytest.mark.parametrize("src_scale, translation, start, shape", [
    ((4, 4, 4), (2, 2, 2), (0, 0, 0), (5, 6, 7)),              # 4 nm, corner-aligned with the 8 nm grid
    ((4, 4, 4), (-6, 6, 10), (-2, 0, 1), (6, 5, 5)),          # negative translation, box beyond the array
    ((2.62, 2, 2), (1.31, 1, 1), (0, 0, 0), (4, 8, 8)),       # anisotropic (2.62 x 2 x 2 nm)
    ((2, 2, 2), (3, 5, 7), (0, 0, 0), (3, 4, 4)),             # 2 nm, offset by a fraction of a voxel
    ((8, 8, 8), (4, 4, 4), (0, 0, 0), (4, 4, 4)),             # 8 nm shifted by half a voxel
    ((8, 8, 8), (0, 0, 0), (0, 0, 0), (4, 4, 4)),             # 8 nm aligned: a copy
])
def test_area_rule_matches_supersampling(src_scale, translation, start, shape):
    rng = np.random.default_rng(0)
    source = rng.random((24, 24, 24)).astype(np.float32)
    level = level_of(source, src_scale, translation)
    maps = level_area_maps(level, start, shape, (8.0, 8.0, 8.0))
    got = apply_area(read_window(source, maps), maps)
    expected = reference_area(source, src_scale, translation, start, shape, (8, 8, 8))
    np.testing.assert_allclose(got, expected, atol=2e-3)
    coverage = np.prod(np.meshgrid(*[m.coverage for m in maps], indexing="ij"), axis=0)
    np.testing.assert_allclose(coverage, reference_area(np.ones_like(source), src_scale, translation, start, shape,
                                                        (8, 8, 8)), atol=2e-3)
    if src_scale == (8, 8, 8) and translation == (0, 0, 0):
        assert np.array_equal(got, source[:4, :4, :4])


def test_nearest_rule_takes_the_source_voxel_holding_the_centre():
    # a 32 nm level with translation 12 nm: its voxel i covers [12 + 32 (i - 1/2), 12 + 32 (i + 1/2))
    index, inside = nearest_index(-2, 12, 8.0, 12.0, 32.0, 2)
    centres = (np.arange(-2, 10)) * 8.0
    expected = [next((i for i in range(2) if 12 + 32 * (i - 0.5) <= c < 12 + 32 * (i + 0.5)), None) for c in centres]
    assert [int(i) if ok else None for i, ok in zip(index, inside)] == expected


def test_present_chunks_lists_the_files_zarr_wrote(tmp_path):
    array = zarr.open_array(str(tmp_path / "a"), mode="w", shape=(10, 20, 30), chunks=(4, 8, 16), dtype="uint8",
                            fill_value=0, write_empty_chunks=False)
    array[0:4, 8:16, 16:30] = 7          # one chunk
    array[8:10, 0:3, 0:2] = 1            # the last chunk in z, partial
    grid = present_chunks(tmp_path / "a")
    assert grid.present.shape == (3, 3, 2)
    assert sorted(map(tuple, np.argwhere(grid.present).tolist())) == [(0, 1, 1), (2, 0, 0)]
    nested = zarr.open_array(str(tmp_path / "b"), mode="w", shape=(8, 8, 8), chunks=(4, 4, 4), dtype="uint8",
                             dimension_separator="/", write_empty_chunks=False)
    nested[4:8, 0:4, 4:8] = 3
    assert np.argwhere(present_chunks(tmp_path / "b").present).tolist() == [[1, 0, 1]]


def test_present_fraction_is_the_area_of_written_chunks(tmp_path):
    array = zarr.open_array(str(tmp_path / "raw"), mode="w", shape=(16, 16, 16), chunks=(8, 8, 8), dtype="uint8",
                            write_empty_chunks=False)
    array[:8] = 1                                         # the lower half in z is written
    grid = present_chunks(tmp_path / "raw")
    level = Level(str(tmp_path / "raw"), (4.0, 4.0, 4.0), (2.0, 2.0, 2.0), (16, 16, 16), "uint8")
    fraction = present_fraction(level, grid, (0, 0, 0), (8, 8, 8), (8.0, 8.0, 8.0))
    written = reference_area(np.asarray(array[:]) > 0, (4, 4, 4), (2, 2, 2), (0, 0, 0), (8, 8, 8), (8, 8, 8))
    np.testing.assert_allclose(fraction, written, atol=2e-3)
    # the array starts at world 0, half-way through grid voxel 0; the written half ends at world 32 nm
    assert fraction[1:4, 1:, 1:].min() == 1.0 and fraction[4, 1:, 1:].max() == 0.5 and fraction[5:].max() == 0.0
