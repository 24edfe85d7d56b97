"""Latency of a predictor's engine call: warm-up, N timed runs, median and p90.

Only the engine call is timed (each runner records ``last_latency_s`` around it); pre- and
post-processing are excluded. Threads are fixed by the caller and recorded with the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    runs: int
    warmup: int
    batch: int
    threads: int | None
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float

    @property
    def fps(self) -> float:
        return 1000.0 * self.batch / self.p50_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fps": self.fps}


def measure_latency(
    predictor, batch: np.ndarray, runs: int = 20, warmup: int = 3, threads: int | None = None
) -> Latency:
    """Time ``predictor.predict(batch)`` ``runs`` times after ``warmup`` untimed calls."""
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be ≥ 1 and warmup ≥ 0")
    for _ in range(warmup):
        predictor.predict(batch)
    samples = []
    for _ in range(runs):
        predictor.predict(batch)
        samples.append(predictor.last_latency_s * 1000.0)
    values = np.asarray(samples)
    return Latency(
        runs,
        warmup,
        int(batch.shape[0]),
        threads,
        float(np.median(values)),
        float(np.percentile(values, 90)),
        float(values.mean()),
        float(values.min()),
    )


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ≥ 4.0) so the next reading is per cell."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since the last reset (VmHWM), in MB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # never reset: process-wide
