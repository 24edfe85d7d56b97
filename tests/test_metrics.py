"""Saliency metrics: hand-computed cases, edge cases, and PySODMetrics as the oracle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2zoo.runtime import metrics
from u2zoo.runtime.metrics import (
    MetricSet,
    SaliencyMetrics,
    boundary_band,
    boundary_mae,
    evaluate,
    f_measure_curve,
    prepare,
    threshold_counts,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEST_DATA = SHARED / "data" / "u2net_test_data"
needs_results = pytest.mark.skipif(
    not (TEST_DATA / "u2netp_results").is_dir() or not (TEST_DATA / "u2net_results").is_dir(),
    reason="../shared/data/u2net_test_data (official U2NET/U2NETP results) is not present",
)

# F at threshold 0 when everything is predicted positive and 4 of 16 pixels are foreground:
# P = 4/16, R = 1, F = 1.3 * 0.25 / (0.3 * 0.25 + 1) = 0.325 / 1.075 = 13/43.
F_ALL_POSITIVE = 13 / 43


def square_gt() -> np.ndarray:
    """4×4 uint8 mask, foreground = the 2×2 square at rows/cols 1..2 (4 of 16 pixels)."""
    gt = np.zeros((4, 4), np.uint8)
    gt[1:3, 1:3] = 255
    return gt


def assert_finite(result: MetricSet) -> None:
    assert all(math.isfinite(v) for v in result.to_dict().values()), result


# ----------------------------------------------------------------------- hand-computed


def test_perfect_prediction():
    gt = square_gt()
    r = evaluate([(gt / 255.0, gt)])
    assert r.mae == 0.0 and r.boundary_mae == 0.0
    assert r.iou50 == 1.0 and r.miou == 1.0
    assert r.max_f == 1.0  # every t in 1..255 keeps exactly the square
    assert r.adaptive_f == 1.0  # threshold 2 * 4/16 = 0.5 keeps exactly the square
    # t = 0 keeps everything (F = 13/43), t = 1..255 give F = 1.
    assert r.mean_f == pytest.approx((255 + F_ALL_POSITIVE) / 256, abs=1e-15)
    assert r.s_measure == pytest.approx(1.0, abs=1e-12)
    assert r.weighted_f == pytest.approx(1.0, abs=1e-12)
    # PySODMetrics (like the MATLAB original) divides the alignment sum by n - 1, so a perfect
    # map scores n / (n - 1) = 16/15 here. At t = 0 (all positive) the predicted map is
    # constant, every alignment value is 0 and each pixel adds 1/4: 16/4 / 15 = 4/15.
    assert r.e_measure_max == pytest.approx(16 / 15, abs=1e-12)
    assert r.e_measure_adaptive == pytest.approx(16 / 15, abs=1e-12)
    assert r.e_measure_mean == pytest.approx((255 * 16 / 15 + 4 / 15) / 256, abs=1e-12)


def test_all_wrong_prediction():
    gt = square_gt()
    r = evaluate([(1 - gt / 255.0, gt)])
    assert r.mae == 1.0 and r.boundary_mae == 1.0
    assert r.iou50 == 0.0 and r.miou == 0.0  # no overlap in either class
    # Only t = 0 (everything positive) finds the square.
    assert r.max_f == pytest.approx(F_ALL_POSITIVE, abs=1e-15)
    assert r.mean_f == pytest.approx(F_ALL_POSITIVE / 256, abs=1e-15)
    assert r.adaptive_f == 0.0  # threshold min(2 * 12/16, 1) = 1 keeps the 12 background pixels
    # Object score 0 (pred is 0 on the square, 1 - pred is 0 off it); the top-left quadrant's
    # SSIM is -40/41, so the region score is 9/16 * (-40/41) + 7/16 < 0 and S clips to 0.
    assert r.s_measure == 0.0
    # Adaptive: the 12 FP and 4 FN pixels have alignment exactly -1, i.e. enhanced value 0.
    assert r.e_measure_adaptive == pytest.approx(0.0, abs=1e-12)
    assert r.weighted_f < 0.5
    assert_finite(r)


def test_graded_prediction_at_known_thresholds():
    gt = square_gt()
    pred = np.zeros((4, 4), np.uint8)
    pred[1, 1], pred[1, 2], pred[2, 1], pred[2, 2] = 255, 200, 100, 0  # on the square
    pred[0, 0], pred[3, 3] = 150, 50  # off the square
    p, g = prepare(pred, gt)  # min 0, max 255: min-max changes nothing
    np.testing.assert_array_equal(p, pred / 255)

    tp, fp = threshold_counts(p, g)
    assert (tp[128], fp[128]) == (2, 1)  # >= 128: 255, 200 on the square; 150 off it
    # P = 2/3, R = 2/4: F = 1.3 * (1/3) / (0.2 + 0.5) = 13/21.
    assert f_measure_curve(p, g)[128] == pytest.approx(13 / 21, abs=1e-15)

    r = evaluate([(pred, gt)])
    # |error| in levels: 0, 55, 155, 255 on the square; 150, 50 off it; over 16 pixels.
    assert r.mae == pytest.approx(665 / 255 / 16, abs=1e-15)
    # pred > 0.5: TP 2, FP 1, FN 2, TN 11 -> IoU 2/5, background IoU 11/14.
    assert r.iou50 == pytest.approx(2 / 5, abs=1e-15)
    assert r.miou == pytest.approx((2 / 5 + 11 / 14) / 2, abs=1e-15)
    # Adaptive threshold 2 * mean = 2 * 755 / (255 * 16) ≈ 0.370 keeps 255, 200, 100 (TP 3) and
    # 150 (FP 1): P = R = 3/4, so F = 3/4.
    assert r.adaptive_f == pytest.approx(0.75, abs=1e-15)


def test_dataset_max_f_is_the_max_of_the_mean_curve():
    gt = square_gt()
    # Image A: the square at 1.0 plus one background distractor at 0.5 (level 127).
    a = gt / 255.0
    a[0, 0] = 0.5
    # Image B: the square at 0.5 (level 127), nothing else.
    b = gt / 255.0 * 0.5
    # A: t = 1..127 -> TP 4, FP 1: P = 0.8, R = 1, F = 1.04 / 1.24 = 26/31; t = 128..255 -> F = 1.
    # B: t = 1..127 -> F = 1; t = 128..255 -> nothing positive, F = 0. Both: t = 0 -> 13/43.
    # Each image reaches F = 1 somewhere, but the mean curve peaks at (26/31 + 1) / 2 = 57/62.
    r = evaluate([(a, gt), (b, gt)], normalize=False)
    assert r.max_f == pytest.approx(57 / 62, abs=1e-15)
    assert r.mean_f == pytest.approx((F_ALL_POSITIVE + 127 * 57 / 62 + 128 * 0.5) / 256, abs=1e-15)


def test_empty_gt_is_scored_without_nan():
    empty = np.zeros((4, 4), np.uint8)
    r = evaluate([(np.zeros((4, 4)), empty)])
    assert r.mae == 0.0
    assert r.iou50 == 1.0 and r.miou == 1.0  # empty union counts as a perfect IoU
    assert r.s_measure == 1.0  # 1 - mean(pred)
    assert r.max_f == 0.0 and r.adaptive_f == 0.0  # no true positive is possible
    assert r.weighted_f == 0.0  # PySODMetrics' convention for an empty mask
    assert r.boundary_mae == 0.0  # no edge, no band
    # t = 0 predicts everything (score 0); t >= 1 predicts nothing: 16 / (16 - 1).
    assert r.e_measure_max == pytest.approx(16 / 15, abs=1e-12)
    assert r.e_measure_mean == pytest.approx(255 / 256 * 16 / 15, abs=1e-12)

    stray = np.zeros((4, 4))
    stray[0, 0] = 1.0
    r = evaluate([(stray, empty)])
    assert r.mae == 1 / 16
    assert r.iou50 == 0.0 and r.miou == pytest.approx((0 + 15 / 16) / 2, abs=1e-15)
    assert r.s_measure == pytest.approx(15 / 16, abs=1e-15)
    assert_finite(r)


def test_full_gt_and_constant_predictions_without_nan():
    full = np.full((4, 4), 255, np.uint8)
    r = evaluate([(np.ones((4, 4)), full)])
    assert r.mae == 0.0 and r.iou50 == 1.0 and r.miou == 1.0 and r.s_measure == 1.0
    assert r.boundary_mae == 0.0
    assert r.weighted_f == pytest.approx(1.0, abs=1e-12)
    for pred in (np.zeros((4, 4)), np.full((4, 4), 0.3), np.ones((4, 4))):
        for gt in (full, np.zeros((4, 4), np.uint8), square_gt()):
            assert_finite(evaluate([(pred, gt)]))


def test_boundary_band_on_a_small_square():
    gt = np.zeros((9, 9), bool)
    gt[3:6, 3:6] = True  # 3×3 square
    # Edges: the square's 8 rim pixels and the 16 background pixels around it (the 5×5 block
    # minus its centre, which only touches foreground).
    edges = boundary_band(gt, 0)
    expected = np.zeros((9, 9), bool)
    expected[2:7, 2:7] = True
    expected[4, 4] = False
    np.testing.assert_array_equal(edges, expected)
    # Band 1 adds the centre and the 5 pixels beyond each side of the 5×5 block (corners such
    # as (1, 1) lie √2 away): 24 + 1 + 20 = 45.
    assert boundary_band(gt, 1).sum() == 45

    pred = gt.astype(np.float64)
    pred[4, 4] = 0.0  # error inside the band (for band >= 1)
    pred[0, 0] = 1.0  # error far from the square (√8 from the nearest edge pixel)
    assert boundary_mae(pred, gt, 0) == 0.0
    assert boundary_mae(pred, gt, 1) == pytest.approx(1 / 45, abs=1e-15)
    assert evaluate([(pred, gt)], boundary_band=1).boundary_mae == pytest.approx(1 / 45, abs=1e-15)
    assert evaluate([(pred, gt)], boundary_band=1).mae == pytest.approx(2 / 81, abs=1e-15)


def test_prepare_mirrors_pysodmetrics_conventions():
    # uint8 gt: foreground is > 128, so 128 itself is background.
    _, g = prepare(np.zeros((1, 3), np.uint8), np.array([[127, 128, 129]], np.uint8))
    assert g.tolist() == [[False, False, True]]
    # uint8 pred: /255, then min-max to [0, 1].
    p, _ = prepare(np.array([[51, 102, 153]], np.uint8), np.zeros((1, 3), np.uint8))
    np.testing.assert_allclose(p, [[0.0, 0.5, 1.0]], atol=1e-15)
    # A constant map is left as it is; normalize=False keeps a float map unstretched.
    p, _ = prepare(np.full((2, 2), 51, np.uint8), np.zeros((2, 2), np.uint8))
    assert np.all(p == 51 / 255)
    p, _ = prepare(np.array([[0.2, 0.4]]), np.zeros((1, 2)), normalize=False)
    assert p.tolist() == [[0.2, 0.4]]
    # The same map as uint8 or as float /255 scores identically.
    rng = np.random.default_rng(0)
    pred_u8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    gt_u8 = np.where(rng.random((20, 30)) < 0.3, 255, 0).astype(np.uint8)
    assert evaluate([(pred_u8, gt_u8)]) == evaluate([(pred_u8 / 255, gt_u8 / 255)])


def test_one_image_result_equals_the_per_image_functions():
    rng = np.random.default_rng(3)
    gt = np.zeros((40, 50), np.uint8)
    gt[10:30, 15:40] = 255
    pred = np.clip(0.7 * gt + rng.integers(0, 90, gt.shape), 0, 255).astype(np.uint8)
    r = evaluate([(pred, gt)], boundary_band=3)
    p, g = prepare(pred, gt)
    f_curve, e_curve = f_measure_curve(p, g), metrics.e_measure_curve(p, g)
    iou50, miou = metrics.iou(p, g)
    expected = MetricSet(
        mae=metrics.mae(p, g),
        max_f=f_curve.max(),
        mean_f=f_curve.mean(),
        adaptive_f=metrics.adaptive_f_measure(p, g),
        s_measure=metrics.s_measure(p, g),
        e_measure_adaptive=metrics.adaptive_e_measure(p, g),
        e_measure_mean=e_curve.mean(),
        e_measure_max=e_curve.max(),
        weighted_f=metrics.weighted_f_measure(p, g),
        iou50=iou50,
        miou=miou,
        boundary_mae=boundary_mae(p, g, 3),
    )
    assert r.to_dict() == pytest.approx(expected.to_dict(), abs=1e-15)


def test_bad_inputs_raise_clear_errors():
    metrics = SaliencyMetrics()
    with pytest.raises(ValueError, match=r"pred shape \(4, 5\) differs from gt shape \(4, 4\)"):
        metrics.add(np.zeros((4, 5)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="differs"):
        evaluate([(np.zeros((3, 3), np.uint8), np.zeros((3, 4), np.uint8))])
    with pytest.raises(ValueError, match="2-D"):
        metrics.add(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.add(np.full((2, 2), 2.0), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no images"):
        metrics.result()
    with pytest.raises(ValueError, match=">= 0"):
        SaliencyMetrics(boundary_band=-1)
    assert len(metrics) == 0


# ----------------------------------------------------------------- PySODMetrics oracle


def pysod_results(sod, pairs) -> dict[str, float]:
    """Every metric PySODMetrics has, aggregated its way, keyed by our MetricSet names."""
    mae, fm, sm, em, wfm = sod.MAE(), sod.Fmeasure(), sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure()
    iou = sod.FmeasureV2({"iou": sod.IOUHandler(False, False, with_binary=True, sample_based=True)})
    for pred, gt in pairs:
        for metric in (mae, fm, sm, em, wfm, iou):
            metric.step(pred, gt)
    f, e = fm.get_results()["fm"], em.get_results()["em"]
    return {
        "mae": mae.get_results()["mae"],
        "max_f": f["curve"].max(),
        "mean_f": f["curve"].mean(),
        "adaptive_f": f["adp"],
        "s_measure": sm.get_results()["sm"],
        "e_measure_adaptive": e["adp"],
        "e_measure_mean": e["curve"].mean(),
        "e_measure_max": e["curve"].max(),
        "weighted_f": wfm.get_results()["wfm"],
        "iou50": iou.get_results()["iou"]["binary"],
    }


def assert_matches_pysod(sod, pairs) -> None:
    ours = evaluate(pairs).to_dict()
    reference = pysod_results(sod, pairs)
    differences = {name: abs(ours[name] - float(value)) for name, value in reference.items()}
    assert max(differences.values()) <= 1e-6, differences


@pytest.fixture(scope="module")
def sod():
    return pytest.importorskip("py_sod_metrics")


def load_pairs(pred_dir: str, gt_dir: str, max_pixels: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for pred_path in sorted((TEST_DATA / pred_dir).glob("*.png")):
        pred = np.asarray(Image.open(pred_path).convert("L"))
        gt = np.asarray(Image.open(TEST_DATA / gt_dir / pred_path.name).convert("L"))
        if max_pixels is None or pred.size <= max_pixels:
            pairs.append((pred, gt))
    return pairs


@needs_results
def test_matches_pysodmetrics_on_the_official_results(sod):
    # U2NETP's official outputs scored against U2NET's, binarised at 128, as stand-in GT.
    pairs = load_pairs("u2netp_results", "u2net_results")
    assert len(pairs) == 18
    assert_matches_pysod(sod, pairs)


@needs_results
def test_matches_pysodmetrics_with_the_roles_swapped(sod):
    # The reverse pairing, on the images up to 0.2 MP (9 of 18) to keep the suite fast.
    pairs = load_pairs("u2net_results", "u2netp_results", max_pixels=200_000)
    assert len(pairs) >= 8
    assert_matches_pysod(sod, pairs)


def test_matches_pysodmetrics_on_synthetic_edge_cases(sod):
    rng = np.random.default_rng(7)
    pairs = []
    for _ in range(12):  # blurred random blobs: soft maps, irregular masks
        h, w = rng.integers(8, 60, 2)
        gt = (rng.random((h, w)) < 0.35).astype(np.uint8) * 255
        noise = rng.integers(0, 256, (h, w))
        pred = np.clip(0.6 * gt + 0.4 * noise, 0, 255).astype(np.uint8)
        pairs.append((pred, gt))
    gt = np.zeros((20, 30), np.uint8)
    gt[5:12, 8:20] = 255
    pairs += [
        (rng.integers(0, 256, (20, 30), dtype=np.uint8), np.zeros((20, 30), np.uint8)),  # empty gt
        (rng.integers(0, 256, (20, 30), dtype=np.uint8), np.full((20, 30), 255, np.uint8)),  # full gt
        (np.full((20, 30), 77, np.uint8), gt),  # constant pred (not stretched)
        (np.zeros((20, 30), np.uint8), gt),  # all-background pred
        (255 - gt, gt),  # inverted
        (gt, gt),  # perfect
    ]
    assert_matches_pysod(sod, pairs)
