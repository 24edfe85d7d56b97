"""`u2zoo serve`: a real server on 127.0.0.1 (free port) answering real HTTP requests."""

from __future__ import annotations

import http.client
import io
import json
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="u2zoo serve needs the u2zoo[serve] extra")
pytest.importorskip("uvicorn", reason="u2zoo serve needs the u2zoo[serve] extra")

from u2zoo.benchmarks import serve_load  # noqa: E402
from u2zoo.benchmarks.serve_load import format_table, load_test  # noqa: E402
from u2zoo.tasks.outputs import OutputOptions, render  # noqa: E402
from u2zoo.tasks.serve import ServeSettings  # noqa: E402
from u2zoo.tasks.serve.app import Service, create_app  # noqa: E402
from u2zoo.tasks.serve.http import serving_in_thread  # noqa: E402
from u2zoo.zoo.images import decode_image  # noqa: E402

from conftest import assert_one_line_error, run_cli  # noqa: E402

RSS_GROWTH_LIMIT_MB = 50


@dataclass
class Running:
    url: str
    service: Service

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextmanager
def running(segmenter, options: OutputOptions | None = None, **settings):
    """The service on ``segmenter`` on a free port, served by uvicorn in a background thread."""
    service = Service(segmenter, options or OutputOptions(), ServeSettings(**settings))
    with serving_in_thread(create_app(service), service.settings) as url:
        yield Running(url, service)


@pytest.fixture(scope="module")
def server(segmenter):
    """The old design (one engine call per request), whose RSS must stay flat after warm-up.
    With batching, ONNX Runtime's arena grows once per new batch size it meets (bounded by
    --max-batch; +250 MB over sizes 1-8 for the tiny net at 320 px): test_serve_asgi covers it."""
    with running(segmenter, max_bytes=10_000_000, max_batch=1) as srv:
        yield srv


def post(url: str, body: bytes, content_type: str = "image/png") -> tuple[int, dict, bytes]:
    """POST with urllib: (status, headers, body), errors included."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def error_of(status_headers_body: tuple[int, dict, bytes], status: int) -> str:
    """Assert a JSON error with ``status``; return its one-line message."""
    code, headers, body = status_headers_body
    assert code == status, body
    assert headers["Content-Type"] == "application/json"
    message = json.loads(body)["error"]
    assert message and "\n" not in message
    return message


def png_image(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG"
    return image


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A valid little PNG whose header claims ``width``×``height``: refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def raw_request(port: int, lines: list[str], body: bytes = b"") -> tuple[int, bytes]:
    """Send a hand-written request (http.client would add the headers under test)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(lines[0].split()[0], lines[0].split()[1], skip_host=True, skip_accept_encoding=True)
    for line in lines[1:]:
        name, value = line.split(": ", 1)
        conn.putheader(name, value)
    conn.endheaders()
    if body:
        conn.send(body)
    response = conn.getresponse()
    try:
        return response.status, response.read()
    finally:
        conn.close()


def local_output(segmenter, png: bytes, options: OutputOptions, kind: str) -> np.ndarray:
    image = segmenter.prepare(decode_image(png))
    rendered = render(image, segmenter.maps([image])[0], options)
    return np.asarray(rendered.images[kind], np.int16)


# --- the happy path ---------------------------------------------------------------------------


def test_health_says_what_is_loaded(server, tiny_dynamic_onnx):
    code, headers, body = get(f"{server.url}/health")
    assert code == 200 and headers["Content-Type"] == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok" and health["target"] == "onnx"
    assert health["artifact"] == tiny_dynamic_onnx.path.name
    assert health["sha256"] == tiny_dynamic_onnx.sha256 and len(health["sha256"]) == 64
    assert health["pid"] > 0 and health["rss_mb"] > 10
    assert isinstance(health["requests"], int) and isinstance(health["errors"], int)


