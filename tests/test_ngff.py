"""ngff.py: reading the levels of an OME-NGFF multiscale group refuses metadata that would misplace or
mis-scale the data: voxel sizes that are not finite and positive, axes other than z, y, x, and levels whose
shape disagrees with the extent their scale implies."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from errors import DataError
from ngff import multiscales_attrs, read_levels


def _group(path, shapes, scales, translations=None, axes="zyx"):
    """A multiscale group at `path` with levels s0, s1, ... of these shapes, scales and translations, its
    metadata written as plain JSON (so NaN and negative values reach the reader as a file would hold them)."""
    group = zarr.open_group(str(path), mode="w")
    for i, shape in enumerate(shapes):
        group.create_dataset(f"s{i}", data=np.zeros(shape, np.uint8), chunks=shape)
    translations = translations or [[0.0] * len(axes)] * len(shapes)
    attrs = multiscales_attrs([(f"s{i}", s, t) for i, (s, t) in enumerate(zip(scales, translations))])
    attrs["multiscales"][0]["axes"] = [{"name": a, "type": "space", "unit": "nanometer"} for a in axes]
    (path / ".zattrs").write_text(json.dumps(attrs))
    return path


def test_a_consistent_pyramid_reads_finest_first(tmp_path):
    # A 2x level's voxel-centre translation is half a fine voxel on; an odd size may round either way.
    group = _group(tmp_path / "raw", [(4, 16, 16), (2, 8, 8)], [(8, 8, 8), (16, 16, 16)], [(0, 0, 0), (4, 4, 4)])
    levels = read_levels(group)
    assert [lv.scale for lv in levels] == [(8.0, 8.0, 8.0), (16.0, 16.0, 16.0)]
    assert [lv.shape for lv in levels] == [(4, 16, 16), (2, 8, 8)]
    odd = _group(tmp_path / "odd", [(5, 17, 16), (3, 8, 8)], [(8, 8, 8), (16, 16, 16)], [(0, 0, 0), (4, 4, 4)])
    assert [lv.shape for lv in read_levels(odd)] == [(5, 17, 16), (3, 8, 8)]


@pytest.mark.parametrize("bad", [-8.0, 0.0, float("nan"), float("inf")])
def test_voxel_sizes_must_be_finite_and_positive(tmp_path, bad):
    group = _group(tmp_path / "nuc", [(4, 16, 16)], [(8.0, bad, 8.0)])
    with pytest.raises(DataError) as info:
        read_levels(group)
    message = str(info.value)
    assert str(group / ".zattrs") in message and "'s0'" in message and "finite and positive" in message, message


def test_translations_must_be_finite(tmp_path):
    group = _group(tmp_path / "nuc", [(4, 16, 16)], [(8, 8, 8)], [(0.0, float("nan"), 0.0)])
    with pytest.raises(DataError, match=r"'s0'.*translation.*finite"):
        read_levels(group)


@pytest.mark.parametrize("axes, shape", [
    ("xyz", (16, 16, 4)),    # a legal OME-NGFF array stored x, y, z
    ("xyz", (4, 16, 16)),    # data stored z, y, x but the axes reversed in the metadata only
    ("czyx", (1, 4, 16, 16)),  # a channel axis
])
def test_axes_other_than_zyx_are_refused_naming_the_array_and_the_fix(tmp_path, axes, shape):
    group = _group(tmp_path / "nuc", [shape], [[8.0] * len(axes)], axes=axes)
    with pytest.raises(DataError) as info:
        read_levels(group)
    message = str(info.value)
    assert str(group / ".zattrs") in message and ", ".join(axes) in message and "z, y, x" in message, message
    assert "transpose" in message and "\n" not in message


@pytest.mark.parametrize("shapes, scales, culprit", [
    ([(4, 16, 16), (4, 16, 16)], [(8, 8, 8), (16, 16, 16)], "s1"),   # s1 declared 2x but not downsampled
    ([(4, 16, 16), (2, 4, 8)], [(8, 8, 8), (16, 16, 16)], "s1"),     # s1 of the wrong extent in y
])
def test_a_level_whose_shape_disagrees_with_its_scale_is_refused(tmp_path, shapes, scales, culprit):
    group = _group(tmp_path / "raw", shapes, scales, [(0, 0, 0), (4, 4, 4)])
    with pytest.raises(DataError) as info:
        read_levels(group)
    message = str(info.value)
    assert str(group) in message and f"'{culprit}'" in message and "s0" in message, message


def test_a_level_array_of_the_wrong_dimensionality_is_refused(tmp_path):
    group = _group(tmp_path / "nuc", [(16, 16)], [(8, 8, 8)])
    with pytest.raises(DataError, match=r"'s0'.*2 dimensions.*3"):
        read_levels(group)
