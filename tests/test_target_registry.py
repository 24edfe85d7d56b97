"""A target is one module: the registry feeds convert's flags, artifact stems, tolerances,
bench cells and doctor, so a toy target registered from ``tests/plugins/toy_target.py`` shows
up everywhere with no other file changed."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2zoo.converters import TARGETS
from u2zoo.converters.options import BenchCell, bench_options, cli_fields, flag_of, judged_precision, stem_suffix
from u2zoo.runtime.precisions import PRECISIONS

from conftest import run_cli as run

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def toy_target(monkeypatch):
    """Import the plugin module (it registers ``toy``), and take it out again afterwards."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    module = sys.modules.get("toy_target") or importlib.import_module("toy_target")
    TARGETS.setdefault("toy", module.SPEC)  # a second test in this process: already imported
    yield module.SPEC
    TARGETS.pop("toy", None)


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_a_toy_target_in_one_module_is_in_convert_help_doctor_convert_and_bench(capsys, tmp_path, toy_target):
    with pytest.raises(SystemExit):
        from u2zoo.cli import main

        main(["convert", "--help"])
    help_text = capsys.readouterr().out
    assert "--toy-decompose" in help_text and "run_decompositions" in help_text and "[toy]" in help_text
    assert "toy" in help_text.split("\n  --target TARGET")[1].split("\n  --")[0]  # a --target choice

    code, out, _ = run(capsys, "doctor")
    assert code == 0 and "  toy " in out and "ok" in out.split("  toy ")[1].splitlines()[0]

    code, out, err = run(
        capsys, "convert", "--model", "u2net-tiny", "--random-weights", "--target", "toy", "--toy-decompose",
        "--height", "64", "--width", "64", "--out", tmp_path / "conv",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "conv" / "u2net-tiny_toy_fp32_core.u2zoo.json").read_text())
    assert manifest["options"]["toy_decompose"] is True and manifest["parity"]["status"] == "ok"
    assert manifest["parity"]["max_abs"] <= 1e-3  # the fp32 row of the one tolerance table

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(data / f"{i}.png")
    code, out, err = run(
        capsys, "bench", "--model", "u2net-tiny", "--random-weights", "--targets", "toy,onnx", "--data", data,
        "--out", tmp_path / "bench", "--runs", "2", "--warmup", "0", "--batches", "1", "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "bench" / "results.jsonl").read_text().splitlines()]
    toy = next(r for r in rows if r["target"] == "toy")
    assert toy["status"] == "ok" and toy["parity"]["max_abs"] < 1e-4 and toy["speed"]["latency_ms_p50"] > 0


def test_every_declaration_of_an_option_means_the_same_flag():
    """Options several targets share come from one factory: one flag, one help, one suffix."""
    seen: dict[str, dataclasses.Field] = {}
    for spec in TARGETS.values():
        for field in cli_fields(spec.options_type):
            first = seen.setdefault(field.name, field)
            assert (flag_of(field), dict(field.metadata).keys()) == (flag_of(first), dict(first.metadata).keys())
            assert field.metadata["help"] == first.metadata["help"], field.name


def test_stems_and_tolerances_come_from_the_option_fields():
    coreml = TARGETS["coreml"].options_type
    assert stem_suffix(coreml(precision="fp16", palettize=4, image_input=True)) == "_pal4_image"
    assert judged_precision(coreml(precision="fp16", palettize=4)) == "int8-weights"
    assert judged_precision(coreml(image_input=True)) == "fp16"
    assert judged_precision(coreml(precision="fp16", image_input=True)) == "fp16"
    onnx = TARGETS["onnx"].options_type
    assert stem_suffix(onnx(precision="int8", calib="c", dynamic=True, int8_scheme="s8s8")) == "_dynamic_s8s8"
    assert stem_suffix(onnx()) == ""  # the default scheme adds nothing
    assert stem_suffix(TARGETS["torch"].options_type()) == "_dynamic"  # eager torch is always dynamic


@pytest.mark.parametrize(
    "target, precision, expected",
    [
        ("onnx", "int8", {"calib": "c.npz", "keep_fp": 2, "keep_fp_groups": ("stage6",)}),
        ("onnx", "int8-qat", {"calib": "c.npz", "keep_fp_groups": ("stage6",)}),
        ("onnx", "fp16", {}),
        ("executorch", "int8", {"calib": "c.npz", "keep_fp_groups": ("stage6",)}),  # it has no keep_fp
        ("tflite", "dynamic-int8", {"keep_fp_groups": ("stage6",)}),
        ("aoti", "fp32", {"device": "cpu", "max_batch": 32}),
        ("tensorrt", "int8", {"calib": "c.npz", "keep_fp": 2, "keep_fp_groups": ("stage6",), "max_batch": 32}),
    ],
)
def test_a_bench_cell_sets_only_the_options_its_target_has(target, precision, expected):
    cell = BenchCell(precision, "cpu", "c.npz", largest_batch=32, keep_fp=2, keep_fp_groups=("stage6",))
    assert bench_options(TARGETS[target].options_type, cell) == expected
    TARGETS[target].make_options(precision=precision, **expected)  # and the target accepts them


def test_every_target_precision_is_a_known_precision():
    for spec in TARGETS.values():
        assert set(spec.precisions) <= set(PRECISIONS), spec.name
