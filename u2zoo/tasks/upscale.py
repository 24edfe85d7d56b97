"""Super-resolution of a photo before it is segmented or drawn (``--upscale``).

The network is the user's own checkpoint (ESRGAN, Real-ESRGAN, SRVGGNetCompact, SwinIR, …):
``spandrel`` (``u2zoo[sr]``) recognises the architecture and its hyper-parameters from the
keys. u2zoo reads the file itself, with ``torch.load(weights_only=True)`` or safetensors, so a
pickle carrying code is refused, never run; spandrel only builds the model from the tensors.

Why tiles with overlap: at ×4 an SR network's activations have 16× the photo's pixels × 64
channels, tens of GB for a 2000×2000 photo. Each tile runs with ``overlap`` pixels of real
context on every side and only its centre is kept, so tiles join without seams: the result
equals the untiled one wherever the overlap covers the network's reach. The upscaled photo is
assembled in 8 bits, the precision every output is written in.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.errors import BackendUnavailable, ConfigError, ImageTooLarge, WeightsError, one_line, tool_failure
from u2zoo.zoo.images import shown

DEFAULT_TILE = 256  # input px per tile side: ~1.5 GB peak for a 64-channel RRDBNet at ×4
DEFAULT_OVERLAP = 32  # input px of context around each tile, beyond the reach of small SR nets
MIN_TILE = 32
SAFETENSORS_SUFFIXES = (".safetensors",)

# spandrel imports torchvision (for two restoration architectures). PyPI's torchvision for
# torch 2.13 is a CUDA build whose compiled ops cannot load beside a CPU torch, and then its
# import stops at "operator torchvision::nms does not exist". When that happens, the two op
# schemas it registers fakes for are declared here (no kernels: calling them still fails), so
# spandrel imports; no SR architecture uses torchvision's ops.
_TORCHVISION_STAND_IN: list[Any] = []


def import_spandrel():
    """spandrel, or a one-line BackendUnavailable naming the extra."""
    try:
        import spandrel
    except ImportError:
        raise BackendUnavailable("--upscale needs spandrel, which is not installed", extra="sr") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        _declare_torchvision_ops()
        import spandrel
    return spandrel


def torchvision_ops_missing() -> bool:
    """Whether spandrel imported only thanks to the stand-in (for ``u2zoo doctor``)."""
    return bool(_TORCHVISION_STAND_IN)


def _declare_torchvision_ops() -> None:
    import torch

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith(("torchvision.", "spandrel"))]:
        del sys.modules[name]  # the half-done import of torchvision and spandrel is redone from the start
    library = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_STAND_IN.append(library)  # the declarations live as long as the Library object


@dataclass
class Upscaler:
    """A loaded SR model and how it is run: ``tile`` px tiles (0: the whole image at once)
    with ``overlap`` px of context, on ``device``."""

    descriptor: Any = field(repr=False)  # spandrel.ImageModelDescriptor
    source: Path
    sha256: str
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    device: str = "cpu"

    @property
    def architecture(self) -> str:
        return self.descriptor.architecture.name

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    def describe(self) -> str:
        tiling = f"{self.tile} px tiles + {self.overlap} px overlap" if self.tile else "untiled"
        return (
            f"{self.architecture} ×{self.scale} ({shown(self.source.name)}, sha256 {self.sha256[:12]}…) "
            f"on {self.device}, {tiling}"
        )

    def to_dict(self) -> dict[str, Any]:
        """What a manifest records of it: enough to know which SR made an output."""
        from u2zoo.artifact import tool_versions

        return {
            "architecture": self.architecture,
            "scale": self.scale,
            "purpose": self.descriptor.purpose,
            "tags": list(self.descriptor.tags),
            "weights": str(self.source),
            "sha256": self.sha256,
            "tile": self.tile,
            "overlap": self.overlap,
            "device": self.device,
            "spandrel": tool_versions("spandrel")["spandrel"],
        }

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return height * self.scale, width * self.scale

    def upscale(self, image: np.ndarray, progress: bool = False) -> np.ndarray:
        """(H, W, 3) RGB, float in [0, 1] or uint8 → (scale·H, scale·W, 3) uint8."""
        import torch
        from tqdm import tqdm

        pixels = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        height, width = pixels.shape[:2]
        s = self.scale
        out = np.empty((height * s, width * s, 3), np.uint8)
        boxes = tile_boxes(height, width, self.tile)
        dtype = next(self.descriptor.model.parameters()).dtype
        for y0, y1, x0, x1 in tqdm(boxes, desc="upscale", unit="tile", leave=False, disable=not progress):
            iy0, iy1 = max(0, y0 - self.overlap), min(height, y1 + self.overlap)
            ix0, ix1 = max(0, x0 - self.overlap), min(width, x1 + self.overlap)
            crop = np.ascontiguousarray(pixels[iy0:iy1, ix0:ix1].transpose(2, 0, 1))[None]
            with torch.inference_mode():
                result = self.descriptor(torch.from_numpy(crop).to(self.device, dtype))
                kept = result[0, :, (y0 - iy0) * s : (y1 - iy0) * s, (x0 - ix0) * s : (x1 - ix0) * s]
                out[y0 * s : y1 * s, x0 * s : x1 * s] = (
                    kept.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                )
            del result, kept
        return out


def tile_boxes(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) tiles covering the image; ``tile`` 0: one box, the whole image."""
    if tile <= 0:
        return [(0, height, 0, width)]
    return [
        (y, min(y + tile, height), x, min(x + tile, width))
        for y in range(0, height, tile)
        for x in range(0, width, tile)
    ]


