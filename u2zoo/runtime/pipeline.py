"""Batches through any predictor (torch reference or an artifact's runner).

Shared by ``convert`` (parity on real photos), ``bench``, ``time`` and the task pipelines
(``u2zoo.tasks``): one place applies the contract, so every runtime sees exactly the same
preprocessed tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from u2zoo.zoo.contract import Contract, preprocess
from u2zoo.zoo.images import load_rgb


class Predictor(Protocol):
    fixed_batch: int | None
    fixed_size: tuple[int, int] | None
    last_latency_s: float

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


def run_batched(predictor: Predictor, inputs: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Run (N, 3, H, W) through ``predictor``, honouring a static batch size by padding and a
    dynamic one's upper bound (``max_batch``: a TensorRT profile, an AOTInductor package).

    ``chunk`` caps a dynamic predictor's calls, for callers holding a whole data set (a
    U2NETP forward pass needs about 0.5 GB of activations per 320×320 image)."""
    limit = min(x for x in (getattr(predictor, "max_batch", None), chunk, len(inputs)) if x)
    step = predictor.fixed_batch or limit
    outputs = []
    for start in range(0, len(inputs), step):
        chunk = inputs[start : start + step]
        pad = step - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outputs.append(predictor.predict(chunk)[: step - pad])
    return np.concatenate(outputs)


def network_size(predictor: Predictor, contract: Contract) -> tuple[int, int]:
    return predictor.fixed_size or contract.pre.size


def preprocess_files(paths: list[Path], contract: Contract, size: tuple[int, int]) -> np.ndarray:
    """Read and preprocess a list of images into one (N, 3, H, W) float32 batch."""
    return np.stack([preprocess(load_rgb(p), contract.pre, size) for p in paths])
