"""CoreML target: an ML program (``.mlpackage``) in fp32, fp16, int8 weights or palettized
weights, converted by coremltools from ``torch.export``; run by Core ML on macOS.

Conversion works on any OS, prediction only on macOS. So every package is validated here,
on the host that built it, from the *saved* files: one input ``image`` of the right
shape/type, exactly one output ``mask`` (the fused map — users of the official model meet
"7 outputs, random results"), the op counts of the program, and the contract written into
the model's metadata so an app can do the same preprocessing. The error the weight
compression causes is measured before conversion on the torch side (the same compression,
computed as coremltools computes it, applied to a BN-folded copy of the model and compared on
the bundled sample photos); where it misses IoU@0.5 ≥ 0.98, the few most harmful weight
tensors stay uncompressed (real U2NETP: one). On macOS the runner predicts and ``u2zoo
convert`` measures the real parity as for every other target.

Why ``torch.export``: ``torch.jit.trace`` + ``ct.convert`` fails on this model with torch
2.13 ("only 0-dimensional arrays can be converted to Python scalars", from
``F.interpolate(size=…)``); the exported program converts.

Inputs:

* tensor (default): float32 ``image`` (1, 3, H, W), already preprocessed by the contract
  (RGB, resize, divide by the image's own max, ImageNet mean/std) — bit-for-bit what every
  other target takes.
* image (``image_input=True``): an RGB ``ImageType`` with Core ML's scalar ``scale=1/255``;
  the per-channel ``(x - mean) / std`` is the first layer of the model. The contract divides
  by the image's *own max*; this model divides by 255. Both agree when the image's max is 255
  (most photos); the metadata says so.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, entry_size, tool_versions
from u2zoo.runtime.compare import DEFAULT_TOLERANCES, compare
from u2zoo.converters.base import ModelSource, Runner, TargetSpec, build_artifact, contract_at_size, register
from u2zoo.errors import BackendUnavailable, ConfigError, ConversionError, U2ZooError, did_you_mean, one_line, tool_failure
from u2zoo.zoo.contract import Contract

INPUT_NAME = "image"
OUTPUT_NAME = "mask"
PRECISIONS = ("fp32", "fp16", "int8-weights")
PALETTE_BITS = (1, 2, 3, 4, 6, 8)
# Weight tensors of more elements than this are compressed (int8 or palettized); smaller ones
# (biases, the 1×1 fusing conv) stay float. coremltools' default, 2048, would leave U2NETP's
# side-output convs (576 elements) and the whole tiny test network uncompressed.
WEIGHT_THRESHOLD = 256
# Compressed weights must keep the torch-side IoU@0.5 at or above the bar `u2zoo convert` sets
# for int8 weights (0.98); otherwise up to MAX_KEPT of the most harmful tensors stay float.
COMPRESSION_TARGET_IOU = DEFAULT_TOLERANCES["int8-weights"].iou50_min
MAX_KEPT = 4
SCAN_IMAGES = 2  # images of the sensitivity scan
SCANNED_GROUPS = 2  # layer groups whose tensors are scanned one by one

# coremltools' ``ct.target`` names → Core ML specification version, copied so options can be
# checked without importing coremltools (a 10+ s import); tests/test_coreml.py checks it
# against the installed ``ct.target``.
DEPLOYMENT_TARGETS: dict[str, int] = {
    "iOS13": 4, "iOS14": 5, "iOS15": 6, "iOS16": 7, "iOS17": 8, "iOS18": 9, "iOS26": 10,
    "macOS10_15": 4, "macOS10_16": 5, "macOS11": 5, "macOS12": 6, "macOS13": 7, "macOS14": 8, "macOS15": 9,
    "macOS26": 10,
    "watchOS6": 4, "watchOS7": 5, "watchOS8": 6, "watchOS9": 7, "watchOS10": 8, "watchOS11": 9, "watchOS26": 10,
    "tvOS13": 4, "tvOS14": 5, "tvOS15": 6, "tvOS16": 7, "tvOS17": 8, "tvOS18": 9, "tvOS26": 10,
}
_MLPROGRAM = 6  # ML programs (.mlpackage) exist since iOS15/macOS12
_COMPRESSED = 7  # constexpr (de)compression ops: iOS16/macOS13
_LUT3 = 9  # a 3-bit look-up table (8 entries): iOS18/macOS15; iOS16 only has 1, 2, 4, 6 and 8 bits
_ALL_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


def _family(name: str) -> str:
    return next(f for f in ("macOS", "watchOS", "tvOS", "iOS") if name.startswith(f))


def _oldest(family: str, version: int) -> str:
    """The first name of ``family`` at specification ``version`` or later, e.g. (macOS, 6) → macOS12."""
    return next(n for n, v in DEPLOYMENT_TARGETS.items() if _family(n) == family and v >= version)


@dataclass(frozen=True)
class CoreMLOptions:
    # fp32 | fp16 | int8-weights. int8-weights = the fp16 model whose weights (tensors of more
    # than WEIGHT_THRESHOLD elements) are stored as int8, linear symmetric per output channel,
    # and dequantized to fp16 when Core ML loads the model: arithmetic stays fp16.
    precision: str = "fp32"
    palettize: int | None = None  # k-means palettize the weights to N bits, on top of fp32/fp16
    image_input: bool = False  # RGB ImageType input (scale 1/255, mean/std inside) instead of a tensor
    deployment_target: str = "iOS16"  # a ct.target name; ML programs need iOS15/macOS12+
    dynamic: bool = False  # refused: Core ML models here have a fixed shape
    batch: int = 1
    height: int | None = None  # default: the contract's input size
    width: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"coreml does not support precision {self.precision!r} (supported: {', '.join(PRECISIONS)})")
        if self.dynamic:
            raise ConfigError("coreml builds fixed-shape models here; build one per size with --height/--width")
        if self.batch != 1:
            raise ConfigError(f"coreml models here take one image (batch 1), not {self.batch}; "
                              "an app predicts image by image")
        if (self.height is not None and self.height < 1) or (self.width is not None and self.width < 1):
            raise ConfigError("height and width must be positive")
        if self.palettize is not None:
            if self.precision == "int8-weights":
                raise ConfigError("--palettize applies to fp32 or fp16 weights, not on top of --int8-weights: "
                                  "choose one compression")
            if self.palettize not in PALETTE_BITS:
                raise ConfigError(f"--palettize {self.palettize}: Core ML palettizes to "
                                  f"{', '.join(map(str, PALETTE_BITS))} bits")
        names = {n.lower(): n for n in DEPLOYMENT_TARGETS}  # also "ios16", "macOS 10.15"
        name = names.get(str(self.deployment_target).replace(" ", "").replace(".", "_").lower())
        if name is None:
            raise ConfigError(f"unknown deployment target {self.deployment_target!r}"
                              f"{did_you_mean(str(self.deployment_target), DEPLOYMENT_TARGETS)}")
        object.__setattr__(self, "deployment_target", name)  # canonical spelling, e.g. ios16 → iOS16
        needed, what = self.minimum_spec_version()
        if DEPLOYMENT_TARGETS[name] < needed:
            raise ConfigError(f"deployment target {name} is too old: {what} needs {_oldest(_family(name), needed)} "
                              f"or later (--deployment-target)")

    def minimum_spec_version(self) -> tuple[int, str]:
        """The oldest Core ML specification version these options need, and why."""
        if self.palettize == 3:
            return _LUT3, "3-bit palettization"
        if self.palettize:
            return _COMPRESSED, "palettized weights"
        if self.precision == "int8-weights":
            return _COMPRESSED, "int8 weights"
        return _MLPROGRAM, "a Core ML ML program (.mlpackage)"

    @property
    def compression(self) -> str | None:
        if self.precision == "int8-weights":
            return "int8"
        return f"palettize{self.palettize}" if self.palettize else None


# ---------------------------------------------------------------------------------------------
# coremltools, quietly


def _import_coremltools():
    """coremltools and its optimize API; its import-time chatter (untested torch/sklearn
    versions, no native runtime on Linux) is swallowed, a missing install is a one-line error."""
    try:
        with _quiet():
            import coremltools as ct
            import coremltools.optimize.coreml as cto
    except ImportError:
        raise BackendUnavailable("target 'coreml' needs coremltools", extra="coreml") from None
    return ct, cto


@contextlib.contextmanager
def _quiet():
    """Silence progress bars and warnings of torch.export and coremltools (they write to stderr)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # e.g. torch's pytree deprecation notices at coremltools' import
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)



