"""Folder datasets for training and distillation, with the seed's augmentations.

Images (and optional masks paired by file stem) are read with the same loader as inference
and go through the same pre-processing contract, so a model trained here sees exactly what
its artifacts will see. Augmentations (``Augment``): random resized crop and horizontal flip
(applied to image and mask alike), brightness ±20%, contrast ±15% and Gaussian noise σ = 0.01
(image only, in [0, 1] RGB). Every random choice comes from ``(seed, epoch, index)``, so a run
is reproducible and a resumed run sees the same samples it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from u2zoo.errors import ConfigError
from u2zoo.zoo.contract import Contract, preprocess, resize_plane
from u2zoo.zoo.images import IMAGE_SUFFIXES, list_images, load_mask, load_rgb


@dataclass(frozen=True)
class Augment:
    brightness: float = 0.20  # multiply by U(1 - b, 1 + b)
    contrast: float = 0.15  # scale around the mean by U(1 - c, 1 + c)
    noise_sigma: float = 0.01  # Gaussian noise in [0, 1] RGB
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


def pair_masks(images: list[Path], masks_dir: Path) -> list[Path]:
    """The mask of every image, by stem; an image without one is an error naming the first few."""
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        extra = sorted(set(masks) - {p.stem for p in images})
        hint = f"; masks without an image: {', '.join(extra[:3])}" if extra else ""
        raise ConfigError(f"{len(missing)} of {len(images)} image(s) have no mask in {masks_dir} with the same stem "
                          f"(e.g. {', '.join(missing[:3])}){hint}")
    return [masks[p.stem] for p in images]


def _random_crop_box(rng: np.random.Generator, height: int, width: int, aug: Augment) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, torchvision's recipe with a centre fallback."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*aug.crop_scale)
        ratio = np.exp(rng.uniform(np.log(aug.crop_ratio[0]), np.log(aug.crop_ratio[1])))
        w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


def augment_pair(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator,
                 aug: Augment) -> tuple[np.ndarray, np.ndarray | None]:
    """Geometric changes on both, photometric ones on the image only."""
    top, left, h, w = _random_crop_box(rng, *image.shape[:2], aug)
    image = image[top:top + h, left:left + w]
    mask = None if mask is None else mask[top:top + h, left:left + w]
    if aug.hflip and rng.random() < 0.5:
        image = image[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    image = image * rng.uniform(1 - aug.brightness, 1 + aug.brightness)
    mean = image.mean()
    image = (image - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + mean
    image = image + rng.normal(0.0, aug.noise_sigma, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


def _cap_size(image: np.ndarray, longest: int) -> np.ndarray:
    height, width = image.shape[:2]
    if max(height, width) <= longest:
        return image
    scale = longest / max(height, width)
    pil = Image.fromarray((image * 255).round().astype(np.uint8))
    pil = pil.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    return np.asarray(pil, np.float32) / 255.0


class FolderDataset:
    """``images_dir`` (+ optional ``masks_dir``) → contract-preprocessed samples.

    A sample is ``{"image": (3, h, w) float32, "mask": (1, h, w) float32 (absent without
    masks), "name": str}``. Masks are binarised at 0.5 unless ``soft_masks``. Images are
    decoded once and kept in memory (the sets used here are small).
    """

    def __init__(self, images_dir: str | Path, contract: Contract, *, masks_dir: str | Path | None = None,
                 size: tuple[int, int] | None = None, augment: Augment | None = None, seed: int = 0,
                 soft_masks: bool = False):
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise ConfigError(f"image folder not found: {images_dir}")
        self.paths = list_images([images_dir])
        if not self.paths:
            raise ConfigError(f"no images in {images_dir}")
        self.contract, self.size = contract, size or contract.pre.size
        self.augment, self.seed, self.soft_masks, self.epoch = augment, seed, soft_masks, 0
        mask_paths = None
        if masks_dir is not None:
            if not Path(masks_dir).is_dir():
                raise ConfigError(f"mask folder not found: {masks_dir}")
            mask_paths = pair_masks(self.paths, Path(masks_dir))
        self.images, self.masks, self.resized_masks = [], None if mask_paths is None else [], 0
        longest = 3 * max(self.size)  # big photos are kept at most 3× the training size: crops stay cheap
        for index, path in enumerate(self.paths):
            image = load_rgb(path)
            if mask_paths is not None:
                mask, resized = load_mask(mask_paths[index], image.shape[:2], "bilinear")  # to its own image
                self.resized_masks += resized
                image = _cap_size(image, longest)
                self.masks.append(resize_plane(mask, *image.shape[:2]))
            else:
                image = _cap_size(image, longest)
            self.images.append(image)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations depend on the epoch, so each epoch sees new (but reproducible) samples."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        mask = None if self.masks is None else self.masks[index]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask = augment_pair(image, mask, rng, self.augment)
        sample: dict[str, Any] = {"image": preprocess(image, self.contract.pre, self.size),
                                  "name": self.paths[index].name}
        if mask is not None:
            plane = resize_plane(np.ascontiguousarray(mask), self.size[0], self.size[1])
            plane = np.clip(plane, 0.0, 1.0) if self.soft_masks else (plane >= 0.5).astype(np.float32)
            sample["mask"] = plane[None].astype(np.float32)
        return sample
