"""TensorRT target: a serialized engine built from a TensorRT-ready ONNX, run on an NVIDIA GPU.

TensorRT 10.1 deprecated the INT8 calibrators and TensorRT 11 removed them together with the
FP16/INT8 builder flags: networks are *strongly typed*, so precision comes from the ONNX
itself. This target therefore starts from an ONNX artifact (the chain torch → onnx →
tensorrt, worked out by :mod:`u2zoo.conversion`):

- fp32: the plain ONNX; fp16: the float16 ONNX (float32 I/O);
- int8: explicit Q/DQ from ONNX Runtime's static quantizer in the ``tensorrt`` scheme
  (symmetric int8 activations, symmetric per-channel int8 weights, a dedicated Q/DQ pair per
  consumer: the placement TensorRT fuses into int8 convolutions), calibrated on our shared
  calibration set; ``--onnx FILE`` instead builds from a Q/DQ ONNX made elsewhere (e.g. ModelOpt).

The ONNX is exported with a dynamic batch and built with one optimization profile (batch
min/opt/max, default 1/8/16; height and width fixed). Builds reuse a timing cache file. An
engine runs only on the GPU generation and TensorRT version that built it, so the manifest
records both (and the equivalent ``trtexec`` command) and the runner refuses a mismatch.

Where TensorRT or a GPU is missing, :func:`handoff` leaves the proven ONNX artifact and a
``trtexec`` script so the user can finish on the device; the conversion still fails.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, atomic_write_bytes, atomic_write_text, host_info, tool_versions
from u2zoo.converters.base import (
    ModelSource,
    Runner,
    TargetSpec,
    build_artifact,
    check_int8_options,
    check_qat_options,
    register,
)
from u2zoo.converters.onnx import QDQ_OPS, onnx_precision, read_onnx
from u2zoo.converters.options import (
    CalibrationOptions,
    QatOptions,
    SizeOptions,
    calib_method_option,
    keep_fp_option,
    max_batch_option,
    option,
)
from u2zoo.errors import ConfigError, ConversionError, RuntimeLoadError
from u2zoo.gpu import cuda_device_info, timed

PRECISIONS = ("fp32", "fp16", "int8", "int8-qat")


@dataclass(frozen=True)
class TensorRTOptions(SizeOptions, CalibrationOptions, QatOptions):
    """precision: fp32 | fp16 | int8: the ONNX's own types decide (strongly typed); height and
    width are fixed in the profile. The calibration fields apply when u2zoo quantizes (no
    --onnx); int8-qat: u2zoo's pt2e QAT makes the symmetric QDQ ONNX (see quantization.qat)."""

    min_batch: int = option(1, help="smallest batch of the optimization profile (default 1)")
    opt_batch: int = option(8, help="batch the engine is tuned for (default 8)")
    max_batch: int = max_batch_option()
    workspace_mb: int | None = option(help="builder workspace limit in MB")  # None: TensorRT's default
    timing_cache: str | None = option(
        help="timing cache file reused across builds (default: <U2ZOO_HOME>/tensorrt/timing.cache)"
    )
    onnx: str | None = option(  # must match the precision
        help="build from this ONNX (fp32, fp16, or Q/DQ int8 made elsewhere)"
    )
    calib_method: str = calib_method_option()
    keep_fp: int = keep_fp_option()

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_fp_groups", tuple(self.keep_fp_groups))
        qat = self.precision == "int8-qat"
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"the batch profile needs 1 ≤ min ≤ opt ≤ max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise ConfigError("--workspace-mb must be ≥ 1")
        quantizer_options = {
            "calib": self.calib,
            "calib_size": self.calib_size,
            "keep_fp": self.keep_fp,
            "keep_fp_groups": self.keep_fp_groups,
            "calib_method": self.calib_method != "minmax",
        }
        if self.onnx is None:
            if qat and (self.keep_fp or self.calib_method != "minmax"):
                raise ConfigError("int8-qat keeps named groups only (--keep-fp-groups) and uses min/max ranges")
            check_qat_options(qat, self.qat_epochs, self.qat_lr)
            check_int8_options("int8" if qat else self.precision, self.calib, self.keep_fp, quantizer_options)
            return
        if qat:
            raise ConfigError(
                f"int8-qat runs u2zoo's QAT; a QDQ ONNX made elsewhere is built with --int8 --onnx {self.onnx}"
            )
        used = [name for name, value in quantizer_options.items() if value]
        if used:
            raise ConfigError(f"{', '.join(used)} apply when u2zoo quantizes; --onnx {self.onnx} is built as it is")
        check_onnx_for_tensorrt(Path(self.onnx), self.precision, self.min_batch, self.max_batch)


