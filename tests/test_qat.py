"""QAT to a plain QDQ ONNX (pt2e) and the fine-tuning loop shared with NNCF's QAT."""

from __future__ import annotations

import pytest
import torch

from u2zoo.conversion import convert_model
from u2zoo.converters.onnx import OnnxOptions
from u2zoo.errors import ConfigError
from u2zoo.quantization.qat import fold_batchnorm
from u2zoo.zoo.archs import build_arch

from conftest import REAL_WEIGHTS, TEST_DATA, needs_shared

pytest.importorskip("torchao")
onnx = pytest.importorskip("onnx")


@pytest.mark.parametrize("arch", ["u2net-tiny", "u2net-lite"])
def test_batchnorm_folding_keeps_the_outputs(arch):
    torch.manual_seed(0)
    model = build_arch(arch, deploy=True)
    for module in model.modules():  # non-trivial statistics, so folding has something to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(0.0, 0.2)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_onnx_int8_qat_is_a_symmetric_qdq_graph_that_tensorrt_accepts(tmp_path, healthy_tiny, calib_dir):
    from u2zoo.converters.tensorrt import check_onnx_for_tensorrt

    artifact = convert_model(
        "u2net-tiny",
        "onnx",
        tmp_path,
        weights=healthy_tiny,
        precision="int8-qat",
        calib=calib_dir,
        qat_epochs=1,
        dynamic=True,
        height=64,
        width=64,
        progress=False,
    )
    manifest = artifact.manifest
    assert artifact.path.name == "u2net-tiny_onnx_int8-qat_dynamic.onnx"
    assert manifest["parity"]["status"] == "ok" and manifest["parity"]["iou50"] >= 0.98
    assert manifest["parity"]["odd_shape"]["shape"] == [2, 1, 97, 131]  # dynamic batch and size in ORT
    record = manifest["quantization"]
    assert record["tool"] == "torchao pt2e (QAT)" and [h["epoch"] for h in record["history"]] == [0, 1]
    assert manifest["calibration"]["num_images"] == 6
    model = onnx.load(str(artifact.path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("Conv") == 119  # every conv has Q/DQ around it
    check_onnx_for_tensorrt(artifact.path, "int8", 1, 16)  # int8 zero points, all 0


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_onnx_int8_qat_keeps_named_groups_in_float(tmp_path, healthy_tiny, calib_dir):
    artifact = convert_model(
        "u2net-tiny",
        "onnx",
        tmp_path,
        weights=healthy_tiny,
        precision="int8-qat",
        calib=calib_dir,
        qat_epochs=1,
        keep_fp_groups=("stage2d",),
        height=64,
        width=64,
        progress=False,
    )
    assert artifact.manifest["quantization"]["kept_in_float"] == ["stage2d"]
    model = onnx.load(str(artifact.path))
    by_name = {init.name: init for init in model.graph.initializer}
    # stage2d's conv weights stay float initializers; every other conv reads a dequantized int8 weight
    float_weights = [name for name, init in by_name.items() if init.data_type == 1 and len(init.dims) == 4]
    assert len(float_weights) == 12 and all(n.startswith("stage2d.") for n in float_weights), float_weights  # RSU6
    with pytest.raises(ConfigError, match="unknown layer group"):
        convert_model(
            "u2net-tiny",
            "onnx",
            tmp_path,
            weights=healthy_tiny,
            precision="int8-qat",
            calib=calib_dir,
            keep_fp_groups=("stage9",),
            progress=False,
        )


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"precision": "int8-qat"}, "needs calibration images"),
        ({"precision": "int8-qat", "calib": "c", "keep_fp": 2}, "keeps named groups only"),
        ({"precision": "int8-qat", "calib": "c", "calib_method": "entropy"}, "are for --int8"),
        ({"precision": "int8-qat", "calib": "c", "int8_scheme": "s8s8"}, "are for --int8"),
        ({"precision": "int8-qat", "calib": "c", "qat_lr": 0.0}, "positive learning rate"),
        ({"precision": "int8", "calib": "c", "qat_epochs": 2}, "only apply to --int8-qat"),
    ],
)
def test_onnx_int8_qat_bad_options(options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        OnnxOptions(**options)


@pytest.mark.slow
@needs_shared
def test_qat_fine_tuning_brings_real_u2netp_closer_to_float_than_its_ptq_start(tmp_path):
    """On the real U2NETP, the L1 fine-tuning lowers the error of the PTQ starting point (measured:
    mean abs 0.0031 → 0.0026 on these images, 0.0038 → 0.0032 on the held-out human images)."""
    images = sorted((TEST_DATA / "test_images").iterdir())
    artifact = convert_model(
        "u2netp",
        "onnx",
        tmp_path,
        weights=str(REAL_WEIGHTS),
        precision="int8-qat",
        calib=str(TEST_DATA / "test_images"),
        keep_fp_groups=("stage2d",),
        dynamic=True,
        parity_images=images,
        progress=False,
    )
    history = artifact.manifest["quantization"]["history"]
    assert history[-1]["l1"] < history[0]["l1"], history
    assert artifact.manifest["parity"]["iou50"] >= 0.98 and artifact.manifest["parity"]["mean_abs"] < 0.004
