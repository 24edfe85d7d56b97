"""Quantization-aware training (QAT): two flows, one fine-tuning loop.

Both start from post-training ranges on the calibration set, then fine-tune the
fake-quantized model against the float model's own fused map (no labels needed). The loss is
the mean absolute error between the two maps: that is the parity metric itself. BCE + edge,
as in distillation, lowered the training loss but raised the parity error.

- **OpenVINO** (:func:`qat_openvino`): NNCF quantizes the torch module; ``ov.convert_model``
  turns its fake-quantizers into an INT8 IR. NNCF's torch export keeps OpenVINO-only
  FakeQuantize nodes, so this flow never yields a plain ONNX.
- **QDQ ONNX** (:func:`qat_qdq`): PyTorch's pt2e flow (torchao). ``torch.export``, then
  ``prepare_qat_pt2e`` with symmetric int8 activations and per-channel symmetric int8
  weights, fine-tuning, then ``convert_pt2e``. The ONNX exporter writes the result as standard
  QuantizeLinear/DequantizeLinear pairs. ONNX Runtime runs it, and so does TensorRT:
  zero points are 0 and the Q/DQ pairs sit on the conv inputs.

Measured on the real U2NETP (pt2e, stage2d kept in float, calibrated on the official test
images), mean abs error against float:
- PTQ ranges alone: 0.0031 on the test images, 0.0038 on the held-out human images.
- 2 epochs of L1 fine-tuning at lr 2e-6: 0.0026 and 0.0032. After 4 epochs the held-out
  error rises again (0.0042): the images are few.
- BCE + edge at lr 1e-5 made the error worse.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import numpy as np

from u2zoo.errors import BackendUnavailable, ConversionError, tool_failure
from u2zoo.quiet import quiet_loggers
from u2zoo.zoo.layers import freeze_batchnorm

QAT_LOSS = "l1 (mean abs error of the fused map against the float model)"
DEFAULT_QAT_EPOCHS = 2
DEFAULT_QAT_LR = 2e-6


def training_images(calib) -> np.ndarray:
    """The QAT training set: the calibration images and their mirror images."""
    return np.ascontiguousarray(np.concatenate([calib.inputs, calib.inputs[..., ::-1]]).astype(np.float32))


def fine_tune(
    student,
    teacher,
    images: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Adam on ``student`` (fake-quantized) so its fused map matches ``teacher``'s on ``images``.

    Returns the history: after each epoch (and before the first, epoch 0: the post-training
    start) the mean abs error over ``images`` in fixed order, so epochs compare like for like.
    """
    import torch

    def in_batches(order):
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    with torch.no_grad():  # the images are fixed, so the teacher runs once
        targets = torch.cat([teacher(torch.from_numpy(images[i])) for i in in_batches(np.arange(len(images)))])

    def error() -> float:
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        float((student(torch.from_numpy(images[i])) - targets[i]).abs().mean())
                        for i in in_batches(np.arange(len(images)))
                    ]
                )
            )

    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    history = [{"epoch": 0, "l1": error()}]
    for epoch in range(1, epochs + 1):
        losses = []
        for index in in_batches(rng.permutation(len(images))):
            value = (student(torch.from_numpy(images[index])) - targets[index]).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "l1": error()})
        if progress:
            print(f"QAT epoch {epoch}/{epochs}: L1 {history[-1]['l1']:.5f} (start {history[0]['l1']:.5f})", flush=True)
    return history


def _record(
    tool: str, epochs: int, lr: float, history: list[dict], keep_groups: list[str] | None, **extra: Any
) -> dict[str, Any]:
    return {
        "tool": tool,
        "loss": QAT_LOSS,
        "epochs": epochs,
        "lr": lr,
        "history": history,
        "teacher": "the float model itself (no labels)",
        "kept_in_float": keep_groups or [],
        **extra,
    }


def _conversion_error(what: str, exc: Exception) -> ConversionError:
    return ConversionError(f"{what}: {tool_failure(exc)}")


def _group_patterns(groups: list[str]) -> list[str]:
    """Module-path groups (``stage2d``, ``stage2d/rebnconv1d``) as regexes over NNCF's torch node names."""
    import re

    return [rf"(^|.*[/.]){re.escape(g.replace('/', '.'))}([/.\[].*|$)" for g in groups]


