"""The Core ML target's options: precisions, palettes, deployment targets (checked without
importing coremltools) and the compute units an app may ask for."""

from __future__ import annotations

from dataclasses import dataclass

from u2zoo.converters.options import ShapeOptions, option
from u2zoo.errors import ConfigError, did_you_mean

INPUT_NAME = "image"
OUTPUT_NAME = "mask"
PRECISIONS = ("fp32", "fp16", "int8-weights")
PALETTE_BITS = (1, 2, 3, 4, 6, 8)

# coremltools' ``ct.target`` names → Core ML specification version, copied so options can be
# checked without importing coremltools (a 10+ s import); tests/test_coreml.py checks it
# against the installed ``ct.target``.
DEPLOYMENT_TARGETS: dict[str, int] = {
    "iOS13": 4,
    "iOS14": 5,
    "iOS15": 6,
    "iOS16": 7,
    "iOS17": 8,
    "iOS18": 9,
    "iOS26": 10,
    "macOS10_15": 4,
    "macOS10_16": 5,
    "macOS11": 5,
    "macOS12": 6,
    "macOS13": 7,
    "macOS14": 8,
    "macOS15": 9,
    "macOS26": 10,
    "watchOS6": 4,
    "watchOS7": 5,
    "watchOS8": 6,
    "watchOS9": 7,
    "watchOS10": 8,
    "watchOS11": 9,
    "watchOS26": 10,
    "tvOS13": 4,
    "tvOS14": 5,
    "tvOS15": 6,
    "tvOS16": 7,
    "tvOS17": 8,
    "tvOS18": 9,
    "tvOS26": 10,
}
_MLPROGRAM = 6  # ML programs (.mlpackage) exist since iOS15/macOS12
_COMPRESSED = 7  # constexpr (de)compression ops: iOS16/macOS13
_LUT3 = 9  # a 3-bit look-up table (8 entries): iOS18/macOS15; iOS16 only has 1, 2, 4, 6 and 8 bits
_ALL_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


def _family(name: str) -> str:
    return next(f for f in ("macOS", "watchOS", "tvOS", "iOS") if name.startswith(f))


def _oldest(family: str, version: int) -> str:
    """The first name of ``family`` at specification ``version`` or later, e.g. (macOS, 6) → macOS12."""
    return next(n for n, v in DEPLOYMENT_TARGETS.items() if _family(n) == family and v >= version)


@dataclass(frozen=True)
class CoreMLOptions(ShapeOptions):
    """precision: fp32 | fp16 | int8-weights. int8-weights = the fp16 model whose weights
    (tensors of more than WEIGHT_THRESHOLD elements) are stored as int8, linear symmetric per
    output channel, and dequantized to fp16 when Core ML loads the model: arithmetic stays
    fp16. dynamic is refused: Core ML models here have a fixed shape."""

    palettize: int | None = option(  # on top of fp32/fp16 weights
        help="k-means palettize weights to N bits (1, 2, 3, 4, 6, 8)",
        suffix="_pal{}",
        judged_as={"fp32": "int8-weights", "fp16": "int8-weights"},  # compressed: judged like int8 weights
    )
    image_input: bool = option(  # RGB ImageType (scale 1/255, mean/std inside) instead of a tensor
        False,
        help="ImageType input (the app passes a 320×320 RGB image; scale/bias are in the model)",
        suffix="_image",
        judged_as={"fp32": "fp16"},  # the RGB input is rounded to 8 bits
    )
    deployment_target: str = option(  # a ct.target name; ML programs need iOS15/macOS12+
        "iOS16", help="minimum deployment target, e.g. iOS16 (default), macOS13"
    )

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"coreml does not support precision {self.precision!r} (supported: {', '.join(PRECISIONS)})"
            )
        if self.dynamic:
            raise ConfigError("coreml builds fixed-shape models here; build one per size with --height/--width")
        if self.batch != 1:
            raise ConfigError(
                f"coreml models here take one image (batch 1), not {self.batch}; an app predicts image by image"
            )
        if (self.height is not None and self.height < 1) or (self.width is not None and self.width < 1):
            raise ConfigError("height and width must be positive")
        if self.palettize is not None:
            if self.precision == "int8-weights":
                raise ConfigError(
                    "--palettize applies to fp32 or fp16 weights, not on top of --int8-weights: choose one compression"
                )
            if self.palettize not in PALETTE_BITS:
                raise ConfigError(
                    f"--palettize {self.palettize}: Core ML palettizes to {', '.join(map(str, PALETTE_BITS))} bits"
                )
        names = {n.lower(): n for n in DEPLOYMENT_TARGETS}  # also "ios16", "macOS 10.15"
        name = names.get(str(self.deployment_target).replace(" ", "").replace(".", "_").lower())
        if name is None:
            raise ConfigError(
                f"unknown deployment target {self.deployment_target!r}"
                f"{did_you_mean(str(self.deployment_target), DEPLOYMENT_TARGETS)}"
            )
        object.__setattr__(self, "deployment_target", name)  # canonical spelling, e.g. ios16 → iOS16
        needed, what = self.minimum_spec_version()
        if DEPLOYMENT_TARGETS[name] < needed:
            raise ConfigError(
                f"deployment target {name} is too old: {what} needs {_oldest(_family(name), needed)} "
                f"or later (--deployment-target)"
            )

    def minimum_spec_version(self) -> tuple[int, str]:
        """The oldest Core ML specification version these options need, and why."""
        if self.palettize == 3:
            return _LUT3, "3-bit palettization"
        if self.palettize:
            return _COMPRESSED, "palettized weights"
        if self.precision == "int8-weights":
            return _COMPRESSED, "int8 weights"
        return _MLPROGRAM, "a Core ML ML program (.mlpackage)"

    @property
    def compression(self) -> str | None:
        if self.precision == "int8-weights":
            return "int8"
        return f"palettize{self.palettize}" if self.palettize else None
