"""Mask preparation with OpenCV's GrabCut: training masks from a model's map (sure foreground
and background where the map is confident, "probable" elsewhere) or from a box per image, and
an overlay per image for a person to review before the masks go to ``u2zoo train --masks``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from u2zoo.errors import ConfigError, ImageError
from u2zoo.tasks.refine import import_opencv
from u2zoo.zoo.contract import to_uint8


@dataclass(frozen=True)
class GrabCutOptions:
    """Map values ≥ ``sure_fg`` seed sure foreground, ≤ ``sure_bg`` sure background; in between
    the seed is probable foreground (≥ 0.5) or probable background. ``iterations`` of GrabCut."""

    sure_fg: float = 0.95
    sure_bg: float = 0.05
    iterations: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.sure_bg < 0.5 < self.sure_fg <= 1.0:
            raise ConfigError(f"GrabCut seeds need 0 ≤ sure-bg < 0.5 < sure-fg ≤ 1, got {self.sure_bg}, {self.sure_fg}")
        if self.iterations < 1:
            raise ConfigError("--iterations must be at least 1")


def import_cv2():
    return import_opencv("GrabCut")


def _check_image(image: np.ndarray) -> None:
    height, width = image.shape[:2]
    if height < 2 or width < 2:
        raise ImageError(f"GrabCut needs an image of at least 2×2 pixels, not {width}×{height}")
    if float(image.max() - image.min()) < 1e-6:
        raise ImageError("GrabCut cannot separate anything in a blank (single-colour) image")


def seed_from_map(prob: np.ndarray, options: GrabCutOptions = GrabCutOptions()) -> np.ndarray:
    """GrabCut's mask labels from a map in [0, 1]."""
    cv2 = import_cv2()
    seed = np.where(prob >= 0.5, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seed[prob >= options.sure_fg] = cv2.GC_FGD
    seed[prob <= options.sure_bg] = cv2.GC_BGD
    return seed


def grabcut(
    image: np.ndarray,
    prob: np.ndarray | None = None,
    box: tuple[int, int, int, int] | None = None,
    options: GrabCutOptions = GrabCutOptions(),
) -> np.ndarray:
    """A binary mask (H, W) float32 in {0, 1}, seeded by ``prob`` or by ``box`` (x0, y0, x1, y1)."""
    cv2 = import_cv2()
    _check_image(image)
    pixels = np.ascontiguousarray(to_uint8(image)[..., ::-1])  # OpenCV is BGR
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    if box is not None:
        x0, y0, x1, y1 = box
        labels = np.zeros(image.shape[:2], np.uint8)
        mode, rect = cv2.GC_INIT_WITH_RECT, (x0, y0, x1 - x0, y1 - y0)
    elif prob is not None:
        labels = seed_from_map(prob, options)
        mode, rect = cv2.GC_INIT_WITH_MASK, None
        if not np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).any():
            return np.zeros(image.shape[:2], np.float32)  # the map saw nothing: nothing to grow
        if not np.isin(labels, (cv2.GC_BGD, cv2.GC_PR_BGD)).any():
            return np.ones(image.shape[:2], np.float32)
    else:
        raise ConfigError("GrabCut needs a map or a box to start from")
    try:
        cv2.grabCut(pixels, labels, rect, background, foreground, options.iterations, mode)
    except cv2.error as exc:
        raise ImageError(f"GrabCut failed: {str(exc).strip().splitlines()[-1]}") from None
    return np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)


def load_boxes(path: Path, images: list[Path]) -> dict[str, tuple[int, int, int, int]]:
    """``{"name.jpg": [x0, y0, x1, y1], …}`` keyed by file name; every name must be an input
    and every box must lie inside its image (checked up front, one line naming the first wrong)."""
    from PIL import Image

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read boxes file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object of image name → [x0, y0, x1, y1]")
    by_name = {p.name: p for p in images}
    boxes = {}
    for name, box in data.items():
        if name not in by_name:
            raise ConfigError(f"{path}: box for {name!r}, which is not among the inputs")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)):
            raise ConfigError(f"{path}: box of {name!r} must be four whole numbers [x0, y0, x1, y1]")
        with Image.open(by_name[name]) as im:
            width, height = im.size
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ConfigError(f"{path}: box {box} of {name!r} is not inside the {width}×{height} image")
        boxes[name] = (x0, y0, x1, y1)
    return boxes


def review_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photo with the mask tinted red and its outline in yellow: what a reviewer checks."""
    from scipy.ndimage import binary_erosion

    out = image.copy()
    inside = mask > 0.5
    out[inside] = 0.55 * out[inside] + 0.45 * np.array([1.0, 0.1, 0.1])
    edge = inside & ~binary_erosion(inside, iterations=2)
    out[edge] = (1.0, 0.9, 0.0)
    return out
