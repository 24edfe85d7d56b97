"""ONNX target: torch → ONNX (fp32/fp16, opset ≥ 17, optional dynamic batch/H/W) → onnxslim,
run by ONNX Runtime.

Exporter: the TorchScript exporter by default. On this project's CPU it exports U2NETP in
~3 s where the dynamo exporter takes ~35 s for the same graph (measured with torch 2.13);
``exporter="dynamo"`` selects the latter, and the manifest records which one ran.
fp16: weights and arithmetic in float16 with float32 I/O (``keep_io_types``), so every
runner feeds the same float32 tensors the contract produces.
int8: static QDQ quantization by ONNX Runtime from a calibration folder (see
:mod:`u2zoo.quantization.onnx_int8`), optionally keeping the most sensitive layer groups in
float; the manifest records the calibration digest and what stayed in float.
int8-qat: pt2e quantization-aware fine-tuning (see :mod:`u2zoo.quantization.qat`), exported by
the dynamo exporter as a symmetric QDQ graph (no onnxslim: it would fold weights' Q/DQ away).
"""

from __future__ import annotations

import time
import warnings
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
from u2zoo.converters.options import (
    CalibrationOptions,
    QatOptions,
    ShapeOptions,
    calib_method_option,
    keep_fp_option,
    option,
)
from u2zoo.errors import ArtifactError, BackendUnavailable, ConfigError, ConversionError, U2ZooError
from u2zoo.files import file_digest
from u2zoo.quiet import quiet_loggers
from u2zoo.safe_paths import confined

INPUT_NAME = "input"
OUTPUT_NAME = "mask"
_DYNAMIC_DIMS = {0: "batch", 2: "height", 3: "width"}
_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 3: "int8", 2: "uint8"}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class OnnxOptions(ShapeOptions, CalibrationOptions, QatOptions):
    opset: int = option(17, help="ONNX opset (≥ 17)")
    exporter: str = option("torchscript", help="ONNX exporter: torchscript (default, fast) or dynamo")
    simplify: bool = True  # run onnxslim
    calib_method: str = calib_method_option()
    keep_fp: int = keep_fp_option()  # runs the sensitivity analysis
    int8_scheme: str = option(  # see quantization.onnx_int8
        "u8s8-reduce-range",
        help="int8: u8s8-reduce-range (default, fast on AVX2), s8s8, or tensorrt "
        "(symmetric Q/DQ that TensorRT builds from)",
        suffix="_{}",
        plain="u8s8-reduce-range",
    )

    def __post_init__(self) -> None:
        qat = self.precision == "int8-qat"
        if qat and (self.keep_fp or self.calib_method != "minmax" or self.int8_scheme != "u8s8-reduce-range"):
            raise ConfigError(
                "int8-qat uses symmetric int8 with min/max ranges and keeps named groups only "
                "(--keep-fp-groups); --keep-fp N, --calib-method and --int8-scheme are for --int8"
            )
        check_qat_options(qat, self.qat_epochs, self.qat_lr)
        check_int8_options(
            "int8" if qat else self.precision,
            self.calib,
            self.keep_fp,
            {
                "calib": self.calib,
                "calib_size": self.calib_size,
                "keep_fp": self.keep_fp,
                "keep_fp_groups": self.keep_fp_groups,
                "calib_method": self.calib_method != "minmax",
                "int8_scheme": self.int8_scheme != "u8s8-reduce-range",
            },
        )
        if self.opset < 17:
            raise ConfigError(f"opset {self.opset} is too old: U²-Net export needs opset ≥ 17")
        if self.exporter not in ("torchscript", "dynamo"):
            raise ConfigError(f"unknown exporter {self.exporter!r} (choose from: torchscript, dynamo)")
        if (
            self.batch < 1
            or (self.height is not None and self.height < 1)
            or (self.width is not None and self.width < 1)
        ):
            raise ConfigError("batch, height and width must be positive")


# Loggers that print routine notes on stderr during a dynamo export (torchvision ops it skips,
# the opset down-conversion): they would bury u2zoo's own one-line output.
_EXPORTER_CHATTER = ("torch.onnx._internal.exporter._registration", "onnxscript.version_converter")


def _export(model, dummy, path: Path, options: OnnxOptions) -> None:
    import torch

    axes = {INPUT_NAME: _DYNAMIC_DIMS, OUTPUT_NAME: _DYNAMIC_DIMS} if options.dynamic else None
    with warnings.catch_warnings(), torch.no_grad(), quiet_loggers(*_EXPORTER_CHATTER):
        warnings.simplefilter("ignore")
        if options.exporter == "torchscript":
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=options.opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        else:
            dim = torch.export.Dim.DYNAMIC
            shapes = {"x": {0: dim, 2: dim, 3: dim}} if options.dynamic else None
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=True,
                opset_version=options.opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )


def _name_dynamic_dims(model) -> None:
    """Give the I/O's symbolic dims the same readable names whichever exporter ran."""
    for value in [*model.graph.input, *model.graph.output]:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and axis in _DYNAMIC_DIMS:
                dim.dim_param = _DYNAMIC_DIMS[axis]


