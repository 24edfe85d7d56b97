"""`u2zoo serve` on uvicorn: the listening socket, the HTTP/1.1 protocol with our timeouts, and
a server that says when it is up.

uvicorn bounds idle kept-alive connections but not a request whose headers trickle in: a
client sending one header byte a second would hold its connection for ever. ``DeadlineH11``
gives the headers of every request ``--request-timeout`` from their first byte (then a JSON
408) and a connection that never sends anything ``--idle-timeout``; its protocol errors are
JSON too. None of this holds a thread: idle and slow clients cost a coroutine each.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from u2zoo.errors import ConfigError
from u2zoo.tasks.serve import ServeSettings
from u2zoo.tasks.serve.app import json_error_bytes
from u2zoo.tasks.serve.requests import HttpError, content_length

# What a request's head may take before h11 refuses it (its own limit is 16 KiB).
MAX_HEAD_BYTES = 64 * 1024
# Seconds uvicorn lets the requests in flight finish after SIGTERM / Ctrl-C.
GRACEFUL_SHUTDOWN_S = 30
# Seconds a closing connection keeps reading (and dropping) what its client still sends.
LINGER_S = 2.0


class LingeringTransport:
    """The connection's transport, with a staged close (RFC 9112 §9.6): ``close()`` sends what
    was written and a FIN, then keeps reading and dropping the client's input until it closes
    too or ``LINGER_S`` pass. Closing a socket that still receives input makes the kernel send
    RST, and a client that gets RST loses the answer it had not read yet: a slow client would
    see "connection reset" instead of its JSON 408."""

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.lingering:  # nothing more goes out once the close has begun
            self._transport.write(data)

    def close(self) -> None:
        if self.is_closing():
            return
        self.lingering = True
        if not self._transport.can_write_eof():
            self._transport.close()
            return
        self._transport.write_eof()
        self._transport.resume_reading()  # flow control may have paused it: drain, or RST follows
        self._loop.call_later(LINGER_S, self._transport.close)


def bind_socket(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port); a busy or bad address is one line.

    ``reuse_port``: several processes bind the same port and Linux spreads new connections
    evenly over their sockets (one shared socket lets whichever worker wakes first take them
    all: 44 against 20 requests in a 64-request test). ``listen=False`` only reserves the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def balanced_sockets_supported() -> bool:
    """Linux balances SO_REUSEPORT listeners; elsewhere workers share one socket."""
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def protocol_for(settings: ServeSettings) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with ``settings``' header deadline and JSON protocol errors."""

    class DeadlineH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(LingeringTransport(transport, asyncio.get_running_loop()))
            self._header_timer: asyncio.TimerHandle | None = None
            self._head: bytearray | None = None  # the request's head until its blank line
            self._arm(settings.idle_timeout_s, None)  # a connection that never sends anything

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:  # closing: what still comes is dropped
                return
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and (self._header_timer is None or self._header_started is None):
                self._arm(settings.request_timeout_s, settings.timeout_message)  # a request's first byte
                self._head = bytearray()
            if between_requests and self._head is not None and not self._lengths_agree(data):
                return
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # its headers are complete: the app's own deadlines take over
                self._disarm()

        def _lengths_agree(self, data: bytes) -> bool:
            """Refuse (JSON 400) a head with repeated or non-digit Content-Length headers. h11
            quietly merges identical repeats and reads "5, 5" as 5; two readings of where a
            body ends are what request smuggling is made of, so the raw lines are checked."""
            self._head += data[: MAX_HEAD_BYTES - len(self._head)]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return True
            lines = bytes(self._head[:end]).split(b"\r\n")[1:]
            self._head = None
            values = [
                line.split(b":", 1)[1].strip().decode("latin-1")
                for line in lines
                if line[:15].lower() == b"content-length:"
            ]
            try:
                content_length(values)
            except HttpError as exc:
                self.send_400_response(str(exc))
                return False
            return True

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(json_error_bytes(400, "Bad Request", msg))
                self.transport.close()

        def _arm(self, seconds: float, message: str | None) -> None:
            self._disarm()
            self._header_started = message
            self._header_timer = self.loop.call_later(seconds, self._expired, message)

        def _disarm(self) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
            self._header_timer = None
            self._header_started = None

        def _expired(self, message: str | None) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if message is not None:  # headers begun, not finished: say why before hanging up
                self.transport.write(json_error_bytes(408, "Request Timeout", message))
            self.transport.close()

    return DeadlineH11


class AnnouncingServer(uvicorn.Server):
    """A uvicorn server that calls ``on_started`` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def make_server(app: Any, settings: ServeSettings, on_started: Callable[[], None] | None = None) -> AnnouncingServer:
    """A uvicorn server for ``app`` (run it with ``server.run(sockets=[sock])``)."""
    config = uvicorn.Config(
        app,
        http=protocol_for(settings),
        lifespan="on",
        log_config=None,
        log_level="info" if settings.log_requests else "error",  # a malformed request is a 400, not a log line
        access_log=False,
        timeout_keep_alive=int(max(1, settings.idle_timeout_s)),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
        date_header=False,
    )
    return AnnouncingServer(config, on_started)


@contextmanager
def serving_in_thread(app: Any, settings: ServeSettings, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a background thread while the block runs; yields its URL. For tests
    and for embedding the service in a Python program."""
    sock = bind_socket(host, port)
    started = threading.Event()
    server = make_server(app, settings, started.set)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="u2zoo-serve")
    thread.start()
    try:
        while not started.wait(0.05):
            if not thread.is_alive():
                raise ConfigError("the service stopped while starting (see the log above)")
        yield socket_url(sock)
    finally:
        server.should_exit = True
        thread.join(GRACEFUL_SHUTDOWN_S + 5)
        sock.close()
