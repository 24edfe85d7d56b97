"""The converter/runner contract and the capability table.

A target is one module in ``u2zoo/converters/`` that calls :func:`register` with one
:class:`TargetSpec` row: what it takes (torch or onnx), what it can do (precisions, dynamic
shapes, GPU, host OS), which extra installs it, its typed options, its ``convert`` function
and its :class:`Runner`. Modules never import their backend at module level, so the table
loads on any machine and says what is missing instead of crashing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import platform
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, check_io, new_manifest, static_size
from u2zoo.errors import ArtifactError, BackendUnavailable, ConfigError, RuntimeLoadError, U2ZooError, tool_failure
from u2zoo.quiet import third_party_quiet
from u2zoo.zoo.contract import Contract
from u2zoo.zoo.weights import WeightsInfo


@dataclass(frozen=True)
class ModelSource:
    """What a torch-input converter receives: the deploy-mode module and its provenance."""

    model: Any  # torch.nn.Module in deploy + eval mode
    weights: WeightsInfo
    contract: Contract
    arch: str
    num_params: int


class Runner(ABC):
    """Opens an artifact in its real runtime: load in ``__enter__``, free in ``__exit__``.

    ``infer`` takes and returns numpy arrays keyed by tensor name; only the engine call is
    timed, into ``last_latency_s``.
    """

    def __init__(self, artifact: Artifact, threads: int | None = None):
        self.artifact = artifact
        self.threads = threads
        self.last_latency_s = float("nan")

    @property
    def input_name(self) -> str:
        return self.artifact.inputs[0].name

    @property
    def output_name(self) -> str:
        return self.artifact.outputs[0].name

    @property
    def channels_last(self) -> bool:
        """NHWC artifacts (e.g. ``tflite --nhwc``): the contract's layout covers input and output."""
        return self.artifact.contract.pre.layout == "NHWC"

    @property
    def fixed_batch(self) -> int | None:
        """The batch size a static artifact was built for; None when dynamic."""
        dim = self.artifact.inputs[0].shape[0]
        return dim if isinstance(dim, int) and dim > 0 else None

    @property
    def max_batch(self) -> int | None:
        """The largest batch a dynamic artifact takes (a TensorRT profile, an AOTInductor
        package's range); None when unbounded."""
        return None

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(height, width) a static artifact was built for; None when dynamic."""
        shape = self.artifact.inputs[0].shape
        height, width = shape[1:3] if self.channels_last else shape[2:4]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def __enter__(self) -> "Runner":
        self.artifact.verify()  # never run bytes that differ from what the manifest describes
        try:
            with third_party_quiet():  # runtimes announce themselves (XNNPACK, cpuinfo, torchao's loader)
                self.load()
            real_io = self.loaded_io()
        except U2ZooError:
            raise
        except Exception as exc:  # noqa: BLE001 - the runtime's own refusal, as one line
            raise RuntimeLoadError(
                f"{self.artifact.target} runtime could not load {self.artifact.path.name}: {tool_failure(exc)}"
            ) from exc
        if real_io is not None:
            try:
                check_io(self.artifact, *real_io)
            except ArtifactError:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def load(self) -> None:
        """Load/compile the artifact in its runtime."""

    def close(self) -> None:
        """Free the runtime's resources."""

    def loaded_io(self) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
        """The loaded model's own (inputs, outputs), which ``__enter__`` checks against the
        manifest so a mismatch is one line at load, not a runtime traceback mid-run. None: this
        runtime cannot say (the check is skipped); a shape of None: rank unknown."""
        return None

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Convenience: the single NCHW input → the single (fused) NCHW output, whatever the
        artifact's own layout, so every caller compares like with like."""
        if not self.channels_last:
            return self.infer({self.input_name: batch})[self.output_name]
        out = self.infer({self.input_name: np.ascontiguousarray(batch.transpose(0, 2, 3, 1))})[self.output_name]
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class TargetSpec:
    """One row of the capability table."""

    name: str
    source: str  # "torch" or "onnx": what the converter consumes
    precisions: tuple[str, ...]
    dynamic_shapes: bool
    devices: tuple[str, ...]  # where the runtime computes: ("cpu",), ("cuda",) or both
    # platform.system() values the *runtime* runs on; None = any. The converter runs anywhere its
    # modules import: on other hosts the artifact is built and validated, but not run.
    host_os: tuple[str, ...] | None
    extra: str  # pip extra that installs the backend ("" = core dependencies only)
    requires: tuple[str, ...]  # importable modules the converter and runner need
    options_type: type
    convert: Callable[..., Artifact]  # (source, options, out_dir) -> Artifact
    runner: type[Runner]
    description: str = ""
    # source="onnx" targets: the ONNX artifact's options for given target options, and what to
    # leave the user (e.g. a trtexec script) when this host cannot finish the chain
    onnx_options: Callable[[Any], dict[str, Any]] | None = None
    handoff: Callable[[Artifact, Any, Path], str] | None = None
    # int8 targets with a slow last step: a stand-in with the artifact's quantized numerics that
    # runs before that step (a predictor), so the float fallback skips candidates that clearly fail
    screen: Callable[["ModelSource", Any], Any] | None = None
    # precisions this target cannot build here, with why (e.g. its INT8 tools are not on PyPI):
    # the reason is the error of `convert` and the `unavailable` reason of a bench cell
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)

    def precision_unsupported_reason(self, precision: str) -> str | None:
        """Why this target does not build ``precision``; None when it does."""
        if precision in self.precisions:
            return None
        why = self.unsupported.get(precision)
        return f"{self.name} does not support {precision}" + (
            f": {why}" if why else f" (supported: {', '.join(self.precisions)})"
        )

    def missing_modules(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def unavailable_reason(self) -> str | None:
        """Why this target cannot convert *and run* here, or None when it can."""
        missing = self.missing_modules()
        if missing:
            how = f" (pip install 'u2zoo[{self.extra}]')" if self.extra else ""
            return f"{', '.join(missing)} not installed{how}"
        return self.runtime_unavailable_reason()

    @property
    def gpu_only(self) -> bool:
        return self.devices == ("cuda",)

    def runtime_unavailable_reason(self) -> str | None:
        """Why artifacts of this target cannot be *run* on this host (they may still be built)."""
        if self.gpu_only:
            from u2zoo.gpu import cuda_unavailable_reason

            reason = cuda_unavailable_reason()
            if reason:
                return f"{self.name} needs an NVIDIA GPU: {reason}"
        if self.host_os and platform.system() not in self.host_os:
            names = {"Darwin": "macOS", "Linux": "Linux", "Windows": "Windows"}
            wanted = "/".join(names.get(os_, os_) for os_ in self.host_os)
            return f"{self.name} runtime needs {wanted}, this host is {names.get(platform.system(), platform.system())}"
        return None

    def ensure_available(self) -> None:
        missing = self.missing_modules()
        if missing:
            raise BackendUnavailable(f"target {self.name!r} needs {', '.join(missing)}", extra=self.extra)

    def make_options(self, **given: Any) -> Any:
        """Build the typed options; an option this target lacks is an error, never dropped. The
        precision is judged first: its reason is the one that matters (e.g. no INT8 tools)."""
        if "precision" in given and given["precision"] not in self.precisions:
            why = self.unsupported.get(given["precision"])
            raise ConfigError(
                f"target {self.name!r} does not support precision {given['precision']!r} "
                + (f"({why})" if why else f"(supported: {', '.join(self.precisions)})")
            )
        names = {f.name for f in dataclasses.fields(self.options_type)}
        unknown = sorted(k for k in given if k not in names)
        if unknown:
            raise ConfigError(
                f"target {self.name!r} does not support option(s) {', '.join(unknown)} "
                f"(its options: {', '.join(sorted(names))})"
            )
        return self.options_type(**given)


TARGETS: dict[str, TargetSpec] = {}


def register(spec: TargetSpec) -> TargetSpec:
    if spec.name in TARGETS:
        raise RuntimeError(f"target {spec.name!r} registered twice")
    TARGETS[spec.name] = spec
    return spec


def check_int8_options(precision: str, calib: str | None, keep_fp: int, int8_only: dict[str, Any]) -> None:
    """Shared option rules of every target that quantizes: INT8 needs calibration images, and
    INT8-only options given for another precision are an error rather than silently ignored."""
    if precision == "int8" and not calib:
        raise ConfigError("--int8 needs calibration images: --calib DIR (see `u2zoo convert --help`)")
    used = [name for name, value in int8_only.items() if value]
    if precision != "int8" and used:
        raise ConfigError(f"{', '.join(used)} only apply to --int8 (this is {precision})")
    if keep_fp < 0:
        raise ConfigError("--keep-fp must be ≥ 0")


def check_qat_options(qat: bool, epochs: int | None, lr: float | None) -> None:
    """QAT-only options given for another precision are an error, not silently ignored."""
    if not qat and (epochs is not None or lr is not None):
        raise ConfigError("--qat-epochs and --qat-lr only apply to --int8-qat")
    if (epochs is not None and epochs < 1) or (lr is not None and lr <= 0):
        raise ConfigError("QAT needs ≥ 1 epoch and a positive learning rate")


def network_size_for(options: Any, source: ModelSource) -> tuple[int, int]:
    """The (height, width) an artifact is built and judged at: the options' ``height``/``width``
    where set, else the contract's input size."""
    height, width = source.contract.pre.size
    return (getattr(options, "height", None) or height, getattr(options, "width", None) or width)


def contract_at_size(contract: Contract, size: tuple[int, int]) -> Contract:
    """The contract as a static artifact built for ``size`` (height, width) applies it."""
    if tuple(contract.pre.size) == tuple(size):
        return contract
    return dataclasses.replace(contract, pre=dataclasses.replace(contract.pre, size=tuple(size)))


def build_artifact(
    source: ModelSource,
    options: Any,
    *,
    target: str,
    files: list[Path],
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    tools: dict[str, Any],
    size: tuple[int, int],
    started: float,
    parent: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
) -> Artifact:
    """The manifest every converter writes: provenance from ``source``, its own I/O and tools.

    A static input fixes the size the network sees, so the recorded contract says that size
    (``open_artifact`` refuses a manifest where the two disagree)."""
    contract = source.contract
    static = static_size(inputs[0].shape, contract.pre.layout)
    if static:
        contract = contract_at_size(contract, static)
    manifest = new_manifest(
        target=target,
        precision=options.precision,
        files=files,
        parent=parent,
        calibration=calibration,
        weights=source.weights.to_dict(),
        contract=contract,
        inputs=inputs,
        outputs=outputs,
        options=dataclasses.asdict(options) | {"height": size[0], "width": size[1]},
        tools=tools,
        arch=source.arch,
        num_params=source.num_params,
    )
    if quantization:
        manifest["quantization"] = quantization
    manifest["convert_seconds"] = round(time.perf_counter() - started, 2)
    return Artifact(files[0], manifest)
