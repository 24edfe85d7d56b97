"""``u2zoo convert``: weights → artifact, proven in its real runtime before it counts.

Every target goes through the same steps: resolve the weights, let the target's converter
write into a private staging folder, open the result with the target's runner, compare it
with the PyTorch reference on real photos, record the parity in the manifest, and only then
move the files into the output folder. A failed step leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.artifact import Artifact
from u2zoo.benchmarks.compare import DEFAULT_TOLERANCES, Parity, Tolerance, compare
from u2zoo.converters import ModelSource, get_target
from u2zoo.converters.base import ensure_writable_dir
from u2zoo.errors import BackendUnavailable, ParityError
from u2zoo.pipeline import network_size, preprocess_files, run_batched
from u2zoo.zoo.archs import count_params
from u2zoo.zoo.reference import TorchPredictor, sample_images
from u2zoo.zoo.weights import load_model

# A deliberately odd shape: dynamic artifacts must also run on it (batch 2, 97×131).
ODD_SHAPE = (2, 3, 97, 131)


def measure_parity(runner, reference: TorchPredictor, images: list[Path], tolerance: Tolerance) -> Parity:
    """Compare ``runner`` with the torch ``reference`` on the same preprocessed ``images``."""
    contract = runner.artifact.contract
    inputs = preprocess_files(images, contract, network_size(runner, contract))
    return compare(run_batched(reference, inputs), run_batched(runner, inputs), tolerance)


def measure_odd_shape_parity(runner, reference: TorchPredictor, tolerance: Tolerance) -> Parity:
    """Dynamic artifacts must hold on a shape nobody exports with: batch 2 of 97×131 (at the
    artifact's own height and width when only its batch is dynamic)."""
    shape = ODD_SHAPE if runner.fixed_size is None else (ODD_SHAPE[0], 3, *runner.fixed_size)
    odd = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return compare(reference.predict(odd), runner.predict(odd), tolerance)


def artifact_stem(arch: str, target: str, opts: Any) -> str:
    """File stem that tells artifacts of one model apart: u2netp_tflite_int8_nhwc, …_fp16_pal4."""
    stem = f"{arch}_{target}_{getattr(opts, 'precision', 'fp32')}"
    if getattr(opts, "dynamic", False):
        stem += "_dynamic"
    if getattr(opts, "nhwc", False):
        stem += "_nhwc"
    if getattr(opts, "palettize", None):
        stem += f"_pal{opts.palettize}"
    if getattr(opts, "int8_scheme", "u8s8-reduce-range") != "u8s8-reduce-range":
        stem += f"_{opts.int8_scheme}"
    if getattr(opts, "image_input", False):
        stem += "_image"
    return stem


def convert_model(model: str, target: str, out_dir: str | Path, *, weights: str | None = None,
                  weights_sha256: str | None = None, random_weights: bool = False,
                  parity_images: list[Path] | None = None, tolerance: Tolerance | None = None,
                  progress: bool = True, **options: Any) -> Artifact:
    """Convert ``model`` for ``target`` into ``out_dir`` and prove it; return the artifact.

    ``options`` are the target's typed options (e.g. ``precision="fp16", dynamic=True``); one
    the target does not have raises ``ConfigError`` rather than being ignored. A target that
    builds from ONNX (TensorRT) gets its ONNX as an artifact of its own first, proven in ONNX
    Runtime and published beside it; where the target cannot finish on this host, its handoff
    (e.g. a trtexec script) is written and the conversion fails with the reason.
    """
    spec = get_target(target)
    opts = spec.make_options(**options)
    (get_target("onnx") if spec.source == "onnx" else spec).ensure_available()
    out_dir = ensure_writable_dir(Path(out_dir))
    torch_model, weights_info, contract = load_model(model, weights, weights_sha256, random_weights,
                                                     deploy=True, progress=progress)
    source = ModelSource(torch_model, weights_info, contract, weights_info.arch, count_params(torch_model))
    images = parity_images or sample_images()
    parent = None
    if spec.source == "onnx":
        parent = _onnx_input(spec, opts, source, out_dir, images)
        reason = spec.unavailable_reason()
        if reason:
            raise BackendUnavailable(f"cannot build the {target} artifact here: {reason}; "
                                     f"{spec.handoff(parent, opts, out_dir)}")
    return _convert_and_prove(spec, opts, source, out_dir, images, tolerance, parent)


def _onnx_input(spec, opts: Any, source: ModelSource, out_dir: Path, images: list[Path]) -> Artifact:
    """The ONNX an onnx-source target builds from: the user's file (``opts.onnx``), proven
    against the model in ONNX Runtime, or a new ONNX artifact made for it."""
    onnx_spec = get_target("onnx")
    given = getattr(opts, "onnx", None)
    if not given:
        onnx_opts = onnx_spec.make_options(**spec.onnx_options(opts))
        return _convert_and_prove(onnx_spec, onnx_opts, source, out_dir, images, None)
    from u2zoo.converters.onnx import adopt_onnx

    artifact = adopt_onnx(Path(given), source)
    tolerance = DEFAULT_TOLERANCES.get(artifact.precision, Tolerance())
    with onnx_spec.runner(artifact) as runner:
        parity = measure_parity(runner, TorchPredictor(source.model), images, tolerance)
    artifact.manifest["parity"] = parity.to_dict() | {"status": "ok" if parity else "failed"}
    if not parity:
        raise ParityError(f"{given} does not reproduce {source.arch} with these weights in ONNX Runtime: "
                          f"{parity.summary()}")
    return artifact


def _convert_and_prove(spec, opts: Any, source: ModelSource, out_dir: Path, images: list[Path],
                       tolerance: Tolerance | None, parent: Artifact | None = None) -> Artifact:
    """Convert into a staging folder, measure parity in the real runtime, then publish."""
    precision = getattr(opts, "precision", "fp32")
    stem = artifact_stem(source.arch, spec.name, opts)
    if tolerance is None and getattr(opts, "palettize", None):
        tolerance = DEFAULT_TOLERANCES["int8-weights"]  # compressed weights: judged like int8 weights
    elif tolerance is None and getattr(opts, "image_input", False) and precision == "fp32":
        tolerance = DEFAULT_TOLERANCES["fp16"]  # the RGB input is rounded to 8 bits
    tolerance = tolerance or DEFAULT_TOLERANCES.get(precision, Tolerance())

    staging = Path(tempfile.mkdtemp(prefix=".u2zoo-staging-", dir=out_dir))
    try:
        if parent is None:
            artifact = spec.convert(source, opts, staging, stem)
        else:
            artifact = spec.convert(source, opts, staging, stem, parent)
        not_runnable = spec.runtime_unavailable_reason()
        if not_runnable:
            # Built and validated by the converter (see manifest "validation"), but its runtime
            # is not on this host: say so in the manifest instead of claiming parity.
            artifact.manifest["parity"] = {"status": "not_run", "reason": not_runnable}
            return _publish(artifact, staging, out_dir)
        reference = TorchPredictor(source.model)
        with spec.runner(artifact) as runner:
            parity = measure_parity(runner, reference, images, tolerance)
            record = parity.to_dict() | {"images": [p.name for p in images]}
            failures = [] if parity else [parity.summary()]
            if getattr(opts, "dynamic", False):
                # int8 ranges come from photos, so noise at an odd shape only proves the shape runs
                odd_tolerance = Tolerance() if precision.startswith("int8") else tolerance
                odd = measure_odd_shape_parity(runner, reference, odd_tolerance)
                record["odd_shape"] = odd.to_dict()
                failures += [] if odd else [odd.summary()]
        artifact.manifest["parity"] = record | {"status": "ok" if not failures else "failed"}
        if failures:
            raise ParityError(f"{spec.name} {precision} artifact rejected: {'; '.join(failures)}")
        return _publish(artifact, staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(artifact: Artifact, staging: Path, out_dir: Path) -> Artifact:
    """Move the artifact's files (a file or a folder such as an .mlpackage) out of staging."""
    for entry in artifact.manifest["files"]:
        target = out_dir / entry["name"]
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / entry["name"], target)
    artifact.path = out_dir / artifact.path.name
    artifact.save()
    return artifact
