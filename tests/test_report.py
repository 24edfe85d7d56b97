"""`u2zoo report`: merging results.jsonl files from several runs into table, CSV, plots and HTML."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from u2zoo.benchmarks.report import render_markdown, write_report, write_results
from u2zoo.benchmarks.results import RESULTS_SCHEMA_VERSION, comparison_rows, host_label, load_results
from u2zoo.errors import BackendUnavailable, ConfigError

CPU = "AMD EPYC 7B13 64-Core Processor"


def _row(run_id: str, threads: int, target: str, precision: str, status: str = "ok", **over) -> dict:
    """A results row as `u2zoo bench` writes it; timed fields scale with the thread count."""
    timed = status in ("ok", "parity_failed")
    p50 = {("onnx", "fp32"): 95.1, ("onnx", "fp16"): 140.27}.get((target, precision), 80.0) / threads
    row = {
        "schema": "u2zoo.results",
        "schema_version": RESULTS_SCHEMA_VERSION,
        "run_id": run_id,
        "created": "2026-11-25T12:00:00+00:00",
        "model": "u2netp",
        "weights": {"name": "u2netp.fp16_bnfolded", "sha256": "ab" * 32, "source": "registry"},
        "target": target,
        "precision": precision,
        "options": {"dynamic": True},
        "status": status,
        "reason": None,
        "artifact": {
            "file": f"u2netp_{precision}.{target}",
            "size_bytes": 4658467 if precision == "fp32" else 2345678,
            "sha256": "cd" * 32,
        }
        if status != "unavailable"
        else None,
        "parity": {
            "max_abs": 8.5e-05 if precision == "fp32" else 0.001234,
            "mean_abs": 9e-07,
            "iou50": 1.0,
            "delta_mae": 0.0,
            "delta_max_f": 0.0,
            "boundary_mae": 1e-6,
            "reference": "torch",
        }
        if status != "unavailable"
        else None,
        "accuracy": None,
        "speed": {
            "threads": threads,
            "batch": 1,
            "latency_ms_p50": p50,
            "latency_ms_p90": p50 * 1.08,
            "fps": 1000.0 / p50,
            "e2e_ms_p50": p50 + 25.0,
            "load_s": 0.4,
            "peak_rss_mb": 610.0,
            "throughput": {"1": 1000.0 / p50},
        }
        if timed
        else None,
        "gate": {"passed": status == "ok", "failures": [] if status == "ok" else ["parity"]},
        "host": {
            "hostname": "ci-1",
            "cpu": CPU,
            "cores": 2,
            "load_avg": [0.5, 0.4, 0.3],
            "gpu": None,
            "driver": None,
            "os": "Linux-6.1-x86_64",
            "python": "3.11.7",
        },
        "tools": {"torch": "2.13.0", "onnxruntime": "1.32.0"},
    }
    row.update(over)
    return row


def _cells(run_id: str, threads: int) -> list[dict]:
    return [
        _row(run_id, threads, "onnx", "fp32"),
        _row(run_id, threads, "onnx", "fp16"),
        _row(
            run_id,
            threads,
            "openvino",
            "fp32",
            "unavailable",
            reason="openvino not installed (pip install 'u2zoo[openvino]')",
            gate=None,
        ),
        _row(
            run_id,
            threads,
            "onnx",
            "int8",
            "parity_failed",
            reason="max abs 0.21 > 0.001 | IoU 0.91",
            parity={"max_abs": 0.21, "mean_abs": 0.012, "iou50": 0.91, "delta_mae": 0.004, "reference": "torch"},
        ),
    ]


def _write(path: Path, rows: list[dict], blank_lines: bool = False) -> Path:
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def results(tmp_path) -> list[Path]:
    """Two runs on the same machine: 1 thread and 2 threads."""
    return [
        _write(tmp_path / "t1.jsonl", _cells("20261125T120000Z-aaaaaa", 1), blank_lines=True),
        _write(tmp_path / "t2.jsonl", _cells("20261125T130000Z-bbbbbb", 2)),
    ]


def test_merge_and_host_labels(results):
    rows = load_results(results)
    assert len(rows) == 8
    flat = comparison_rows(rows)
    hosts = {r["host"] for r in flat}
    # the unavailable cell has no speed section but still joins its run's thread count
    assert hosts == {"ci-1 · AMD EPYC 7B13 · 1t", "ci-1 · AMD EPYC 7B13 · 2t"}
    keys = [(r["model"], r["target"], r["precision"], r["host"]) for r in flat]
    assert keys == sorted(keys)
    fp32 = next(r for r in flat if r["precision"] == "fp32" and r["target"] == "onnx" and r["host"].endswith("2t"))
    assert fp32["p50_ms"] == pytest.approx(47.55) and fp32["size_mb"] == pytest.approx(4.658467)
    assert fp32["gate"] == "pass"
    openvino = next(r for r in flat if r["target"] == "openvino")
    assert openvino["status"] == "unavailable" and openvino["gate"] == "-" and openvino["p50_ms"] is None
    assert "openvino not installed" in openvino["reason"]
    gpu = _row(
        "r",
        1,
        "onnx",
        "fp32",
        host={"hostname": "gpu-1", "cpu": "Intel(R) Xeon(R) CPU @ 2.20GHz", "gpu": "NVIDIA H100"},
    )
    assert host_label(gpu) == "gpu-1 · Intel Xeon @ 2.20GHz · 1t · NVIDIA H100"


def test_gpu_cells_show_their_device_and_fps_per_batch():
    """CPU and GPU hosts side by side: the device column and FPS at each batch the cell ran."""
    cpu, gpu = _cells("20261125T120000Z-aaaaaa", 1)[0], _cells("20261125T130000Z-bbbbbb", 1)[0]
    gpu = dict(
        gpu,
        target="tensorrt",
        device="cuda",
        host=dict(gpu["host"], gpu="NVIDIA H100"),
        speed=dict(gpu["speed"], throughput={"16": 2400.0, "1": 410.25, "8": 1900.5}),
    )
    flat = {r["device"]: r for r in comparison_rows([cpu, gpu])}
    assert flat["cuda"]["fps_by_batch"] == "1: 410.2 · 8: 1900.5 · 16: 2400.0"
    assert flat["cpu"]["device"] == "cpu" and "NVIDIA H100" in flat["cuda"]["host"]
    md = render_markdown([cpu, gpu])
    assert "FPS by batch" in md and "| tensorrt | fp32 | cuda | ok |" in md


def test_bench_results_round_trip(tmp_path):
    """`u2zoo bench` writes with write_results; `u2zoo report` must read exactly that back."""
    rows = _cells("20261125T120000Z-aaaaaa", 1)
    paths = write_results(rows, tmp_path / "bench")
    assert set(paths) == {"jsonl", "csv", "markdown"}
    assert load_results([paths["jsonl"]]) == rows
    assert paths["markdown"].read_text(encoding="utf-8").count("| u2netp |") == 4


def test_markdown_and_csv(results, tmp_path):
    pytest.importorskip("matplotlib")
    rows = load_results(results)
    paths = write_report(rows, tmp_path / "out")
    md = paths["markdown"].read_text(encoding="utf-8")
    assert (
        "| ci-1 · AMD EPYC 7B13 · 1t | u2netp | onnx | fp32 | cpu | ok | 4.66 | 8.5e-05 | 9e-07 | 1.000 | 0 | 95.1 | 102.7 |"
        in md
    )
    assert "| 47.5 |" in md or "| 47.6 |" in md  # 95.1 / 2
    assert "0.00123" in md and "140.3" in md
    assert "openvino not installed (pip install 'u2zoo[openvino]')" in md
    assert "max abs 0.21 > 0.001 \\| IoU 0.91" in md  # pipes in reasons do not break the table
    assert "| unavailable | - | - |" in md
    assert "CPU AMD EPYC 7B13 64-Core Processor, 2 cores, no GPU" in md and "onnxruntime 1.32.0" in md
    assert "20261125T120000Z-aaaaaa" in md and "20261125T130000Z-bbbbbb" in md
    assert "max F (GT)" not in md  # no ground-truth accuracy in these runs

    with paths["csv"].open(newline="", encoding="utf-8") as fh:
        parsed = list(csv.DictReader(fh))
    flat = comparison_rows(rows)
    assert len(parsed) == len(flat) == 8
    for got, want in zip(parsed, flat):
        for column, value in got.items():
            if want[column] is None:
                assert value == ""
            elif isinstance(want[column], float):
                assert float(value) == want[column]
            else:
                assert value == str(want[column])


def _png_ok(path: Path) -> None:
    import numpy as np
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.width > 400 and img.height > 250
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > 0


def test_plots_and_html(results, tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_report(load_results(results), tmp_path / "out")
    assert set(paths) == {"markdown", "csv", "html", "accuracy_vs_fps", "latency"}
    _png_ok(paths["accuracy_vs_fps"])
    _png_ok(paths["latency"])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left
    page = paths["html"].read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert page.count('<tr class="ok">') == 4 and page.count('<tr class="parity_failed">') == 2
    assert '<td class="num">95.1</td>' in page
    assert "pip install &#x27;u2zoo[openvino]&#x27;" in page  # escaped
    assert "20261125T120000Z-aaaaaa" in page and "ci-1 · AMD EPYC 7B13 · 2t" in page
    assert "IoU@0.5 vs torch reference" in page


def test_ground_truth_accuracy_is_plotted_and_tabled(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        _row("r1", 1, "onnx", t, accuracy={"mae": 0.03, "max_f": f, "s_measure": 0.88, "iou50": 0.85})
        for t, f in (("fp32", 0.912), ("fp16", 0.9105))
    ]
    paths = write_report(load_results([_write(tmp_path / "gt.jsonl", rows)]), tmp_path / "out")
    assert "max F (GT)" in paths["markdown"].read_text(encoding="utf-8")
    assert "max F-measure vs ground truth" in paths["html"].read_text(encoding="utf-8")
    _png_ok(paths["accuracy_vs_fps"])


def test_no_timed_cells_still_writes_everything(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        _row("r1", 1, "openvino", "fp32", "unavailable", reason="openvino not installed"),
        _row("r1", 1, "tflite", "fp32", "convert_failed", reason="converter crashed", speed=None),
    ]
    paths = write_report(load_results([_write(tmp_path / "r.jsonl", rows)]), tmp_path / "out")
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    _png_ok(paths["latency"])
    assert "converter crashed" in paths["markdown"].read_text(encoding="utf-8")
    assert paths["html"].read_text(encoding="utf-8").count("data:image/png;base64,") == 2


def test_missing_matplotlib_is_backend_unavailable(results, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(BackendUnavailable, match=r"matplotlib.*u2zoo\[report\]"):
        write_report(load_results(results), tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # fails before writing anything


def test_corrupt_line_names_file_and_line(results):
    text = results[1].read_text(encoding="utf-8").splitlines()
    text[2] = text[2][:40]  # a truncated write
    results[1].write_text("\n".join(text) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"corrupt results file .*t2\.jsonl line 3: not JSON"):
        load_results(results)


def test_missing_field_names_file_and_line(tmp_path):
    row = _row("r", 1, "onnx", "fp32")
    del row["status"]
    with pytest.raises(ConfigError, match=r"r\.jsonl line 2: missing field\(s\) status"):
        load_results([_write(tmp_path / "r.jsonl", [_row("r", 1, "onnx", "fp16"), row])])
    (tmp_path / "list.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1: not a JSON object"):
        load_results([tmp_path / "list.jsonl"])


def test_other_schema_version_is_refused(tmp_path):
    row = _row("r", 1, "onnx", "fp32", schema_version=2)
    with pytest.raises(ConfigError, match=r"cannot merge results schema v2 from .*v2\.jsonl with v1"):
        load_results([_write(tmp_path / "v2.jsonl", [row])])


def test_wrong_schema_name_is_refused(tmp_path):
    row = _row("r", 1, "onnx", "fp32", schema="u2zoo.artifact")
    with pytest.raises(ConfigError, match=r"schema 'u2zoo\.artifact' is not 'u2zoo\.results'"):
        load_results([_write(tmp_path / "m.jsonl", [row])])


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(ConfigError, match=r"results file not found: .*nope\.jsonl"):
        load_results([tmp_path / "nope.jsonl"])
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no result rows"):
        load_results([tmp_path / "empty.jsonl"])
    with pytest.raises(ConfigError, match="no results files"):
        load_results([])
    with pytest.raises(ConfigError, match="no result rows"):
        write_report([], tmp_path / "out")


def test_null_sections_and_odd_values_do_not_crash(tmp_path):
    row = _row("r", 1, "onnx", "fp32")
    weird = copy.deepcopy(row) | {
        "host": None,
        "speed": {"latency_ms_p50": "fast", "threads": None},
        "parity": None,
        "artifact": None,
        "gate": None,
        "reason": "multi\nline",
    }
    rows = load_results([_write(tmp_path / "r.jsonl", [row, weird])])
    md = render_markdown(rows)
    assert "| unknown host | u2netp | onnx | fp32 | cpu | ok | - |" in md
    assert "multi line" in md
