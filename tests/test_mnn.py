"""MNN target: ONNX → .mnn (fp32, fp16 weights, INT8 by mnnquant on our calibration tensors), run
by MNN's Python runtime. The tiny architecture at 64×64 keeps each conversion to seconds."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

pytest.importorskip("MNN")
pytest.importorskip("onnxruntime")

from u2zoo.artifact import open_artifact  # noqa: E402
from u2zoo.conversion import convert_model  # noqa: E402
from u2zoo.converters import TARGETS  # noqa: E402
from u2zoo.errors import BackendUnavailable, ConfigError, ConversionError  # noqa: E402

from conftest import REAL_WEIGHTS, TEST_DATA, assert_one_line_error, needs_shared, run_cli  # noqa: E402

SIZE = {"height": 64, "width": 64}


@pytest.fixture
def mnn_target():
    return TARGETS["mnn"]


def convert(out, **options):
    return convert_model("u2net-tiny", "mnn", out, random_weights=True, progress=False, **SIZE, **options)


def test_fp32_and_fp16_convert_load_back_and_match_torch(tmp_path, mnn_target):
    fp32 = convert(tmp_path)
    fp16 = convert(tmp_path, precision="fp16")
    for artifact in (fp32, fp16):
        assert artifact.manifest["parity"]["status"] == "ok", artifact.manifest["parity"]
        assert artifact.manifest["tools"]["mnn"] and artifact.manifest["parent"]["target"] == "onnx"
        assert artifact.manifest["io"]["inputs"][0]["shape"] == [1, 3, 64, 64]
    assert fp32.manifest["parity"]["max_abs"] <= 1e-4  # measured 1.5e-7
    assert fp16.manifest["parity"]["mean_abs"] <= 1e-4  # measured 4e-6: fp16 weights, fp32 arithmetic
    assert fp16.path.stat().st_size < 0.75 * fp32.path.stat().st_size
    # the proven ONNX the chain started from is published beside the .mnn files
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".mnn", ".onnx")) == [
        "u2net-tiny_mnn_fp16.mnn",
        "u2net-tiny_mnn_fp32.mnn",
        "u2net-tiny_onnx_fp32.onnx",
    ]

    reopened = open_artifact(fp32.path)
    parent = open_artifact(tmp_path / "u2net-tiny_onnx_fp32.onnx")
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with mnn_target.runner(reopened) as mnn, TARGETS["onnx"].runner(parent, threads=1) as ort:
        out = mnn.predict(x)
        assert out.shape == (1, 1, 64, 64) and out.dtype == np.float32 and mnn.last_latency_s > 0
        np.testing.assert_allclose(out, ort.predict(x), atol=1e-5)
        with pytest.raises(ConfigError, match="static shape"):
            mnn.predict(np.zeros((1, 3, 32, 32), np.float32))


def test_dynamic_shapes_run_at_an_odd_size(tmp_path):
    artifact = convert(tmp_path, dynamic=True)
    parity = artifact.manifest["parity"]
    assert artifact.manifest["io"]["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert parity["status"] == "ok" and parity["odd_shape"]["shape"] == [2, 1, 97, 131]
    assert parity["odd_shape"]["max_abs"] <= 1e-4


def test_int8_quantizes_on_the_shared_calibration_tensors(tmp_path, calib_dir, healthy_tiny, mnn_target):
    """The quantizer step, called directly: MNN 3.6.1's int8 CPU runtime returns garbage on
    x86-64, so there the target refuses --int8 and parity cannot be judged; the artifact, its
    calibration record and the group → op-name mapping do not depend on that runtime."""
    import MNN.expr as F

    from u2zoo.converters.base import ModelSource
    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.zoo.archs import count_params
    from u2zoo.zoo.weights import load_model

    model, weights, contract = load_model("u2net-tiny", healthy_tiny, None, False, deploy=True, progress=False)
    source = ModelSource(model, weights, contract, weights.arch, count_params(model))
    parent = convert_model("u2net-tiny", "onnx", tmp_path / "onnx", weights=healthy_tiny, progress=False, **SIZE)
    options = mnn_target.options_type(precision="int8", calib=calib_dir, keep_fp_groups=("stage2d",), **SIZE)
    out = tmp_path / "mnn"
    out.mkdir()
    artifact = mnn_target.convert(source, options, out, "tiny_int8", parent)

    assert [p.name for p in out.iterdir()] == ["tiny_int8.mnn"]  # no calibration text or scale dump left
    expected = calibration_set(calib_dir, contract, None, (64, 64), warn=False)
    manifest = artifact.manifest
    assert manifest["calibration"]["sha256"] == expected.digest and manifest["calibration"]["num_images"] == 6
    quantization = manifest["quantization"]
    assert quantization["feature_quantize_method"] == "KL" and "sequence" in quantization["calibration_input"]
    assert quantization["kept_in_float"] == ["stage2d"] and quantization["skip_quant_op_names"] > 10
    assert manifest["parent"]["sha256"] == parent.sha256
    assert artifact.path.stat().st_size < 0.8 * parent.path.stat().st_size  # int8 weights outside stage2d

    # layer groups map onto MNN op names through the parent ONNX's node names
    names = mnn_target_module().skip_op_names(parent.path, ["stage2d", "top-level"])
    assert "/stage2d/rebnconv1d/conv_s1/Conv_output_0" in names and "mask" in names
    # every op MNN made of the group is named (a fused Conv+Relu keeps one of the two names)
    group_ops = {n for n in F.load_as_dict(str(artifact.path)) if n.startswith("/stage2d/")}
    assert len(group_ops) > 20 and group_ops <= set(names)
    with pytest.raises(ConfigError, match="unknown layer group 'stage9'"):
        mnn_target_module().skip_op_names(parent.path, ["stage9"])


def mnn_target_module():
    return importlib.import_module("u2zoo.converters.mnn")


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, mnn_target):
    size = ["--height", "64", "--width", "64"]
    base = ["convert", "--model", "u2net-tiny", "--random-weights", "--target", "mnn", *size]
    with pytest.raises(ConfigError, match="--int8 needs calibration images"):
        mnn_target.options_type(precision="int8")
    code, _, err = run_cli(capsys, *base, "--int8", "--out", tmp_path / "a")
    if "int8" in mnn_target.precisions:
        assert_one_line_error(code, err, r"--int8 needs calibration images")
    else:  # a known-broken MNN int8 runtime on this host: refused first, with the reason
        assert_one_line_error(code, err, r"int8 CPU kernels return invalid.*--fp16")
    code, _, err = run_cli(capsys, *base, "--calib", tmp_path, "--out", tmp_path / "a")
    assert_one_line_error(code, err, r"only apply to --int8")
    code, _, err = run_cli(capsys, *base, "--int8-qat", "--calib", tmp_path, "--out", tmp_path / "a")
    assert_one_line_error(code, err, r"quantization-aware training is not wired")

    # MNN's converter refusing its input is one line too
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ConversionError, match=r"MNN's converter did not convert bad\.onnx: .*not onnx model"):
        mnn_target_module().convert_onnx(bad, tmp_path / "bad.mnn", fp16=False)

    # a corrupt .mnn is refused by its sha256 before MNN reads a byte of it
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "ok")
    assert code == 0, err
    model = tmp_path / "ok" / "u2net-tiny_mnn_fp32.mnn"
    data = bytearray(model.read_bytes())
    data[1000:1100] = bytes(b ^ 0xFF for b in data[1000:1100])
    model.write_bytes(bytes(data))
    image = TEST_DATA / "test_images" / "boat.jpg"
    if not image.is_file():
        from PIL import Image

        image = tmp_path / "photo.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    code, _, err = run_cli(capsys, "predict", "--artifact", model, image, "--out", tmp_path / "masks")
    assert_one_line_error(code, err, r"u2net-tiny_mnn_fp32\.mnn: sha256 .* does not match its manifest")

    # no MNN here: the proven ONNX stays, and the error names the extra that installs it
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "MNN" else real(name, *a))
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "missing")
    assert_one_line_error(code, err, r"MNN not installed \(pip install 'u2zoo\[mnn\]'\).*MNNConvert -f ONNX")
    with pytest.raises(BackendUnavailable, match=r"u2zoo\[mnn\]"):
        convert(tmp_path / "missing2")


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
@needs_shared
def test_real_u2netp_fp32_on_the_official_images(tmp_path):
    images = sorted((TEST_DATA / "test_images").iterdir())
    artifact = convert_model("u2netp", "mnn", tmp_path, weights=str(REAL_WEIGHTS), parity_images=images, progress=False)
    parity = artifact.manifest["parity"]
    assert parity["num_images"] == 18 and parity["status"] == "ok"
    assert parity["max_abs"] <= 2e-4, parity  # measured 8.5e-5 (F(2x2,3x3) Winograd; MNN's default: 1.1e-3)
    assert json.loads(artifact.manifest_path.read_text())["tools"]["mnn"]