def qat_openvino(
    model,
    calib,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 4,
    keep_groups: list[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Any, dict]:
    """NNCF-quantize a deploy-mode torch ``model`` on ``calib`` (a CalibrationSet), fine-tune it
    against the float model on the calibration images and their mirror images, and convert to
    an OpenVINO model. ``epochs``/``lr`` default to DEFAULT_QAT_EPOCHS/DEFAULT_QAT_LR."""
    import os

    # NNCF compiles a C++ extension on first use and gives up after 60 s, which a busy 2-core
    # machine can exceed; a user's own setting wins.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
    import nncf
    import openvino as ov
    import torch

    epochs, lr, images = epochs or DEFAULT_QAT_EPOCHS, lr or DEFAULT_QAT_LR, training_images(calib)
    torch.manual_seed(seed)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).eval()
    dataset = nncf.Dataset([torch.from_numpy(b) for b in calib.samples()])
    ignored = nncf.IgnoredScope(patterns=_group_patterns(keep_groups or []), validate=False)
    try:
        quantized = nncf.quantize(student, dataset, subset_size=len(calib.inputs), ignored_scope=ignored)
    except Exception as exc:  # noqa: BLE001 - NNCF's own failure, as one line
        raise _conversion_error("NNCF could not quantize the torch model", exc) from exc
    quantized.train()
    freeze_batchnorm(quantized)  # BN statistics stay as calibrated
    history = fine_tune(
        quantized, teacher, images, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress
    )
    quantized.eval()
    try:
        with warnings.catch_warnings():  # the tracer's float-drift notes on fake-quantized graphs
            warnings.simplefilter("ignore")
            ov_model = ov.convert_model(quantized, example_input=torch.from_numpy(images[:1]))
    except Exception as exc:  # noqa: BLE001
        raise _conversion_error("OpenVINO could not convert the QAT model", exc) from exc
    return ov_model, _record("nncf (QAT)", epochs, lr, history, keep_groups)


def fold_batchnorm(model):
    """A copy of ``model`` with every conv unit's BatchNorm folded into its conv (REBNCONV's
    ``conv_s1``, DSREBNCONV's ``conv_pw``): pt2e then sees plain conv → ReLU patterns."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        bn = getattr(module, "bn_s1", None)
        conv_name = "conv_pw" if hasattr(module, "conv_pw") else "conv_s1"
        if isinstance(bn, torch.nn.BatchNorm2d) and hasattr(module, conv_name):
            setattr(module, conv_name, fuse_conv_bn_eval(getattr(module, conv_name), bn))
            module.bn_s1 = torch.nn.Identity()
    return folded


def symmetric_int8_config():
    """torchao's x86 QAT config, with two changes.

    - Activations are symmetric int8 (zero point 0): the layout TensorRT's explicit
      quantization requires. Weights stay per-channel symmetric int8.
    - The observers are min/max over the whole calibration set. The stock fused moving-average
      observers weigh each new batch by 0.01, so their ranges stay close to the first image's.
      On noise inputs at 97×131, that cost IoU 0.76 vs float (ORT's min/max PTQ passes).
    """
    import torch
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import get_default_x86_inductor_quantization_config

    config = get_default_x86_inductor_quantization_config(is_qat=True)
    activation = dataclasses.replace(
        config.input_activation,
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MinMaxObserver, eps=2**-12),
    )
    weight = dataclasses.replace(
        config.weight, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=PerChannelMinMaxObserver, eps=2**-12)
    )
    return dataclasses.replace(config, input_activation=activation, output_activation=activation, weight=weight)


def qat_qdq(
    model,
    calib,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 4,
    keep_groups: list[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Any, dict]:
    """pt2e QAT of a deploy-mode torch ``model``, trained like :func:`qat_openvino`.

    Returns the converted module (quantize/dequantize ops in its graph, dynamic batch and size,
    ready for the ONNX exporter) and the quantization record.
    """

    try:
        with quiet_loggers("torchao"):  # its CUDA kernels fail to load on a CPU build, noisily
            from torchao.quantization.pt2e import disable_observer
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer
    except ImportError:
        raise BackendUnavailable("int8-qat to a QDQ ONNX needs torchao (pt2e quantization)", extra="qat") from None
    import torch

    epochs, lr, images = epochs or DEFAULT_QAT_EPOCHS, lr or DEFAULT_QAT_LR, training_images(calib)
    torch.manual_seed(seed)
    teacher = model.eval()
    # torch.export's module shares parameters with what it exported: train a folded copy.
    student = fold_batchnorm(model)
    quantizer = X86InductorQuantizer().set_global(symmetric_int8_config())
    for group in keep_groups or []:
        quantizer.set_module_name_qconfig(group.replace("/", "."), None)
    # Exported with a dynamic batch and size, so it trains on batches (an example batch of 1
    # would be specialized to a static 1); the ONNX export fixes what the user asked for.
    dim = torch.export.Dim.DYNAMIC
    shapes = {"x": {0: dim, 2: dim, 3: dim}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(student, (torch.from_numpy(images[:2]),), dynamic_shapes=shapes).module()
            prepared = prepare_qat_pt2e(exported, quantizer)
    except Exception as exc:  # noqa: BLE001 - torch.export's or torchao's failure, as one line
        raise _conversion_error("pt2e could not prepare the model for QAT", exc) from exc
    with torch.no_grad():  # post-training ranges from the calibration set
        for sample in calib.samples():
            prepared(torch.from_numpy(sample))
    prepared.apply(disable_observer)  # ranges stay fixed; fine-tuning moves the weights onto the grid
    history = fine_tune(
        prepared, teacher, images, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress
    )
    try:
        converted = convert_pt2e(prepared)
    except Exception as exc:  # noqa: BLE001
        raise _conversion_error("pt2e could not convert the QAT model", exc) from exc
    record = _record(
        "torchao pt2e (QAT)",
        epochs,
        lr,
        history,
        keep_groups,
        scheme="int8 symmetric activations (zero point 0), per-channel symmetric int8 weights",
    )
    return converted, record