# ---------------------------------------------------------------------------------------------
# the torch module that is exported


def _wrap(model, contract: Contract, image_input: bool):
    """The network with its input named ``image``; for image input, with the contract's
    per-channel ``(x - mean) / std`` in front (Core ML's ImageType only has a scalar scale)."""
    import torch
    from torch import nn

    class CoreMLInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.normalize = image_input
            self.register_buffer("mean", torch.tensor(contract.pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(contract.pre.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, image: torch.Tensor) -> torch.Tensor:  # the name becomes the input's name
            if self.normalize:
                image = (image - self.mean) / self.std
            return self.net(image)

    return CoreMLInput().eval()


def _export(module, shape: tuple[int, ...]):
    import torch

    example = torch.rand(shape) if module.normalize else torch.randn(shape)
    try:
        with _quiet(), torch.no_grad():
            return torch.export.export(module, (example,)).run_decompositions({})
    except Exception as exc:  # noqa: BLE001 - the exporter's own failure
        raise ConversionError(f"torch.export failed: {tool_failure(exc)}") from exc


def _convert(ct, cto, exported, options: CoreMLOptions, shape: tuple[int, ...], plan: CompressionPlan | None = None):
    """ExportedProgram → MLModel, compressed as asked (the plan's kept tensors stay float);
    coremltools' errors become ours."""
    if options.image_input:
        inputs = [ct.ImageType(name=INPUT_NAME, shape=shape, scale=1 / 255.0, bias=[0.0, 0.0, 0.0],
                               color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)]
    precision = ct.precision.FLOAT32 if options.precision == "fp32" else ct.precision.FLOAT16
    stage = "conversion"
    try:
        with _quiet():
            mlmodel = ct.convert(exported, inputs=inputs, outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
                                 convert_to="mlprogram", compute_precision=precision,
                                 minimum_deployment_target=getattr(ct.target, options.deployment_target))
            if options.compression:
                stage = "int8 weight quantization" if options.precision == "int8-weights" else \
                    f"{options.palettize}-bit palettization"
                skip = _core_ml_names(cto, mlmodel, plan) if plan and plan.kept else {}
                if options.precision == "int8-weights":
                    config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                         granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD)
                    mlmodel = cto.linear_quantize_weights(
                        mlmodel, cto.OptimizationConfig(global_config=config, op_name_configs=skip))
                else:
                    config = cto.OpPalettizerConfig(mode="kmeans", nbits=options.palettize,
                                                    weight_threshold=WEIGHT_THRESHOLD)
                    mlmodel = cto.palettize_weights(
                        mlmodel, cto.OptimizationConfig(global_config=config, op_name_configs=skip))
    except U2ZooError:
        raise
    except Exception as exc:  # noqa: BLE001 - coremltools' own failure
        text = one_line(exc)
        if "deployment target" in text or "deployment_target" in text:
            raise ConfigError(f"coremltools refused deployment target {options.deployment_target} "
                              f"for the {stage}: {text[:300]}") from exc
        raise ConversionError(f"coremltools {stage} failed: {tool_failure(exc)}") from exc
    return mlmodel


def _core_ml_names(cto, mlmodel, plan: CompressionPlan) -> dict[str, None]:
    """The Core ML const of each weight the plan keeps in float, found by its value (op names
    of a converted program do not carry torch module names): name → None = not compressed."""
    found = cto.get_weights_metadata(mlmodel, weight_threshold=WEIGHT_THRESHOLD)
    skip: dict[str, None] = {}
    for module in plan.kept:
        want = plan.stored[module]
        same = [(float(np.abs(np.asarray(meta.val, np.float32) - want).max()), name)
                for name, meta in found.items() if tuple(meta.val.shape) == want.shape]
        if not same or min(same)[0] > 1e-3 * max(float(np.abs(want).max()), 1e-12):
            raise ConversionError(f"cannot find the Core ML weight of {module} to keep it in float")
        skip[min(same)[1]] = None
    return skip


# ---------------------------------------------------------------------------------------------
# metadata


def _metadata(source: ModelSource, options: CoreMLOptions, size: tuple[int, int]) -> dict[str, str]:
    """What an app needs to feed the model and read its output, as user-defined metadata."""
    from u2zoo.version import __version__

    contract = contract_at_size(source.contract, size)
    pre = contract.pre
    height, width = size
    common = {
        "u2zoo.contract": json.dumps(contract.to_dict(), sort_keys=True),
        "u2zoo.input": "image" if options.image_input else "tensor",
        "u2zoo.preprocess.color": "RGB",
        "u2zoo.preprocess.size": f"{height}x{width}",  # height x width
        "u2zoo.preprocess.resize": f"{pre.resize_filter}, antialias={pre.antialias} (done by the app)",
        "u2zoo.preprocess.mean": json.dumps(list(pre.mean)),
        "u2zoo.preprocess.std": json.dumps(list(pre.std)),
        "u2zoo.output": (f"{OUTPUT_NAME}: (1, 1, {height}, {width}) float32, the fused map d0 after its sigmoid; "
                         f"then normalise {source.contract.post.normalize} and resize back to the image"),
        "u2zoo.weights_sha256": source.weights.sha256 or "none (random weights)",
        "u2zoo.arch": source.arch,
        "u2zoo.precision": options.precision + (f"+palettize{options.palettize}" if options.palettize else ""),
        "u2zoo.version": __version__,
    }
    if options.image_input:
        return common | {
            "u2zoo.preprocess.scale": repr(1 / 255.0),  # Core ML's ImageType scale
            "u2zoo.preprocess.bias": json.dumps([0.0, 0.0, 0.0]),  # Core ML's ImageType bias
            "u2zoo.preprocess.in_model": "x * scale + bias, then (x - mean) / std per channel",
            "u2zoo.preprocess.note": (f"the contract divides by the image's own max ({pre.scale}); this model "
                                      "divides by 255: identical when the image's max is 255"),
        }
    return common | {
        "u2zoo.preprocess.scale": "1/max(image)" if pre.scale == "image_max" else "1/255",
        "u2zoo.preprocess.bias": json.dumps([0.0, 0.0, 0.0]),
        "u2zoo.preprocess.in_model": "nothing: feed (x * scale - mean) / std as float32 NCHW",
    }


def _license(source: ModelSource) -> str:
    from u2zoo.zoo.weights import entry_for_sha256

    entry = entry_for_sha256(source.weights.sha256) if source.weights.sha256 else None
    return entry.license if entry else "unknown: weights not in the u2zoo registry"


def _describe(mlmodel, source: ModelSource, options: CoreMLOptions, size: tuple[int, int]) -> None:
    for key, value in _metadata(source, options, size).items():
        mlmodel.user_defined_metadata[key] = value
    name = source.weights.name or source.arch
    mlmodel.short_description = (f"U²-Net {source.arch} ({name}) salient-object mask, {_precision_label(options)}, "
                                 f"input {'RGB image' if options.image_input else 'preprocessed tensor'} "
                                 f"{size[0]}x{size[1]}; see the u2zoo.* metadata")
    mlmodel.author = "u2zoo (U²-Net: Qin et al. 2020)"
    mlmodel.license = _license(source)
    mlmodel.version = source.weights.sha256[:12] if source.weights.sha256 else "random-weights"
    if options.image_input:
        mlmodel.input_description[INPUT_NAME] = f"RGB image, {size[1]}x{size[0]} (width x height), 8 bit per channel"
    else:
        mlmodel.input_description[INPUT_NAME] = "RGB / max(RGB), minus ImageNet mean, over std; float32 NCHW"
    mlmodel.output_description[OUTPUT_NAME] = "saliency in [0, 1] (sigmoid of the fused map d0)"


def _precision_label(options: CoreMLOptions) -> str:
    return options.precision + (f" + {options.palettize}-bit palettized weights" if options.palettize else "")


# ---------------------------------------------------------------------------------------------
# validation of the saved package (any OS)


def _feature(ft) -> dict[str, Any]:
    kind = ft.type.WhichOneof("Type")
    if kind == "multiArrayType":
        arr = ft.type.multiArrayType
        return {"name": ft.name, "type": "tensor", "shape": [int(d) for d in arr.shape],
                "dtype": arr.ArrayDataType.Name(arr.dataType).lower()}
    if kind == "imageType":
        img = ft.type.imageType
        return {"name": ft.name, "type": "image", "shape": [1, 3, int(img.height), int(img.width)],
                "color": img.ColorSpace.Name(img.colorSpace)}
    return {"name": ft.name, "type": str(kind)}


def _count_ops(block, counts: Counter) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, counts)


