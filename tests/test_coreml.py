"""CoreML target: .mlpackage round trips validated from the saved spec, torch-side compression
error, folder-artifact hashing, bad inputs, and the bench cell on a host without Core ML."""

import json
import platform
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from u2zoo.artifact import entry_digest, open_artifact
from u2zoo.conversion import convert_model
from u2zoo.converters import get_target
from u2zoo.converters.coreml import CoreMLOptions, tensor_to_image
from u2zoo.converters.coreml_options import DEPLOYMENT_TARGETS
from u2zoo.errors import ArtifactError, BackendUnavailable, ConfigError
from u2zoo.quantization.coreml_compression import WEIGHT_THRESHOLD, plan_compression
from u2zoo.zoo.contract import SALIENCY, preprocess

from conftest import REAL_WEIGHTS, TEST_DATA, assert_one_line_error, needs_shared, run_cli

ct = pytest.importorskip("coremltools")

ON_MAC = platform.system() == "Darwin"
SIZE = 64  # a small input keeps each conversion fast; the graph (and so the op counts) is the same


@pytest.fixture(scope="module")
def fp16_artifact(tmp_path_factory, tiny_checkpoint):
    """One fp16 package, converted once for the tests that only read it."""
    out = tmp_path_factory.mktemp("coreml_fp16")
    return convert_model(
        "u2net-tiny",
        "coreml",
        out,
        weights=str(tiny_checkpoint),
        precision="fp16",
        height=SIZE,
        width=SIZE,
        progress=False,
    )


def read_spec(path):
    return ct.utils.load_spec(str(path))


def test_deployment_target_table_is_coremltools_own():
    assert {name: int(value) for name, value in ct.target.__members__.items()} == DEPLOYMENT_TARGETS


def test_option_rules_without_converting():
    assert CoreMLOptions(deployment_target="ios17").deployment_target == "iOS17"  # canonical spelling
    with pytest.raises(ConfigError, match=r"deployment target iOS14 is too old: .* needs iOS15 or later"):
        CoreMLOptions(deployment_target="iOS14")
    with pytest.raises(ConfigError, match="target macOS10_15 is too old: .* needs macOS12 or later"):
        CoreMLOptions(deployment_target="macOS 10.15")
    with pytest.raises(ConfigError, match="int8 weights needs iOS16 or later"):
        CoreMLOptions(precision="int8-weights", deployment_target="iOS15")
    with pytest.raises(ConfigError, match="3-bit palettization needs macOS15 or later"):
        CoreMLOptions(palettize=3, deployment_target="macOS13")
    CoreMLOptions(palettize=3, deployment_target="iOS18")
    with pytest.raises(ConfigError, match=r"unknown deployment target 'iOS 61'.*choose from: iOS13, "):
        CoreMLOptions(deployment_target="iOS 61")
    with pytest.raises(ConfigError, match="not on top of --int8-weights"):
        CoreMLOptions(precision="int8-weights", palettize=4)
    with pytest.raises(ConfigError, match="batch 1"):
        CoreMLOptions(batch=2)
    with pytest.raises(ConfigError, match="precision 'int8'"):
        CoreMLOptions(precision="int8")


def test_fp16_package_is_validated_from_its_saved_spec(fp16_artifact):
    artifact = fp16_artifact
    assert artifact.path.name == "u2net-tiny_coreml_fp16.mlpackage" and artifact.path.is_dir()
    manifest = json.loads(artifact.manifest_path.read_text())
    if ON_MAC:
        assert manifest["parity"]["status"] == "ok"
    else:
        assert manifest["parity"] == {"status": "not_run", "reason": "coreml runtime needs macOS, this host is Linux"}
    entry = manifest["files"][0]
    assert entry["sha256"] == entry_digest(artifact.path) and entry["size"] > 0
    assert manifest["io"]["inputs"] == [{"name": "image", "shape": [1, 3, SIZE, SIZE], "dtype": "float32"}]
    assert manifest["io"]["outputs"] == [{"name": "mask", "shape": [1, 1, SIZE, SIZE], "dtype": "float32"}]
    validation = manifest["validation"]
    assert validation["outputs"] == [
        {"name": "mask", "type": "tensor", "shape": [1, 1, SIZE, SIZE], "dtype": "float32"}
    ]
    assert validation["inputs"] == [
        {"name": "image", "type": "tensor", "shape": [1, 3, SIZE, SIZE], "dtype": "float32"}
    ]
    ops = validation["op_counts"]
    assert ops["conv"] > 50 and ops["sigmoid"] == 1 and ops["upsample_bilinear"] > 0 and "batch_norm" not in ops
    assert {"u2zoo.contract", "u2zoo.input", "u2zoo.preprocess.mean", "u2zoo.weights_sha256"} <= set(
        validation["metadata_keys"]
    )
    assert set(validation["summary"]) >= {"package", "input", "output", "ops", "metadata", "compression (torch side)"}
    error = validation["compression_error"]
    assert error["method"] == "fp16 weights" and error["num_images"] == 4 and error["max_abs"] < 1e-3
    assert manifest["tools"]["coremltools"] and manifest["options"]["deployment_target"] == "iOS16"
    # read the package back independently of the converter
    spec = read_spec(artifact.path)
    assert [o.name for o in spec.description.output] == ["mask"]
    meta = dict(spec.description.metadata.userDefined)
    assert json.loads(meta["u2zoo.contract"]) == json.loads(json.dumps(artifact.contract.to_dict()))
    assert meta["u2zoo.input"] == "tensor" and meta["u2zoo.weights_sha256"] == manifest["weights"]["sha256"]
    assert json.loads(meta["u2zoo.preprocess.std"]) == list(SALIENCY.pre.std)
    assert (
        spec.description.metadata.author.startswith("u2zoo")
        and spec.description.metadata.license == "unknown: weights not in the u2zoo registry"
    )


