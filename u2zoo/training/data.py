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
    """The mask of every image, by stem. Images without a mask, or masks without an image, are
    an error naming the first few of each (a half-paired folder is a mistake, not a subset)."""
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [p.name for p in images if p.stem not in masks]
    stems = {p.stem for p in images}
    extra = sorted(m.name for stem, m in masks.items() if stem not in stems)
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} of {len(images)} image(s) have no mask in {masks_dir} with the same stem "
                f"(e.g. {', '.join(missing[:3])})"
            )
        if extra:
            parts.append(
                f"masks without an image: {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''} "
                f"({len(extra)} in {masks_dir})"
            )
        raise ConfigError("; ".join(parts))
    return [masks[p.stem] for p in images]


def check_disjoint(train: list[Path], val: list[Path]) -> None:
    """Refuse a validation image that is also a training image (same stem, or the same bytes)."""
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    train_stems = {p.stem for p in train}
    shared = sorted(p.name for p in val if p.stem in train_stems)
    if not shared:
        train_digests = {digest(p) for p in train}
        shared = sorted(p.name for p in val if digest(p) in train_digests)
    if shared:
        raise ConfigError(
            f"{len(shared)} validation image(s) are also in the training set (e.g. "
            f"{', '.join(shared[:3])}): refused, a score on training images is not a validation figure"
        )


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


def augment_pair(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, aug: Augment
) -> tuple[np.ndarray, np.ndarray | None]:
    """Geometric changes on both, photometric ones on the image only."""
    top, left, h, w = _random_crop_box(rng, *image.shape[:2], aug)
    image = image[top : top + h, left : left + w]
    mask = None if mask is None else mask[top : top + h, left : left + w]
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
    masks), "teacher": (1, h, w) float32 (after :meth:`attach_teacher`), "name": str}``. Masks
    are binarised at 0.5 unless ``soft_masks``. Images are decoded once and kept in memory as
    8-bit RGB, at most 3× the training size (crops stay cheap and the loader never waits for
    a decoder). A mask of another size than its image is resized to it (bilinear), and named
    in ``resized_names``. An image that does not decode is skipped, named and counted in
    ``skipped`` (name, reason); a set where nothing decodes is an error.
    """

    def __init__(
        self,
        images_dir: str | Path,
        contract: Contract,
        *,
        masks_dir: str | Path | None = None,
        size: tuple[int, int] | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        soft_masks: bool = False,
    ):
        from u2zoo.errors import U2ZooError

        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise ConfigError(f"image folder not found: {images_dir}")
        paths = list_images([images_dir])
        if not paths:
            raise ConfigError(f"no images in {images_dir}")
        self.contract, self.size = contract, size or contract.pre.size
        self.augment, self.seed, self.soft_masks, self.epoch = augment, seed, soft_masks, 0
        mask_paths = None
        if masks_dir is not None:
            if not Path(masks_dir).is_dir():
                raise ConfigError(f"mask folder not found: {masks_dir}")
            mask_paths = pair_masks(paths, Path(masks_dir))
        self.paths: list[Path] = []
        self.images: list[np.ndarray] = []
        self.masks: list[np.ndarray] | None = None if mask_paths is None else []
        self.resized_names: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.teacher_maps: list[np.ndarray] | None = None
        longest = 3 * max(self.size)  # big photos are kept at most 3× the training size: crops stay cheap
        for index, path in enumerate(paths):
            try:
                image = load_rgb(path)
                if mask_paths is not None:
                    mask, resized = load_mask(mask_paths[index], image.shape[:2], "bilinear")  # to its own image
            except U2ZooError as exc:
                self.skipped.append((path.name, str(exc)))
                continue
            image = _cap_size(image, longest)
            if mask_paths is not None:
                if resized:
                    self.resized_names.append(mask_paths[index].name)
                self.masks.append(resize_plane(mask, *image.shape[:2]))
            self.paths.append(path)
            self.images.append(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))
        if not self.paths:
            raise ConfigError(
                f"none of the {len(paths)} image(s) in {images_dir} could be read "
                f"(e.g. {self.skipped[0][0]}: {self.skipped[0][1]})"
            )

    @property
    def resized_masks(self) -> int:
        return len(self.resized_names)

    def summary(self) -> str:
        """One line on what was skipped or changed while reading the set."""
        parts = [f"{len(self.paths)} image(s)"]
        if self.skipped:
            parts.append(
                f"{len(self.skipped)} skipped, unreadable: "
                + ", ".join(n for n, _ in self.skipped[:5])
                + (" …" if len(self.skipped) > 5 else "")
            )
        if self.resized_names:
            parts.append(
                f"{len(self.resized_names)} mask(s) of another size resized to their image (bilinear): "
                + ", ".join(self.resized_names[:5])
                + (" …" if len(self.resized_names) > 5 else "")
            )
        return "; ".join(parts)

    def attach_teacher(self, cache, batch: int = 8) -> None:
        """The teacher's soft map of every image, from ``cache`` (a :class:`TeacherCache`): computed
        once on the original, un-augmented image, then read from disk by every later epoch and run."""
        from u2zoo.training.teacher_cache import image_key

        keys = [image_key(p) for p in self.paths]
        originals = [load_rgb(p) if not cache.path(k).is_file() else None for p, k in zip(self.paths, keys)]
        self.teacher_maps = [
            np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8) for m in cache.get_many(keys, originals, batch)
        ]

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations depend on the epoch, so each epoch sees new (but reproducible) samples."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index].astype(np.float32) / 255.0
        planes = []
        if self.masks is not None:
            planes.append(self.masks[index])
        if self.teacher_maps is not None:
            planes.append(resize_plane(self.teacher_maps[index].astype(np.float32) / 255.0, *image.shape[:2]))
        stacked = np.stack(planes, -1) if planes else None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, stacked = augment_pair(image, stacked, rng, self.augment)
        sample: dict[str, Any] = {
            "image": preprocess(image, self.contract.pre, self.size),
            "name": self.paths[index].name,
        }
        if stacked is None:
            return sample
        resized = [
            resize_plane(np.ascontiguousarray(stacked[..., i]), self.size[0], self.size[1])
            for i in range(stacked.shape[-1])
        ]
        if self.masks is not None:
            plane = resized.pop(0)
            plane = np.clip(plane, 0.0, 1.0) if self.soft_masks else (plane >= 0.5).astype(np.float32)
            sample["mask"] = plane[None].astype(np.float32)
        if self.teacher_maps is not None:
            sample["teacher"] = np.clip(resized[0], 0.0, 1.0)[None].astype(np.float32)
        return sample
