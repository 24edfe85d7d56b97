"""OpenVINO target: IR round trips in OpenVINO Runtime, NNCF INT8, bad inputs."""

import json

import numpy as np
import pytest
import torch

from u2zoo.conversion import convert_model
from u2zoo.converters import get_target
from u2zoo.errors import BackendUnavailable, ConfigError
from u2zoo.runtime.compare import Tolerance
from u2zoo.zoo.weights import load_model

from conftest import REAL_WEIGHTS, TEST_DATA, needs_shared

pytest.importorskip("openvino")
pytest.importorskip("nncf")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ir_round_trip_matches_torch(tmp_path, tiny_weights, precision):
    artifact = convert_model(
        "u2net-tiny", "openvino", tmp_path, weights=str(tiny_weights), precision=precision, dynamic=True, progress=False
    )
    names = sorted(f["name"] for f in artifact.manifest["files"])
    assert names == [f"u2net-tiny_openvino_{precision}_dynamic.bin", f"u2net-tiny_openvino_{precision}_dynamic.xml"]
    assert artifact.inputs[0].shape == ("batch", 3, "height", "width")
    x = np.random.default_rng(3).standard_normal((3, 3, 97, 131)).astype(np.float32)
    with get_target("openvino").runner(artifact, threads=1) as runner:
        out = runner.predict(x)
    model, _, _ = load_model("u2net-tiny", weights=str(tiny_weights))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert out.shape == (3, 1, 97, 131)
    assert np.abs(out - ref).max() <= (1e-4 if precision == "fp32" else 1e-2)
    manifest = json.loads(artifact.manifest_path.read_text())
    assert manifest["tools"]["openvino"] and manifest["parity"]["passed"]


def test_fp16_ir_stores_half_the_weights(tmp_path, tiny_weights):
    sizes = {}
    for precision in ("fp32", "fp16"):
        artifact = convert_model(
            "u2net-tiny",
            "openvino",
            tmp_path / precision,
            weights=str(tiny_weights),
            precision=precision,
            progress=False,
        )
        sizes[precision] = next(f["size"] for f in artifact.manifest["files"] if f["name"].endswith(".bin"))
    assert sizes["fp16"] < 0.6 * sizes["fp32"]


def test_int8_by_nncf_with_ignored_scope(tmp_path, tiny_weights, capsys):
    calib = TEST_DATA / "test_images" if TEST_DATA.is_dir() else None
    if calib is None:
        pytest.skip("needs the official test images for calibration")
    artifact = convert_model(
        "u2net-tiny",
        "openvino",
        tmp_path,
        weights=str(tiny_weights),
        precision="int8",
        calib=str(calib),
        calib_size=4,
        keep_fp_groups=("outconv",),
        progress=False,
        tolerance=Tolerance(mean_abs=0.05),
    )
    manifest = json.loads(artifact.manifest_path.read_text())
    assert manifest["quantization"]["tool"] == "nncf" and manifest["quantization"]["kept_in_float"] == ["outconv"]
    assert manifest["calibration"]["num_images"] == 4
    assert manifest["calibration"]["ranges"].startswith(("measured", "reused"))
    assert manifest["quantization"]["bias_correction"] == "off"  # ours by default: it hurt U2NETP
    xml = artifact.path.read_text()
    assert "FakeQuantize" in xml  # NNCF inserted real int8 quantizers
    out, err = capsys.readouterr()
    assert "Statistics collection" not in out + err  # NNCF's progress bars are kept off u2zoo's output


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
@needs_shared
def test_bias_correction_is_nncf_s_and_only_when_asked(tmp_path, tiny_weights):
    """--bias-correction runs NNCF's fast bias correction: the biases of the IR change, and the
    manifest says which was used."""
    biases = {}
    for corrected in (False, True):
        artifact = convert_model(
            "u2net-tiny",
            "openvino",
            tmp_path / str(corrected),
            weights=str(tiny_weights),
            precision="int8",
            calib=str(TEST_DATA / "test_images"),
            calib_size=4,
            keep_fp_groups=("outconv",),
            bias_correction=corrected,
            progress=False,
            tolerance=Tolerance(mean_abs=0.05),
        )
        assert artifact.manifest["quantization"]["bias_correction"] == ("fast" if corrected else "off")
        biases[corrected] = artifact.path.with_suffix(".bin").read_bytes()
    assert biases[False] != biases[True]


