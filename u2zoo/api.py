"""The Python entry point: what the CLI does, as functions, offline.

    >>> import u2zoo
    >>> mask = u2zoo.segment("photo.jpg")                  # (H, W) float map in [0, 1]
    >>> seg = u2zoo.load("u2netp")                          # reuse one model for many images
    >>> seg.cutout(photo).save("cutout.png")                # RGBA, the map as alpha
    >>> artifact = u2zoo.convert("u2netp", "onnx", "out", precision="fp16")
    >>> with u2zoo.load(artifact.path) as onnx_seg: ...     # the same Segmenter, in ONNX Runtime
    >>> rows = u2zoo.bench("u2netp", targets=["onnx"], data="photos", out="bench")
    >>> big = u2zoo.upscale("small.jpg", "RealESRGAN_x4plus.pth")  # your SR weights (u2zoo[sr])
    >>> u2zoo.cutout(big).save("cutout_x4.png")             # a cut-out at 4× the photo's size

With no model named, ``segment``/``load``/``cutout`` use the best shipped saliency model, by
the same rule as ``u2zoo demo`` (``u2zoo.zoo.default_model``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from u2zoo.artifact import Artifact
from u2zoo.benchmarks.results import MatrixRow
from u2zoo.errors import ConfigError
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.loading import load_segmenter
from u2zoo.tasks.upscale import DEFAULT_OVERLAP, DEFAULT_TILE, Upscaler
from u2zoo.tasks.upscale import load_upscaler as load_upscaler_from_file
from u2zoo.zoo.images import load_rgb

ImageInput = str | Path | np.ndarray | Image.Image


def load(
    model: str | Path | None = None,
    *,
    weights: str | None = None,
    contract: str | None = None,
    threads: int | None = None,
    batch_size: int = 1,
) -> Segmenter:
    """A Segmenter on ``model``: a model name (the PyTorch reference, e.g. ``"u2netp"``; default:
    the best shipped saliency model) or the path of a converted artifact (run in its own runtime
    with its own contract; close it, or use ``with``, to free the runtime)."""
    is_artifact = model is not None and Path(model).exists()
    return load_segmenter(
        None if is_artifact or model is None else str(model),
        artifact=model if is_artifact else None,
        weights=weights,
        contract=contract,
        threads=threads,
        batch_size=batch_size,
    )


def as_rgb(image: ImageInput) -> np.ndarray:
    """An (H, W, 3) float RGB array in [0, 1] from a path, a Pillow image or an array (uint8,
    or float already in [0, 1])."""
    if isinstance(image, (str, Path)):
        return load_rgb(Path(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    return pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels.astype(np.float32)


def segment(image: ImageInput, model: str | Path | None = None) -> np.ndarray:
    """The (H, W) map of one image."""
    with load(model) as segmenter:
        return segmenter.maps([as_rgb(image)])[0]


def cutout(
    image: ImageInput,
    model: str | Path | None = None,
    background: str | tuple[int, int, int] | None = None,
    decontaminate: bool = False,
) -> Image.Image:
    """rembg's ``remove``: the image with its map as alpha (RGBA), or on a ``background``
    colour (RGB); ``decontaminate`` removes the old background's colour from soft edges."""
    with load(model) as segmenter:
        return segmenter.cutout(as_rgb(image), background, decontaminate)


def prepare_mask(
    image: ImageInput,
    model: str | Path | None = None,
    box: tuple[int, int, int, int] | None = None,
    refine: bool = False,
) -> np.ndarray:
    """A training mask (H, W) float32: GrabCut from ``box`` (x0, y0, x1, y1) when given, else
    the model's map, refined by GrabCut with ``refine`` (``u2zoo masks`` as a function)."""
    from u2zoo.tasks.grabcut import grabcut

    rgb = as_rgb(image)
    if box is not None:
        return grabcut(rgb, box=box)
    prob = segment(rgb, model)
    return grabcut(rgb, prob) if refine else prob


def load_upscaler(
    sr_weights: str | Path,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    device: str | None = None,
) -> Upscaler:
    """The super-resolution model in ``sr_weights`` (ESRGAN, Real-ESRGAN, SwinIR, … as spandrel
    recognises them; read with weights_only), run in ``tile`` px tiles with ``overlap`` px of
    context, on ``device`` (default: CUDA if visible, else the CPU). Reuse it for many photos."""
    return load_upscaler_from_file(sr_weights, tile, overlap, device)


def upscale(
    image: ImageInput,
    sr_weights: str | Path | Upscaler,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    device: str | None = None,
    progress: bool = False,
) -> Image.Image:
    """``image`` super-resolved (RGB, scale × its size) by ``sr_weights``: a checkpoint path or
    a loaded Upscaler (``load_upscaler``)."""
    upscaler = (
        sr_weights
        if isinstance(sr_weights, Upscaler)
        else load_upscaler(sr_weights, tile=tile, overlap=overlap, device=device)
    )
    return Image.fromarray(upscaler.upscale(as_rgb(image), progress), mode="RGB")


def convert(model: str, target: str, out_dir: str | Path, *, progress: bool = False, **options: Any) -> Artifact:
    """``u2zoo convert`` as a function: the artifact, proven in its real runtime, or an error.

    ``options`` are ``convert_model``'s keywords (``weights=``, ``parity_images=``, ``auto_fp=``)
    and the target's own options (``precision="int8", calib="photos/"``); one the target does not
    have is a ``ConfigError``."""
    from u2zoo.conversion import convert_model

    return convert_model(model, target, out_dir, progress=progress, **options)


def bench(
    models: str | Iterable[str],
    *,
    targets: Iterable[str],
    data: str | Path,
    out: str | Path,
    precisions: Iterable[str] = ("fp32",),
    gate: str | Path | None = None,
    **settings: Any,
) -> list[MatrixRow]:
    """``u2zoo bench`` as a function: every cell converted, run and compared; the rows (also
    written to ``out``/results.jsonl, .csv and .md). ``gate``: a gate file (default: the shipped
    table); a row's ``gate["passed"]`` says whether it passed. ``settings`` are ``BenchConfig``
    fields (``gt=``, ``runs=``, ``batches=``, ``calib=``, ``threads=`` …)."""
    from u2zoo.benchmarks.matrix import BenchConfig, run_matrix
    from u2zoo.benchmarks.report import write_results
    from u2zoo.runtime.gates import load_gates

    known = {f.name for f in dataclasses.fields(BenchConfig)} - {
        "models",
        "targets",
        "precisions",
        "data",
        "out",
        "gates",
    }
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"bench() has no setting {', '.join(unknown)} (settings: {', '.join(sorted(known))})")
    for key in ("gt", "calib"):
        if settings.get(key) is not None:
            settings[key] = Path(settings[key])
    if "batches" in settings:
        settings["batches"] = tuple(settings["batches"])
    cfg = BenchConfig(
        models=[models] if isinstance(models, str) else list(models),
        targets=list(targets),
        precisions=list(precisions),
        data=Path(data),
        out=Path(out),
        gates=load_gates(gate),
        **settings,
    )
    rows = run_matrix(cfg)
    write_results([row.to_dict() for row in rows], cfg.out)
    return rows
