"""Saliency / segmentation metrics in numpy + scipy, numerically matched to PySODMetrics.

The standard SOD metrics (MAE, F-measure, S-measure, E-measure, weighted F-measure) follow
PySODMetrics 1.6.2 (``py_sod_metrics``) formula for formula, so that feeding both the same
uint8 PNGs gives the same numbers (to ~1e-15; the tests demand ≤ 1e-6). PySODMetrics itself
is not a runtime dependency: it pulls OpenCV, scikit-learn and caps numpy; here it is only
the test oracle.

Use :class:`SaliencyMetrics` / :func:`evaluate` on raw inputs; the per-image functions
(``mae``, ``s_measure``, ...) take arrays already passed through :func:`prepare`.

Conventions, all from PySODMetrics unless marked *ours*:

* ``prepare`` turns inputs into ``pred`` float64 in [0, 1] and ``gt`` bool. A uint8 ``pred``
  is divided by 255; then ``pred`` is min-max stretched to [0, 1] unless constant (MATLAB's
  ``mapminmax(im2double(...))``). A uint8 ``gt`` is foreground where ``> 128``; a float ``gt``
  in [0, 1] where ``> 0.5`` (*ours*; note uint8 128 is background while 128/255 ≈ 0.502 is
  foreground — masks are normally binary, so this rarely matters).
* Threshold sweeps quantise ``pred`` with ``(pred * 255).astype(uint8)`` (truncation) and
  binarise with ``>= t`` for t = 0..255; the adaptive threshold is ``min(2 * mean(pred), 1)``
  with ``pred >= threshold``. Curves here are indexed by t (PySODMetrics stores them reversed).
* Dataset level: every per-image score is averaged over images; max/mean F and E are the max
  and mean of the *mean curve* over images (not the mean of per-image maxima).
* F-measure uses β² = 0.3; the weighted F-measure uses β = 1 (0.0 when ``gt`` is empty).
* S-measure (α = 0.5): a zero-area quadrant (foreground centroid on the last row or column)
  adds 0 to the region score, where PySODMetrics returns NaN for the whole image (*ours*).
* IoU@0.5 (*ours*, matches PySODMetrics' binary IoU and :func:`u2zoo.runtime.compare.iou_at`):
  foreground is ``pred > 0.5``; IoU is 1.0 when the union is empty (PySODMetrics says 0.0).
  mIoU is the mean of the foreground and background IoU of the image.
* Boundary MAE (*ours*): MAE restricted to pixels within Euclidean distance ``band`` of an
  edge of ``gt``. An edge pixel is one whose 3×3 neighbourhood (inside the image; the image
  border is not an edge) holds both classes, so both sides of the contour count. An image
  whose ``gt`` has no edge (all background or all foreground) scores 0.0: there is no
  boundary to get wrong. It still counts in the dataset mean, like every other score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

EPS = float(np.spacing(1))  # MATLAB's eps, as PySODMetrics uses it
F_BETA2 = 0.3
WEIGHTED_F_BETA = 1.0
S_ALPHA = 0.5
IOU_THRESHOLD = 0.5
DEFAULT_BOUNDARY_BAND = 5  # pixels at the image's own resolution (a fixed width, not a fraction)


# ---------------------------------------------------------------------------- preparation


def _binarise_gt(gt: np.ndarray) -> np.ndarray:
    if gt.dtype == np.bool_:
        return gt
    if gt.dtype == np.uint8:
        return gt > 128
    if np.issubdtype(gt.dtype, np.floating):
        if not (np.all(np.isfinite(gt)) and gt.min() >= 0 and gt.max() <= 1):
            raise ValueError("float gt must lie in [0, 1]; pass uint8 for 0..255 masks")
        return gt > 0.5
    raise TypeError(f"gt must be bool, uint8 or float in [0, 1], got {gt.dtype}")


def _to_unit_float(pred: np.ndarray) -> np.ndarray:
    if pred.dtype == np.uint8:
        return pred / 255  # im2double; the exact expression PySODMetrics uses
    if pred.dtype == np.bool_:
        return pred.astype(np.float64)
    if np.issubdtype(pred.dtype, np.floating):
        if not (np.all(np.isfinite(pred)) and pred.min() >= 0 and pred.max() <= 1):
            raise ValueError("float pred must lie in [0, 1]; pass uint8 for 0..255 maps")
        return pred.astype(np.float64)
    raise TypeError(f"pred must be uint8 or float in [0, 1], got {pred.dtype}")


def prepare(pred: np.ndarray, gt: np.ndarray, *, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, gt)`` → (float64 map in [0, 1], bool mask), exactly as PySODMetrics prepares them.

    ``normalize`` min-max stretches ``pred`` (unless it is constant), as PySODMetrics does by
    default; pass False to score a float map as it is.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}; both must be the same HxW")
    if pred.ndim != 2 or pred.size == 0:
        raise ValueError(f"pred and gt must be non-empty 2-D (H, W) maps, got shape {pred.shape}")
    gt = _binarise_gt(gt)
    pred = _to_unit_float(pred)
    if normalize and pred.max() != pred.min():
        pred = (pred - pred.min()) / (pred.max() - pred.min())
    return pred, gt


# ---------------------------------------------------------------- counts at thresholds


def threshold_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives of ``pred_u8 >= t`` for t = 0..255 (index t), from one histogram.

    One bincount plus a reversed cumsum replaces 256 binarisations; this is what makes the
    curves cheap on multi-megapixel images.
    """
    levels = (pred * 255).astype(np.uint8)  # truncation, as PySODMetrics quantises
    hist = np.bincount((levels.astype(np.intp) + 256 * gt).ravel(), minlength=512)
    bg_hist, fg_hist = hist[:256], hist[256:]
    tp = np.cumsum(fg_hist[::-1])[::-1]
    fp = np.cumsum(bg_hist[::-1])[::-1]
    return tp, fp


