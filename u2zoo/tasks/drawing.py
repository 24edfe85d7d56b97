"""Portrait line drawing (``u2zoo portrait``): photos → dark-lines-on-white drawings.

The official ``u2net_portrait_demo.py`` recipe, on any runtime: find the largest face, crop
and pad around it to 512×512 (``u2zoo.tasks.portrait``), run the portrait network, and keep
its inverted output (the contract's ``invert``). A photo with no face is drawn whole,
resized to 512×512, and the report says so. ``--align`` levels the eyes first with dlib's
68-point landmarks when dlib and its model file are installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from u2zoo.errors import ConfigError, U2ZooError
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.folder import collect_inputs, save_png, unique_stems, write_error
from u2zoo.tasks.upscale import Upscaler, upscale_photo
from u2zoo.zoo.contract import to_uint8
from u2zoo.zoo.images import load_rgb, shown


@dataclass
class DrawingReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    no_face: list[Path] = field(default_factory=list)  # drawn whole, as the official demo does
    aligned: dict[Path, float] = field(default_factory=dict)  # degrees each photo was rotated by
    notes: list[tuple[Path, str]] = field(default_factory=list)  # e.g. an output name that keeps its extension
    drawn: int = 0
    seconds: float = 0.0


def check_portrait_contract(segmenter: Segmenter, what: str) -> None:
    """Drawing needs a portrait model: its contract crops the face and inverts the output.
    A saliency model would give a negative mask, so it is refused, not quietly re-purposed."""
    pre, post = segmenter.contract.pre, segmenter.contract.post
    if not (pre.face_crop and post.invert):
        raise ConfigError(
            f"{what} is not a portrait-drawing model (its contract has no face crop and no inverted "
            "output); use u2net_portrait (`--model u2net_portrait --weights u2net_portrait.pth`) or an "
            "artifact converted from it"
        )


@dataclass(frozen=True)
class Blend:
    """The official composite (``u2net_portrait_composite.py``): the photo blurred by a
    Gaussian of ``sigma`` px, mixed with the drawing: ``alpha·blurred + (1 − alpha)·drawing``."""

    sigma: float = 20.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.sigma < 0 or not 0 <= self.alpha <= 1:
            raise ConfigError(
                f"--blend-sigma must be ≥ 0 and --blend-alpha in [0, 1], got {self.sigma} and {self.alpha}"
            )

    def apply(self, photo: np.ndarray, drawing: np.ndarray) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        blurred = gaussian_filter(photo, sigma=(self.sigma, self.sigma, 0))  # per channel
        return self.alpha * blurred + (1 - self.alpha) * drawing[..., None]


def draw_files(
    segmenter: Segmenter,
    inputs: list[str | Path],
    out_dir: Path,
    aligner=None,
    save_crop: bool = False,
    max_pixels: int | None = None,
    progress: bool = True,
    blend: Blend | None = None,
    upscaler: Upscaler | None = None,
) -> DrawingReport:
    """One 512×512 drawing per readable photo (``stem.png``); its face crop
    (``stem_face.png``) and the official blurred-photo composite (``stem_composite.png``) if asked.
    With an ``upscaler``, each photo is super-resolved before its face is found and cropped, so a
    small face gives the network real detail instead of an interpolated one."""
    from tqdm import tqdm

    images, _ = collect_inputs(inputs, out_dir)
    if not images:
        raise U2ZooError(f"no images found in: {', '.join(map(shown, inputs))}")
    suffixes = ["", *(["_face"] if save_crop else []), *(["_composite"] if blend else [])]
    images, renamed = unique_stems(images, suffixes)
    report = DrawingReport(notes=renamed)
    started = time.perf_counter()
    for path, stem in tqdm(images, desc="portrait", unit="img", disable=not progress):
        try:
            photo = load_rgb(path, max_pixels)
            if upscaler is not None:
                photo = upscale_photo(upscaler, photo, max_pixels, progress)
            portrait = segmenter.portrait_input(photo, aligner)
        except U2ZooError as exc:
            report.failed.append((path, str(exc)))
            continue
        (drawing,) = segmenter.maps([portrait.image])
        pictures = {"": Image.fromarray(to_uint8(drawing), mode="L")}
        if save_crop:
            pictures["_face"] = Image.fromarray(to_uint8(portrait.image), mode="RGB")
        if blend:
            pictures["_composite"] = Image.fromarray(to_uint8(blend.apply(portrait.image, drawing)), mode="RGB")
        try:
            for suffix, picture in pictures.items():
                target = out_dir / stem.parent / f"{stem.name}{suffix}.png"
                save_png(picture, target)
                report.written.append(target)
        except OSError as exc:
            report.failed.append((path, write_error(target, exc)))
            continue
        report.drawn += 1
        if portrait.face is None:
            report.no_face.append(path)
        if portrait.aligned_degrees is not None:
            report.aligned[path] = portrait.aligned_degrees
    report.seconds = time.perf_counter() - started
    return report