def validate_package(package: Path, source: ModelSource, options: CoreMLOptions, size: tuple[int, int],
                     compressed: int | None = None) -> dict[str, Any]:
    """Read the *saved* package's spec back and check it; any mismatch is a ConversionError.
    ``compressed``: how many weight tensors the plan compresses (each must be one constexpr op)."""
    ct, _ = _import_coremltools()
    height, width = size
    try:
        with _quiet():
            spec = ct.utils.load_spec(str(package))
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"the saved package {package.name} cannot be read back: {tool_failure(exc)}") from exc
    problems: list[str] = []
    inputs = [_feature(f) for f in spec.description.input]
    outputs = [_feature(f) for f in spec.description.output]
    if options.image_input:
        expected_in = {"name": INPUT_NAME, "type": "image", "shape": [1, 3, height, width], "color": "RGB"}
    else:
        expected_in = {"name": INPUT_NAME, "type": "tensor", "shape": [1, 3, height, width], "dtype": "float32"}
    expected_out = {"name": OUTPUT_NAME, "type": "tensor", "shape": [1, 1, height, width], "dtype": "float32"}
    if inputs != [expected_in]:
        problems.append(f"inputs {inputs} are not [{expected_in}]")
    if outputs != [expected_out]:
        problems.append(f"outputs {outputs} are not exactly one {expected_out}")

    kind = spec.WhichOneof("Type")
    counts: Counter = Counter()
    if kind != "mlProgram" or "main" not in spec.mlProgram.functions:
        problems.append(f"not an ML program with a main function (model type {kind})")
    else:
        main = spec.mlProgram.functions["main"]
        for block in main.block_specializations.values():
            _count_ops(block, counts)
    compute = {op: n for op, n in counts.items() if op != "const"}
    if not counts.get("conv"):
        problems.append("no conv op in the program")
    if options.precision == "int8-weights":
        found = counts.get("constexpr_affine_dequantize", 0) + counts.get("constexpr_blockwise_shift_scale", 0)
    else:
        found = counts.get("constexpr_lut_to_dense", 0)
    if options.compression and not found:
        problems.append(f"{options.compression} asked for, but the program has no decompression op")
    elif options.compression and compressed is not None and found != compressed:
        problems.append(f"{found} weight tensors are compressed, the plan compresses {compressed}")
    if spec.specificationVersion < DEPLOYMENT_TARGETS[options.deployment_target]:
        problems.append(f"specification version {spec.specificationVersion} is below "
                        f"{options.deployment_target} ({DEPLOYMENT_TARGETS[options.deployment_target]})")

    stored = dict(spec.description.metadata.userDefined)
    ours = _metadata(source, options, size)
    missing = sorted(k for k in ours if k not in stored)
    if missing:
        problems.append(f"metadata missing {', '.join(missing)}")
    try:
        contract_ok = json.loads(stored.get("u2zoo.contract", "null")) == json.loads(ours["u2zoo.contract"])
    except ValueError:
        contract_ok = False
    if not contract_ok:
        problems.append("metadata u2zoo.contract differs from the artifact's contract")
    elif Contract.from_dict(json.loads(stored["u2zoo.contract"])) != contract_at_size(source.contract, size):
        problems.append("metadata u2zoo.contract does not parse back to the artifact's contract")
    differing = sorted(k for k in ours if k in stored and k != "u2zoo.contract" and stored[k] != ours[k])
    if differing:
        problems.append(f"metadata {', '.join(differing)} differ from what was written")
    if problems:
        raise ConversionError(f"CoreML package {package.name} failed validation: {'; '.join(problems)}")

    size_bytes = entry_size(package)
    top = ", ".join(f"{n} {op}" for op, n in sorted(compute.items(), key=lambda kv: (-kv[1], kv[0]))[:5])
    if options.image_input:
        input_line = f"{INPUT_NAME}: RGB image {width}x{height} (scale 1/255, mean/std inside the model)"
    else:
        input_line = f"{INPUT_NAME}: float32 (1, 3, {height}, {width}), preprocessed by the contract"
    return {
        "summary": {
            "package": (f"{package.name}: {size_bytes / 1e6:.2f} MB, ML program, spec v{spec.specificationVersion} "
                        f"(deployment target {options.deployment_target})"),
            "input": input_line,
            "output": f"{OUTPUT_NAME}: float32 (1, 1, {height}, {width}), the only output (fused map d0)",
            "ops": f"{sum(compute.values())} ops: {top}",
            "metadata": f"u2zoo contract, preprocessing and weights sha256 present and equal ({len(ours)} keys)",
        },
        "inputs": inputs,
        "outputs": outputs,
        "op_counts": dict(sorted(counts.items())),
        "metadata_keys": sorted(stored),
        "specification_version": int(spec.specificationVersion),
        "size_bytes": size_bytes,
    }


