"""PyTorch eager and torch.compile cells: the state dict as an artifact, CPU or CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from u2zoo.conversion import convert_model
from u2zoo.converters import TARGETS
from u2zoo.gpu import cuda_unavailable_reason

from conftest import assert_one_line_error, run_cli


def test_eager_artifact_round_trips_exactly_at_any_shape(tmp_path, tiny_checkpoint):
    artifact = convert_model(
        "u2net-tiny", "torch", tmp_path, weights=str(tiny_checkpoint), height=64, width=64, progress=False
    )
    assert artifact.path.suffix == ".pt" and artifact.manifest["parity"]["max_abs"] == 0.0
    assert artifact.manifest["parity"]["odd_shape"]["max_abs"] == 0.0  # dynamic: batch 2 at 97×131
    with TARGETS["torch"].runner(artifact, threads=1) as runner:
        assert runner.predict(np.zeros((3, 3, 48, 80), np.float32)).shape == (3, 1, 48, 80)


@pytest.mark.slow  # a cold Inductor compile at three shapes takes minutes on 2 cores
def test_compiled_cell_matches_eager(tmp_path, tiny_checkpoint):
    artifact = convert_model(
        "u2net-tiny", "torch-compile", tmp_path, weights=str(tiny_checkpoint), height=64, width=64, progress=False
    )
    assert artifact.manifest["parity"]["status"] == "ok" and artifact.manifest["parity"]["max_abs"] <= 1e-4


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (("--target", "torch", "--fp16"), "fp16 PyTorch cells run on --device cuda"),
        (("--target", "torch", "--compile-mode", "max-autotune"), "--compile-mode applies to the torch-compile target"),
        (("--target", "torch-compile", "--compile-mode", "fastest"), "unknown compile mode 'fastest'"),
    ],
)
def test_bad_options(capsys, tmp_path, tiny_weights, extra, pattern):
    code, _, err = run_cli(
        capsys, "convert", "--model", "u2net-tiny", "--weights", tiny_weights, *extra, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, pattern)


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="a GPU is present")
def test_bench_on_cuda_without_a_gpu_marks_every_cell_with_its_reason(capsys, tmp_path, tiny_weights):
    import json

    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(data / "a.png")
    code, out, err = run_cli(
        capsys,
        "bench",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        "--data",
        data,
        "--targets",
        "torch,onnx",
        "--precisions",
        "fp32,fp16",
        "--device",
        "cuda",
        "--runs",
        "1",
        "--out",
        tmp_path / "b",
        "--gate",
        "default",
    )
    assert code == 0, err  # unavailable is not a gate failure unless --fail-on-unavailable
    rows = {
        (r["target"], r["precision"]): r
        for r in map(json.loads, (tmp_path / "b" / "results.jsonl").read_text().splitlines())
    }
    assert (
        rows[("torch", "fp32")]["status"] == "unavailable"
        and "no CUDA device visible" in rows[("torch", "fp32")]["reason"]
    )
    assert rows[("onnx", "fp32")]["reason"] == "onnx runs on cpu only, not cuda"
    assert all(r["device"] == "cuda" for r in rows.values()) and "| cuda |" in out
