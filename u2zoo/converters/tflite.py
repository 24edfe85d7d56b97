"""TFLite (LiteRT) target: torch → .tflite with litert-torch (no TensorFlow), quantized by
ai-edge-quantizer, run by ai-edge-litert's Interpreter (XNNPACK on CPU).

Precisions:
- ``fp32``: the converted graph as is.
- ``fp16``: weights stored as float16 (half the size). On CPU they are expanded to fp32 at
  load time, so the arithmetic stays fp32; GPU delegates run it in fp16.
- ``dynamic-int8``: dynamic-range quantization, int8 weights with activations quantized on
  the fly by the kernels; no calibration.
- ``int8``: full integer (static w8a8) from the shared calibration source. The model's input
  and output are int8 too, which is what NPUs and edge boards want; their scale and zero
  point are in the manifest (``inputs[0].quantization``) and the runner applies them.

Sensitive layer groups can stay float (``keep_fp_groups``, or ``keep_fp=N`` ranked by the
ONNX Runtime sensitivity analysis): TFLite tensor names carry the torch module path, so a
group such as ``stage2d`` becomes a regex over op names for ai-edge-quantizer.

TFLite builds fixed-shape models: one per input size. ``nhwc=True`` wraps the module with
``litert_torch.to_channel_last_io`` and records ``layout: NHWC`` in the manifest's contract.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import os
import re
import shutil
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
    network_size_for,
    register,
)
from u2zoo.converters.options import CalibrationOptions, ShapeOptions, keep_fp_option, option
from u2zoo.errors import BackendUnavailable, ConfigError, ConversionError, U2ZooError, tool_failure
from u2zoo.files import file_digest, process_scratch_dir
from u2zoo.quantization.onnx_int8 import TOP_LEVEL, check_module_groups

QUANTIZED = ("int8", "dynamic-int8")


@dataclass(frozen=True)
class TFLiteOptions(ShapeOptions, CalibrationOptions):
    # precision: fp32 | fp16 (fp16 weights) | dynamic-int8 | int8 (full integer, int8 I/O);
    # dynamic is refused: TFLite models here have fixed shapes
    keep_fp: int = keep_fp_option()  # ranked with ONNX Runtime
    nhwc: bool = option(False, help="channels-last input and output (NHWC)", suffix="_nhwc")

    def __post_init__(self) -> None:
        if self.dynamic:
            raise ConfigError(
                "tflite builds fixed-shape models: --dynamic is not supported "
                "(build one model per input size with --height/--width)"
            )
        check_int8_options(
            self.precision,
            self.calib,
            self.keep_fp,
            {"calib": self.calib, "calib_size": self.calib_size, "keep_fp": self.keep_fp},
        )
        if self.keep_fp_groups and self.precision not in QUANTIZED:
            raise ConfigError(f"keep_fp_groups only apply to --int8 and --dynamic-int8 (this is {self.precision})")
        if self.batch < 1:
            raise ConfigError("--batch must be ≥ 1")


def group_regex(group: str) -> str:
    """Regex (``re.search``) for the op output names of a layer group.

    litert-torch names tensors after the module path, one ``Class_attr`` component per level:
    ``…U2NETP/…RSU6_stage2d/…REBNCONV_rebnconv1d/…Conv2d_conv_s1;``. Ops of the top-level
    forward (upsampling, concatenation, sigmoid) have no ``/`` before their ``;`` suffix.
    """
    if group == TOP_LEVEL:
        return r"^[^/;]+(;|$)"
    path = "/".join(rf"[\w.]*_{re.escape(part)}" for part in group.split("/"))
    return rf"(^|/){path}(/|;|$)"


# One fp32 export per (weights, shape, layout) per process: the litert-torch conversion is the
# slow step (about a minute for U²-Net's ~500 ops), and every precision starts from it.
_EXPORTS: dict[str, Path] = {}


def _model_key(model, *parts: Any) -> str:
    digest = hashlib.sha256(repr(parts).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def export_fp32(model, batch: int, size: tuple[int, int], nhwc: bool) -> Path:
    """torch module → fp32 .tflite (cached for this process); conversion errors are one line."""
    import torch

    key = _model_key(model, batch, size, nhwc)
    cached = _EXPORTS.get(key)
    if cached is not None and cached.is_file():
        return cached
    import litert_torch

    module, example = model.eval(), torch.zeros(batch, 3, *size)
    if nhwc:
        module = litert_torch.to_channel_last_io(module, args=[0], outputs=[0])
        example = example.permute(0, 2, 3, 1).contiguous()
    path = process_scratch_dir("u2zoo-tflite-") / f"{key}.tflite"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        litert_torch.convert(module, (example,)).export(str(tmp))
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - the converter's own failure, as one line
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"litert-torch conversion failed: {tool_failure(exc)}") from exc
    _EXPORTS[key] = path
    return path


def _signature(path: Path) -> tuple[str, str]:
    """(signature key, input name) of a converted model, e.g. ('serving_default', 'args_0')."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    key = next(iter(signatures))
    return key, signatures[key]["inputs"][0]


