"""ONNX Runtime static INT8 (QDQ) and per-layer-group sensitivity analysis.

Choice of integer types: this project's CPUs (AVX2 without VNNI) compute U8S8 products with
``vpmaddubsw`` into 16-bit intermediates that can saturate. ONNX Runtime documents two
remedies, and both are offered (``scheme``):

- ``u8s8-reduce-range`` (default): uint8 activations, int8 per-channel weights limited to
  7 bits so the 16-bit sums cannot saturate. It keeps ORT's fast U8S8 kernels: measured
  here on real U2NETP (2 threads) 299 ms vs 367 ms fp32, IoU 0.989 vs torch.
- ``s8s8``: signed int8 activations and weights, full 8-bit weights, no saturation path — but
  without VNNI ORT runs it slower than fp32 (605 ms vs ~400 ms measured here), so it is the
  portable choice, not the CPU-fast one.
- ``tensorrt``: ``s8s8`` in the layout TensorRT's explicit quantization consumes: symmetric
  (zero-point 0) int8 activations, symmetric per-channel int8 weights kept as float behind a
  Q/DQ pair (TensorRT quantizes them at build time), float biases (TensorRT dequantizes int8
  only), and a dedicated Q/DQ pair per consumer so each convolution fuses its own input.

``quant_pre_process`` (shape inference + graph optimisation) runs first, as ORT recommends.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.errors import ConfigError, ConversionError, did_you_mean, tool_failure
from u2zoo.quantization.calibration import CalibrationSet

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
SCHEMES = ("u8s8-reduce-range", "s8s8", "tensorrt")


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
        group = parts[0] if len(parts) > 1 else TOP_LEVEL
        groups.setdefault(group, []).append(node.name)
    return groups


TOP_LEVEL = "top-level"


def check_module_groups(model, groups: tuple[str, ...] | list[str]) -> list[str]:
    """Validate group names against the torch model itself (module paths such as ``stage2d``
    or ``stage2d/rebnconv1d``, or ``top-level``), for targets that quantize without ONNX.
    Returns the groups without repeats."""
    known = {name.replace(".", "/") for name, _ in model.named_modules() if name} | {TOP_LEVEL}
    unknown = [g for g in groups if g not in known]
    if unknown:
        top = [name for name, _ in model.named_children()] + [TOP_LEVEL]
        hint = did_you_mean(unknown[0], known).split(" (choose")[0]
        raise ConfigError(
            f"unknown layer group(s) {', '.join(map(repr, unknown))}{hint} (groups: {', '.join(top)}, "
            "or sub-modules such as stage2d/rebnconv1d)"
        )
    return list(dict.fromkeys(groups))


def group_pattern(group: str) -> str:
    """Regex for the node names of a group: a module path at any depth ("stage2d",
    "stage2d/rebnconv1d"), a module's own op ("stage2d/Add" matches "/stage2d/Add_3"), or
    ``top-level``. OpenVINO keeps ONNX node names, so the same regex feeds NNCF's ignored_scope."""
    if group == TOP_LEVEL:
        return r"^/[^/]+$"
    return rf"^/{re.escape(group)}(/.*|_\d+)?$"


def nodes_in_groups(model, groups: list[str]) -> list[str]:
    """Every node of ``model`` in any of ``groups``; a group matching nothing is an error."""
    names = [n.name for n in model.graph.node]
    selected: list[str] = []
    for group in groups:
        matched = [n for n in names if re.match(group_pattern(group), n)]
        if not matched:
            hint = did_you_mean(group, layer_groups(model)).split(" (choose")[0]
            raise ConfigError(
                f"unknown layer group {group!r}{hint} (groups: {', '.join(layer_groups(model))}, "
                "or a sub-path such as stage2d/rebnconv1d)"
            )
        selected += [n for n in matched if n not in selected]
    return selected


def plan_float_groups(
    fp32_path: Path,
    calib: CalibrationSet,
    input_name: str,
    keep_fp: int,
    keep_groups: tuple[str, ...],
    method: str = "minmax",
) -> tuple[list[str], list[str], Any]:
    """Which groups stay float: the named ones plus the ``keep_fp`` most sensitive.

    Returns (groups, their node names, the sensitivity ranking or None when not measured).
    """
    import onnx

    model = onnx.load(str(fp32_path))
    kept, ranking = list(keep_groups), None
    nodes_in_groups(model, kept)  # validate names before the slow part
    if keep_fp:
        ranking = sensitivity(fp32_path, calib, input_name, calib.inputs[:8], method)
        kept += [r.group for r in ranking[:keep_fp] if r.group not in kept]
    return kept, nodes_in_groups(model, kept), ranking


