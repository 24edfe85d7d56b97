"""`u2zoo serve`: an HTTP service on the standard library. POST an image, get a PNG back.

One model or artifact is loaded at start-up and serves every request. Inference runs under a
lock, because some runtimes (the TFLite interpreter among them) are not thread-safe; reading
the body, decoding the image and encoding the PNG run in each request's own thread, within a
server-wide pixel budget (``--pixel-budget``) that bounds the memory of all of them together.

    GET  /health                      200 JSON: what is loaded, pid, RSS, request counts
    POST /predict[?output=KIND&bg=C]  raw image body or multipart/form-data field ``file``
                                      → 200 image/png (mask, RGBA cut-out or composite)

Every refusal is JSON ``{"error": "<one line>"}`` with its status: 400 bad input (an unknown
query parameter, a repeated or malformed Content-Length included), 404 unknown path, 405 wrong
method, 408 headers and body not all in within ``--request-timeout``, 411 no Content-Length
(chunked bodies included), 413 body over ``--max-bytes`` (answered from the header alone,
without reading the body) or image over ``--max-pixels`` or the whole pixel budget, 500 an
unexpected failure, 503 + Retry-After the pixel budget stayed full. No request can stop the
server, and a client that hangs up is not logged (one line with ``--log-requests``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, urlsplit

from PIL import Image

from u2zoo.errors import ConfigError, ImageError, ImageTooLarge, U2ZooError, did_you_mean, one_line
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.outputs import KINDS, OutputOptions, parse_colour, render
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS, decode_image

DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_PORT = 8000
# A client that stops sending mid-request (or idles between kept-alive requests) frees its
# thread after this long.
SOCKET_TIMEOUT_S = 30.0
# All of a request, headers and body, must arrive within this many seconds of its first byte:
# the timeout above is per read, so one byte every 29 s would hold a thread for ever.
# 60 s lets a --max-bytes (20 MiB) upload through at 3 Mbit/s.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
# A request whose image does not fit in the pixel budget waits this long for room, then gets 503.
BUDGET_WAIT_S = 10.0
PARAMS = ("output", "bg")  # what /predict's query may hold
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


class PixelBudget:
    """The pixels of all images being decoded, segmented and encoded at once, bounded. Memory
    grows ~27 bytes per pixel in flight (float RGB, the map, the outputs): three concurrent
    100 MP posts took 8.2 GB, and 5.2 GB within the default budget of two. Each request
    reserves its W×H, read from the image header, before decoding; ``peak`` is the most ever
    reserved at once (reported by /health)."""

    def __init__(self, limit: int | None, wait_s: float):
        self.limit, self.wait_s = limit, wait_s
        self.in_use = self.peak = 0
        self._room = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        if self.limit is not None and pixels > self.limit:
            raise HttpError(
                413,
                f"the image's {pixels / 1e6:g} MP are over the server's whole pixel budget of "
                f"{self.limit / 1e6:g} MP (--pixel-budget)",
            )
        with self._room:
            if not self._room.wait_for(lambda: self.limit is None or self.in_use + pixels <= self.limit, self.wait_s):
                raise HttpError(
                    503,
                    f"busy: {self.in_use / 1e6:g} of {self.limit / 1e6:g} MP of images in work; try again shortly",
                    {"Retry-After": str(max(1, round(self.wait_s)))},
                )
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._room:
                self.in_use -= pixels
                self._room.notify_all()


class SegmentServer(ThreadingHTTPServer):
    """The HTTP server plus what every request shares: the segmenter, its lock, the counts."""

    daemon_threads = True  # a hung client never keeps the process alive
    request_queue_size = 64  # the default backlog of 5 drops connections under a burst

    def __init__(
        self,
        address: tuple[str, int],
        segmenter: Segmenter,
        options: OutputOptions,
        max_bytes: int,
        max_pixels: int | None,
        label: str,
        log_requests: bool = False,
        pixel_budget: int | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        budget_wait_s: float = BUDGET_WAIT_S,
    ):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.segmenter = segmenter
        self.options = options
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.budget = PixelBudget(pixel_budget, budget_wait_s)
        self.request_timeout_s = request_timeout_s
        self.label = label
        self.log_requests = log_requests
        # Our limits replace Pillow's decompression-bomb guard, which would warn (89 MP) or
        # refuse (179 MP) inside Image.open, before the header could be read for the budget.
        Image.MAX_IMAGE_PIXELS = None
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
        return {
            "status": "ok",
            "target": artifact.target if artifact is not None else "torch",
            "artifact": self.label,
            "sha256": artifact.sha256 if artifact is not None else None,
            "pid": os.getpid(),
            "rss_mb": rss_mb(),
            "requests": requests,
            "errors": errors,
            "pixel_budget": self.budget.limit,
            "pixels_in_use": self.budget.in_use,
            "pixels_peak": self.budget.peak,
        }

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up or stalls is routine: no traceback (one line with
        --log-requests). Anything else is a bug and keeps socketserver's traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            if self.log_requests:
                print(f"{client_address[0]} - client went away ({type(exc).__name__})", file=sys.stderr)
            return
        super().handle_error(request, client_address)

    def request_options(self, query: str) -> tuple[str, OutputOptions]:
        """The output kind and the options for one request, from ``?output=…&bg=…``."""
        params = parse_qs(query, keep_blank_values=True)
        for name in params:
            if name not in PARAMS:  # a typo (?ouput=cutout) must not quietly give the default
                raise HttpError(400, f"unknown parameter {name!r}{did_you_mean(name, PARAMS)}")
        kind = params.get("output", [self.options.kinds[0]])[-1]
        if kind not in KINDS:
            raise HttpError(400, f"unknown output {kind!r} (choose from: {', '.join(KINDS)})")
        changes: dict[str, Any] = {"kinds": (kind,)}
        try:
            if "bg" in params:
                changes.update(background_colour=parse_colour(params["bg"][-1]), background_image=None)
            elif (
                kind == "composite" and self.options.background_colour is None and self.options.background_image is None
            ):
                raise HttpError(
                    400,
                    "a composite needs a background: add &bg=%23RRGGBB (or start the server "
                    "with --bg-colour or --bg-image)",
                )
            return kind, dataclasses.replace(self.options, **changes)
        except ConfigError as exc:
            raise HttpError(400, str(exc)) from None

    def predict(self, data: bytes, query: str) -> tuple[bytes, list[str]]:
        """Image bytes → the PNG asked for and render's notes. Decoding, inference and encoding
        hold the image's pixels in the budget; only inference holds the lock."""
        kind, options = self.request_options(query)
        with self.budget.reserve(self.image_pixels(data)):
            image = self.decode(data)
            with self.inference_lock:
                image = self.segmenter.prepare(image)
                prob = self.segmenter.maps([image])[0]
            rendered = render(image, prob, options)
            buffer = io.BytesIO()
            rendered.images[kind].save(buffer, format="PNG")
        return buffer.getvalue(), rendered.notes

    def image_pixels(self, data: bytes) -> int:
        """W×H from the image header, without decoding: what the request reserves."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels = img.width * img.height
        except (OSError, ValueError, SyntaxError):
            pixels = 0
        if not pixels or (self.max_pixels and pixels > self.max_pixels):
            self.decode(data)  # refuses it (400 unreadable, 413 over --max-pixels) from the header
        return pixels

    def decode(self, data: bytes) -> Any:
        """The posted image as float RGB; an ImageError becomes 413 (too large) or 400."""
        try:
            return decode_image(data, self.max_pixels, "the posted image")
        except ImageError as exc:
            raise HttpError(413 if isinstance(exc, ImageTooLarge) else 400, str(exc)) from None


ROUTES = {"/health": "GET", "/predict": "POST"}  # path → its one method


class PredictHandler(BaseHTTPRequestHandler):
    """Routing, the body-size rules and the multipart upload; the work is the server's."""

    server: SegmentServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
    timeout = SOCKET_TIMEOUT_S
    server_version = "u2zoo"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket file; reads go through the request deadline instead
        self._reader = DeadlineReader(self.connection, self.server.request_timeout_s, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._body_read = False  # fresh per request on a kept-alive connection
        self._replied = False
        self._timed_out = False
        self._reader.deadline = None  # the next request's clock starts at its first byte
        super().handle_one_request()

    def parse_request(self) -> bool:
        """http.server's parsing, plus: headers that trickle past the deadline get 408, and a
        request cut short by the client hanging up (no blank line after its headers: http.client
        takes end of file for one) is dropped unanswered, as nobody is left to read an answer."""
        if not self.raw_requestline.endswith(b"\n"):
            self.close_connection = True
            return False
        try:
            parsed = super().parse_request()
        except TimeoutError:
            self._timed_out = True
            self.send_error(408, self._timeout_message())
            return False
        if self._reader.eof:
            self.close_connection = True
            return False
        return parsed

    def _timeout_message(self) -> str:
        return (
            f"request timeout: headers and body must arrive within {self.server.request_timeout_s:g} s, "
            f"with no pause over {self.timeout:g} s"
        )

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _handle(self) -> None:
        """Answer one request; every failure becomes a JSON error and the server goes on."""
        try:
            self._route()
        except HttpError as exc:
            self._send_error(exc.status, str(exc), exc.headers)
        except TimeoutError:  # the body trickled or stalled (or the client stopped reading our answer)
            self._timed_out = True
            self._send_error(408, self._timeout_message())
        except ConnectionError:
            self.close_connection = True  # the client went away
        except U2ZooError as exc:  # e.g. a runtime or backend failure inside the pipeline
            self._send_error(500, str(exc))
        except Exception as exc:  # a bug: logged with its traceback, answered 500
            traceback.print_exc(file=sys.stderr)
            self._send_error(500, f"{type(exc).__name__}: {exc}")

    def _route(self) -> None:
        self._content_length()  # an ambiguous body length is refused whatever the path
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

    def _content_length(self) -> int | None:
        """The declared body size, or None. One Content-Length of digits only: a repeated one
        (even an identical repeat, which RFC 9112 §6.3 would let us accept) or a signed one is
        400, as two readings of where a body ends are what request smuggling is made of."""
        values = self.headers.get_all("Content-Length", [])
        if len(values) > 1:
            raise HttpError(400, f"{len(values)} Content-Length headers ({', '.join(values)}); send exactly one")
        if values and not re.fullmatch(r"[0-9]+", values[0].strip()):
            raise HttpError(400, f"bad Content-Length: {values[0]!r}")
        return int(values[0]) if values else None

    def _upload_length(self) -> int:
        """The upload's size, refused before a byte of it is read when it is missing (411) or
        over ``--max-bytes`` (413)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HttpError(411, "chunked bodies are not accepted; send a Content-Length")
        length = self._content_length()
        if length is None:
            raise HttpError(411, "a Content-Length header is required")
        if length > self.server.max_bytes:
            raise HttpError(
                413, f"body of {length:,} bytes is over the limit of {self.server.max_bytes:,} (--max-bytes)"
            )
        return length

    def _image_bytes(self) -> bytes:
        """The posted image: the raw body, or the ``file`` field of a multipart form."""
        length = self._upload_length()
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
                self._upload_length()
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
        if self._unread_body():
            self.close_connection = True  # its bytes would be read as the next request
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

    def _unread_body(self) -> bool:
        headers = getattr(self, "headers", None)
        declared = headers is not None and (
            headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in headers
        )
        return declared and not self._body_read

    def finish(self) -> None:
        """Close gently when a declared body was left unread or a slow client may still be
        sending (see ``LINGER_S``)."""
        super().finish()
        if self._unread_body() or self._timed_out:
            linger_close(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)


class DeadlineReader(io.RawIOBase):
    """The connection's reads, failing with TimeoutError once a request has been arriving for
    longer than ``timeout_s`` (counted from its first byte: ``deadline`` None until then) or a
    single read waits over ``idle_s``. ``eof`` says the client has hung up."""

    def __init__(self, sock: socket.socket, timeout_s: float, idle_s: float):
        self.sock, self.timeout_s, self.idle_s = sock, timeout_s, idle_s
        self.deadline: float | None = None
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wait = self.idle_s if self.deadline is None else min(self.idle_s, self.deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError(f"the request took over {self.timeout_s:g} s to arrive")
        self.sock.settimeout(wait)
        try:
            n = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.idle_s)  # what writes wait for
        if self.deadline is None and n:
            self.deadline = time.monotonic() + self.timeout_s
        self.eof = n == 0
        return n


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


def make_server(
    segmenter: Segmenter,
    options: OutputOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    label: str | None = None,
    log_requests: bool = False,
    pixel_budget: int | None = None,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    budget_wait_s: float = BUDGET_WAIT_S,
) -> SegmentServer:
    """A bound, not yet running server (call ``serve_forever``); port 0 picks a free port,
    ``server.url`` says which. ``pixel_budget`` defaults to two images at ``max_pixels``
    (none when that is unlimited)."""
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes must be at least 1, got {max_bytes}")
    if pixel_budget is None:
        pixel_budget = 2 * max_pixels if max_pixels else None
    elif pixel_budget < 1:
        raise ConfigError(f"--pixel-budget must be at least 1, got {pixel_budget}")
    if not request_timeout_s > 0:
        raise ConfigError(f"--request-timeout must be over 0 seconds, got {request_timeout_s}")
    if label is None:
        artifact = getattr(segmenter.predictor, "artifact", None)
        label = Path(artifact.path).name if artifact is not None else "model"
    try:
        return SegmentServer(
            (host, port),
            segmenter,
            options or OutputOptions(),
            max_bytes,
            max_pixels,
            label,
            log_requests,
            pixel_budget,
            request_timeout_s,
            budget_wait_s,
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
