"""Reading images into RGB float arrays, with one-line errors for what cannot be read.

Grayscale, palette, RGBA, CMYK and 16-bit images are converted (16-bit keeps its full
precision: the contract divides by the image's max anyway); unreadable or empty files raise
``ImageError``. Every image is turned upright by its EXIF orientation first, as viewers show
it: a phone photo stored sideways would otherwise get a mask that does not line up with it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from u2zoo.errors import ImageError, ImageTooLarge

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
# Refuse images above this many pixels before decoding them (a 20000×20000 PNG of a few KB
# would otherwise take 4.8 GB as float RGB). 100 MP admits any camera photo; pipelines
# take --max-pixels to change it.
DEFAULT_MAX_PIXELS = 100_000_000


def shown(path: str | Path) -> str:
    """A file name fit for a one-line message: control and unprintable characters (a newline,
    an undecodable byte) escaped as Python would, everything else as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(path))


def load_rgb(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an (H, W, 3) float32 RGB array in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {shown(path)}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {shown(path)}")
    return _decode(path, f"image {shown(path)}", max_pixels)


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, what: str = "the image") -> np.ndarray:
    """Decode image bytes (an HTTP body, a frame) like ``load_rgb`` reads a file."""
    if not data:
        raise ImageError(f"{what} is empty (0 bytes)")
    return _decode(io.BytesIO(data), what, max_pixels)


def _decode(source, what: str, max_pixels: int | None) -> np.ndarray:
    """Check the pixel count from the header, then decode: a huge image is refused unread."""
    if Image.MAX_IMAGE_PIXELS is not None and (max_pixels is None or max_pixels > Image.MAX_IMAGE_PIXELS):
        # Our limit replaces Pillow's decompression-bomb guard, which Image.open applies (at
        # twice its limit) before we could read the size: set before opening, so the first
        # huge image gets the same refusal as every later one.
        Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(source) as img:
            if max_pixels and img.width * img.height > max_pixels:
                raise ImageTooLarge(
                    f"{what} is {img.width}×{img.height} = {img.width * img.height / 1e6:.0f} MP, over "
                    f"the limit of {max_pixels / 1e6:g} MP (raise it with --max-pixels)"
                )
            ImageOps.exif_transpose(img, in_place=True)  # loads it, upright
            return pil_to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(f"cannot read {what}: not an image format Pillow can decode") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read {what}: {exc}") from None


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow image → (H, W, 3) float32 RGB in [0, 1]."""
    if img.width == 0 or img.height == 0:
        raise ImageError("image has zero width or height")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (PNG/TIFF)
        gray = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if gray.max() > 255 or img.mode.startswith("I;16") else 255.0
        gray = np.clip(gray / peak, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    # RGBA/LA/P/CMYK: alpha is dropped, as the official code (which reads channels 0..2) does
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise ImageError(f"input not found: {shown(path)}")
    return found


def load_mask(path: str | Path, size: tuple[int, int], resample: str = "nearest") -> tuple[np.ndarray, bool]:
    """A mask as float [0, 1] at ``size`` (H, W) and whether it had to be resized (``nearest``
    keeps ground truth binary for scoring; ``bilinear`` suits training targets)."""
    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
    try:
        with Image.open(path) as img:
            ImageOps.exif_transpose(img, in_place=True)  # upright, like its image
            gray = img.convert("L")
            resized = gray.size != (size[1], size[0])
            if resized:
                gray = gray.resize((size[1], size[0]), filters[resample])
            return np.asarray(gray, np.float32) / 255.0, resized
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot read mask {shown(path)}: {exc}") from None
