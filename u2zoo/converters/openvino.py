"""OpenVINO target: IR (.xml + .bin) in fp32, fp16 (compressed weights) or INT8 (NNCF PTQ),
compiled and run on CPU by OpenVINO Runtime.

The IR is converted from the same simplified ONNX graph as the ONNX target, so layer-group
names (``/stage1/…``) are shared: the sensitivity ranking measured with ONNX Runtime maps
directly onto NNCF's ``ignored_scope``. INT8 can instead be driven by our parity metric with
``nncf.quantize_with_accuracy_control`` (``accuracy_control=True``).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, tool_versions
from u2zoo.converters.base import (
    ModelSource,
    Runner,
    TargetSpec,
    build_artifact,
    check_int8_options,
    check_qat_options,
    network_size_for,
    register,
)
from u2zoo.converters.onnx import INPUT_NAME, OUTPUT_NAME, OnnxOptions, export_onnx
from u2zoo.converters.options import CalibrationOptions, QatOptions, ShapeOptions, keep_fp_option, option
from u2zoo.errors import BackendUnavailable, ConfigError, ConversionError, U2ZooError, tool_failure

_DIM_NAMES = {0: "batch", 2: "height", 3: "width"}


@dataclass(frozen=True)
class OpenVinoOptions(ShapeOptions, CalibrationOptions, QatOptions):
    # precision: fp32 | fp16 (compressed weights) | int8 (NNCF); int8-qat fine-tunes over the
    # (mirrored) calibration images
    keep_fp: int = keep_fp_option()  # ranked with ONNX Runtime
    accuracy_control: bool = option(  # nncf.quantize_with_accuracy_control on our mean-abs parity
        False, help="int8: nncf.quantize_with_accuracy_control on the parity metric"
    )
    max_drop: float = option(  # the largest allowed drop of (1 - mean abs error)
        0.01, help="int8 accuracy control: allowed drop (default 0.01)"
    )
    # NNCF's fast bias correction, off unless asked: on U2NETP it doubled the INT8 output error
    # on the parity photos (stage2d in float: IoU@0.5 0.948 with it, 0.987 without) and tripled
    # the conversion time
    bias_correction: bool = option(
        False, help="int8: NNCF's fast bias correction (off by default: it worsened U2NETP's parity)"
    )

    def __post_init__(self) -> None:
        qat = self.precision == "int8-qat"
        check_int8_options(
            "int8" if qat else self.precision,
            self.calib,
            self.keep_fp,
            {
                "calib": self.calib,
                "calib_size": self.calib_size,
                "keep_fp": self.keep_fp,
                "keep_fp_groups": self.keep_fp_groups,
                "accuracy_control": self.accuracy_control,
                "bias_correction": self.bias_correction,
            },
        )
        if qat and (self.keep_fp or self.accuracy_control or self.bias_correction):
            raise ConfigError(
                "int8-qat keeps named groups only (--keep-fp-groups); --keep-fp N, accuracy "
                "control and bias correction are post-training options"
            )
        check_qat_options(qat, self.qat_epochs, self.qat_lr)


def _spec(port) -> TensorSpec:
    shape = tuple(
        _DIM_NAMES.get(i, "?") if d.is_dynamic else d.get_length() for i, d in enumerate(port.get_partial_shape())
    )
    return TensorSpec(port.get_any_name(), shape, port.get_element_type().to_dtype().name)


def _quantize(
    ov_model, onnx_path: Path, source: ModelSource, options: OpenVinoOptions, size: tuple[int, int]
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    import nncf

    from u2zoo.quantization.auto_fp import cached_ranking
    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.quantization.onnx_int8 import group_pattern, plan_float_groups

    calib = calibration_set(options.calib, source.contract, options.calib_size, size)
    kept, _, ranking = plan_float_groups(onnx_path, calib, INPUT_NAME, options.keep_fp, options.keep_fp_groups)
    # OpenVINO keeps the ONNX node names, so the same patterns select the same ops.
    ignored = nncf.IgnoredScope(patterns=[group_pattern(g) for g in kept], validate=False)
    dataset = calib.nncf_dataset()
    likely = _likely_next(kept, cached_ranking(source, calib) if not kept else None)
    also_for = tuple(
        nncf.IgnoredScope(patterns=[group_pattern(g) for g in groups], validate=False) for groups in likely
    )
    # NNCF draws rich progress bars on stdout (no switch to turn them off): they would break
    # `u2zoo -q` and bury the search's one line per step
    with contextlib.redirect_stdout(io.StringIO()):
        return _nncf_quantize(nncf, ov_model, onnx_path, calib, dataset, ignored, kept, ranking, options, also_for)


def _nncf_quantize(
    nncf,
    ov_model,
    onnx_path: Path,
    calib,
    dataset,
    ignored,
    kept: list[str],
    ranking,
    options: OpenVinoOptions,
    also_for: tuple = (),
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from u2zoo.quantization import nncf_reuse

    if options.accuracy_control:
        import openvino as ov

        reference = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        expected = [reference(x)[0] for x in calib.samples()]

        def validate(compiled, items) -> float:
            errors = [float(np.abs(compiled(x)[0] - ref).mean()) for x, ref in zip(items, expected)]
            return 1.0 - float(np.mean(errors))

        quantized = nncf.quantize_with_accuracy_control(
            ov_model,
            dataset,
            dataset,
            validate,
            max_drop=options.max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            ignored_scope=ignored,
            subset_size=len(calib.inputs),
            advanced_quantization_parameters=nncf_reuse.advanced_parameters(options.bias_correction),
        )
        statistics = None
    else:
        from u2zoo.files import file_digest

        quantized, statistics = nncf_reuse.quantize(
            ov_model,
            dataset,
            len(calib.inputs),
            ignored,
            (file_digest(onnx_path), calib.digest, len(calib.inputs)),
            options.bias_correction,
            also_for,
        )
    settings: dict[str, Any] = {
        "tool": "nncf",
        "preset": "performance (symmetric int8)",
        "bias_correction": "fast" if options.bias_correction else "off",
        "kept_in_float": kept,
        "accuracy_control": options.accuracy_control,
    }
    if ranking is not None:
        settings["sensitivity"] = [vars(r) for r in ranking]
    record = calib.describe() | ({"ranges": statistics} if statistics else {})
    return quantized, record, settings


def _likely_next(kept: list[str], ranking: list | None = None) -> list[list[str]]:
    """The float sets the fallback will probably try next, whose NNCF statistics can ride along
    in this call's calibration pass: after a group's element-wise joins (``stage2d/Add``, …)
    the whole group; before all-INT8 fails, the first steps of a ``ranking`` that an earlier
    run cached (its top group's joins, then the group)."""
    from u2zoo.quantization.auto_fp import FINE_OPS

    if not kept:
        if not ranking:
            return []
        top = ranking[0]
        return [list(top.fine_ops), [top.group]] if top.fine_ops else [[top.group]]
    whole = list(dict.fromkeys(g.rsplit("/", 1)[0] if g.rsplit("/", 1)[-1] in FINE_OPS else g for g in kept))
    return [] if whole == kept else [whole]


def _quantize_aware(
    source: ModelSource, options: OpenVinoOptions, size: tuple[int, int]
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """int8-qat: NNCF quantization of the torch module, fine-tuned against the float model."""
    import openvino as ov

    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.quantization.onnx_int8 import check_module_groups
    from u2zoo.quantization.qat import qat_openvino

    calib = calibration_set(options.calib, source.contract, options.calib_size, size)
    kept = check_module_groups(source.model, options.keep_fp_groups)
    ov_model, record = qat_openvino(source.model, calib, epochs=options.qat_epochs, lr=options.qat_lr, keep_groups=kept)
    if options.dynamic:
        ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, 3, -1, -1])})
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return ov_model, calib.describe(), record


