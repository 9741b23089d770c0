"""evaluate.py: reproduction of a real run's recorded metrics, the sliding window against independent
computations (known-output models, the training tiling at overlap 0), the prediction zarr against the
ground truth's metadata, and one-line errors."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import config_shenron as C
import evaluate
import evaluation
import inference
from engine import validate
from conftest import TINY_RUN_OPTIONS, run_script
from errors import RunFileError
from cache import CropCache, UNANNOTATED, prepare_cache
from datasplit import read_datasplit
from sampling import PatchSpec, ValidationTiles, make_loader, tile_starts
from models import UNet

VAL_CROP = "tiny_iso/crop3"  # tiny_root's validation crop: 8 x 48 x 48 at 8 nm


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second OpenMP thread mostly waits (50x slower per op). The
    scripts run under OMP_NUM_THREADS=1 too, so in-process results compare bit for bit with the run's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tiny_root, session_cli_env, tmp_path_factory) -> Path:
    """A finished 2.5D run (2 epochs x 2 steps) on tiny_root, trained once for the module."""
    out = tmp_path_factory.mktemp("eval_runs")
    proc = run_script(["train_local.py", *TINY_RUN_OPTIONS, "--data-root", tiny_root, "--out-dir", out,
                       "--run-name", "tiny", "--model", "unet_25d", "--epochs", "2", "--iterations", "2"],
                      session_cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tiny"


def evaluate_cli(run_dir, *options, env):
    proc = run_script(["evaluate.py", run_dir, *options], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_reproduces(report: dict, recorded: dict) -> None:
    """Independent of evaluation.compare_with_recorded: means within 1e-6 and identical per-class counts."""
    assert abs(report["mean_dice"] - recorded["mean_dice"]) <= 1e-6
    assert abs(report["mean_iou"] - recorded["mean_iou"]) <= 1e-6
    for cls, then in recorded["per_class"].items():
        now = report["per_class"][cls]
        assert {k: now[k] for k in ("tp", "fp", "fn", "tn", "status")} == \
               {k: then[k] for k in ("tp", "fp", "fn", "tn", "status")}, cls
        if then["dice"] is not None:
            assert abs(now["dice"] - then["dice"]) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# A real run
# ----------------------------------------------------------------------------------------------------
def test_best_checkpoint_reproduces_and_writes_predictions(tiny_run, tiny_root, cli_env):
    proc = evaluate_cli(tiny_run, "--checkpoint", "best", "--write-predictions", "--classes-to-write", "nuc", "pm",
                        env=cli_env)
    results = json.loads((tiny_run / "results.json").read_text())
    ev = json.loads((tiny_run / "eval_best.json").read_text())
    assert ev["checkpoint"] == "best" and ev["epoch"] == results["best_epoch"]
    assert list(ev["tilings"]) == ["training", "sliding"] and ev["validation_crops"] == [VAL_CROP]

    training = ev["tilings"]["training"]
    assert_reproduces(training, results["best"])
    assert training["reproduced"] and training["max_abs_difference"] <= 1e-6
    assert training["max_count_difference"] == 0 and training["mismatched_fields"] == []
    assert training["recorded"]["mean_dice"] == results["best"]["mean_dice"]

    sliding = ev["tilings"]["sliding"]
    assert sliding["overlap"] == 0.5 and "tuned" in sliding["sweep_note"] and "macro mean" in sliding["mean_definition"]
    assert 0.0 <= sliding["mean_dice"] <= 1.0
    for cls in ev["classes"]:
        now, then = sliding["per_class"][cls], training["per_class"][cls]
        # The same annotated voxels and the same truth are counted; only the predictions differ.
        assert now["annotated_voxels"] == then["annotated_voxels"] > 0
        assert now["tp"] + now["fn"] == then["tp"] + then["fn"]
        assert sliding["threshold_sweep"][cls]["best_dice"] >= now["dice"] - 1e-12
    assert "sliding window" in proc.stdout and "reproduced" in proc.stdout and str(tiny_run / "eval_best.json") in proc.stdout

    # The prediction zarr overlays the ground truth: same shape, scale and translation; thresholding its
    # uint8 at 128 (= probability 0.5) gives back the sliding window's counts.
    assert any(sliding["per_class"][c]["tp"] > 0 < sliding["per_class"][c]["fp"] + sliding["per_class"][c]["fn"]
               for c in ("nuc", "pm")), "the recount below would be trivial"
    pred_root = tiny_run / "predictions" / "best" / f"{VAL_CROP}.zarr"
    assert sorted(p.name for p in pred_root.iterdir() if p.is_dir()) == ["nuc", "pm"]
    gt_group = tiny_root / "tiny_iso" / "tiny_iso.zarr" / "recon-1/labels/groundtruth/crop3"
    for cls in ("nuc", "pm"):
        pred = zarr.open_group(str(pred_root / cls), mode="r")
        truth = zarr.open_group(str(gt_group / cls), mode="r")
        assert pred["s0"].dtype == np.uint8 and pred["s0"].shape == truth["s0"].shape == (8, 48, 48)
        pred_ms, truth_ms = pred.attrs["multiscales"][0], truth.attrs["multiscales"][0]
        assert pred_ms["version"] == "0.4" and [a["name"] for a in pred_ms["axes"]] == ["z", "y", "x"]
        assert pred_ms["datasets"][0]["coordinateTransformations"] == truth_ms["datasets"][0]["coordinateTransformations"]
        positive, real = pred["s0"][:] >= 128, truth["s0"][:] > 0
        counts = sliding["per_class"][cls]
        assert (counts["tp"], counts["fp"], counts["fn"]) == (int((positive & real).sum()), int((positive & ~real).sum()),
                                                            int((~positive & real).sum()))
    assert zarr.open_group(str(pred_root), mode="r").attrs["cellmap_prediction"]["checkpoint"] == "best"


def test_last_checkpoint_and_overlap_zero_match_the_training_tiling(tiny_run, cache_dir):
    """The library path main() takes, in-process (one thread, like the training subprocess)."""
    cfg, model, state = inference.load_run_model(tiny_run, "last")
    results = json.loads((tiny_run / "results.json").read_text())
    assert state["epoch"] == results["history"][-1]["epoch"] == 2
    spec = PatchSpec(cfg.patch_shape, C.MODELS[cfg.model].dims)
    cache = prepare_cache(read_datasplit(results["datasplit"]), cfg.classes, cfg.scale_nm, cache_root=cache_dir,
                          build=False)
    crops = cache.split("validate")
    training = validate(model, make_loader(ValidationTiles(cache, spec), cfg.batch_size, 0), cfg.classes, "cpu")
    assert_reproduces(training, results["history"][-1])
    comparison = evaluation.compare_with_recorded(training, results["history"][-1])
    assert comparison["reproduced"] and comparison["max_abs_difference"] <= 1e-6
    # Overlap 0 with the training tile size: the same tiles, so the same counts and the same sweep.
    sliding = inference.sliding_window_report(model, crops, spec, cfg.classes, "cpu", overlap=0.0, batch_size=cfg.batch_size)
    assert sliding["per_class"] == training["per_class"]
    assert sliding["threshold_sweep"] == training["threshold_sweep"]
    # A changed count is noticed.
    altered = json.loads(json.dumps(results["history"][-1]))
    altered["per_class"]["nuc"]["tp"] += 1
    altered["mean_dice"] += 1e-4
    assert not evaluation.compare_with_recorded(training, altered)["reproduced"]


def test_load_run_model(tiny_run):
    cfg, model, state = inference.load_run_model(tiny_run, "last")
    assert cfg.model == "unet_25d" and not model.training and state["epoch"] == 2
    assert model.in_channels == 5 and model.num_classes == len(cfg.classes)
    with pytest.raises(RunFileError, match="not a run folder"):
        inference.load_run_model(tiny_run.parent, "best")
    with pytest.raises(ValueError, match="middle"):
        inference.load_run_model(tiny_run, "middle")


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------
def run_for(case: str, tmp_path: Path, tiny_run: Path) -> Path:
    if case == "no_results":
        return tmp_path
    if case in ("missing_checkpoint", "corrupt_checkpoint"):
        run = tmp_path / "broken"
        run.mkdir()
        (run / "results.json").write_text((tiny_run / "results.json").read_text())
        if case == "corrupt_checkpoint":
            (run / "best.pt").write_bytes(b"not a checkpoint")
        return run
    return tiny_run


@pytest.mark.parametrize("case, options, message", [
    ("no_results", [], "not a run folder"),
    ("missing_checkpoint", [], "not found"),
    ("corrupt_checkpoint", [], "corrupt"),
    ("bad_checkpoint_name", ["--checkpoint", "middle"], "--checkpoint"),
    ("bad_data_root", ["--data-root", "/nonexistent/cellmap"], "does not exist"),
    ("bad_overlap", ["--overlap", "1"], "--overlap"),
    ("predictions_without_sliding", ["--write-predictions", "--tiling", "training"], "--write-predictions"),
    ("unknown_class", ["--write-predictions", "--classes-to-write", "nucleus"], "--classes-to-write"),
])
def test_bad_input_exits_2_with_one_line(case, options, message, tiny_run, tmp_path, capsys):
    run = run_for(case, tmp_path, tiny_run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    try:
        code = evaluate.main([str(run), *options])
    except SystemExit as stop:  # argparse usage errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


# ----------------------------------------------------------------------------------------------------
# Sliding window against known-output models (in-memory crops)
# ----------------------------------------------------------------------------------------------------
class MemoryCrop:
    """A crop held in memory with cache.CachedCrop's window interface: random raw over the crop and a margin
    around it (missing beyond), random labels with an unannotated corner."""

    def __init__(self, shape, margin, classes: int = 2, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.name, self.split, self.grid_start, self.shape = "mem/crop1", "validate", (3, 10, 20), tuple(shape)
        self.margin = tuple(margin)
        self.stored_raw = rng.integers(0, 256, size=[n + 2 * m for n, m in zip(shape, margin)], dtype=np.uint8)
        self.labels = rng.integers(0, 2, size=(classes, *shape), dtype=np.uint8)
        self.labels[:, : shape[0] // 3, :5] = UNANNOTATED
        self.annotated = np.ones(classes, bool)
        self.positives = (self.labels == 1).reshape(classes, -1).sum(1)

    @staticmethod
    def _window(array, start, shape, offset, fill):
        out = np.full(array.shape[:-3] + tuple(shape), fill, dtype=array.dtype)
        src = [slice(max(0, s + o), min(n, s + o + k)) for s, o, k, n in zip(start, offset, shape, array.shape[-3:])]
        if all(sl.stop > sl.start for sl in src):
            dst = tuple(slice(sl.start - s - o, sl.stop - s - o) for sl, s, o in zip(src, start, offset))
            out[(..., *dst)] = array[(..., *src)]
        return out

    def raw_window(self, start, shape):
        raw = self._window(self.stored_raw, start, shape, self.margin, 0)
        valid = self._window(np.ones(self.stored_raw.shape, bool), start, shape, self.margin, False)
        return raw, valid

    def label_window(self, start, shape):
        return self._window(self.labels, start, shape, (0, 0, 0), UNANNOTATED)


def memory_crop(shape, margin, classes: int = 2, seed: int = 0) -> MemoryCrop:
    return MemoryCrop(shape, margin, classes, seed)


class TileMean(torch.nn.Module):
    """Every output voxel of a tile = the tile's mean input (as a probability): known, different per tile."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        return torch.logit(mean.clamp(1e-4, 1 - 1e-4)).expand(x.shape[0], self.classes, *x.shape[2:]).clone()