def _to_fp16(model):
    from onnxconverter_common import float16

    # Stale float32 value_info from shape inference makes the converter emit mistyped Casts
    # around Resize; the converter re-infers types itself.
    del model.graph.value_info[:]
    return float16.convert_float_to_float16(model, keep_io_types=True)


def _io_specs(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def spec(value) -> TensorSpec:  # noqa: D401 - tiny helper
        tt = value.type.tensor_type
        shape = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim)
        return TensorSpec(value.name, shape, _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)))

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def _quantize(
    fp32: Path, final: Path, source: ModelSource, options: OnnxOptions, size: tuple[int, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """INT8 from the fp32 export; returns (calibration record, quantization record)."""
    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.quantization.onnx_int8 import plan_float_groups, quantize_int8, ranges_cache_path

    calib = calibration_set(options.calib, source.contract, options.calib_size, size)
    kept, nodes, ranking = plan_float_groups(
        fp32, calib, INPUT_NAME, options.keep_fp, options.keep_fp_groups, options.calib_method
    )
    settings = quantize_int8(
        fp32,
        final,
        calib,
        INPUT_NAME,
        method=options.calib_method,
        exclude_nodes=nodes,
        scheme=options.int8_scheme,
        cache=ranges_cache_path(fp32, calib, options.calib_method),
    )
    settings["kept_in_float"] = kept
    if ranking is not None:
        settings["sensitivity"] = [vars(r) for r in ranking]
    return calib.describe(), settings


def _quantize_aware(source: ModelSource, options: OnnxOptions, size: tuple[int, int]):
    """int8-qat: pt2e QAT of the torch module; returns (module with Q/DQ ops, calibration set,
    quantization record)."""
    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.quantization.onnx_int8 import check_module_groups
    from u2zoo.quantization.qat import qat_qdq

    kept = check_module_groups(source.model, options.keep_fp_groups)
    calib = calibration_set(options.calib, source.contract, options.calib_size, size)
    module, record = qat_qdq(source.model, calib, epochs=options.qat_epochs, lr=options.qat_lr, keep_groups=kept)
    return module, calib, record


def _export_qdq(module, sample: np.ndarray, path: Path, options: OnnxOptions):
    """The converted pt2e module → a QDQ ONNX (dynamo exporter; quantized_decomposed ops map to
    QuantizeLinear/DequantizeLinear). ``sample``: one preprocessed image (1, 3, H, W)."""
    import onnx
    import torch

    if options.dynamic:  # batch 2: an example batch of 1 would be specialized to a static 1
        dim = torch.export.Dim.DYNAMIC
        example, shapes = np.repeat(sample, 2, axis=0), {"x": {0: dim, 2: dim, 3: dim}}
    else:
        example, shapes = np.repeat(sample, options.batch, axis=0), None
    try:
        with warnings.catch_warnings(), quiet_loggers(*_EXPORTER_CHATTER):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.from_numpy(example),),
                str(path),
                dynamo=True,
                opset_version=options.opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(str(path))
        _name_dynamic_dims(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        return proto
    except Exception as exc:  # noqa: BLE001 - the exporter's own failure, as one line
        path.unlink(missing_ok=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConversionError(f"ONNX export of the QAT model failed: {type(exc).__name__}: {first}") from exc


def export_onnx(model, path: Path, options: OnnxOptions, height: int, width: int, fp16: bool = False):
    """torch module → simplified, checked ONNX at ``path`` (fp32, or fp16 with fp32 I/O).

    Shared by every target that starts from ONNX (OpenVINO, INT8), so they all see one graph.
    """
    import onnx
    import torch

    raw = path.with_name(f".{path.name}.raw")
    try:
        _export(model, torch.zeros(options.batch, 3, height, width), raw, options)
        proto = onnx.load(str(raw))
        if options.simplify:
            import onnxslim

            proto = onnxslim.slim(proto)
        if fp16:
            proto = _to_fp16(proto)
        _name_dynamic_dims(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        return proto
    except U2ZooError:
        raise
    except Exception as exc:  # the exporter's or simplifier's own failure
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConversionError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
    finally:
        raw.unlink(missing_ok=True)


def convert(source: ModelSource, options: OnnxOptions, out_dir: Path, stem: str) -> Artifact:
    """Export, simplify, then cast (fp16) or quantize (int8); returns the artifact (no parity yet)."""
    try:
        import onnx
    except ImportError as exc:
        raise BackendUnavailable(f"target 'onnx' needs {exc.name}", extra="onnx") from None

    height, width = network_size_for(options, source)
    final = out_dir / f"{stem}.onnx"
    started = time.perf_counter()
    calibration = quantization = parent = None
    if options.precision == "int8":
        fp32 = out_dir / f".{stem}.fp32.onnx"
        try:
            export_onnx(source.model, fp32, options, height, width)
            parent = {
                "target": "onnx",
                "precision": "fp32",
                "sha256": file_digest(fp32),
                "note": "intermediate fp32 export, quantized into this artifact",
            }
            calibration, quantization = _quantize(fp32, final, source, options, (height, width))
        finally:
            fp32.unlink(missing_ok=True)
        model = onnx.load(str(final))
    elif options.precision == "int8-qat":
        module, calib, quantization = _quantize_aware(source, options, (height, width))
        calibration = calib.describe()
        model = _export_qdq(module, calib.inputs[:1], final, options)
    else:
        model = export_onnx(source.model, final, options, height, width, fp16=options.precision == "fp16")
    inputs, outputs = _io_specs(model)
    tools = tool_versions("torch", "onnx", "onnxruntime", "onnxslim", "onnxconverter-common")
    tools.update(opset=options.opset, exporter=options.exporter)
    return build_artifact(
        source,
        options,
        target="onnx",
        files=[final],
        inputs=inputs,
        outputs=outputs,
        tools=tools,
        size=(height, width),
        started=started,
        parent=parent,
        calibration=calibration,
        quantization=quantization,
    )


def onnx_precision(model) -> str:
    """What the graph computes in: int8 (it has Q/DQ nodes), fp16 (float16 weights) or fp32."""
    if any(node.op_type in QDQ_OPS for node in model.graph.node):
        return "int8"
    return "fp16" if any(init.data_type == 10 for init in model.graph.initializer) else "fp32"


def read_onnx(path: Path):
    """A user-given ONNX file, or a one-line error when it is missing or not a readable model."""
    import onnx

    if not path.is_file():
        raise ConfigError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt file, as one line
        raise ConfigError(f"{path} is not a readable ONNX model: {type(exc).__name__}") from None


def adopt_onnx(path: Path, source: ModelSource) -> Artifact:
    """An ONNX file given by the user as a chain's input: its own u2zoo artifact when a manifest
    lies beside it (sha256 checked), else a manifest made in memory that says where it came
    from (never written beside the user's file)."""
    from u2zoo.artifact import manifest_path_for, new_manifest, open_artifact

    if manifest_path_for(path).is_file():
        return open_artifact(path)
    model = read_onnx(path)
    inputs, outputs = _io_specs(model)
    weights = source.weights.to_dict() | {
        "note": f"user-supplied ONNX {path.name}; parity is measured against these weights"
    }
    manifest = new_manifest(
        target="onnx",
        precision=onnx_precision(model),
        files=[path],
        parent=None,
        weights=weights,
        contract=source.contract,
        inputs=inputs,
        outputs=outputs,
        options={"origin": "user-supplied"},
        tools=tool_versions("onnx", "onnxruntime"),
        arch=source.arch,
        num_params=source.num_params,
    )
    return Artifact(path, manifest)


def check_external_data(artifact: Artifact) -> None:
    """Refuse an ONNX whose tensors live in files its manifest does not list: ``verify`` hashes
    only listed files, so unlisted external data could be swapped for other weights unnoticed."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    root = artifact.path.parent
    listed = {confined(root, entry["name"]) for entry in artifact.manifest["files"]}
    model = onnx.load(str(artifact.path), load_external_data=False)
    for location in sorted({ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}):
        if confined(root, location) not in listed:
            raise ArtifactError(
                f"{artifact.path.name} loads external data {location!r} that its manifest does "
                "not list, so it cannot be verified: list it in the manifest's files with its sha256"
            )


def _ort_spec(arg) -> TensorSpec:
    """An ONNX Runtime NodeArg as a TensorSpec ('tensor(float)' → 'float32')."""
    dtype = arg.type.removeprefix("tensor(").removesuffix(")")
    dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
    return TensorSpec(arg.name, tuple(arg.shape) if arg.shape is not None else None, dtype)


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on CPU (or the providers given), threads fixed when asked."""

    def __init__(
        self, artifact: Artifact, threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)
    ):
        super().__init__(artifact, threads)
        self.providers = providers
        self.session = None
        self.spinning = True  # ONNX Runtime's default: idle intra-op threads busy-wait for work

    def share_cores(self) -> None:
        """Other threads will run beside inference (a service decoding and encoding images):
        idle intra-op threads sleep instead of busy-waiting, leaving those threads the CPU
        (U2NETP, 2 cores: 7.00 against 6.77 requests/s served at batch 1)."""
        if self.spinning:
            self.spinning = False
            if self.session is not None:
                self.load()

    def load(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        check_external_data(self.artifact)
        self.session = ort.InferenceSession(str(self.artifact.path), opts, providers=list(self.providers))

    def loaded_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [_ort_spec(a) for a in self.session.get_inputs()], [_ort_spec(a) for a in self.session.get_outputs()]

    def close(self) -> None:
        self.session = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        started = time.perf_counter()
        values = self.session.run(names, feeds)
        self.last_latency_s = time.perf_counter() - started
        return dict(zip(names, values))


register(
    TargetSpec(
        name="onnx",
        source="torch",
        precisions=("fp32", "fp16", "int8", "int8-qat"),
        dynamic_shapes=True,
        devices=("cpu",),
        host_os=None,
        extra="onnx",
        requires=("onnx", "onnxruntime", "onnxslim", "onnxconverter_common"),
        options_type=OnnxOptions,
        convert=convert,
        runner=OnnxRuntimeRunner,
        description="ONNX (opset ≥ 17) run by ONNX Runtime",
    )
)
