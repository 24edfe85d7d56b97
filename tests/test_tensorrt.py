"""TensorRT target: everything up to the engine runs here (the TensorRT-ready ONNX, its ORT
parity, the trtexec handoff, the refusals); the engine build and run need `tensorrt` with an
NVIDIA GPU and skip elsewhere with the reason."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from u2zoo.converters import TARGETS  # noqa: E402
from u2zoo.converters.tensorrt import TensorRTOptions, check_onnx_for_tensorrt, engine_mismatch, trtexec_command  # noqa: E402
from u2zoo.errors import ConfigError  # noqa: E402

from conftest import REAL_WEIGHTS, TEST_DATA, assert_one_line_error, needs_shared, run_cli  # noqa: E402

TRT_REASON = TARGETS["tensorrt"].unavailable_reason()
needs_tensorrt = pytest.mark.skipif(
    TRT_REASON is not None, reason=f"TensorRT engines cannot be built here: {TRT_REASON}"
)
without_tensorrt = pytest.mark.skipif(
    TRT_REASON is None, reason="TensorRT and a GPU are present: nothing is handed off"
)
SIZE = ("--height", "64", "--width", "64")


def convert(capsys, weights, out, *extra):
    return run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        weights,
        "--target",
        "tensorrt",
        *SIZE,
        "--out",
        out,
        *extra,
    )


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"min_batch": 4, "opt_batch": 2}, "1 ≤ min ≤ opt ≤ max"),
        ({"max_batch": 0}, "1 ≤ min ≤ opt ≤ max"),
        ({"workspace_mb": 0}, "workspace"),
        ({"precision": "int8"}, "--int8 needs calibration images"),
        ({"calib": "x"}, "only apply to --int8"),
        ({"precision": "int8-qat", "calib": "c", "keep_fp": 1}, "int8-qat keeps named groups only"),
        ({"precision": "int8", "calib": "c", "qat_epochs": 1}, "only apply to --int8-qat"),
    ],
)
def test_bad_options_are_refused(options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TensorRTOptions(**options)


def test_trtexec_command_is_the_same_build():
    options = TensorRTOptions(
        precision="int8", calib="c", opt_batch=4, max_batch=32, workspace_mb=1024, timing_cache="/tmp/t.cache"
    )
    args = shlex.split(trtexec_command("m.onnx", "m.engine", "input", options, (320, 320)))
    assert args[0] == "trtexec" and "--onnx=m.onnx" in args and "--saveEngine=m.engine" in args
    assert {
        "--minShapes=input:1x3x320x320",
        "--optShapes=input:4x3x320x320",
        "--maxShapes=input:32x3x320x320",
        "--stronglyTyped",
        "--timingCacheFile=/tmp/t.cache",
        "--memPoolSize=workspace:1024M",
    } <= set(args)
    assert not any(a.startswith(("--int8", "--fp16", "--calib")) for a in args)  # precision comes from the ONNX


def test_engine_mismatch_names_gpu_and_tensorrt_version():
    built = {"gpu": "NVIDIA H100", "compute_capability": "9.0", "tensorrt": "10.13.3"}
    assert engine_mismatch(built, dict(built)) is None
    other = engine_mismatch(built, {"gpu": "NVIDIA A10", "compute_capability": "8.6", "tensorrt": "11.0.0"})
    assert "9.0 (NVIDIA H100)" in other and "8.6 (NVIDIA A10)" in other and "TensorRT 11.0.0" in other


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, healthy_tiny, calib_dir):
    """Three ONNX inputs a user might pass: fp32 (dynamic), fp32 with batch fixed at 1, and the
    default (asymmetric uint8) ORT int8."""
    from u2zoo.conversion import convert_model

    out = tmp_path_factory.mktemp("onnx")
    size = {"height": 64, "width": 64, "weights": healthy_tiny, "progress": False}
    return {
        "fp32": convert_model("u2net-tiny", "onnx", out, dynamic=True, **size).path,
        "fixed": convert_model("u2net-tiny", "onnx", out, **size).path,
        "u8s8": convert_model("u2net-tiny", "onnx", out, precision="int8", calib=calib_dir, dynamic=True, **size).path,
    }


def test_onnx_without_qdq_is_refused_for_int8_with_the_way_to_quantize(capsys, tmp_path, healthy_tiny, tiny_onnx):
    code, _, err = convert(capsys, healthy_tiny, tmp_path / "o", "--int8", "--onnx", tiny_onnx["fp32"])
    assert_one_line_error(code, err, r"--int8 needs an ONNX with Q/DQ nodes; .* has none \(it is fp32\)")
    assert "--int8-scheme tensorrt" in err and not (tmp_path / "o").exists()


def test_asymmetric_qdq_and_other_precisions_are_refused(tiny_onnx):
    with pytest.raises(ConfigError, match="non-zero zero points.*--int8-scheme tensorrt"):
        check_onnx_for_tensorrt(tiny_onnx["u8s8"], "int8", 1, 16)
    with pytest.raises(ConfigError, match="is a fp32 ONNX .* cannot give fp16"):
        check_onnx_for_tensorrt(tiny_onnx["fp32"], "fp16", 1, 16)
    with pytest.raises(ConfigError, match="fixed batch of 1, outside the profile 1..16"):
        check_onnx_for_tensorrt(tiny_onnx["fixed"], "fp32", 1, 16)
    check_onnx_for_tensorrt(tiny_onnx["fixed"], "fp32", 1, 1)  # a profile of exactly its batch is fine


def test_quantizer_options_with_a_given_onnx_are_refused(tiny_onnx):
    with pytest.raises(ConfigError, match="calib apply when u2zoo quantizes"):
        TensorRTOptions(precision="int8", onnx=str(tiny_onnx["u8s8"]), calib="x")


@without_tensorrt
def test_without_tensorrt_the_ready_onnx_and_trtexec_script_are_left(capsys, tmp_path, healthy_tiny, calib_dir):
    """The headline command on a machine without TensorRT: a one-line error naming what is
    missing, a proven symmetric Q/DQ ONNX, and the trtexec line to finish on the device."""
    import onnxruntime as ort

    out = tmp_path / "o"
    code, _, err = convert(capsys, healthy_tiny, out, "--int8", "--calib", calib_dir, "--keep-fp-groups", "outconv")
    assert_one_line_error(code, err, r"cannot build the tensorrt artifact here: .*(tensorrt not installed|no CUDA)")
    onnx_path = out / "u2net-tiny_onnx_int8_dynamic_tensorrt.onnx"
    assert onnx_path.name in err and "trtexec" in err
    manifest = json.loads((out / "u2net-tiny_onnx_int8_dynamic_tensorrt.u2zoo.json").read_text())
    assert manifest["parity"]["status"] == "ok" and manifest["parity"]["iou50"] >= 0.98
    assert manifest["quantization"]["scheme"] == "tensorrt" and manifest["quantization"]["kept_in_float"] == ["outconv"]
    check_onnx_for_tensorrt(onnx_path, "int8", 1, 16)  # symmetric int8 Q/DQ, dynamic batch
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((16, 3, 64, 64), np.float32)})[0].shape == (16, 1, 64, 64)
    script = (out / "u2net-tiny_tensorrt_int8_dynamic_tensorrt.trtexec.sh").read_text()
    assert f"--onnx={onnx_path.name}" in script and "--maxShapes=input:16x3x64x64" in script
    assert "--timingCacheFile=timing.cache" in script  # relative: the folder travels to the device
    assert not list(out.glob("*.engine")) and not list(out.glob(".u2zoo-staging-*"))


@without_tensorrt
@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_int8_qat_handoff_is_the_pt2e_qdq_onnx(capsys, tmp_path, healthy_tiny, calib_dir):
    pytest.importorskip("torchao")
    out = tmp_path / "o"
    code, _, err = convert(capsys, healthy_tiny, out, "--int8-qat", "--calib", calib_dir, "--qat-epochs", "1")
    assert code != 0 and "trtexec" in err
    onnx_path = out / "u2net-tiny_onnx_int8-qat_dynamic.onnx"
    manifest = json.loads(onnx_path.with_suffix(".u2zoo.json").read_text())
    assert manifest["quantization"]["tool"] == "torchao pt2e (QAT)" and manifest["parity"]["status"] == "ok"
    check_onnx_for_tensorrt(onnx_path, "int8-qat", 1, 16)
    assert (out / "u2net-tiny_tensorrt_int8-qat_dynamic.trtexec.sh").is_file()


def test_int8_qat_with_a_given_onnx_is_refused(tiny_onnx):
    with pytest.raises(ConfigError, match="--int8 --onnx"):
        TensorRTOptions(precision="int8-qat", onnx=str(tiny_onnx))


@without_tensorrt
def test_fp16_handoff_builds_a_float16_onnx(capsys, tmp_path, healthy_tiny):
    import onnx

    out = tmp_path / "o"
    code, _, err = convert(capsys, healthy_tiny, out, "--fp16", "--opt-batch", "2", "--max-batch", "4")
    assert code != 0 and "trtexec" in err
    onnx_path = out / "u2net-tiny_onnx_fp16_dynamic.onnx"
    check_onnx_for_tensorrt(onnx_path, "fp16", 1, 4)
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in onnx.load(str(onnx_path)).graph.initializer)
    assert "--maxShapes=input:4x3x64x64" in (out / "u2net-tiny_tensorrt_fp16_dynamic.trtexec.sh").read_text()


@needs_tensorrt
def test_engine_builds_runs_and_refuses_batches_outside_its_profile(tmp_path, healthy_tiny):
    from u2zoo.conversion import convert_model

    artifact = convert_model(
        "u2net-tiny",
        "tensorrt",
        tmp_path,
        weights=healthy_tiny,
        precision="fp16",
        height=64,
        width=64,
        max_batch=4,
        progress=False,
    )
    assert artifact.manifest["parity"]["status"] == "ok"
    assert artifact.manifest["tensorrt"]["compute_capability"] and artifact.manifest["tensorrt"]["trtexec"]
    with TARGETS["tensorrt"].runner(artifact) as runner:
        assert runner.predict(np.zeros((4, 3, 64, 64), np.float32)).shape == (4, 1, 64, 64)
        with pytest.raises(ConfigError, match="outside this engine's profile 1..4"):
            runner.predict(np.zeros((5, 3, 64, 64), np.float32))


@pytest.mark.slow
@needs_shared
@without_tensorrt
def test_real_u2netp_tensorrt_ready_int8_onnx_meets_the_issue_bar(capsys, tmp_path):
    """Q/DQ INT8 ONNX for TensorRT of real U2NETP: IoU ≥ 0.98 vs torch in ONNX Runtime (stage2d float)."""
    code, _, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2netp",
        "--weights",
        REAL_WEIGHTS,
        "--target",
        "tensorrt",
        "--int8",
        "--calib",
        TEST_DATA / "test_human_images",
        "--keep-fp-groups",
        "stage2d",
        "--parity-images",
        TEST_DATA / "test_images",
        "--out",
        tmp_path,
    )
    assert code != 0 and "trtexec" in err
    manifest = json.loads((tmp_path / "u2netp_onnx_int8_dynamic_tensorrt.u2zoo.json").read_text())
    assert manifest["parity"]["status"] == "ok" and manifest["parity"]["iou50"] >= 0.98