def test_raw_png_gives_the_same_mask_as_the_local_pipeline(server, segmenter, photo_png):
    code, headers, body = post(f"{server.url}/predict", photo_png)
    assert code == 200 and headers["Content-Type"] == "image/png"
    mask = png_image(body)
    assert mask.mode == "L" and mask.size == Image.open(io.BytesIO(photo_png)).size
    expected = local_output(segmenter, photo_png, OutputOptions(), "mask")
    assert np.abs(np.asarray(mask, np.int16) - expected).max() <= 1
    assert expected.std() > 1  # a real map, not a constant that any answer would match


def test_multipart_upload_and_octet_stream_work(server, photo_png):
    body, content_type = multipart("file", "cat.png", photo_png)
    code, _, multipart_mask = post(f"{server.url}/predict", body, content_type)
    assert code == 200
    code, _, raw_mask = post(f"{server.url}/predict", photo_png, "application/octet-stream")
    assert code == 200
    assert np.array_equal(np.asarray(png_image(multipart_mask)), np.asarray(png_image(raw_mask)))

    body, content_type = multipart("image", "cat.png", photo_png)
    assert "'file'" in error_of(post(f"{server.url}/predict", body, content_type), 400)


def test_cutout_is_rgba_with_the_photo_and_the_mask(server, segmenter, photo_png):
    code, _, body = post(f"{server.url}/predict?output=cutout", photo_png)
    assert code == 200
    cutout = np.asarray(png_image(body).convert("RGBA"), np.int16)
    assert png_image(body).mode == "RGBA"
    assert np.array_equal(cutout[..., :3], np.asarray(Image.open(io.BytesIO(photo_png)), np.int16))
    assert np.abs(cutout[..., 3] - local_output(segmenter, photo_png, OutputOptions(), "mask")).max() <= 1


def test_composite_on_green_blends_the_photo_by_the_alpha(server, segmenter, photo_png):
    code, _, body = post(f"{server.url}/predict?output=composite&bg=%2300ff00", photo_png)
    assert code == 200
    composite = np.asarray(png_image(body), np.float32)
    photo = np.asarray(Image.open(io.BytesIO(photo_png)), np.float32)
    alpha = local_output(segmenter, photo_png, OutputOptions(), "mask")[..., None] / 255.0
    expected = photo * alpha + np.array([0, 255, 0], np.float32) * (1 - alpha)
    assert np.abs(composite - expected).max() <= 2
    assert (alpha < 0.5).mean() > 0.1  # the background shows: the check above is not about the photo only


