"""Issue 16 #17: an interrupted convert leaves no staging folder behind, and stale ones are swept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from u2zoo.conversion import convert_model
from u2zoo.staging import OWNER_FILE, STAGING_PREFIX, UNOWNED_MAX_AGE_S, _process_start, stale_staging_folders


def _staged(out: Path) -> list[Path]:
    return sorted(out.glob(STAGING_PREFIX + "*"))


def test_sigterm_during_convert_removes_the_staging_folder(tmp_path, isolated_cache):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", U2ZOO_HOME=str(isolated_cache))
    proc = subprocess.Popen(
        [sys.executable, "-m", "u2zoo", "-q", "convert", "--model", "u2netp", "--target", "onnx", "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not _staged(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert _staged(out), "the conversion never created its staging folder"
    time.sleep(0.5)  # well inside the export
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip() == "u2zoo: error: stopped by SIGTERM; the unfinished output was removed", err
    assert list(out.iterdir()) == []


def _fake_staging(out: Path, name: str, owner: dict | None, age_s: float = 0.0) -> Path:
    folder = out / f"{STAGING_PREFIX}{name}"
    folder.mkdir(parents=True)
    (folder / "half-written.onnx").write_bytes(b"\0" * 100)
    if owner is not None:
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    if age_s:
        past = time.time() - age_s
        os.utime(folder, (past, past))
    return folder


def test_stale_staging_folders_of_dead_runs_are_removed_never_a_live_one(tmp_path):
    import socket

    out = tmp_path / "out"
    host = socket.gethostname()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = _fake_staging(out, "dead", {"host": host, "pid": finished.pid, "start": None})
        reused = _fake_staging(out, "reused", {"host": host, "pid": sleeper.pid, "start": "1"})  # pid reused since
        live = _fake_staging(out, "live", {"host": host, "pid": sleeper.pid, "start": _process_start(sleeper.pid)})
        old = _fake_staging(out, "old", None, age_s=UNOWNED_MAX_AGE_S + 60)  # an older version's, untouched 6 h
        young = _fake_staging(out, "young", None)
        remote = _fake_staging(out, "remote", {"host": host + "-elsewhere", "pid": 1, "start": None})
        assert set(stale_staging_folders(out)) == {dead, reused, old}

        convert_model("u2net-tiny", "onnx", out, random_weights=True, progress=False)
        assert set(_staged(out)) == {live, young, remote}
        assert (out / "u2net-tiny.onnx").is_file() or any(p.suffix == ".onnx" for p in out.iterdir())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_native_chatter_is_discarded_but_python_messages_get_through(capfd):
    import ctypes
    import logging
    import warnings

    from u2zoo.quiet import third_party_quiet

    with third_party_quiet():
        ctypes.CDLL(None).printf(b"[cpuinfo_utils.cpp:125] buffered by C stdio\n")
        for piece in ("[", "cpuinfo_utils.cpp", ":71] ", "Reading file\n"):  # ExecuTorch, via sys.stderr
            sys.stderr.write(piece)
        os.write(2, b"I0000 flatbuffer_export.cc] native chatter\n")
        os.write(1, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        warnings.warn("isinstance(treespec, LeafSpec) is deprecated", FutureWarning)
        logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
        print("u2zoo: warning: our own message", file=sys.stderr)
    os.write(2, b"after\n")
    ctypes.CDLL(None).fflush(None)
    out, err = capfd.readouterr()
    assert out == ""
    assert err == "u2zoo: warning: our own message\nafter\n"


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_quiet_tflite_convert_prints_nothing_on_stderr(tmp_path, capfd):
    from u2zoo.cli import main

    assert (
        main(
            ["-q", "convert", "--model", "u2net-tiny", "--random-weights", "--target", "tflite", "--out", str(tmp_path)]
        )
        == 0
    )
    out, err = capfd.readouterr()
    assert err == "", err
    assert "LiteRT-Torch" not in out and out.startswith("wrote "), out