class PickInput(torch.nn.Module):
    """Pointwise: output = one input channel (2D/2.5D) or the volume (3D), through logit(0.1 + 0.8 x)."""

    def __init__(self, channel: int = 0, classes: int = 2):
        super().__init__()
        self.channel, self.classes = channel, classes

    def forward(self, x):
        picked = x[:, self.channel: self.channel + 1]
        return torch.logit(0.1 + 0.8 * picked).expand(x.shape[0], self.classes, *x.shape[2:]).clone()


@pytest.mark.parametrize("shape, tile, dims, overlap", [
    ((3, 40, 37), (1, 16, 16), 2, 0.5),
    ((21, 40, 37), (8, 16, 16), 3, 0.625),    # the first row starts above the crop; planes wrap the ring buffer
])
def test_blending_weights_are_a_gaussian_average(shape, tile, dims, overlap):
    crop, spec = memory_crop(shape, (4, 8, 8)), PatchSpec(tile, dims)
    probs = inference.predict_crop(TileMean(), crop, spec, "cpu", overlap=overlap, batch_size=3)

    # Independent: per-tile constants, a Gaussian (sigma = tile/8, floor 1e-3) per tile, weighted average.
    gaussians = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in tile]
    weight = np.einsum("z,y,x->zyx", *gaussians)
    weight = np.maximum(weight / weight.max(), 1e-3)
    total, weight_sum = np.zeros(crop.shape), np.zeros(crop.shape)
    plain_total, tiles_per_voxel = np.zeros(crop.shape), np.zeros(crop.shape)
    m = crop.margin
    steps = [max(1, round(n * (1 - overlap))) for n in tile]
    for origin in itertools.product(*(tile_starts(length, n, step) for length, n, step in zip(shape, tile, steps))):
        source = tuple(slice(o + mm, o + mm + n) for o, mm, n in zip(origin, m, tile))
        value = np.clip(crop.stored_raw[source].astype(np.float64).mean() / 255, 1e-4, 1 - 1e-4)
        inside = tuple(slice(max(o, 0), min(o + n, length)) for o, n, length in zip(origin, tile, shape))
        w = weight[tuple(slice(s.start - o, s.stop - o) for s, o in zip(inside, origin))]
        total[inside] += w * value
        weight_sum[inside] += w
        plain_total[inside] += value
        tiles_per_voxel[inside] += 1
    expected = total / weight_sum
    assert probs.shape == (2,) + shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], expected, atol=2e-6)
    np.testing.assert_allclose(probs[1], expected, atol=2e-6)
    # The weights matter: a plain average of the overlapping tiles differs.
    assert np.abs(plain_total / tiles_per_voxel - expected).max() > 1e-3


