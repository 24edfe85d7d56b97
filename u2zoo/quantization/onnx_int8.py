"""ONNX Runtime static INT8 (QDQ) and per-layer-group sensitivity analysis.

Choice of integer types: this project's CPUs (AVX2 without VNNI) compute U8S8 products in
16-bit intermediates that can saturate; ONNX Runtime's documented remedies are
``reduce_range`` (7-bit weights, less precision everywhere) or S8S8 in QDQ format. We use
**S8S8 QDQ** — signed int8 activations and per-channel signed int8 weights — which avoids
the saturation path without giving up a bit of weight precision, and is also the layout
TensorRT consumes. ``quant_pre_process`` (shape inference + graph optimisation) runs first,
as ONNX Runtime recommends.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.errors import ConfigError, ConversionError
from u2zoo.quantization.calibration import CalibrationSet

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def layer_groups(model) -> dict[str, list[str]]:
    """Nodes of an exported U²-Net grouped by the module they came from.

    The TorchScript exporter names nodes after their module path (``/stage1/rebnconvin/
    conv_s1/Conv``), so the first path component is the RSU stage, side head or fuse conv;
    nodes of the top-level forward (decoder upsampling, concatenations, sigmoid) form the
    group ``top-level``. A group holds *every* node (Conv, Relu, Add, Concat, Resize,
    MaxPool): keeping only its convs in float would still quantize the tensors between them.
    """
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        parts = [p for p in node.name.split("/") if p]
        group = parts[0] if len(parts) > 1 else "top-level"
        groups.setdefault(group, []).append(node.name)
    return groups


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    if name not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method {name!r} (choose from: {', '.join(CALIBRATION_METHODS)})")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def quantize_int8(fp32_path: Path, out_path: Path, calib: CalibrationSet, input_name: str, *,
                  method: str = "minmax", exclude_nodes: list[str] | None = None,
                  only_nodes: list[str] | None = None, symmetric_activations: bool = False,
                  cache: Path | None = None) -> dict[str, Any]:
    """Static QDQ quantization of ``fp32_path`` into ``out_path``; returns the settings used."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrate_method = _method(method)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(out_path), calib.ort_reader(input_name), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=only_nodes, nodes_to_exclude=exclude_nodes or None,
                calibrate_method=calibrate_method, calibration_cache_path=str(cache) if cache else None,
                extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
            )
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - the quantizer's own failure, reported as such
            raise ConversionError(f"ONNX Runtime INT8 quantization failed: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:300]}") from exc
    return {"format": "QDQ", "activations": "int8 " + ("symmetric" if symmetric_activations else "asymmetric"),
            "weights": "int8 symmetric per-channel", "calibration_method": method,
            "why_s8s8": "AVX2 without VNNI: U8S8 can saturate; S8S8 QDQ avoids it without reduce_range"}


@dataclass(frozen=True)
class GroupSensitivity:
    group: str
    nodes: int  # all nodes of the group
    mean_abs: float
    max_abs: float


def sensitivity(fp32_path: Path, calib: CalibrationSet, input_name: str, eval_inputs: np.ndarray,
                method: str = "minmax", threads: int | None = None) -> list[GroupSensitivity]:
    """Quantize one layer group at a time (everything else float) and measure the output error.

    Ranges are calibrated once and cached, so each group costs one quantization and one pass
    over ``eval_inputs``. Sorted most sensitive first.
    """
    import onnx
    import onnxruntime as ort

    def run(path: Path) -> np.ndarray:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {input_name: x[None]})[0] for x in eval_inputs])

    reference = run(fp32_path)
    groups = layer_groups(onnx.load(str(fp32_path)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "ranges.cache"
        for group, nodes in groups.items():
            out = Path(tmp) / f"{group}.onnx"
            quantize_int8(fp32_path, out, calib, input_name, method=method, only_nodes=nodes, cache=cache)
            diff = np.abs(run(out) - reference)
            results.append(GroupSensitivity(group, len(nodes), float(diff.mean()), float(diff.max())))
    return sorted(results, key=lambda r: r.mean_abs, reverse=True)
