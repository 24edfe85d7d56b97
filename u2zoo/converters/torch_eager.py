"""PyTorch eager target: the deploy-mode state dict itself (``.pt``), run by PyTorch on CPU or
CUDA in fp32 or fp16.

It is the baseline every other cell is compared against for speed (parity with itself is a
check of the save/load path only), and the GPU reference on hosts without TensorRT. fp16
keeps float32 I/O: the runner casts the contract's float32 batch to half on the device and
the map back. ``torch-compile`` (:mod:`u2zoo.converters.torch_compile`) reuses this file
format and runner with ``torch.compile``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, atomic_write_bytes, tool_versions
from u2zoo.converters.aoti import DEVICES
from u2zoo.converters.base import ModelSource, Runner, TargetSpec, build_artifact, network_size_for, register
from u2zoo.converters.options import SizeOptions, device_option, dynamic_option, option
from u2zoo.errors import BackendUnavailable, ConfigError, RuntimeLoadError
from u2zoo.gpu import cuda_device_info, cuda_unavailable_reason, timed

INPUT_NAME = "image"
OUTPUT_NAME = "mask"


@dataclass(frozen=True)
class TorchOptions(SizeOptions):
    """precision: fp32 | fp16; eager modules take any batch and size (dynamic); height and
    width are recorded as the size the artifact is checked at."""

    device: str = device_option()
    dynamic: bool = dynamic_option(True)
    compile_mode: str = option(  # torch-compile only
        "default", help="torch.compile mode: default, reduce-overhead or max-autotune"
    )

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r} (choose from: {', '.join(DEVICES)})")
        if self.precision == "fp16" and self.device != "cuda":
            raise ConfigError(
                "fp16 PyTorch cells run on --device cuda (CPU half-precision convolutions are "
                "emulated); use fp32 on CPU"
            )
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune"):
            raise ConfigError(
                f"unknown compile mode {self.compile_mode!r} (choose from: default, reduce-overhead, max-autotune)"
            )
        if not self.dynamic:
            raise ConfigError("PyTorch cells are always dynamic-shape; drop --static")


def save_state_dict(source: ModelSource, options: TorchOptions, out_dir: Path, stem: str, target: str) -> Artifact:
    """The deploy-mode weights (fp32, or fp16 for fp16 cells) as a ``weights_only``-loadable file."""
    import io

    import torch

    if options.device == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise BackendUnavailable(f"{target} --device cuda needs an NVIDIA GPU: {reason}")
    height, width = network_size_for(options, source)
    started = time.perf_counter()
    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in source.model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    final = out_dir / f"{stem}.pt"
    atomic_write_bytes(final, buffer.getvalue())
    inputs = [TensorSpec(INPUT_NAME, ("batch", 3, "height", "width"), "float32")]
    outputs = [TensorSpec(OUTPUT_NAME, ("batch", 1, "height", "width"), "float32")]
    tools = tool_versions("torch") | {"device": options.device}
    if options.device == "cuda":
        tools |= cuda_device_info()
    return build_artifact(
        source,
        options,
        target=target,
        files=[final],
        inputs=inputs,
        outputs=outputs,
        tools=tools,
        size=(height, width),
        started=started,
    )


def convert(source: ModelSource, options: TorchOptions, out_dir: Path, stem: str) -> Artifact:
    if options.compile_mode != "default":
        raise ConfigError("--compile-mode applies to the torch-compile target, not eager torch")
    return save_state_dict(source, options, out_dir, stem, "torch")


class TorchRunner(Runner):
    """Rebuilds the architecture named in the manifest, loads the weights (``weights_only``),
    and runs it; CUDA calls are timed with CUDA events, CPU calls with perf_counter."""

    compile_model = False

    def load(self) -> None:
        import torch

        from u2zoo.zoo.archs import build_arch

        options = self.artifact.manifest.get("options", {})
        self.device = options.get("device", "cpu")
        self.half = self.artifact.precision == "fp16"
        if self.device == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise RuntimeLoadError(
                    f"{self.artifact.target} artifact {self.artifact.path.name} runs on CUDA: {reason}"
                )
        if self.threads:
            torch.set_num_threads(self.threads)
        state = torch.load(self.artifact.path, map_location="cpu", weights_only=True)
        model = build_arch(self.artifact.manifest["model"]["arch"], deploy=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        model = model.to(self.device, torch.float16 if self.half else torch.float32).eval()
        self.model = torch.compile(model, mode=options.get("compile_mode", "default")) if self.compile_model else model

    def close(self) -> None:
        self.model = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(feeds[self.input_name], dtype=np.float32)).to(self.device)
        x = x.half() if self.half else x
        with torch.inference_mode(), timed(self.device) as timer:
            out = self.model(x)
        self.last_latency_s = timer.seconds
        return {self.output_name: out.float().cpu().numpy()}


register(
    TargetSpec(
        name="torch",
        source="torch",
        precisions=("fp32", "fp16"),
        dynamic_shapes=True,
        devices=DEVICES,
        host_os=None,
        extra="",
        requires=("torch",),
        options_type=TorchOptions,
        convert=convert,
        runner=TorchRunner,
        description="PyTorch eager (state dict), CPU or CUDA",
    )
)
