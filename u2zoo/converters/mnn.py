"""MNN target: the proven ONNX → ``.mnn`` with MNN's converter, run by MNN's Python runtime on CPU.

The chain is torch → onnx → mnn (``source="onnx"``, worked out by :mod:`u2zoo.conversion`): the
fp32 ONNX artifact is built, proven in ONNX Runtime and published beside the ``.mnn``, and
MNN's converter starts from those exact bytes. MNN's own ONNX front end is what its users run,
and the ONNX graph's node names are what the layer groups of the float fallback select.

Precisions:

- ``fp32``: the converted graph as is.
- ``fp16``: weights stored as float16 (the converter's ``--fp16``; half the file). The CPU
  backend expands them to float32 at load, so the arithmetic stays fp32.
- ``int8``: MNN's offline quantization tool (``mnnquant``): symmetric int8 per-channel
  weights and int8 activations whose thresholds come from KL divergence of their
  histograms (MNN's default ``feature_quantize_method``). It is fed the tensors of u2zoo's
  shared calibration source, not images: each preprocessed (1, 3, H, W) input is written as
  text for the tool's ``"input_type": "sequence"`` mode, which reads raw tensors (its image
  mode would resize and normalize with MNN's own code). ``%.9g`` round-trips float32, so
  the tool calibrates on exactly the tensors whose sha256 the manifest records.
  Layer groups kept in float (``keep_fp_groups``, or the ``keep_fp`` most sensitive ones
  of the ONNX Runtime ranking) become the tool's ``skip_quant_op_names``: MNN names each op
  after the output of the ONNX node it came from (``/stage2d/rebnconv1d/conv_s1/Conv_output_0``;
  a Conv fused with its Relu keeps either name), so the outputs of a group's ONNX nodes name
  all of its MNN ops. The tool
  still records int8 ranges for tensors a skipped op shares with quantized neighbours, so a
  group in float is looser than in the other targets (listing every op of U2NETP left int8
  ranges on the tensors of 155 of its 267 ops; only the listed convs kept float weights).

  INT8 is refused where MNN's int8 CPU runtime is known to be broken (``BROKEN_INT8_X86``:
  3.6.1 on x86-64, whose int8 kernels return nondeterministic garbage); the converter path
  above still runs there when called directly, which is how its tests exercise it.

MNN's converter and quantizer are C++ code behind the wheel's ``_tools`` extension. They
run in a child interpreter: a converter that aborts (the 3.6.1 quantizer does on bad input)
then fails this conversion with one line instead of killing u2zoo, and their progress
output is captured. The wheel's console scripts (``mnnconvert``/``mnnquant``) and the
``MNN.tools`` package are not used: their wrappers import a usage logger that tries to
``pip install`` a logging SDK and reports to a remote server, and MNN 3.6.1's ``mnnquant``
wrapper calls ``_tools.mnnquant`` with three strings where the extension takes an argv list
(it aborts with ``std::length_error``).

``dynamic=True`` exports the ONNX with dynamic batch, height and width; MNN's module API
resizes the graph to each input (measured: an odd 2×3×97×131 input matches torch to 1e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
from u2zoo.converters.options import CalibrationOptions, ShapeOptions, keep_fp_option
from u2zoo.errors import ConfigError, ConversionError, RuntimeLoadError, U2ZooError, one_line, tool_failure
from u2zoo.files import process_scratch_dir

PRECISIONS = ("fp32", "fp16", "int8")
# MNN releases whose x86-64 int8 CPU kernels were measured to return invalid masks: the same
# quantized file gives different garbage from one process to the next (uninitialized memory),
# whether calibrated on our tensors or by the tool's own image reader, with the module or the
# session API. Small graphs fail intermittently, U2NETP always (IoU@0.5 0.00 vs torch).
BROKEN_INT8_X86 = ("3.6.1",)
# MNN's default CPU Winograd picks tiles up to F(6×6, 3×3), whose transforms cost accuracy: real
# U2NETP fp32 on the 18 official images was 1.06e-3 (max abs) from torch, over the fp32 gate.
# Any level below 3 caps the unit at F(2×2, 3×3): 8.5e-5 there, at the same speed (1 thread,
# 320×320: p50 193 vs 194 ms); level 0, no Winograd at all: 1.4e-4 and slower. HintMode 3.
WINOGRAD_MEMORY_LEVEL = 3
WINOGRAD_LEVEL = 1
FEATURE_METHOD = "KL"  # MNN's default: per-tensor thresholds from KL divergence of histograms
WEIGHT_METHOD = "MAX_ABS"  # symmetric per-channel int8 weights


def int8_unavailable_reason() -> str | None:
    """Why INT8 is refused on this host (a known-broken MNN int8 runtime), or None."""
    import platform
    from importlib import metadata

    try:
        version = metadata.version("mnn")
    except metadata.PackageNotFoundError:
        return None
    if platform.machine().lower() in ("x86_64", "amd64") and version in BROKEN_INT8_X86:
        return (
            f"MNN {version}'s x86-64 int8 CPU kernels return invalid, nondeterministic masks (U2NETP: "
            "IoU@0.5 0.00 vs torch, with or without layer groups in float); use --fp16, or --int8 "
            "with the onnx, openvino or tflite target"
        )
    return None


@dataclass(frozen=True)
class MnnOptions(ShapeOptions, CalibrationOptions):
    # precision: fp32 | fp16 (fp16 weights, fp32 arithmetic on CPU) | int8 (mnnquant, calibrated)
    keep_fp: int = keep_fp_option()  # ranked with ONNX Runtime on the parent ONNX

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_fp_groups", tuple(self.keep_fp_groups))
        check_int8_options(
            self.precision,
            self.calib,
            self.keep_fp,
            {
                "calib": self.calib,
                "calib_size": self.calib_size,
                "keep_fp": self.keep_fp,
                "keep_fp_groups": self.keep_fp_groups,
            },
        )
        if (
            self.batch < 1
            or (self.height is not None and self.height < 1)
            or (self.width is not None and self.width < 1)
        ):
            raise ConfigError("batch, height and width must be positive")


def onnx_options(options: MnnOptions) -> dict[str, Any]:
    """The ONNX artifact MNN converts: always fp32 (MNN stores fp16 weights and quantizes
    itself), with this artifact's shape."""
    return {
        "precision": "fp32",
        "dynamic": options.dynamic,
        "batch": options.batch,
        "height": options.height,
        "width": options.width,
    }


