"""ExecuTorch target: a ``.pte`` program lowered to the XNNPACK delegate, fp32 or INT8, run by
ExecuTorch's Python runtime on CPU.

Flow: ``torch.export`` (fixed shape) → ``to_edge_transform_and_lower`` with the
``XnnpackPartitioner`` → ``.to_executorch()``. INT8 is the PT2E flow: the exported graph is
annotated by ExecuTorch's ``XNNPACKQuantizer`` (int8 symmetric per-channel weights, int8
per-tensor activations from histogram observers), calibrated on the shared calibration set
(contract-preprocessed images), converted with torchao's ``convert_pt2e``, exported again and
lowered the same way. Layer groups kept in float are module paths (``stage2d``,
``stage2d/rebnconv1d``, ``outconv``) or ``top-level``, the same names the ONNX and OpenVINO
targets use (see :func:`make_quantizer` for how they are kept out of the quantizer).

Threads: ExecuTorch's thread pool (which XNNPACK uses) is one per process and defaults to
the number of cores. XNNPACK programs keep a pointer to the pool from the moment they are
loaded, so the runner resizes it (``_unsafe_reset_threadpool``) only before loading and only
when no other ExecuTorch program is loaded in the process.
"""

from __future__ import annotations

import time
import warnings
import weakref
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
from u2zoo.converters.options import CalibrationOptions, ShapeOptions
from u2zoo.errors import BackendUnavailable, ConfigError, ConversionError, U2ZooError, tool_failure
from u2zoo.quantization.onnx_int8 import TOP_LEVEL, check_module_groups

INPUT_NAME = "image"
OUTPUT_NAME = "mask"
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class ExecuTorchOptions(ShapeOptions, CalibrationOptions):
    """precision: fp32 | int8 (PT2E, XNNPACKQuantizer); dynamic is refused (programs are
    fixed-shape); keep_fp_groups are module paths (or "top-level") left in float."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_fp_groups", tuple(self.keep_fp_groups))
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"target 'executorch' does not support precision {self.precision!r} "
                f"(supported: {', '.join(PRECISIONS)})"
            )
        if self.dynamic:
            raise ConfigError(
                "executorch builds fixed-shape programs here; drop --dynamic and choose the shape "
                "with --batch/--height/--width (default: batch 1 at the contract's size)"
            )
        check_int8_options(
            self.precision,
            self.calib,
            0,
            {"calib": self.calib, "calib_size": self.calib_size, "keep_fp_groups": self.keep_fp_groups},
        )
        if (
            self.batch < 1
            or (self.height is not None and self.height < 1)
            or (self.width is not None and self.width < 1)
        ):
            raise ConfigError("batch, height and width must be positive")


# ---------------------------------------------------------------------------------------------
# layer groups


def _module_paths(node) -> list[str]:
    """Module paths an exported node came from ("" = the root), as torch.export records them."""
    paths = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        paths.append(path.removeprefix("L['self']."))
    return paths


def _in_group(node, group: str) -> bool:
    paths = _module_paths(node)
    if group == TOP_LEVEL:
        return bool(paths) and all(p == "" for p in paths)
    return group.replace("/", ".") in paths


# ---------------------------------------------------------------------------------------------
# conversion


def _batches(inputs: np.ndarray, batch: int):
    """Calibration batches of the program's fixed batch size (the last one padded by repetition,
    which leaves min/max and histogram ranges unchanged)."""
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        yield np.ascontiguousarray(chunk, dtype=np.float32)


def make_quantizer(kept: list[str]):
    """ExecuTorch's ``XNNPACKQuantizer`` (symmetric per-channel config) leaving ``kept`` groups in float.

    Every op of a kept group is marked as already annotated (with no quantization specs)
    before the quantizer's own annotators run, so none of them adds an observer there.
    ``set_module_name(name, None)`` asserts in executorch 1.5.1, and ``set_filter_function``
    is not enough: the ``cat`` annotator ignores the filter, so the concatenations inside a
    "float" group would still be quantized. Measured on real U2NETP keeping stage2d (19
    calibration images, 18 parity images): IoU@0.5 0.965 with the filter function, 0.990
    with this quantizer (ONNX Runtime: 0.988).
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    class FloatGroupsXNNPACKQuantizer(XNNPACKQuantizer):
        def annotate(self, model):
            for node in model.graph.nodes:
                if node.op == "call_function" and any(_in_group(node, g) for g in kept):
                    node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(_annotated=True)
            return super().annotate(model)

    return FloatGroupsXNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))


