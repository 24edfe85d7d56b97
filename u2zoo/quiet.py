"""Keep the converters' own chatter off u2zoo's output.

litert-torch draws a 30-line task log, TFLite/absl/oneDNN print C++ notes on the process's
file descriptors, torchao logs the CUDA kernels a CPU build lacks, and torch.export emits
FutureWarnings. None of it is actionable for a u2zoo user, and under ``-q`` it breaks the
"nothing but errors" promise. :func:`third_party_quiet` silences it for the duration of a
conversion or a runtime's set-up while u2zoo's own messages (written to ``sys.stderr`` from
Python) still get through: native writes to fd 1/2 go to a scratch file, Python's streams are
pointed at the real terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from typing import Iterator

CHATTY_LOGGERS = ("torch", "torchao", "litert_torch", "absl", "tensorflow", "executorch", "nncf", "coremltools")
CHATTY_ENV = {"LITERT_TORCH_SHOW_PROGRESS": "n", "TF_CPP_MIN_LOG_LEVEL": "2"}


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
def _loggers_at_error(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _python_stream_on_fd(stream, fd: int):
    """The Python stream (``sys.stdout``/``sys.stderr``) if it writes to ``fd``, else None
    (under pytest's capsys it is an in-memory buffer and needs no rerouting)."""
    try:
        return stream if stream.fileno() == fd else None
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def native_output_discarded() -> Iterator[None]:
    """File descriptors 1 and 2 point at a scratch file for the block; ``sys.stdout`` and
    ``sys.stderr`` are swapped for streams on the original descriptors, so Python-level
    messages still reach the user."""
    swaps = []
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        stream.flush()
        swaps.append((name, fd, _python_stream_on_fd(stream, fd)))
    saved = {fd: os.dup(fd) for _, fd, _ in swaps}
    replaced = {}
    with tempfile.TemporaryFile() as sink:
        try:
            for name, fd, stream in swaps:
                if stream is not None:
                    replaced[name] = stream
                    setattr(sys, name, open(os.dup(saved[fd]), "w", encoding=stream.encoding,
                                            errors=stream.errors, buffering=1))
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for name, fd, _ in swaps:
                if name in replaced:
                    getattr(sys, name).close()
                    setattr(sys, name, replaced[name])
                os.dup2(saved[fd], fd)
                os.close(saved[fd])


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """All of the above for one conversion or one runtime set-up."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_env(CHATTY_ENV))
        stack.enter_context(_loggers_at_error(CHATTY_LOGGERS))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        stack.enter_context(native_output_discarded())
        yield
