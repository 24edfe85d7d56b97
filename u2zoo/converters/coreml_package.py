"""What an ``.mlpackage`` says about itself and a check of the saved package on any OS: the
metadata an app reads (contract, licence, description) and the validation of its interface,
op counts and compression against what was asked for."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from u2zoo.artifact import entry_size
from u2zoo.converters.base import ModelSource, contract_at_size
from u2zoo.converters.coreml_options import DEPLOYMENT_TARGETS, INPUT_NAME, OUTPUT_NAME, CoreMLOptions
from u2zoo.errors import BackendUnavailable, ConversionError, tool_failure
from u2zoo.zoo.contract import Contract

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
        "u2zoo.output": (
            f"{OUTPUT_NAME}: (1, 1, {height}, {width}) float32, the fused map d0 after its sigmoid; "
            f"then normalise {source.contract.post.normalize} and resize back to the image"
        ),
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
            "u2zoo.preprocess.note": (
                f"the contract divides by the image's own max ({pre.scale}); this model "
                "divides by 255: identical when the image's max is 255"
            ),
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
    mlmodel.short_description = (
        f"U²-Net {source.arch} ({name}) salient-object mask, {_precision_label(options)}, "
        f"input {'RGB image' if options.image_input else 'preprocessed tensor'} "
        f"{size[0]}x{size[1]}; see the u2zoo.* metadata"
    )
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
        return {
            "name": ft.name,
            "type": "tensor",
            "shape": [int(d) for d in arr.shape],
            "dtype": arr.ArrayDataType.Name(arr.dataType).lower(),
        }
    if kind == "imageType":
        img = ft.type.imageType
        return {
            "name": ft.name,
            "type": "image",
            "shape": [1, 3, int(img.height), int(img.width)],
            "color": img.ColorSpace.Name(img.colorSpace),
        }
    return {"name": ft.name, "type": str(kind)}


def _count_ops(block, counts: Counter) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, counts)


def validate_package(
    package: Path, source: ModelSource, options: CoreMLOptions, size: tuple[int, int], compressed: int | None = None
) -> dict[str, Any]:
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
        problems.append(
            f"specification version {spec.specificationVersion} is below "
            f"{options.deployment_target} ({DEPLOYMENT_TARGETS[options.deployment_target]})"
        )

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
            "package": (
                f"{package.name}: {size_bytes / 1e6:.2f} MB, ML program, spec v{spec.specificationVersion} "
                f"(deployment target {options.deployment_target})"
            ),
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
