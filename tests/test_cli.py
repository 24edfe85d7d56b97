"""The command line: real runs, and one clear line for every bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REAL_WEIGHTS, assert_one_line_error, needs_shared
from conftest import run_cli as run


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 21), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (25, 30, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    return folder


@needs_shared
def test_convert_real_u2netp_dynamic_and_run_batch_3_of_97x131(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "convert",
        "--model",
        "u2netp",
        "--weights",
        REAL_WEIGHTS,
        "--target",
        "onnx",
        "--dynamic",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    assert "wrote" in out and "parity vs torch on 4 image(s)" in out and "dynamic shape check [2, 1, 97, 131]" in out
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "u2netp_onnx_fp32_dynamic.onnx"), providers=["CPUExecutionProvider"])
    (mask,) = session.run(None, {"input": np.random.rand(3, 3, 97, 131).astype(np.float32)})
    assert mask.shape == (3, 1, 97, 131)
    assert (tmp_path / "u2netp_onnx_fp32_dynamic.u2zoo.json").is_file()


def test_predict_with_model_and_with_artifact_writes_masks_and_cutouts(capsys, tmp_path, tiny_weights, photos):
    code, out, err = run(
        capsys,
        "predict",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        photos,
        "--out",
        tmp_path / "torch",
        "--cutout",
    )
    assert code == 0, err
    mask = Image.open(tmp_path / "torch" / "a.png")
    assert mask.mode == "L" and mask.size == (60, 40)
    cut = Image.open(tmp_path / "torch" / "rgba_cutout.png")
    assert cut.mode == "RGBA" and cut.size == (30, 25)
    assert Image.open(tmp_path / "torch" / "gray.png").size == (21, 33)

    code, _, err = run(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        "--target",
        "onnx",
        "--out",
        tmp_path / "art",
    )
    assert code == 0, err
    code, out, err = run(
        capsys,
        "predict",
        "--artifact",
        tmp_path / "art" / "u2net-tiny_onnx_fp32.onnx",
        photos,
        "--out",
        tmp_path / "ort",
    )
    assert code == 0, err
    a = np.asarray(Image.open(tmp_path / "torch" / "a.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "ort" / "a.png"), np.int16)
    assert np.abs(a - b).max() <= 1  # same contract, same weights: equal up to PNG rounding


def test_predict_skips_unreadable_images_and_exits_non_zero(capsys, tmp_path, tiny_weights, photos):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "empty.png").write_bytes(b"")
    code, out, err = run(
        capsys, "predict", "--model", "u2net-tiny", "--weights", tiny_weights, photos, "--out", tmp_path / "o"
    )
    assert code == 1
    assert "3 file(s)" in out and "2 input(s) failed" in out
    assert "skipped" in err and "broken.jpg" in err and "empty" in err


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (
            ["convert", "--model", "u2netpp", "--target", "onnx", "--random-weights"],
            "unknown model 'u2netpp'; did you mean 'u2netp'",
        ),
        (
            ["convert", "--model", "u2net-tiny", "--target", "onx", "--random-weights"],
            "unknown target 'onx'; did you mean 'onnx'",
        ),
        (
            ["convert", "--model", "u2net-tiny", "--target", "onnx", "--weights", "/nonexistent.pth"],
            "weights file not found",
        ),
        (
            ["convert", "--model", "u2net-tiny", "--target", "onnx", "--random-weights", "--int8"],
            "--int8 needs calibration images",
        ),
        (
            ["convert", "--model", "u2net-tiny", "--target", "onnx", "--random-weights", "--fp16", "--int8"],
            "exclude each other",
        ),
        (
            [
                "convert",
                "--model",
                "u2net-tiny",
                "--target",
                "onnx",
                "--random-weights",
                "--int8",
                "--calib",
                "/nonexistent",
            ],
            "calibration folder not found",
        ),
        (
            ["convert", "--model", "u2net-tiny", "--target", "onnx", "--random-weights", "--opset", "13"],
            "opset 13 is too old",
        ),
        (
            ["convert", "--model", "u2net-tiny", "--target", "onnx", "--random-weights", "--exporter", "jit"],
            "unknown exporter",
        ),
        (["convert", "--model", "u2net-tiny", "--target", "onnx"], "no registered weights for 'u2net-tiny'"),
        (["fetch", "u2net-lite", "--from", "/some.pth"], "ships inside the package"),
        (["predict", "--artifact", "/nonexistent.onnx", "x.png"], "artifact not found"),
        (["predict", "--model", "u2net-tiny", "--random-weights", "/nonexistent-folder"], "input not found"),
        (["fetch", "u2netp", "--from", "/nonexistent.pth"], "weights file not found"),
        (["fetch", "u2netp.fp16_bnfolded", "--from", "/nonexistent.pth"], "ships inside the package"),
        (["fetch", "u2net_potrait"], "did you mean 'u2net_portrait'"),
    ],
)
def test_bad_input_gives_one_line_error(capsys, tmp_path, argv, pattern):
    if argv[0] in ("convert", "predict"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, pattern)


def test_corrupt_mismatching_and_unsafe_weights_via_cli(capsys, tmp_path, tiny_weights):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(tiny_weights.read_bytes()[:500])
    evil = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "f": print}, evil)
    cases = [
        (["--model", "u2net-tiny", "--weights", cut], "corrupt or truncated"),
        (["--model", "u2netp", "--weights", tiny_weights], "does not fit architecture 'u2netp'"),
        (["--model", "u2net-tiny", "--weights", evil], "refused: the checkpoint holds pickled code"),
        (["--model", "u2net-tiny", "--weights", tiny_weights, "--weights-sha256", "ab" * 32], "hash mismatch"),
    ]
    for extra, pattern in cases:
        code, _, err = run(capsys, "convert", "--target", "onnx", *extra, "--out", tmp_path / "o")
        assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a folder cannot be made under a file, even as root
    code, _, err = run(
        capsys, "convert", "--model", "u2net-tiny", "--random-weights", "--target", "onnx", "--out", blocker / "sub"
    )
    assert_one_line_error(code, err, "is not writable")


def test_models_lists_measured_params_and_macs(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "44,009,869" in out and "1,131,181" in out and "4,722,568" in out
    assert "58.60" in out and "19.76" in out  # GMACs at 320×320, counted by hooks
    assert "u2net_portrait" in out and "md5:e4f636406ca4" in out


def test_doctor_reports_targets_and_the_cache(capsys):
    code, out, _ = run(capsys, "doctor")
    assert code == 0 and "onnx" in out and "ok" in out and "weights cache" in out
    assert "u2zoo fetch u2net" in out  # the cache is empty in tests: say how to fill it
    assert "weights shipped in the package: u2netp.fp16_bnfolded, u2net-lite" in out
    assert "default: u2netp (" in out


def test_doctor_lists_the_serve_and_ray_features(capsys, monkeypatch):
    import u2zoo.artifact as artifact

    code, out, _ = run(capsys, "doctor")
    serve_line = next(line for line in out.splitlines() if "serve (ASGI, metrics)" in line)
    assert code == 0 and "ok [fastapi " in serve_line and "uvicorn " in serve_line and "prometheus-client" in serve_line
    assert "predict --engine ray" in out

    real = artifact.tool_versions

    def without_uvicorn(*names):
        return {name: (None if name == "uvicorn" else version) for name, version in real(*names).items()}

    monkeypatch.setattr(artifact, "tool_versions", without_uvicorn)
    code, out, _ = run(capsys, "doctor")
    assert "serve (ASGI, metrics)  unavailable: uvicorn missing; pip install 'u2zoo[serve]'" in out


def test_doctor_lists_the_publish_feature(capsys, monkeypatch):
    import u2zoo.artifact as artifact

    code, out, _ = run(capsys, "doctor")
    assert code == 0 and "publish --push hf://   ok [huggingface-hub " in out
    assert "masks (GrabCut)        ok [opencv-python-headless" in out and "--decontaminate        ok [pymatting" in out
    real = artifact.tool_versions
    monkeypatch.setattr(
        artifact,
        "tool_versions",
        lambda *names: {n: (None if n == "huggingface-hub" else v) for n, v in real(*names).items()},
    )
    code, out, _ = run(capsys, "doctor")
    assert "publish --push hf://   unavailable: huggingface-hub missing; pip install 'u2zoo[publish]'" in out


def test_demo_with_model_runs_the_shipped_lite_weights(capsys, tmp_path):
    """The default-model demo is in test_default_model.py; --model picks another shipped model."""
    code, out, err = run(capsys, "demo", "--model", "u2net-lite", "--out", tmp_path)
    assert code == 0, err
    assert not out.startswith("default:") and "weights: u2net-lite (shipped in the package)" in out
    assert "RANDOM" not in out and (tmp_path / "contact_sheet.png").is_file()
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert masks == [
        "astronaut.png",
        "astronaut_cutout.png",
        "chelsea.png",
        "chelsea_cutout.png",
        "coffee.png",
        "coffee_cutout.png",
        "rocket.png",
        "rocket_cutout.png",
    ]


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "u2zoo", "convert", "--model", "nope", "--target", "onnx", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("u2zoo: error: unknown model 'nope'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_time_reports_latency_of_model_and_artifact(capsys, tmp_path, tiny_weights):
    code, out, err = run(
        capsys,
        "time",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        "--threads",
        "1",
        "--runs",
        "3",
        "--warmup",
        "1",
    )
    assert code == 0, err
    assert "u2net-tiny (torch eager): batch 1 at 320×320, threads 1: p50" in out and "(3 runs after 1 warm-up)" in out
    code, out, err = run(capsys, "time", "--model", "u2net-tiny", "--random-weights", "--runs", "0")
    assert_one_line_error(code, err, "--runs must be at least 1")


def test_quiet_is_accepted_before_and_after_the_verb(capsys, tmp_path, tiny_weights, photos):
    from u2zoo.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-q", "doctor"]).quiet and parser.parse_args(["doctor", "-q"]).quiet
    assert parser.parse_args(["doctor", "--quiet"]).quiet and not parser.parse_args(["doctor"]).quiet
    code, _, err = run(
        capsys, "predict", "--model", "u2net-tiny", "--weights", tiny_weights, photos, "--out", tmp_path / "q", "-q"
    )
    assert code == 0 and err == "" and (tmp_path / "q" / "a.png").is_file()