# ---------------------------------------------------------------------------------------------
# the compression error, measured on the torch side before conversion


def _fold_batchnorm(module) -> None:
    """Fold every BatchNorm2d into the conv registered just before it, in place.

    coremltools folds conv + batch norm before it compresses, so the weights it quantizes or
    palettizes are the folded ones; the simulation must compress the same numbers. In
    REBNCONV (conv_s1, bn_s1) and DSREBNCONV (conv_dw, conv_pw, bn_s1) registration order is
    forward order.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def int8_round_trip(weight: np.ndarray) -> np.ndarray:
    """Linear symmetric int8 per output channel (axis 0), computed like coremltools'
    linear_quantize_weights: in the weight's own dtype (fp16 for an fp16 model), range ±127."""
    axes = tuple(range(1, weight.ndim))
    max_abs = np.abs(weight).max(axis=axes, keepdims=True)
    scale = (max_abs - (-max_abs)) / (127 - (-127))
    scale = np.where(scale > 0, scale, np.ones_like(scale)).astype(weight.dtype)
    quantized = np.clip(np.round(weight / scale), -127, 127)
    return (quantized.astype(np.float32) * scale).astype(weight.dtype)


def kmeans_round_trip(weight: np.ndarray, bits: int) -> np.ndarray:
    """k-means with 2**bits clusters over one weight tensor, like coremltools' palettize_weights
    (scikit-learn, k-means++, n_init=1, random_state=0; fp16 weights are clustered as float64)."""
    from sklearn.cluster import KMeans

    values = weight.reshape(-1, 1).astype(np.float64 if weight.dtype == np.float16 else np.float32)
    clusters = min(len(values), 1 << bits)
    kmeans = KMeans(clusters, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(values)
    return kmeans.cluster_centers_[kmeans.labels_].reshape(weight.shape).astype(weight.dtype)


def _compress(weight: np.ndarray, options: CoreMLOptions) -> np.ndarray:
    if options.precision == "int8-weights":
        return int8_round_trip(weight)
    return kmeans_round_trip(weight, options.palettize)


def _group(name: str) -> str:
    """A weight's layer group: its top-level module (stage2d, side3, outconv)."""
    return name.split(".")[0]


@dataclass
class CompressionPlan:
    """What Core ML will store for each conv weight, decided and measured on the torch side.

    ``stored``: module name → folded weight in the model's float type (fp16-rounded for fp16
    models); ``compressed``: the compressed version of every tensor large enough to compress;
    ``kept``: tensors left uncompressed; ``parity``: the model with these weights vs the float
    model; ``sensitivity``: mean abs error with only one group / tensor compressed, where the
    search ran.
    """

    net: Any  # the BN-folded float copy
    half: bool
    stored: dict[str, np.ndarray]
    compressed: dict[str, np.ndarray]
    kept: list[str] = field(default_factory=list)
    parity: Any = None  # u2zoo.runtime.compare.Parity
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)

    def weights(self, compress: list[str] | None = None) -> dict[str, np.ndarray]:
        names = [n for n in self.compressed if n not in self.kept] if compress is None else compress
        return self.stored | {n: self.compressed[n] for n in names}

    def model(self, compress: list[str] | None = None):
        """The folded copy with the stored weights: those of ``compress`` (default: every
        compressed tensor not kept) compressed, biases fp16-rounded for fp16 models."""
        import torch
        from torch import nn

        weights = self.weights(compress)
        net = copy.deepcopy(self.net)
        with torch.no_grad():
            for name, conv in net.named_modules():
                if isinstance(conv, nn.Conv2d):
                    conv.weight.copy_(torch.from_numpy(weights[name].astype(np.float32)))
                    if self.half and conv.bias is not None:
                        conv.bias.copy_(torch.from_numpy(_fp16(conv.bias.detach().float().numpy())))
        return net


