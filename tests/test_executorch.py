"""ExecuTorch target: .pte round trips in ExecuTorch's runtime (XNNPACK), PT2E INT8, threads, bad inputs.

Lowering to XNNPACK costs the same ~1–2 min for the tiny network as for U2NETP (the graph
has the same ~500 ops), so the default tests share one fp32 and one int8 conversion.
"""

import json

import numpy as np
import pytest

pytest.importorskip("executorch")
pytest.importorskip("torchao")

import torch

from u2zoo.conversion import convert_model
from u2zoo.converters import get_target
from u2zoo.errors import BackendUnavailable, ConfigError, U2ZooError
from u2zoo.runtime.compare import Tolerance
from u2zoo.zoo.weights import load_model

from conftest import REAL_WEIGHTS, TEST_DATA, assert_one_line_error, needs_shared, run_cli


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """Four generated photos-like images (smooth gradients plus noise) of different sizes."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("et_calib")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(90, 120), (120, 90), (100, 100), (64, 160)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1) * 3) % 256, (yy * 2 + 40 * i) % 256, (xx + yy) % 256], axis=-1)
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i}.png")
    return folder


def _convert(tmp_path_factory, name: str, weights, **options):
    # module-scoped fixtures run outside the per-test cache isolation: isolate here too
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("U2ZOO_HOME", str(tmp_path_factory.mktemp(f"{name}_home")))
        return convert_model(
            "u2net-tiny", "executorch", tmp_path_factory.mktemp(name), weights=str(weights), progress=False, **options
        )


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory, tiny_checkpoint):
    return _convert(tmp_path_factory, "et_fp32", tiny_checkpoint, tolerance=Tolerance(max_abs=1e-4))


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory, tiny_checkpoint, calib_dir):
    # random tiny weights: the maps hover around 0.5, so hold the mean error, not IoU@0.5
    return _convert(
        tmp_path_factory,
        "et_int8",
        tiny_checkpoint,
        precision="int8",
        calib=str(calib_dir),
        calib_size=3,
        keep_fp_groups=("outconv", "stage2d/rebnconv1d"),
        height=96,
        width=96,
        tolerance=Tolerance(mean_abs=0.05),
    )


def _torch_reference(weights, x: np.ndarray) -> np.ndarray:
    model, _, _ = load_model("u2net-tiny", weights=str(weights))
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_fp32_round_trip_matches_torch(tiny_fp32, tiny_checkpoint):
    artifact = tiny_fp32
    assert [f["name"] for f in artifact.manifest["files"]] == ["u2net-tiny_executorch_fp32.pte"]
    assert (artifact.inputs[0].name, artifact.inputs[0].shape) == ("image", (1, 3, 320, 320))
    assert (artifact.outputs[0].name, artifact.outputs[0].shape) == ("mask", (1, 1, 320, 320))
    manifest = json.loads(artifact.manifest_path.read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs"] <= 1e-4
    assert manifest["tools"]["executorch"] and manifest["tools"]["torchao"]
    # the whole graph went to XNNPACK: nothing left for the portable kernels
    assert manifest["lowering"]["delegate_calls"] >= 1 and manifest["lowering"]["ops_outside_delegates"] == {}
    x = np.random.default_rng(5).standard_normal((1, 3, 320, 320)).astype(np.float32)
    with get_target("executorch").runner(artifact) as runner:
        out = runner.predict(x)
        assert runner.last_latency_s > 0
        with pytest.raises(ConfigError, match="built for input shape"):
            runner.predict(x[:, :, :96])
    assert out.shape == (1, 1, 320, 320)
    assert np.abs(out - _torch_reference(tiny_checkpoint, x)).max() <= 1e-4


def test_runner_sets_the_thread_count(tiny_fp32):
    from executorch.extension.pybindings import portable_lib

    spec = get_target("executorch")
    x = np.zeros((1, 3, 320, 320), np.float32)
    with spec.runner(tiny_fp32, threads=1) as runner:
        assert runner.thread_count == 1 and portable_lib._threadpool_get_thread_count() == 1
        single = runner.predict(x)
        # the pool is process-wide: resizing it under a loaded program is refused, not done
        with pytest.raises(U2ZooError, match="thread pool is shared"), spec.runner(tiny_fp32, threads=2):
            pass
        with spec.runner(tiny_fp32, threads=1) as same:  # same size: fine
            assert np.array_equal(same.predict(x), single)
    with spec.runner(tiny_fp32, threads=2) as runner:
        assert runner.thread_count == 2
        np.testing.assert_allclose(runner.predict(x), single, atol=1e-5)
    with spec.runner(tiny_fp32) as runner:  # None: back to the runtime's default
        assert runner.thread_count >= 1
    with pytest.raises(ConfigError, match="at least 1"), spec.runner(tiny_fp32, threads=0):
        pass


@pytest.mark.slow  # the INT8 lowering alone takes minutes on 2 cores
def test_int8_round_trip_records_calibration_and_float_groups(tiny_int8, calib_dir):
    artifact = tiny_int8
    manifest = json.loads(artifact.manifest_path.read_text())
    assert manifest["precision"] == "int8" and artifact.path.name == "u2net-tiny_executorch_int8.pte"
    assert artifact.inputs[0].shape == (1, 3, 96, 96)
    quant = manifest["quantization"]
    assert quant["tool"].startswith("torchao pt2e") and "per-channel" in quant["scheme"]
    assert quant["kept_in_float"] == ["outconv", "stage2d/rebnconv1d"]
    assert quant["float_convs"] == 2 and quant["quantized_convs"] > 100  # exactly those two convs stayed float
    assert manifest["options"]["keep_fp_groups"] == ["outconv", "stage2d/rebnconv1d"]
    calib = manifest["calibration"]
    assert calib["num_images"] == 3 and calib["source"] == str(calib_dir) and len(calib["sha256"]) == 64
    assert calib["shape"] == [3, 3, 96, 96]  # preprocessed by the contract at the program's size
    assert manifest["parity"]["passed"] and manifest["parity"]["mean_abs"] <= 0.05
    assert manifest["lowering"]["ops_outside_delegates"] == {}


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--dynamic"], r"executorch builds fixed-shape programs here"),
        (["--int8"], r"--int8 needs calibration images"),
        (
            ["--int8", "--calib", "{calib}", "--keep-fp-groups", "stage2d,stage9x"],
            r"unknown layer group\(s\) 'stage9x'; did you mean 'stage6'\? \(groups: stage1, .*top-level",
        ),
        (["--fp16"], r"target 'executorch' does not support precision 'fp16' \(supported: fp32, int8\)"),
        (["--calib", "{calib}"], r"calib only apply to --int8"),
    ],
)
def test_executorch_bad_inputs_via_cli(tmp_path, capsys, calib_dir, args, pattern):
    out = tmp_path / "out"
    args = [a.replace("{calib}", str(calib_dir)) for a in args]
    code, _, err = run_cli(
        capsys, "convert", "--model", "u2net-tiny", "--random-weights", "--target", "executorch", *args, "--out", out
    )
    assert_one_line_error(code, err, pattern)
    assert not out.exists() or not any(out.iterdir())  # nothing left behind, not even staging


def test_executorch_missing_backend(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"pip install 'u2zoo\[executorch\]'"):
        convert_model("u2net-tiny", "executorch", tmp_path, random_weights=True)
    assert "torchao not installed" in get_target("executorch").unavailable_reason()


@pytest.mark.slow
@needs_shared
def test_real_u2netp_fp32_and_int8_keeping_stage2d(tmp_path):
    images = sorted((TEST_DATA / "test_images").iterdir())
    # XNNPACK's fp32 summation order: 8.4e-5 on an AVX2 EPYC, 1.4e-4 on an AVX-512 Xeon (the
    # default gate's 2e-4; TFLite's XNNPACK gives the same figure, see default_gates.yaml)
    fp32 = convert_model(
        "u2netp",
        "executorch",
        tmp_path / "fp32",
        weights=str(REAL_WEIGHTS),
        progress=False,
        parity_images=images,
        tolerance=Tolerance(max_abs=2e-4),
    )
    assert fp32.manifest["parity"]["max_abs"] <= 2e-4, fp32.manifest["parity"]
    int8 = convert_model(
        "u2netp",
        "executorch",
        tmp_path / "int8",
        weights=str(REAL_WEIGHTS),
        precision="int8",
        calib=str(TEST_DATA / "test_human_images"),
        keep_fp_groups=("stage2d",),
        progress=False,
        parity_images=images,
        tolerance=Tolerance(iou50_min=0.98),
    )
    parity = int8.manifest["parity"]
    assert parity["iou50"] >= 0.98, parity
    assert int8.manifest["quantization"]["kept_in_float"] == ["stage2d"]


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_screen_stand_in_matches_the_program_and_convert_takes_its_module(tmp_path, tiny_checkpoint, calib_dir):
    """The float fallback's stand-in (the quantized graph in torch, before lowering) gives the
    XNNPACK program's outputs up to int8 rounding, and converting the same candidate next
    reuses its module instead of quantizing again."""
    from u2zoo.converters import executorch as et
    from u2zoo.converters.base import ModelSource

    model, info, contract = load_model("u2net-tiny", weights=str(tiny_checkpoint), deploy=True, progress=False)
    source = ModelSource(model, info, contract, info.arch, 0)
    options = et.ExecuTorchOptions(
        precision="int8", calib=str(calib_dir), calib_size=3, height=96, width=96, keep_fp_groups=("outconv",)
    )
    stand_in = et.screen(source, options)
    assert et._SCREENED[model][0] == et._screen_key(options, ["outconv"], (96, 96))
    artifact = et.convert(source, options, tmp_path, "tiny")
    assert model not in et._SCREENED  # taken by convert
    x = np.random.default_rng(0).uniform(-2, 2, (1, 3, 96, 96)).astype(np.float32)
    with et.ExecuTorchRunner(artifact) as runner:
        program = runner.predict(x)
    assert float(np.abs(program - stand_in.predict(x)).max()) < 0.02
