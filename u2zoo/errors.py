"""One error tree for everything a user can get wrong or lack.

The CLI prints any ``U2ZooError`` as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class U2ZooError(Exception):
    """Base of every expected, user-facing failure."""

    exit_code = 2


class ConfigError(U2ZooError):
    """An unknown name, an unsupported option or a bad combination of options."""


class WeightsError(U2ZooError):
    """Missing, corrupt, unsafe or mismatching weights; failed or unverified downloads."""


class ImageError(U2ZooError):
    """An input image that cannot be read."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit, refused from its header before decoding."""


class VideoError(ImageError):
    """A video that cannot be opened, decoded or written."""


class BackendUnavailable(U2ZooError):
    """An optional runtime or converter is not installed or cannot run on this host."""

    def __init__(self, message: str, extra: str | None = None):
        hint = f" (install it with: pip install 'u2zoo[{extra}]')" if extra else ""
        super().__init__(message + hint)
        self.extra = extra


class ConversionError(U2ZooError):
    """The converter's own tool failed."""


class RuntimeLoadError(ConversionError):
    """An artifact's runtime refused to load or prepare it (e.g. a delegate rejected an op)."""


class ParityError(U2ZooError):
    """An artifact's outputs drifted from the PyTorch reference beyond tolerance."""

    exit_code = 3


class ArtifactError(U2ZooError):
    """An artifact or its manifest is missing, unreadable or does not match its sha256."""


def one_line(text: object) -> str:
    """Any message (an exception, a tool's multi-line output) as one line: what the CLI prints,
    what a report cell or an HTTP error body holds."""
    return " ".join(str(text).split())


def tool_failure(exc: BaseException, limit: int | None = 300) -> str:
    """A third-party tool's exception as one line: its type, then its message (the first
    ``limit`` characters: a converter's message can hold a whole graph dump)."""
    text = one_line(exc)
    return f"{type(exc).__name__}: {text if limit is None else text[:limit]}"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A '; did you mean …?' suffix plus the valid choices, for unknown-name errors."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    return f"{suggestion} (choose from: {', '.join(choices)})"


class Interrupted(U2ZooError):
    """Stopped by SIGTERM: cleanup ran, nothing half-written was left (the shell's 128 + 15)."""

    exit_code = 143
