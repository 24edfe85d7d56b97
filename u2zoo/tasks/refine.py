"""Refining a probability map with the image: dense CRF, and alpha matting on a trimap.

Both are optional extras (``u2zoo[crf]``: pydensecrf2, a maintained build of Krähenbühl's
dense CRF; ``u2zoo[matting]``: pymatting). Missing ones raise ``BackendUnavailable`` with the
install line, never a silent no-op.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

from u2zoo.errors import BackendUnavailable, ConfigError
from u2zoo.zoo.contract import resize_plane, to_uint8


@dataclass(frozen=True)
class CrfOptions:
    """Fully connected CRF (Krähenbühl & Koltun 2011) over {background, object}.

    The unary term is -log of the model's probability; the pairwise terms are a smoothness
    kernel (``smooth_*``) and an appearance kernel that ties pixels of similar colour
    (``bilateral_*``), which pulls the mask edge onto the image's own edges.
    """

    iterations: int = 5
    smooth_sxy: float = 3.0
    smooth_compat: float = 3.0
    bilateral_sxy: float = 40.0
    bilateral_srgb: float = 10.0
    bilateral_compat: float = 5.0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"--crf-iterations must be at least 1, got {self.iterations}")


def import_crf():
    """pydensecrf's module and unary helper, or a one-line BackendUnavailable."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise BackendUnavailable("CRF refinement needs pydensecrf2, which is not installed", extra="crf") from None
    return dcrf, unary_from_softmax


def import_matting(what: str = "alpha matting"):
    """pymatting's closed-form solver, or a one-line BackendUnavailable naming ``what`` needs it."""
    try:
        from pymatting import estimate_alpha_cf
    except ImportError:
        raise BackendUnavailable(f"{what} needs pymatting, which is not installed", extra="matting") from None
    return estimate_alpha_cf


def import_opencv(what: str):
    """OpenCV (``cv2``), or a one-line BackendUnavailable naming ``what`` needs it."""
    try:
        import cv2
    except ImportError:
        raise BackendUnavailable(f"{what} needs OpenCV, which is not installed", extra="portrait") from None
    return cv2


def downscaled(image: np.ndarray, plane: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W, 3) and ``plane`` (H, W) resized so the long side is at most ``max_side``
    (unchanged when already smaller): the solvers' cost grows with the pixel count."""
    height, width = plane.shape
    scale = min(1.0, max_side / max(height, width))
    if scale == 1.0:
        return image, plane
    small_h, small_w = max(1, round(height * scale)), max(1, round(width * scale))
    small_img = np.stack([resize_plane(image[..., c], small_h, small_w) for c in range(3)], -1)
    return small_img, resize_plane(plane, small_h, small_w)


def dense_crf(image: np.ndarray, prob: np.ndarray, options: CrfOptions = CrfOptions()) -> np.ndarray:
    """The CRF's marginal probability of "object" per pixel, (H, W) float32 in [0, 1]."""
    dcrf, unary_from_softmax = import_crf()
    height, width = prob.shape
    p = np.clip(prob.astype(np.float32), 1e-4, 1 - 1e-4)
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - p, p]))))
    crf.addPairwiseGaussian(sxy=options.smooth_sxy, compat=options.smooth_compat)
    crf.addPairwiseBilateral(
        sxy=options.bilateral_sxy,
        srgb=options.bilateral_srgb,
        rgbim=np.ascontiguousarray(to_uint8(image)),
        compat=options.bilateral_compat,
    )
    marginals = np.asarray(crf.inference(options.iterations), dtype=np.float32).reshape(2, height, width)
    return marginals[1]


@dataclass(frozen=True)
class MattingOptions:
    """Closed-form alpha matting (Levin et al.) on a trimap cut from the mask, as rembg does.

    Pixels whose map value is ≥ ``fg_threshold`` (of 255) are sure foreground, ≤
    ``bg_threshold`` sure background; both regions shrink by ``erode`` px where they meet, so
    the unknown band covers the whole soft edge (hair). (rembg's ``erode_structure_size`` 10
    is ``erode`` 5 here.) Images are matted at most ``max_side`` px on the
    long side (the solver's cost grows with the unknown area) and the alpha scaled back.
    """

    fg_threshold: int = 240
    bg_threshold: int = 10
    erode: int = 5
    max_side: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.bg_threshold < self.fg_threshold <= 255:
            raise ConfigError(
                "matting thresholds need 0 ≤ --bg-threshold < --fg-threshold ≤ 255, got "
                f"{self.bg_threshold} and {self.fg_threshold}"
            )
        if self.erode < 0 or self.max_side < 16:
            raise ConfigError("--erode must be ≥ 0 and the matting size ≥ 16 px")


