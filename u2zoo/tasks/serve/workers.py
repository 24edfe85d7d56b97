"""``u2zoo serve --workers N``: N processes serve one port, each with its own model, batcher and
event loop.

The supervisor binds the port first (so port 0 and a busy port are known before anything
loads), starts the workers with the ``spawn`` method (no fork of a process holding runtime
threads), waits until every one has loaded and warmed its model, and then runs until
SIGINT/SIGTERM, which it passes on: each worker stops accepting, finishes its requests in flight
and exits. On Linux each worker listens on its own SO_REUSEPORT socket, so the kernel spreads
connections evenly; elsewhere they share the supervisor's socket. A worker that dies is
replaced. Their Prometheus values meet in one folder, so that any worker's /metrics counts for
all of them.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable

from u2zoo.errors import U2ZooError
from u2zoo.tasks.serve.http import GRACEFUL_SHUTDOWN_S
from u2zoo.tasks.serve.metrics import MULTIPROC_ENV

# A worker is given this long to load its model and answer its warm-up call.
START_TIMEOUT_S = 600.0

# A worker: called in the new process as target(payload, listen, ready_queue), ``listen`` being
# the shared socket or the (host, port) each worker binds with SO_REUSEPORT; it puts
# ("ready", pid, None) once serving, or ("error", pid, one line) when it cannot start.
WorkerTarget = Callable[[Any, Any, Any], None]


class WorkerPool:
    """The supervisor's view of its workers."""

    def __init__(self, target: WorkerTarget, payload: Any, listen: Any, count: int):
        self.target, self.payload, self.listen, self.count = target, payload, listen, count
        self.context = multiprocessing.get_context("spawn")
        self.ready = self.context.Queue()
        self.processes: list[Any] = []
        self.stopping = False

    def spawn(self) -> Any:
        process = self.context.Process(
            target=self.target, args=(self.payload, self.listen, self.ready), name="u2zoo-serve-worker", daemon=False
        )
        process.start()
        self.processes.append(process)
        return process

    def wait_ready(self, expected: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until ``expected`` workers report ready; a worker's start-up error ends it all."""
        deadline = time.monotonic() + timeout_s
        ready = 0
        while ready < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise U2ZooError(f"the workers did not start within {timeout_s:g} s")
            try:
                kind, _pid, message = self.ready.get(timeout=min(remaining, 1.0))
            except Exception:  # noqa: BLE001 - queue.Empty: check the processes are still alive
                dead = [p for p in self.processes if p.exitcode is not None]
                if dead:
                    raise U2ZooError(f"a worker exited while starting (exit code {dead[0].exitcode})") from None
                continue
            if kind == "error":
                raise U2ZooError(message)
            ready += 1

    def replace_dead(self) -> None:
        """Start a new worker for each that died (not while stopping)."""
        for process in list(self.processes):
            if process.exitcode is None or self.stopping:
                continue
            self.processes.remove(process)
            _mark_dead(process.pid)
            print(
                f"u2zoo serve: worker {process.pid} exited with code {process.exitcode}; starting another",
                file=sys.stderr,
                flush=True,
            )
            self.spawn()

    def stop(self, timeout_s: float = GRACEFUL_SHUTDOWN_S + 10) -> None:
        """SIGTERM to every worker (each finishes its requests in flight), then wait; kill
        what is left after ``timeout_s``."""
        self.stopping = True
        for process in self.processes:
            if process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()


def _mark_dead(pid: int | None) -> None:
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def run_workers(
    target: WorkerTarget, payload: Any, listen: Any, count: int, on_ready: Callable[[], None] | None = None
) -> int:
    """Run ``count`` workers on ``listen`` until SIGINT/SIGTERM; 0 after a graceful stop."""
    metrics_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="u2zoo-serve-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned workers
    pool = WorkerPool(target, payload, listen, count)
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    # Ctrl-C, `docker stop`: stop gracefully. Set explicitly, as a background job of a
    # non-interactive shell inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in stop_signals}
    try:
        try:
            for _ in range(count):
                pool.spawn()
            pool.wait_ready(count)
            if on_ready is not None:
                on_ready()
            while True:
                time.sleep(0.5)
                pool.replace_dead()
        except _Stop:
            pass
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the graceful stop
            pool.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_dir is not None:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


class _Stop(BaseException):
    """SIGINT/SIGTERM reached the supervisor."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop
