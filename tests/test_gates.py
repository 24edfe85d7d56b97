import pytest

from u2zoo.errors import ConfigError
from u2zoo.runtime.compare import Tolerance
from u2zoo.runtime.gates import DEFAULT_GATES, convert_tolerance, load_gates, parse_gates
from u2zoo.runtime.precisions import PRECISIONS


def test_default_gates_cover_every_precision():
    gates = load_gates()
    assert gates.source == str(DEFAULT_GATES)
    assert gates.limits_for("u2netp", "onnx", "fp32") == {"max_abs": 5e-4}  # override on top of 1e-3
    assert gates.limits_for("u2netp", "openvino", "fp32") == {"max_abs": 1e-3}
    assert gates.limits_for("u2netp", "onnx", "int8") == {"iou50_min": 0.98, "delta_mae_max": 0.01}
    assert set(gates.precisions) == set(PRECISIONS)  # the table has a row for every precision u2zoo builds


def test_convert_requires_the_parity_limits_of_the_same_table():
    """One tolerance table: convert's gate is the default gate file's limits that need no ground truth."""
    assert convert_tolerance("u2netp", "openvino", "fp32") == Tolerance(max_abs=1e-3)
    assert convert_tolerance("u2netp", "onnx", "fp32") == Tolerance(max_abs=5e-4)  # the onnx override
    assert convert_tolerance("u2netp", "tflite", "fp16") == Tolerance(max_abs=5e-3, mean_abs=5e-3, iou50_min=0.98)
    assert convert_tolerance("u2netp", "onnx", "int8") == Tolerance(iou50_min=0.98)  # delta_mae needs GT


def test_evaluate_names_each_broken_limit_with_its_value():
    gates = parse_gates({"precisions": {"int8": {"iou50_min": 0.98, "delta_mae_max": 0.01, "max_abs": 0.5}}}, "g.yaml")
    failures = gates.evaluate("m", "t", "int8", {"iou50": 0.9712, "delta_mae": 0.02, "max_abs": 0.1})
    assert failures == ["iou50 0.9712 < 0.98", "delta_mae 0.02 > 0.01"]
    assert gates.evaluate("m", "t", "int8", {"iou50": 0.99, "delta_mae": 0.0, "max_abs": 0.5}) == []
    assert gates.evaluate("m", "t", "int8", {"iou50": None, "delta_mae": 0, "max_abs": 0}) == [
        "iou50 not measured (gate iou50_min 0.98)"
    ]
    assert gates.evaluate("m", "t", "fp16", {"max_abs": 9.0}) == []  # no limits for that precision


def test_overrides_apply_in_order_to_matching_cells_only():
    gates = parse_gates(
        {
            "precisions": {"fp16": {"mean_abs": 5e-3}},
            "overrides": [
                {"model": "u2net", "limits": {"mean_abs": 1e-2}},
                {"model": "u2net", "target": "tflite", "limits": {"mean_abs": 2e-2}},
            ],
        },
        "g",
    )
    assert gates.limits_for("u2netp", "onnx", "fp16") == {"mean_abs": 5e-3}
    assert gates.limits_for("u2net", "onnx", "fp16") == {"mean_abs": 1e-2}
    assert gates.limits_for("u2net", "tflite", "fp16") == {"mean_abs": 2e-2}


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("precisions: {fp32: {max_abss: 1}}", r"unknown key 'max_abss' at precisions\.fp32"),
        ("precision: {fp32: {max_abs: 1}}", r"unknown key 'precision'"),
        ("overrides: [{target: onnx, limit: {max_abs: 1}}]", r"unknown key 'limit' at overrides\[0\]"),
        ("precisions: {fp32: {max_abs: tight}}", "must be a number"),
        ("schema_version: 2", "schema_version 2 is not supported"),
        ("- a\n- b", "expected a mapping"),
        ("precisions: {fp32: [", "not valid YAML"),
        ("precisions: {int9: {max_abs: 1}}", r"unknown precision 'int9' at precisions; did you mean 'int8'"),
        ("overrides: [{precision: fp61, limits: {max_abs: 1}}]", r"unknown precision 'fp61' at overrides\[0\]"),
    ],
)
def test_bad_gate_files_are_one_line_config_errors(tmp_path, text, pattern):
    path = tmp_path / "gates.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_gates(path)
    assert "\n" not in str(info.value)


def test_missing_gate_file():
    with pytest.raises(ConfigError, match="cannot read gate file"):
        load_gates("/nonexistent/gates.yaml")


def test_numbers_in_any_yaml_spelling(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("precisions: {fp16: {mean_abs: 5e-3, iou50_min: 0.98}}")  # 5e-3 is a string to YAML 1.1
    assert load_gates(path).limits_for("m", "t", "fp16") == {"mean_abs": 5e-3, "iou50_min": 0.98}
