import numpy as np
import pytest

from u2zoo.runtime.compare import Tolerance, compare, iou_at
from u2zoo.runtime.timing import measure_latency


class ScriptedPredictor:
    """Reports pre-set engine latencies, to check the statistics exactly."""

    def __init__(self, latencies_s):
        self.latencies = iter(latencies_s)
        self.calls = 0
        self.last_latency_s = float("nan")

    def predict(self, batch):
        self.calls += 1
        self.last_latency_s = next(self.latencies)
        return batch


def test_latency_statistics_skip_warmup_and_use_the_median():
    predictor = ScriptedPredictor([9.0, 9.0] + [0.010, 0.030, 0.020, 0.040, 0.050])
    result = measure_latency(predictor, np.zeros((2, 3, 4, 4), np.float32), runs=5, warmup=2, threads=1)
    assert predictor.calls == 7
    assert result.p50_ms == pytest.approx(30.0) and result.min_ms == pytest.approx(10.0)
    assert result.mean_ms == pytest.approx(30.0) and result.p90_ms == pytest.approx(46.0)
    assert result.fps == pytest.approx(2 * 1000 / 30.0)


def test_compare_reports_errors_and_iou():
    ref = np.zeros((2, 1, 4, 4))
    ref[:, :, :2] = 1.0
    cand = ref.copy()
    cand[0, 0, 0, 0] = 0.25  # one pixel flips below 0.5
    parity = compare(ref, cand, Tolerance(max_abs=0.8, iou50_min=0.9))
    assert parity and parity.max_abs == pytest.approx(0.75) and parity.mean_abs == pytest.approx(0.75 / 32)
    assert parity.iou50 == pytest.approx((7 / 8 + 1) / 2)
    strict = compare(ref, cand, Tolerance(max_abs=0.1))
    assert not strict and strict.failures == ["max abs 0.75 > 0.1"]
    assert not compare(ref, cand[:, :, :3])  # shape mismatch is a failure, not a crash
    assert not compare(ref, np.full_like(ref, np.nan))
    assert iou_at(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