def adaptive_threshold(pred: np.ndarray) -> float:
    """Twice the mean saliency, capped at 1 (Achanta et al. 2009)."""
    return min(2 * float(pred.mean()), 1.0)


def _counts_at(pred: np.ndarray, gt: np.ndarray, threshold: float) -> tuple[int, int]:
    """True and false positives of ``pred >= threshold``."""
    positive = pred >= threshold
    tp = np.count_nonzero(positive & gt)
    return tp, np.count_nonzero(positive) - tp


# ------------------------------------------------------------------------------ F-measure


def _f_from_counts(tp: np.ndarray | int, fp: np.ndarray | int, num_fg: int, beta2: float = F_BETA2) -> np.ndarray:
    """F-measure (β² = ``beta2``) from counts, scalars or arrays; 0 where there is no true positive."""
    tp = np.asarray(tp, dtype=np.float64)
    precision = tp / np.maximum(tp + np.asarray(fp), 1)
    recall = tp / max(num_fg, 1)
    numerator = (1 + beta2) * precision * recall
    denominator = np.where(numerator == 0, 1, beta2 * precision + recall)
    return numerator / denominator


def f_measure_curve(pred: np.ndarray, gt: np.ndarray, beta2: float = F_BETA2) -> np.ndarray:
    """F-measure of ``pred_u8 >= t`` for t = 0..255 (index t)."""
    tp, fp = threshold_counts(pred, gt)
    return _f_from_counts(tp, fp, np.count_nonzero(gt), beta2)


def adaptive_f_measure(pred: np.ndarray, gt: np.ndarray, beta2: float = F_BETA2) -> float:
    """F-measure at the adaptive threshold."""
    tp, fp = _counts_at(pred, gt, adaptive_threshold(pred))
    return float(_f_from_counts(tp, fp, np.count_nonzero(gt), beta2))


# ------------------------------------------------------------------------------ E-measure


