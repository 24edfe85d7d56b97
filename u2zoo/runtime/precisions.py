"""The precisions u2zoo builds, in one table.

A precision's name is also its ``convert`` flag (``--int8-qat``), its key in gate files and
its column in bench results; the table says what it means and which machinery it needs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    help: str  # the `convert` flag's help
    calibrated: bool = False  # static INT8 activations: needs calibration images (--calib)
    float_fallback: bool = False  # a miss of the INT8 gate keeps layer groups in float (quantization.auto_fp)
    int8_activations: bool = False  # layer groups can be kept in float (--keep-fp-groups)

    @property
    def flag(self) -> str:
        return f"--{self.name}"


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "float32 weights and arithmetic (the default)"),
        Precision("fp16", "float16 weights and arithmetic"),
        Precision(
            "int8",
            "int8 weights and activations (calibrated with --calib)",
            calibrated=True,
            float_fallback=True,
            int8_activations=True,
        ),
        Precision(
            "int8-qat",
            "int8 by quantization-aware fine-tuning against the float model (--calib): "
            "openvino (NNCF) or onnx (pt2e, a symmetric QDQ graph)",
            calibrated=True,
            int8_activations=True,
        ),
        Precision(
            "dynamic-int8",
            "tflite: dynamic-range quantization (int8 weights, activations quantized at run time)",
            float_fallback=True,
            int8_activations=True,
        ),
        Precision("int8-weights", "coreml/tflite: int8 weight-only compression (float arithmetic)"),
    )
}
DEFAULT_PRECISION = "fp32"
# precisions whose INT8 misses go through the automatic float fallback
FLOAT_FALLBACK_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if p.float_fallback)
CALIBRATED_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if p.calibrated)
