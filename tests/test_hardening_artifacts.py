"""Issue 16 (hardening): an artifact whose manifest, contract or files do not describe what
would run is refused at load with one line, never run into a traceback or wrong masks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2zoo.artifact import entry_digest, open_artifact
from u2zoo.errors import ArtifactError, ConfigError
from u2zoo.safe_paths import confined
from u2zoo.zoo.contract import MAX_SIDE, Contract, Preprocess

from conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def tiny_static_onnx(tmp_path_factory):
    """A static 1×3×320×320 ONNX artifact of the tiny architecture (random weights)."""
    import torch

    from u2zoo.conversion import convert_model

    torch.manual_seed(0)
    return convert_model(
        "u2net-tiny", "onnx", tmp_path_factory.mktemp("tiny_static"), random_weights=True, progress=False
    )


def copy_artifact(artifact, folder: Path) -> Path:
    """A private copy (files and manifest) to tamper with; returns the copy's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in artifact.manifest["files"]:
        shutil.copy(artifact.path.parent / entry["name"], folder)
    shutil.copy(artifact.manifest_path, folder)
    return folder / artifact.path.name


def manifest_file(path: Path) -> Path:
    return path.with_name(path.name.split(".")[0] + ".u2zoo.json")


def edit_manifest(path: Path, change) -> None:
    """Apply ``change`` to the manifest dict in place; None: write a JSON list instead."""
    manifest = json.loads(manifest_file(path).read_text())
    if change is None:
        manifest = [1, 2, 3]
    else:
        change(manifest)
    manifest_file(path).write_text(json.dumps(manifest))


def rehash(path: Path) -> None:
    """Make the manifest's first file entry match the file as it now is (a consistent forgery)."""

    def change(manifest):
        manifest["files"][0].update(sha256=entry_digest(path), size=path.stat().st_size)

    edit_manifest(path, change)


def predict(capsys, artifact: Path, tmp_path: Path):
    image = tmp_path / "photo.jpg"
    if not image.exists():
        pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image)
    return run_cli(capsys, "predict", "--artifact", artifact, image, "--out", tmp_path / "out")


def fake_model(path: Path, shape, dtype: str = "float32", name: str = "input") -> None:
    """Replace the artifact's ONNX by a tiny graph with the given input, and rehash it."""
    import onnx
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8}[dtype]
    nodes = [
        helper.make_node("Cast", [name], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], keepdims=1),
        helper.make_node("Sigmoid", ["m"], ["mask"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fake",
        [helper.make_tensor_value_info(name, elem, shape)],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    rehash(path)


# --- 3: external data ----------------------------------------------------------------------------


def test_external_data_must_be_listed_in_the_manifest_and_is_then_verified(tmp_path, capsys, tiny_dynamic_onnx):
    import onnx

    path = copy_artifact(tiny_dynamic_onnx, tmp_path / "a")
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location="weights.bin")
    rehash(path)
    data = path.parent / "weights.bin"
    original = data.read_bytes()
    data.write_bytes(bytes(b ^ 0x55 for b in original[:4096]) + original[4096:])
    code, _, err = predict(capsys, path, tmp_path)
    assert_one_line_error(code, err, r"external data 'weights\.bin'.*not list")

    # listed with its hash, external data is an ordinary artifact file: verified, then run
    data.write_bytes(original)
    edit_manifest(
        path,
        lambda m: m["files"].append({"name": "weights.bin", "sha256": entry_digest(data), "size": data.stat().st_size}),
    )
    code, _, err = predict(capsys, path, tmp_path)
    assert code == 0, err
    data.write_bytes(bytes(b ^ 0x55 for b in original[:4096]) + original[4096:])
    code, _, err = predict(capsys, path, tmp_path)
    assert_one_line_error(code, err, r"weights\.bin: sha256 .* does not match its manifest")


# --- 4: the model's real I/O against the manifest ------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, name, pattern",
    [
        (
            [1, 3, 64, 64],
            "float32",
            "input",
            r"input 'input' float32 \[1, 3, 64, 64\].*manifest says .*\[1, 3, 320, 320\]",
        ),
        ([3, 320, 320], "float32", "input", r"input 'input' float32 \[3, 320, 320\]"),
        ([1, 3, 320, 320], "uint8", "input", r"input 'input' uint8 \[1, 3, 320, 320\].*manifest says 'input' float32"),
        ([1, 320, 320, 3], "float32", "input", r"input 'input' float32 \[1, 320, 320, 3\]"),
        ([1, 3, 320, 320], "float32", "image", r"input 'image' float32.*manifest says 'input'"),
    ],
    ids=["320-is-64", "rank-3", "uint8", "nhwc", "renamed"],
)
def test_real_io_that_differs_from_the_manifest_is_refused_at_load(
    tmp_path, capsys, tiny_static_onnx, shape, dtype, name, pattern
):
    path = copy_artifact(tiny_static_onnx, tmp_path / "a")
    fake_model(path, shape, dtype, name)
    code, _, err = predict(capsys, path, tmp_path)
    assert_one_line_error(code, err, pattern)


