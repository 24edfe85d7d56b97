"""The pre/post-processing contract, as data.

Most "the exported model gives different results" reports come from pre/post drift, not
from the model. So the contract is a frozen dataclass stored in every weights entry and
every artifact manifest, and the numpy functions below are the *only* implementation every
runtime uses (numpy in, numpy out: a TFLite runner needs no torch).

The official recipe (``u2net_test.py``): RGB; resize to 320×320 (bilinear, *not* antialiased:
the official outputs were made with scikit-image's old ``resize`` default — measured here,
plain bilinear reproduces them to mean MAE 0.002 where an antialiased resize gives 0.005 and
0.03 on large photos); divide by the image's own max (not 255); ImageNet mean/std; NCHW float32. Output:
fused map ``d0`` (sigmoid, inside the model), per-image min-max normalisation, bilinear
resize back to the input size.

Two named variants of the resizes (``Contract.variant``, recorded in every manifest):

- ``official``: the recipe above, bit for bit; it reproduces the official outputs (golden tests).
- ``antialiased``: Lanczos in and out (Pillow, whose filter widens when shrinking), what rembg
  does. Only the two resizes differ; weights are unchanged.

The default for new artifacts and ``predict`` is the variant that scored better against ground
truth on DUTS-TR ``val/`` with ``u2zoo bench --gt`` (README, "Contract variants"): ``official``
(MAE 0.0142 vs 0.0145, max F 0.984 vs 0.983 for U2NETP). Those images are stored at 320 px,
so the input resize there barely shrinks; on larger photos the antialiased input resize is the
better one (see the README), which is why it stays one flag away.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from u2zoo.errors import ConfigError

# Largest network input side a contract may ask for. U²-Net is trained at 320 (portraits at
# 512); at 4096² one image's activations already take tens of GiB, so a larger value is a typo
# or a forged manifest, refused before anything is allocated.
MAX_SIDE = 4096

_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _sequence(value: Any, length: int) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == length


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    return f"[{', '.join(map(str, value))}]" if isinstance(value, (tuple, list)) else repr(value)


@dataclass(frozen=True)
class Preprocess:
    """Image (H, W, 3) float in [0, 1] → network input (3, H', W') float32."""

    size: tuple[int, int] = (320, 320)  # (height, width)
    color: str = "RGB"
    resize_filter: str = "bilinear"
    # False: sample at half-pixel centres with edge clamping, exactly like
    # F.interpolate(mode="bilinear", align_corners=False, antialias=False).
    # True: Pillow's filter, whose support widens when shrinking (antialiasing).
    antialias: bool = False
    scale: str = "image_max"  # divide by the image's own maximum; "unit" = leave in [0, 1]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    dtype: str = "float32"
    face_crop: bool = False  # portrait drawing: crop around the largest face first

    def __post_init__(self) -> None:
        """Refuse values every runtime would choke on or silently turn into blank masks (a size
        of 0 or 10⁵, a NaN mean, a zero std), whether they come from code or a manifest."""
        if not (_sequence(self.size, 2) and all(_whole(v) and 1 <= v <= MAX_SIDE for v in self.size)):
            raise ConfigError(
                f"contract size must be [height, width], whole numbers from 1 to {MAX_SIDE}, got {_shown(self.size)}"
            )
        for name, values, above_zero in (("mean", self.mean, False), ("std", self.std, True)):
            if not (
                _sequence(values, 3)
                and all(_real(v) and math.isfinite(v) and (v > 0 or not above_zero) for v in values)
            ):
                raise ConfigError(
                    f"contract {name} must be 3 finite numbers{' above 0' if above_zero else ''} "
                    f"(one per RGB channel), got {_shown(values)}"
                )


@dataclass(frozen=True)
class Postprocess:
    """Network output (1, H', W') → map of the input image's size, float in [0, 1]."""

    output: str = "d0"  # the fused map; the model applies the sigmoid itself
    normalize: str = "minmax"  # per-image (x - min) / (max - min)
    resize_filter: str = "bilinear"
    invert: bool = False  # portrait drawing: dark lines on white


# variant name → (input resize filter, antialiased input resize, output resize filter)
VARIANTS: dict[str, tuple[str, bool, str]] = {
    "official": ("bilinear", False, "bilinear"),
    "antialiased": ("lanczos", True, "lanczos"),
}


