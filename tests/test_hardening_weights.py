"""Issue 16 (hardening), weights side: pickled code, non-finite weights, oversized downloads,
malformed --weights-sha256, and -q during downloads."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from u2zoo.zoo import weights as W
from u2zoo.zoo.archs import build_arch

from conftest import assert_one_line_error, run_cli


class Evil:
    """Unpickling this would run a shell command; loading must refuse it, naming the global."""

    def __reduce__(self):
        return (os.system, ("touch pwned-by-u2zoo-test",))


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "in" / "img.png"
    path.parent.mkdir()
    Image.new("RGB", (40, 32), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize(
    "save_kwargs",
    [
        {},
        {"_use_new_zipfile_serialization": False},
        {"_use_new_zipfile_serialization": False, "pickle_protocol": 4},
        {"pickle_protocol": 4},
    ],
    ids=["zip", "legacy", "legacy-proto4", "zip-proto4"],
)
def test_pickled_code_is_refused_naming_the_global(capsys, tmp_path, image, save_kwargs):
    evil = tmp_path / "e.pth"
    torch.save({"x": Evil()}, evil, **save_kwargs)
    code, _, err = run_cli(capsys, "predict", "--model", "u2netp", "--weights", evil, image, "--out", tmp_path / "o")
    assert_one_line_error(code, err, r"refused: .*pickled code.*\((posix|os|nt)\.system\)")
    assert len(err.strip().splitlines()) == 1  # no torch warning lines either
    assert not Path("pwned-by-u2zoo-test").exists()


def test_pickled_class_instance_is_named(tmp_path):
    evil = tmp_path / "e.pth"
    torch.save({"w": torch.zeros(1), "obj": Plain()}, evil)
    with pytest.raises(W.WeightsError, match=r"pickled code.*Plain\)"):
        W.read_state_dict(evil)


class Plain:
    pass


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_tensors_in_a_protocol_4_pickle_are_not_called_code(tmp_path, legacy):
    """The opcode scan must not mistake torch's own rebuild functions for code."""
    path = tmp_path / "p4.pth"
    torch.save({"w": torch.zeros(3)}, path, pickle_protocol=4, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(W.WeightsError, match="corrupt checkpoint") as info:
        W.read_state_dict(path)
    assert "pickled code" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(capsys, tmp_path, image, bad):
    state = W.read_state_dict(W.find_entry("u2netp.fp16_bnfolded").cache_path())
    name = sorted(k for k, v in state.items() if v.is_floating_point())[5]
    state[name].view(-1)[3] = bad
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    code, _, err = run_cli(capsys, "predict", "--model", "u2netp", "--weights", path, image, "--out", tmp_path / "o")
    assert_one_line_error(code, err, rf"refused: tensor {name!r} holds 1 non-finite value")
    assert not (tmp_path / "o" / "img.png").exists()


class _Huge(http.server.BaseHTTPRequestHandler):
    """``/stream``: up to ``cap`` bytes with no Content-Length; ``/announced``: a Content-Length of
    1 GB and a few bytes. Counts what it managed to send."""

    cap = 64 << 20
    sent = 0
    done = threading.Event()

    def do_GET(self):
        self.send_response(200)
        if self.path == "/announced":
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            return
        self.end_headers()
        chunk = b"\0" * (1 << 16)
        try:
            while type(self).sent < self.cap:
                self.wfile.write(chunk)
                type(self).sent += len(chunk)
        except OSError:
            pass
        finally:
            type(self).done.set()

    def log_message(self, *args):
        pass


@pytest.fixture
def huge_server():
    _Huge.sent, _Huge.done = 0, threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Huge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def small_entry(monkeypatch):
    """A non-shipped, hash-pinned entry of a known small size (like the registry's file_size)."""
    entry = dataclasses.replace(
        W.find_entry("u2netp.fp16_bnfolded"), name="small", filename="small.pth", bundled=False, file_size=100_000
    )
    monkeypatch.setitem(W.REGISTRY, entry.name, entry)
    return entry


def test_download_stops_once_over_the_known_size(capsys, huge_server, small_entry, isolated_cache):
    code, _, err = run_cli(capsys, "fetch", "small", "--from", f"{huge_server}/stream")
    assert_one_line_error(code, err, r"download failed: .*more than the expected 100,000 bytes")
    assert _Huge.done.wait(10)
    assert _Huge.sent < _Huge.cap // 2  # stopped early, not after reading everything
    assert [p.name for p in (isolated_cache / "weights").iterdir() if not p.name.endswith(".lock")] == []


def test_download_refuses_an_announced_size_over_the_known_one(capsys, huge_server, small_entry, isolated_cache):
    code, _, err = run_cli(capsys, "fetch", "small", "--from", f"{huge_server}/announced")
    assert_one_line_error(code, err, r"announces 1,000,000,000 bytes, more than the expected 100,000")
    assert [p.name for p in (isolated_cache / "weights").iterdir() if not p.name.endswith(".lock")] == []


@pytest.fixture
def served_tiny(tmp_path):
    """The tiny checkpoint over HTTP on 127.0.0.1: (url, sha256)."""
    from functools import partial

    root = tmp_path / "srv"
    root.mkdir()
    torch.manual_seed(1)
    torch.save(build_arch("u2net-tiny").state_dict(), root / "w")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/w", hashlib.sha256((root / "w").read_bytes()).hexdigest()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("sha", ["../../../../tmp/x", "../" * 8 + "x" * 40, "a" * 63, "g" * 64, "a" * 65])
def test_weights_sha256_must_be_64_hex_characters(capsys, tmp_path, monkeypatch, served_tiny, image, sha):
    home = tmp_path / "a" / "b" / "c" / "home"
    monkeypatch.setenv("U2ZOO_HOME", str(home))
    before = {p for p in tmp_path.rglob("*")}
    code, _, err = run_cli(
        capsys,
        "predict",
        "--model",
        "u2net-tiny",
        "--weights",
        served_tiny[0],
        "--weights-sha256",
        sha,
        image,
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, r"--weights-sha256 must be 64 hex characters")
    assert {p for p in tmp_path.rglob("*")} == before  # no lock, no cache entry, no output folder
    with pytest.raises(W.ConfigError, match="64 hex"):
        W.load_model("u2net-tiny", weights=served_tiny[0], weights_sha256=sha, progress=False)
    with pytest.raises(W.ConfigError, match="64 hex"):
        W.download(served_tiny[0], home / "x.pth", sha256=sha, progress=False)
    assert {p for p in tmp_path.rglob("*")} == before


def test_quiet_download_shows_no_progress_bar(capsys, tmp_path, served_tiny, image):
    url, sha = served_tiny
    code, out, err = run_cli(
        capsys,
        "predict",
        "--model",
        "u2net-tiny",
        "--weights",
        url,
        "--weights-sha256",
        sha.upper(),
        image,
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    assert err == ""
    assert (tmp_path / "o" / "img.png").exists()