def test_a_modified_package_is_refused(fp16_artifact, tmp_path):
    package = tmp_path / fp16_artifact.path.name
    shutil.copytree(fp16_artifact.path, package)
    shutil.copy(fp16_artifact.manifest_path, tmp_path)
    artifact = open_artifact(package)  # intact copy: fine
    weights = next(p for p in package.rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="modified or corrupt"):
        open_artifact(package)
    with pytest.raises(ArtifactError):  # a runner verifies before it loads anything
        get_target("coreml").runner(artifact).__enter__()
    shutil.copytree(fp16_artifact.path, package, dirs_exist_ok=True)  # restored …
    open_artifact(package)
    (package / "Data" / "extra.txt").write_text("x")  # … but a file added inside also shows
    with pytest.raises(ArtifactError, match="modified or corrupt"):
        open_artifact(package)


@pytest.mark.skipif(ON_MAC, reason="on macOS the package runs")
def test_predicting_on_linux_is_a_one_line_error(capsys, fp16_artifact, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    code, _, err = run_cli(capsys, "predict", "--artifact", fp16_artifact.path, image, "--out", tmp_path / "masks")
    assert_one_line_error(code, err, r"cannot run u2net-tiny_coreml_fp16.mlpackage: coreml runtime needs macOS")


@pytest.mark.parametrize(
    "flags, name, compressed_op",
    [
        (["--int8-weights"], "u2net-tiny_coreml_int8-weights", "constexpr_affine_dequantize"),
        (["--fp16", "--palettize", "4"], "u2net-tiny_coreml_fp16_pal4", "constexpr_lut_to_dense"),
        (["--image-input", "--deployment-target", "macos12"], "u2net-tiny_coreml_fp32_image", None),  # fp32
    ],
)
def test_cli_round_trip(capsys, tmp_path, tiny_checkpoint, flags, name, compressed_op):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_checkpoint,
        "--target",
        "coreml",
        "--height",
        SIZE,
        "--width",
        SIZE,
        "--out",
        out,
        *flags,
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.mlpackage", f"{name}.u2zoo.json"]
    assert "validated: output: mask: float32 (1, 1, 64, 64), the only output" in stdout
    if not ON_MAC:
        assert "parity vs torch: NOT RUN — coreml runtime needs macOS" in stdout
    artifact = open_artifact(out / f"{name}.mlpackage")
    validation = artifact.manifest["validation"]
    spec = read_spec(artifact.path)
    meta = dict(spec.description.metadata.userDefined)
    if compressed_op:
        assert validation["op_counts"][compressed_op] >= 30
        assert artifact.manifest["quantization"]["weight_threshold"] == WEIGHT_THRESHOLD
        error = validation["compression_error"]
        assert error["iou50"] > 0.9 and 0 < error["mean_abs"] < 0.05
        assert "compression (torch side)" in validation["summary"]
    else:
        assert validation["compression_error"]["method"] == "none"
        assert not any(op.startswith("constexpr_") for op in validation["op_counts"])
    if "--image-input" in flags:
        image = spec.description.input[0].type.imageType
        assert (image.width, image.height) == (SIZE, SIZE) and validation["inputs"][0]["color"] == "RGB"
        assert meta["u2zoo.input"] == "image" and float(meta["u2zoo.preprocess.scale"]) == pytest.approx(1 / 255)
        assert "divides by 255" in meta["u2zoo.preprocess.note"] and artifact.inputs[0].dtype == "uint8"
        assert validation["op_counts"]["sub"] >= 1  # (x - mean) / std in front of the network
    else:
        assert meta["u2zoo.input"] == "tensor" and validation["inputs"][0]["dtype"] == "float32"
    if "macos12" in flags:
        assert spec.specificationVersion == DEPLOYMENT_TARGETS["macOS12"] == 6
        assert artifact.manifest["options"]["deployment_target"] == "macOS12"


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--deployment-target", "iOS14"], r"deployment target iOS14 is too old: .* needs iOS15 or later"),
        (["--deployment-target", "macOS10_15"], r"deployment target macOS10_15 is too old: .* needs macOS12"),
        (["--int8-weights", "--deployment-target", "macOS12"], r"int8 weights needs macOS13 or later"),
        (["--deployment-target", "android14"], r"unknown deployment target 'android14'"),
        (["--int8"], r"target 'coreml' does not support precision 'int8' \(supported: fp32, fp16, int8-weights\)"),
        (["--palettize", "5"], r"--palettize 5: Core ML palettizes to 1, 2, 3, 4, 6, 8 bits"),
        (["--int8-weights", "--palettize", "4"], r"not on top of --int8-weights"),
        (["--dynamic"], r"coreml builds fixed-shape models here; build one per size with --height/--width"),
        (["--nhwc"], r"target 'coreml' does not support option\(s\) nhwc"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_leave_nothing(capsys, tmp_path, flags, pattern):
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "convert", "--model", "u2net-tiny", "--random-weights", "--target", "coreml", "--out", out, *flags
    )
    assert_one_line_error(code, err, pattern)
    assert not out.exists()  # refused before anything is written


def test_palettize_without_scikit_learn_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"scikit-learn .*pip install 'u2zoo\[coreml\]'"):
        convert_model("u2net-tiny", "coreml", tmp_path, random_weights=True, palettize=4, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # two extra conversions (~1.5 min on 2 cores)
def test_torch_side_compression_mirrors_coremltools_weights(tiny_checkpoint):
    """The simulated weights are the ones coremltools stores (compared with the decompressed
    constants of converted programs: int8, fp16 palettes), and a tensor the plan keeps in
    float stays an uncompressed const."""
    from u2zoo.converters import coreml
    from u2zoo.zoo.weights import load_model

    model, _, contract = load_model("u2net-tiny", weights=str(tiny_checkpoint))
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # a BN worth folding
        torch.nn.init.uniform_(bn.weight, -2, 2)
        torch.nn.init.uniform_(bn.running_var, 0.5, 2)
    ct_, cto = coreml._import_coremltools()
    shape = (1, 3, 32, 32)
    exported = coreml._export(coreml._wrap(model, contract, False), shape)
    inputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for options in (CoreMLOptions(precision="int8-weights"), CoreMLOptions(precision="fp16", palettize=2)):
        plan = plan_compression(model, options, inputs)
        assert len(plan.compressed) > 30
        plan.kept = [next(iter(plan.compressed))]  # as if the search had kept the first one
        program = coreml._convert(ct_, cto, exported, options, shape, plan)._mil_program
        ops = list(program.functions["main"].operations)
        stored = [
            np.asarray(
                op.outputs[0].val if op.outputs[0].val is not None else op.materialized_val_inference(), np.float32
            )
            for op in ops
            if op.op_type.startswith("constexpr_")
        ]
        assert len(stored) == len(plan.compressed) - 1
        simulated = [w.astype(np.float32) for n, w in plan.compressed.items() if n not in plan.kept]
        for value in stored:
            assert min(np.abs(s - value).max() for s in simulated if s.shape == value.shape) == 0.0
        kept = plan.stored[plan.kept[0]]
        consts = [op.outputs[0].val for op in ops if op.op_type == "const"]
        assert any(isinstance(v, np.ndarray) and v.shape == kept.shape and np.array_equal(v, kept) for v in consts)


def test_compression_search_keeps_the_most_harmful_tensors_in_float(tiny_checkpoint, monkeypatch):
    from u2zoo.quantization import coreml_compression as coreml
    from u2zoo.zoo.weights import load_model

    model, _, _ = load_model("u2net-tiny", weights=str(tiny_checkpoint))
    inputs = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    plan = plan_compression(model, CoreMLOptions(precision="int8-weights"), inputs)
    assert plan.parity.iou50 >= 0.98 and plan.kept == [] and plan.sensitivity == {}  # no search needed
    victim = "stage1d.rebnconvin.conv_s1"
    plan.compressed = {name: plan.stored[name] for name in plan.compressed}  # every compression exact …
    plan.compressed[victim] = plan.stored[victim] * 50  # … but one that ruins its tensor
    monkeypatch.setattr(coreml, "COMPRESSION_TARGET_IOU", 2.0)  # unreachable: the search runs to the end
    coreml.keep_harmful(plan, model, inputs, coreml._outputs(model, inputs))
    groups = plan.sensitivity["groups"]
    fp16_only = {e for g, e in groups.items() if g != "stage1d"}  # the same model in every other group
    assert len(fp16_only) == 1 and groups["stage1d"] > 10 * max(fp16_only.pop(), 1e-5)
    assert plan.kept[0] == victim and len(plan.kept) == coreml.MAX_KEPT
    assert plan.parity.max_abs < 1e-3  # with the victim kept, only the fp16 rounding is left
    assert plan.weights()[victim] is plan.stored[victim]


def test_image_input_runner_feed_inverts_the_contract():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 30, 3)).astype(np.uint8)
    photo[0, 0] = 255  # max 255: the contract's divide-by-max equals the model's divide-by-255
    tensor = preprocess(photo.astype(np.float32) / 255.0, SALIENCY.pre, (40, 30))
    image = tensor_to_image(tensor, SALIENCY)
    assert image.mode == "RGB" and image.size == (30, 40)
    assert np.abs(np.asarray(image).astype(int) - photo.astype(int)).max() <= 1