def check_onnx_for_tensorrt(path: Path, precision: str, min_batch: int = 1, max_batch: int = 1) -> None:
    """Refuse an ONNX whose own types do not give ``precision`` (TensorRT would silently build
    what the file says), or whose Q/DQ TensorRT cannot use (asymmetric or uint8)."""
    from onnx import numpy_helper

    model = read_onnx(path)
    found = onnx_precision(model)
    precision = "int8" if precision == "int8-qat" else precision  # both are Q/DQ graphs
    if precision == "int8" and found != "int8":
        raise ConfigError(
            f"--int8 needs an ONNX with Q/DQ nodes; {path.name} has none (it is {found}). Quantize "
            f"first: u2zoo convert --target onnx --int8 --int8-scheme tensorrt --dynamic --calib DIR, "
            f"or drop --onnx and u2zoo quantizes for you"
        )
    if precision != "int8" and found != precision:
        raise ConfigError(
            f"{path.name} is a {found} ONNX and a strongly typed TensorRT build keeps the file's "
            f"types, so it cannot give {precision}: ask for {found} or pass another ONNX"
        )
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value") and (batch.dim_value != min_batch or batch.dim_value != max_batch):
        raise ConfigError(
            f"{path.name} has a fixed batch of {batch.dim_value}, outside the profile "
            f"{min_batch}..{max_batch}: export it with a dynamic batch, or set --min-batch, "
            f"--opt-batch and --max-batch to {batch.dim_value}"
        )
    if found == "int8":
        initializers = {init.name: init for init in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type in QDQ_OPS and len(node.input) > 2 and node.input[2] in initializers:
                zero_point = numpy_helper.to_array(initializers[node.input[2]])
                if zero_point.dtype != np.int8 or np.any(zero_point != 0):
                    raise ConfigError(
                        f"{path.name} has {zero_point.dtype} Q/DQ with non-zero zero points "
                        f"(node {node.name}); TensorRT needs symmetric int8: quantize with "
                        f"--int8-scheme tensorrt"
                    )


def onnx_options(options: TensorRTOptions) -> dict[str, Any]:
    """The ONNX artifact a build starts from: dynamic batch, the same precision and calibration."""
    chosen: dict[str, Any] = {
        "precision": options.precision,
        "dynamic": True,
        "height": options.height,
        "width": options.width,
    }
    if options.precision == "int8":
        chosen |= {
            "calib": options.calib,
            "calib_size": options.calib_size,
            "calib_method": options.calib_method,
            "keep_fp": options.keep_fp,
            "keep_fp_groups": options.keep_fp_groups,
            "int8_scheme": "tensorrt",
        }
    elif options.precision == "int8-qat":  # pt2e QAT already writes symmetric int8 Q/DQ
        chosen |= {
            "calib": options.calib,
            "calib_size": options.calib_size,
            "keep_fp_groups": options.keep_fp_groups,
            "qat_epochs": options.qat_epochs,
            "qat_lr": options.qat_lr,
        }
    return chosen


def timing_cache_path(options: TensorRTOptions) -> Path:
    """--timing-cache, else one shared file under <U2ZOO_HOME>/tensorrt."""
    from u2zoo.zoo.weights import cache_dir

    return Path(options.timing_cache) if options.timing_cache else cache_dir() / "tensorrt" / "timing.cache"


def _profile_shapes(options: TensorRTOptions, size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    height, width = size
    return {
        name: (batch, 3, height, width)
        for name, batch in (("min", options.min_batch), ("opt", options.opt_batch), ("max", options.max_batch))
    }


def trtexec_command(
    onnx_path: Path,
    engine_path: Path,
    input_name: str,
    options: TensorRTOptions,
    size: tuple[int, int],
    timing_cache: Path | None = None,
) -> str:
    """The ``trtexec`` line that builds the same engine (TensorRT ≥ 10, strongly typed)."""
    shapes = _profile_shapes(options, size)
    dims = {k: "x".join(map(str, v)) for k, v in shapes.items()}
    args = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        "--stronglyTyped",
        f"--minShapes={input_name}:{dims['min']}",
        f"--optShapes={input_name}:{dims['opt']}",
        f"--maxShapes={input_name}:{dims['max']}",
        f"--timingCacheFile={timing_cache or timing_cache_path(options)}",
    ]
    if options.workspace_mb:
        args.append(f"--memPoolSize=workspace:{options.workspace_mb}M")
    return shlex.join(args)


def handoff(parent: Artifact, options: TensorRTOptions, out_dir: Path) -> str:
    """Leave the proven ONNX and a ``trtexec`` script to finish the build on a TensorRT machine;
    returns the sentence that says where they are."""
    size = _size_of(parent)
    engine = out_dir / f"{parent.path.stem.replace('_onnx_', '_tensorrt_')}.engine"
    script = out_dir / f"{engine.stem}.trtexec.sh"
    # paths relative to the script's folder, which the user copies to the device
    command = trtexec_command(
        Path(parent.path.name),
        Path(engine.name),
        parent.inputs[0].name,
        options,
        size,
        Path(options.timing_cache or "timing.cache"),
    )
    atomic_write_text(
        script,
        "#!/bin/sh\n# Build the TensorRT engine on the GPU that will run it "
        "(an engine is tied to one GPU generation and TensorRT version).\n"
        f'cd "$(dirname "$0")" && {command}\n',
    )
    script.chmod(0o755)
    return f"wrote the TensorRT-ready ONNX {parent.path} and {script} to build the engine on the device"


def _size_of(artifact: Artifact) -> tuple[int, int]:
    """The fixed (height, width) of the profile: the ONNX's own when static, else the size it
    was exported at, else the contract's."""
    shape = artifact.inputs[0].shape
    if isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] > 0 and shape[3] > 0:
        return shape[2], shape[3]
    options = artifact.manifest.get("options", {})
    if options.get("height") and options.get("width"):
        return int(options["height"]), int(options["width"])
    return tuple(artifact.contract.pre.size)  # type: ignore[return-value]


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, input_name: str, options: TensorRTOptions, size: tuple[int, int]) -> bytes:
    """Parse the ONNX into a strongly typed network and build a serialized engine."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:  # always strongly typed from TensorRT 11 on
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConversionError(f"TensorRT could not parse {onnx_path.name}: {' '.join(errors.split())[:300]}")
    config = builder.create_builder_config()
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    shapes = _profile_shapes(options, size)
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_path = timing_cache_path(options)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConversionError("TensorRT failed to build the engine (see the TensorRT log above)")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def engine_host() -> dict[str, Any]:
    """What an engine is tied to: the GPU (name, compute capability, driver) and TensorRT."""
    import tensorrt as trt

    return cuda_device_info() | {"driver": host_info().get("driver"), "tensorrt": trt.__version__}


def engine_mismatch(built: dict[str, Any], here: dict[str, Any]) -> str | None:
    """Why an engine built on ``built`` cannot run on ``here``, or None. TensorRT engines are
    specific to the compute capability and the TensorRT version (major.minor.patch)."""
    problems = []
    if built.get("compute_capability") != here.get("compute_capability"):
        problems.append(
            f"built for compute capability {built.get('compute_capability')} ({built.get('gpu')}), "
            f"this GPU is {here.get('compute_capability')} ({here.get('gpu')})"
        )
    if built.get("tensorrt") != here.get("tensorrt"):
        problems.append(f"built with TensorRT {built.get('tensorrt')}, this is TensorRT {here.get('tensorrt')}")
    return "; ".join(problems) or None


def convert(source: ModelSource, options: TensorRTOptions, out_dir: Path, stem: str, parent: Artifact) -> Artifact:
    """Build the engine from the ONNX ``parent`` (an artifact, proven in ONNX Runtime)."""
    size = _size_of(parent)
    input_name = parent.inputs[0].name
    started = time.perf_counter()
    engine_bytes = build_engine(parent.path, input_name, options, size)
    final = out_dir / f"{stem}.engine"
    atomic_write_bytes(final, engine_bytes)
    dims = ("batch", 3, *size)
    inputs = [TensorSpec(input_name, dims, "float32")]
    outputs = [TensorSpec(parent.outputs[0].name, ("batch", 1, *size), "float32")]
    tools = tool_versions("torch", "onnx", "tensorrt")
    built_on = engine_host()
    artifact = build_artifact(
        source,
        options,
        target="tensorrt",
        files=[final],
        inputs=inputs,
        outputs=outputs,
        tools=tools,
        size=size,
        started=started,
        parent={"target": "onnx", "precision": parent.precision, "sha256": parent.sha256, "file": parent.path.name},
        calibration=parent.manifest.get("calibration"),
        quantization=parent.manifest.get("quantization"),
    )
    artifact.manifest["tensorrt"] = built_on | {
        "profile": {k: list(v) for k, v in _profile_shapes(options, size).items()},
        "strongly_typed": True,
        "trtexec": trtexec_command(Path(parent.path.name), Path(final.name), input_name, options, size),
    }
    return artifact


class TensorRTRunner(Runner):
    """Deserializes the engine, allocates I/O as PyTorch CUDA tensors, sets the input shape per
    call and times ``execute_async_v3`` with CUDA events on its own stream."""

    def load(self) -> None:
        import tensorrt as trt
        import torch

        built = self.artifact.manifest.get("tensorrt", {})
        mismatch = engine_mismatch(built, engine_host())
        if mismatch:
            raise RuntimeLoadError(
                f"engine {self.artifact.path.name} cannot run here: {mismatch}; rebuild it on "
                f"this machine with: {built.get('trtexec')}"
            )
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(self.artifact.path.read_bytes())
        if self.engine is None:
            raise RuntimeLoadError(f"TensorRT could not deserialize {self.artifact.path.name}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]

    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch of the engine's optimization profile, from the manifest."""
        profile = self.artifact.manifest.get("tensorrt", {}).get("profile", {})
        return profile.get("min", [1])[0], profile.get("max", [1])[0]

    @property
    def max_batch(self) -> int | None:
        return self.batch_range[1]

    def close(self) -> None:
        self.context = self.engine = self.runtime = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt
        import torch

        batch = next(iter(feeds.values())).shape[0]
        low, high = self.batch_range
        if not low <= batch <= high:
            raise ConfigError(
                f"batch {batch} is outside this engine's profile {low}..{high} (rebuild with --min-batch/--max-batch)"
            )
        tensors = {}
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=np.float32)).cuda()
            self.context.set_input_shape(name, tuple(tensor.shape))
            tensors[name] = tensor
        for name in self.names:
            if name not in tensors:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = torch.float16 if self.engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
                tensors[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, tensor in tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        with timed("cuda", self.stream) as timer:
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ConversionError("TensorRT execute_async_v3 failed")
        self.last_latency_s = timer.seconds
        return {name: tensors[name].float().cpu().numpy() for name in self.names if name not in self.input_names}


register(
    TargetSpec(
        name="tensorrt",
        source="onnx",
        precisions=PRECISIONS,
        dynamic_shapes=True,
        devices=("cuda",),
        host_os=None,
        extra="tensorrt",
        requires=("tensorrt", "onnx", "onnxruntime"),
        options_type=TensorRTOptions,
        convert=convert,
        runner=TensorRTRunner,
        description="TensorRT engine (strongly typed; INT8 from Q/DQ ONNX) on an NVIDIA GPU",
        onnx_options=onnx_options,
        handoff=handoff,
    )
)