def _e_from_counts(tp: np.ndarray | int, fp: np.ndarray | int, num_fg: int, num_pixels: int) -> np.ndarray:
    """Enhanced-alignment measure (Fan et al. 2018) from counts (scalars or arrays).

    The binarised prediction and the mask take two values each, so the alignment matrix takes
    only four values; summing them weighted by the four region sizes gives the exact score.
    """
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    pred_fg = tp + fp
    pred_bg = num_pixels - pred_fg
    if num_fg == 0:
        total = pred_bg
    elif num_fg == num_pixels:
        total = pred_fg
    else:
        fn = num_fg - tp
        parts = (tp, fp, fn, pred_bg - fn)
        mean_pred, mean_gt = pred_fg / num_pixels, num_fg / num_pixels
        demeaned = (
            (1 - mean_pred, 1 - mean_gt),
            (1 - mean_pred, 0 - mean_gt),
            (0 - mean_pred, 1 - mean_gt),
            (0 - mean_pred, 0 - mean_gt),
        )
        total = 0
        for size, (p, g) in zip(parts, demeaned):
            align = 2 * (p * g) / (p**2 + g**2 + EPS)
            total = total + (align + 1) ** 2 / 4 * size
    return total / (num_pixels - 1 + EPS)


def e_measure_curve(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """E-measure of ``pred_u8 >= t`` for t = 0..255 (index t)."""
    tp, fp = threshold_counts(pred, gt)
    return _e_from_counts(tp, fp, np.count_nonzero(gt), gt.size)


def adaptive_e_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """E-measure at the adaptive threshold."""
    tp, fp = _counts_at(pred, gt, adaptive_threshold(pred))
    return float(_e_from_counts(tp, fp, np.count_nonzero(gt), gt.size))


# ------------------------------------------------------------------------------ S-measure


def _object_similarity(values: np.ndarray) -> float:
    mean = np.mean(values)
    std = np.std(values, ddof=1) if values.size > 1 else 0.0
    return 2 * mean / (mean**2 + 1 + std + EPS)


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """Global SSIM of one quadrant, as in the S-measure paper's MATLAB code."""
    n = pred.size
    if n == 0:
        return 0.0  # zero-area quadrant: its weight is 0 (PySODMetrics yields NaN here)
    gt = gt.astype(np.float64)
    x, y = np.mean(pred), np.mean(gt)
    dx, dy = pred - x, gt - y
    sigma_x = np.sum(dx**2) / (n - 1 + EPS)
    sigma_y = np.sum(dy**2) / (n - 1 + EPS)
    sigma_xy = np.sum(dx * dy) / (n - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x**2 + y**2) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def _region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """Area-weighted SSIM of the four quadrants split at the foreground centroid."""
    h, w = gt.shape
    rows, cols = np.nonzero(gt)
    # Rounding (half to even) and the +1 reproduce MATLAB's 1-based split exactly.
    cy, cx = int(np.round(rows.mean())) + 1, int(np.round(cols.mean())) + 1
    area = h * w
    w_lt, w_rt, w_lb = cx * cy / area, cy * (w - cx) / area, (h - cy) * cx / area
    w_rb = 1 - w_lt - w_rt - w_lb
    return (
        _ssim(pred[:cy, :cx], gt[:cy, :cx]) * w_lt
        + _ssim(pred[:cy, cx:], gt[:cy, cx:]) * w_rt
        + _ssim(pred[cy:, :cx], gt[cy:, :cx]) * w_lb
        + _ssim(pred[cy:, cx:], gt[cy:, cx:]) * w_rb
    )


def s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = S_ALPHA) -> float:
    """Structure measure (Fan et al. 2017): object- and region-aware structural similarity."""
    fg_ratio = np.mean(gt)
    if fg_ratio == 0:
        return float(1 - np.mean(pred))
    if fg_ratio == 1:
        return float(np.mean(pred))
    obj = _object_similarity(pred[gt]) * fg_ratio + _object_similarity(1 - pred[~gt]) * (1 - fg_ratio)
    score = alpha * obj + (1 - alpha) * _region_similarity(pred, gt)
    return float(max(0.0, score))


# --------------------------------------------------------------------- weighted F-measure