def test_a_dynamic_manifest_over_a_static_model_is_refused(tmp_path, capsys, tiny_dynamic_onnx):
    path = copy_artifact(tiny_dynamic_onnx, tmp_path / "a")
    fake_model(path, [1, 3, 320, 320])
    code, _, err = predict(capsys, path, tmp_path)
    assert_one_line_error(code, err, r"\[1, 3, 320, 320\].*manifest says .*\['batch', 3, 'height', 'width'\]")


# --- 5: manifest structure -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, pattern",
    [
        (None, r"malformed manifest: a list, not a JSON object"),
        (lambda m: m.pop("files"), r"malformed manifest: 'files' is missing"),
        (lambda m: m.update(files=[]), r"malformed manifest: 'files' is empty"),
        (lambda m: m["files"][0].pop("sha256"), r"malformed manifest: 'files\[0\]\.sha256' is missing"),
        (lambda m: m.pop("contract"), r"malformed manifest: 'contract' is missing"),
        (lambda m: m["io"].update(inputs=[]), r"malformed manifest: 'io\.inputs' is empty"),
        (lambda m: m["io"]["outputs"][0].update(shape="1x1"), r"'io\.outputs\[0\]\.shape' must be a list"),
        (lambda m: m.update(model=None), r"'model' must be an object"),
    ],
    ids=["list", "no-files", "empty-files", "no-sha256", "no-contract", "no-inputs", "bad-shape", "bad-model"],
)
def test_a_malformed_manifest_is_refused_naming_the_field(tmp_path, capsys, tiny_dynamic_onnx, change, pattern):
    path = copy_artifact(tiny_dynamic_onnx, tmp_path / "a")
    edit_manifest(path, change)
    with pytest.raises(ArtifactError, match=pattern):
        open_artifact(path)
    code, _, err = predict(capsys, path, tmp_path)
    assert_one_line_error(code, err, pattern)


def test_only_the_manifests_own_file_is_opened(tmp_path, tiny_dynamic_onnx):
    """x.onnx and x.other.onnx share x.u2zoo.json: the unlisted one must not ride on its hashes."""
    path = copy_artifact(tiny_dynamic_onnx, tmp_path / "a")
    other = path.with_name(path.name.split(".")[0] + ".other.onnx")
    shutil.copy(path, other)
    with pytest.raises(ArtifactError, match=r"is not the file this manifest describes"):
        open_artifact(other)