def test_openvino_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--int8 needs calibration images"):
        convert_model("u2net-tiny", "openvino", tmp_path, random_weights=True, precision="int8")
    with pytest.raises(ConfigError, match="accuracy_control only apply to --int8"):
        convert_model("u2net-tiny", "openvino", tmp_path, random_weights=True, accuracy_control=True)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"pip install 'u2zoo\[openvino\]'"):
        convert_model("u2net-tiny", "openvino", tmp_path, random_weights=True)


@pytest.mark.slow
@needs_shared
def test_real_u2netp_int8_keeping_the_sensitive_groups_meets_the_target(tmp_path):
    images = TEST_DATA / "test_images"
    artifact = convert_model(
        "u2netp",
        "openvino",
        tmp_path,
        weights=str(REAL_WEIGHTS),
        precision="int8",
        calib=str(images),
        keep_fp_groups=("stage2d", "top-level"),
        progress=False,
        parity_images=sorted(images.iterdir()),
    )
    parity = artifact.manifest["parity"]
    assert parity["iou50"] >= 0.98 and parity["mean_abs"] <= 0.01, parity


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
@needs_shared
def test_int8_with_accuracy_control_on_our_parity_metric(tmp_path):
    artifact = convert_model(
        "u2net-tiny",
        "openvino",
        tmp_path,
        random_weights=True,
        precision="int8",
        calib=str(TEST_DATA / "test_images"),
        calib_size=4,
        accuracy_control=True,
        max_drop=0.01,
        progress=False,
        tolerance=Tolerance(mean_abs=0.05),
    )
    assert artifact.manifest["quantization"]["accuracy_control"] is True
    assert artifact.manifest["parity"]["mean_abs"] <= 0.01  # the drop NNCF was asked to respect, measured by us


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_int8_qat_fine_tunes_against_the_float_model(tmp_path, healthy_tiny, calib_dir):
    """NNCF QAT: PTQ ranges, then fine-tuning on the float model's own maps (no labels), then IR."""
    artifact = convert_model(
        "u2net-tiny",
        "openvino",
        tmp_path,
        weights=healthy_tiny,
        precision="int8-qat",
        calib=calib_dir,
        qat_epochs=2,
        qat_lr=1e-4,
        dynamic=True,
        height=64,
        width=64,
        progress=False,
    )
    manifest = artifact.manifest
    assert artifact.path.name == "u2net-tiny_openvino_int8-qat_dynamic.xml"
    assert manifest["parity"]["status"] == "ok" and manifest["parity"]["iou50"] >= 0.98
    assert manifest["quantization"]["tool"] == "nncf (QAT)"
    assert [h["epoch"] for h in manifest["quantization"]["history"]] == [0, 1, 2]  # 0: the PTQ start
    assert manifest["calibration"]["num_images"] == 6
    xml = artifact.path.read_text()
    assert "FakeQuantize" in xml  # real int8 quantization in the IR


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"precision": "int8-qat"}, "needs calibration images"),
        ({"precision": "int8-qat", "calib": "c", "qat_epochs": 0}, "QAT needs ≥ 1 epoch"),
        ({"precision": "int8-qat", "calib": "c", "keep_fp": 2}, "int8-qat keeps named groups only"),
        ({"precision": "int8", "calib": "c", "qat_epochs": 2}, "only apply to --int8-qat"),
        ({"precision": "int8-qat", "calib": "c", "bias_correction": True}, "bias correction are post-training"),
        ({"precision": "fp32", "bias_correction": True}, "bias_correction only apply to --int8"),
    ],
)
def test_int8_qat_bad_options(options, pattern):
    from u2zoo.converters.openvino import OpenVinoOptions
    from u2zoo.errors import ConfigError

    with pytest.raises(ConfigError, match=pattern):
        OpenVinoOptions(**options)