def test_bench_cell_is_unavailable_with_the_built_package(capsys, tmp_path, tiny_checkpoint):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
    code, stdout, err = run_cli(
        capsys,
        "bench",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_checkpoint,
        "--data",
        data,
        "--out",
        tmp_path / "b",
        "--targets",
        "coreml",
        "--precisions",
        "fp16",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--batches",
        "1",
        "--threads",
        "1",
    )
    assert code == 0, err
    [row] = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert (row["target"], row["precision"]) == ("coreml", "fp16")
    assert row["artifact"]["size_bytes"] > 0 and len(row["artifact"]["sha256"]) == 64
    if ON_MAC:
        assert row["status"] == "ok"
    else:
        assert row["status"] == "unavailable" and "macOS" in row["reason"] and row["speed"] is None
        assert any(note.startswith("output: mask") for note in row["notes"])
        assert "1 cell(s) unavailable" in stdout


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML predicts only on macOS")
@pytest.mark.parametrize(
    "options", [{"precision": "fp32"}, {"precision": "fp16"}, {"precision": "fp32", "image_input": True}]
)
def test_runner_parity_on_macos(tmp_path, tiny_checkpoint, options):
    from u2zoo.runtime.compare import Tolerance
    from u2zoo.zoo.weights import load_model

    # image input rounds the RGB values to 8 bit: compared with a looser bound than fp32
    tolerance = Tolerance(mean_abs=5e-3) if options.get("image_input") or options["precision"] == "fp16" else None
    artifact = convert_model(
        "u2net-tiny", "coreml", tmp_path, weights=str(tiny_checkpoint), progress=False, tolerance=tolerance, **options
    )
    assert artifact.manifest["parity"]["status"] == "ok" and artifact.manifest["parity"]["passed"]
    x = np.random.default_rng(3).standard_normal((2, 3, 320, 320)).astype(np.float32) * 0.5
    with get_target("coreml").runner(artifact) as runner:
        out = runner.predict(x)
        assert runner.last_latency_s > 0
    model, _, _ = load_model("u2net-tiny", weights=str(tiny_checkpoint))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert out.shape == (2, 1, 320, 320)
    assert np.abs(out - ref).mean() <= (1e-4 if options == {"precision": "fp32"} else 1e-2)


@pytest.mark.slow
@needs_shared
def test_real_u2netp_sizes_and_torch_side_int8_error(tmp_path):
    sizes, errors = {}, {}
    for precision in ("fp16", "int8-weights"):
        artifact = convert_model(
            "u2netp",
            "coreml",
            tmp_path / precision,
            weights=str(REAL_WEIGHTS),
            precision=precision,
            progress=False,
            parity_images=sorted((TEST_DATA / "test_images").iterdir()),
        )
        sizes[precision] = sum(f["size"] for f in artifact.manifest["files"])
        errors[precision] = artifact.manifest["validation"]["compression_error"]
    assert sizes["fp16"] <= 2.6e6 and sizes["int8-weights"] <= 1.6e6, sizes
    assert errors["int8-weights"]["iou50"] >= 0.98, errors
    assert errors["fp16"]["iou50"] >= 0.99, errors
