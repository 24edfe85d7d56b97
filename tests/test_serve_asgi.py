"""`u2zoo serve` as an ASGI service: readiness, Prometheus metrics, OpenAPI, dynamic batching,
timeouts against slow and idle clients, graceful shutdown and --workers. Loopback only."""

from __future__ import annotations

import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="u2zoo serve needs the u2zoo[serve] extra")
pytest.importorskip("prometheus_client", reason="u2zoo serve needs the u2zoo[serve] extra")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_serve import HalfMap, get, png_image, post, read_line_starting, running  # noqa: E402

from conftest import assert_one_line_error, run_cli  # noqa: E402


def png_of_size(width: int, height: int) -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own text parser: {(sample name, labels): value}."""
    code, headers, body = get(f"{url}/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class SlowHalfMap(HalfMap):
    """HalfMap whose engine call takes ``seconds`` and records each call's batch size."""

    def __init__(self, seconds: float = 0.0, gate: threading.Event | None = None):
        self.seconds, self.gate, self.calls = seconds, gate, []

    def run_inputs(self, inputs):
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.seconds)
        self.calls.append(len(inputs))
        return inputs


# --- readiness, metrics, OpenAPI --------------------------------------------------------------


def test_ready_is_503_until_the_warm_up_call_answers_and_health_is_live_meanwhile(tmp_path):
    gate = threading.Event()
    with running(SlowHalfMap(gate=gate)) as srv:
        code, _, body = get(f"{srv.url}/ready")
        assert code == 503 and json.loads(body)["ready"] is False
        assert get(f"{srv.url}/health")[0] == 200  # liveness does not wait for the model
        gate.set()
        deadline = time.monotonic() + 10
        while get(f"{srv.url}/ready")[0] != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.02)
        assert json.loads(get(f"{srv.url}/health")[2])["ready"] is True


def test_metrics_count_what_was_sent(segmenter, photo_png):
    sent_ok, sent_bad = 12, 3
    with running(segmenter, max_batch=4, max_wait_ms=20) as srv:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: post(f"{srv.url}/predict", photo_png)[0], range(sent_ok)))
        assert codes == [200] * sent_ok
        for _ in range(sent_bad):
            assert post(f"{srv.url}/predict", b"not an image" * 10)[0] == 400
        samples = metric_samples(srv.url)
    assert samples[("u2zoo_requests_total", (("path", "/predict"), ("status", "200")))] == sent_ok
    assert samples[("u2zoo_requests_total", (("path", "/predict"), ("status", "400")))] == sent_bad
    assert samples[("u2zoo_request_errors_total", (("status", "400"),))] == sent_bad
    assert samples[("u2zoo_request_seconds_count", (("path", "/predict"),))] == sent_ok + sent_bad
    # every image that reached the engine is in the batch-size histogram (plus the warm-up call)
    images = samples[("u2zoo_batch_size_sum", ())]
    calls = samples[("u2zoo_batch_size_count", ())]
    assert images == sent_ok + 1 and 1 <= calls <= images
    assert ("u2zoo_queue_depth", ()) in samples


def test_openapi_describes_predict_and_docs_page_is_served():
    with running(HalfMap()) as server:
        code, _, body = get(f"{server.url}/openapi.json")
        docs = get(f"{server.url}/docs")
    assert code == 200
    schema = json.loads(body)
    predict = schema["paths"]["/predict"]["post"]
    assert {p["name"] for p in predict["parameters"]} == {"output", "bg"}
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"/health", "/ready", "/metrics"} <= set(schema["paths"])
    code, headers, body = docs
    assert code == 200 and headers["Content-Type"].startswith("text/html") and b"openapi.json" in body


# --- dynamic batching -------------------------------------------------------------------------


