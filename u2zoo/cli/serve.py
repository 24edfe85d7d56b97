"""``u2zoo serve``: its flags; load once, serve until Ctrl-C or SIGTERM (``u2zoo.tasks.serve``)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from u2zoo.tasks.serve import (
    BUDGET_WAIT_S,
    DEFAULT_MAX_BYTES,
    DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT_S,
    make_server,
)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `u2zoo serve`."""
    from u2zoo.cli.task_args import add_model_arguments, add_output_arguments

    add_model_arguments(p, batch=False)
    add_output_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"refuse request bodies larger than this, unread (default {DEFAULT_MAX_BYTES:,} = 20 MiB)",
    )
    p.add_argument(
        "--pixel-budget",
        type=int,
        help="most image pixels in work at once, all requests together (~27 bytes each); a request "
        f"that does not fit waits up to {BUDGET_WAIT_S:g} s, then gets 503 "
        "(default 2 × --max-pixels)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds a request's headers and body may take to arrive, all together; then 408 "
        f"(default {DEFAULT_REQUEST_TIMEOUT_S:g})",
    )
    p.add_argument("--log-requests", action="store_true", help="log every request on stderr")


def cmd_serve(args: argparse.Namespace) -> int:
    """Load once, print the ready line, serve until Ctrl-C (or SIGTERM); exit 0."""
    from u2zoo.cli.task_args import open_segmenter, output_options

    options = output_options(args)
    with open_segmenter(args, 1) as segmenter:
        label = Path(args.artifact).name if args.artifact else args.model  # a default model is known only now
        server = make_server(
            segmenter,
            options,
            args.host,
            args.port,
            args.max_bytes,
            args.max_pixels,
            label,
            args.log_requests,
            args.pixel_budget,
            args.request_timeout,
        )
        print(f"serving {label} on {server.url} (POST /predict, GET /health)", flush=True)
        # `docker stop`, systemd: SIGTERM stops as Ctrl-C does. SIGINT is set explicitly too: a
        # process started from a non-interactive shell's background job inherits it ignored.
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a foreground server is meant to stop
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.server_close()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
