"""One loaded model (the torch reference or an artifact's runner) turning images into maps.

Every task pipeline (folders, video, the HTTP service, portraits) goes through ``Segmenter``:
it applies the artifact's own pre/post contract (face crop included), batches where the
artifact allows it, and keeps one session open for as long as it lives.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from u2zoo.errors import ConfigError
from u2zoo.runtime.pipeline import Predictor, network_size, run_batched
from u2zoo.zoo.contract import Contract, postprocess, preprocess

# --batch auto never goes above this: on CPU larger batches buy no throughput, and a
# too-hopeful estimate should not take the machine's memory.
AUTO_BATCH_CAP = 32
# Share of the available memory --batch auto plans to use.
AUTO_MEMORY_SHARE = 0.5


@dataclass
class Segmenter:
    """Images (H, W, 3) float RGB in [0, 1] → maps (H, W) in [0, 1], ``batch_size`` at a time."""

    predictor: Predictor
    contract: Contract
    batch_size: int = 1
    engine_seconds: float = field(default=0.0, init=False)  # time inside the runtime, for throughput reports
    _face_detector: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_batch_size(self.predictor, self.batch_size)

    @property
    def size(self) -> tuple[int, int]:
        return network_size(self.predictor, self.contract)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """What the network sees of ``image``: the face crop for portrait contracts, else the
        image itself (the contract's resize happens in ``maps``)."""
        return self.portrait_input(image).image if self.contract.pre.face_crop else image

    def portrait_input(self, image: np.ndarray, aligner: Any = None):
        """The portrait face crop at the contract's size (``u2zoo.tasks.portrait``), with how
        it was found; the face detector is loaded once per Segmenter."""
        from u2zoo.tasks.portrait import FaceDetector, prepare_portrait

        if self._face_detector is None:
            self._face_detector = FaceDetector()
        return prepare_portrait(image, self._face_detector, size=self.contract.pre.size[0], aligner=aligner)

    def maps(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One map per image, at that image's own size; images may differ in size."""
        maps: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            predictions = self.run_inputs(np.stack([self.network_input(image) for image in chunk]))
            maps.extend(self.to_map(pred, image.shape[:2]) for pred, image in zip(predictions, chunk))
        return maps

    # ``maps`` in its three steps, for a service that resizes and resizes back in each
    # request's thread while one engine thread runs the batches (``u2zoo.tasks.batcher``).
    def network_input(self, image: np.ndarray) -> np.ndarray:
        """``image`` through the contract's pre-processing: (3, H, W) at the network's size."""
        return preprocess(image, self.contract.pre, self.size)

    def run_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """One engine call (or the artifact's static batches) on stacked network inputs."""
        started = time.perf_counter()
        predictions = run_batched(self.predictor, inputs)
        self.engine_seconds += time.perf_counter() - started
        return predictions

    def to_map(self, prediction: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A network output back to a map at the image's own ``shape`` (H, W), per the contract."""
        return postprocess(prediction, shape, self.contract.post)

    def cutout(
        self,
        image: np.ndarray,
        background: str | tuple[int, int, int] | None = None,
        decontaminate: bool = False,
    ) -> Image.Image:
        """The image with its map as alpha (RGBA), or composited on a ``background`` colour
        (``"white"``, ``"#00ff00"``, an RGB triple) as RGB; ``decontaminate``: the estimated
        foreground colour at soft edges instead of the photo's (no old background in hair)."""
        from u2zoo.tasks.outputs import OutputOptions, parse_colour, render

        if background is None:
            options = OutputOptions(kinds=("cutout",), decontaminate=decontaminate)
            return render(image, self.maps([image])[0], options).images["cutout"]
        colour = parse_colour(background) if isinstance(background, str) else tuple(background)
        options = OutputOptions(kinds=("composite",), background_colour=colour, decontaminate=decontaminate)
        return render(image, self.maps([image])[0], options).images["composite"]

    def close(self) -> None:
        """Free the runtime of an artifact's runner (the torch reference needs nothing)."""
        close = getattr(self.predictor, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_batch_size(predictor: Predictor, batch_size: int) -> None:
    """Refuse a batch the artifact cannot take, instead of quietly running another one."""
    if batch_size < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch_size}")
    fixed = predictor.fixed_batch
    if fixed is not None and batch_size not in (1, fixed):
        raise ConfigError(
            f"this artifact has a static batch of {fixed}; --batch {batch_size} needs a "
            "dynamic-batch artifact (convert with --dynamic) or --batch "
            f"{fixed}"
        )
    limit = getattr(predictor, "max_batch", None)
    if limit is not None and batch_size > limit:
        raise ConfigError(f"--batch {batch_size} is over this artifact's largest batch ({limit})")


def available_memory_bytes(device: str = "cpu") -> int:
    """Free memory where the batch will live: the GPU's for CUDA runners, else the host's
    ``MemAvailable`` (what Linux could hand out without swapping)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def activation_bytes_per_image(arch: str, size: tuple[int, int]) -> int:
    """Bytes of every layer output of ``arch`` for one float32 image at ``size``.

    An upper bound on a runtime's working memory per image (runtimes reuse buffers), counted
    on the torch module at 64×64 and scaled by area, which is exact for this fully
    convolutional family up to rounding of the pooled sizes.
    """
    import torch

    from u2zoo.zoo.archs import build_arch

    model = build_arch(arch, deploy=True)
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * 4

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, 64, 64))
    finally:
        for handle in handles:
            handle.remove()
    return int(total * (size[0] * size[1]) / (64 * 64))


@dataclass(frozen=True)
class AutoBatch:
    batch_size: int
    per_image_bytes: int
    available_bytes: int

    def describe(self) -> str:
        return (
            f"--batch auto: {self.batch_size} (≤ {self.per_image_bytes / 2**20:.0f} MB of activations per image, "
            f"{self.available_bytes / 2**30:.1f} GB available, planning on {AUTO_MEMORY_SHARE:.0%}, cap "
            f"{AUTO_BATCH_CAP})"
        )


def auto_batch_size(
    predictor: Predictor, contract: Contract, arch: str, device: str = "cpu", available: int | None = None
) -> AutoBatch:
    """The batch ``--batch auto`` picks: a static artifact's own batch, else as many images as
    fit in half the available memory by the activation bound, within the artifact's limit."""
    per_image = activation_bytes_per_image(arch, network_size(predictor, contract))
    available = available_memory_bytes(device) if available is None else available
    if predictor.fixed_batch is not None:
        return AutoBatch(predictor.fixed_batch, per_image, available)
    batch = max(1, min(AUTO_BATCH_CAP, int(available * AUTO_MEMORY_SHARE // max(per_image, 1))))
    limit = getattr(predictor, "max_batch", None)
    return AutoBatch(min(batch, limit) if limit else batch, per_image, available)