def _outputs(net, inputs: np.ndarray) -> np.ndarray:
    from u2zoo.runtime.pipeline import run_batched
    from u2zoo.zoo.reference import TorchPredictor

    return run_batched(TorchPredictor(net), inputs)


def plan_compression(model, options: CoreMLOptions, inputs: np.ndarray,
                     reference: np.ndarray | None = None) -> CompressionPlan:
    """Fold BN, compress every conv weight of more than WEIGHT_THRESHOLD elements exactly as
    Core ML will, and measure the result on ``inputs`` against the float model.

    When the fully compressed model misses the target (IoU@0.5 ≥ COMPRESSION_TARGET_IOU, the
    bar ``u2zoo convert`` sets for int8 weights), find the weights that hurt most and keep up
    to MAX_KEPT of them in float, most harmful first, until the target is met: each layer
    group compressed alone, then each tensor of the SCANNED_GROUPS worst groups alone, on the
    first SCAN_IMAGES inputs at half resolution.

    Real U2NETP needs this: in ``stage2d.rebnconv1d`` one input channel has weights up to 5.6
    where the others stay below 0.16, so per-output-channel int8 (step 5.6/127) rounds the
    others to zero, and its biases (up to 1361) leave what follows to cancel large values.
    Every weight in int8: IoU@0.5 0.72 on the sample photos; that one tensor kept in fp16: 0.992.
    """
    from torch import nn

    net = copy.deepcopy(model).eval()
    _fold_batchnorm(net)
    half = options.precision in ("fp16", "int8-weights")
    stored = {}
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d):
            weight = conv.weight.detach().float().numpy()
            stored[name] = weight.astype(np.float16) if half else weight  # Core ML compresses the fp16 weights
    candidates = [n for n, w in stored.items() if w.size > WEIGHT_THRESHOLD] if options.compression else []
    plan = CompressionPlan(net, half, stored, {n: _compress(stored[n], options) for n in candidates})
    if options.precision == "fp32" and not candidates:
        return plan  # nothing changes
    reference = _outputs(model, inputs) if reference is None else reference
    plan.parity = compare(reference, _outputs(plan.model(), inputs))
    if candidates and plan.parity.iou50 < COMPRESSION_TARGET_IOU:
        keep_harmful(plan, model, inputs, reference)
    return plan


