"""The CellMap challenge's scoring rules, implemented independently of the official package.

Owns: bringing a prediction onto a test crop's grid, the per crop x label scores (semantic counts, instance
matching and Hausdorff term), their aggregation into per-class and overall scores, and the instance
post-processing that the rules reward. The rules are those of `RULES_VERSION`, read (never copied) from
janelia-cellmap/cellmap-segmentation-challenge: utils/matched_crop.py and utils/eval_utils/{scoring,
instance_matching, distance, aggregation, config, submission}.py. Arrays are (z, y, x); voxel sizes and
translations are in nm, a translation being the centre of voxel 0 (OME-NGFF).

Rules, in words (`RULES` names each; every number in a result carries the name of the rule that made it):
1. Resampling (`resample_to_truth`). Equal voxel sizes (np.allclose): the array is used as it is. Otherwise
   skimage `rescale(scale = source voxel / truth voxel, mode="constant")`: output length round(scale * n)
   (half to even), grids aligned at their outer edges; semantic arrays (bool made float32) get a Gaussian
   anti-aliasing filter, sigma = (n_in/n_out - 1)/2 on each shrunk axis, then linear interpolation, zeros
   outside the array, a clip to the source's value range, and > 0.5; instance ids take the nearest source
   voxel. The result is then shifted by a whole number of truth voxels, rel = sign(d) * (|d| // v) with
   d = (t_src // v) * v - t_truth (v, t: truth voxel size, translations), and cropped or zero-padded to the
   truth's shape: truth voxels the prediction does not cover are background. The shift uses the source's
   voxel-0 centre and snaps it down, so it ignores the half-voxel difference between grids of different
   voxel size; a source more than 4096x the truth's voxel count is refused.
2. Semantic crop (`score_semantic_crop`): a voxel is positive where its value is > 0 (so an un-rescaled
   probability counts from > 0, not > 0.5); TP/FP/FN/TN in native truth voxels. `<label>_mask`: both sides
   are multiplied by it (masked-out voxels become TN).
3. Instance crop (`score_instance_crop`): after the mask, 26-connected components of the prediction, binary
   or id-valued (touching voxels with different ids stay apart; an id in several pieces becomes several
   instances). With nG = the largest truth id and nP the number of components, a crop with
   nP / nG > 10 + 50 exp(-nG / 5), or over 5,000,000 overlapping (truth, prediction) pairs, is skipped:
   it adds nothing to its class's pools. Otherwise a one-to-one matching of minimum total cost, cost
   floor((1 - IoU) * 1e6) per overlapping pair and 1e6 + 1 per unmatched truth (so a pair is always
   worth matching unless it displaces a better one); TP = matches, FP = nP - TP, FN = truth ids - TP. Matched predictions take their truth's id,
   the others keep their component number (it may equal a truth id), and with no match at all nothing is
   renumbered. Per truth id: the symmetric Hausdorff distance in nm between voxel centres of truth == id and
   prediction == id, capped at D = min(voxel * shape) / 2, and D when the prediction has no such voxel;
   plus D once per unmatched prediction. Each distance h becomes 1.01 ** (-h / |voxel size|) (Euclidean
   norm of the voxel size vector); the crop adds their sum and count to its class.
4. Not submitted (`score_missing`): a semantic label adds every voxel of the truth array as FN; an instance
   label adds each truth instance as FN with a Hausdorff term of 0. The label stays in its class mean.
5. Aggregation (`aggregate`): per class, counts and Hausdorff sums are pooled over crops (no voxel or crop
   weighting). Semantic: IoU = TP / (TP + FP + FN). Instance: F1 = 2TP / (2TP + FP + FN), H = mean
   normalised distance, combined = sqrt(F1 * H). A class with nothing anywhere (zero denominators) scores
   1. Overall = sqrt(mean of instance classes' combined x mean of semantic classes' IoU), plain means.

The evaluator scores every label array of each truth crop: the pairs of test_crop_manifest.csv, whose labels
are `TESTED_CLASSES` (tested_classes.csv). Not reproduced: for a source over 131,072,000 voxels whose voxel
size differs from the truth's, the official loader rescales independent 297^3 blocks (seams differ);
`resample_to_truth` warns. Matching ties may be broken differently from the official OR-tools solver.

Where the code says more than, or otherwise than, shared/cellmap-facts.md section 8 (the code wins):
"linearly then > 0.5" holds only when voxel sizes differ (equal ones: > 0, no interpolation; shrinking
adds the Gaussian; the clip keeps an everywhere-positive source positive to its edges); a missing label does
not score 0 by itself, it adds all-FN counts to its class pool; a skipped crop adds nothing, so a class whose
every crop is skipped scores 1; translations snap to whole truth voxels (rule 1); the official
EVALUATION.md and docs still describe voxel-weighted means, which the code no longer computes.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import cc3d
import edt
import fastremap
import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

RULES_VERSION = "cellmap-segmentation-challenge 6b9ad68 (2026-06-30)"
# config.py INSTANCE_CLASSES; vim and "instance" are instance classes but no test crop holds them.
INSTANCE_CLASSES = ("nuc", "vim", "ves", "endo", "lyso", "ld", "perox", "mito", "np", "mt", "cell", "instance")
TESTED_CLASSES = (
    "ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "golgi_mem", "golgi_lum", "ves_mem", "ves_lum",
    "endo_mem", "endo_lum", "lyso_mem", "lyso_lum", "ld_mem", "ld_lum", "er_mem", "er_lum", "eres_mem",
    "eres_lum", "ne_mem", "ne_lum", "np_out", "np_in", "hchrom", "echrom", "nucpl", "mt_out", "cyto", "mt_in",
    "nuc", "golgi", "ves", "endo", "lyso", "ld", "eres", "perox_mem", "perox_lum", "perox", "mito", "er", "ne",
    "np", "chrom", "mt", "cell", "er_mem_all", "ne_mem_all")
SEMANTIC_THRESHOLD = 0.5
MAX_SOURCE_TO_TRUTH_VOXELS = 16 ** 3
OFFICIAL_BLOCKWISE_SOURCE_VOXELS = 500 * 2 ** 20 // 4      # 500 MB of float32
RATIO_BASE, RATIO_EXTRA, RATIO_DECAY = 10.0, 50.0, 5.0
MAX_OVERLAP_PAIRS = 5_000_000
MATCH_COST_SCALE = 1_000_000
HAUSDORFF_BASE = 1.01
GAUSSIAN_TRUNCATE = 4.0                                     # scipy's default, which skimage keeps
SLAB_BYTES = 1 << 28                                        # working memory of one resampling slab

RULES = {
    "resample": "rule 1: prediction brought onto the truth grid (matched_crop.py MatchedCrop.load_aligned)",
    "semantic_crop": "rule 2: TP/FP/FN/TN of value > 0 in native truth voxels (scoring.py score_semantic)",
    "instance_crop": "rule 3: components, min-cost matching, capped Hausdorff terms (scoring.py score_instance,"
                     " instance_matching.py match_instances, distance.py)",
    "instance_skipped": "rule 3: too many predicted instances or overlaps; adds nothing to the class "
                        "(instance_matching.py _check_instance_ratio, scoring.py _create_pathological_scores)",
    "missing": "rule 4: label not submitted (scoring.py empty_label_score)",
    "semantic_class": "rule 5: IoU of TP/FP/FN pooled over crops, 1 when all are 0 (aggregation.py combine_scores)",
    "instance_class": "rule 5: sqrt(pooled F1 x pooled mean normalised Hausdorff), 1 when nothing anywhere "
                      "(aggregation.py combine_scores)",
    "overall": "rule 5: sqrt(mean instance combined x mean semantic IoU) over classes (aggregation.py)",
}


def is_instance_class(label: str) -> bool:
    """True for an instance-scored label, False for a semantic one; ValueError for a name the rules lack."""
    if label not in INSTANCE_CLASSES and label not in TESTED_CLASSES:
        raise ValueError(f"unknown label {label!r}: use a class of official.TESTED_CLASSES (e.g. nuc, mito, er_mem)")
    return label in INSTANCE_CLASSES


def _vector(name: str, values, positive: bool = True) -> np.ndarray:
    """A finite (z, y, x) float vector, positive unless `positive` is False; ValueError otherwise."""
    try:
        vector = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} = {values!r} is not a (z, y, x) vector: pass three numbers in nm") from None
    if vector.shape != (3,) or not np.all(np.isfinite(vector)):
        raise ValueError(f"{name} = {values!r} is not a finite (z, y, x) vector: pass three numbers")
    if positive and np.any(vector <= 0):
        raise ValueError(f"{name} = {list(vector)} has a non-positive entry: voxel sizes and shapes are > 0")
    return vector


def _same_shape(name: str, array, shape) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(array.shape)}, the truth {tuple(shape)}: resample it onto the "
                         f"truth grid first (official.resample_to_truth)")


# ----------------------------------------------------------------------------------------------- rule 1
def _source_coords(n_in: int, n_out: int, rows: range) -> np.ndarray:
    """Source coordinates of rescaled voxels `rows` on one axis. scipy.ndimage.zoom(grid_mode=True), which
    skimage uses, aligns the outer edges of both grids: c = (j + 1/2) * n_in / n_out - 1/2, in this order
    of float operations so that ties (c + 1/2 exactly whole) round like scipy's."""
    return (np.arange(rows.start, rows.stop, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _trilinear(block: np.ndarray, first: int, coords: Sequence[np.ndarray]) -> np.ndarray:
    """Linear interpolation of `block` (its z index 0 = source row `first`; full y and x; every in-range
    tap present) at source coordinates `coords` (z, y, x); taps outside the source read 0 (skimage mode
    "constant"). Same arithmetic as scipy's zoom: weights w0 = 1 - x, w1 = 1 - w0, and the 8 taps summed
    in z, y, x order as ((v * wz) * wy) * wx, so that values of exactly 0.5 compare like the official's."""
    padded = np.pad(block, 1)
    taps = []
    for axis, c in enumerate(coords):
        low = np.floor(c)
        w0 = 1.0 - (c - low)
        shape = [-1 if a == axis else 1 for a in range(3)]
        taps.append((low.astype(np.int64) - (first if axis == 0 else 0) + 1,
                     (w0.reshape(shape), (1.0 - w0).reshape(shape))))
    (iz, wz), (iy, wy), (ix, wx) = taps
    total = np.zeros(tuple(len(c) for c in coords))
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                total += ((padded[np.ix_(iz + dz, iy + dy, ix + dx)] * wz[dz]) * wy[dy]) * wx[dx]
    return total


def _nearest_index(coords: np.ndarray) -> np.ndarray:
    """scipy's order-0 rule: the source voxel floor(c + 1/2) (a tie goes up)."""
    return np.floor(coords + 0.5).astype(np.int64)


def _official_shift(source_translation, truth_translation, truth_voxel) -> np.ndarray:
    """Whole truth voxels by which the rescaled array is moved (rule 1), with the official float semantics
    (// is numpy's floor_divide)."""
    snapped = (source_translation // truth_voxel) * truth_voxel
    difference = snapped - truth_translation
    return ((np.abs(difference) // truth_voxel) * np.sign(difference)).astype(np.int64)


class _Rescaler:
    """Rows of the rescaled source (rule 1), computed slab by slab from the rows of the source they need."""

    def __init__(self, source, out_shape: tuple[int, ...], instance: bool):
        self.source, self.out_shape, self.instance = source, out_shape, instance
        factors = np.asarray(source.shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
        # skimage: bool and float16/32 are computed in float32, everything else in float64.
        self.dtype = np.float32 if source.dtype in (np.bool_, np.float16, np.float32) else np.float64
        shrinks = any(o < i for o, i in zip(out_shape, source.shape))
        self.sigma = np.maximum(0.0, (factors - 1) / 2) if shrinks and not instance else np.zeros(3)
        self.radius = [int(GAUSSIAN_TRUNCATE * s + 0.5) if s > 1e-15 else 0 for s in self.sigma]
        self.source_rows_per_row = max(1.0, float(factors[0])) + 2 * self.radius[0] + 2
        self.value_range = self._value_range() if not instance else None

    def _value_range(self) -> tuple[float, float]:
        """skimage clips its output to the source's value range; widening it to the outside value 0 never
        applies here, because every output voxel has a positive weight on some source voxel."""
        step = max(1, SLAB_BYTES // (8 * max(1, self.source.shape[1] * self.source.shape[2])))
        lows, highs = [], []
        for z in range(0, self.source.shape[0], step):
            slab = np.asarray(self.source[z:z + step], dtype=self.dtype)
            lows.append(np.nanmin(slab))
            highs.append(np.nanmax(slab))
        return float(min(lows)), float(max(highs))

    def rows(self, rows: range) -> np.ndarray:
        """Rescaled rows `rows` over the full rescaled y and x: ids, or float values before the threshold."""
        n_in, shape = self.source.shape, self.out_shape
        z = _source_coords(n_in[0], shape[0], rows)
        yx = [_source_coords(n_in[a], shape[a], range(shape[a])) for a in (1, 2)]
        if self.instance:
            index = _nearest_index(z)
            block = np.asarray(self.source[index.min():index.max() + 1])
            block = np.take(block, index - index.min(), axis=0)
            return np.take(np.take(block, _nearest_index(yx[0]), axis=1), _nearest_index(yx[1]), axis=2)
        low, high = int(np.floor(z[0])), int(np.floor(z[-1])) + 1
        first = max(0, low - self.radius[0])
        block = np.asarray(self.source[first:min(n_in[0], high + 1 + self.radius[0])], dtype=self.dtype)
        # The filter runs z first (skimage's order) over a halo of `radius` real rows, so the rows kept
        # below equal the whole-array filter's; y and x are filtered per plane.
        if self.radius[0]:
            block = ndimage.gaussian_filter1d(block, self.sigma[0], axis=0, mode="constant", output=self.dtype,
                                              truncate=GAUSSIAN_TRUNCATE)
        taps_first = max(0, low)
        block = block[taps_first - first:min(n_in[0], high + 1) - first]
        for axis in (1, 2):
            if self.radius[axis]:
                block = ndimage.gaussian_filter1d(block, self.sigma[axis], axis=axis, mode="constant",
                                                  output=self.dtype, truncate=GAUSSIAN_TRUNCATE)
        values = _trilinear(block, taps_first, (z, *yx)).astype(self.dtype)
        return np.clip(values, *self.value_range)


def resample_to_truth(pred, pred_voxel_size: Sequence[float], pred_translation: Sequence[float],
                      truth_voxel_size: Sequence[float], truth_translation: Sequence[float],
                      truth_shape: Sequence[int], instance: bool) -> np.ndarray:
    """The prediction on the truth's grid as the official evaluator sees it (rule 1).

    `pred` is a 3D numpy or zarr array (read slab by slab). Returns, with the truth's shape, a bool array for
    a semantic label (True where the scorer counts the voxel positive: rescaled value > 0.5, or value > 0
    when the voxel sizes are equal) or the ids (pred's dtype) for an instance label. Memory-bounded: the
    official filter and interpolation are separable and local, so each slab of truth z rows is computed
    from its source rows plus a filter halo, with scipy's own arithmetic (the whole-array result, bit for
    bit), in about SLAB_BYTES of working memory besides the output.
    """
    pvs, ptr = _vector("pred_voxel_size", pred_voxel_size), _vector("pred_translation", pred_translation, False)
    tvs, ttr = _vector("truth_voxel_size", truth_voxel_size), _vector("truth_translation", truth_translation, False)
    truth_shape = tuple(int(n) for n in _vector("truth_shape", truth_shape))
    if len(getattr(pred, "shape", ())) != 3 or min(pred.shape) < 1:
        raise ValueError(f"pred has shape {getattr(pred, 'shape', None)}: pass a non-empty (z, y, x) array")
    dtype = np.dtype(pred.dtype)
    if instance and not (dtype == np.bool_ or np.issubdtype(dtype, np.integer)):
        raise ValueError(f"instance prediction has dtype {dtype}: pass integer ids (or a 0/1 mask); the official "
                         f"evaluator would Gaussian-smooth float ids before taking the nearest one")
    same = bool(np.allclose(pvs, tvs))
    out_shape = tuple(pred.shape) if same else tuple(
        int(max(np.round(s * n), 1)) for s, n in zip(pvs / tvs, pred.shape))
    if math.prod(pred.shape) / math.prod(truth_shape) > MAX_SOURCE_TO_TRUTH_VOXELS:
        raise ValueError(f"pred has {math.prod(pred.shape)} voxels, over {MAX_SOURCE_TO_TRUTH_VOXELS}x the truth's: "
                         f"the evaluator refuses it; write the prediction closer to {list(tvs)} nm")
    if not same and math.prod(pred.shape) > OFFICIAL_BLOCKWISE_SOURCE_VOXELS:
        warnings.warn(f"pred has {math.prod(pred.shape)} voxels at {list(pvs)} nm: the official loader rescales it "
                      f"in 297^3 blocks, whose seams this whole-array result does not reproduce")
    shift = _official_shift(ptr, ttr, tvs)
    low = [max(0, int(s)) for s in shift]
    high = [min(t, o + int(s)) for t, o, s in zip(truth_shape, out_shape, shift)]
    out = np.zeros(truth_shape, dtype=dtype if instance else np.bool_)
    if any(h <= lo for lo, h in zip(low, high)):
        return out
    rescaler = None if same else _Rescaler(pred, out_shape, instance)
    plane_bytes = 8 * (pred.shape[1] * pred.shape[2] + out_shape[1] * out_shape[2])
    per_row = 1.0 if same else rescaler.source_rows_per_row
    step = max(1, int(SLAB_BYTES // (plane_bytes * per_row)))
    yx = tuple(slice(lo - int(s), h - int(s)) for lo, h, s in zip(low[1:], high[1:], shift[1:]))
    for z0 in range(low[0], high[0], step):
        z1 = min(z0 + step, high[0])
        rows = range(z0 - int(shift[0]), z1 - int(shift[0]))
        if same:
            block = np.asarray(pred[rows.start:rows.stop, yx[0], yx[1]])
            block = block if instance else block > 0
        else:
            block = rescaler.rows(rows)[:, yx[0], yx[1]]
            block = block if instance else block > SEMANTIC_THRESHOLD
        out[z0:z1, low[1]:high[1], low[2]:high[2]] = block
    return out


# ----------------------------------------------------------------------------------------------- rules 2-4
def _z_slabs(n: int, step: int = 64):
    return (slice(z, min(z + step, n)) for z in range(0, n, step))


def score_semantic_crop(pred, truth, mask=None) -> dict:
    """Rule 2 for one crop x label, `pred` already on the truth grid (e.g. from `resample_to_truth`).

    Positive: pred > 0, truth > 0; with a `<label>_mask`, only voxels where mask > 0 can be positive (the
    official multiplies both sides by the 0/1 mask). Counts are native truth voxels:
    TP = |P & T|, FP = |P| - TP, FN = |T| - TP, TN = voxels - TP - FP - FN (TN is not used by the score).
    """
    _same_shape("pred", pred, truth.shape)
    if mask is not None:
        _same_shape("mask", mask, truth.shape)
    tp = fp = fn = 0
    for z in _z_slabs(truth.shape[0]):
        positive, true = np.asarray(pred[z]) > 0, np.asarray(truth[z]) > 0
        if mask is not None:
            kept = np.asarray(mask[z]) > 0
            positive, true = positive & kept, true & kept
        both = int(np.count_nonzero(positive & true))
        tp, fp, fn = tp + both, fp + int(np.count_nonzero(positive)) - both, fn + int(np.count_nonzero(true)) - both
    voxels = math.prod(truth.shape)
    return {"kind": "semantic", "status": "scored", "rule": "semantic_crop", "tp": tp, "fp": fp, "fn": fn,
            "tn": voxels - tp - fp - fn, "num_voxels": voxels}


def instance_ratio_cutoff(n_truth: int) -> float:
    """Largest accepted predicted / truth instance ratio: 10 + 50 exp(-n_truth / 5) (config.py ratio_cutoff)."""
    return RATIO_BASE + RATIO_EXTRA * math.exp(-n_truth / RATIO_DECAY)


def _match(truth: np.ndarray, components: np.ndarray, n_truth: int, n_pred: int) -> dict[int, int] | None:
    """Rule 3's matching as {prediction id: truth id}; None when the overlapping pairs exceed the limit.

    Minimum-cost assignment with one "unmatched" column per truth (cost 1e6 + 1), solved exactly by
    scipy's sparse LAPJV instead of a min-cost flow (same optimum). Every cost is raised by 1 so that
    no stored cost is 0, which does not change the optimum since every truth row is assigned once."""
    both = (truth > 0) & (components > 0)
    base = np.uint64(n_pred + 1)
    keys, intersection = np.unique(truth[both].astype(np.uint64) * base + components[both].astype(np.uint64),
                                   return_counts=True)
    if keys.size > MAX_OVERLAP_PAIRS:
        return None
    if keys.size == 0:
        return {}
    truth_of, pred_of = (keys // base).astype(np.int64), (keys % base).astype(np.int64)
    truth_sizes = np.bincount(truth[truth > 0].astype(np.int64), minlength=n_truth + 1)
    pred_sizes = np.bincount(components[components > 0].astype(np.int64), minlength=n_pred + 1)
    union = truth_sizes[truth_of] + pred_sizes[pred_of] - intersection
    iou = (intersection / union).astype(np.float32)                 # the official IoU is float32
    cost = np.floor((1.0 - iou.astype(np.float64)) * MATCH_COST_SCALE) + 1
    rows = np.concatenate([truth_of - 1, np.arange(n_truth)])
    columns = np.concatenate([pred_of - 1, n_pred + np.arange(n_truth)])
    costs = np.concatenate([cost, np.full(n_truth, MATCH_COST_SCALE + 2.0)])
    graph = csr_matrix((costs, (rows, columns)), shape=(n_truth, n_pred + n_truth))
    assigned_rows, assigned_columns = min_weight_full_bipartite_matching(graph)
    return {int(c) + 1: int(r) + 1 for r, c in zip(assigned_rows, assigned_columns) if c < n_pred}


def _hausdorff_per_truth(truth: np.ndarray, pred: np.ndarray, truth_ids: np.ndarray, voxel: np.ndarray,
                         cap: float) -> np.ndarray:
    """Rule 3's distance per truth id (float32 like the official), computed over the union of both
    bounding boxes: every voxel of either set lies in it, so the distance transforms there are exact."""
    truth_boxes, pred_boxes = ndimage.find_objects(truth), ndimage.find_objects(pred)
    distances = np.full(truth_ids.size, cap, dtype=np.float32)
    for k, tid in enumerate(int(t) for t in truth_ids):
        pred_box = pred_boxes[tid - 1] if tid <= len(pred_boxes) else None
        if pred_box is None:
            continue
        roi = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(truth_boxes[tid - 1], pred_box))
        in_truth, in_pred = truth[roi] == tid, pred[roi] == tid
        # edt (float32 out, 4 bytes a voxel), not scipy's distance_transform_edt, which the official uses:
        # scipy's builds int32 feature and index arrays and float64 distances, about 60 bytes a voxel (3.8 GB
        # for a nucleus filling a 400^3 crop at 4 nm on the mock). Both are exact Euclidean transforms; edt
        # computes in float32 and agrees with scipy's result cast to float32 (what is kept here) within one
        # float32 rounding (tests/test_official.py), a change of about 1e-9 in the normalised term.
        truth_to_pred = edt.edt(~in_pred, anisotropy=tuple(voxel), black_border=False)[in_truth].max()
        pred_to_truth = edt.edt(~in_truth, anisotropy=tuple(voxel), black_border=False)[in_pred].max()
        distances[k] = min(max(truth_to_pred, pred_to_truth), cap)
    return distances


def score_instance_crop(pred, truth, voxel_size: Sequence[float], mask=None) -> dict:
    """Rule 3 for one crop x label, `pred` (ids or 0/1) already on the truth grid.

    Returns TP/FP/FN instance counts and the sum and count of normalised Hausdorff terms
    1.01 ** (-h / |voxel_size|), h in nm capped at D = min(voxel_size * shape) / 2; a skipped crop
    (status skipped_too_many_instances / skipped_too_many_overlaps) returns zeros for all of them.
    """
    voxel = _vector("voxel_size", voxel_size)
    truth, pred = np.asarray(truth), np.asarray(pred)
    _same_shape("pred", pred, truth.shape)
    for name, array in (("truth", truth), ("pred", pred)):
        if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"instance {name} has dtype {array.dtype}: pass integer ids (0 = background)")
    if mask is not None:
        _same_shape("mask", mask, truth.shape)
        kept = np.asarray(mask) > 0
        truth, pred = np.where(kept, truth, 0), np.where(kept, pred, 0)
    truth = truth.astype(np.uint8) if truth.dtype == np.bool_ else truth
    # The official counts truth instances by the largest id and sizes them with bincount, which holds for
    # the challenge's test truth (ids 1..N). Ids in the training download need not be 1..N (any uint64: the
    # mock's nuc ids reach 2.3e15), so they are renumbered 1..N first: the official score of the renumbered
    # truth, where the ids as they are would ask bincount for petabytes.
    truth, _ = fastremap.renumber(truth, preserve_zero=True, in_place=False)
    components, n_pred = cc3d.connected_components(pred, connectivity=26, return_N=True)
    n_truth = int(truth.max()) if truth.size else 0                  # = the number of truth ids
    truth_ids = fastremap.unique(truth)
    truth_ids = truth_ids[truth_ids != 0]
    cap = float(np.min(voxel * np.asarray(truth.shape)) / 2)
    result = {"kind": "instance", "num_voxels": int(truth.size), "n_truth": int(truth_ids.size),
              "n_pred": int(n_pred), "max_distance_nm": cap}
    mapping: dict[int, int] = {}
    if n_truth and n_pred:
        too_many = n_pred / n_truth > instance_ratio_cutoff(n_truth)
        mapping = None if too_many else _match(truth, components, n_truth, n_pred)
        if mapping is None:
            status = "skipped_too_many_instances" if too_many else "skipped_too_many_overlaps"
            return {**result, "status": status, "rule": "instance_skipped", "tp": 0, "fp": 0, "fn": 0,
                    "hausdorff_norm_sum": 0.0, "n_hausdorff": 0}
    if mapping:
        # Only matched predictions are renumbered; the official keeps the others' numbers (fastremap
        # preserve_missing_labels), so an unmatched prediction can share a truth id in the distance step.
        table = np.arange(n_pred + 1, dtype=np.min_scalar_type(max(n_pred, n_truth)))
        table[list(mapping)] = list(mapping.values())
        components = table[components]
    distances = np.concatenate([_hausdorff_per_truth(truth, components, truth_ids, voxel, cap),
                                np.full(n_pred - len(mapping), cap, dtype=np.float32)]).astype(np.float64)
    normalised = HAUSDORFF_BASE ** (-distances / np.linalg.norm(voxel))
    return {**result, "status": "scored", "rule": "instance_crop", "tp": len(mapping), "fp": n_pred - len(mapping),
            "fn": int(truth_ids.size) - len(mapping), "hausdorff_norm_sum": float(normalised.sum()),
            "n_hausdorff": int(normalised.size)}


def score_missing(truth, instance: bool) -> dict:
    """Rule 4: the counts of a label that the submission lacks (the truth is read without its mask)."""
    voxels = math.prod(truth.shape)
    if not instance:
        return {"kind": "semantic", "status": "missing", "rule": "missing", "tp": 0, "fp": 0, "fn": voxels,
                "tn": 0, "num_voxels": voxels}
    ids = fastremap.unique(np.asarray(truth))
    n = int(np.count_nonzero(ids))
    return {"kind": "instance", "status": "missing", "rule": "missing", "tp": 0, "fp": 0, "fn": n,
            "hausdorff_norm_sum": 0.0, "n_hausdorff": n, "num_voxels": voxels}


def score_crop_label(crop: str, label: str, truth, truth_voxel_size: Sequence[float],
                     truth_translation: Sequence[float], pred=None, pred_voxel_size: Sequence[float] | None = None,
                     pred_translation: Sequence[float] | None = None, mask=None) -> dict:
    """One crop x label entry for `aggregate`: rule 1 then rule 2 or 3, or rule 4 when `pred` is None.
    A prediction without voxel size / translation is taken to be on the truth's grid already."""
    instance = is_instance_class(label)
    if pred is None:
        counts = score_missing(truth, instance)
    else:
        aligned = resample_to_truth(pred, truth_voxel_size if pred_voxel_size is None else pred_voxel_size,
                                    truth_translation if pred_translation is None else pred_translation,
                                    truth_voxel_size, truth_translation, truth.shape, instance)
        counts = (score_instance_crop(aligned, truth, truth_voxel_size, mask) if instance
                  else score_semantic_crop(aligned, truth, mask))
    return {"crop": str(crop), "label": label, **counts}


# ----------------------------------------------------------------------------------------------- rule 5
def _class_score(pool: dict) -> dict:
    tp, fp, fn = pool["tp"], pool["fp"], pool["fn"]
    if pool["kind"] == "semantic":
        denominator = tp + fp + fn
        return {**pool, "iou": tp / denominator if denominator else 1.0, "rule": "semantic_class"}
    denominator, count = 2 * tp + fp + fn, pool["n_hausdorff"]
    if denominator == 0 and count == 0:
        f1 = hausdorff = combined = 1.0
    else:
        f1 = 2 * tp / denominator if denominator else 0.0
        hausdorff = pool["hausdorff_norm_sum"] / count if count else 0.0
        combined = math.sqrt(f1 * hausdorff)
    return {**pool, "f1": f1, "normalized_hausdorff": hausdorff, "combined": combined, "rule": "instance_class"}


def aggregate(entries: Sequence[dict], include_missing: bool = True) -> dict:
    """Rule 5 over crop x label entries (`score_crop_label`): the JSON-serialisable result.

    {"rules_version", "rules" (rule name -> statement and official source), "crops" (the entries), "classes"
    {label: pooled counts + iou or f1 / normalized_hausdorff / combined}, "instance_mean", "semantic_mean",
    "overall"}; each entry and class names its rule. include_missing=False leaves out not-submitted labels
    (the official's second, "submitted only" score)."""
    pools: dict[str, dict] = {}
    for entry in entries:
        if entry["status"] == "missing" and not include_missing:
            continue
        sums = ("tp", "fp", "fn") + (("hausdorff_norm_sum", "n_hausdorff") if entry["kind"] == "instance" else ())
        pool = pools.setdefault(entry["label"], {"kind": entry["kind"], "crops": 0, **{key: 0 for key in sums}})
        if pool["kind"] != entry["kind"]:
            raise ValueError(f"label {entry['label']!r} is scored both as semantic and as instance: one kind per label")
        pool["crops"] += 1
        for key in sums:
            pool[key] += entry[key]
    classes = {label: _class_score(pool) for label, pool in sorted(pools.items())}
    instance = [c["combined"] for c in classes.values() if c["kind"] == "instance"]
    semantic = [c["iou"] for c in classes.values() if c["kind"] == "semantic"]
    instance_mean = sum(instance) / len(instance) if instance else 0.0
    semantic_mean = sum(semantic) / len(semantic) if semantic else 0.0
    return {"rules_version": RULES_VERSION, "rules": dict(RULES), "include_missing": include_missing,
            "crops": [dict(entry) for entry in entries], "classes": classes, "instance_mean": instance_mean,
            "semantic_mean": semantic_mean, "overall": math.sqrt(instance_mean * semantic_mean), "rule": "overall"}


# ----------------------------------------------------------------------------------------------- post-processing
def postprocess_instances(prob_or_binary, threshold: float = 0.5, min_size_voxels: int = 0,
                          fill_holes: bool | str = False) -> np.ndarray:
    """Instance ids from a probability or 0/1 volume, shaped for rule 3.

    foreground = value > threshold; optional hole filling of the foreground (fill_holes True or "3d":
    scipy binary_fill_holes in 3D; "per_slice": in each z slice); 26-connected components (the official
    relabels predictions with cc3d's default 26-connectivity, so this is what it will see); components
    of fewer than `min_size_voxels` voxels removed (each would be an FP with a maximal Hausdorff term);
    ids renumbered 1..N (uint32, uint64 beyond 2^32 - 1).
    """
    foreground = np.asarray(prob_or_binary) > threshold
    if foreground.ndim != 3:
        raise ValueError(f"prob_or_binary has shape {foreground.shape}: pass a (z, y, x) volume")
    if fill_holes in (True, "3d"):
        foreground = ndimage.binary_fill_holes(foreground)
    elif fill_holes == "per_slice":
        foreground = np.stack([ndimage.binary_fill_holes(plane) for plane in foreground])
    elif fill_holes is not False:
        raise ValueError(f"fill_holes = {fill_holes!r}: use False, True / '3d' or 'per_slice'")
    ids = cc3d.connected_components(foreground, connectivity=26)
    if min_size_voxels > 0:
        ids = cc3d.dust(ids, threshold=int(min_size_voxels), connectivity=26, in_place=True)
    ids, _ = fastremap.renumber(ids, in_place=True)
    return ids.astype(np.uint32 if int(ids.max(initial=0)) < 2 ** 32 else np.uint64, copy=False)


def typical_min_size(instance_volumes_voxels, quantile: float = 0.01) -> int:
    """A speck-removal size for `postprocess_instances`: the `quantile` (default 1%) of true instance sizes,
    in voxels of the grid that is post-processed, taken as an observed size (method "lower"); 0 when empty.

    Why this quantile: under rule 3, deleting a true instance costs as much as keeping a false speck (one
    F1 count and one maximal Hausdorff term each), so the cut must sit below nearly every real size; the
    1% quantile of training instances (including fragments cut by crop borders) gives up at most about
    1% of them while removing noise components, which are mostly far smaller."""
    sizes = np.asarray(instance_volumes_voxels, dtype=np.float64).ravel()
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile = {quantile}: pass a fraction between 0 and 1")
    return int(np.quantile(sizes, quantile, method="lower")) if sizes.size else 0
