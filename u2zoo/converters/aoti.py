"""AOTInductor target: ``torch.export`` → ``aoti_compile_and_package`` → one ``.pt2`` package
(generated C++/CUDA kernels compiled to a shared library, plus the weights), loaded back with
``torch._inductor.aoti_load_package``.

It compiles for CPU with the system C++ compiler (g++ here) or for CUDA with Triton, so the
same file is a CPU cell of the matrix (compared with OpenVINO) and a GPU cell. A package is
machine code for one torch version, one CPU architecture or one GPU generation: the manifest
records them and the runner refuses a package built for something else, with the reason.
fp16 is offered on CUDA only (CPU half-precision convolutions are emulated and slow); the
package then casts its float32 input to half and its output back, so the contract's float32
tensors stay the I/O of every precision.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, tool_versions
from u2zoo.converters.base import ModelSource, Runner, TargetSpec, build_artifact, network_size_for, register
from u2zoo.converters.options import ShapeOptions, device_option, max_batch_option
from u2zoo.errors import BackendUnavailable, ConfigError, ConversionError, RuntimeLoadError, tool_failure
from u2zoo.gpu import cuda_device_info, cuda_unavailable_reason, timed

INPUT_NAME = "image"
OUTPUT_NAME = "mask"
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class AotiOptions(ShapeOptions):
    """precision: fp32 | fp16 (cuda only); dynamic: batch 1..max_batch (height and width stay
    fixed); device: where the package's kernels run."""

    device: str = device_option()
    max_batch: int = max_batch_option()

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r} for aoti (choose from: {', '.join(DEVICES)})")
        if self.precision == "fp16" and self.device != "cuda":
            raise ConfigError(
                "aoti fp16 packages are for --device cuda (CPU half-precision convolutions are "
                "emulated); use fp32 on CPU"
            )
        if (
            self.batch < 1
            or self.max_batch < 1
            or (self.height is not None and self.height < 1)
            or (self.width is not None and self.width < 1)
        ):
            raise ConfigError("batch, max batch, height and width must be positive")
        if self.dynamic and self.max_batch < 2:
            raise ConfigError("a dynamic-batch aoti package needs --max-batch ≥ 2")


def _compiler() -> str | None:
    """First line of the C++ compiler's --version (AOTInductor CPU packages are built with it)."""
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            try:
                result = subprocess.run([name, "--version"], capture_output=True, text=True, timeout=10, check=True)
                return result.stdout.splitlines()[0].strip()
            except (OSError, subprocess.SubprocessError, IndexError):
                continue
    return None