class HalfMap:
    """A stand-in segmenter whose map is 0 on the left half and 1 on the right."""

    predictor = SimpleNamespace(fixed_batch=None)
    size = (8, 8)
    batch_size = 1

    def prepare(self, image):
        return image

    def network_input(self, image):
        return np.zeros((3, *self.size), np.float32)

    def run_inputs(self, inputs):
        return inputs

    def to_map(self, prediction, shape):
        prob = np.zeros(shape, np.float32)
        prob[:, shape[1] // 2 :] = 1.0
        return prob


def test_composite_is_exactly_green_where_the_alpha_is_zero(photo_png):
    with running(HalfMap(), label="half") as srv:
        code, _, body = post(f"{srv.url}/predict?output=composite&bg=%2300ff00", photo_png)
        assert code == 200
        assert json.loads(get(f"{srv.url}/health")[2])["target"] == "torch"
    composite = np.asarray(png_image(body))
    photo = np.asarray(Image.open(io.BytesIO(photo_png)))
    half = photo.shape[1] // 2
    assert (composite[:, :half] == [0, 255, 0]).all()
    assert np.array_equal(composite[:, half:], photo[:, half:])


# --- refusals ---------------------------------------------------------------------------------


def test_empty_corrupt_and_bad_options_are_400(server, photo_png):
    assert "empty" in error_of(post(f"{server.url}/predict", b""), 400)
    assert "cannot read" in error_of(post(f"{server.url}/predict", b"not an image at all" * 10), 400)
    assert "cannot read" in error_of(post(f"{server.url}/predict", photo_png[: len(photo_png) // 2]), 400)
    assert "unknown output" in error_of(post(f"{server.url}/predict?output=blurry", photo_png), 400)
    assert "colour" in error_of(post(f"{server.url}/predict?output=composite&bg=nope", photo_png), 400)
    assert "background" in error_of(post(f"{server.url}/predict?output=composite", photo_png), 400)


def test_missing_or_chunked_length_is_411(server):
    port = server.port
    status, body = raw_request(port, ["POST /predict", "Host: x", "Content-Type: image/png"])
    assert status == 411 and "Content-Length" in json.loads(body)["error"]
    status, body = raw_request(
        port, ["POST /predict", "Host: x", "Transfer-Encoding: chunked"], b"3\r\nabc\r\n0\r\n\r\n"
    )
    assert status == 411 and "chunked" in json.loads(body)["error"]


def test_body_over_max_bytes_is_413_unread_and_the_server_goes_on(segmenter, photo_png):
    assert len(photo_png) > 10_000
    with running(segmenter, max_bytes=10_000) as small:
        assert "over the limit of 10,000" in error_of(post(f"{small.url}/predict", photo_png), 413)
        assert get(f"{small.url}/health")[0] == 200

        # a 1 GB claim with 3 bytes sent: answered at once, so the body was never waited for
        started = time.perf_counter()
        status, body = raw_request(small.port, ["POST /predict", "Host: x", "Content-Length: 1000000000"], b"abc")
        assert status == 413 and time.perf_counter() - started < 5
        # curl's Expect: 100-continue gets the 413 instead of the go-ahead
        status, body = raw_request(
            small.port, ["POST /predict", "Host: x", "Content-Length: 50000", "Expect: 100-continue"]
        )
        assert status == 413 and "--max-bytes" in json.loads(body)["error"]
        assert get(f"{small.url}/health")[0] == 200


def test_image_over_the_pixel_limit_is_413_before_decoding(server):
    message = error_of(post(f"{server.url}/predict", huge_png_header()), 413)
    assert "20000×20000" in message and "MP" in message


def test_unknown_path_404_and_wrong_method_405(server):
    assert "/nope" in error_of(get(f"{server.url}/nope"), 404)
    error_of(post(f"{server.url}/nope", b"x"), 404)
    code, headers, _ = get(f"{server.url}/predict")
    assert "POST" in error_of((code, headers, _), 405) and headers["Allow"] == "POST"
    error_of(post(f"{server.url}/health", b"x"), 405)
    status, body = raw_request(server.port, ["DELETE /predict", "Host: x"])
    assert status == 405 and json.loads(body)["error"]
    status, body = raw_request(server.port, ["BREW /predict", "Host: x"])  # http.server's own 501
    assert status == 501 and json.loads(body)["error"]


class Broken(HalfMap):
    def run_inputs(self, inputs):
        raise RuntimeError("the runtime fell over\nwith a second line")


def test_an_unexpected_failure_is_a_one_line_500_and_the_server_goes_on(photo_png, capfd):
    with running(Broken()) as srv:
        for _ in range(2):
            assert "RuntimeError: the runtime fell over with a second line" == error_of(
                post(f"{srv.url}/predict", photo_png), 500
            )
        health = json.loads(get(f"{srv.url}/health")[2])
    assert health["requests"] == 2 and health["errors"] == 2
    assert "Traceback" in capfd.readouterr().err  # a bug is logged for the operator


def test_errors_are_counted_in_health(segmenter, photo_png):
    with running(segmenter) as srv:
        post(f"{srv.url}/predict", photo_png)
        post(f"{srv.url}/predict", b"")
        get(f"{srv.url}/nope")
        health = json.loads(get(f"{srv.url}/health")[2])
    assert health["requests"] == 3 and health["errors"] == 2  # /health itself counts after it answers


# --- load -------------------------------------------------------------------------------------


def check_load(server, body: bytes, sequential: int, concurrent: int, rounds: int = 1) -> dict:
    """Zero errors, and no growth of the RSS past the warm-up (two unmeasured concurrent rounds:
    ONNX Runtime's arena and the threads' first allocations). The server runs in this process,
    so the client's memory counts too."""
    result = load_test(server.url, body, sequential, concurrent, rounds=rounds, warmup=2)
    print(format_table(result))
    assert result["errors"] == 0, result
    assert result["sequential"]["requests"] == sequential
    assert result["concurrent"]["requests"] == concurrent * rounds
    for phase in (result["sequential"], result["concurrent"]):  # throughput = answered requests / wall time
        assert phase["median_ms"] <= phase["p90_ms"] <= phase["p99_ms"] <= phase["wall_s"] * 1000
        assert phase["requests_per_s"] == pytest.approx(phase["requests"] / phase["wall_s"])
    assert result["rss_after_mb"] <= result["rss_before_mb"] + RSS_GROWTH_LIMIT_MB, result
    return result


def test_load_50_sequential_and_10_concurrent(server, photo_png):
    check_load(server, photo_png, 50, 10)


@pytest.mark.slow
def test_load_200_sequential_and_20_concurrent_times_5(server, photo_png):
    check_load(server, photo_png, 200, 20, rounds=5)


def test_serve_load_main_exits_non_zero_on_any_error(tmp_path, photo_png, capsys):
    image = tmp_path / "cat.png"
    image.write_bytes(photo_png)
    argv = ["--image", str(image), "--sequential", "3", "--concurrent", "2", "--rounds", "2"]
    with running(HalfMap()) as good:
        assert serve_load.main(["--url", good.url, *argv]) == 0
        out = capsys.readouterr().out
        assert "sequential" in out and "concurrent 2×2" in out and "server RSS" in out
        assert json.loads(get(f"{good.url}/health")[2])["requests"] == 4 + 3 + 4 + 2  # warm-up, 3, 2×2, 2 health
    with running(Broken()) as bad:
        assert serve_load.main(["--url", bad.url, *argv]) == 1
        assert "HTTP 500" in capsys.readouterr().out
    assert serve_load.main(["--url", bad.url, *argv]) == 2  # nobody listens there any more
    assert "cannot reach" in capsys.readouterr().err


# --- the command line -------------------------------------------------------------------------


def read_line_starting(stream, prefix: str, timeout: float = 120) -> str:
    """The first line of ``stream`` that starts with ``prefix``, read in a thread so that a
    server that never gets ready fails the test instead of hanging it."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise AssertionError(f"no line starting {prefix!r} within {timeout} s") from None
        if line.startswith(prefix):
            return line


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job of a non-interactive shell starts


@pytest.mark.parametrize(
    "stop,inherited",
    [(signal.SIGINT, None), (signal.SIGTERM, None), (signal.SIGINT, _ignore_sigint)],
    ids=["ctrl-c", "sigterm", "ctrl-c-after-background-start"],
)
def test_cli_serves_until_ctrl_c_or_sigterm(tiny_dynamic_onnx, photo_png, stop, inherited):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "u2zoo",
            "-q",
            "serve",
            "--artifact",
            str(tiny_dynamic_onnx.path),
            "--port",
            "0",
            "--outputs",
            "cutout",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=inherited,
    )
    try:
        line = read_line_starting(proc.stdout, "serving ")
        assert line.rstrip().endswith("; POST /predict, GET /health)") and tiny_dynamic_onnx.path.name in line
        url = line.split(" on ")[1].split()[0]
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{port}" and port != 0
        assert json.loads(get(f"{url}/health")[2])["sha256"] == tiny_dynamic_onnx.sha256
        code, _, body = post(f"{url}/predict", photo_png)
        assert code == 200 and png_image(body).mode == "RGBA"  # the first of --outputs
        proc.send_signal(stop)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_bad_artifact_and_busy_port_are_one_line_errors(capsys, tiny_dynamic_onnx):
    code, _, err = run_cli(capsys, "serve", "--artifact", "/nonexistent.onnx")
    assert_one_line_error(code, err, "nonexistent")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run_cli(capsys, "serve", "--artifact", tiny_dynamic_onnx.path, "--port", busy.getsockname()[1])
    assert_one_line_error(code, err, "cannot listen on 127.0.0.1")
    code, _, err = run_cli(capsys, "serve", "--artifact", tiny_dynamic_onnx.path, "--outputs", "blurry")
    assert_one_line_error(code, err, "unknown output")
