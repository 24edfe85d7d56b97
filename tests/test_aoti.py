"""AOTInductor target: a .pt2 package compiled for this CPU with the system C++ compiler, loaded
back with aoti_load_package; CUDA packages where a GPU is present."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from u2zoo.artifact import open_artifact
from u2zoo.conversion import convert_model
from u2zoo.converters import TARGETS
from u2zoo.errors import ConfigError, RuntimeLoadError
from u2zoo.gpu import cuda_unavailable_reason
from u2zoo.runtime.pipeline import run_batched

from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="AOTInductor CPU packages need a C++ compiler"
)
SIZE = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def cpu_package(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("aoti")
    return convert_model(
        "u2net-tiny", "aoti", out, weights=str(tiny_checkpoint), dynamic=True, max_batch=4, progress=False, **SIZE
    )


@pytest.mark.slow  # compiling even the tiny network with g++ takes 1.5–5 min on 2 cores
def test_cpu_package_matches_torch_and_records_how_it_was_built(cpu_package):
    manifest = cpu_package.manifest
    assert cpu_package.path.suffix == ".pt2" and manifest["target"] == "aoti"
    assert manifest["parity"]["status"] == "ok" and manifest["parity"]["max_abs"] <= 1e-4
    assert manifest["parity"]["odd_shape"]["max_abs"] <= 1e-4  # batch 2 at the package's 64×64
    tools = manifest["tools"]
    assert tools["device"] == "cpu" and tools["compiler"] and tools["cpu_capability"] and tools["torch"]
    assert manifest["aoti"]["max_batch"] == 4 and manifest["io"]["inputs"][0]["shape"] == ["batch", 3, 64, 64]


@pytest.mark.slow  # compiling even the tiny network with g++ takes 1.5–5 min on 2 cores
def test_runner_takes_batches_in_range_and_refuses_others(cpu_package):
    with TARGETS["aoti"].runner(open_artifact(cpu_package.path), threads=1) as runner:
        assert runner.predict(np.zeros((3, 3, 64, 64), np.float32)).shape == (3, 1, 64, 64)
        with pytest.raises(ConfigError, match="batch 5 is outside this package's range 1..4"):
            runner.predict(np.zeros((5, 3, 64, 64), np.float32))
        assert runner.max_batch == 4  # so the matrix splits larger image sets into batches of 4
        assert run_batched(runner, np.zeros((9, 3, 64, 64), np.float32)).shape == (9, 1, 64, 64)


@pytest.mark.slow  # compiling even the tiny network with g++ takes 1.5–5 min on 2 cores
def test_package_from_another_torch_is_refused(tmp_path, cpu_package):
    manifest = dict(cpu_package.manifest, tools=dict(cpu_package.manifest["tools"], torch="2.99.0"))
    shutil.copy(cpu_package.path, tmp_path / cpu_package.path.name)
    (tmp_path / cpu_package.manifest_path.name).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeLoadError, match="compiled with torch 2.99.0; this is torch"):
        with TARGETS["aoti"].runner(open_artifact(tmp_path / cpu_package.path.name)):
            pass


def test_fp16_on_cpu_and_unknown_devices_are_refused(capsys, tmp_path, tiny_weights):
    code, _, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        "--target",
        "aoti",
        "--fp16",
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, "aoti fp16 packages are for --device cuda")
    code, _, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        "--target",
        "aoti",
        "--device",
        "tpu",
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, "unknown device 'tpu'")


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="a GPU is present")
def test_cuda_package_without_a_gpu_says_why(capsys, tmp_path, tiny_weights):
    code, _, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        "--target",
        "aoti",
        "--device",
        "cuda",
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, "needs an NVIDIA GPU: no CUDA device visible")
    assert not any((tmp_path / "o").iterdir())


@pytest.mark.slow
@pytest.mark.skipif(cuda_unavailable_reason() is not None, reason=f"CUDA: {cuda_unavailable_reason()}")
def test_cuda_fp16_package_matches_torch(tmp_path, tiny_checkpoint):
    artifact = convert_model(
        "u2net-tiny",
        "aoti",
        tmp_path,
        weights=str(tiny_checkpoint),
        device="cuda",
        precision="fp16",
        dynamic=True,
        progress=False,
        **SIZE,
    )
    assert artifact.manifest["parity"]["status"] == "ok" and artifact.manifest["tools"]["compute_capability"]
