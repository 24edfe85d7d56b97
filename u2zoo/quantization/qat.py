"""Quantization-aware training for the OpenVINO path (NNCF), with the distillation loss.

NNCF's documented QAT flow: ``nncf.quantize`` the torch module (post-training ranges from the
calibration set, fake-quantizers inserted), fine-tune it with a small learning rate, then
``ov.convert_model`` turns the fake-quantizers into an INT8 IR. The fine-tuning needs no
labels: the float model is the teacher, and the loss (BCE on probabilities + Sobel edge, as in
distillation) pulls the quantized model's fused map back onto the float one. The calibration
images double as the training images, augmented.

NNCF's torch export keeps OpenVINO-only FakeQuantize nodes, so this path yields OpenVINO IR
only, never a plain QDQ ONNX.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np

from u2zoo.errors import ConversionError
from u2zoo.training.losses import CompositeLoss
from u2zoo.training.trainer import freeze_batchnorm

QAT_LOSS = "bce=1,edge=0.5"


def _group_patterns(groups: list[str]) -> list[str]:
    """Module-path groups (``stage2d``, ``stage2d/rebnconv1d``) as regexes over NNCF's torch node names."""
    import re

    return [rf"(^|.*[/.]){re.escape(g.replace('/', '.'))}([/.\[].*|$)" for g in groups]


def qat_openvino(model, calib, images: np.ndarray, *, epochs: int, lr: float, batch_size: int = 4,
                 keep_groups: list[str] | None = None, seed: int = 0, progress: bool = False) -> tuple[Any, dict]:
    """NNCF-quantize a deploy-mode torch ``model`` on ``calib`` (a CalibrationSet), fine-tune it
    against the float model on ``images`` (N, 3, H, W), and convert to an OpenVINO model."""
    import nncf
    import openvino as ov
    import torch

    torch.manual_seed(seed)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).eval()
    dataset = nncf.Dataset([torch.from_numpy(b) for b in calib.samples()])
    ignored = nncf.IgnoredScope(patterns=_group_patterns(keep_groups or []), validate=False)
    try:
        quantized = nncf.quantize(student, dataset, subset_size=len(calib.inputs), ignored_scope=ignored)
    except Exception as exc:  # noqa: BLE001 - NNCF's own failure, as one line
        raise ConversionError(f"NNCF could not quantize the torch model: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
    loss_fn = CompositeLoss(QAT_LOSS)
    optimizer = torch.optim.Adam(quantized.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    quantized.train()
    freeze_batchnorm(quantized)  # BN statistics stay as calibrated
    for epoch in range(epochs):
        order, losses = rng.permutation(len(images)), []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[order[start:start + batch_size]])
            with torch.no_grad():
                target = teacher(batch)
            value = loss_fn([quantized(batch)], target)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        if progress:
            print(f"QAT epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}", flush=True)
    quantized.eval()
    example = torch.from_numpy(images[:1])
    try:
        with warnings.catch_warnings():  # the tracer's float-drift notes on fake-quantized graphs
            warnings.simplefilter("ignore")
            ov_model = ov.convert_model(quantized, example_input=example)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"OpenVINO could not convert the QAT model: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
    record = {"tool": "nncf (QAT)", "loss": QAT_LOSS, "epochs": epochs, "lr": lr, "history": history,
              "teacher": "the float model itself (no labels)", "kept_in_float": keep_groups or []}
    return ov_model, record
