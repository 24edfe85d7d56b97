"""The Python entry point: a few lines from a photo to its mask, offline.

    >>> import u2zoo
    >>> mask = u2zoo.segment("photo.jpg")          # (H, W) float map in [0, 1]
    >>> seg = u2zoo.load("u2netp")                  # reuse one model for many images
    >>> masks = seg.maps([image_a, image_b])

With no model named, both use the best shipped saliency model, by the same rule as
``u2zoo demo`` (``u2zoo.zoo.default_model``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from u2zoo.tasks.engine import Segmenter
from u2zoo.zoo.default_model import choose_default
from u2zoo.zoo.images import load_rgb
from u2zoo.zoo.reference import TorchPredictor
from u2zoo.zoo.weights import load_model


def load(
    model: str | None = None, *, weights: str | None = None, contract: str | None = None, threads: int | None = None
) -> Segmenter:
    """A Segmenter on the PyTorch model ``model`` (default: the best shipped saliency model)."""
    name = model or choose_default().name
    module, _, model_contract = load_model(name, weights, contract_variant=contract, progress=False)
    return Segmenter(TorchPredictor(module, threads=threads), model_contract)


def segment(image: str | Path | np.ndarray, model: str | None = None) -> np.ndarray:
    """The (H, W) map of one image: a file path, or an RGB array (uint8, or float in [0, 1])."""
    if isinstance(image, (str, Path)):
        pixels = load_rgb(Path(image))
    else:
        pixels = np.asarray(image)
        pixels = pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels.astype(np.float32)
    return load(model).maps([pixels])[0]
