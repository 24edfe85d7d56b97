"""`u2zoo serve` against hostile or clumsy clients (issue 16), over raw HTTP on 127.0.0.1 only:
request framing, memory under concurrent large images, hang-ups, typos, slow senders."""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from test_serve import HalfMap, error_of, get, post, running

from conftest import assert_one_line_error, run_cli


def png_of(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


SMALL = png_of(32, 32)


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send hand-written bytes, read one response: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


def request_bytes(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body


class SlowMap(HalfMap):
    """A stand-in segmenter whose inference takes ``hold`` seconds."""

    def __init__(self, hold: float):
        self.hold = hold

    def run_inputs(self, inputs):
        time.sleep(self.hold)
        return super().run_inputs(inputs)


# --- #14 one body, one length ------------------------------------------------------------------


def test_repeated_or_signed_content_length_is_400(segmenter_free_server):
    port = segmenter_free_server.port
    n = len(SMALL)
    for lengths in [(n, 5), (5, n), (n, n)]:  # conflicting ones, and identical repeats too (our choice)
        headers = "".join(f"\nContent-Length: {length}" for length in lengths)
        code, head, body = exchange(port, request_bytes(f"POST /predict HTTP/1.1\nHost: x{headers}", SMALL))
        assert "Content-Length" in error_of((code, head, body), 400)
    for bad in [f"+{n}", f"{n // 10}_{n % 10}", f"{n}, {n}"]:  # int() would take the first two
        code, head, body = exchange(
            port, request_bytes(f"POST /predict HTTP/1.1\nHost: x\nContent-Length: {bad}", SMALL)
        )
        assert "Content-Length" in error_of((code, head, body), 400)
    # on any path: a GET's unread body must not be taken for the next request either
    code, head, body = exchange(
        port, request_bytes("GET /health HTTP/1.1\nHost: x\nContent-Length: 2\nContent-Length: 40", b"xx")
    )
    error_of((code, head, body), 400)
    code, _, body = exchange(port, request_bytes(f"POST /predict HTTP/1.1\nHost: x\nContent-Length: {n}", SMALL))
    assert code == 200 and Image.open(io.BytesIO(body)).size == (32, 32)


@pytest.fixture(scope="module")
def segmenter_free_server():
    with running(HalfMap(), request_timeout_s=2) as server:
        yield server


# --- extra a: a misspelt parameter is not ignored ----------------------------------------------


def test_unknown_query_parameter_is_400_with_a_suggestion(segmenter_free_server):
    url = f"{segmenter_free_server.url}/predict"
    message = error_of(post(f"{url}?ouput=cutout", SMALL), 400)
    assert "'ouput'" in message and "did you mean 'output'" in message and "bg" in message
    assert "'colour'" in error_of(post(f"{url}?output=composite&bg=%23fff&colour=red", SMALL), 400)
    assert "'verbose'" in error_of(post(f"{url}?verbose", SMALL), 400)  # a bare name counts too
    code, _, body = post(f"{url}?output=cutout", SMALL)
    assert code == 200 and Image.open(io.BytesIO(body)).mode == "RGBA"


# --- #16 a client that hangs up is not an error ------------------------------------------------


def hang_up(port: int, data: bytes, reset: bool) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if reset:  # close with RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(data)
    sock.close()


def test_a_client_hanging_up_anywhere_logs_at_most_a_line(capfd):
    cut_offs = [
        b"POST /pre",  # in the request line
        b"POST /predict HTTP/1.1\r\nHost:",  # in the headers (the case)
        request_bytes("POST /predict HTTP/1.1\nHost: x\nContent-Length: 1000", SMALL[:10]),  # in the body
        request_bytes(f"POST /predict HTTP/1.1\nHost: x\nContent-Length: {len(SMALL)}", SMALL),
    ]  # whole
    with running(SlowMap(0.2)) as server:
        port = server.port
        capfd.readouterr()
        for _ in range(3):  # whether a reply hits the closed socket is a race: try each a few times
            for data in cut_offs:
                for reset in (False, True):
                    hang_up(port, data, reset)
        time.sleep(1.5)  # the last ones finish their inference and write into a closed socket
        assert get(f"{server.url}/health")[0] == 200
        err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err
    assert len(err.splitlines()) <= 3 * 2 * len(cut_offs), err  # one line per hang-up at most


# --- extra b: a request must arrive within a deadline, however it trickles ---------------------


def trickle(port: int, head: bytes, data: bytes, every: float, give_up: float) -> tuple[float, bytes]:
    """Send ``head``, then ``data`` a byte at a time until the server answers or closes:
    (seconds, answer)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if select.select([sock], [], [], every)[0] or time.monotonic() - started > give_up:
                break
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    return time.monotonic() - started, answer


@pytest.mark.parametrize("where", ["request line", "headers", "body"])
def test_a_request_trickling_past_the_deadline_gets_408_or_is_closed(segmenter_free_server, where):
    port = segmenter_free_server.port
    head = request_bytes(f"POST /predict HTTP/1.1\nHost: x\nContent-Length: {len(SMALL)}")
    cut = {"request line": 5, "headers": 30, "body": len(head)}[where]
    seconds, answer = trickle(port, head[:cut], head[cut:] + SMALL, every=0.2, give_up=20)
    assert seconds < 2 + 4, f"still connected after {seconds:.1f} s"  # the deadline is 2 s
    if answer or where != "request line":  # a half request line may just be hung up on
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert "within 2 s" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert get(f"{segmenter_free_server.url}/health")[0] == 200


# --- #15 memory: the pixels of all images in work at once are bounded -------------------------


def post_all(url: str, body: bytes, n: int) -> list[tuple[int, dict, bytes]]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: post(url, body), range(n)))


def test_concurrent_images_wait_for_the_pixel_budget_and_never_exceed_it():
    with running(SlowMap(0.3), pixel_budget=2 * 32 * 32, budget_wait_s=60) as server:
        results = post_all(f"{server.url}/predict", SMALL, 6)
        health = json.loads(get(f"{server.url}/health")[2])
    assert [code for code, _, _ in results] == [200] * 6
    assert health["pixel_budget"] == 2 * 32 * 32
    assert health["pixels_peak"] == 2 * 32 * 32  # two at once: the budget was reached, never passed
    assert health["pixels_in_use"] == 0


def test_a_full_budget_answers_503_with_retry_after_and_frees_up():
    with running(SlowMap(2.0), pixel_budget=32 * 32, budget_wait_s=0.3) as server:
        started = time.monotonic()
        results = post_all(f"{server.url}/predict", SMALL, 3)
        assert time.monotonic() - started < 10
        assert sorted(code for code, _, _ in results) == [200, 503, 503]
        for result in results:
            if result[0] == 503:
                assert "busy" in error_of(result, 503) and int(result[1]["Retry-After"]) >= 1
        assert post(f"{server.url}/predict", SMALL)[0] == 200


def test_an_image_over_the_whole_budget_is_413_at_once():
    with running(SlowMap(0.0), pixel_budget=32 * 32) as server:
        assert "pixel budget" in error_of(post(f"{server.url}/predict", png_of(64, 64)), 413)
        assert post(f"{server.url}/predict", SMALL)[0] == 200


def test_the_default_budget_is_two_images_at_the_pixel_limit():
    with running(HalfMap(), max_pixels=5000) as server:
        assert json.loads(get(f"{server.url}/health")[2])["pixel_budget"] == 10_000
        assert "MP" in error_of(post(f"{server.url}/predict", png_of(80, 80)), 413)  # --max-pixels first


def test_cli_refuses_a_bad_budget_or_timeout(capsys, tiny_dynamic_onnx):
    for flag, value in [("--pixel-budget", "0"), ("--request-timeout", "0")]:
        code, _, err = run_cli(capsys, "serve", "--artifact", tiny_dynamic_onnx.path, "--port", "0", flag, value)
        assert_one_line_error(code, err, flag)


def test_decoded_images_are_what_the_model_gets():
    """The header read for the budget must not change what is decoded (a palette PNG, say)."""
    image = Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32) % 7, "L").convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with running(HalfMap()) as server:
        code, _, body = post(f"{server.url}/predict?output=cutout", buffer.getvalue())
    assert code == 200
    rgb = np.asarray(Image.open(io.BytesIO(body)))[..., :3]
    assert np.array_equal(rgb, np.asarray(image.convert("RGB")))
