"""`u2zoo serve`: an HTTP service on the standard library. POST an image, get a PNG back.

One model or artifact is loaded at start-up and serves every request. Inference runs under a
lock, because some runtimes (the TFLite interpreter among them) are not thread-safe; reading
the body, decoding the image and encoding the PNG run in each request's own thread.

    GET  /health                      200 JSON: what is loaded, pid, RSS, request counts
    POST /predict[?output=KIND&bg=C]  raw image body or multipart/form-data field ``file``
                                      → 200 image/png (mask, RGBA cut-out or composite)

Every refusal is JSON ``{"error": "<one line>"}`` with its status: 400 bad input, 404 unknown
path, 405 wrong method, 411 no Content-Length (chunked bodies included), 413 body over
``--max-bytes`` (answered from the header alone, without reading the body) or image over
``--max-pixels``, 500 an unexpected failure. No request can stop the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from u2zoo.errors import ConfigError, ImageError, ImageTooLarge, U2ZooError, one_line
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.outputs import KINDS, OutputOptions, parse_colour, render
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS, decode_image

DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_PORT = 8000
# A client that stops sending mid-request frees its thread after this long.
SOCKET_TIMEOUT_S = 30.0
# After refusing a body unread, wait this long for the client to finish sending before the
# connection is closed: closing on unread bytes resets the connection, and many clients then
# report "connection reset" instead of our 413. The bytes are discarded, never stored.
LINGER_S = 1.0
# Printable ASCII except '%': what a header may carry as is (notes are UTF-8 percent-encoded).
_HEADER_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")


class HttpError(Exception):
    """A refused request: its HTTP status, a one-line reason for the JSON body, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def rss_mb() -> float | None:
    """This process's resident memory in MiB (``VmRSS``), or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class SegmentServer(ThreadingHTTPServer):
    """The HTTP server plus what every request shares: the segmenter, its lock, the counts."""

    daemon_threads = True  # a hung client never keeps the process alive
    request_queue_size = 64  # the default backlog of 5 drops connections under a burst

    def __init__(self, address: tuple[str, int], segmenter: Segmenter, options: OutputOptions,
                 max_bytes: int, max_pixels: int | None, label: str, log_requests: bool = False):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.segmenter = segmenter
        self.options = options
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.label = label
        self.log_requests = log_requests
        self.inference_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        super().__init__(address, PredictHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def count(self, status: int) -> None:
        with self._counts_lock:
            self.requests += 1
            self.errors += status >= 400

    def health(self) -> dict[str, Any]:
        artifact = getattr(self.segmenter.predictor, "artifact", None)
        with self._counts_lock:
            requests, errors = self.requests, self.errors
        return {"status": "ok", "target": artifact.target if artifact is not None else "torch",
                "artifact": self.label, "sha256": artifact.sha256 if artifact is not None else None,
                "pid": os.getpid(), "rss_mb": rss_mb(), "requests": requests, "errors": errors}

    def request_options(self, query: str) -> tuple[str, OutputOptions]:
        """The output kind and the options for one request, from ``?output=…&bg=…``."""
        params = parse_qs(query)
        kind = params.get("output", [self.options.kinds[0]])[-1]
        if kind not in KINDS:
            raise HttpError(400, f"unknown output {kind!r} (choose from: {', '.join(KINDS)})")
        changes: dict[str, Any] = {"kinds": (kind,)}
        try:
            if "bg" in params:
                changes.update(background_colour=parse_colour(params["bg"][-1]), background_image=None)
            elif kind == "composite" and self.options.background_colour is None \
                    and self.options.background_image is None:
                raise HttpError(400, "a composite needs a background: add &bg=%23RRGGBB (or start the server "
                                     "with --bg-colour or --bg-image)")
            return kind, dataclasses.replace(self.options, **changes)
        except ConfigError as exc:
            raise HttpError(400, str(exc)) from None

    def predict(self, data: bytes, query: str) -> tuple[bytes, list[str]]:
        """Image bytes → the PNG asked for and render's notes. Only inference holds the lock."""
        kind, options = self.request_options(query)
        try:
            image = decode_image(data, self.max_pixels, "the posted image")
        except ImageError as exc:
            raise HttpError(413 if isinstance(exc, ImageTooLarge) else 400, str(exc)) from None
        with self.inference_lock:
            image = self.segmenter.prepare(image)
            prob = self.segmenter.maps([image])[0]
        rendered = render(image, prob, options)
        buffer = io.BytesIO()
        rendered.images[kind].save(buffer, format="PNG")
        return buffer.getvalue(), rendered.notes


ROUTES = {"/health": "GET", "/predict": "POST"}  # path → its one method