def keep_harmful(plan: CompressionPlan, model, inputs: np.ndarray, reference: np.ndarray) -> None:
    """Rank the compressed tensors by the harm each does alone and keep the worst in float,
    one by one, until the plan meets the target or MAX_KEPT are kept (see plan_compression)."""
    # the scan only ranks: the first images, every other pixel (4× cheaper); the final
    # check below runs on every input at full size
    scan = np.ascontiguousarray(inputs[:SCAN_IMAGES, :, ::2, ::2])
    scan_reference = _outputs(model, scan)

    def alone(names: list[str]) -> float:
        return compare(scan_reference, _outputs(plan.model(compress=names), scan)).mean_abs

    groups: dict[str, list[str]] = {}
    for name in plan.compressed:
        groups.setdefault(_group(name), []).append(name)
    by_group = {group: alone(names) for group, names in groups.items()}
    worst = sorted(by_group, key=lambda g: -by_group[g])[:SCANNED_GROUPS]
    by_tensor = {name: alone([name]) for group in worst for name in groups[group]}
    plan.sensitivity = {"groups": {g: round(e, 5) for g, e in by_group.items()},
                        "tensors": {n: round(e, 5) for n, e in by_tensor.items()}}
    for name in sorted(by_tensor, key=lambda n: -by_tensor[n])[:MAX_KEPT]:
        plan.kept.append(name)
        plan.parity = compare(reference, _outputs(plan.model(), inputs))
        if plan.parity.iou50 >= COMPRESSION_TARGET_IOU:
            break


