"""Images in, masks out, through any predictor (torch reference or an artifact's runner).

Shared by ``convert`` (parity on real photos), ``predict`` and ``demo``: one place applies
the contract, so every runtime sees exactly the same preprocessed tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from u2zoo.errors import U2ZooError
from u2zoo.zoo.contract import Contract, postprocess, preprocess, to_uint8
from u2zoo.zoo.images import list_images, load_rgb


class Predictor(Protocol):
    fixed_batch: int | None
    fixed_size: tuple[int, int] | None
    last_latency_s: float

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


def run_batched(predictor: Predictor, inputs: np.ndarray) -> np.ndarray:
    """Run (N, 3, H, W) through ``predictor``, honouring a static batch size by padding and a
    dynamic one's upper bound (``max_batch``: a TensorRT profile, an AOTInductor package)."""
    step = predictor.fixed_batch or min(len(inputs), getattr(predictor, "max_batch", None) or len(inputs))
    outputs = []
    for start in range(0, len(inputs), step):
        chunk = inputs[start:start + step]
        pad = step - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outputs.append(predictor.predict(chunk)[: step - pad])
    return np.concatenate(outputs)


def network_size(predictor: Predictor, contract: Contract) -> tuple[int, int]:
    return predictor.fixed_size or contract.pre.size


def preprocess_files(paths: list[Path], contract: Contract, size: tuple[int, int]) -> np.ndarray:
    """Read and preprocess a list of images into one (N, 3, H, W) float32 batch."""
    return np.stack([preprocess(load_rgb(p), contract.pre, size) for p in paths])


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _output_stem(path: Path, roots: list[Path]) -> Path:
    """Keep sub-folder structure for folder inputs, so equal names never collide."""
    for root in roots:
        if root.is_dir() and path.is_relative_to(root):
            return path.relative_to(root).with_suffix("")
    return Path(path.stem)


def predict_files(predictor: Predictor, contract: Contract, inputs: list[str | Path], out_dir: Path,
                  cutout: bool = False, progress: bool = True) -> PredictReport:
    """Write a mask PNG (and optionally an RGBA cut-out) per input image.

    An unreadable image is reported and skipped; the others are still processed.
    """
    from tqdm import tqdm

    roots = [Path(i) for i in inputs]
    paths = list_images(roots)
    if not paths:
        raise U2ZooError(f"no images found in: {', '.join(map(str, inputs))}")
    size = network_size(predictor, contract)
    report = PredictReport()
    for path in tqdm(paths, desc="predict", unit="img", disable=not progress):
        try:
            image = load_rgb(path)
        except U2ZooError as exc:
            report.failed.append((path, str(exc)))
            continue
        batch = preprocess(image, contract.pre, size)[None]
        mask = postprocess(run_batched(predictor, batch)[0], image.shape[:2], contract.post)
        stem = _output_stem(path, roots)
        target = out_dir / stem.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_png(Image.fromarray(to_uint8(mask), mode="L"), target)
        report.written.append(target)
        if cutout:
            rgba = np.dstack([to_uint8(image), to_uint8(mask)])
            cut = out_dir / stem.parent / f"{stem.name}_cutout.png"
            _save_png(Image.fromarray(rgba, mode="RGBA"), cut)
            report.written.append(cut)
    return report


def _save_png(image: Image.Image, target: Path) -> None:
    """Save through a temp name and rename, so an interrupted run leaves no broken PNG."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