def _float_groups(source: ModelSource, options: TFLiteOptions, calib, size: tuple[int, int]):
    """Groups to keep in float: the named ones, plus the top ``keep_fp`` of the ONNX Runtime
    sensitivity ranking (the same network and group names, measured once on ONNX)."""
    if not options.keep_fp:
        return list(options.keep_fp_groups), None
    try:
        from u2zoo.converters.onnx import INPUT_NAME, OnnxOptions, export_onnx
        from u2zoo.quantization.onnx_int8 import plan_float_groups
    except ImportError:
        raise BackendUnavailable("--keep-fp N ranks layer groups with ONNX Runtime", extra="onnx") from None
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "graph.onnx"
        export_onnx(source.model, onnx_path, OnnxOptions(batch=1, height=size[0], width=size[1]), *size)
        kept, _, ranking = plan_float_groups(onnx_path, calib, INPUT_NAME, options.keep_fp, options.keep_fp_groups)
    return kept, ranking


@contextlib.contextmanager
def _quiet_progress_bars():
    """ai-edge-quantizer draws tqdm bars on stderr with no switch to turn them off, which breaks
    `u2zoo -q` and the one-line error contract; they last seconds, so swallow them."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def quantize_tflite(
    fp32: Path, out: Path, source: ModelSource, options: TFLiteOptions, size: tuple[int, int], calib=None
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """fp16 / dynamic-int8 / int8 (with ``calib``, a CalibrationSet) from the fp32 .tflite;
    returns the (calibration, quantization) records for the manifest."""
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    q = quantizer.Quantizer(str(fp32))
    calibration = ranking = None
    kept: list[str] = []
    if options.precision == "fp16":
        q.add_weight_only_config(".*", TFLOperationName.ALL_SUPPORTED, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        settings: dict[str, Any] = {"tool": "ai-edge-quantizer", "scheme": "fp16 weights (float casting)"}
    else:
        kept, ranking = _float_groups(source, options, calib, size)
        if options.precision == "int8":
            q.load_quantization_recipe(recipe.static_wi8_ai8())
            scheme = "static w8a8: int8 per-channel weights, int8 activations and I/O (min/max calibration)"
        else:
            q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
            scheme = "dynamic range: int8 per-channel weights, activations quantized at run time"
        for group in kept:
            q.update_quantization_recipe(
                regex=group_regex(group),
                operation_name=TFLOperationName.ALL_SUPPORTED,
                algorithm_key=AlgorithmName.NO_QUANTIZE,
            )
        settings = {"tool": "ai-edge-quantizer", "scheme": scheme, "kept_in_float": kept}
        if ranking is not None:
            settings["sensitivity"] = [vars(r) for r in ranking]
    result = None
    if q.need_calibration:
        result, reused = _calibration_result(fp32, calib, options.nhwc)
        calibration = calib.describe() | {
            "ranges": "reused from this process's earlier calibration" if reused else "measured"
        }
    with _quiet_progress_bars():
        q.quantize(result, enable_progress_report=False).export_model(out, overwrite=True)
    if options.precision == "int8":
        _refuse_empty_ranges(out)
    return calibration, settings


# Calibration ranges per (fp32 model, calibration set, layout), for this process: the float
# fallback re-quantizes the same model with other groups in float, and the ranges of a
# tensor do not depend on which ops are quantized (calibration runs the float model).
_CALIBRATIONS: dict[Any, Any] = {}


def _calibration_result(fp32: Path, calib, nhwc: bool) -> tuple[dict[str, Any], bool]:
    """ai-edge-quantizer's min/max ranges of every tensor of ``fp32`` on ``calib``.

    Measured once and reused afterwards; returns the ranges and whether they were reused. The
    quantizer's profiler-based mode tracks min/max inside the interpreter's C++ kernels: the
    same moving-average min/max as its default mode (which copies every tensor out to numpy
    and reduces it once per op that touches it), 2.5× faster on U2NETP here. Its ranges are
    float64 of shape (1,); they are stored as the default mode's float32 arrays.
    """
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.calibrator import CalibrationMode

    key = (file_digest(fp32), calib.digest, nhwc)
    reused = key in _CALIBRATIONS
    if not reused:
        q = quantizer.Quantizer(str(fp32))
        q.load_quantization_recipe(recipe.static_wi8_ai8())
        signature, input_name = _signature(fp32)
        data = calib.litert_data(signature, input_name, channels_last=nhwc)
        with _quiet_progress_bars():
            ranges = q.calibrate(data, num_threads=os.cpu_count() or 1, mode=CalibrationMode.CALIBRATION_PROFILER_BASED)
        _CALIBRATIONS[key] = {
            name: {k: np.asarray(v, dtype=np.float32) if k in ("min", "max") else v for k, v in qsv.items()}
            for name, qsv in ranges.items()
        }
    return copy.deepcopy(_CALIBRATIONS[key]), reused  # the quantizer may write into it


def _group_of(tensor_name: str) -> str:
    """'…U2NETP/…RSU7_stage1d/…' → 'stage1d' (the module attribute under the model)."""
    parts = tensor_name.split(";")[0].split("/")
    return parts[1].rsplit("_", 1)[-1] if len(parts) > 1 else TOP_LEVEL


def _refuse_empty_ranges(path: Path) -> None:
    """A layer whose activations never leave zero on the calibration set (a dead ReLU) gets a
    ~1e-12 scale; XNNPACK then refuses the whole model at load time with an opaque message.
    Name the layer groups instead, so the user can keep them in float."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    dead = sorted(
        {
            _group_of(t["name"])
            for t in interpreter.get_tensor_details()
            if t["dtype"] == np.int8 and len(scales := t["quantization_parameters"]["scales"]) == 1 and scales[0] < 1e-9
        }
    )
    if dead:
        raise ConversionError(
            f"INT8 activations of layer group(s) {', '.join(dead)} are constant on the calibration "
            f"images (dead layers), which XNNPACK cannot requantize; keep them in float with "
            f"--keep-fp-groups {','.join(dead)} or calibrate on more varied images"
        )