def compression_error(plan: CompressionPlan, options: CoreMLOptions, images: list[Path]) -> dict[str, Any]:
    """The plan's measured error, as the manifest records it."""
    if plan.parity is None:
        return {"method": "none", "note": "fp32 weights are stored unchanged"}
    method = {"fp16": "fp16 weights", "int8-weights": "int8 per-channel weights (fp16 model)"}[options.precision]
    if options.palettize:
        method = f"{options.palettize}-bit k-means palettes per tensor ({options.precision} model)"
    parity = plan.parity
    result = {"method": method, "max_abs": parity.max_abs, "mean_abs": parity.mean_abs, "iou50": parity.iou50,
              "num_images": parity.num_images, "images": [p.name for p in images],
              "note": "weights only, simulated in torch; fp16 arithmetic is measured by the parity check on macOS"}
    if options.compression:
        result |= {"weight_threshold": WEIGHT_THRESHOLD, "compressed": len(plan.compressed) - len(plan.kept),
                   "kept_in_float": plan.kept, "target": f"IoU@0.5 >= {COMPRESSION_TARGET_IOU:g}",
                   "within_target": parity.iou50 >= COMPRESSION_TARGET_IOU}
        if plan.sensitivity:
            result["sensitivity_mean_abs"] = plan.sensitivity
    return result


def _require_sklearn() -> None:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise BackendUnavailable("--palettize needs scikit-learn (k-means)", extra="coreml")


def _tidy_package(package: Path) -> None:
    """Drop what an app does not need and give the files the usual permissions.

    coremltools writes ``executorch_debug_handle_mapping.json`` beside the package manifest
    for torch.export sources: an ExecuTorch debugging aid, not an item of the package (Core ML
    never reads it), and here all its handles are null — 254 kB of U2NETP's 2.8 MB. It also
    writes ``model.mlmodel`` with mode 0600.
    """
    (package / "executorch_debug_handle_mapping.json").unlink(missing_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    for file in package.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


def convert(source: ModelSource, options: CoreMLOptions, out_dir: Path, stem: str) -> Artifact:
    """torch → torch.export → Core ML ML program, compressed, described, saved and validated."""
    from u2zoo.runtime.pipeline import preprocess_files
    from u2zoo.zoo.reference import sample_images

    ct, cto = _import_coremltools()
    if options.palettize:
        _require_sklearn()
    if not hasattr(ct.target, options.deployment_target):
        raise ConfigError(f"coremltools {ct.__version__} does not know deployment target {options.deployment_target!r}")
    height = options.height or source.contract.pre.size[0]
    width = options.width or source.contract.pre.size[1]
    size, shape = (height, width), (1, 3, height, width)
    if options.image_input and not stem.endswith("_image"):
        stem += "_image"  # an image-input package must not overwrite the tensor-input one
    package = out_dir / f"{stem}.mlpackage"
    started = time.perf_counter()

    # on the torch side, before conversion: what Core ML will store, and the error it causes
    images = sample_images()
    inputs = preprocess_files(images, source.contract, size)
    plan = plan_compression(source.model, options, inputs)
    error = compression_error(plan, options, images)
    exported = _export(_wrap(source.model, source.contract, options.image_input), shape)
    mlmodel = _convert(ct, cto, exported, options, shape, plan)
    _describe(mlmodel, source, options, size)
    try:
        with _quiet():
            mlmodel.save(str(package))
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"saving {package.name} failed: {tool_failure(exc)}") from exc
    _tidy_package(package)

    validation = validate_package(package, source, options, size, compressed=len(plan.compressed) - len(plan.kept))
    validation["compression_error"] = error
    if "max_abs" in error:
        validation["summary"]["compression (torch side)"] = (
            f"{error['method']} on {error['num_images']} sample image(s): max abs {error['max_abs']:.3g}, "
            f"mean abs {error['mean_abs']:.3g}, IoU@0.5 {error['iou50']:.4f}"
            + ("" if error.get("within_target", True) else f" — BELOW the target {error['target']}"))
    if plan.kept:
        validation["summary"]["kept in float"] = ", ".join(
            f"{name} (alone: mean abs {plan.sensitivity['tensors'][name]:.3g})" for name in plan.kept)
    quantization = None
    if options.compression:
        quantization = {"tool": "coremltools.optimize.coreml", "weight_threshold": WEIGHT_THRESHOLD,
                        "base_precision": "fp16" if options.precision == "int8-weights" else options.precision,
                        "compressed": len(plan.compressed) - len(plan.kept), "kept_in_float": plan.kept,
                        "method": ("linear_symmetric int8, per output channel" if options.precision == "int8-weights"
                                   else f"k-means palettization, {options.palettize} bits, one palette per tensor")}
    if options.image_input:
        in_spec = TensorSpec(INPUT_NAME, shape, "uint8")  # an RGB image; see the manifest's validation
    else:
        in_spec = TensorSpec(INPUT_NAME, shape, "float32")
    artifact = build_artifact(source, options, target="coreml", files=[package], inputs=[in_spec],
                              outputs=[TensorSpec(OUTPUT_NAME, (1, 1, height, width), "float32")],
                              tools=tool_versions("torch", "coremltools", "scikit-learn"), size=size,
                              started=started, quantization=quantization)
    artifact.manifest["validation"] = validation
    return artifact


