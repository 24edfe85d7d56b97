"""NCNN target: pnnx → .param/.bin, run by the ncnn Python binding (real conversions, real runtime)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from u2zoo.artifact import open_artifact
from u2zoo.conversion import convert_model
from u2zoo.converters import get_target
from u2zoo.errors import ArtifactError, BackendUnavailable, ConfigError

from conftest import REAL_WEIGHTS, TEST_DATA, assert_one_line_error, needs_shared, run_cli

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pnnx") is None or importlib.util.find_spec("ncnn") is None,
    reason="pnnx/ncnn not installed (pip install 'u2zoo[ncnn]')",
)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ncnn_fp32")
    return convert_model("u2net-tiny", "ncnn", out, random_weights=True, height=64, width=64, progress=False)


def test_fp32_round_trip_files_io_and_parity(tiny_fp32):
    artifact = tiny_fp32
    manifest = json.loads(artifact.manifest_path.read_text())
    names = [entry["name"] for entry in manifest["files"]]
    assert names == ["u2net-tiny_ncnn_fp32.param", "u2net-tiny_ncnn_fp32.bin"]
    assert artifact.path.name == names[0]
    for entry in manifest["files"]:
        assert len(entry["sha256"]) == 64 and entry["size"] == (artifact.path.parent / entry["name"]).stat().st_size
    # only the pair and the manifest: pnnx's trace, PNNX graph, ONNX and scripts stayed in its temp folder
    assert sorted(p.name for p in artifact.path.parent.iterdir()) == sorted(names + ["u2net-tiny_ncnn_fp32.u2zoo.json"])
    assert manifest["io"]["inputs"] == [{"name": "in0", "shape": [1, 3, 64, 64], "dtype": "float32"}]
    assert manifest["io"]["outputs"] == [{"name": "out0", "shape": [1, 1, 64, 64], "dtype": "float32"}]
    assert manifest["contract"]["pre"]["size"] == [64, 64]
    assert manifest["tools"]["pnnx"] and manifest["tools"]["ncnn"]
    parity = manifest["parity"]
    assert parity["status"] == "ok" and parity["max_abs"] <= 1e-5 and parity["num_images"] == 4

    reopened = open_artifact(artifact.path)
    spec = get_target("ncnn")
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with spec.runner(reopened, threads=1) as runner:
        assert (runner.fixed_batch, runner.fixed_size) == (1, (64, 64))
        out = runner.predict(x)
        assert out.shape == (1, 1, 64, 64) and out.dtype == np.float32
        assert np.isfinite(out).all() and runner.last_latency_s > 0
        assert np.array_equal(runner.predict(x), out)  # deterministic, input not overwritten
        with pytest.raises(ConfigError, match=r"takes input \(1, 3, 64, 64\), got \(1, 3, 96, 96\)"):
            runner.predict(np.zeros((1, 3, 96, 96), np.float32))
    with pytest.raises(ConfigError, match="at least 1"), spec.runner(reopened, threads=0):
        pass


def test_fp16_stores_half_size_weights_and_passes_its_gate(tmp_path, tiny_fp32):
    import torch

    torch.manual_seed(0)
    fp16 = convert_model(
        "u2net-tiny", "ncnn", tmp_path, random_weights=True, precision="fp16", height=64, width=64, progress=False
    )
    manifest = fp16.manifest
    assert [e["name"] for e in manifest["files"]] == ["u2net-tiny_ncnn_fp16.param", "u2net-tiny_ncnn_fp16.bin"]
    assert manifest["precision"] == "fp16" and manifest["parity"]["status"] == "ok"
    assert manifest["parity"]["mean_abs"] <= 5e-3
    bins = [a.manifest["files"][1]["size"] for a in (fp16, tiny_fp32)]
    assert bins[0] < 0.55 * bins[1]  # fp16 weights


def test_dynamic_runs_any_size_and_batch(tmp_path):
    """pnnx's second trace shape turns every upsample_like into a size-from-blob Interp:
    convert proves it at 320×320 and on batch 2 of 97×131."""
    import torch

    torch.manual_seed(0)
    artifact = convert_model("u2net-tiny", "ncnn", tmp_path, random_weights=True, dynamic=True, progress=False)
    manifest = artifact.manifest
    assert artifact.path.name == "u2net-tiny_ncnn_fp32_dynamic.param"
    assert manifest["io"]["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert manifest["parity"]["status"] == "ok" and manifest["parity"]["odd_shape"]["max_abs"] <= 1e-5
    with get_target("ncnn").runner(artifact, threads=1) as runner:
        assert runner.fixed_batch is None and runner.fixed_size is None
        x = np.random.default_rng(1).standard_normal((3, 3, 40, 56)).astype(np.float32)
        out = runner.predict(x)
        assert out.shape == (3, 1, 40, 56)
        assert np.array_equal(runner.predict(x[1:2]), out[1:2])  # a batch is run image by image


def test_corrupt_bin_is_refused_by_its_sha256_before_ncnn_sees_it(tmp_path, tiny_fp32):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_fp32.path.parent, folder)
    bin_ = folder / "u2net-tiny_ncnn_fp32.bin"
    data = bytearray(bin_.read_bytes())
    data[100:108] = bytes(b ^ 0xFF for b in data[100:108])
    bin_.write_bytes(bytes(data))
    param = folder / "u2net-tiny_ncnn_fp32.param"
    with pytest.raises(ArtifactError, match=r"u2net-tiny_ncnn_fp32\.bin: sha256 .* does not match its manifest"):
        open_artifact(param)
    unverified = open_artifact(param, verify=False)
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        get_target("ncnn").runner(unverified).__enter__()


def test_a_manifest_naming_other_blobs_is_refused_at_load(tmp_path, tiny_fp32):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_fp32.path.parent, folder)
    artifact = open_artifact(folder / tiny_fp32.path.name)
    artifact.manifest["io"]["inputs"][0]["name"] = "image"
    with pytest.raises(ArtifactError, match=r"the model has input 'in0' .*its manifest says 'image'"):
        get_target("ncnn").runner(artifact).__enter__()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (
            ["--int8"],
            r"target 'ncnn' does not support precision 'int8' \(NCNN quantizes with its ncnn2table and ncnn2int8",
        ),
        (["--batch", "2"], r"ncnn graphs have no batch axis .* --batch must be 1"),
        (["--dynamic-int8"], r"target 'ncnn' does not support precision 'dynamic-int8' \(supported: fp32, fp16\)"),
    ],
)
def test_bad_inputs_via_cli(tmp_path, capsys, args, pattern):
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "convert", "--model", "u2net-tiny", "--random-weights", "--target", "ncnn", *args, "--out", out
    )
    assert_one_line_error(code, err, pattern)
    assert not out.exists() or not any(out.iterdir())


def test_int8_reason_is_in_the_capability_table():
    spec = get_target("ncnn")
    assert spec.precisions == ("fp32", "fp16") and spec.dynamic_shapes
    assert "ncnn2int8" in spec.precision_unsupported_reason("int8")


def test_missing_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pnnx" else real(name, *a))
    spec = get_target("ncnn")
    assert spec.missing_modules() == ["pnnx"]
    assert "pnnx not installed (pip install 'u2zoo[ncnn]')" in spec.unavailable_reason()
    with pytest.raises(BackendUnavailable, match=r"needs pnnx .*pip install 'u2zoo\[ncnn\]'"):
        convert_model("u2net-tiny", "ncnn", tmp_path, random_weights=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
@needs_shared
def test_real_u2netp_fp32_on_the_official_images(tmp_path):
    """U2NETP, 6 of the 18 official images: 8.0e-5 max abs on all 18 on an AMD EPYC (AVX-512);
    the fp32 gate for converted-from-torch CPU targets is 2e-4."""
    images = sorted((TEST_DATA / "test_images").iterdir())[:6]
    artifact = convert_model(
        "u2netp", "ncnn", tmp_path, weights=str(REAL_WEIGHTS), parity_images=images, progress=False
    )
    parity = artifact.manifest["parity"]
    assert parity["status"] == "ok" and parity["num_images"] == 6
    assert parity["max_abs"] <= 2e-4 and parity["iou50"] >= 0.999
    assert artifact.manifest["io"]["inputs"][0]["shape"] == [1, 3, 320, 320]