# --- 6 and 7: contract values --------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("size", [-320, -320], r"contract size must be"),
        ("size", [0, 0], r"contract size must be"),
        ("size", "320", r"contract size must be .* got '320'"),
        ("size", [100000, 100000], rf"from 1 to {MAX_SIDE}"),
        ("size", [320.5, 320], r"contract size must be"),
        ("mean", [float("nan"), 0.456, 0.406], r"contract mean must be 3 finite numbers"),
        ("std", [0.229, float("nan"), 0.225], r"contract std must be 3 finite numbers"),
        ("std", [0.229, 0.0, 0.225], r"contract std must be 3 finite numbers above 0"),
        ("mean", [0.5], r"contract mean must be 3 finite numbers .* got \[0\.5\]"),
    ],
    ids=["negative", "zero", "string", "huge", "float", "mean-nan", "std-nan", "std-zero", "mean-len1"],
)
@pytest.mark.parametrize("which", ["dynamic", "static"])
def test_contract_values_are_range_checked_for_every_artifact(
    tmp_path, capsys, tiny_dynamic_onnx, tiny_static_onnx, key, value, pattern, which
):
    path = copy_artifact(tiny_dynamic_onnx if which == "dynamic" else tiny_static_onnx, tmp_path / "a")
    edit_manifest(path, lambda m: m["contract"]["pre"].update({key: value}))
    code, _, err = predict(capsys, path, tmp_path)
    assert_one_line_error(code, err, pattern)


def test_contract_checks_apply_wherever_a_contract_is_made():
    with pytest.raises(ConfigError, match="contract std"):
        Preprocess(std=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="contract size"):
        Preprocess(size=(MAX_SIDE + 1, 320))
    with pytest.raises(ConfigError, match="contract mean"):
        Contract.from_dict(Contract().to_dict() | {"pre": Contract().to_dict()["pre"] | {"mean": [0, 0]}})
    assert Preprocess(size=(np.int64(64), 96), mean=(0, 0, 0), std=(1, 1, 1)).size == (64, 96)


# --- 8: file names confined to the artifact's folder ---------------------------------------------


def test_manifest_file_names_cannot_leave_the_artifact_folder(tmp_path, capsys, tiny_dynamic_onnx):
    path = copy_artifact(tiny_dynamic_onnx, tmp_path / "a")
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the artifact\n")
    escapes = ["../outside.txt", str(outside), "link.txt"]
    (path.parent / "link.txt").symlink_to(outside)
    for name in escapes:
        edit_manifest(
            path,
            lambda m: m["files"].append(
                {"name": name, "sha256": entry_digest(outside), "size": outside.stat().st_size}
            ),
        )
        with pytest.raises(ArtifactError, match="is not inside"):
            open_artifact(path)
        code, _, err = predict(capsys, path, tmp_path)
        assert_one_line_error(code, err, rf"{re.escape(repr(name))} is not inside")
        edit_manifest(path, lambda m: m["files"].pop())
    open_artifact(path)  # restored: fine


def test_confined_allows_names_inside_and_refuses_the_rest(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.bin").write_bytes(b"x")
    (tmp_path / "in_link").symlink_to(tmp_path / "sub" / "inner.bin")
    assert confined(tmp_path, "sub/inner.bin") == tmp_path / "sub" / "inner.bin"
    assert confined(tmp_path, "in_link") == tmp_path / "in_link"
    for bad in ("../x", "sub/../../x", "/etc/hostname", "", ".", "sub/.."):
        with pytest.raises(ArtifactError):
            confined(tmp_path, bad)
    with pytest.raises(ConfigError, match="is not inside"):
        confined(tmp_path, "../x", ConfigError)


def test_a_static_artifact_records_its_input_size_and_a_disagreeing_contract_is_refused(tmp_path, capsys):
    """#6: a static input fixes the size the network sees, so the manifest's contract must say it."""
    from u2zoo.conversion import convert_model

    artifact = convert_model(
        "u2net-tiny", "onnx", tmp_path / "art", random_weights=True, height=64, width=96, progress=False
    )
    assert list(artifact.manifest["contract"]["pre"]["size"]) == [64, 96]
    assert list(artifact.manifest["io"]["inputs"][0]["shape"]) == [1, 3, 64, 96]
    path = copy_artifact(artifact, tmp_path / "a")
    edit_manifest(path, lambda m: m["contract"]["pre"].update(size=[320, 320]))
    code, _, err = predict(capsys, path, tmp_path)
    assert_one_line_error(code, err, r"contract size \[320, 320\] disagrees with the model's fixed input \[64, 96\]")
