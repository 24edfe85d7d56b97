"""Server designs compared in one run: the same artifact and image, each design's server started
alone (``u2zoo serve --port 0 <flags>``), warmed up, then loaded at each client count, then
stopped, so that designs never share the CPU. A design may also be a server already running
(``NAME=http://…``: e.g. an older release), loaded the same way.

Load is closed-loop: C clients each send their requests back to back (a client sends its next
request when its last is answered), ``requests`` in all per level. Throughput is answered
requests per second of the level's wall time; p50/p99 are client-side latencies.
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from u2zoo.benchmarks.http_client import health, post

START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Design:
    name: str
    flags: tuple[str, ...] = ()
    url: str | None = None  # a server already running: not started or stopped here

    @classmethod
    def parse(cls, text: str) -> "Design":
        """``NAME=FLAGS`` (flags of ``u2zoo serve``) or ``NAME=http://host:port``."""
        name, sep, rest = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"a design is NAME=FLAGS or NAME=URL, got {text!r}")
        rest = rest.strip()
        if rest.startswith(("http://", "https://")):
            return cls(name.strip(), url=rest.rstrip("/"))
        return cls(name.strip(), tuple(shlex.split(rest)))


def closed_loop(url: str, body: bytes, clients: int, requests: int, content_type: str) -> dict[str, Any]:
    """``clients`` threads share ``requests`` requests, each sending its next when its last is
    answered. Returns the level's latency percentiles, throughput and errors."""
    counter = iter(range(requests))
    lock = threading.Lock()
    results: list[tuple[float, str | None]] = []

    def client() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            results.append(post(url, body, content_type))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    ms = np.array([s for s, _ in results]) * 1000
    errors = [e for _, e in results if e is not None]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests_per_s": (len(results) - len(errors)) / wall,
        "wall_s": wall,
    }


@contextmanager
def started_server(artifact: str, flags: tuple[str, ...]) -> Iterator[str]:
    """``u2zoo serve`` with ``flags`` on a free port; yields its URL, then stops it (SIGTERM)."""
    command = [sys.executable, "-m", "u2zoo", "-q", "serve", "--artifact", artifact, "--port", "0", *flags]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("serving "):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {START_TIMEOUT_S:g} s: {' '.join(command)}")
        else:
            raise RuntimeError(f"the server exited before serving: {' '.join(command)} (exit code {proc.wait()})")
        yield line.split(" on ")[1].split()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_design(
    design: Design, artifact: str, body: bytes, clients: list[int], requests: int, content_type: str, warmup: int
) -> list[dict[str, Any]]:
    """Every client level against one design's server."""

    def measure(url: str) -> list[dict[str, Any]]:
        closed_loop(url, body, max(clients), warmup, content_type)  # unmeasured: arenas, threads, caches
        rows = []
        for count in clients:
            row = closed_loop(url, body, count, max(requests, count), content_type)
            row.update(design=design.name, rss_mb=health(url).get("rss_mb"))
            rows.append(row)
        return rows

    if design.url is not None:
        return measure(design.url)
    with started_server(artifact, design.flags) as url:
        return measure(url)


def format_comparison(rows: list[dict[str, Any]], baseline: str | None) -> str:
    """One line per design and client count; ratios against ``baseline`` at the same count."""
    base = {r["clients"]: r for r in rows if r["design"] == baseline}
    lines = [
        f"{'design':<12} {'clients':>7} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} "
        f"{'× req/s':>8} {'× p99':>6}"
    ]
    for r in rows:
        ref = base.get(r["clients"])
        ratio = f"{r['requests_per_s'] / ref['requests_per_s']:>8.2f}" if ref else f"{'':>8}"
        p99 = f"{r['p99_ms'] / ref['p99_ms']:>6.2f}" if ref else f"{'':>6}"
        lines.append(
            f"{r['design']:<12} {r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['p50_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['requests_per_s']:>7.2f} {ratio} {p99}"
        )
    return "\n".join(lines)


def machine() -> str:
    """The CPU model and core count, for the table's caption."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical CPU(s)"
