"""What `u2zoo serve` checks in a request before any work: its body length, its query, its
multipart form, and room in the server's pixel budget. Framework-free, so the rules read in one
place and are tested without a server."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from contextlib import asynccontextmanager
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, AsyncIterator, Sequence

from u2zoo.errors import ConfigError, did_you_mean
from u2zoo.tasks.outputs import KINDS, OutputOptions, parse_colour

PARAMS = ("output", "bg")  # what /predict's query may hold


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


def content_length(values: Sequence[str]) -> int | None:
    """The declared body size, or None. One Content-Length of digits only: a repeated one
    (even an identical repeat, which RFC 9112 §6.3 would let us accept) or a signed one is
    400, as two readings of where a body ends are what request smuggling is made of."""
    if len(values) > 1:
        raise HttpError(400, f"{len(values)} Content-Length headers ({', '.join(values)}); send exactly one")
    if values and not re.fullmatch(r"[0-9]+", values[0].strip()):
        raise HttpError(400, f"bad Content-Length: {values[0]!r}")
    return int(values[0]) if values else None


def upload_length(length_values: Sequence[str], transfer_encoding: str, max_bytes: int) -> int:
    """The upload's size, refused before a byte of it is read when it is missing (411) or over
    ``max_bytes`` (413)."""
    if "chunked" in transfer_encoding.lower():
        raise HttpError(411, "chunked bodies are not accepted; send a Content-Length")
    length = content_length(length_values)
    if length is None:
        raise HttpError(411, "a Content-Length header is required")
    if length > max_bytes:
        raise HttpError(413, f"body of {length:,} bytes is over the limit of {max_bytes:,} (--max-bytes)")
    if length == 0:
        raise HttpError(400, "empty body: POST the image bytes, or a multipart form with a field 'file'")
    return length


def request_options(params: Sequence[tuple[str, str]], defaults: OutputOptions) -> tuple[str, OutputOptions]:
    """The output kind and the options for one request, from ``?output=…&bg=…`` (the last of a
    repeated parameter wins)."""
    query: dict[str, str] = {}
    for name, value in params:
        if name not in PARAMS:  # a typo (?ouput=cutout) must not quietly give the default
            raise HttpError(400, f"unknown parameter {name!r}{did_you_mean(name, PARAMS)}")
        query[name] = value
    kind = query.get("output", defaults.kinds[0])
    if kind not in KINDS:
        raise HttpError(400, f"unknown output {kind!r} (choose from: {', '.join(KINDS)})")
    changes: dict[str, Any] = {"kinds": (kind,)}
    if "bg" in query:
        try:
            changes.update(background_colour=parse_colour(query["bg"]), background_image=None)
        except ConfigError as exc:
            raise HttpError(400, str(exc)) from None
    elif kind == "composite" and defaults.background_colour is None and defaults.background_image is None:
        raise HttpError(
            400,
            "a composite needs a background: add &bg=%23RRGGBB (or start the server with --bg-colour or --bg-image)",
        )
    return kind, dataclasses.replace(defaults, **changes)


def image_bytes(content_type: str, body: bytes) -> bytes:
    """The posted image: the raw body, or the ``file`` field of a multipart form."""
    if content_type.lower().startswith("multipart/form-data"):
        return multipart_file(content_type, body)
    return body  # image/*, application/octet-stream or anything else: the decoder decides


def multipart_file(content_type: str, body: bytes) -> bytes:
    """The ``file`` field of a multipart/form-data body, parsed by the stdlib ``email``
    package (no python-multipart dependency; the body is already bounded by --max-bytes)."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    if not message.is_multipart():
        raise HttpError(400, "cannot read the multipart body (is the boundary right?)")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True) or b""
    raise HttpError(400, "the multipart form has no field named 'file'")


class PixelBudget:
    """The pixels of all images being decoded, segmented and encoded at once in this worker,
    bounded. Memory grows ~27 bytes per pixel in flight (float RGB, the map, the outputs): three
    concurrent 100 MP posts took 8.2 GB, and 5.2 GB within the default budget of two. Each
    request reserves its W×H, read from the image header, before decoding; ``peak`` is the most
    ever reserved at once (reported by /health)."""

    def __init__(self, limit: int | None, wait_s: float):
        self.limit, self.wait_s = limit, wait_s
        self.in_use = self.peak = 0
        self._room: asyncio.Condition | None = None  # made in the serving event loop

    @asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        if self.limit is not None and pixels > self.limit:
            raise HttpError(
                413,
                f"the image's {pixels / 1e6:g} MP are over the server's whole pixel budget of "
                f"{self.limit / 1e6:g} MP (--pixel-budget)",
            )
        if self._room is None:
            self._room = asyncio.Condition()
        async with self._room:
            try:
                await asyncio.wait_for(
                    self._room.wait_for(lambda: self.limit is None or self.in_use + pixels <= self.limit), self.wait_s
                )
            except asyncio.TimeoutError:
                raise HttpError(
                    503,
                    f"busy: {self.in_use / 1e6:g} of {self.limit / 1e6:g} MP of images in work; try again shortly",
                    {"Retry-After": str(max(1, round(self.wait_s)))},
                ) from None
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            async with self._room:
                self.in_use -= pixels
                self._room.notify_all()


def header_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """Every value of header ``name`` (lower case) in an ASGI scope's raw headers."""
    return [value.decode("latin-1") for key, value in headers if key == name]
