"""``u2zoo serve``: its flags; load once per worker, serve until Ctrl-C or SIGTERM
(``u2zoo.tasks.serve``)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from u2zoo.errors import ConfigError, U2ZooError, one_line
from u2zoo.tasks.serve import (
    BUDGET_WAIT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_REQUEST_TIMEOUT_S,
    ServeSettings,
)

DEFAULT_PORT = 8000
# --max-batch auto: the memory-based choice of --batch auto, within the range where batching
# still pays on an accelerator.
AUTO_MAX_BATCH_CAP = 16


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `u2zoo serve`."""
    from u2zoo.cli.task_args import add_model_arguments, add_output_arguments

    add_model_arguments(p, batch=False)
    add_output_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the port, each with its own model (default 1); with N > 1 and no --threads, "
        "each runtime gets cores / N intra-op threads",
    )
    p.add_argument(
        "--max-batch",
        default=str(DEFAULT_MAX_BATCH),
        help="most concurrent requests joined in one engine call: N, or auto (free GPU/host memory, "
        f"at most {AUTO_MAX_BATCH_CAP}; a static-batch artifact's own batch) (default {DEFAULT_MAX_BATCH}; "
        "1: no batching)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        help=f"how long a batch waits for more requests once its first is in (default {DEFAULT_MAX_WAIT_MS:g} ms)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"refuse request bodies larger than this, unread (default {DEFAULT_MAX_BYTES:,} = 20 MiB)",
    )
    p.add_argument(
        "--pixel-budget",
        type=int,
        help="most image pixels in work at once per worker (~27 bytes each); a request that does not fit "
        f"waits up to {BUDGET_WAIT_S:g} s, then gets 503 (default 2 × --max-pixels)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds a request's headers, and then its body, may take to arrive; then 408 "
        f"(default {DEFAULT_REQUEST_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help="seconds an idle connection is kept open, and the longest pause inside a request "
        f"(default {DEFAULT_IDLE_TIMEOUT_S:g})",
    )
    p.add_argument("--log-requests", action="store_true", help="log every request on stderr")


def serve_settings(args: argparse.Namespace, label: str, max_batch: int) -> ServeSettings:
    return ServeSettings(
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        pixel_budget=args.pixel_budget,
        request_timeout_s=args.request_timeout,
        idle_timeout_s=args.idle_timeout,
        max_batch=max_batch,
        max_wait_ms=args.max_wait_ms,
        label=label,
        log_requests=args.log_requests,
    ).check()


def check_serve_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible flags before anything loads (one line each)."""
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if str(args.max_batch).strip().lower() != "auto":
        try:
            args.max_batch = int(args.max_batch)
        except ValueError:
            raise ConfigError(f"--max-batch takes a number or auto, got {args.max_batch!r}") from None
    serve_settings(args, "model", 1 if args.max_batch == "auto" else args.max_batch)  # the other limits


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the flags, bind the port, then serve in this process (--workers 1) or in N worker
    processes; print one ready line once every worker has warmed its model; exit 0 on Ctrl-C or
    SIGTERM after the requests in flight are answered."""
    from u2zoo.tasks.serve import require_serve_extra

    require_serve_extra()
    check_serve_arguments(args)
    from u2zoo.tasks.serve.http import balanced_sockets_supported, bind_socket, socket_url

    if args.workers > 1 and args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    balanced = args.workers > 1 and balanced_sockets_supported()
    # --workers on Linux: this socket only holds the port; each worker listens on its own
    sock = bind_socket(args.host, args.port, reuse_port=balanced, listen=not balanced)
    url = socket_url(sock)
    label = Path(args.artifact).name if args.artifact else args.model

    def announce(name: str, detail: str) -> None:
        print(f"serving {name} on {url} ({detail}; POST /predict, GET /health)", flush=True)

    # `docker stop`, systemd: SIGTERM stops as Ctrl-C does. SIGINT is set explicitly too: a
    # process started from a non-interactive shell's background job inherits it ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.workers == 1:
            _serve_here(args, sock, label, announce)
        else:
            from u2zoo.tasks.serve.workers import run_workers

            threads = f", {args.threads} thread(s) each"
            run_workers(
                serve_worker,
                args,
                sock.getsockname()[:2] if balanced else sock,
                args.workers,
                lambda: announce(label or "the default model", f"{args.workers} workers{threads}"),
            )
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a foreground server is meant to stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 0


def _serve_here(args: argparse.Namespace, sock: Any, label: str | None, announce: Any) -> None:
    """One worker in this process: load, serve until a signal (uvicorn finishes the requests in
    flight, then re-raises the signal, which ends here as KeyboardInterrupt)."""
    with _service(args, label) as (service, app):
        from u2zoo.tasks.serve.http import make_server

        def started() -> None:  # the batcher exists now: say the batch it really runs
            announce(service.label, f"max batch {service.batcher.max_batch}")

        server = make_server(app, service.settings, started)
        server.run(sockets=[sock])


def serve_worker(args: argparse.Namespace, listen: Any, ready: Any) -> None:
    """A ``--workers`` process: load the model, serve ``listen`` (the shared socket, or the
    (host, port) to bind its own), report ready (or why not)."""
    from u2zoo.tasks.serve.http import bind_socket, make_server

    for sig in (signal.SIGTERM, signal.SIGINT):  # after the graceful stop, exit 0 (not killed by the signal)
        signal.signal(sig, _interrupt)
    try:
        with _service(args, None) as (service, app):

            def started() -> None:
                ready.put(("ready", os.getpid(), None))

            sock = listen if isinstance(listen, socket.socket) else bind_socket(*listen, reuse_port=True)
            make_server(app, service.settings, started).run(sockets=[sock])
    except U2ZooError as exc:
        ready.put(("error", os.getpid(), one_line(str(exc))))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - a bug: the supervisor prints the line, the worker its traceback
        import traceback

        traceback.print_exc(file=sys.stderr)
        ready.put(("error", os.getpid(), f"{type(exc).__name__}: {one_line(str(exc))}"))


@contextmanager
def _service(args: argparse.Namespace, label: str | None) -> Iterator[tuple[Any, Any]]:
    """Load the segmenter, resolve --max-batch, build the app; close the runtime at the end."""
    from u2zoo.cli.task_args import open_segmenter, output_options
    from u2zoo.tasks.serve.app import Service, create_app

    options = output_options(args)
    with open_segmenter(args, 1) as segmenter:
        # a default model's name is known only once it is open
        label = label or (Path(args.artifact).name if args.artifact else args.model) or "model"
        service = Service(segmenter, options, serve_settings(args, label, _max_batch(args, segmenter)))
        yield service, create_app(service)


def _max_batch(args: argparse.Namespace, segmenter: Any) -> int:
    """``--max-batch``: a number, or auto (the --batch auto choice, capped; printed)."""
    if args.max_batch != "auto":
        return int(args.max_batch)
    from u2zoo.cli.task_args import _model_arch
    from u2zoo.tasks.engine import auto_batch_size

    predictor = segmenter.predictor
    manifest = getattr(getattr(predictor, "artifact", None), "manifest", None)
    device = "cuda" if getattr(predictor, "device", "cpu") == "cuda" else "cpu"
    choice = auto_batch_size(predictor, segmenter.contract, _model_arch(args, manifest), device)
    size = min(choice.batch_size, AUTO_MAX_BATCH_CAP)
    print(f"--max-batch auto: {size} ({choice.describe()}, capped at {AUTO_MAX_BATCH_CAP})", file=sys.stderr)
    return size


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
