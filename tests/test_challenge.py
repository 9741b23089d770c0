"""challenge.py: 8-nm predictions brought to each truth's native grid (checked against scipy's map_coordinates
as an independent interpolation), a perfect prediction scoring 1.0 under the official rules, two-fold
thresholds, and the instance minimum size from the training labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy.ndimage import map_coordinates

import challenge
import config_shenron as C
import official
from ngff import read_levels


def prediction_of(crop, probs):
    return challenge.CropPrediction(probs.astype(np.float32), tuple(crop.grid_start), tuple(crop.scale),
                                    tuple(crop.classes))


def test_a_perfect_prediction_scores_one_at_native_resolution(cache, entries):
    """synth_iso's validation crop is labelled at 8 nm: the cached labels, as probabilities, are the truth."""
    crop = next(c for c in cache.split("validate") if c.name.startswith("synth_iso"))
    e = next(e for e in entries if e.name == crop.name)
    probs = (crop.labels == 1).astype(np.float32)
    scored = challenge.score_validation_crop(prediction_of(crop, probs), crop.name, e.crop_path, cache.classes,
                                             challenge.Postprocessing())
    report = official.aggregate(scored)
    assert {x["label"] for x in scored} == {c for c, a in zip(cache.classes, crop.annotated) if a}
    for cls, score in report["classes"].items():
        assert (score["iou"] if score["kind"] == "semantic" else score["combined"]) == pytest.approx(1.0), cls
    assert report["overall"] == pytest.approx(1.0)


def test_semantic_scores_equal_an_independent_interpolation(cache, entries):
    """synth_aniso's validation crop is labelled at 6 x 4 x 4 nm: random 8-nm probabilities, interpolated at
    the native voxel centres by scipy (order 1, edge values beyond the box) and thresholded, give the counts the
    official scorer records."""
    crop = next(c for c in cache.split("validate") if c.name.startswith("synth_aniso"))
    e = next(e for e in entries if e.name == crop.name)
    rng = np.random.default_rng(0)
    probs = rng.random((len(cache.classes),) + tuple(crop.shape)).astype(np.float32)
    classes = ("mito_mem", "pm")
    scored = challenge.score_validation_crop(prediction_of(crop, probs), crop.name, e.crop_path, classes,
                                             challenge.Postprocessing(thresholds={"pm": 0.7}))
    for entry, cls in zip(scored, classes):
        level = read_levels(Path(e.crop_path) / cls)[0]
        truth = np.asarray(zarr.open_array(level.path, mode="r")) > 0
        grids = np.meshgrid(*[(level.translation[a] + np.arange(level.shape[a]) * level.scale[a]) / 8.0
                              - crop.grid_start[a] for a in range(3)], indexing="ij")
        p = map_coordinates(probs[cache.classes.index(cls)].astype(np.float64), grids, order=1, mode="nearest")
        threshold = 0.7 if cls == "pm" else 0.5
        ours = challenge.label_on_truth_grid(prediction_of(crop, probs), cls,
                                             challenge.Postprocessing(thresholds={"pm": 0.7}), level.scale,
                                             level.translation, level.shape).astype(bool)
        tie = np.abs(p - threshold) < 1e-5          # float32 (ours) and float64 (scipy) may round these apart
        assert np.array_equal(ours[~tie], (p >= threshold)[~tie]) and tie.mean() < 1e-4, cls
        assert (entry["tp"], entry["fp"], entry["fn"]) == (int((ours & truth).sum()), int((ours & ~truth).sum()),
                                                           int((~ours & truth).sum())), cls


def test_instance_labels_take_the_ids_of_the_nearest_8nm_voxel():
    probs = np.zeros((1, 4, 4, 4), np.float32)
    probs[0, :2, :2, :2] = 0.9                       # one object of 8 voxels
    probs[0, 3, 3, 3] = 0.9                          # a speck of one voxel
    pred = challenge.CropPrediction(probs, (0, 0, 0), (8.0, 8.0, 8.0), ("nuc",))
    ids = pred.instance_ids("nuc", 0.5, min_size=2, fill_holes=False)
    assert ids.max() == 1 and ids[3, 3, 3] == 0     # the speck is removed
    on_4nm = challenge.label_on_truth_grid(pred, "nuc", challenge.Postprocessing(), (4.0, 4.0, 4.0), (-2, -2, -2),
                                           (8, 8, 8), ids)
    assert on_4nm.shape == (8, 8, 8) and on_4nm[:4, :4, :4].all() and not on_4nm[4:].any()


def test_two_fold_thresholds_come_from_the_other_crops():
    sweeps = {"a": {"pm": {0.3: (10, 10, 0), 0.5: (9, 2, 1), 0.7: (5, 0, 5)}},
              "b": {"pm": {0.3: (8, 1, 0), 0.5: (4, 0, 4), 0.7: (1, 0, 7)}}}
    chosen = challenge.tune_thresholds(sweeps, {"a": 0, "b": 1})
    # a gets b's best (0.3: Dice 16/17), b gets a's best (0.5: Dice 18/21), never their own
    assert chosen == {"a": {"pm": 0.3}, "b": {"pm": 0.5}}


def test_training_min_size_is_a_low_quantile_of_instance_sizes(cache):
    sizes = challenge.training_min_sizes(cache, C.ALL_CLASSES)
    assert set(sizes) == {"nuc"} and sizes["nuc"] >= 1
