"""The portrait-drawing face crop: what ``u2net_portrait`` sees of a photo.

The portrait network was trained on tightly framed 512×512 faces (the APDrawing style), so
on a whole photo it draws poorly. The official demo (xuebinqin/U-2-Net,
``u2net_portrait_demo.py``) therefore finds the largest face with OpenCV's Haar cascade and
crops a generous box around it. This module reproduces that recipe exactly, so every
runtime draws from the same input:

1. :class:`FaceDetector` — grayscale, ``detectMultiScale(gray, 1.1, 4)`` with
   ``haarcascade_frontalface_default.xml``, keep the largest box (by w*h).
2. :func:`crop_face` — grow the box by 0.4·w left and right, 0.6·h above and 0.2·h below
   (each truncated to int); what falls outside the photo is white; pad the short side with
   white to (nearly) square; resize to 512×512 with ``INTER_AREA``. The arithmetic runs on
   uint8 pixels, as in the official code, so results match it bit for bit.

Where this differs from the official demo: with no face, the official runs the network on
the whole photo at its own size; here the whole photo is resized (squashed) to
``size``×``size`` so every runtime, including fixed-shape artifacts, gets its one input
shape. A warning is not printed: ``PortraitInput.face is None`` says it.

Optional, not in the official demo: :class:`LandmarkAligner` levels the eyes (dlib's
68-point landmarks) before the crop, for tilted heads. Its geometry is the pure
:func:`align_by_eyes`.

OpenCV is imported only when needed (``pip install 'u2zoo[portrait]'``), dlib likewise
(``u2zoo[landmarks]``), so importing this module never fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.errors import BackendUnavailable, ConfigError, ImageError, one_line
from u2zoo.tasks.refine import import_opencv

CASCADE_FILE = "haarcascade_frontalface_default.xml"
SCALE_FACTOR = 1.1  # official detectMultiScale arguments
MIN_NEIGHBORS = 4
# how far the official crop grows the detected box, as fractions of its width/height
GROW_SIDES = 0.4
GROW_TOP = 0.6
GROW_BOTTOM = 0.2
WHITE = 255
LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"


@dataclass(frozen=True)
class FaceBox:
    """A face rectangle in pixels: top-left corner (x, y), width w, height h."""

    x: int
    y: int
    w: int
    h: int


@dataclass
class PortraitInput:
    """What goes into the portrait network, and how it was obtained.

    ``image``: (size, size, 3) float32 RGB in [0, 1]. ``face``: the box it was cropped around,
    in the coordinates of the (aligned, if aligned) photo; None when no face was found and
    ``image`` is the whole photo resized. ``aligned_degrees``: the rotation applied before
    detection, None when no aligner was used or there was no face to align.
    """

    image: np.ndarray
    face: FaceBox | None
    aligned_degrees: float | None


def _cv2() -> Any:
    return import_opencv("the portrait face crop")


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] (or uint8) → (H, W, 3) uint8, rounding to the nearest level.

    Rounding (not truncating) makes ``load_rgb``'s x/255 come back as exactly x, so the crop
    works on the very pixels the official demo reads. Grayscale (H, W) or (H, W, 1) images
    are repeated to three channels; anything else is an ``ImageError``.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"expected an (H, W, 3) RGB image, got an array of shape {np.shape(image)}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ImageError(f"expected a float image in [0, 1] or uint8, got dtype {array.dtype}")
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


class FaceDetector:
    """The official demo's face detector: OpenCV's frontal-face Haar cascade, largest face wins.

    The cascade file is parsed once here, so one detector serves any number of images.
    """

    def __init__(self, cascade_path: str | Path | None = None):
        cv2 = _cv2()
        self._cv2 = cv2
        path = Path(cascade_path) if cascade_path is not None else Path(cv2.data.haarcascades) / CASCADE_FILE
        # a missing file only logs to stderr inside OpenCV and yields an empty classifier,
        # so check for it first to give one clear line instead
        if not path.is_file():
            raise ConfigError(f"face detector cascade not found: {path}")
        # load() rather than the constructor: on a malformed file the constructor surfaces
        # OpenCV's error as a SystemError, load() as a plain cv2.error
        self._cascade = cv2.CascadeClassifier()
        try:
            loaded = self._cascade.load(str(path))
        except cv2.error as exc:
            reason = one_line(getattr(exc, "err", None) or exc)
            raise ConfigError(
                f"cannot load face detector cascade {path}: not a valid OpenCV cascade file ({reason})"
            ) from None
        if not loaded or self._cascade.empty():
            raise ConfigError(f"cannot load face detector cascade {path}: not a valid OpenCV cascade file")
        self.path = path

    def detect_all(self, image: np.ndarray) -> list[FaceBox]:
        """Every face the cascade reports, in its order (useful for diagnostics)."""
        cv2 = self._cv2
        # the official converts imread's BGR with BGR2GRAY; RGB2GRAY on RGB gives the same gray
        gray = cv2.cvtColor(to_uint8_rgb(image), cv2.COLOR_RGB2GRAY)
        faces = self._cascade.detectMultiScale(gray, SCALE_FACTOR, MIN_NEIGHBORS)
        return [FaceBox(int(x), int(y), int(w), int(h)) for x, y, w, h in faces]

    def detect(self, image: np.ndarray) -> FaceBox | None:
        """The largest face (by w*h; the first one on ties, as in the official), or None."""
        faces = self.detect_all(image)
        if not faces:
            return None
        return max(faces, key=lambda f: f.w * f.h)  # max keeps the first of equal areas


def face_region(image: np.ndarray, face: FaceBox) -> np.ndarray:
    """The official crop before resizing: uint8 (H', W', 3), white-padded, nearly square.

    Kept apart from :func:`crop_face` so its exact arithmetic can be checked pixel by pixel.
    The square padding only happens when the sides differ by more than 2 pixels and adds
    ``int(diff / 2)`` to both short sides, so the result can stay up to 2 pixels (after
    padding: 1 pixel) off square; the official accepts that small squash in the resize.
    """
    pixels = to_uint8_rgb(image)
    height, width = pixels.shape[:2]
    if face.w <= 0 or face.h <= 0:
        raise ConfigError(f"face box must have a positive size, got {face}")
    if face.x >= width or face.y >= height or face.x + face.w <= 0 or face.y + face.h <= 0:
        raise ConfigError(f"face box {face} lies outside the {width}×{height} image")

    side = int(float(face.w) * GROW_SIDES)
    grow_top = int(float(face.h) * GROW_TOP)
    grow_bottom = int(float(face.h) * GROW_BOTTOM)
    left, right = face.x - side, face.x + face.w + side
    top, bottom = face.y - grow_top, face.y + face.h + grow_bottom
    # the part of the grown box outside the photo becomes white padding
    pad_left, pad_right = max(0, -left), max(0, right - width)
    pad_top, pad_bottom = max(0, -top), max(0, bottom - height)
    inside = pixels[max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    region = np.pad(
        inside, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), mode="constant", constant_values=WHITE
    )

    # pad the short side so the face is not squashed by the square resize
    hf, wf = region.shape[:2]
    if hf - 2 > wf:
        extra = int((hf - wf) / 2)
        region = np.pad(region, ((0, 0), (extra, extra), (0, 0)), mode="constant", constant_values=WHITE)
    elif wf - 2 > hf:
        extra = int((wf - hf) / 2)
        region = np.pad(region, ((extra, extra), (0, 0), (0, 0)), mode="constant", constant_values=WHITE)
    return region


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"portrait size must be a positive integer, got {size!r}")


def crop_face(image: np.ndarray, face: FaceBox | None, size: int = 512) -> np.ndarray:
    """The portrait network's input: (size, size, 3) float32 RGB in [0, 1].

    With a face: :func:`face_region` resized with ``INTER_AREA`` (the official recipe).
    Without one (``face is None``): the whole image resized to size×size with ``INTER_AREA``,
    squashing non-square photos (the official would run the network on the unresized photo
    instead; see the module docstring).
    """
    _check_size(size)
    cv2 = _cv2()
    pixels = face_region(image, face) if face is not None else to_uint8_rgb(image)
    resized = cv2.resize(pixels, (int(size), int(size)), interpolation=cv2.INTER_AREA)
    return resized.astype(np.float32) / 255.0


def align_by_eyes(
    image: np.ndarray, left_eye: tuple[float, float], right_eye: tuple[float, float]
) -> tuple[np.ndarray, float]:
    """Rotate the whole image about the eyes' midpoint so the eyes end level.

    ``left_eye`` / ``right_eye`` are (x, y) pixel positions of the eye on the image's left
    and on its right (for dlib's 68 points: the mean of 36–41 and of 42–47). Passed the
    other way round they are swapped, so the rotation is always the small one (|angle| ≤ 90°).

    Returns the rotated image (same size and dtype, corners filled with white, bilinear) and
    the angle in degrees: the eye line's tilt in the input, ``atan2(dy, dx)`` in image
    coordinates (positive when the right-hand eye sits lower). The image is rotated by that
    angle in OpenCV's convention (positive = counter-clockwise on screen), which levels it.
    """
    cv2 = _cv2()
    array = np.asarray(image)
    if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"expected an (H, W) or (H, W, C) image, got an array of shape {array.shape}")
    lx, ly = float(left_eye[0]), float(left_eye[1])
    rx, ry = float(right_eye[0]), float(right_eye[1])
    if rx < lx:
        (lx, ly), (rx, ry) = (rx, ry), (lx, ly)
    if math.hypot(rx - lx, ry - ly) < 1e-6:
        raise ConfigError(f"cannot align by eyes: both eye positions are {left_eye}")
    angle = math.degrees(math.atan2(ry - ly, rx - lx))
    centre = ((lx + rx) / 2.0, (ly + ry) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
    white = 255.0 if array.dtype == np.uint8 else 1.0
    channels = 1 if array.ndim == 2 else array.shape[2]
    rotated = cv2.warpAffine(
        array,
        matrix,
        (array.shape[1], array.shape[0]),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(white,) * min(channels, 4),
    )
    if rotated.ndim == 2 and array.ndim == 3:  # OpenCV drops a trailing single channel
        rotated = rotated[..., None]
    return rotated, angle


class LandmarkAligner:
    """Levels tilted faces by their eyes, found with dlib's 68-point shape predictor.

    Needs dlib (``pip install 'u2zoo[landmarks]'``) and dlib's
    ``shape_predictor_68_face_landmarks.dat`` (not shipped: it is a separate download with
    its own licence terms). Both are checked here, once, so a bad setup fails before any
    image is read.
    """

    def __init__(self, model_path: str | Path):
        try:
            import dlib
        except ImportError:
            raise BackendUnavailable("face alignment needs dlib, which is not installed", extra="landmarks") from None
        path = Path(model_path)
        if not path.is_file():
            raise ConfigError(
                f"landmark model not found: {path} (face alignment needs dlib's 68-point model {LANDMARK_MODEL})"
            )
        try:
            self._predictor = dlib.shape_predictor(str(path))
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot load landmark model {path} (expected dlib's {LANDMARK_MODEL}): {one_line(exc)}"
            ) from None
        self._dlib = dlib
        self.path = path

    def eyes(self, image: np.ndarray, face: FaceBox) -> tuple[tuple[float, float], tuple[float, float]]:
        """Centres (x, y) of the image-left eye (points 36–41) and image-right eye (42–47)."""
        rect = self._dlib.rectangle(int(face.x), int(face.y), int(face.x + face.w), int(face.y + face.h))
        shape = self._predictor(to_uint8_rgb(image), rect)
        if shape.num_parts != 68:
            raise ConfigError(
                f"landmark model {self.path} gives {shape.num_parts} points, not 68 (expected dlib's {LANDMARK_MODEL})"
            )
        points = np.array([(shape.part(i).x, shape.part(i).y) for i in range(36, 48)], dtype=np.float64)
        left, right = points[:6].mean(axis=0), points[6:].mean(axis=0)
        return (float(left[0]), float(left[1])), (float(right[0]), float(right[1]))

    def align(self, image: np.ndarray, face: FaceBox) -> tuple[np.ndarray, float]:
        """The image rotated so the eyes of ``face`` are level, and the angle (see
        :func:`align_by_eyes`)."""
        left, right = self.eyes(image, face)
        return align_by_eyes(image, left, right)


def prepare_portrait(
    image: np.ndarray, detector: FaceDetector, size: int = 512, aligner: LandmarkAligner | None = None
) -> PortraitInput:
    """Photo (H, W, 3) float in [0, 1] → the portrait network's input and how it was cropped.

    With an ``aligner``: detect, level the eyes, then detect again on the rotated photo (the
    box moves with the rotation). Then crop around the largest face, or resize the whole
    photo when there is none.
    """
    _check_size(size)
    angle: float | None = None
    face = detector.detect(image)
    if aligner is not None and face is not None:
        image, angle = aligner.align(image, face)
        face = detector.detect(image)
    return PortraitInput(crop_face(image, face, size), face, angle)
