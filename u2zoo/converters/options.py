"""Target options, declared once: shared dataclasses, and per field everything u2zoo derives.

A target's options type is a frozen dataclass built from the shared pieces here (precision,
input size and shape, calibration) plus its own fields. Each field made with :func:`option`
carries, in its metadata, what the rest of u2zoo reads instead of keeping its own list:

- ``help`` (and ``flag``): the ``u2zoo convert`` flag, whose type comes from the annotation;
  a field without help (``precision``, set by the precision flags) is not a flag;
- ``suffix``: what the option adds to the artifact's file stem when set (``_nhwc``, ``_pal{}``),
  unless its value is ``plain``;
- ``judged_as``: {precision: precision whose tolerance judges it} while the option is set
  (palettized fp16 weights are judged like int8 weights);
- ``bench``: the value a ``u2zoo bench`` cell gives it, from :class:`BenchCell` (None: unset).

Two declarations of the same option in different targets use one factory here, so that the
flag has one meaning (a test checks that they agree).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, Callable

from u2zoo.runtime.precisions import CALIBRATED_PRECISIONS, DEFAULT_PRECISION, PRECISIONS


@dataclass(frozen=True)
class BenchCell:
    """What one ``u2zoo bench`` cell offers its target's options (read by each ``bench`` hook)."""

    precision: str
    device: str
    calib: str | None  # the model's calibration set, dumped once (.npz)
    largest_batch: int
    keep_fp: int
    keep_fp_groups: tuple[str, ...]


def option(
    default: Any = None,
    *,
    help: str,
    flag: str | None = None,
    suffix: str | None = None,
    plain: Any = None,
    judged_as: dict[str, str] | None = None,
    bench: Callable[[BenchCell], Any] | None = None,
) -> Any:
    """A target option field; see the module docstring for what each argument feeds."""
    metadata = {"help": help, "flag": flag, "suffix": suffix, "plain": plain, "judged_as": judged_as, "bench": bench}
    return dataclasses.field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


@functools.cache
def field_types(options_type: type) -> dict[str, Any]:
    """The resolved annotations of an options dataclass (they are strings under PEP 563)."""
    return typing.get_type_hints(options_type)


def cli_fields(options_type: type) -> list[dataclasses.Field]:
    """The fields of ``options_type`` that are ``convert`` flags."""
    return [f for f in dataclasses.fields(options_type) if "help" in f.metadata]


def stem_suffix(options: Any) -> str:
    """What the set options add to an artifact's file stem, in field order."""
    parts = []
    for field in dataclasses.fields(options):
        fmt, value = field.metadata.get("suffix"), getattr(options, field.name)
        if fmt and value and value != field.metadata.get("plain"):
            parts.append(fmt.format(value))
    return "".join(parts)


def judged_precision(options: Any) -> str:
    """The precision whose tolerance judges these options: their own, unless a set option says
    otherwise (the first such field wins)."""
    precision = getattr(options, "precision", DEFAULT_PRECISION)
    for field in dataclasses.fields(options):
        judged_as = field.metadata.get("judged_as")
        if judged_as and getattr(options, field.name) and precision in judged_as:
            return judged_as[precision]
    return precision


def bench_options(options_type: type, cell: BenchCell) -> dict[str, Any]:
    """The options a bench cell sets on this target: every field whose hook gives a value."""
    values = {}
    for field in dataclasses.fields(options_type):
        hook = field.metadata.get("bench")
        value = hook(cell) if hook else None
        if value is not None:
            values[field.name] = value
    return values


# --- options several targets share; a factory per field keeps one flag's meaning everywhere ---


def dynamic_option(default: bool = False) -> Any:
    return option(
        default, help="dynamic input shape (batch, and height/width where the target allows)", suffix="_dynamic"
    )


def device_option() -> Any:
    return option("cpu", help="cpu (default) or cuda", bench=lambda cell: cell.device)


def max_batch_option() -> Any:
    return option(
        16,
        help="largest batch (default 16)",
        bench=lambda cell: cell.largest_batch if cell.largest_batch > 16 else None,  # the default range is 1..16
    )


def keep_fp_option() -> Any:
    return option(
        0,
        help="int8: keep the N most sensitive layer groups in float",
        bench=lambda cell: cell.keep_fp if cell.precision == "int8" and cell.keep_fp else None,
    )


def calib_method_option() -> Any:
    return option("minmax", help="int8: minmax (default), entropy or percentile")


@dataclass(frozen=True)
class PrecisionOptions:
    precision: str = DEFAULT_PRECISION  # one of the target's TargetSpec.precisions


@dataclass(frozen=True)
class SizeOptions(PrecisionOptions):
    height: int | None = option(help="static input height (default: the contract's)")
    width: int | None = option(help="static input width (default: the contract's)")


@dataclass(frozen=True)
class ShapeOptions(SizeOptions):
    dynamic: bool = dynamic_option()
    batch: int = option(1, help="static batch size")


@dataclass(frozen=True)
class CalibrationOptions:
    calib: str | None = option(
        help="int8: folder of calibration images (or a dumped .npz)",
        bench=lambda cell: cell.calib if cell.precision in CALIBRATED_PRECISIONS else None,
    )
    calib_size: int | None = option(
        help="int8: N calibration images (default 256; a larger folder is sampled with a fixed seed)"
    )
    keep_fp_groups: tuple[str, ...] = option(
        (),
        help="int8: comma-separated layer groups to keep in float",
        bench=lambda cell: (
            cell.keep_fp_groups if PRECISIONS[cell.precision].int8_activations and cell.keep_fp_groups else None
        ),
    )


@dataclass(frozen=True)
class QatOptions:
    qat_epochs: int | None = option(help="int8-qat: fine-tuning epochs (default 2)")
    qat_lr: float | None = option(help="int8-qat: Adam learning rate (default 2e-6)")
