import json

import numpy as np
import pytest
import torch

from u2zoo.artifact import manifest_path_for, open_artifact
from u2zoo.conversion import convert_model
from u2zoo.converters import TARGETS, get_target
from u2zoo.errors import ArtifactError, BackendUnavailable, ConfigError, ParityError
from u2zoo.runtime.compare import Tolerance
from u2zoo.zoo.weights import load_model


def test_dynamic_artifact_runs_batch_3_of_97x131_like_torch(tiny_dynamic_onnx):
    artifact = open_artifact(tiny_dynamic_onnx.path)
    assert artifact.inputs[0].shape == ("batch", 3, "height", "width")
    x = np.random.default_rng(1).standard_normal((3, 3, 97, 131)).astype(np.float32)
    with get_target("onnx").runner(artifact, threads=1) as runner:
        out = runner.predict(x)
        assert runner.last_latency_s > 0
    assert out.shape == (3, 1, 97, 131) and np.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1


def test_round_trip_matches_torch_within_1e_4(tmp_path):
    torch.manual_seed(0)
    model, _, _ = load_model("u2net-tiny", random_weights=True)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    artifact = convert_model("u2net-tiny", "onnx", tmp_path / "out", weights=str(path), dynamic=True, progress=False)
    x = np.random.default_rng(2).standard_normal((3, 3, 97, 131)).astype(np.float32)
    with get_target("onnx").runner(artifact) as runner:
        out = runner.predict(x)
    with torch.no_grad():
        model.deploy = True
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(out - ref).max() <= 1e-4
    parity = artifact.manifest["parity"]
    assert parity["passed"] and parity["max_abs"] <= 1e-4 and parity["odd_shape"]["shape"] == [2, 1, 97, 131]


def test_manifest_records_what_the_artifact_is(tiny_dynamic_onnx):
    manifest = json.loads(manifest_path_for(tiny_dynamic_onnx.path).read_text())
    assert manifest["schema"] == "u2zoo.artifact" and manifest["schema_version"] == 1
    assert manifest["target"] == "onnx" and manifest["precision"] == "fp32"
    (entry,) = manifest["files"]
    assert entry["name"] == "u2net-tiny_onnx_fp32_dynamic.onnx" and len(entry["sha256"]) == 64
    assert entry["size"] == tiny_dynamic_onnx.path.stat().st_size
    assert manifest["weights"] == {"name": None, "source": "random", "sha256": None, "arch": "u2net-tiny"}
    assert manifest["contract"]["pre"]["size"] == [320, 320] and manifest["contract"]["pre"]["mean"][0] == 0.485
    assert manifest["io"]["inputs"] == [{"name": "input", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}]
    assert manifest["io"]["outputs"][0]["name"] == "mask"
    assert manifest["tools"]["opset"] == 17 and manifest["tools"]["torch"].startswith("2.13")
    assert manifest["host"]["cores"] >= 1 and manifest["options"]["dynamic"] is True
    assert manifest["parity"]["passed"] is True and manifest["parity"]["images"][0] == "astronaut.png"


def test_runner_refuses_a_modified_artifact(tmp_path, tiny_dynamic_onnx):
    import shutil

    copy = tmp_path / tiny_dynamic_onnx.path.name
    shutil.copy(tiny_dynamic_onnx.path, copy)
    shutil.copy(manifest_path_for(tiny_dynamic_onnx.path), manifest_path_for(copy))
    artifact = open_artifact(copy)
    with copy.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        with get_target("onnx").runner(artifact):
            pass
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        open_artifact(copy)
    manifest_path_for(copy).unlink()
    with pytest.raises(ArtifactError, match="no manifest"):
        open_artifact(copy)


def test_static_fp16_artifact(tmp_path):
    artifact = convert_model(
        "u2net-tiny",
        "onnx",
        tmp_path,
        random_weights=True,
        precision="fp16",
        height=64,
        width=96,
        batch=2,
        progress=False,
    )
    assert artifact.path.name == "u2net-tiny_onnx_fp16.onnx"
    assert artifact.inputs[0].shape == (2, 3, 64, 96) and artifact.inputs[0].dtype == "float32"
    assert artifact.manifest["parity"]["mean_abs"] <= 5e-3
    import onnx

    weights = [t for t in onnx.load(str(artifact.path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert weights, "fp16 artifact must store float16 weights"


def test_unsupported_options_are_refused_not_dropped(tmp_path):
    with pytest.raises(ConfigError, match=r"precision 'int4' \(supported: fp32, fp16, int8, int8-qat\)"):
        convert_model("u2net-tiny", "onnx", tmp_path, random_weights=True, precision="int4")
    with pytest.raises(ConfigError, match="--int8 needs calibration images"):
        convert_model("u2net-tiny", "onnx", tmp_path, random_weights=True, precision="int8")
    with pytest.raises(ConfigError, match="calib only apply to --int8"):
        convert_model("u2net-tiny", "onnx", tmp_path, random_weights=True, calib=str(tmp_path))
    with pytest.raises(ConfigError, match="opset 16 is too old"):
        convert_model("u2net-tiny", "onnx", tmp_path, random_weights=True, opset=16)
    with pytest.raises(ConfigError, match="does not support option"):
        convert_model("u2net-tiny", "onnx", tmp_path, random_weights=True, palettize=4)
    with pytest.raises(ConfigError, match="did you mean 'onnx'"):
        convert_model("u2net-tiny", "onnxx", tmp_path, random_weights=True)
    assert list(tmp_path.iterdir()) == []


def test_missing_backend_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"needs onnxruntime \(install it with: pip install 'u2zoo\[onnx\]'\)"):
        convert_model("u2net-tiny", "onnx", tmp_path, random_weights=True)
    assert "not installed" in TARGETS["onnx"].unavailable_reason()


def test_parity_failure_rejects_the_artifact_and_leaves_nothing(tmp_path):
    with pytest.raises(ParityError, match="rejected.*max abs"):
        convert_model(
            "u2net-tiny",
            "onnx",
            tmp_path,
            random_weights=True,
            progress=False,
            tolerance=Tolerance(max_abs=0.0, iou50_min=1.01),
        )
    assert list(tmp_path.iterdir()) == []


def test_every_target_has_a_converter_a_runner_and_typed_options():
    import dataclasses
    import tomllib
    from pathlib import Path

    from u2zoo.converters.base import Runner

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert "onnx" in TARGETS
    for name, spec in TARGETS.items():
        assert spec.name == name and callable(spec.convert) and issubclass(spec.runner, Runner)
        assert dataclasses.is_dataclass(spec.options_type) and spec.precisions
        # the extra a missing backend points to exists; "" = core dependencies (torch) only
        assert spec.extra in extras if spec.extra else set(spec.requires) <= {"torch"}
        assert spec.devices and set(spec.devices) <= {"cpu", "cuda"}
        assert spec.source == "torch" or (spec.source == "onnx" and spec.onnx_options and spec.handoff)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["u2net", "u2net-lite"])
def test_full_and_lite_round_trip_with_random_weights(tmp_path, arch):
    """No U2NET-size weights exist here: random weights (seeded) prove the export itself."""
    torch.manual_seed(0)
    artifact = convert_model(
        arch, "onnx", tmp_path, random_weights=True, dynamic=True, progress=False, tolerance=Tolerance(max_abs=1e-4)
    )
    parity = artifact.manifest["parity"]
    assert parity["passed"] and parity["max_abs"] <= 1e-4 and parity["odd_shape"]["max_abs"] <= 1e-4