def _io_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))

    def spec(detail: dict) -> TensorSpec:
        dtype = np.dtype(detail["dtype"]).name
        scale, zero_point = detail["quantization"]
        quant = (float(scale), int(zero_point)) if dtype in ("int8", "uint8", "int16") else None
        return TensorSpec(detail["name"], tuple(int(d) for d in detail["shape"]), dtype, quant)

    return ([spec(d) for d in interpreter.get_input_details()], [spec(d) for d in interpreter.get_output_details()])


def convert(source: ModelSource, options: TFLiteOptions, out_dir: Path, stem: str) -> Artifact:
    """torch → fp32 .tflite (litert-torch) → optionally fp16/int8 (ai-edge-quantizer)."""
    try:
        import ai_edge_litert  # noqa: F401
        import ai_edge_quantizer  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError:
        raise BackendUnavailable(
            "target 'tflite' needs litert-torch, ai-edge-quantizer and ai-edge-litert", extra="tflite"
        ) from None
    size = network_size_for(options, source)
    started = time.perf_counter()
    # bad groups or calibration images fail before the slow conversion
    check_module_groups(source.model, options.keep_fp_groups)
    calib = None
    if options.precision == "int8":
        from u2zoo.quantization.calibration import calibration_set

        calib = calibration_set(options.calib, source.contract, options.calib_size, size)
    fp32 = export_fp32(source.model, options.batch, size, options.nhwc)
    path = out_dir / f"{stem}.tflite"
    calibration = parent = None
    quantization: dict[str, Any] | None = None
    if options.precision == "fp32":
        shutil.copyfile(fp32, path)
    else:
        parent = {"target": "tflite", "precision": "fp32", "sha256": file_digest(fp32)}
        try:
            calibration, quantization = quantize_tflite(fp32, path, source, options, size, calib)
        except U2ZooError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"ai-edge-quantizer failed: {tool_failure(exc)}") from exc
    if options.nhwc:
        contract = source.contract
        source = dataclasses.replace(
            source, contract=dataclasses.replace(contract, pre=dataclasses.replace(contract.pre, layout="NHWC"))
        )
    inputs, outputs = _io_specs(path)
    tools = tool_versions("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert")
    return build_artifact(
        source,
        options,
        target="tflite",
        files=[path],
        inputs=inputs,
        outputs=outputs,
        tools=tools,
        size=size,
        started=started,
        parent=parent,
        calibration=calibration,
        quantization=quantization,
    )


class TFLiteRunner(Runner):
    """ai-edge-litert Interpreter (XNNPACK delegate on CPU) with a thread count.

    ``infer`` takes and returns float32: integer I/O of a full-INT8 model is quantized and
    dequantized here with the tensor's own scale and zero point.
    """

    def load(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(self.artifact.path), num_threads=self.threads or os.cpu_count())
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]

    def close(self) -> None:
        self.interpreter = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds[self.input_name]
        expected = tuple(self._input["shape"])
        if x.shape != expected:
            raise ConfigError(f"this tflite model takes input {expected}, got {x.shape} (fixed shape)")
        self.interpreter.set_tensor(self._input["index"], _to_tensor(x, self._input))
        started = time.perf_counter()
        self.interpreter.invoke()
        self.last_latency_s = time.perf_counter() - started
        return {self.output_name: _from_tensor(self.interpreter.get_tensor(self._output["index"]), self._output)}


def _to_tensor(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def _from_tensor(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32, copy=True)
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


register(
    TargetSpec(
        name="tflite",
        source="torch",
        precisions=("fp32", "fp16", "dynamic-int8", "int8"),
        dynamic_shapes=False,
        devices=("cpu",),
        host_os=None,
        extra="tflite",
        requires=("litert_torch", "ai_edge_quantizer", "ai_edge_litert"),
        options_type=TFLiteOptions,
        convert=convert,
        runner=TFLiteRunner,
        description="TFLite/LiteRT via litert-torch, quantized by ai-edge-quantizer, run by ai-edge-litert (XNNPACK)",
    )
)
