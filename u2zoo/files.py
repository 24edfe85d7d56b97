"""File helpers every layer shares: a file's digest, and an output folder proven writable."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from u2zoo.errors import ConfigError, U2ZooError


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove we can write there, with a one-line error if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".u2zoo-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise U2ZooError(f"output folder {path} is not writable: {exc.strerror or exc}") from None
    return path


@functools.cache
def process_scratch_dir(prefix: str) -> Path:
    """A temporary folder that lives as long as this process (one per ``prefix``): for what a
    converter reuses across conversions of one run, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def check_replaceable(dest: Path, force: bool = False, label: str = "") -> None:
    """Refuse a ``dest`` that is a file, or a folder with something in it unless ``force``."""
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{label}{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ConfigError(f"{label}{dest} is not empty: pass --force to replace it")


@contextlib.contextmanager
def folder_built_in_place(dest: Path, force: bool = False, label: str = "") -> Iterator[Path]:
    """Yield an empty folder beside ``dest``; when the block succeeds it is renamed to ``dest``
    (an existing one, allowed by ``force``, is removed only after), else it is removed: a
    reader never sees half a folder, and a failure leaves none."""
    check_replaceable(dest, force, label)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    except OSError as exc:
        raise ConfigError(f"{label}{dest}: {exc.strerror or exc}") from None
    try:
        yield staging
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
        staging.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
