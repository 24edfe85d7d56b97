"""Calibration reused across the float fallback's attempts gives exactly what a fresh one gives.

The fallback quantizes one model several times with different layer groups in float. Each
backend keeps what its calibration measured (ExecuTorch observer states, NNCF statistic
points, ai-edge-quantizer ranges) and reuses it; these tests hold the reused result equal,
bit for bit, to a fresh calibration with the same groups in float, on the tiny network.
"""

import numpy as np
import pytest
import torch

from u2zoo.converters.base import ModelSource
from u2zoo.quantization.calibration import calibration_set
from u2zoo.zoo.weights import load_model

SIZE = (64, 64)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    from u2zoo.zoo.archs import build_arch

    torch.manual_seed(3)
    model = build_arch("u2net-tiny")
    for module in model.modules():  # live ReLUs, so every group has real ranges
        if isinstance(module, torch.nn.BatchNorm2d):
            module.bias.data.fill_(0.1)
    path = tmp_path_factory.mktemp("reuse") / "tiny.pth"
    torch.save(model.state_dict(), path)
    model, info, contract = load_model("u2net-tiny", weights=str(path), deploy=True, progress=False)
    return ModelSource(model, info, contract, info.arch, 0)


@pytest.fixture(scope="module")
def calib(tiny_source, calib_dir):
    return calibration_set(calib_dir, tiny_source.contract, 4, SIZE)


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_executorch_reused_observers_equal_a_fresh_calibration(tiny_source, calib):
    pytest.importorskip("executorch")
    pytest.importorskip("torchao")
    from u2zoo.converters import executorch as et

    options = et.ExecuTorchOptions(precision="int8", calib=calib.source, calib_size=4)
    example = (torch.zeros(1, 3, *SIZE),)
    x = torch.from_numpy(calib.inputs[:2].copy())

    def quantize(kept):
        module, record, _ = et._quantize(tiny_source.model, example, tiny_source, options, kept, SIZE)
        with torch.no_grad():
            return torch.cat([module(x[i : i + 1]) for i in range(2)]), record["ranges"]

    et._OBSERVER_STATES.clear()
    _, first = quantize([])
    assert first.startswith("measured: ")
    for kept in (["stage2d"], ["stage2d", "top-level"]):
        reused, how = quantize(kept)
        assert "reused" in how, how
        et._OBSERVER_STATES.clear()
        fresh, how_fresh = quantize(kept)
        assert how_fresh.startswith("measured: ")
        assert torch.equal(reused, fresh), kept
        quantize([])  # back to the state the next step expects: the all-INT8 ranges known


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_nncf_reused_statistics_equal_nncf_quantize(tiny_source, calib, tmp_path, bias_correction):
    nncf = pytest.importorskip("nncf")
    ov = pytest.importorskip("openvino")
    from u2zoo.converters.onnx import OnnxOptions, export_onnx
    from u2zoo.quantization import nncf_reuse
    from u2zoo.quantization.onnx_int8 import group_pattern

    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(tiny_source.model, onnx_path, OnnxOptions(batch=1, height=SIZE[0], width=SIZE[1]), *SIZE)
    core = ov.Core()

    def outputs(model):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.concatenate([compiled(calib.inputs[i : i + 1])[0] for i in range(2)])

    key = ("tiny", calib.digest, 4, bias_correction)
    nncf_reuse._COLLECTED.pop(key, None)
    hows = []
    for kept in ([], ["stage2d"], ["stage2d", "outconv"]):
        ignored = nncf.IgnoredScope(patterns=[group_pattern(g) for g in kept], validate=False)
        mine, how = nncf_reuse.quantize(
            ov.convert_model(str(onnx_path)), calib.nncf_dataset(), 4, ignored, key, bias_correction
        )
        theirs = nncf.quantize(
            ov.convert_model(str(onnx_path)),
            calib.nncf_dataset(),
            subset_size=4,
            ignored_scope=ignored,
            advanced_parameters=nncf_reuse.advanced_parameters(bias_correction),
        )
        np.testing.assert_array_equal(outputs(mine), outputs(theirs))
        hows.append(how)
    assert hows[0].startswith("measured: ")
    assert all("reused" in how for how in hows[1:]), hows


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_tflite_reused_ranges_equal_a_fresh_calibration(tiny_source, calib, tmp_path):
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_quantizer")
    from u2zoo.converters import tflite

    fp32 = tflite.export_fp32(tiny_source.model, 1, SIZE, False)

    def quantize(groups, name):
        options = tflite.TFLiteOptions(precision="int8", calib=calib.source, calib_size=4, keep_fp_groups=groups)
        out = tmp_path / f"{name}.tflite"
        record, _ = tflite.quantize_tflite(fp32, out, tiny_source, options, SIZE, calib)
        return out.read_bytes(), record["ranges"]

    tflite._CALIBRATIONS.clear()
    assert quantize((), "all")[1] == "measured"
    reused, how = quantize(("stage2d",), "reused")
    assert how.startswith("reused")
    tflite._CALIBRATIONS.clear()
    fresh, how = quantize(("stage2d",), "fresh")
    assert how == "measured" and reused == fresh


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_nncf_statistics_of_the_likely_next_scope_ride_along(tiny_source, calib, tmp_path):
    """A group's element-wise joins in float collect, in the same pass, the points the whole
    group in float will need: that next call collects nothing and equals nncf.quantize."""
    nncf = pytest.importorskip("nncf")
    ov = pytest.importorskip("openvino")
    from u2zoo.converters.onnx import OnnxOptions, export_onnx
    from u2zoo.converters.openvino import _likely_next
    from u2zoo.quantization import nncf_reuse
    from u2zoo.quantization.auto_fp import RankedGroup
    from u2zoo.quantization.onnx_int8 import group_pattern

    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(tiny_source.model, onnx_path, OnnxOptions(batch=1, height=SIZE[0], width=SIZE[1]), *SIZE)
    key = ("tiny-ride-along", calib.digest, 4)
    nncf_reuse._COLLECTED.pop(key, None)

    def scope(kept):
        return nncf.IgnoredScope(patterns=[group_pattern(g) for g in kept], validate=False)

    nncf_reuse.quantize(ov.convert_model(str(onnx_path)), calib.nncf_dataset(), 4, scope([]), key)
    joins = ["stage2d/Add", "stage2d/Concat", "stage2d/Resize"]
    assert _likely_next(joins) == [["stage2d"]]
    assert _likely_next(["stage2d/rebnconv1d"]) == [] and _likely_next([]) == []
    assert _likely_next([], [RankedGroup("stage2d", 0.1, 0.5, tuple(joins))]) == [joins, ["stage2d"]]
    _, how = nncf_reuse.quantize(
        ov.convert_model(str(onnx_path)), calib.nncf_dataset(), 4, scope(joins), key, also_for=(scope(["stage2d"]),)
    )
    assert how.startswith("measured "), how  # the joins' own new points: one pass
    mine, how = nncf_reuse.quantize(ov.convert_model(str(onnx_path)), calib.nncf_dataset(), 4, scope(["stage2d"]), key)
    assert how.startswith("reused: all"), how
    theirs = nncf.quantize(
        ov.convert_model(str(onnx_path)),
        calib.nncf_dataset(),
        subset_size=4,
        ignored_scope=scope(["stage2d"]),
        advanced_parameters=nncf_reuse.advanced_parameters(False),
    )
    core = ov.Core()
    outputs = [
        np.concatenate(
            [
                core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(calib.inputs[i : i + 1])[0]
                for i in range(2)
            ]
        )
        for m in (mine, theirs)
    ]
    np.testing.assert_array_equal(*outputs)


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_tflite_profiler_ranges_equal_the_default_modes(tiny_source, calib):
    """The profiler-based calibration u2zoo uses measures the default mode's min/max."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_quantizer")
    from ai_edge_quantizer import quantizer, recipe

    from u2zoo.converters import tflite

    fp32 = tflite.export_fp32(tiny_source.model, 1, SIZE, False)
    tflite._CALIBRATIONS.clear()
    mine, _ = tflite._calibration_result(fp32, calib, False)
    q = quantizer.Quantizer(str(fp32))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    signature, input_name = tflite._signature(fp32)
    default = q.calibrate(calib.litert_data(signature, input_name), num_threads=1)
    assert set(default) <= set(mine)
    for name, qsv in default.items():
        for k in ("min", "max"):
            np.testing.assert_allclose(np.ravel(mine[name][k]), np.ravel(qsv[k]), rtol=1e-5, atol=1e-6, err_msg=name)