def ranges_cache_path(fp32_path: Path, calib: CalibrationSet, method: str) -> Path:
    """Where ONNX Runtime's calibration ranges of this graph on this set are kept.

    Calibration is most of an INT8 conversion's time (hundreds of images through a graph that
    outputs every tensor); the automatic float fallback re-quantizes the same graph several
    times, and a later convert of the same model and set needs the same ranges. Keyed by the
    graph's bytes, the set's digest and the method, so nothing else can hit it.
    """
    from u2zoo.files import file_digest
    from u2zoo.zoo.weights import cache_dir

    key = hashlib.sha256(f"{file_digest(fp32_path)}|{calib.digest}|{method}".encode()).hexdigest()[:32]
    folder = cache_dir() / "int8"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"ranges-{key}.json"


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    if name not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method {name!r} (choose from: {', '.join(CALIBRATION_METHODS)})")
    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calib: CalibrationSet,
    input_name: str,
    *,
    method: str = "minmax",
    exclude_nodes: list[str] | None = None,
    only_nodes: list[str] | None = None,
    scheme: str = "u8s8-reduce-range",
    cache: Path | None = None,
) -> dict[str, Any]:
    """Static QDQ quantization of ``fp32_path`` into ``out_path``; returns the settings used."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrate_method = _method(method)
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown int8 scheme {scheme!r} (choose from: {', '.join(SCHEMES)})")
    s8s8 = scheme in ("s8s8", "tensorrt")
    extra = {"ActivationSymmetric": s8s8, "WeightSymmetric": True}
    if scheme == "tensorrt":
        # float bias: TensorRT's DequantizeLinear takes int8 (not ORT's int32 bias) and folds the bias itself
        extra |= {"AddQDQPairToWeight": True, "DedicatedQDQPair": True, "QuantizeBias": False}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            if cache is not None and cache.is_file() and not _readable_ranges(cache):
                cache.unlink()  # a damaged cache is recomputed, never trusted
            quantize_static(
                str(prepared),
                str(out_path),
                calib.ort_reader(input_name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=not s8s8,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QInt8 if s8s8 else QuantType.QUInt8,
                nodes_to_quantize=only_nodes,
                nodes_to_exclude=exclude_nodes or None,
                calibrate_method=calibrate_method,
                calibration_cache_path=str(cache) if cache else None,
                extra_options=extra,
            )
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - the quantizer's own failure, reported as such
            raise ConversionError(f"ONNX Runtime INT8 quantization failed: {tool_failure(exc)}") from exc
    return {
        "format": "QDQ",
        "scheme": scheme,
        "activations": "int8 symmetric" if s8s8 else "uint8 asymmetric",
        "weights": "int8 symmetric per-channel" + ("" if s8s8 else ", 7-bit range (reduce_range)"),
        "calibration_method": method,
        "why": {
            "u8s8-reduce-range": "AVX2 without VNNI: U8S8 sums can saturate in 16 bits; reduce_range keeps "
            "them in range on the fast U8S8 kernels",
            "s8s8": "AVX2 without VNNI: U8S8 sums can saturate in 16 bits; S8S8 avoids that path",
            "tensorrt": "TensorRT explicit quantization: symmetric int8 Q/DQ, float weights behind Q/DQ "
            "pairs, one pair per consumer",
        }[scheme],
    }


def _readable_ranges(path: Path) -> bool:
    import json

    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


@dataclass(frozen=True)
class GroupSensitivity:
    group: str
    nodes: int  # all nodes of the group
    mean_abs: float
    max_abs: float


def sensitivity(
    fp32_path: Path,
    calib: CalibrationSet,
    input_name: str,
    eval_inputs: np.ndarray,
    method: str = "minmax",
    threads: int | None = None,
    only: list[str] | None = None,
) -> list[GroupSensitivity]:
    """Quantize one layer group at a time (everything else float) and measure the output error.

    Ranges are calibrated once and cached, so each group costs one quantization and one pass
    over ``eval_inputs``. ``only`` ranks these groups (e.g. sub-modules ``stage2d/rebnconv1d``)
    instead of the top-level ones. Sorted most sensitive first.
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
    graph = onnx.load(str(fp32_path))
    groups = layer_groups(graph) if only is None else {g: nodes_in_groups(graph, [g]) for g in only}
    results = []
    cache = ranges_cache_path(fp32_path, calib, method)  # shared with later rankings of this graph
    with tempfile.TemporaryDirectory() as tmp:
        for group, nodes in groups.items():
            out = Path(tmp) / f"{group.replace('/', '.')}.onnx"
            quantize_int8(fp32_path, out, calib, input_name, method=method, only_nodes=nodes, cache=cache)
            diff = np.abs(run(out) - reference)
            results.append(GroupSensitivity(group, len(nodes), float(diff.mean()), float(diff.max())))
    return sorted(results, key=lambda r: r.mean_abs, reverse=True)
