"""What a pipeline makes of an image and its map: the mask, an RGBA cut-out, a composite on
a colour or on another image. Refinement (CRF, then matting) turns the model's map into the
final alpha first, so every output of one image agrees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from u2zoo.errors import ConfigError
from u2zoo.tasks.refine import (
    CrfOptions,
    MattingOptions,
    alpha_matting,
    decontaminate,
    dense_crf,
    import_crf,
    import_matting,
)
from u2zoo.zoo.contract import resize_plane, to_uint8

_NAMED_COLOURS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "red": (255, 0, 0),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}
KINDS = ("mask", "cutout", "composite")
SUFFIXES = {"mask": "", "cutout": "_cutout", "composite": "_composite"}  # stem.png, stem_cutout.png, …


def parse_colour(text: str) -> tuple[int, int, int]:
    """``#RRGGBB``, ``R,G,B`` (0–255) or a name (white, black, green, blue, red, grey)."""
    value = text.strip().lower()
    if value in _NAMED_COLOURS:
        return _NAMED_COLOURS[value]
    if re.fullmatch(r"#?[0-9a-f]{6}", value):
        value = value.lstrip("#")
        return tuple(int(value[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    parts = value.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    raise ConfigError(f"cannot read colour {text!r} (use #RRGGBB, R,G,B or one of: {', '.join(_NAMED_COLOURS)})")


@dataclass
class OutputOptions:
    """Which files each input gives, and how its map is refined first."""

    kinds: tuple[str, ...] = ("mask",)
    background_colour: tuple[int, int, int] | None = None
    background_image: np.ndarray | None = field(default=None, repr=False)  # RGB float [0, 1]
    crf: CrfOptions | None = None
    matting: MattingOptions | None = None
    decontaminate: bool = False  # cut-outs and composites carry the estimated foreground colour

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ConfigError(f"unknown output {', '.join(unknown) or '(none)'} (choose from: {', '.join(KINDS)})")
        has_background = self.background_colour is not None or self.background_image is not None
        if self.background_colour is not None and self.background_image is not None:
            raise ConfigError("give one of --bg-colour and --bg-image, not both")
        if "composite" in self.kinds and not has_background:
            raise ConfigError("a composite needs --bg-colour or --bg-image")
        # a missing refinement backend fails here, before any model loads or request arrives
        if self.crf is not None:
            import_crf()
        if self.matting is not None:
            import_matting()
        if self.decontaminate:
            import_matting("--decontaminate")


@dataclass
class Rendered:
    alpha: np.ndarray
    images: dict[str, Image.Image]
    notes: list[str] = field(default_factory=list)


def refine(image: np.ndarray, prob: np.ndarray, options: OutputOptions) -> tuple[np.ndarray, list[str]]:
    """The final alpha: CRF on the model's map, then matting on its trimap, as asked."""
    notes: list[str] = []
    alpha = prob
    if options.crf is not None:
        alpha = dense_crf(image, alpha, options.crf)
    if options.matting is not None:
        matted = alpha_matting(image, alpha, options.matting)
        alpha = matted.alpha
        if matted.note:
            notes.append(matted.note)
    return alpha, notes


def fit_background(background: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale a background image to cover (height, width) and centre-crop it: no stretching."""
    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw)
    sh, sw = max(height, round(bh * scale)), max(width, round(bw * scale))
    scaled = np.stack([resize_plane(background[..., c], sh, sw) for c in range(3)], -1)
    top, left = (sh - height) // 2, (sw - width) // 2
    return scaled[top : top + height, left : left + width]


def composite(image: np.ndarray, alpha: np.ndarray, options: OutputOptions) -> np.ndarray:
    """``alpha · image + (1 − alpha) · background``, float RGB in [0, 1]."""
    height, width = alpha.shape
    if options.background_image is not None:
        background = fit_background(options.background_image, height, width)
    else:
        background = np.broadcast_to(np.asarray(options.background_colour, np.float32) / 255.0, image.shape)
    a = alpha[..., None]
    return image * a + background * (1 - a)


def render(image: np.ndarray, prob: np.ndarray, options: OutputOptions) -> Rendered:
    """Refine the map, then make each asked-for output as a Pillow image."""
    alpha, notes = refine(image, prob, options)
    if options.decontaminate and ({"cutout", "composite"} & set(options.kinds)):
        image = decontaminate(image, alpha)
    images: dict[str, Image.Image] = {}
    if "mask" in options.kinds:
        images["mask"] = Image.fromarray(to_uint8(alpha), mode="L")
    if "cutout" in options.kinds:
        images["cutout"] = Image.fromarray(np.dstack([to_uint8(image), to_uint8(alpha)]), mode="RGBA")
    if "composite" in options.kinds:
        images["composite"] = Image.fromarray(to_uint8(composite(image, alpha, options)), mode="RGB")
    return Rendered(alpha, images, notes)