# Calibrated observer states per float model and (calibration set, input shape), for this
# process. The float fallback prepares the same model again with other groups in float;
# calibration runs the float model, so an observer that watches the same tensors with the
# same settings ends in the same state, and copying it replaces hundreds of forward passes.
_OBSERVER_STATES: "weakref.WeakKeyDictionary[Any, dict[tuple, dict[tuple, dict]]]" = weakref.WeakKeyDictionary()


def _observers(prepared) -> dict[tuple, list[Any]]:
    """Each observer of a prepared graph, keyed by what makes its state: the graph nodes whose
    outputs it watches, once per call in a forward pass (a histogram counts every call; the
    node names of ``torch.export`` are stable), its class, dtype and scheme.

    Observers are told apart by identity, not by attribute name: a shared quantization spec
    (a ``cat`` and its inputs, a max-pool and its input) puts one observer under several names.
    """
    watched: dict[int, tuple[Any, list[str]]] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target.startswith("activation_post_process"):
            origin = node.args[0]
            while origin.op == "call_module" and origin.target.startswith("activation_post_process"):
                origin = origin.args[0]  # an input edge reusing an output observer's result
            observer = getattr(prepared, node.target)
            watched.setdefault(id(observer), (observer, []))[1].append(origin.name)
    out: dict[tuple, list[Any]] = {}
    for observer, nodes in watched.values():
        key = (
            tuple(sorted(nodes)),
            type(observer).__name__,
            str(getattr(observer, "dtype", "")),
            str(getattr(observer, "qscheme", "")),
        )
        out.setdefault(key, []).append(observer)  # two observers of the same calls end in one state
    return out


def _observer_states(observers: dict[tuple, list[Any]]) -> dict[tuple, dict]:
    return {key: {k: v.detach().clone() for k, v in group[0].state_dict().items()} for key, group in observers.items()}


def _load_observer_states(observers: dict[tuple, list[Any]], known: dict[tuple, dict]) -> list[Any]:
    """Load the state of every observer found in ``known``; return the others, still to calibrate."""
    missing = []
    for key, group in observers.items():
        if key not in known:
            missing += group
            continue
        for observer in group:
            for name, value in known[key].items():
                # setattr, not load_state_dict: PerChannelMinMaxObserver's loader skips ``eps``,
                # which its first forward sets (2**-12 in XNNPACK's config)
                setattr(observer, name, value.clone())
    return missing


def _calibrate(prepared, batches, known: dict[tuple, dict]) -> str:
    """Calibrate ``prepared``, reusing the states in ``known``; record the new ones there.

    Observers already known are switched off during the passes (their state is final); the
    passes run only when some observer is new. Returns what happened, for the manifest.
    """
    import torch

    observers = _observers(prepared)
    total = sum(len(group) for group in observers.values())
    missing = _load_observer_states(observers, known)
    if not missing:
        return f"reused: all {total} observers' ranges from this process's earlier calibration"
    missing_ids = {id(o) for o in missing}
    switched_off = [o for group in observers.values() for o in group if id(o) not in missing_ids]
    for observer in switched_off:
        observer.forward = _identity
    try:
        with torch.no_grad():
            for batch in batches:
                prepared(torch.from_numpy(batch))
    finally:
        for observer in switched_off:
            del observer.forward
    known.update(_observer_states(observers))
    if len(missing) == total:
        return f"measured: {total} observers"
    return f"measured {len(missing)} of {total} observers; the rest reused from this process's earlier calibration"


def _identity(x):
    return x


