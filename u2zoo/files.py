"""File helpers every layer shares: a file's digest, and an output folder proven writable."""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import tempfile
from pathlib import Path

from u2zoo.errors import U2ZooError


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