def handoff(parent: Artifact, options: MnnOptions, out_dir: Path) -> str:
    """Where a host without MNN leaves the user: the proven ONNX and the converter's command."""
    fp16 = " --fp16" if options.precision == "fp16" else ""
    stem = parent.path.stem.replace("_onnx_fp32", f"_mnn_{options.precision}")
    return (
        f"the proven ONNX is {parent.path}; convert it where MNN is installed with: "
        f"MNNConvert -f ONNX --modelFile {parent.path.name} --MNNModel {stem}.mnn{fp16}"
        + (" (int8 needs u2zoo's calibration: run u2zoo there)" if options.precision == "int8" else "")
    )


# --- MNN's C++ tools, in a child interpreter -------------------------------------------------

_TOOL_CODE = "import sys, _tools; _tools.{call}(sys.argv)"
TOOL_TIMEOUT_S = 7200  # U2NETP: seconds to convert, about a minute to calibrate 32 images; never hang


def _run_tool(call: str, args: list[str], what: str) -> str:
    """Run ``_tools.<call>(argv)`` (MNN's converter or quantizer) in a child interpreter;
    returns its output, or raises ConversionError with one line that says why it failed."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TOOL_CODE.format(call=call), *args],
            capture_output=True,
            text=True,
            errors="replace",
            env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
            timeout=TOOL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise ConversionError(f"{what} did not finish within {TOOL_TIMEOUT_S} s") from None
    except OSError as exc:
        raise ConversionError(f"{what} could not start: {tool_failure(exc)}") from None
    output = done.stdout + "\n" + done.stderr
    if done.returncode != 0:
        how = f"crashed (signal {-done.returncode})" if done.returncode < 0 else f"exited with {done.returncode}"
        raise ConversionError(f"{what} {how}: {_tool_complaint(output)}")
    return output


def _tool_complaint(output: str, limit: int = 300) -> str:
    """The lines of a tool's output that say what went wrong, as one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    noise = ("Check it out ==>", "The device supports", "CollectFeatureDistribution", "ComputeFeatureRange")
    lines = [line for line in lines if not any(n in line for n in noise)]
    flagged = [line for line in lines if any(w in line.lower() for w in ("error", "not support", "fail", "what()"))]
    text = one_line(" | ".join(flagged[-3:] or lines[-3:])) or "no output"
    return text[:limit]