def _half_inside(model):
    """The model in float16 behind float32 I/O, so every precision keeps the contract's tensors."""
    import torch

    class HalfInside(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.half()

        def forward(self, x):
            return self.inner(x.half()).float()

    return HalfInside(model)


def convert(source: ModelSource, options: AotiOptions, out_dir: Path, stem: str) -> Artifact:
    """Export with torch.export, compile and package with AOTInductor."""
    import copy

    import torch

    height, width = network_size_for(options, source)
    if options.device == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise BackendUnavailable(f"aoti --device cuda needs an NVIDIA GPU: {reason}")
    elif _compiler() is None:
        raise BackendUnavailable("aoti on CPU needs a C++ compiler (g++ or clang++) on PATH")
    model = copy.deepcopy(source.model).eval().to(options.device)
    if options.precision == "fp16":
        model = _half_inside(model)
    batch = 2 if options.dynamic else options.batch  # batch 1 would be specialised by export
    example = torch.zeros(batch, 3, height, width, device=options.device)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=options.max_batch)}} if options.dynamic else None
    final = out_dir / f"{stem}.pt2"  # out_dir is convert's private staging folder: no half-written file escapes
    started = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, (example,), dynamic_shapes=_named_shapes(model, shapes))
            torch._inductor.aoti_compile_and_package(exported, package_path=str(final))
    except Exception as exc:  # noqa: BLE001 - export's or inductor's own failure, as one line
        raise ConversionError(f"AOTInductor compilation failed: {tool_failure(exc)}") from exc
    dim: int | str = "batch" if options.dynamic else options.batch
    inputs = [TensorSpec(INPUT_NAME, (dim, 3, height, width), "float32")]
    outputs = [TensorSpec(OUTPUT_NAME, (dim, 1, height, width), "float32")]
    tools = tool_versions("torch") | {"device": options.device}
    if options.device == "cuda":
        tools |= cuda_device_info()
    else:
        tools |= {"compiler": _compiler(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    artifact = build_artifact(
        source,
        options,
        target="aoti",
        files=[final],
        inputs=inputs,
        outputs=outputs,
        tools=tools,
        size=(height, width),
        started=started,
    )
    artifact.manifest["aoti"] = {
        "compute": "float16 inside, float32 I/O" if options.precision == "fp16" else "float32",
        "max_batch": options.max_batch if options.dynamic else None,
    }
    return artifact


def _named_shapes(model, shapes):
    """torch.export wants dynamic shapes keyed by the forward's argument name."""
    if shapes is None:
        return None
    import inspect

    name = next(iter(inspect.signature(model.forward).parameters))
    return {name: shapes["x"]}


def package_mismatch(manifest: dict[str, Any]) -> str | None:
    """Why a package cannot run in this process (other torch, CPU ISA or GPU), or None."""
    import torch

    tools = manifest.get("tools", {})
    built_with = tools.get("torch")
    if built_with and built_with != torch.__version__:
        return f"the package was compiled with torch {built_with}; this is torch {torch.__version__}: rebuild it here"
    if tools.get("device") == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            return f"the package holds CUDA kernels: {reason}"
        here = cuda_device_info()["compute_capability"]
        if tools.get("compute_capability") and tools["compute_capability"] != here:
            return (
                f"the package was built for compute capability {tools['compute_capability']} "
                f"({tools.get('gpu')}); this GPU is {here}: rebuild it here"
            )
    return None


class AotiRunner(Runner):
    """Loads the package with ``aoti_load_package``; CUDA calls are timed with CUDA events."""

    def load(self) -> None:
        import torch

        reason = package_mismatch(self.artifact.manifest)
        if reason:
            raise RuntimeLoadError(f"aoti package {self.artifact.path.name} cannot run here: {reason}")
        if self.threads:
            torch.set_num_threads(self.threads)
        self.device = self.artifact.manifest["tools"].get("device", "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = torch._inductor.aoti_load_package(str(self.artifact.path))

    def close(self) -> None:
        self.model = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        batch = feeds[self.input_name]
        self._check_batch(batch.shape[0])
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), timed(self.device) as timer:
            out = self.model(x)
        self.last_latency_s = timer.seconds
        out = out[0] if isinstance(out, (list, tuple)) else out
        return {self.output_name: out.float().cpu().numpy()}

    @property
    def max_batch(self) -> int | None:
        return (self.artifact.manifest.get("aoti") or {}).get("max_batch")

    def _check_batch(self, batch: int) -> None:
        limit = self.max_batch
        fixed = self.fixed_batch
        if fixed is not None and batch != fixed:
            raise ConfigError(f"this aoti package was built for batch {fixed}, not {batch} (rebuild with --dynamic)")
        if limit is not None and not 1 <= batch <= limit:
            raise ConfigError(f"batch {batch} is outside this package's range 1..{limit} (rebuild with --max-batch)")


register(
    TargetSpec(
        name="aoti",
        source="torch",
        precisions=("fp32", "fp16"),
        dynamic_shapes=True,
        devices=DEVICES,
        host_os=None,
        extra="",
        requires=("torch",),
        options_type=AotiOptions,
        convert=convert,
        runner=AotiRunner,
        description="AOTInductor .pt2 package (CPU via the C++ compiler, or CUDA)",
    )
)
