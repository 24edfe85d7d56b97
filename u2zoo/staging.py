"""Staging folders that never outlive their run.

A conversion writes into ``OUT/.u2zoo-staging-*`` and publishes by renaming, so a killed run
must not leave a half-written artifact behind. Two mechanisms:

- inside :func:`staging_folder`, SIGTERM raises :class:`~u2zoo.errors.Interrupted`, so the
  ``finally`` that removes the folder runs (SIGKILL cannot be caught, hence the second one);
- each folder records its owner (host, pid and the process's start time), and the next run in
  the same ``OUT`` removes the folders whose owner is gone, never another live run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from u2zoo.errors import Interrupted

STAGING_PREFIX = ".u2zoo-staging-"
OWNER_FILE = ".owner.json"
# A folder without an owner record (written by an older version) or owned by another host is
# removed only when nothing has touched it for this long.
UNOWNED_MAX_AGE_S = 6 * 3600


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a reused pid is not mistaken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _owner_record() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _is_alive(owner: dict[str, object]) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    start = owner.get("start")
    return start is None or _process_start(pid) in (None, start)


def stale_staging_folders(out_dir: Path) -> list[Path]:
    """Staging folders in ``out_dir`` left by runs that are gone."""
    stale = []
    for folder in Path(out_dir).glob(STAGING_PREFIX + "*"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = None
        if isinstance(owner, dict) and owner.get("host") == socket.gethostname():
            if not _is_alive(owner):
                stale.append(folder)
        elif time.time() - folder.stat().st_mtime > UNOWNED_MAX_AGE_S:
            stale.append(folder)
    return stale


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Interrupted`` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted("stopped by SIGTERM; the unfinished output was removed")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A private folder in ``out_dir`` (same file system, so publishing is a rename), removed on
    exit, SIGTERM included; stale folders of dead runs are removed first."""
    for folder in stale_staging_folders(out_dir):
        shutil.rmtree(folder, ignore_errors=True)
    with sigterm_raises():
        path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        try:
            (path / OWNER_FILE).write_text(json.dumps(_owner_record()))
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
