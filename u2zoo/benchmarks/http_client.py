"""The load tests' HTTP client: a POST to /predict and a GET of /health, with the standard
library only (no client library between the measurement and the server)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

TIMEOUT_S = 60.0


def health(url: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """The server's /health JSON."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
        return json.loads(response.read())


def post(
    url: str, body: bytes, content_type: str = "image/png", timeout: float = TIMEOUT_S
) -> tuple[float, str | None]:
    """POST ``body`` to /predict: (seconds taken, None) on a 200, else (seconds, why it failed)."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/predict", data=body, method="POST", headers={"Content-Type": content_type}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            error = None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        error = f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return time.perf_counter() - started, error
