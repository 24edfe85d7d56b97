"""NCNN target: pnnx converts the deploy-mode torch module to an NCNN ``.param`` + ``.bin``,
run on CPU by the ``ncnn`` Python binding.

Flow: ``torch.jit.trace`` at the artifact's size → the ``pnnx`` executable (shipped in the
``pnnx`` wheel; its Python ``pnnx.export`` ignores the tool's exit status and imports the
Python module pnnx generates, so the executable is called directly) → ``.param`` (the graph,
text) and ``.bin`` (the weights). pnnx also writes a TorchScript-free PNNX graph
(``.pnnx.param/.bin``), an ``.pnnx.onnx``, and two generated Python scripts; all of it, and the
traced ``.pt``, stays in a temporary folder, and only the ``.param``/``.bin`` pair is kept.

Precisions: ``fp32`` (``fp16=0``: float32 weights) and ``fp16`` (pnnx's ``fp16=1``: weights
stored as float16 in the ``.bin``, half its size). NCNN widens fp16 weights to float32 at load
time; what it then computes in depends on the CPU: on x86 without AVX512-FP16 (every CPU
measured here) it computes in float32 with the fp16-rounded weights; on ARMv8.2+ it uses fp16
storage and arithmetic for activations too (the runtime's defaults, kept for fp16 artifacts).
fp32 artifacts are run with NCNN's fp16/bf16 storage and arithmetic switched off, so they
compute in float32 on every CPU.

INT8 is not built: NCNN's post-training quantization is the ``ncnn2table`` (calibration
table) and ``ncnn2int8`` (weight quantization, graph rewrite) executables, which neither the
``ncnn`` wheel (the Python binding only) nor the ``pnnx`` wheel (the converter only) ships.

Shapes: NCNN graphs have no batch axis (pnnx drops it); the runner runs a batch image by image,
one extractor each. ``--dynamic`` traces the model at a second input size as well
(pnnx's ``inputshape2``), which turns every ``upsample_like`` into a size-from-blob ``Interp``:
the artifact then takes any height, width and batch.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, tool_versions
from u2zoo.converters.base import ModelSource, Runner, TargetSpec, build_artifact, network_size_for, register
from u2zoo.converters.options import ShapeOptions
from u2zoo.errors import BackendUnavailable, ConfigError, ConversionError, RuntimeLoadError, U2ZooError, tool_failure

PRECISIONS = ("fp32", "fp16")
UNSUPPORTED = {
    "int8": "NCNN quantizes with its ncnn2table and ncnn2int8 tools, which the ncnn and pnnx "
    "wheels do not ship (the ncnn wheel is the Python binding only)",
}
PNNX_TIMEOUT_S = 1800  # U2NETP at 320x320 takes seconds; a hung tool must not hang convert


@dataclass(frozen=True)
class NcnnOptions(ShapeOptions):
    """precision: fp32 | fp16 (fp16 weights in the .bin); dynamic: any height/width (and any batch,
    run image by image); batch stays 1, NCNN graphs have no batch axis."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            why = UNSUPPORTED.get(self.precision)
            raise ConfigError(
                f"target 'ncnn' does not support precision {self.precision!r} "
                + (f"({why})" if why else f"(supported: {', '.join(PRECISIONS)})")
            )
        if self.batch != 1:
            raise ConfigError(
                "ncnn graphs have no batch axis (pnnx drops it), so --batch must be 1; "
                "an ncnn artifact runs a batch image by image (--dynamic takes any batch)"
            )
        if (self.height is not None and self.height < 1) or (self.width is not None and self.width < 1):
            raise ConfigError("height and width must be positive")


# ---------------------------------------------------------------------------------------------
# conversion


def _second_size(size: tuple[int, int]) -> tuple[int, int]:
    """Another input size for pnnx's ``inputshape2`` (dynamic): about half, never the same."""
    return tuple(s // 2 + 1 if s // 2 + 1 != s else s + 1 for s in size)  # type: ignore[return-value]


def _pnnx_failure(result: subprocess.CompletedProcess) -> str:
    """pnnx's own complaint as one line: its last error-looking line, else its last line."""
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if any(w in line.lower() for w in ("error", "fail", "not supported", "abort"))]
    last = (errors or lines or ["no output"])[-1]
    status = f"signal {-result.returncode}" if result.returncode < 0 else f"exit {result.returncode}"
    return f"{status}: {last[:300]}"


