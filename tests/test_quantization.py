"""INT8: the shared calibration source, ONNX Runtime QDQ, sensitivity ranking, bad inputs."""

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from u2zoo.conversion import convert_model
from u2zoo.errors import ConfigError
from u2zoo.quantization.calibration import calibration_set, load_npz
from u2zoo.quantization.onnx_int8 import layer_groups
from u2zoo.runtime.compare import Tolerance
from u2zoo.zoo.contract import SALIENCY

from conftest import REAL_WEIGHTS, TEST_DATA, assert_one_line_error, needs_shared, run_cli


@pytest.fixture
def calib_dir(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(folder / f"c{i}.png")
    return folder


def test_calibration_set_digest_dump_and_adapters(calib_dir, tmp_path, capsys):
    calib = calibration_set(calib_dir, SALIENCY, size=3, shape=(64, 64))
    # 3 of the folder's 4: a sample drawn with the fixed seed, sorted, and recorded
    import random

    expected = tuple(sorted(random.Random(0).sample(sorted(p.name for p in calib_dir.iterdir()), 3)))
    assert calib.inputs.shape == (3, 3, 64, 64) and calib.files == expected
    assert calib.describe()["sampled"] == {"seed": 0, "from_images": 4}
    assert "sampled" not in calibration_set(calib_dir, SALIENCY, shape=(64, 64), warn=False).describe()  # all 4
    assert "3 calibration image(s); 32+ are recommended" in capsys.readouterr().err
    again = calibration_set(calib_dir, SALIENCY, size=3, shape=(64, 64), warn=False)
    assert again.digest == calib.digest and len(calib.digest) == 64
    dumped = load_npz(calib.save(tmp_path / "c.npz"))
    assert dumped.digest == calib.digest and dumped.files == calib.files
    reader = calib.ort_reader("input")
    batches = [b for b in iter(reader.get_next, None)]
    assert len(batches) == 3 and batches[0]["input"].shape == (1, 3, 64, 64)
    reader.rewind()
    assert reader.get_next()["input"].shape == (1, 3, 64, 64)


def test_calibration_bad_inputs(calib_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        calibration_set(empty, SALIENCY)
    assert len(calibration_set(calib_dir, SALIENCY, size=9, warn=False).inputs) == 4  # what there is
    (calib_dir / "zz_broken.png").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="calibration image unusable.*zz_broken"):
        calibration_set(calib_dir, SALIENCY)
    (calib_dir / "zz_broken.png").unlink()
    dump = calibration_set(calib_dir, SALIENCY, size=2, warn=False).save(tmp_path / "d.npz")
    data = dict(np.load(dump))
    data["inputs"] = data["inputs"] + 1
    np.savez(tmp_path / "tampered.npz", **data)
    with pytest.raises(ConfigError, match="does not match its digest"):
        load_npz(tmp_path / "tampered.npz")


def test_a_dump_is_read_once_per_process_while_unchanged(calib_dir, tmp_path, monkeypatch):
    """Every INT8 step of a bench cell replays the dump: it is decompressed and checked once."""
    from u2zoo.quantization import calibration

    dump = calibration_set(calib_dir, SALIENCY, size=2, shape=(32, 32), warn=False).save(tmp_path / "d.npz")
    reads = []
    real_load = np.load
    monkeypatch.setattr(calibration.np, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    first = calibration_set(dump, SALIENCY)
    assert calibration_set(dump, SALIENCY) is first and reads == []  # the set that was saved, as replayed
    assert first.source == str(dump) and "sampled" not in first.describe()
    data = dict(real_load(dump))
    np.savez(dump, **(data | {"inputs": data["inputs"] * 0.5}))  # the file changes: read again, and refused
    with pytest.raises(ConfigError, match="does not match its digest"):
        calibration_set(dump, SALIENCY)
    assert reads == [dump]


def test_onnx_int8_qdq_artifact_records_calibration_and_kept_groups(calib_dir, tmp_path):
    artifact = convert_model(
        "u2net-tiny",
        "onnx",
        tmp_path,
        random_weights=True,
        precision="int8",
        dynamic=True,
        calib=str(calib_dir),
        keep_fp_groups=("outconv",),
        progress=False,
        tolerance=Tolerance(mean_abs=0.05),
    )
    model = onnx.load(str(artifact.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    outconv = next(n for n in model.graph.node if n.name == "/outconv/Conv")
    assert not any("DequantizeLinear" in i for i in outconv.input[1:2])  # its weight stayed float
    manifest = json.loads(artifact.manifest_path.read_text())
    assert manifest["precision"] == "int8" and manifest["calibration"]["num_images"] == 4
    assert manifest["calibration"]["sha256"] == calibration_set(calib_dir, SALIENCY, warn=False).digest
    assert manifest["quantization"]["kept_in_float"] == ["outconv"]
    assert manifest["quantization"]["format"] == "QDQ" and "AVX2" in manifest["quantization"]["why"]
    assert manifest["quantization"]["scheme"] == "u8s8-reduce-range"
    assert manifest["parent"]["precision"] == "fp32" and len(manifest["parent"]["sha256"]) == 64


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_s8s8_scheme_and_sub_path_groups(calib_dir, tmp_path):
    artifact = convert_model(
        "u2net-tiny",
        "onnx",
        tmp_path,
        random_weights=True,
        precision="int8",
        calib=str(calib_dir),
        int8_scheme="s8s8",
        keep_fp_groups=("stage2d/rebnconv1d", "stage2d/Add"),
        progress=False,
        tolerance=Tolerance(mean_abs=0.05),
    )
    model = onnx.load(str(artifact.path))
    kept = [n for n in model.graph.node if n.name.startswith("/stage2d/rebnconv1d/")]
    assert kept and all(n.op_type != "QuantizeLinear" for n in kept)
    zero_points = [t for t in model.graph.initializer if t.name.endswith("zero_point")]
    kinds = {t.data_type for t in zero_points}  # int8 activations/weights, int32 biases; never uint8
    assert onnx.TensorProto.INT8 in kinds and onnx.TensorProto.UINT8 not in kinds
    assert artifact.manifest["quantization"]["scheme"] == "s8s8"
    with pytest.raises(ConfigError, match="unknown int8 scheme"):
        convert_model(
            "u2net-tiny",
            "onnx",
            tmp_path / "x",
            random_weights=True,
            precision="int8",
            calib=str(calib_dir),
            int8_scheme="u4",
        )


def test_layer_groups_follow_module_paths(tiny_dynamic_onnx):
    groups = layer_groups(onnx.load(str(tiny_dynamic_onnx.path)))
    assert {f"stage{i}" for i in range(1, 7)} | {"stage1d", "outconv", "side1", "top-level"} <= set(groups)
    assert all(name.startswith("/stage1/") for name in groups["stage1"])


def test_unknown_group_to_keep(calib_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown layer group 'stage9'"):
        convert_model(
            "u2net-tiny",
            "onnx",
            tmp_path,
            random_weights=True,
            precision="int8",
            calib=str(calib_dir),
            keep_fp_groups=("stage9",),
            progress=False,
        )


@pytest.mark.slow
@needs_shared
def test_sensitivity_ranks_stage2d_first_and_keeping_it_reaches_the_target(capsys, tmp_path):
    images = TEST_DATA / "test_images"
    code, out, err = run_cli(
        capsys, "sensitivity", "--model", "u2netp", "--weights", REAL_WEIGHTS, "--calib", images, "--eval-images", "3"
    )
    assert code == 0, err
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert lines[0][1] == "stage2d" and len(lines) == 24  # 11 stages, 6 sides, outconv, 5 pools, top-level
    artifact = convert_model(
        "u2netp",
        "onnx",
        tmp_path,
        weights=str(REAL_WEIGHTS),
        precision="int8",
        calib=str(images),
        keep_fp_groups=("stage2d",),
        progress=False,
        parity_images=sorted(images.iterdir()),
    )
    parity = artifact.manifest["parity"]
    assert parity["iou50"] >= 0.98 and parity["mean_abs"] <= 0.01, parity


def test_int8_bad_input_via_cli(capsys, tmp_path, calib_dir):
    code, _, err = run_cli(
        capsys, "sensitivity", "--model", "u2net-tiny", "--random-weights", "--calib", tmp_path / "nope"
    )
    assert_one_line_error(code, err, "calibration folder not found")
    for flags, message in (
        (["--fp-budget", "0"], r"--fp-budget must be in \(0, 1\]"),
        (["--fp-budget", "1.5"], r"--fp-budget must be in \(0, 1\]"),
        (["--no-auto-fp", "--fp-budget", "0.3"], "which --no-auto-fp turns off: give one"),
        (["--keep-fp-groups", "stage2dd"], "unknown layer group 'stage2dd'; did you mean 'stage2d'"),
    ):
        code, _, err = run_cli(
            capsys,
            "convert",
            "--model",
            "u2net-tiny",
            "--random-weights",
            "--target",
            "onnx",
            "--int8",
            "--calib",
            calib_dir,
            *flags,
            "--out",
            tmp_path / "o",
        )
        assert_one_line_error(code, err, message)
    code, _, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--random-weights",
        "--target",
        "onnx",
        "--fp16",
        "--fp-budget",
        "0.3",
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, "--no-auto-fp and --fp-budget only apply to --int8")
    assert not any((tmp_path / "o").glob("*.onnx"))
