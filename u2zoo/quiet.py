"""Keep the converters' own chatter off u2zoo's output.

litert-torch draws a 30-line task log, TFLite/absl/oneDNN print C++ notes on the process's
file descriptors, torchao logs the CUDA kernels a CPU build lacks, and torch.export emits
FutureWarnings. None of it is actionable for a u2zoo user, and under ``-q`` it breaks the
"nothing but errors" promise. :func:`third_party_quiet` silences it for the duration of a
conversion or a runtime's set-up while u2zoo's own messages (written to ``sys.stderr`` from
Python) still get through: native writes to fd 1/2 go to a scratch file, Python's stdout is
pointed at the real terminal and its stderr passes on only lines that start with ``u2zoo:``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from typing import Iterator

CHATTY_LOGGERS = ("torch", "torchao", "litert_torch", "absl", "tensorflow", "executorch", "nncf", "coremltools")
CHATTY_ENV = {"LITERT_TORCH_SHOW_PROGRESS": "n", "TF_CPP_MIN_LOG_LEVEL": "2"}
OWN_PREFIX = "u2zoo:"  # how every message u2zoo writes to stderr starts


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise these loggers to ERROR for a while: backends print routine notes on stderr (skipped
    optional ops, CUDA libraries a CPU build lacks) that would bury u2zoo's own output."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _writes_to_fd(stream, fd: int) -> bool:
    """Whether a Python stream (``sys.stdout``/``sys.stderr``) writes to ``fd``; under pytest's
    capsys it is an in-memory buffer and needs no rerouting."""
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


class OwnLinesOnly(io.TextIOBase):
    """A stand-in for ``sys.stderr`` that passes on u2zoo's own lines (``u2zoo: …``) and drops
    the rest: ExecuTorch's pybindings route their C++ log (``[cpuinfo_utils.cpp:71] …``)
    through Python's ``sys.stderr``, where no file-descriptor trick can tell it from ours."""

    def __init__(self, target) -> None:
        self.target, self.pending = target, ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if line.startswith(OWN_PREFIX):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def writable(self) -> bool:
        return True


def _flush_c_streams() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not POSIX): nothing buffered there
        pass


@contextlib.contextmanager
def native_output_discarded() -> Iterator[None]:
    """File descriptors 1 and 2 point at a scratch file for the block. ``sys.stdout`` and
    ``sys.stderr``, where they write to those descriptors, are swapped for streams on the
    originals, so Python-level messages still reach the user; ``sys.stderr`` passes on only
    u2zoo's own lines (:class:`OwnLinesOnly`)."""
    originals = {"stdout": sys.stdout, "stderr": sys.stderr}
    for stream in originals.values():
        stream.flush()
    saved = {1: os.dup(1), 2: os.dup(2)}
    opened = []
    with tempfile.TemporaryFile() as sink:
        try:
            for name, fd in (("stdout", 1), ("stderr", 2)):
                stream = originals[name]
                if _writes_to_fd(stream, fd):
                    stream = open(os.dup(saved[fd]), "w", encoding=stream.encoding, errors=stream.errors, buffering=1)
                    opened.append(stream)
                setattr(sys, name, OwnLinesOnly(stream) if name == "stderr" else stream)
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            _flush_c_streams()  # C/C++ stdio buffers still hold chatter meant for the scratch file
            sys.stdout, sys.stderr = originals["stdout"], originals["stderr"]
            for stream in opened:
                stream.close()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """All of the above for one conversion or one runtime set-up."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_env(CHATTY_ENV))
        stack.enter_context(quiet_loggers(*CHATTY_LOGGERS))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        stack.enter_context(native_output_discarded())
        yield