class PredictHandler(BaseHTTPRequestHandler):
    """Routing, the body-size rules and the multipart upload; the work is the server's."""

    server: SegmentServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
    timeout = SOCKET_TIMEOUT_S
    server_version = "u2zoo"

    def handle_one_request(self) -> None:
        self._body_read = False  # fresh per request on a kept-alive connection
        self._replied = False
        super().handle_one_request()

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _handle(self) -> None:
        """Answer one request; every failure becomes a JSON error and the server goes on."""
        try:
            self._route()
        except HttpError as exc:
            self._send_error(exc.status, str(exc), exc.headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stalled
        except U2ZooError as exc:  # e.g. a runtime or backend failure inside the pipeline
            self._send_error(500, str(exc))
        except Exception as exc:  # a bug: logged with its traceback, answered 500
            traceback.print_exc(file=sys.stderr)
            self._send_error(500, f"{type(exc).__name__}: {exc}")

    def _route(self) -> None:
        url = urlsplit(self.path)
        method = ROUTES.get(url.path)
        if method is None:
            raise HttpError(404, f"no such path: {url.path} (POST /predict, GET /health)")
        if self.command != method:
            raise HttpError(405, f"{self.command} {url.path} is not allowed; use {method}", {"Allow": method})
        if url.path == "/health":
            self._reply(200, json.dumps(self.server.health()).encode(), "application/json")
            return
        png, notes = self.server.predict(self._image_bytes(), url.query)
        headers = {"X-U2zoo-Notes": quote(one_line("; ".join(notes)), safe=_HEADER_SAFE)} if notes else {}
        self._reply(200, png, "image/png", headers)

    def _content_length(self) -> int:
        """The body's declared size, refused before a byte of it is read when it is missing
        (411) or over ``--max-bytes`` (413)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HttpError(411, "chunked bodies are not accepted; send a Content-Length")
        text = self.headers.get("Content-Length")
        if text is None:
            raise HttpError(411, "a Content-Length header is required")
        try:
            length = int(text)
        except ValueError:
            length = -1
        if length < 0:
            raise HttpError(400, f"bad Content-Length: {text!r}")
        if length > self.server.max_bytes:
            raise HttpError(413, f"body of {length:,} bytes is over the limit of {self.server.max_bytes:,} "
                                 "(--max-bytes)")
        return length

    def _image_bytes(self) -> bytes:
        """The posted image: the raw body, or the ``file`` field of a multipart form."""
        length = self._content_length()
        if length == 0:
            raise HttpError(400, "empty body: POST the image bytes, or a multipart form with a field 'file'")
        body = self.rfile.read(length)
        self._body_read = True
        if len(body) < length:
            raise HttpError(400, f"body ended after {len(body):,} of {length:,} bytes")
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/form-data"):
            return multipart_file(content_type, body)
        return body  # image/*, application/octet-stream or anything else: the decoder decides

    def handle_expect_100(self) -> bool:
        """Refuse an oversized or unsized upload before the client sends it (curl asks first)."""
        if ROUTES.get(urlsplit(self.path).path) == self.command == "POST":
            try:
                self._content_length()
            except HttpError as exc:
                self._send_error(exc.status, str(exc))
                return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (malformed request line, unknown method …) as JSON too."""
        self._send_error(code, message or HTTPStatus(code).phrase)

    def _send_error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.close_connection = True  # an unread body would be taken for the next request
        if self._replied:  # the headers are out: all we can do is hang up
            return
        body = json.dumps({"error": one_line(message)}).encode()
        self._reply(status, body, "application/json", headers)

    def _reply(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self._replied = True
        self.server.count(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def finish(self) -> None:
        """Close gently when a declared body was left unread (see ``LINGER_S``)."""
        super().finish()
        headers = getattr(self, "headers", None)
        declared = headers is not None and (headers.get("Content-Length", "0").strip() not in ("", "0")
                                            or "Transfer-Encoding" in headers)
        if declared and not self._body_read:
            linger_close(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)


def linger_close(connection: socket.socket) -> None:
    """Send our FIN, then drop what the client still sends for up to ``LINGER_S``."""
    deadline = time.monotonic() + LINGER_S
    try:
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(LINGER_S)
        while time.monotonic() < deadline and connection.recv(65536):
            pass
    except OSError:
        pass


def multipart_file(content_type: str, body: bytes) -> bytes:
    """The ``file`` field of a multipart/form-data body, parsed by the stdlib ``email``
    package (``cgi`` is deprecated)."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    if not message.is_multipart():
        raise HttpError(400, "cannot read the multipart body (is the boundary right?)")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True) or b""
    raise HttpError(400, "the multipart form has no field named 'file'")


def make_server(segmenter: Segmenter, options: OutputOptions | None = None, host: str = "127.0.0.1",
                port: int = 0, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                label: str | None = None, log_requests: bool = False) -> SegmentServer:
    """A bound, not yet running server (call ``serve_forever``); port 0 picks a free port,
    ``server.url`` says which."""
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes must be at least 1, got {max_bytes}")
    if label is None:
        artifact = getattr(segmenter.predictor, "artifact", None)
        label = Path(artifact.path).name if artifact is not None else "model"
    try:
        return SegmentServer((host, port), segmenter, options or OutputOptions(), max_bytes, max_pixels, label,
                             log_requests)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `u2zoo serve`."""
    from u2zoo.tasks.cli_args import add_model_arguments, add_output_arguments

    add_model_arguments(p, batch=False)
    add_output_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"refuse request bodies larger than this, unread (default {DEFAULT_MAX_BYTES:,} = 20 MiB)")
    p.add_argument("--log-requests", action="store_true", help="log every request on stderr")


def cmd_serve(args: argparse.Namespace) -> int:
    """Load once, print the ready line, serve until Ctrl-C (or SIGTERM); exit 0."""
    from u2zoo.tasks.cli_args import open_segmenter, output_options

    options = output_options(args)
    with open_segmenter(args, 1) as segmenter:
        label = Path(args.artifact).name if args.artifact else args.model  # a default model is known only now
        server = make_server(segmenter, options, args.host, args.port, args.max_bytes, args.max_pixels, label,
                             args.log_requests)
        print(f"serving {label} on {server.url} (POST /predict, GET /health)", flush=True)
        previous = signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, systemd: stop as on Ctrl-C
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a foreground server is meant to stop
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.server_close()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

