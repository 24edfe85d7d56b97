"""CUDA facts and timing shared by the GPU targets (torch, torch-compile, aoti, tensorrt).

GPU artifacts are machine code for one GPU generation: converters record
:func:`cuda_device_info` in the manifest and runners compare it with the GPU they find.
Engine calls are timed with CUDA events, so the figure is the GPU's time, not the host's.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator


def cuda_unavailable_reason() -> str | None:
    """Why CUDA kernels cannot be built or run here, or None."""
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        return f"no CUDA device visible ({build})"
    return None


def cuda_device_info(index: int = 0) -> dict[str, Any]:
    """Name, compute capability and CUDA version of the GPU an artifact is built on."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return {
        "gpu": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
        "cuda": torch.version.cuda,
    }


class Timer:
    """Holds the seconds of the last timed block."""

    seconds: float = float("nan")


@contextmanager
def timed(device: str, stream: Any = None) -> Iterator[Timer]:
    """Time the block: CUDA events on ``stream`` (default: the current one) for ``cuda``,
    ``perf_counter`` otherwise. The block's GPU work is complete when it exits."""
    timer = Timer()
    if device == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield timer
        end.record(stream)
        end.synchronize()
        timer.seconds = start.elapsed_time(end) / 1000.0
    else:
        started = time.perf_counter()
        yield timer
        timer.seconds = time.perf_counter() - started
