"""`u2zoo bench` end to end on real runtimes, and its bad inputs."""

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_WEIGHTS, TEST_DATA, assert_one_line_error, needs_shared
from conftest import run_cli as run


@pytest.fixture
def data_dir(tmp_path):
    """Images of mixed sizes and modes, plus one unreadable file."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 20), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def bench_args(tiny_weights, data_dir, out, *extra):
    return [
        "bench",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        "--data",
        data_dir,
        "--out",
        out,
        "--runs",
        "2",
        "--warmup",
        "1",
        "--batches",
        "1,2",
        "--threads",
        "1",
        *extra,
    ]


def test_matrix_cells_results_files_and_gate(capsys, tmp_path, tiny_weights, data_dir):
    gate = tmp_path / "gate.yaml"  # random tiny weights: int8 is held to a looser bar than real weights
    gate.write_text("precisions:\n  fp32: {max_abs: 5.0e-4}\n  int8: {iou50_min: 0.9, delta_mae_max: 0.05}\n")
    code, out, err = run(
        capsys,
        *bench_args(
            tiny_weights,
            data_dir,
            tmp_path / "b",
            "--targets",
            "onnx,tensorrt",
            "--precisions",
            "fp32,int8",
            "--gate",
            gate,
            "--keep-fp-groups",
            "outconv",
        ),
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    cells = {(r["target"], r["precision"]): r for r in rows}
    assert set(cells) == {("onnx", "fp32"), ("onnx", "int8"), ("tensorrt", "fp32"), ("tensorrt", "int8")}
    ok = cells[("onnx", "fp32")]
    assert ok["status"] == "ok" and ok["schema"] == "u2zoo.results" and ok["schema_version"] == 1
    assert ok["parity"]["max_abs"] <= 5e-4 and ok["parity"]["iou50"] > 0.99 and ok["gate"]["passed"]
    assert ok["artifact"]["size_bytes"] > 0 and len(ok["artifact"]["sha256"]) == 64
    speed = ok["speed"]
    assert (
        speed["threads"] == 1 and speed["latency_ms_p50"] > 0 and speed["e2e_ms_p50"] >= speed["latency_ms_p50"] * 0.5
    )
    assert set(speed["throughput"]) == {"1", "2"} and speed["peak_rss_mb"] > 0 and speed["load_s"] > 0
    assert ok["host"]["cores"] >= 1 and "load_avg" in ok["host"] and ok["tools"]["onnxruntime"]
    assert "skipped broken.png" in " ".join(ok["notes"])
    int8 = cells[("onnx", "int8")]
    assert int8["status"] == "ok" and int8["parity"]["iou50"] >= 0.9
    manifest = json.loads(
        (tmp_path / "b" / "artifacts" / "u2net-tiny" / "u2net-tiny_onnx_int8_dynamic.u2zoo.json").read_text()
    )
    dumped = np.load(tmp_path / "b" / "calibration" / "u2net-tiny.npz")
    assert manifest["calibration"]["sha256"] == str(dumped["digest"]) and manifest["calibration"]["num_images"] == 3
    assert manifest["quantization"]["kept_in_float"] == ["outconv"]
    # without TensorRT (and a GPU) the cells say so, and carry the parity of the TensorRT-ready ONNX
    from u2zoo.converters import TARGETS

    for precision in ("fp32", "int8") if TARGETS["tensorrt"].unavailable_reason() else ():
        trt = cells[("tensorrt", precision)]
        assert trt["status"] == "unavailable" and trt["device"] == "cuda" and trt["speed"] is None
        assert "engine not built" in trt["reason"] and "ONNX Runtime" in trt["reason"]
    assert cells[("tensorrt", "fp32")]["parity"]["max_abs"] <= 5e-4
    assert cells[("tensorrt", "int8")]["artifact"]["file"] == "u2net-tiny_onnx_int8_dynamic_tensorrt.onnx"
    assert cells[("tensorrt", "int8")]["parity"]["iou50"] >= 0.9
    # printed and written table, CSV with the same cells
    assert "| u2net-tiny" in out and "2 cell(s) unavailable" in out
    with open(tmp_path / "b" / "results.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert (tmp_path / "b" / "results.md").read_text().count("| u2net-tiny") == 4


def test_impossible_gate_exits_non_zero_and_names_the_cell(capsys, tmp_path, tiny_weights, data_dir):
    gate = tmp_path / "impossible.yaml"
    gate.write_text("precisions:\n  fp32:\n    max_abs: 0.0\n    iou50_min: 1.5\n")
    code, out, err = run(capsys, *bench_args(tiny_weights, data_dir, tmp_path / "b", "--gate", gate))
    assert code == 1
    assert "gate failed: u2net-tiny/onnx/fp32: parity_failed: max_abs" in err and "iou50 1 < 1.5" in err
    assert "parity_failed" in out


def test_ground_truth_adds_accuracy_and_resizes_other_sizes(capsys, tmp_path, tiny_weights, data_dir):
    gt = tmp_path / "gt"
    gt.mkdir()
    for stem, size in [("rgb", (64, 48)), ("gray", (10, 15)), ("rgba", (40, 40))]:  # gray's GT is smaller
        Image.fromarray((np.arange(size[0] * size[1]).reshape(size[1], size[0]) % 2 * 255).astype(np.uint8)).save(
            gt / f"{stem}.png"
        )
    code, out, err = run(capsys, *bench_args(tiny_weights, data_dir, tmp_path / "b", "--gt", gt))
    assert code == 0, err
    row = json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[0])
    assert 0 <= row["accuracy"]["mae"] <= 1 and 0 <= row["accuracy"]["max_f"] <= 1
    assert row["parity"]["reference"] == "torch vs ground truth"
    assert "resized 1 ground-truth mask(s)" in out


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--targets", "onnxx"], "unknown target 'onnxx'; did you mean 'onnx'"),
        (["--precisions", "fp8"], "unknown precision 'fp8'"),
        (["--batches", "1,x"], "--batches must be comma-separated integers"),
        (["--runs", "0"], "--runs and --threads must be ≥ 1"),
    ],
)
def test_bad_bench_options(capsys, tmp_path, tiny_weights, data_dir, extra, pattern):
    code, _, err = run(capsys, *bench_args(tiny_weights, data_dir, tmp_path / "b", *extra))
    assert code == 2
    assert_one_line_error(code, err, re.escape(pattern))


def test_two_checkpoints_of_one_model_in_one_run(capsys, tmp_path, tiny_weights, healthy_tiny, data_dir):
    """NAME@PATH: e.g. pruned vs unpruned, timed in the same run; rows and artifacts stay apart."""
    args = bench_args(tiny_weights, data_dir, tmp_path / "b", "--gate", "default")
    args[args.index("u2net-tiny")] = f"u2net-tiny,u2net-tiny@{healthy_tiny}"
    code, out, err = run(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["u2net-tiny", "u2net-tiny@healthy_tiny"]
    assert rows[0]["weights"]["sha256"] != rows[1]["weights"]["sha256"]
    assert all(r["status"] == "ok" and r["gate"]["passed"] for r in rows)  # gates of u2net-tiny apply to both
    assert sorted(p.name for p in (tmp_path / "b" / "artifacts").iterdir()) == ["u2net-tiny", "u2net-tiny@healthy_tiny"]
    code, _, err = run(
        capsys,
        *bench_args(
            tiny_weights,
            data_dir,
            tmp_path / "c",
            "--weights",
            healthy_tiny,
            "--model",
            f"u2net-tiny@{tmp_path / 'missing.pth'}",
        ),
    )
    assert_one_line_error(code, err, "weights file not found")


def test_empty_data_missing_gt_and_bad_gate(capsys, tmp_path, tiny_weights, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, *bench_args(tiny_weights, empty, tmp_path / "b"))
    assert code == 2 and "no readable images" in err
    gt = tmp_path / "gt"
    gt.mkdir()
    code, _, err = run(capsys, *bench_args(tiny_weights, data_dir, tmp_path / "b", "--gt", gt))
    assert code == 2 and "3 image(s) have no ground-truth mask" in err
    gate = tmp_path / "g.yaml"
    gate.write_text("precisions: {fp32: {max_abs: 1e-3, maxabs: 2}}")
    code, _, err = run(capsys, *bench_args(tiny_weights, data_dir, tmp_path / "b", "--gate", gate))
    assert code == 2 and "unknown key 'maxabs'" in err


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
@needs_shared
def test_real_u2netp_fp32_and_fp16_pass_the_default_gates(capsys, tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for name in ("girl.png", "hockey.png", "im_01.png", "rifle2.jpeg"):
        (data / name).symlink_to(TEST_DATA / "test_images" / name)
    code, out, err = run(
        capsys,
        "bench",
        "--model",
        "u2netp",
        "--weights",
        REAL_WEIGHTS,
        "--targets",
        "onnx",
        "--precisions",
        "fp32,fp16",
        "--data",
        data,
        "--out",
        tmp_path / "b",
        "--runs",
        "3",
        "--batches",
        "1",
        "--gate",
        "default",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["weights"]["name"] == "u2netp.fp16_bnfolded"
    assert rows[1]["parity"]["iou50"] >= 0.98 and rows[1]["parity"]["delta_mae"] <= 0.01
