"""`u2zoo serve`'s ASGI app (FastAPI): POST an image, get a PNG back.

    POST /predict[?output=KIND&bg=C]  raw image body or multipart/form-data field ``file``
                                      → 200 image/png (mask, RGBA cut-out or composite)
    GET  /health                      liveness: what is loaded, pid, RSS, request counts
    GET  /ready                       200 once the model is loaded and warmed, else 503
    GET  /metrics                     Prometheus text format
    GET  /docs                        the OpenAPI page (schema at /openapi.json)

Each request reads its body, decodes and resizes its image in its own thread; concurrent
requests meet in one engine call (``u2zoo.tasks.batcher``), and resizing back and PNG encoding
run in the request's thread again, so decode/encode overlap inference. Every refusal is JSON
``{"error": "<one line>"}`` with its status: 400 bad input (an unknown query parameter, a
repeated or malformed Content-Length included), 404 unknown path, 405 wrong method, 408 the
request did not arrive within ``--request-timeout``, 411 no Content-Length (chunked bodies
included), 413 body over ``--max-bytes`` (answered from the header alone, unread) or image over
``--max-pixels`` or the whole pixel budget, 500 an unexpected failure (the server goes on),
501 an unknown method, 503 + Retry-After the pixel budget stayed full.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from u2zoo.errors import ImageError, ImageTooLarge, U2ZooError, one_line
from u2zoo.tasks.batcher import DynamicBatcher
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.outputs import KINDS, OutputOptions, render
from u2zoo.tasks.serve import ServeSettings
from u2zoo.tasks.serve.metrics import CONTENT_TYPE, ServeMetrics
from u2zoo.tasks.serve.requests import (
    HttpError,
    PixelBudget,
    header_values,
    image_bytes,
    request_options,
    rss_mb,
    upload_length,
)
from u2zoo.version import __version__
from u2zoo.zoo.images import decode_image

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# zlib level of the answered PNGs: lossless either way; level 1 encodes a 800×657 mask in
# 4.1 ms (66 KB) where the default 6 takes 9.7 ms (54 KB), a 4% share of a U2NETP request.
PNG_COMPRESS_LEVEL = 1
CLIENT_GONE = 499  # nginx's "client closed request": answered to nobody, counted nowhere
ROUTES_HELP = "POST /predict, GET /health, GET /ready, GET /metrics, GET /docs"
# Printable ASCII except '%': what a header may carry as is (notes are UTF-8 percent-encoded).
_HEADER_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")


@dataclass
class Service:
    """What every request shares: the segmenter, the batcher, the limits and the counts."""

    segmenter: Segmenter
    options: OutputOptions
    settings: ServeSettings
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    requests: int = 0
    errors: int = 0
    ready: bool = False
    batcher: DynamicBatcher | None = None

    def __post_init__(self) -> None:
        self.settings.check()
        self.budget = PixelBudget(self.settings.budget_pixels, self.settings.budget_wait_s)
        artifact = getattr(self.segmenter.predictor, "artifact", None)
        self.label = self.settings.label or (Path(artifact.path).name if artifact is not None else "model")
        share_cores = getattr(self.segmenter.predictor, "share_cores", None)
        if share_cores is not None:  # request threads decode and encode beside the engine
            share_cores()
        # Our limits replace Pillow's decompression-bomb guard, which would warn (89 MP) or
        # refuse (179 MP) inside Image.open, before the header could be read for the budget.
        Image.MAX_IMAGE_PIXELS = None

    def count(self, path: str, status: int, seconds: float) -> None:
        self.requests += 1
        self.errors += status >= 400
        self.metrics.observe(path, status, seconds)

    def health(self) -> dict[str, Any]:
        artifact = getattr(self.segmenter.predictor, "artifact", None)
        batcher = self.batcher
        return {
            "status": "ok",
            "ready": self.ready,
            "target": artifact.target if artifact is not None else "torch",
            "artifact": self.label,
            "sha256": artifact.sha256 if artifact is not None else None,
            "pid": os.getpid(),
            "rss_mb": rss_mb(),
            "requests": self.requests,
            "errors": self.errors,
            "max_batch": batcher.max_batch if batcher else None,
            "batch_sizes": dict(sorted(batcher.batch_sizes.items())) if batcher else {},
            "queue_depth": batcher.queue_depth if batcher else 0,
            "pixel_budget": self.budget.limit,
            "pixels_in_use": self.budget.in_use,
            "pixels_peak": self.budget.peak,
        }

    async def start(self) -> None:
        """Start the batcher and warm the engine up in the background (``/ready`` turns 200)."""
        settings = self.settings
        self.batcher = DynamicBatcher.for_network_inputs(
            self.segmenter, settings.max_batch, settings.max_wait_ms / 1000
        )
        if self.batcher.note:
            print(f"u2zoo serve: {self.batcher.note}", file=sys.stderr, flush=True)
        self.batcher.on_batch = self._on_batch
        self.batcher.start()
        asyncio.get_running_loop().create_task(self._warm_up())

    async def stop(self) -> None:
        """No new requests; the queued ones are answered, then the engine stops."""
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close()

    def _on_batch(self, size: int) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.queue_depth.set(self.batcher.queue_depth if self.batcher else 0)

    async def _warm_up(self) -> None:
        height, width = self.segmenter.size
        blank = np.zeros((3, height, width), np.float32)
        try:
            await self.batcher.submit(blank)
            self.ready = True
        except Exception as exc:  # noqa: BLE001 - the service stays up; /ready says why not
            print(f"u2zoo serve: warm-up failed: {one_line(str(exc))}", file=sys.stderr, flush=True)

    async def predict(self, query: list[tuple[str, str]], headers: Any, receive: Callable) -> tuple[bytes, list[str]]:
        """The request's image → the PNG asked for, and render's notes."""
        raw = headers.raw
        length = upload_length(
            header_values(raw, b"content-length"), headers.get("transfer-encoding", ""), self.settings.max_bytes
        )
        kind, options = request_options(query, self.options)
        body = await read_body(receive, length, self.settings)
        data = image_bytes(headers.get("content-type", ""), body)
        pixels = await asyncio.to_thread(self._image_pixels, data)
        async with self.budget.reserve(pixels):
            image, network_input = await asyncio.to_thread(self._decode_and_resize, data)
            self.metrics.queue_depth.set(self.batcher.queue_depth + 1)
            prediction = await self.batcher.submit(network_input)
            return await asyncio.to_thread(self._encode, image, prediction, options, kind)

    def _image_pixels(self, data: bytes) -> int:
        """W×H from the image header, without decoding: what the request reserves."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels = img.width * img.height
        except (OSError, ValueError, SyntaxError):
            pixels = 0
        if not pixels or (self.settings.max_pixels and pixels > self.settings.max_pixels):
            self._decode(data)  # refuses it (400 unreadable, 413 over --max-pixels) from the header
        return pixels

    def _decode(self, data: bytes) -> np.ndarray:
        try:
            return decode_image(data, self.settings.max_pixels, "the posted image")
        except ImageError as exc:
            raise HttpError(413 if isinstance(exc, ImageTooLarge) else 400, str(exc)) from None

    def _decode_and_resize(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        image = self.segmenter.prepare(self._decode(data))
        return image, self.segmenter.network_input(image)

    def _encode(self, image: np.ndarray, prediction: np.ndarray, options: OutputOptions, kind: str):
        rendered = render(image, self.segmenter.to_map(prediction, image.shape[:2]), options)
        buffer = io.BytesIO()
        rendered.images[kind].save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue(), rendered.notes


async def read_body(receive: Callable, length: int, settings: ServeSettings) -> bytes:
    """The declared ``length`` bytes, within the request timeout and with no pause over the
    idle timeout (a client sending 1 byte a second is cut off, and meanwhile holds no thread)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s
    chunks: list[bytes] = []
    received = 0
    while True:
        wait = min(settings.idle_timeout_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            raise HttpError(408, settings.timeout_message) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        received += len(chunks[-1])
        if not message.get("more_body", False):
            break
    if received < length:
        raise HttpError(400, f"body ended after {received:,} of {length:,} bytes")
    return b"".join(chunks)


class ClientGone(Exception):
    """The client hung up before its request was in: nobody is left to answer."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A one-line JSON refusal. The connection closes after it: an unread body would be taken
    for the next request."""
    return JSONResponse(
        {"error": one_line(message)}, status_code=status, headers={**(headers or {}), "Connection": "close"}
    )


PREDICT_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "output",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": list(KINDS)},
            "description": "what to return (default: the server's first --outputs)",
        },
        {
            "name": "bg",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "composite background colour, e.g. %2300ff00 or white",
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    },
    "responses": {
        "200": {"description": "the PNG asked for", "content": {"image/png": {}}},
        "400": {"description": "bad input (one-line JSON error)"},
        "408": {"description": "the request did not arrive in time"},
        "411": {"description": "no Content-Length"},
        "413": {"description": "body or image too large"},
        "503": {"description": "the pixel budget stayed full; retry"},
    },
}


def create_app(service: Service) -> FastAPI:
    """The FastAPI app of ``service``, wrapped in the counting and method-checking layer."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="u2zoo serve",
        version=__version__,
        summary=f"U²-Net segmentation: {service.label}",
        lifespan=lifespan,
        redoc_url=None,
    )

    @app.post("/predict", response_class=Response, openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request) -> Response:
        """Segment the posted image; answer the mask, RGBA cut-out or composite as PNG."""
        try:
            png, notes = await service.predict(request.query_params.multi_items(), request.headers, request.receive)
        except HttpError as exc:
            return error_response(exc.status, str(exc), exc.headers)
        except ClientGone:  # nobody to answer; not counted as an error
            return Response(status_code=CLIENT_GONE)
        except U2ZooError as exc:  # e.g. a runtime or backend failure inside the pipeline
            return error_response(500, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: logged with its traceback, answered 500
            traceback.print_exc(file=sys.stderr)
            return error_response(500, f"{type(exc).__name__}: {exc}")
        headers = {"X-U2zoo-Notes": _quote_note("; ".join(notes))} if notes else {}
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the process answers; what is loaded and the request counts."""
        return service.health()

    @app.get("/ready", responses={503: {"description": "not loaded or not warmed up yet"}})
    async def ready() -> Response:
        """Readiness: 200 once the model is loaded and has answered its warm-up call."""
        if service.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": "warming up"}, status_code=503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format: requests, errors, latency, batch sizes, queue depth."""
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"no such path: {request.url.path} ({ROUTES_HELP})")
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} {request.url.path} is not allowed; use {allowed.replace(', HEAD', '')}"
            return error_response(405, message, {"Allow": allowed})
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, str(exc.errors()[:1]))

    return CountingApp(app, service)


class CountingApp:
    """Around the app: unknown methods get 501 (as http.server gave), and every answer is
    counted (/health, /metrics) and, with --log-requests, logged in one line."""

    def __init__(self, app: FastAPI, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] != CLIENT_GONE:
                status = message["status"]
                self.service.count(scope["path"], status, time.perf_counter() - started)
                if self.service.settings.log_requests:
                    client = (scope.get("client") or ("-",))[0]
                    print(f'{client} - "{scope["method"]} {scope["path"]}" {status}', file=sys.stderr, flush=True)
            await send(message)

        if scope["method"] not in METHODS:
            response = error_response(501, f"Unsupported method ({scope['method']!r})")
            await response(scope, receive, counted_send)
            return
        await self.app(scope, receive, counted_send)


def _quote_note(text: str) -> str:
    from urllib.parse import quote

    return quote(one_line(text), safe=_HEADER_SAFE)


def json_error_bytes(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 JSON error response, for refusals made before the app sees a request
    (headers that never finished arriving, a malformed request line)."""
    body = json.dumps({"error": one_line(message)}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