def _gaussian_1d(size: int = 7, sigma: float = 5) -> np.ndarray:
    """1-D factor of MATLAB's fspecial('gaussian', [size size], sigma), which is separable."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def weighted_f_measure(pred: np.ndarray, gt: np.ndarray, beta: float = WEIGHTED_F_BETA) -> float:
    """Weighted F-measure (Margolin et al. 2014); 0.0 when ``gt`` has no foreground."""
    if not gt.any():
        return 0.0
    # Distance of every background pixel to the foreground, and its nearest foreground pixel.
    dist, (iy, ix) = ndimage.distance_transform_edt(~gt, return_indices=True)
    error = np.abs(pred - gt)
    # Pixel dependency: background errors are judged at their nearest foreground pixel ...
    error_at_fg = error[iy, ix]
    g = _gaussian_1d()
    smoothed = ndimage.correlate1d(error_at_fg, g, axis=0, mode="constant")
    smoothed = ndimage.correlate1d(smoothed, g, axis=1, mode="constant")
    # ... and foreground errors may be relieved by their smoothed neighbourhood.
    error = np.where(gt & (smoothed < error), smoothed, error)
    # Pixel importance: background errors count more the farther they lie from the object.
    background = ~gt
    error[background] *= 2 - np.exp(np.log(0.5) / 5 * dist[background])
    fg_error = error[gt]
    tp_w = np.count_nonzero(gt) - fg_error.sum()
    fp_w = error[background].sum()
    recall = 1 - fg_error.mean()
    precision = tp_w / (tp_w + fp_w + EPS)
    return float((1 + beta) * recall * precision / (recall + beta * precision + EPS))


# ------------------------------------------------------------------------ MAE, IoU, band


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error between the map and the binary mask."""
    return float(np.mean(np.abs(pred - gt)))


def _iou_from_counts(tp: int, fp: int, num_fg: int, num_pixels: int) -> tuple[float, float]:
    """(foreground IoU, mIoU) from counts; an IoU with an empty union is 1.0."""
    fn = num_fg - tp
    tn = num_pixels - tp - fp - fn
    fg_union, bg_union = tp + fp + fn, tn + fp + fn
    fg_iou = tp / fg_union if fg_union else 1.0
    bg_iou = tn / bg_union if bg_union else 1.0
    return float(fg_iou), float((fg_iou + bg_iou) / 2)


def iou(pred: np.ndarray, gt: np.ndarray, threshold: float = IOU_THRESHOLD) -> tuple[float, float]:
    """(foreground IoU, mIoU) of ``pred > threshold`` against ``gt``."""
    positive = pred > threshold
    tp = np.count_nonzero(positive & gt)
    return _iou_from_counts(tp, np.count_nonzero(positive) - tp, np.count_nonzero(gt), gt.size)