# ---------------------------------------------------------------------------------------------
# run (macOS)


def tensor_to_image(item: np.ndarray, contract: Contract):
    """One contract-preprocessed (3, H, W) tensor → the RGB uint8 PIL image an image-input
    model takes: undo mean/std, ×255. The model's scale 1/255 then gives back RGB/max."""
    from PIL import Image

    pre = contract.pre
    rgb = item.transpose(1, 2, 0) * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)
    return Image.fromarray(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8), mode="RGB")


class CoreMLRunner(Runner):
    """Core ML on macOS, one image per predict call.

    Compute units: ``CPU_ONLY`` by default, whatever ``threads`` says (Core ML has no thread
    setting), so parity and timings are comparable with the other CPU targets and fp32 stays
    fp32. ``compute_units="ALL"`` (or ``U2ZOO_COREML_COMPUTE_UNITS=ALL`` for ``bench``) lets
    Core ML use the GPU and the Neural Engine, which compute in fp16.
    """

    def __init__(self, artifact: Artifact, threads: int | None = None, compute_units: str | None = None):
        super().__init__(artifact, threads)
        units = (compute_units or os.environ.get("U2ZOO_COREML_COMPUTE_UNITS") or "CPU_ONLY").upper()
        if units not in _ALL_UNITS:
            raise ConfigError(f"unknown Core ML compute units {units!r} (choose from: {', '.join(_ALL_UNITS)})")
        self.compute_units = units
        self.image_input = bool(artifact.manifest.get("options", {}).get("image_input"))
        self.model = None

    def load(self) -> None:
        reason = SPEC.runtime_unavailable_reason()
        if reason:
            raise BackendUnavailable(f"cannot run {self.artifact.path.name}: {reason}")
        ct, _ = _import_coremltools()
        try:
            self.model = ct.models.MLModel(str(self.artifact.path), compute_units=getattr(ct.ComputeUnit, self.compute_units))
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailable(f"Core ML cannot load {self.artifact.path.name}: {tool_failure(exc)}") from exc

    def close(self) -> None:
        self.model = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = np.asarray(feeds[INPUT_NAME], dtype=np.float32)
        contract = self.artifact.contract
        outputs, elapsed = [], 0.0
        for item in batch:
            feed = tensor_to_image(item, contract) if self.image_input else np.ascontiguousarray(item[None])
            started = time.perf_counter()
            result = self.model.predict({INPUT_NAME: feed})
            elapsed += time.perf_counter() - started
            outputs.append(np.asarray(result[OUTPUT_NAME], dtype=np.float32).reshape(1, 1, *item.shape[1:]))
        self.last_latency_s = elapsed
        return {OUTPUT_NAME: np.concatenate(outputs)}


SPEC = register(TargetSpec(
    name="coreml", source="torch", precisions=PRECISIONS, dynamic_shapes=False, devices=("cpu",),
    host_os=("Darwin",), extra="coreml", requires=("coremltools",),
    options_type=CoreMLOptions, convert=convert, runner=CoreMLRunner,
    description="Core ML ML program (.mlpackage) via torch.export; built and validated anywhere, run on macOS",
))