def _quantize(
    model, example, source: ModelSource, options: ExecuTorchOptions, kept: list[str], size: tuple[int, int]
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """PT2E: export → annotate (XNNPACKQuantizer) → calibrate → convert; returns the converted module."""
    import torch

    from u2zoo.quantization.calibration import calibration_set

    calib = calibration_set(options.calib, source.contract, options.calib_size, size)
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = make_quantizer(kept)
    except ImportError as exc:
        raise BackendUnavailable(
            f"ExecuTorch INT8 needs torchao and the XNNPACK quantizer ({exc})", extra="executorch"
        ) from None
    try:
        graph = torch.export.export(model, example).module()
        prepared = prepare_pt2e(graph, quantizer)
        known = _OBSERVER_STATES.setdefault(model, {}).setdefault((calib.digest, tuple(example[0].shape)), {})
        ranges = _calibrate(prepared, _batches(calib.inputs, options.batch), known)
        converted = convert_pt2e(prepared)
    except U2ZooError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer's own failure
        raise ConversionError(f"ExecuTorch INT8 quantization failed: {tool_failure(exc)}") from exc
    convs = [n for n in converted.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    quantized = sum(1 for n in convs if len(n.args) > 1 and "dequantize" in str(getattr(n.args[1], "target", "")))
    settings = {
        "tool": "torchao pt2e + executorch XNNPACKQuantizer",
        "scheme": "int8 symmetric per-channel weights, int8 per-tensor affine activations (histogram observer)",
        "kept_in_float": kept,
        "quantized_convs": quantized,
        "float_convs": len(convs) - quantized,
    }
    return converted, calib.describe() | {"ranges": ranges}, settings


# The last module ``screen`` built for each model, with what makes it: the fallback converts a
# candidate right after screening it, and ``convert`` then takes that module instead of
# quantizing again. One per model, so candidates screened out are not kept.
_SCREENED: "weakref.WeakKeyDictionary[Any, tuple[tuple, tuple]]" = weakref.WeakKeyDictionary()


def _screen_key(options: ExecuTorchOptions, kept: list[str], size: tuple[int, int]) -> tuple:
    return (tuple(kept), options.calib, options.calib_size, options.batch, size)


class QuantizedTorchModule:
    """The INT8 program's graph before lowering, run in torch: torchao's reference kernels
    (dequantize → float op → quantize), the same quantized numerics as XNNPACK's int8 kernels
    up to rounding. Measured on U2NETP all-INT8 (4 sample photos, 256 DUTS-TR calibration
    images): IoU@0.5 vs torch 0.822 here, 0.820 in the XNNPACK program."""

    what = "the quantized graph run in torch before XNNPACK lowering"

    def __init__(self, module, batch: int, size: tuple[int, int]):
        self.module, self.fixed_batch, self.fixed_size = module, batch, size

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()


def screen(source: ModelSource, options: ExecuTorchOptions) -> QuantizedTorchModule:
    """Quantize (export, annotate, calibrate, convert) without the XNNPACK lowering, which takes
    most of a fallback step's time once calibration is reused; kept for ``convert``."""
    import torch

    size = network_size_for(options, source)
    kept = check_module_groups(source.model, options.keep_fp_groups)
    example = (torch.zeros(options.batch, 3, *size),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = _quantize(source.model.eval(), example, source, options, kept, size)
    _SCREENED[source.model] = (_screen_key(options, kept, size), built)
    return QuantizedTorchModule(built[0], options.batch, size)


def _take_screened(source: ModelSource, key: tuple) -> tuple | None:
    """The module ``screen`` built for this very candidate, if it was the last one screened."""
    held = _SCREENED.pop(source.model, None)
    return held[1] if held is not None and held[0] == key else None


def _lowering_summary(edge_program) -> dict[str, Any]:
    """How much of the graph XNNPACK took: delegate calls and the ops left to portable kernels."""
    outside: dict[str, int] = {}
    delegates = 0
    for node in edge_program.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            delegates += 1
        elif name != "getitem":
            outside[name] = outside.get(name, 0) + 1
    return {"partitioner": "XnnpackPartitioner", "delegate_calls": delegates, "ops_outside_delegates": outside}


def _output_spec(exported) -> TensorSpec:
    output = next(n for n in exported.graph.nodes if n.op == "output")
    value = output.args[0][0].meta["val"]
    return TensorSpec(OUTPUT_NAME, tuple(int(d) for d in value.shape), str(value.dtype).replace("torch.", ""))


def convert(source: ModelSource, options: ExecuTorchOptions, out_dir: Path, stem: str) -> Artifact:
    """torch → torch.export → (PT2E INT8) → XNNPACK-lowered ExecuTorch program (.pte)."""
    height, width = network_size_for(options, source)
    model = source.model.eval()
    kept = check_module_groups(model, options.keep_fp_groups)  # before any slow or noisy import
    try:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise BackendUnavailable(f"target 'executorch' needs executorch ({exc})", extra="executorch") from None
    pte = out_dir / f"{stem}.pte"
    started = time.perf_counter()
    example = (torch.zeros(options.batch, 3, height, width),)
    calibration = quantization = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if options.precision == "int8":
            screened = _take_screened(source, _screen_key(options, kept, (height, width)))
            model, calibration, quantization = screened or _quantize(
                model, example, source, options, kept, (height, width)
            )
        try:
            exported = torch.export.export(model, example)
        except Exception as exc:  # noqa: BLE001 - the exporter's own failure
            raise ConversionError(f"ExecuTorch export failed: torch.export: {tool_failure(exc)}") from exc
        try:
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
            lowering = _lowering_summary(edge.exported_program())
            program = edge.to_executorch()
            pte.write_bytes(program.buffer)
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"ExecuTorch export failed: XNNPACK lowering: {tool_failure(exc)}") from exc
    if not lowering["delegate_calls"]:
        raise ConversionError("ExecuTorch export failed: XNNPACK took no part of the graph")
    inputs = [TensorSpec(INPUT_NAME, (options.batch, 3, height, width), "float32")]
    artifact = build_artifact(
        source,
        options,
        target="executorch",
        files=[pte],
        inputs=inputs,
        outputs=[_output_spec(exported)],
        tools=tool_versions("torch", "executorch", "torchao"),
        size=(height, width),
        started=started,
        calibration=calibration,
        quantization=quantization,
    )
    artifact.manifest["lowering"] = lowering
    return artifact


# ---------------------------------------------------------------------------------------------
# runtime

_loaded: "weakref.WeakSet[ExecuTorchRunner]" = weakref.WeakSet()  # runners holding a loaded program
_default_threads: int | None = None  # the pool's size before u2zoo first touched it


def configure_threads(threads: int | None) -> int:
    """Size the process-wide pool for the next program load; return the size in effect.

    ``None`` restores the runtime's default (one thread per core). Resizing while another
    program is loaded would leave that program's XNNPACK runtime with a dangling pool.
    """
    from executorch.extension.pybindings import portable_lib

    global _default_threads
    if threads is not None and threads < 1:
        raise ConfigError("threads must be at least 1")
    current = portable_lib._threadpool_get_thread_count()
    if _default_threads is None:
        _default_threads = current
    wanted = threads or _default_threads
    if wanted != current:
        if len(_loaded):
            raise U2ZooError(
                f"ExecuTorch's thread pool is shared by the whole process and {len(_loaded)} program(s) "
                f"are loaded with {current} thread(s): close them before loading one with {wanted}"
            )
        portable_lib._unsafe_reset_threadpool(wanted)
    return portable_lib._threadpool_get_thread_count()


class ExecuTorchRunner(Runner):
    """ExecuTorch's Python runtime (portable kernels + the XNNPACK delegate) on CPU."""

    program = method = None
    thread_count: int | None = None

    def load(self) -> None:
        from executorch.runtime import Runtime

        self.thread_count = configure_threads(self.threads)
        try:
            self.program = Runtime.get().load_program(str(self.artifact.path))
            self.method = self.program.load_method("forward")
        except Exception as exc:  # noqa: BLE001 - a program the runtime refuses
            self.program = self.method = None
            raise U2ZooError(f"ExecuTorch could not load {self.artifact.path.name}: {tool_failure(exc)}") from exc
        _loaded.add(self)

    def close(self) -> None:
        _loaded.discard(self)
        self.method = self.program = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        batch = np.ascontiguousarray(feeds[self.input_name], dtype=np.float32)
        expected = tuple(self.artifact.inputs[0].shape)
        if batch.shape != expected:
            raise ConfigError(f"this ExecuTorch program was built for input shape {expected}, got {batch.shape}")
        x = torch.from_numpy(batch)
        started = time.perf_counter()
        out = self.method.execute([x])
        self.last_latency_s = time.perf_counter() - started
        return {self.output_name: out[0].detach().numpy().copy()}


register(
    TargetSpec(
        name="executorch",
        source="torch",
        precisions=PRECISIONS,
        dynamic_shapes=False,
        devices=("cpu",),
        host_os=None,
        extra="executorch",
        requires=("executorch", "torchao"),
        options_type=ExecuTorchOptions,
        convert=convert,
        runner=ExecuTorchRunner,
        screen=screen,
        description="ExecuTorch .pte lowered to XNNPACK, run by ExecuTorch's Python runtime (INT8 by PT2E)",
    )
)