def convert(source: ModelSource, options: OpenVinoOptions, out_dir: Path, stem: str) -> Artifact:
    """torch → ONNX (shared graph) → OpenVINO IR, optionally NNCF-quantized."""
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable("target 'openvino' needs openvino", extra="openvino") from None
    height, width = network_size_for(options, source)
    xml, bin_ = out_dir / f"{stem}.xml", out_dir / f"{stem}.bin"
    started = time.perf_counter()
    calibration = quantization = None
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            if options.precision == "int8-qat":  # QAT trains the torch module: no ONNX step
                ov_model, calibration, quantization = _quantize_aware(source, options, (height, width))
            else:
                onnx_path = Path(tmp) / "graph.onnx"
                export_onnx(
                    source.model,
                    onnx_path,
                    OnnxOptions(dynamic=options.dynamic, batch=options.batch, height=height, width=width),
                    height,
                    width,
                )
                ov_model = ov.convert_model(str(onnx_path))
                if options.precision == "int8":
                    ov_model, calibration, quantization = _quantize(
                        ov_model, onnx_path, source, options, (height, width)
                    )
            ov.save_model(ov_model, str(xml), compress_to_fp16=options.precision == "fp16")
        except U2ZooError:
            raise
        except Exception as exc:  # noqa: BLE001 - the converter's own failure
            raise ConversionError(f"OpenVINO conversion failed: {tool_failure(exc)}") from exc
    tools = tool_versions("torch", "onnx", "openvino", "nncf")
    return build_artifact(
        source,
        options,
        target="openvino",
        files=[xml, bin_],
        inputs=[_spec(p) for p in ov_model.inputs],
        outputs=[_spec(p) for p in ov_model.outputs],
        tools=tools,
        size=(height, width),
        started=started,
        calibration=calibration,
        quantization=quantization,
    )


class OpenVinoRunner(Runner):
    """OpenVINO Runtime on CPU, f32 inference precision (no silent bf16/fp16 downcast), latency hint."""

    def load(self) -> None:
        import openvino as ov

        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        self.compiled = ov.Core().compile_model(str(self.artifact.path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def loaded_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [_spec(p) for p in self.compiled.inputs], [_spec(p) for p in self.compiled.outputs]

    def close(self) -> None:
        self.request = self.compiled = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        result = self.request.infer(feeds)
        self.last_latency_s = time.perf_counter() - started
        return {port.get_any_name(): np.asarray(result[port]) for port in self.compiled.outputs}


register(
    TargetSpec(
        name="openvino",
        source="torch",
        precisions=("fp32", "fp16", "int8", "int8-qat"),
        dynamic_shapes=True,
        devices=("cpu",),
        host_os=None,
        extra="openvino",
        requires=("openvino", "nncf", "onnx", "onnxslim", "onnxruntime"),
        options_type=OpenVinoOptions,
        convert=convert,
        runner=OpenVinoRunner,
        description="OpenVINO IR run by OpenVINO Runtime on CPU (INT8 by NNCF)",
    )
)
