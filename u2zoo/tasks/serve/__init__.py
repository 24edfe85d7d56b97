"""`u2zoo serve`: an ASGI service (FastAPI on uvicorn, the ``u2zoo[serve]`` extra).

    settings (here)  → requests (what a request must be) → metrics (Prometheus)
                     → app (the routes, the batcher) → http (uvicorn, timeouts) → workers (--workers N)

This module holds only the settings and their defaults, with no third-party import, so that the
CLI can declare the flags and ``u2zoo --help`` runs without the extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from u2zoo.errors import BackendUnavailable, ConfigError
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS

DEFAULT_MAX_BYTES = 20 * 2**20
# All of a request, headers and body, must arrive within this many seconds. 60 s lets a
# --max-bytes (20 MiB) upload through at 3 Mbit/s.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
# A pause longer than this inside a request, or an idle kept-alive (or never used) connection,
# ends it.
DEFAULT_IDLE_TIMEOUT_S = 30.0
# A request whose image does not fit in the pixel budget waits this long for room, then gets 503.
BUDGET_WAIT_S = 10.0
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_WAIT_MS = 5.0


@dataclass(frozen=True)
class ServeSettings:
    """The service's limits and batching; ``check()`` refuses impossible values in one line."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    pixel_budget: int | None = None  # None: two images at max_pixels (none when that is unlimited)
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    budget_wait_s: float = BUDGET_WAIT_S
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    label: str | None = None  # what /health calls the model; None: the artifact's file name
    log_requests: bool = False

    def check(self) -> "ServeSettings":
        if self.max_bytes < 1:
            raise ConfigError(f"--max-bytes must be at least 1, got {self.max_bytes}")
        if self.pixel_budget is not None and self.pixel_budget < 1:
            raise ConfigError(f"--pixel-budget must be at least 1, got {self.pixel_budget}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"--request-timeout must be over 0 seconds, got {self.request_timeout_s}")
        if not self.idle_timeout_s > 0:
            raise ConfigError(f"--idle-timeout must be over 0 seconds, got {self.idle_timeout_s}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not self.max_wait_ms >= 0:
            raise ConfigError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        return self

    @property
    def budget_pixels(self) -> int | None:
        if self.pixel_budget is not None:
            return self.pixel_budget
        return 2 * self.max_pixels if self.max_pixels else None

    @property
    def timeout_message(self) -> str:
        return (
            f"request timeout: headers and body must arrive within {self.request_timeout_s:g} s, "
            f"with no pause over {self.idle_timeout_s:g} s"
        )


SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


def require_serve_extra() -> None:
    """One line naming the extra when a package of the service is missing."""
    import importlib.util

    missing = [package for module, package in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise BackendUnavailable(f"u2zoo serve needs {', '.join(missing)}", "serve")