def trimap(prob: np.ndarray, options: MattingOptions) -> np.ndarray:
    """1 = sure foreground, 0 = sure background, 0.5 = unknown (solved by the matting)."""
    from scipy.ndimage import binary_erosion

    # border_value=1: erode only where a region meets another one, not along the image's
    # own border (an object touching the frame keeps a sure edge there)
    values = to_uint8(prob)
    side = 2 * options.erode + 1
    structure = np.ones((side, side), bool) if options.erode > 0 else None
    fg, bg = values >= options.fg_threshold, values <= options.bg_threshold
    if structure is not None:
        fg = binary_erosion(fg, structure, border_value=1)
        bg = binary_erosion(bg, structure, border_value=1)
    result = np.full(prob.shape, 0.5, np.float64)
    result[fg], result[bg] = 1.0, 0.0
    return result


@dataclass(frozen=True)
class MattingResult:
    alpha: np.ndarray
    note: str | None = None  # why the map was kept as it is, when it was


def alpha_matting(image: np.ndarray, prob: np.ndarray, options: MattingOptions = MattingOptions()) -> MattingResult:
    """Soft alpha from the image where the map is unsure; sure regions keep 0/1."""
    estimate_alpha_cf = import_matting()
    height, width = prob.shape
    small_img, small_map = downscaled(image, prob, options.max_side)
    tri = trimap(small_map, options)
    if not (tri == 1).any() or not (tri == 0).any():
        return MattingResult(
            prob,
            "matting skipped: the trimap has no sure foreground or no sure background "
            "(try other --fg-threshold/--bg-threshold/--erode)",
        )
    if not (tri == 0.5).any():
        return MattingResult(prob, "matting skipped: no unknown region between the thresholds")
    with contextlib.redirect_stdout(io.StringIO()):  # pymatting prints solver warnings to stdout
        alpha = estimate_alpha_cf(np.clip(small_img, 0, 1).astype(np.float64), tri)
    alpha = np.clip(alpha, 0, 1).astype(np.float32)
    if alpha.shape != (height, width):
        alpha = np.clip(resize_plane(alpha, height, width), 0, 1)
    return MattingResult(alpha)


DECONTAMINATE_MAX_SIDE = 2000  # the estimate runs at most this size on the long side (cost ∝ pixels)


def decontaminate(image: np.ndarray, alpha: np.ndarray, max_side: int = DECONTAMINATE_MAX_SIDE) -> np.ndarray:
    """The foreground colour behind soft alpha (pymatting's multilevel foreground estimation,
    Germer et al. 2020): a pixel of hair over a lawn is ``α·F + (1−α)·B``, and a cut-out that
    keeps the photo's colour there carries the lawn's green onto any new background. Where
    alpha is 1 the photo's own colour is kept. Large images are estimated at ``max_side`` and
    the correction (F − I) scaled back, so fine texture stays the photo's."""
    try:
        from pymatting import estimate_foreground_ml
    except ImportError:
        raise BackendUnavailable("--decontaminate needs pymatting, which is not installed", extra="matting") from None
    height, width = alpha.shape
    small_img, small_alpha = downscaled(image, alpha, max_side)
    foreground = estimate_foreground_ml(
        np.clip(small_img, 0, 1).astype(np.float64), np.clip(small_alpha, 0, 1).astype(np.float64)
    )
    correction = foreground - small_img
    if correction.shape[:2] != (height, width):
        correction = np.stack([resize_plane(correction[..., c], height, width) for c in range(3)], -1)
    result = np.clip(image + correction, 0.0, 1.0).astype(np.float32)
    sure = alpha >= 0.999
    result[sure] = image[sure]
    return result
