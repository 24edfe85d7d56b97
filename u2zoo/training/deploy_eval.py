"""Validation through the deploy path, never the trainer's shortcut.

Each image goes through exactly what an artifact gets: ``contract.preprocess`` at the
contract's size, the model's fused map ``d0`` (float32, eval mode), ``postprocess`` (min-max,
resize back to the image), and is scored against its ground-truth mask with the functions
``u2zoo bench --gt`` uses (mask read with ``load_mask`` nearest, foreground > 0.5; the map
min-max stretched as PySODMetrics does), so the numbers are the same as the bench's.
Only MAE, max F and IoU@0.5 are computed (the others are slow and not needed to pick
checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from u2zoo.errors import ConfigError
from u2zoo.runtime.metrics import _f_from_counts, iou, mae, prepare, threshold_counts
from u2zoo.zoo.contract import SALIENCY, Contract, postprocess, preprocess
from u2zoo.zoo.images import list_images, load_mask, load_rgb


@dataclass
class ValSet:
    names: list[str]
    images: list[np.ndarray]  # (H, W, 3) float32 in [0, 1]
    gts: list[np.ndarray]  # (H, W) float32 in [0, 1]
    inputs: np.ndarray  # (N, 3, h, w) contract-preprocessed

    def __len__(self) -> int:
        return len(self.names)


def load_val(
    images_dir: str | Path, masks_dir: str | Path, contract: Contract = SALIENCY, limit: int | None = None
) -> ValSet:
    """The first ``limit`` images of ``images_dir`` (sorted) with their masks, preprocessed once."""
    paths = list_images([Path(images_dir)])
    if limit:
        paths = paths[:limit]
    if not paths:
        raise ConfigError(f"no validation images in {images_dir}")
    names, images, gts = [], [], []
    for path in paths:
        mask_path = next((p for p in Path(masks_dir).glob(f"{path.stem}.*")), None)
        if mask_path is None:
            raise ConfigError(f"validation image {path.name} has no mask in {masks_dir}")
        image = load_rgb(path)
        gt, _ = load_mask(mask_path, image.shape[:2])
        names.append(path.name)
        images.append(image)
        gts.append(gt)
    inputs = np.stack([preprocess(img, contract.pre) for img in images])
    return ValSet(names, images, gts, inputs)


def predict_maps(model, inputs: np.ndarray, batch: int = 10, channels_last: bool = False) -> np.ndarray:
    """Fused maps (N, 1, h, w) float32 of a model in eval mode (training-mode output is fine: d0 first)."""
    import torch

    was_training = model.training
    model.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            x = torch.from_numpy(inputs[start : start + batch])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            d0 = out[0] if isinstance(out, (tuple, list)) else out
            outs.append(d0.float().numpy())
    model.train(was_training)
    return np.concatenate(outs)


def score_maps(maps: np.ndarray, val: ValSet, contract: Contract = SALIENCY) -> dict[str, float]:
    """MAE, max F (β² = 0.3, mean curve over images) and IoU@0.5 of fused maps via ``postprocess``."""
    errors, curves, ious = [], [], []
    for raw, image, gt in zip(maps, val.images, val.gts):
        pred = postprocess(raw, image.shape[:2], contract.post)
        pred, truth = prepare(pred, gt, normalize=True)
        tp, fp = threshold_counts(pred, truth)
        curves.append(_f_from_counts(tp, fp, np.count_nonzero(truth)))
        errors.append(mae(pred, truth))
        ious.append(iou(pred, truth)[0])
    return {
        "mae": float(np.mean(errors)),
        "max_f": float(np.mean(curves, axis=0).max()),
        "iou50": float(np.mean(ious)),
        "images": len(errors),
    }


def deploy_scores(model, val: ValSet, contract: Contract = SALIENCY, batch: int = 10) -> dict[str, float]:
    return score_maps(predict_maps(model, val.inputs, batch), val, contract)