def _dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a Euclidean disk (dx² + dy² ≤ radius²), exact.

    A disk is a stack of horizontal segments, so the dilation is a few 1-D max filters,
    shifted and OR-ed: several times faster than a distance transform on large masks.
    """
    height = mask.shape[0]
    reach = min(radius, height - 1)
    halves = {dy: math.isqrt(radius * radius - dy * dy) for dy in range(-reach, reach + 1)}
    segments = {
        half: ndimage.maximum_filter1d(mask.view(np.uint8), 2 * half + 1, axis=1, mode="constant").view(bool)
        for half in set(halves.values())
    }
    out = np.zeros_like(mask)
    for dy, half in halves.items():
        # A source pixel on row y marks the segment on row y + dy.
        out[max(dy, 0) : height + min(dy, 0)] |= segments[half][max(-dy, 0) : height - max(dy, 0)]
    return out


# Slice pairs that line up every pixel with its right, lower, lower-right and lower-left neighbour.
_NEIGHBOUR_PAIRS = (
    ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
    ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
    ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
    ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))),
)


def mask_edges(gt: np.ndarray) -> np.ndarray:
    """Pixels with an 8-neighbour of the other class; the image border is not an edge."""
    edges = np.zeros(gt.shape, dtype=bool)
    for a, b in _NEIGHBOUR_PAIRS:
        differs = gt[a] != gt[b]
        edges[a] |= differs
        edges[b] |= differs
    return edges


def _check_band(band: int) -> int:
    if band < 0:
        raise ValueError(f"boundary band must be >= 0 pixels, got {band}")
    return int(band)


def boundary_band(gt: np.ndarray, band: int = DEFAULT_BOUNDARY_BAND) -> np.ndarray:
    """Pixels within Euclidean distance ``band`` of an edge of ``gt`` (edge pixels included)."""
    band = _check_band(band)
    return _dilate_disk(mask_edges(gt), band)


def boundary_mae(pred: np.ndarray, gt: np.ndarray, band: int = DEFAULT_BOUNDARY_BAND) -> float:
    """MAE inside the boundary band of ``gt``; 0.0 when ``gt`` has no edge."""
    region = boundary_band(gt, band)
    if not region.any():
        return 0.0
    return float(np.mean(np.abs(pred[region] - gt[region])))


# ------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class MetricSet:
    """Dataset-level scores (higher is better except the two MAEs)."""

    mae: float
    max_f: float
    mean_f: float
    adaptive_f: float
    s_measure: float
    e_measure_adaptive: float
    e_measure_mean: float
    e_measure_max: float
    weighted_f: float
    iou50: float
    miou: float
    boundary_mae: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# Per-image scalars that are simply averaged over images.
_SCALARS = ("mae", "adaptive_f", "s_measure", "e_measure_adaptive", "weighted_f", "iou50", "miou", "boundary_mae")


class SaliencyMetrics:
    """Accumulates per-image scores; ``result()`` aggregates them as PySODMetrics does.

    ``boundary_band`` is the half-width in pixels of the band scored by ``boundary_mae``;
    ``normalize`` (on by default, as in PySODMetrics) min-max stretches each map, see :func:`prepare`.
    """

    def __init__(self, boundary_band: int = DEFAULT_BOUNDARY_BAND, *, normalize: bool = True):
        self.boundary_band = _check_band(boundary_band)
        self.normalize = normalize
        self._scalars: dict[str, list[float]] = {name: [] for name in _SCALARS}
        self._f_curves: list[np.ndarray] = []
        self._e_curves: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._f_curves)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Score one image: ``pred`` uint8 or float in [0, 1], ``gt`` a mask of the same HxW."""
        pred, gt = prepare(pred, gt, normalize=self.normalize)
        num_fg, num_pixels = np.count_nonzero(gt), gt.size
        tp, fp = threshold_counts(pred, gt)
        tp_adp, fp_adp = _counts_at(pred, gt, adaptive_threshold(pred))
        iou50, miou = iou(pred, gt)
        scores = {
            "mae": mae(pred, gt),
            "adaptive_f": float(_f_from_counts(tp_adp, fp_adp, num_fg)),
            "s_measure": s_measure(pred, gt),
            "e_measure_adaptive": float(_e_from_counts(tp_adp, fp_adp, num_fg, num_pixels)),
            "weighted_f": weighted_f_measure(pred, gt),
            "iou50": iou50,
            "miou": miou,
            "boundary_mae": boundary_mae(pred, gt, self.boundary_band),
        }
        for name, value in scores.items():
            self._scalars[name].append(value)
        self._f_curves.append(_f_from_counts(tp, fp, num_fg))
        self._e_curves.append(_e_from_counts(tp, fp, num_fg, num_pixels))

    def result(self) -> MetricSet:
        """Means over images; max/mean F and E come from the mean curve over images."""
        if not self._f_curves:
            raise ValueError("no images were added; call add(pred, gt) first")
        means = {name: float(np.mean(values)) for name, values in self._scalars.items()}
        f_curve = np.mean(self._f_curves, axis=0)
        e_curve = np.mean(self._e_curves, axis=0)
        return MetricSet(
            max_f=float(f_curve.max()),
            mean_f=float(f_curve.mean()),
            e_measure_max=float(e_curve.max()),
            e_measure_mean=float(e_curve.mean()),
            **means,
        )


def evaluate(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    boundary_band: int = DEFAULT_BOUNDARY_BAND,
    *,
    normalize: bool = True,
) -> MetricSet:
    """Dataset-level metrics of ``(pred, gt)`` pairs; see :class:`SaliencyMetrics`."""
    metrics = SaliencyMetrics(boundary_band, normalize=normalize)
    for pred, gt in pairs:
        metrics.add(pred, gt)
    return metrics.result()
