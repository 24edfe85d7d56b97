"""The PyTorch reference predictor and the sample photos every machine has.

The reference runs the deploy-mode module with the same numpy-in/numpy-out ``predict`` as
the artifact runners, so parity checks and ``u2zoo predict --model`` share one code path.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

# Real colour photos bundled inside scikit-image's wheel (no download): the embedded default
# inputs for the demo and for conversion parity checks.
SAMPLE_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def sample_images() -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        from u2zoo.errors import BackendUnavailable

        raise BackendUnavailable("sample photos come from scikit-image, which is not installed")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [data_dir / name for name in SAMPLE_FILES]


class TorchPredictor:
    """Runs a U²-Net module (deploy mode) on numpy batches; only the forward pass is timed."""

    def __init__(self, model, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.model.deploy = True
        self.last_latency_s = float("nan")
        self.fixed_batch: int | None = None
        self.fixed_size: tuple[int, int] | None = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            started = time.perf_counter()
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
            self.last_latency_s = time.perf_counter() - started
        return out.numpy()