@pytest.mark.parametrize("dims, raw_shape, channel, z_offset", [
    (2, (1, 16, 16), 0, 0),    # 2D
    (2, (5, 16, 16), 0, -2),   # 2.5D: the first channel is 2 slices above the target slice
    (2, (5, 16, 16), 4, 2),    # 2.5D: the last channel is 2 slices below
    (3, (8, 16, 16), 0, 0),    # 3D
])
def test_sliding_window_aligns_raw_context_with_the_crop(dims, raw_shape, channel, z_offset):
    crop = memory_crop((11, 30, 25), (4, 8, 8), seed=1)
    probs = inference.predict_crop(PickInput(channel), crop, PatchSpec(raw_shape, dims), "cpu", overlap=0.5, batch_size=5)
    m = crop.margin
    raw_at_voxel = crop.stored_raw[m[0] + z_offset: m[0] + z_offset + 11, m[1]: m[1] + 30, m[2]: m[2] + 25] / 255.0
    np.testing.assert_allclose(probs[1], 0.1 + 0.8 * raw_at_voxel, atol=1e-5)


@pytest.mark.parametrize("dims, tile, overlap", [(3, (8, 16, 16), 0.5), (3, (8, 16, 16), 0.25), (2, (1, 16, 16), 0.5)])
def test_sliding_window_matches_monai(dims, tile, overlap):
    """Independent reference: MONAI's sliding_window_inference with the same model, tiles and weight map, on a
    crop the tiles cover exactly (MONAI pads beyond the crop where the toolkit reads raw context)."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    model = UNet(1, 3, dims=dims, base_channels=4, depth=2).eval()
    step = [max(1, round(n * (1 - overlap))) for n in tile]
    shape = [n + 2 * s for n, s in zip(tile, step)]          # three tiles per axis, none overhanging
    crop = memory_crop(shape, (0, 0, 0), classes=3, seed=4)
    ours = inference.predict_crop(model, crop, PatchSpec(tile, dims), "cpu", overlap=overlap, batch_size=3)
    predictor = model if dims == 3 else (lambda t: model(t[:, :, 0])[:, :, None])
    with torch.no_grad():
        reference = sliding_window_inference(
            torch.from_numpy(crop.stored_raw).float()[None, None] / 255, tile, 3, lambda t: torch.sigmoid(predictor(t)),
            overlap=overlap, roi_weight_map=torch.from_numpy(inference.blending_weights(tile)))[0].numpy()
    np.testing.assert_allclose(ours, reference, atol=2e-6)


@pytest.mark.parametrize("dims, raw_shape", [(2, (5, 16, 16)), (3, (8, 16, 16))])
def test_overlap_zero_equals_validate_counts(dims, raw_shape):
    torch.manual_seed(0)
    spec = PatchSpec(raw_shape, dims)
    crops = [memory_crop((9, 30, 25), (4, 8, 8), seed=2), memory_crop((6, 17, 40), (4, 8, 8), seed=3)]
    cache = CropCache(Path("/nonexistent"), ("a", "b"), (8.0, 8.0, 8.0), crops, [])
    model = UNet(raw_shape[0] if dims == 2 else 1, 2, dims=dims, base_channels=4, depth=2).eval()
    expected = validate(model, make_loader(ValidationTiles(cache, spec), 3, 0), ("a", "b"), "cpu")
    report = inference.sliding_window_report(model, crops, spec, ("a", "b"), "cpu", overlap=0.0, batch_size=3)
    assert report["per_class"] == expected["per_class"]
    assert report["threshold_sweep"] == expected["threshold_sweep"]
    assert 0 < expected["per_class"]["a"]["tp"] < expected["per_class"]["a"]["annotated_voxels"]


def test_sliding_window_masks_voxels_whose_raw_is_missing():
    """Raw beyond what is stored around a crop is missing: the sliding window still predicts every voxel, and
    the labels under missing raw are left out of the counts (as in training and in the training tiling)."""
    crop = memory_crop((4, 20, 20), (0, 8, 8))  # no raw above or below the crop: 2.5D context is missing
    spec = PatchSpec((5, 16, 16), 2)
    probs = inference.predict_crop(PickInput(), crop, spec, "cpu")
    assert probs.shape == (2, 4, 20, 20) and np.isfinite(probs).all()
    tiles = ValidationTiles(CropCache(Path("/nonexistent"), ("a", "b"), (8.0, 8.0, 8.0), [crop], []), spec)
    sample = tiles[0]
    assert (sample["labels"] != UNANNOTATED).any(), "the target slice's raw exists: its labels count"


class HalfFetched(MemoryCrop):
    """EM only over y < 32 (as a coarse crop with 8-nm raw fetched for a finer crop inside it)."""

    def raw_window(self, start, shape):
        raw, valid = super().raw_window(start, shape)
        ys = np.arange(start[1], start[1] + shape[1])
        valid &= (ys < 32)[None, :, None]
        return np.where(valid, raw, 0).astype(raw.dtype), valid


class CountingTiles(TileMean):
    def __init__(self):
        super().__init__()
        self.tiles = 0

    def forward(self, x):
        self.tiles += x.shape[0]
        return super().forward(x)


def test_tiles_without_any_em_are_not_predicted():
    crop = HalfFetched((2, 64, 32), (0, 0, 0))
    model = CountingTiles()
    probs = inference.predict_crop(model, crop, PatchSpec((1, 16, 16), 2), "cpu", overlap=0.0, batch_size=3)
    assert model.tiles == 2 * 2 * 2                     # z x (y tiles with EM) x x, not the 16 of the crop
    assert (probs[:, :, 32:] == 0).all() and (probs[:, :, :32] > 0).all()


def test_counting_targets_mask_unannotated_voxels_and_missing_raw():
    crop = memory_crop((5, 7, 9), (0, 0, 0), seed=4)
    target = inference.labels_for_counting(crop, 1, 3)       # z slab 1 .. 3
    labels = crop.labels[:, 1:4]
    assert target.shape == (1, 2, 3, 7, 9)
    assert torch.equal(torch.isnan(target[0]), torch.from_numpy(labels == UNANNOTATED))
    crop.stored_raw[2, :3] = 0
    crop.margin = (0, 0, 0)
    missing = MemoryCrop((5, 7, 9), (0, 0, 0), seed=4)
    missing.raw_window = lambda start, shape: (np.zeros(shape, np.uint8), np.zeros(shape, bool))
    assert torch.isnan(inference.labels_for_counting(missing, 0, 5)).all(), "no raw: nothing counts"


def test_official_tta_and_orthoplane_options_write_labelled_scores(tiny_run, cli_env):
    proc = evaluate_cli(tiny_run, "--checkpoint", "last", "--tiling", "sliding", "--official", "--tta",
                        "--orthoplane", env=cli_env)
    ev = json.loads((tiny_run / "eval_last.json").read_text())
    sliding, off = ev["tilings"]["sliding"], ev["official"]
    assert sliding["tta"] and sliding["orthoplane"] and sliding["metric"].startswith("8-nm training grid")
    assert off["rules_version"].startswith("cellmap-segmentation-challenge") and off["metric"].startswith("official")
    assert set(off["classes"]) <= set(C.QUICK_CLASSES) and "nuc" in off["classes"]
    assert off["classes"]["nuc"]["kind"] == "instance" and off["classes"]["pm"]["kind"] == "semantic"
    assert 0 <= off["overall"] <= 1 and "official challenge score" in proc.stdout and "8-nm training grid" in proc.stdout
    assert "min_size_voxels_8nm" in off["postprocessing"] and off["postprocessing"]["tta"]


def test_orthoplane_averages_the_three_slicing_directions():
    """PickInput returns its input: along every axis the 2D prediction of a voxel is a function of that voxel
    only, so the orthoplane average equals the plain prediction; TTA of a pointwise model changes nothing."""
    crop, spec = memory_crop((6, 20, 18), (4, 8, 8), seed=5), PatchSpec((1, 16, 16), 2)
    plain = inference.predict_crop(PickInput(), crop, spec, "cpu", overlap=0.5)
    np.testing.assert_allclose(inference.predict_crop(PickInput(), crop, spec, "cpu", overlap=0.5, orthoplane=True),
                               plain, atol=1e-6)
    np.testing.assert_allclose(inference.predict_crop(PickInput(), crop, spec, "cpu", overlap=0.5, tta=True), plain,
                               atol=1e-6)
    with pytest.raises(ValueError, match="orthoplane"):
        inference.predict_crop(PickInput(), crop, PatchSpec((4, 16, 16), 3), "cpu", orthoplane=True)


def test_a_removed_best_checkpoint_falls_back_to_last_with_a_note(tiny_run, tmp_path, cli_env):
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "best.pt").unlink()
    proc = evaluate_cli(run, "--tiling", "training", env=cli_env)
    assert f"note: {run / 'best.pt'} is missing: evaluating last.pt instead" in proc.stdout
    assert json.loads((run / "eval_last.json").read_text())["checkpoint"] == "last"
    refused = run_script(["evaluate.py", run, "--checkpoint", "best"], cli_env)
    assert refused.returncode == 2 and "best.pt not found" in refused.stderr
