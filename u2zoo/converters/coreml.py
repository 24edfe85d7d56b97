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

import os
import time
from pathlib import Path

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, tool_versions
from u2zoo.converters.base import ModelSource, Runner, TargetSpec, build_artifact, network_size_for, register
from u2zoo.converters.coreml_options import _ALL_UNITS, INPUT_NAME, OUTPUT_NAME, PRECISIONS, CoreMLOptions
from u2zoo.converters.coreml_package import _describe, _import_coremltools, _quiet, validate_package
from u2zoo.errors import BackendUnavailable, ConfigError, ConversionError, U2ZooError, one_line, tool_failure
from u2zoo.quantization.coreml_compression import (
    WEIGHT_THRESHOLD,
    CompressionPlan,
    compression_error,
    plan_compression,
    require_sklearn,
)
from u2zoo.zoo.contract import Contract

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
        inputs = [
            ct.ImageType(
                name=INPUT_NAME, shape=shape, scale=1 / 255.0, bias=[0.0, 0.0, 0.0], color_layout=ct.colorlayout.RGB
            )
        ]
    else:
        inputs = [ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)]
    precision = ct.precision.FLOAT32 if options.precision == "fp32" else ct.precision.FLOAT16
    stage = "conversion"
    try:
        with _quiet():
            mlmodel = ct.convert(
                exported,
                inputs=inputs,
                outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
                convert_to="mlprogram",
                compute_precision=precision,
                minimum_deployment_target=getattr(ct.target, options.deployment_target),
            )
            if options.compression:
                stage = (
                    "int8 weight quantization"
                    if options.precision == "int8-weights"
                    else f"{options.palettize}-bit palettization"
                )
                skip = _core_ml_names(cto, mlmodel, plan) if plan and plan.kept else {}
                if options.precision == "int8-weights":
                    config = cto.OpLinearQuantizerConfig(
                        mode="linear_symmetric",
                        dtype="int8",
                        granularity="per_channel",
                        weight_threshold=WEIGHT_THRESHOLD,
                    )
                    mlmodel = cto.linear_quantize_weights(
                        mlmodel, cto.OptimizationConfig(global_config=config, op_name_configs=skip)
                    )
                else:
                    config = cto.OpPalettizerConfig(
                        mode="kmeans", nbits=options.palettize, weight_threshold=WEIGHT_THRESHOLD
                    )
                    mlmodel = cto.palettize_weights(
                        mlmodel, cto.OptimizationConfig(global_config=config, op_name_configs=skip)
                    )
    except U2ZooError:
        raise
    except Exception as exc:  # noqa: BLE001 - coremltools' own failure
        text = one_line(exc)
        if "deployment target" in text or "deployment_target" in text:
            raise ConfigError(
                f"coremltools refused deployment target {options.deployment_target} for the {stage}: {text[:300]}"
            ) from exc
        raise ConversionError(f"coremltools {stage} failed: {tool_failure(exc)}") from exc
    return mlmodel


def _core_ml_names(cto, mlmodel, plan: CompressionPlan) -> dict[str, None]:
    """The Core ML const of each weight the plan keeps in float, found by its value (op names
    of a converted program do not carry torch module names): name → None = not compressed."""
    found = cto.get_weights_metadata(mlmodel, weight_threshold=WEIGHT_THRESHOLD)
    skip: dict[str, None] = {}
    for module in plan.kept:
        want = plan.stored[module]
        same = [
            (float(np.abs(np.asarray(meta.val, np.float32) - want).max()), name)
            for name, meta in found.items()
            if tuple(meta.val.shape) == want.shape
        ]
        if not same or min(same)[0] > 1e-3 * max(float(np.abs(want).max()), 1e-12):
            raise ConversionError(f"cannot find the Core ML weight of {module} to keep it in float")
        skip[min(same)[1]] = None
    return skip


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
        require_sklearn()
    if not hasattr(ct.target, options.deployment_target):
        raise ConfigError(f"coremltools {ct.__version__} does not know deployment target {options.deployment_target!r}")
    height, width = network_size_for(options, source)
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
            + ("" if error.get("within_target", True) else f" — BELOW the target {error['target']}")
        )
    if plan.kept:
        validation["summary"]["kept in float"] = ", ".join(
            f"{name} (alone: mean abs {plan.sensitivity['tensors'][name]:.3g})" for name in plan.kept
        )
    quantization = None
    if options.compression:
        quantization = {
            "tool": "coremltools.optimize.coreml",
            "weight_threshold": WEIGHT_THRESHOLD,
            "base_precision": "fp16" if options.precision == "int8-weights" else options.precision,
            "compressed": len(plan.compressed) - len(plan.kept),
            "kept_in_float": plan.kept,
            "method": (
                "linear_symmetric int8, per output channel"
                if options.precision == "int8-weights"
                else f"k-means palettization, {options.palettize} bits, one palette per tensor"
            ),
        }
    if options.image_input:
        in_spec = TensorSpec(INPUT_NAME, shape, "uint8")  # an RGB image; see the manifest's validation
    else:
        in_spec = TensorSpec(INPUT_NAME, shape, "float32")
    artifact = build_artifact(
        source,
        options,
        target="coreml",
        files=[package],
        inputs=[in_spec],
        outputs=[TensorSpec(OUTPUT_NAME, (1, 1, height, width), "float32")],
        tools=tool_versions("torch", "coremltools", "scikit-learn"),
        size=size,
        started=started,
        quantization=quantization,
    )
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
            self.model = ct.models.MLModel(
                str(self.artifact.path), compute_units=getattr(ct.ComputeUnit, self.compute_units)
            )
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


SPEC = register(
    TargetSpec(
        name="coreml",
        source="torch",
        precisions=PRECISIONS,
        dynamic_shapes=False,
        devices=("cpu",),
        host_os=("Darwin",),
        extra="coreml",
        requires=("coremltools",),
        options_type=CoreMLOptions,
        convert=convert,
        runner=CoreMLRunner,
        description="Core ML ML program (.mlpackage) via torch.export; built and validated anywhere, run on macOS",
    )
)
