"""Compare an artifact's outputs with the PyTorch reference on the same inputs.

``compare`` returns a truthy/falsy :class:`Parity` that carries the measured errors, so a
report shows the tolerance actually needed, not only pass/fail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Limits a parity check enforces; None = not checked."""

    max_abs: float | None = None
    mean_abs: float | None = None
    iou50_min: float | None = None

    def describe(self) -> str:
        parts = [
            f"max abs ≤ {self.max_abs:g}" if self.max_abs is not None else "",
            f"mean abs ≤ {self.mean_abs:g}" if self.mean_abs is not None else "",
            f"IoU@0.5 ≥ {self.iou50_min:g}" if self.iou50_min is not None else "",
        ]
        return ", ".join(p for p in parts if p) or "none"


def iou_at(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of the two maps binarised at ``threshold`` (1.0 when both empty)."""
    ref, cand = reference > threshold, candidate > threshold
    union = np.logical_or(ref, cand).sum()
    return 1.0 if union == 0 else float(np.logical_and(ref, cand).sum() / union)


@dataclass
class Parity:
    max_abs: float
    mean_abs: float
    iou50: float
    num_images: int
    shape: tuple[int, ...]
    tolerance: Tolerance
    failures: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        verdict = "ok" if self else "FAILED: " + "; ".join(self.failures)
        return (
            f"parity vs torch on {self.num_images} image(s) {list(self.shape[-2:])}: max abs {self.max_abs:.3g}, "
            f"mean abs {self.mean_abs:.3g}, IoU@0.5 {self.iou50:.4f} — {verdict} "
            f"(tolerance: {self.tolerance.describe()})"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["passed"] = bool(self)
        return data


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance = Tolerance()) -> Parity:
    """Errors of ``candidate`` against ``reference`` (same shape, maps in [0, 1])."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        return Parity(
            float("inf"),
            float("inf"),
            0.0,
            reference.shape[0] if reference.ndim else 1,
            tuple(candidate.shape),
            tolerance,
            [f"output shape {candidate.shape} differs from reference {reference.shape}"],
        )
    diff = np.abs(reference - candidate)
    finite = bool(np.isfinite(candidate).all())
    parity = Parity(
        max_abs=float(diff.max()) if finite else float("inf"),
        mean_abs=float(diff.mean()) if finite else float("inf"),
        iou50=float(np.mean([iou_at(r, c) for r, c in zip(reference, candidate)])),
        num_images=int(reference.shape[0]),
        shape=tuple(reference.shape),
        tolerance=tolerance,
    )
    if not finite:
        parity.failures.append("output has NaN or Inf")
    if tolerance.max_abs is not None and parity.max_abs > tolerance.max_abs:
        parity.failures.append(f"max abs {parity.max_abs:.3g} > {tolerance.max_abs:g}")
    if tolerance.mean_abs is not None and parity.mean_abs > tolerance.mean_abs:
        parity.failures.append(f"mean abs {parity.mean_abs:.3g} > {tolerance.mean_abs:g}")
    if tolerance.iou50_min is not None and parity.iou50 < tolerance.iou50_min:
        parity.failures.append(f"IoU@0.5 {parity.iou50:.4f} < {tolerance.iou50_min:g}")
    return parity