def _run_pnnx(model, size: tuple[int, int], dynamic: bool, fp16: bool, work: Path) -> tuple[Path, Path]:
    """trace → pnnx → (param, bin) inside ``work``; every other file pnnx writes stays there."""
    import torch

    try:
        from pnnx import EXEC_PATH
    except ImportError:
        raise BackendUnavailable("target 'ncnn' needs pnnx", extra="ncnn") from None
    traced = work / "model.pt"
    example = torch.zeros(1, 3, *size)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings, TorchScript's deprecation notice
            torch.jit.trace(model, example, check_trace=False).save(str(traced))
    except Exception as exc:  # noqa: BLE001 - the tracer's own failure
        raise ConversionError(f"ncnn conversion failed: torch.jit.trace: {tool_failure(exc)}") from exc
    param, bin_ = work / "model.ncnn.param", work / "model.ncnn.bin"
    shape = f"[1,3,{size[0]},{size[1]}]f32"
    command = [
        EXEC_PATH,
        str(traced),
        f"inputshape={shape}",
        f"fp16={int(fp16)}",
        "device=cpu",
        f"ncnnparam={param}",
        f"ncnnbin={bin_}",
        f"ncnnpy={work / 'model_ncnn.py'}",
        f"pnnxparam={work / 'model.pnnx.param'}",
        f"pnnxbin={work / 'model.pnnx.bin'}",
        f"pnnxpy={work / 'model_pnnx.py'}",
        f"pnnxonnx={work / 'model.pnnx.onnx'}",
    ]
    if dynamic:
        second = _second_size(size)
        command.append(f"inputshape2=[1,3,{second[0]},{second[1]}]f32")
    try:
        result = subprocess.run(
            command, cwd=work, capture_output=True, text=True, errors="replace", timeout=PNNX_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise ConversionError(f"ncnn conversion failed: pnnx did not finish in {PNNX_TIMEOUT_S} s") from None
    except OSError as exc:
        raise ConversionError(f"ncnn conversion failed: cannot run pnnx ({exc.strerror or exc})") from None
    if result.returncode != 0 or not param.is_file() or not bin_.is_file():
        raise ConversionError(f"ncnn conversion failed: pnnx {_pnnx_failure(result)}")
    return param, bin_


def _unknown_layers(param: Path) -> list[str]:
    """Layer types in a .param that this NCNN build does not know (ops pnnx could not lower)."""
    import ncnn

    types = []
    for line in param.read_text(errors="replace").splitlines()[2:]:  # magic, then counts
        parts = line.split()
        if parts and parts[0] not in types and ncnn.layer_to_index(parts[0]) < 0:
            types.append(parts[0])
    return types[:5]


def _blob_names(param: Path, bin_: Path) -> tuple[str, str]:
    """(input, output) blob names, as NCNN itself reads them from the graph; loading the pair
    also proves NCNN knows every layer pnnx wrote."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    try:
        if net.load_param(str(param)) != 0:
            unknown = _unknown_layers(param)
            raise ConversionError(
                "ncnn conversion failed: "
                + (
                    f"pnnx left op(s) NCNN does not have: {', '.join(unknown)}"
                    if unknown
                    else "ncnn cannot read the graph pnnx wrote"
                )
            )
        if net.load_model(str(bin_)) != 0:
            raise ConversionError("ncnn conversion failed: ncnn cannot read the weights pnnx wrote")
        inputs, outputs = list(net.input_names()), list(net.output_names())
    finally:
        net.clear()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConversionError(f"ncnn conversion failed: expected 1 input and 1 output, pnnx wrote {inputs} → {outputs}")
    return inputs[0], outputs[0]


def convert(source: ModelSource, options: NcnnOptions, out_dir: Path, stem: str) -> Artifact:
    """torch → TorchScript trace → pnnx → NCNN .param + .bin (fp32 or fp16 weights)."""
    height, width = network_size_for(options, source)
    started = time.perf_counter()
    param, bin_ = out_dir / f"{stem}.param", out_dir / f"{stem}.bin"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".pnnx-") as tmp:
        made_param, made_bin = _run_pnnx(
            source.model.eval(), (height, width), options.dynamic, options.precision == "fp16", Path(tmp)
        )
        input_name, output_name = _blob_names(made_param, made_bin)
        os.replace(made_param, param)
        os.replace(made_bin, bin_)
    if options.dynamic:
        in_shape, out_shape = ("batch", 3, "height", "width"), ("batch", 1, "height", "width")
    else:
        in_shape, out_shape = (1, 3, height, width), (1, 1, height, width)
    return build_artifact(
        source,
        options,
        target="ncnn",
        files=[param, bin_],
        inputs=[TensorSpec(input_name, in_shape, "float32")],
        outputs=[TensorSpec(output_name, out_shape, "float32")],
        tools=tool_versions("torch", "pnnx", "ncnn"),
        size=(height, width),
        started=started,
    )


# ---------------------------------------------------------------------------------------------
# runtime


class NcnnRunner(Runner):
    """The ``ncnn`` Python binding on CPU (no Vulkan): one extractor per image.

    Threads: ``threads`` or NCNN's own default (the physical big-core count). fp32 artifacts
    run with fp16/bf16 storage and arithmetic off (float32 throughout); fp16 artifacts keep
    NCNN's defaults (fp16 storage/arithmetic where the CPU has it).
    """

    net = None

    def load(self) -> None:
        import ncnn

        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1")
        files = {
            Path(entry["name"]).suffix: self.artifact.path.parent / entry["name"]
            for entry in self.artifact.manifest["files"]
        }
        if ".param" not in files or ".bin" not in files:
            raise RuntimeLoadError(f"{self.artifact.path.name}: an ncnn artifact needs a .param and a .bin file")
        net = ncnn.Net()
        net.opt.use_vulkan_compute = False
        net.opt.num_threads = self.threads or ncnn.get_physical_big_cpu_count() or 1
        if self.artifact.precision == "fp32":
            for name in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
                setattr(net.opt, name, False)
        if net.load_param(str(files[".param"])) != 0:
            net.clear()
            raise RuntimeLoadError(
                f"ncnn could not load {files['.param'].name} (a malformed graph or an unknown layer)"
            )
        if net.load_model(str(files[".bin"])) != 0:
            net.clear()
            raise RuntimeLoadError(f"ncnn could not load {files['.bin'].name} (weights do not match the graph)")
        self.net = net

    def loaded_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        # NCNN knows the blob names, not shapes (its Input layer carries none): rank unknown
        return (
            [TensorSpec(name, None, "float32") for name in self.net.input_names()],  # type: ignore[arg-type]
            [TensorSpec(name, None, "float32") for name in self.net.output_names()],  # type: ignore[arg-type]
        )

    def close(self) -> None:
        if self.net is not None:
            self.net.clear()
        self.net = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ncnn

        batch = feeds[self.input_name]
        expected = self.artifact.inputs[0].shape
        if (
            batch.ndim != 4
            or batch.shape[1] != 3
            or any(isinstance(want, int) and have != want for want, have in zip(expected, batch.shape))
        ):
            raise ConfigError(f"this ncnn model takes input {tuple(expected)}, got {batch.shape}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        # clone: a Mat made from an array shares its memory, which an in-place layer could overwrite
        mats = [ncnn.Mat(image).clone() for image in batch]
        outs = []
        started = time.perf_counter()
        for mat in mats:
            extractor = self.net.create_extractor()
            extractor.input(self.input_name, mat)
            code, out = extractor.extract(self.output_name)
            extractor.clear()
            if code != 0:
                raise U2ZooError(f"ncnn failed to run {self.artifact.path.name} (extract returned {code})")
            outs.append(out)
        self.last_latency_s = time.perf_counter() - started
        return {self.output_name: np.stack([np.array(out, dtype=np.float32) for out in outs])}


SPEC = register(
    TargetSpec(
        name="ncnn",
        source="torch",
        precisions=PRECISIONS,
        dynamic_shapes=True,
        devices=("cpu",),
        host_os=None,
        extra="ncnn",
        requires=("pnnx", "ncnn"),
        options_type=NcnnOptions,
        convert=convert,
        runner=NcnnRunner,
        description="NCNN .param/.bin converted by pnnx, run by the ncnn Python binding on CPU",
        unsupported=UNSUPPORTED,
    )
)
