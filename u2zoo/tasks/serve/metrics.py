"""Prometheus metrics of `u2zoo serve` (``GET /metrics``, text format, via prometheus-client).

One registry per service, so two services in one process (tests) count apart. With
``--workers N`` every worker writes its values to ``PROMETHEUS_MULTIPROC_DIR`` (set by the
supervisor before the workers start) and any worker's /metrics answers for all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    """Requests (by path and status), errors, latency, engine batch sizes and queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.requests = Counter("u2zoo_requests", "HTTP requests answered", ("path", "status"), registry=self.registry)
        self.errors = Counter(
            "u2zoo_request_errors", "HTTP requests answered with a 4xx or 5xx", ("status",), registry=self.registry
        )
        self.latency = Histogram(
            "u2zoo_request_seconds",
            "Time from the request's headers to its answer's first byte",
            ("path",),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "u2zoo_batch_size", "Images per engine call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge(
            "u2zoo_queue_depth",
            "Images waiting for the engine",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        """One answered request. Unknown paths count under one label, so that a scanner cannot
        grow the metrics without bound."""
        label = path if path in KNOWN_PATHS else "other"
        self.requests.labels(label, str(status)).inc()
        if status >= 400:
            self.errors.labels(str(status)).inc()
        self.latency.labels(label).observe(seconds)

    def exposition(self) -> bytes:
        """The text format: this worker's registry, or every worker's values with --workers."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


KNOWN_PATHS = ("/predict", "/health", "/ready", "/metrics", "/docs", "/openapi.json")