def test_concurrent_requests_share_engine_calls_and_each_gets_its_own_answer():
    engine = SlowHalfMap(seconds=0.2)
    sizes = [(40 + 8 * i, 30 + 4 * i) for i in range(8)]
    with running(engine, max_batch=8, max_wait_ms=100) as srv:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda wh: post(f"{srv.url}/predict", png_of_size(*wh)), sizes))
        health = json.loads(get(f"{srv.url}/health")[2])
    for (width, height), (code, _, body) in zip(sizes, answers):
        assert code == 200
        mask = np.asarray(png_image(body))
        assert mask.shape == (height, width)  # its own image, resized back to its own size
        assert (mask[:, : width // 2] == 0).all() and (mask[:, width // 2 + 1 :] == 255).all()
    assert sum(engine.calls) == 8 + 1 and max(engine.calls) > 1, engine.calls  # + 1: the warm-up call
    assert health["max_batch"] == 8 and sum(int(k) * v for k, v in health["batch_sizes"].items()) == 9


def test_batched_service_masks_equal_the_local_pipeline(segmenter, photo_png):
    from test_serve import local_output

    from u2zoo.tasks.outputs import OutputOptions

    expected = local_output(segmenter, photo_png, OutputOptions(), "mask")
    with running(segmenter, max_batch=4, max_wait_ms=50) as srv:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post(f"{srv.url}/predict", photo_png), range(4)))
        batch_sizes = json.loads(get(f"{srv.url}/health")[2])["batch_sizes"]
    for code, _, body in answers:
        assert code == 200
        assert np.abs(np.asarray(png_image(body), np.int16) - expected).max() <= 1
    assert any(int(size) > 1 for size in batch_sizes), batch_sizes


def test_a_static_batch_artifact_serves_batch_1_and_says_so(tmp_path, photo_png, capfd):
    import torch

    from u2zoo.conversion import convert_model
    from u2zoo.converters import get_target
    from u2zoo.tasks.engine import Segmenter

    torch.manual_seed(0)
    static = convert_model("u2net-tiny", "onnx", tmp_path, random_weights=True, progress=False)
    with get_target("onnx").runner(static) as runner:
        with running(Segmenter(runner, static.contract), max_batch=8) as srv:
            assert post(f"{srv.url}/predict", photo_png)[0] == 200
            assert json.loads(get(f"{srv.url}/health")[2])["max_batch"] == 1
    assert "static-batch artifact: batches of 1" in capfd.readouterr().err


# --- slow and idle clients --------------------------------------------------------------------


def health_latencies_ms(url: str, count: int = 10) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        assert get(f"{url}/health")[0] == 200
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def test_idle_connections_and_a_1_byte_per_second_client_do_not_delay_health():
    """50 connections that send nothing, one that sends its headers a byte a second and one
    that sends its body a byte a second: /health still answers within 100 ms, and the slow
    ones are cut off with a JSON 408 at --request-timeout."""
    with running(HalfMap(), request_timeout_s=3, idle_timeout_s=2) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(50)]
        slow_header = socket.create_connection(("127.0.0.1", srv.port))
        slow_body = socket.create_connection(("127.0.0.1", srv.port))
        slow_body.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        stop = threading.Event()

        def trickle() -> None:
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
                if stop.wait(1.0):
                    return
                for sock in (slow_header, slow_body):
                    try:
                        sock.send(bytes([byte]))
                    except OSError:
                        pass

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        time.sleep(1.5)  # the slow clients are mid-request
        latencies = health_latencies_ms(srv.url)
        assert statistics.median(latencies) < 100 and max(latencies) < 1000, latencies

        for sock, what in ((slow_header, "headers"), (slow_body, "body")):
            sock.settimeout(10)
            started = time.monotonic()
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), (what, answer[:200])
            assert b'"error": "request timeout' in answer or b'"error":"request timeout' in answer
            assert time.monotonic() - started < 5
        stop.set()
        # the idle ones were closed after --idle-timeout (2 s): a read gives end of file
        for sock in idle:
            sock.settimeout(5)
            assert sock.recv(1) == b""
            sock.close()
        assert get(f"{srv.url}/health")[0] == 200


def test_a_client_still_sending_after_its_408_reads_the_answer_not_a_reset():
    """Closing a socket that keeps receiving makes the kernel send RST, which destroys an
    unread answer: the server closes in stages (FIN, then drops input for a while)."""
    with running(HalfMap(), request_timeout_s=1, idle_timeout_s=5) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        time.sleep(1.6)  # the 408 was written and the server has begun to close
        for _ in range(3):
            sock.sendall(b"X-Late: 1\r\n")  # the client did not notice and goes on
            time.sleep(0.05)
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"request timeout" in answer, answer[:200]


def test_graceful_shutdown_answers_the_request_in_flight(photo_png):
    engine = SlowHalfMap(seconds=1.0)
    answers = []
    with running(engine, max_batch=1) as srv:
        while get(f"{srv.url}/ready")[0] != 200:
            time.sleep(0.05)
        client = threading.Thread(target=lambda: answers.append(post(f"{srv.url}/predict", photo_png)))
        client.start()
        time.sleep(0.3)  # in the engine now; leaving the block stops the server
    client.join(10)
    assert answers and answers[0][0] == 200 and png_image(answers[0][2]).mode == "L"