def resolve_device(device: str | None) -> str:
    """``auto``/None: CUDA when a GPU is visible, else the CPU; ``cuda`` without one is an error."""
    import torch

    from u2zoo.gpu import cuda_unavailable_reason

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--sr-device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and (reason := cuda_unavailable_reason()):
        raise BackendUnavailable(f"--sr-device cuda: {reason}")
    return device


def load_upscaler(
    weights: str | Path,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    device: str | None = None,
) -> Upscaler:
    """The SR model in ``weights``, recognised by spandrel; one-line errors for a file that is
    missing, unsafe, corrupt, not recognised, or not an RGB super-resolution model."""
    from u2zoo.files import file_digest

    if tile != 0 and tile < MIN_TILE:
        raise ConfigError(f"--sr-tile must be 0 (no tiles) or at least {MIN_TILE} px, got {tile}")
    if overlap < 0:
        raise ConfigError(f"--sr-overlap must be 0 or more px, got {overlap}")
    device = resolve_device(device)
    spandrel = import_spandrel()
    path = Path(weights)
    state = read_sr_state_dict(path, spandrel)
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise WeightsError(
            f"{shown(path)}: spandrel {spandrel.__version__} recognises no architecture in it: {found_in(state)}"
        ) from None
    except Exception as exc:  # a key set spandrel detected but whose shapes it cannot build
        raise WeightsError(
            f"{shown(path)}: spandrel could not build the model it detected: {tool_failure(exc, 200)}…"
        ) from None
    check_super_resolution(path, descriptor)
    descriptor.to(device).eval()
    return Upscaler(descriptor, path, file_digest(path), tile, overlap, device)


def read_sr_state_dict(path: Path, spandrel: Any) -> dict[str, Any]:
    """The tensors of an SR checkpoint, unwrapped as spandrel does (``params_ema``, ``params``,
    ``state_dict``, ``module.``…), read without running any pickled code."""
    from u2zoo.zoo.weights import checked_tensors, read_checkpoint

    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        obj = _read_safetensors(path)
    else:
        obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise WeightsError(f"{shown(path)}: not a checkpoint of named tensors (found a {type(obj).__name__})")
    return checked_tensors(path, spandrel.canonicalize_state_dict(obj))


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"weights file not found: {shown(path)}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{shown(path)}: corrupt safetensors file: {one_line(exc)}") from None


def found_in(state: dict[str, Any]) -> str:
    """What an unrecognised checkpoint holds, in a few words."""
    keys = list(state)
    if not keys:
        return "it holds no tensors"
    if any(k.startswith(("stage1.rebnconvin.", "stage6.rebnconvin.")) for k in keys) or "outconv.weight" in keys:
        return f"a U²-Net checkpoint ({len(keys)} tensors, e.g. {keys[0]}): give it to --weights, not --sr-weights"
    sample = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
    return f"{len(keys)} tensors, keys like {sample}; it reads ESRGAN, Real-ESRGAN, SRVGGNetCompact, SwinIR, … files"


def check_super_resolution(path: Path, descriptor: Any) -> None:
    """``--upscale`` takes an RGB image-to-image model that enlarges; anything else is named and refused."""
    from spandrel import ImageModelDescriptor

    name = descriptor.architecture.name
    if not isinstance(descriptor, ImageModelDescriptor):
        raise WeightsError(f"{shown(path)}: a {name} {descriptor.purpose} model, not super-resolution")
    if descriptor.scale < 2:
        raise WeightsError(
            f"{shown(path)}: a ×{descriptor.scale} {name} {descriptor.purpose.lower()} model: it does not "
            "enlarge; --upscale needs a ×2, ×3 or ×4 super-resolution model"
        )
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        raise WeightsError(
            f"{shown(path)}: {name} ×{descriptor.scale} maps {descriptor.input_channels}-channel to "
            f"{descriptor.output_channels}-channel images; --upscale needs an RGB (3-channel) model"
        )


def upscale_photo(upscaler: Upscaler, image: np.ndarray, max_pixels: int | None, progress: bool = False) -> np.ndarray:
    """The photo enlarged for the pipeline (float RGB in [0, 1]); the pixel limit applies to the
    enlarged photo too, since every output is that size."""
    height, width = image.shape[:2]
    big_h, big_w = upscaler.output_size(height, width)
    if max_pixels is not None and big_h * big_w > max_pixels:
        raise ImageTooLarge(
            f"upscaled ×{upscaler.scale} it would be {big_w}×{big_h} = {big_w * big_h:,} px, over the limit of "
            f"{max_pixels:,} (--max-pixels)"
        )
    return upscaler.upscale(image, progress).astype(np.float32) / 255.0


RECORD_NAME = "u2zoo-upscale.json"


def record_upscale(out_dir: Path, upscaler: Upscaler) -> Path:
    """``out_dir/u2zoo-upscale.json``: which SR model (architecture, scale, weights' sha256,
    tiling) made the outputs there, since every one of them is its size and carries its detail."""
    import json

    from u2zoo.artifact import atomic_write_text

    target = out_dir / RECORD_NAME
    atomic_write_text(target, json.dumps({"upscale": upscaler.to_dict()}, indent=2) + "\n")
    return target