@dataclass(frozen=True)
class Contract:
    pre: Preprocess = field(default_factory=Preprocess)
    post: Postprocess = field(default_factory=Postprocess)
    variant: str = "official"  # a name from VARIANTS; "custom" once a resize differs from it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Contract":
        try:
            pre = dict(data["pre"])
            for key in ("size", "mean", "std"):  # JSON lists; anything else is left for the checks to name
                pre[key] = tuple(pre[key]) if isinstance(pre[key], list) else pre[key]
            # manifests written before variants existed hold the official resizes
            return cls(Preprocess(**pre), Postprocess(**data["post"]), data.get("variant", "official"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed pre/post contract in manifest: {exc}") from None


def with_variant(contract: Contract, variant: str) -> Contract:
    """The same contract with the resizes of ``variant`` (size, crop, inversion kept)."""
    if variant not in VARIANTS:
        from u2zoo.errors import did_you_mean

        raise ConfigError(
            f"unknown contract variant {variant!r}{did_you_mean(variant, VARIANTS)} "
            f"(choose from: {', '.join(VARIANTS)})"
        )
    pre_filter, antialias, post_filter = VARIANTS[variant]
    return replace(
        contract,
        pre=replace(contract.pre, resize_filter=pre_filter, antialias=antialias),
        post=replace(contract.post, resize_filter=post_filter),
        variant=variant,
    )


# The default variant for saliency-type weights: the one that scored better against ground
# truth on DUTS-TR val/ (README, "Contract variants"). Portrait drawing keeps the official
# resizes too: there is no ground truth here to show another one is better.
DEFAULT_VARIANT = "official"
SALIENCY_OFFICIAL = Contract()
SALIENCY = with_variant(SALIENCY_OFFICIAL, DEFAULT_VARIANT)
PORTRAIT = Contract(Preprocess(size=(512, 512), face_crop=True), Postprocess(invert=True))


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear sampling at half-pixel centres (align_corners=False)."""
    coords = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
    low = np.floor(coords).astype(np.int64)
    return low, np.minimum(low + 1, size_in - 1), (coords - low).astype(np.float32)


def _resize_plane(plane: np.ndarray, height: int, width: int, filter_name: str, antialias: bool = True) -> np.ndarray:
    if filter_name not in _FILTERS:
        raise ConfigError(f"unknown resize filter {filter_name!r} (choose from: {', '.join(_FILTERS)})")
    if plane.shape == (height, width):
        return plane.astype(np.float32, copy=False)
    if filter_name == "bilinear" and not antialias:
        plane = plane.astype(np.float32, copy=False)
        top, bottom, wy = _linear_taps(plane.shape[0], height)
        rows = plane[top] * (1 - wy)[:, None] + plane[bottom] * wy[:, None]
        left, right, wx = _linear_taps(plane.shape[1], width)
        return rows[:, left] * (1 - wx) + rows[:, right] * wx
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), _FILTERS[filter_name]), dtype=np.float32)


def resize_plane(plane: np.ndarray, height: int, width: int, filter_name: str = "bilinear") -> np.ndarray:
    """Resize one (H, W) float plane with the contract's filters (for masks in training)."""
    return _resize_plane(plane, height, width, filter_name)


def preprocess(image: np.ndarray, pre: Preprocess, size: tuple[int, int] | None = None) -> np.ndarray:
    """One RGB image (H, W, 3) in [0, 1] → (3, h, w) float32 network input.

    ``size`` overrides ``pre.size`` for dynamic-shape artifacts; the contract's own size is
    what the weights were trained for.
    """
    height, width = size or pre.size
    resized = np.stack(
        [_resize_plane(image[..., c], height, width, pre.resize_filter, pre.antialias) for c in range(3)], -1
    )
    # Lanczos and bicubic overshoot at edges; an 8-bit resize would clamp there, so do we
    # (bilinear never leaves the input's range, so the official path is unchanged)
    resized = np.clip(resized, 0.0, 1.0)
    if pre.scale == "image_max":
        peak = float(resized.max())
        resized = resized / peak if peak > 0 else resized  # an all-black image stays black
    elif pre.scale != "unit":
        raise ConfigError(f"unknown scale {pre.scale!r} (choose from: image_max, unit)")
    normalised = (resized - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def postprocess(prediction: np.ndarray, image_size: tuple[int, int], post: Postprocess) -> np.ndarray:
    """Network output (1, h, w) or (h, w) → (H, W) float32 map in [0, 1] at the image's size."""
    pred = np.asarray(prediction, dtype=np.float32).reshape(prediction.shape[-2:])
    if post.normalize == "minmax":
        low, high = float(pred.min()), float(pred.max())
        pred = (pred - low) / (high - low) if high > low else np.zeros_like(pred)
    elif post.normalize != "none":
        raise ConfigError(f"unknown normalisation {post.normalize!r} (choose from: minmax, none)")
    out = _resize_plane(pred, image_size[0], image_size[1], post.resize_filter)
    out = np.clip(out, 0.0, 1.0)
    return 1.0 - out if post.invert else out


def to_uint8(mask: np.ndarray) -> np.ndarray:
    """[0, 1] float map → uint8 (rounded, as a PNG stores it)."""
    return np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)