# --- the command line -------------------------------------------------------------------------


def test_cli_refuses_bad_workers_and_batch_in_one_line(capsys, tiny_dynamic_onnx):
    artifact = str(tiny_dynamic_onnx.path)
    for flags, pattern in (
        (["--workers", "0"], "--workers must be at least 1"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--max-batch", "many"], "--max-batch takes a number or auto"),
        (["--max-wait-ms", "-1"], "--max-wait-ms must be 0 or more"),
        (["--idle-timeout", "0"], "--idle-timeout must be over 0"),
    ):
        code, _, err = run_cli(capsys, "serve", "--artifact", artifact, "--port", "0", *flags)
        assert_one_line_error(code, err, pattern)


def test_cli_without_the_serve_extra_names_it(capsys, monkeypatch, tiny_dynamic_onnx):
    import u2zoo.tasks.serve as serve

    monkeypatch.setitem(serve.SERVE_PACKAGES, "u2zoo_no_such_module_for_test", "uvicorn")
    code, _, err = run_cli(capsys, "serve", "--artifact", str(tiny_dynamic_onnx.path), "--port", "0")
    assert_one_line_error(code, err, r"u2zoo\[serve\]")


def test_cli_two_workers_share_the_port_count_together_and_stop_gracefully(tiny_dynamic_onnx, photo_png):
    proc = subprocess.Popen(
        [sys.executable, "-m", "u2zoo", "-q", "serve", "--artifact", str(tiny_dynamic_onnx.path), "--port", "0"]
        + ["--workers", "2", "--max-batch", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line_starting(proc.stdout, "serving ")
        assert "2 workers" in line
        url = line.split(" on ")[1].split()[0]
        sent = 24
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(f"{url}/predict", photo_png), range(sent)))
        assert [a[0] for a in answers] == [200] * sent
        pids = {json.loads(get(f"{url}/health")[2])["pid"] for _ in range(30)}
        samples = metric_samples(url)  # any worker answers for both
        assert samples[("u2zoo_requests_total", (("path", "/predict"), ("status", "200")))] == sent
        assert len(pids) >= 1
        proc.send_signal(__import__("signal").SIGTERM)
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_max_batch_auto_takes_the_memory_choice_capped_at_16(segmenter, tiny_dynamic_onnx, capsys):
    import argparse

    from u2zoo.cli.serve import AUTO_MAX_BATCH_CAP, _max_batch

    args = argparse.Namespace(max_batch="auto", artifact=str(tiny_dynamic_onnx.path), model=None)
    size = _max_batch(args, segmenter)
    err = capsys.readouterr().err
    assert 1 <= size <= AUTO_MAX_BATCH_CAP and f"--max-batch auto: {size} (--batch auto:" in err
    assert _max_batch(argparse.Namespace(max_batch=3), segmenter) == 3


def test_the_service_tells_onnx_runtime_to_share_the_cores(tiny_dynamic_onnx, photo_png):
    """Request threads decode and encode beside inference: ONNX Runtime's idle threads must
    sleep, not busy-wait (its default), and the reloaded session still answers."""
    from u2zoo.converters import get_target
    from u2zoo.tasks.engine import Segmenter

    with get_target("onnx").runner(tiny_dynamic_onnx) as runner:
        assert runner.spinning  # ONNX Runtime's default: no allow_spinning entry is set
        with running(Segmenter(runner, tiny_dynamic_onnx.contract)) as srv:
            assert post(f"{srv.url}/predict", photo_png)[0] == 200
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_worker_that_dies_is_replaced(tiny_dynamic_onnx, photo_png):
    import os
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "u2zoo", "-q", "serve", "--artifact", str(tiny_dynamic_onnx.path), "--port", "0"]
        + ["--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = read_line_starting(proc.stdout, "serving ").split(" on ")[1].split()[0]
        pids = {json.loads(get(f"{url}/health")[2])["pid"] for _ in range(40)}
        assert len(pids) == 2, pids  # SO_REUSEPORT spreads 40 connections over both
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        seen: set[int] = set()
        while not (seen - pids):  # a new worker answers
            assert time.monotonic() < deadline, seen
            try:
                seen.add(json.loads(get(f"{url}/health")[2])["pid"])
            except OSError:
                pass  # a connection hashed to the dead worker's socket
            time.sleep(0.1)
        assert post(f"{url}/predict", photo_png)[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert f"worker {victim} exited with code -9; starting another" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