def convert_onnx(onnx_path: Path, mnn_path: Path, fp16: bool) -> None:
    """ONNX → .mnn with MNN's converter (fp16: weights stored as float16)."""
    args = ["-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(mnn_path), "--bizCode", "u2zoo"]
    output = _run_tool("mnnconvert", args + (["--fp16"] if fp16 else []), "MNN's converter")
    if "Converted Success" not in output or not mnn_path.is_file():
        raise ConversionError(f"MNN's converter did not convert {onnx_path.name}: {_tool_complaint(output)}")


# Calibration tensors written for the quantizer, per (set digest, batch, input, shape), for this
# process: the float fallback quantizes the same model again and again on the same set.
_CALIB_FOLDERS: dict[tuple, Path] = {}


def calibration_folder(calib, input_name: str, shape: tuple[int, ...]) -> Path:
    """The calibration set as the quantizer's ``sequence`` input: one folder per sample with
    ``<input>.txt`` (the tensor's values, one row of W per line, ``%.9g``: float32 exactly)
    and ``input.json`` (its shape; the 3.6.1 tool crashes without it). A static batch B > 1
    gets B consecutive images per sample (the last one topped up from the start)."""
    key = (calib.digest, input_name, tuple(shape))
    cached = _CALIB_FOLDERS.get(key)
    if cached is not None and cached.is_dir():
        return cached
    for old in _CALIB_FOLDERS.values():  # one set at a time: 256 inputs of 320×320 are ~1 GB of text
        shutil.rmtree(old, ignore_errors=True)
    _CALIB_FOLDERS.clear()
    folder = Path(tempfile.mkdtemp(prefix="set-", dir=process_scratch_dir("u2zoo-mnn-calib-")))
    inputs = calib.inputs
    batch = shape[0]
    count = -(-len(inputs) // batch)
    spec = json.dumps({"inputs": [{"name": input_name, "shape": list(shape)}]})
    for i in range(count):
        picked = np.take(inputs, np.arange(i * batch, (i + 1) * batch) % len(inputs), axis=0)
        sample = folder / f"{i:05d}"
        sample.mkdir()
        np.savetxt(sample / f"{input_name}.txt", picked.reshape(-1, shape[-1]), fmt="%.9g")
        (sample / "input.json").write_text(spec, encoding="utf-8")
    _CALIB_FOLDERS[key] = folder
    return folder


def skip_op_names(onnx_path: Path, groups: list[str]) -> list[str]:
    """MNN op names of the layer ``groups``: the first output of each ONNX node in them (MNN
    names an op after it; of a Conv and the Relu fused into it, one name survives)."""
    import onnx

    from u2zoo.quantization.onnx_int8 import nodes_in_groups

    if not groups:
        return []
    model = onnx.load(str(onnx_path))
    nodes = set(nodes_in_groups(model, groups))  # an unknown group is a one-line ConfigError
    return [node.output[0] for node in model.graph.node if node.name in nodes and node.output]


def quantize(
    fp32_mnn: Path,
    out: Path,
    parent: Artifact,
    source: ModelSource,
    options: MnnOptions,
    size: tuple[int, int],
    work: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """fp32 .mnn → int8 .mnn with MNN's offline quantizer on the shared calibration set;
    returns the (calibration, quantization) records for the manifest."""
    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.quantization.onnx_int8 import plan_float_groups

    calib = calibration_set(options.calib, source.contract, options.calib_size, size)
    input_name = parent.inputs[0].name
    kept, _, ranking = plan_float_groups(parent.path, calib, input_name, options.keep_fp, options.keep_fp_groups)
    skipped = skip_op_names(parent.path, kept)
    sample_shape = (1 if options.dynamic else options.batch, 3, *size)  # what one calibration run feeds
    folder = calibration_folder(calib, input_name, sample_shape)
    config = {
        "path": f"{folder}/",
        "used_sample_num": len(list(folder.iterdir())),
        "input_type": "sequence",
        "inputs": [{"name": input_name, "shape": list(sample_shape)}],
        "feature_quantize_method": FEATURE_METHOD,
        "weight_quantize_method": WEIGHT_METHOD,
        "skip_quant_op_names": skipped,
    }
    config_path = work / "quant.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    staged = work / "quantized.mnn"
    output = _run_tool("mnnquant", [str(fp32_mnn), str(staged), str(config_path)], "MNN's quantizer")
    if "Quantize model done" not in output or not staged.is_file():
        raise ConversionError(f"MNN's quantizer did not quantize the model: {_tool_complaint(output)}")
    os.replace(staged, out)
    settings: dict[str, Any] = {
        "tool": "MNN offline quantization (mnnquant)",
        "scheme": "int8 symmetric per-channel weights, int8 symmetric per-tensor activations",
        "feature_quantize_method": FEATURE_METHOD,
        "weight_quantize_method": WEIGHT_METHOD,
        "calibration_input": "u2zoo's preprocessed tensors, as raw values (input_type sequence)",
        "kept_in_float": kept,
        "skip_quant_op_names": len(skipped),
    }
    if ranking is not None:
        settings["sensitivity"] = [vars(r) for r in ranking]
    return calib.describe(), settings


def convert(source: ModelSource, options: MnnOptions, out_dir: Path, stem: str, parent: Artifact) -> Artifact:
    """Convert the fp32 ONNX ``parent`` (proven in ONNX Runtime) to .mnn; fp16 stores fp16
    weights, int8 quantizes the fp32 .mnn on the shared calibration set."""
    height, width = network_size_for(options, source)
    started = time.perf_counter()
    final = out_dir / f"{stem}.mnn"
    calibration = quantization = None
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        work = Path(tmp)
        try:
            if options.precision == "int8":
                fp32 = work / "fp32.mnn"
                convert_onnx(parent.path, fp32, fp16=False)
                calibration, quantization = quantize(fp32, final, parent, source, options, (height, width), work)
            else:
                convert_onnx(parent.path, final, fp16=options.precision == "fp16")
        except U2ZooError:
            final.unlink(missing_ok=True)
            raise
        except Exception as exc:  # noqa: BLE001 - anything else from the tools' plumbing, as one line
            final.unlink(missing_ok=True)
            raise ConversionError(f"MNN conversion failed: {tool_failure(exc)}") from exc
    dims = ("batch", 3, "height", "width") if options.dynamic else (options.batch, 3, height, width)
    out_dims = ("batch", 1, "height", "width") if options.dynamic else (options.batch, 1, height, width)
    record: dict[str, Any] = {
        "target": "onnx",
        "precision": parent.precision,
        "sha256": parent.sha256,
        "file": parent.path.name,
    }
    tools = tool_versions("torch", "onnx", "onnxruntime", "onnxslim", "mnn")
    artifact = build_artifact(
        source,
        options,
        target="mnn",
        files=[final],
        inputs=[TensorSpec(parent.inputs[0].name, dims, "float32")],
        outputs=[TensorSpec(parent.outputs[0].name, out_dims, "float32")],
        tools=tools,
        size=(height, width),
        started=started,
        parent=record,
        calibration=calibration,
        quantization=quantization,
    )
    artifact.manifest["mnn"] = {
        "converter": "MNN ONNX converter" + (" --fp16 (float16 weights)" if options.precision == "fp16" else ""),
        "runtime": "MNN Python module API (MNN.nn.load_module_from_file), CPU backend, precision high, "
        f"Winograd memory level {WINOGRAD_LEVEL} (F(2x2,3x3) tiles)",
    }
    return artifact


class MnnRunner(Runner):
    """MNN's module API on the CPU backend with ``threads`` (default 1), high precision (fp32
    arithmetic) and small Winograd tiles (see ``WINOGRAD_LEVEL``). Outputs leave in NCHW
    whatever layout MNN computed them in (NC4HW4 inside)."""

    def load(self) -> None:
        import MNN.expr as F
        import MNN.nn as nn

        self._F = F
        config = {"backend": "CPU", "numThread": int(self.threads or 1), "precision": "high"}
        self.runtime = nn.create_runtime_manager((config,))
        self.runtime.set_hint(WINOGRAD_MEMORY_LEVEL, WINOGRAD_LEVEL)
        self.module = nn.load_module_from_file(
            str(self.artifact.path),
            [self.input_name],
            [self.output_name],
            runtime_manager=self.runtime,
            shape_mutable=True,
        )
        if self.module is None:
            raise RuntimeLoadError(f"MNN could not load {self.artifact.path.name}")

    def loaded_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The file's own input (name, dtype, and static height/width) and output name. MNN
        stores a default shape on its Input op and resizes to whatever batch it is fed, so the
        batch is not the file's to say; an unknown dim is -1 there."""
        F = self._F
        info = self.module.get_info()
        variables = F.load_as_dict(str(self.artifact.path))
        inputs = []
        for name in info["inputNames"]:
            var = variables.get(name)
            shape = None
            if var is not None:
                dims = list(var.shape)
                shape = tuple(["?", *(d if d > 0 else "?" for d in dims[1:])]) if dims else None
            inputs.append(TensorSpec(name, shape, "float32"))
        outputs = [TensorSpec(name, None, "float32") for name in info["outputNames"]]
        return inputs, outputs

    def close(self) -> None:
        self.module = self.runtime = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        F = self._F
        x = np.ascontiguousarray(feeds[self.input_name], dtype=np.float32)
        expected = self.artifact.inputs[0].shape
        if any(isinstance(want, int) and want != have for want, have in zip(expected, x.shape)) or x.ndim != 4:
            raise ConfigError(
                f"this mnn model takes input {tuple(expected)}, got {x.shape} (static shape: "
                "convert with --dynamic, or with --batch/--height/--width)"
            )
        var = F.const(x, list(x.shape), F.NCHW)
        started = time.perf_counter()
        outputs = self.module.forward([var])
        if not outputs:
            raise ConversionError(f"MNN could not run {self.artifact.path.name} on input {x.shape}")
        out = outputs[0]
        if out.data_format != F.NCHW:  # NC4HW4 (or NHWC) inside MNN
            out = F.convert(out, F.NCHW)
        result = np.array(out.read(), dtype=np.float32, copy=True)
        self.last_latency_s = time.perf_counter() - started
        return {self.output_name: result}


_INT8_REFUSED = int8_unavailable_reason()
SPEC = TargetSpec(
    name="mnn",
    source="onnx",
    precisions=PRECISIONS if _INT8_REFUSED is None else tuple(p for p in PRECISIONS if p != "int8"),
    dynamic_shapes=True,
    devices=("cpu",),
    host_os=None,
    extra="mnn",
    requires=("MNN", "onnx", "onnxruntime"),
    options_type=MnnOptions,
    convert=convert,
    runner=MnnRunner,
    description="MNN (.mnn from the ONNX) run by MNN's runtime on CPU (INT8 by mnnquant)",
    onnx_options=onnx_options,
    handoff=handoff,
    unsupported={
        "int8-qat": "MNN's quantization-aware training is not wired into u2zoo; use --int8",
        "dynamic-int8": "MNN's dynamic quantization is not wired into u2zoo; use --int8",
        "int8-weights": "MNN's weight-only int8 (--weightQuantBits 8) is not wired into u2zoo",
    }
    | ({"int8": _INT8_REFUSED} if _INT8_REFUSED else {}),
)
register(SPEC)
