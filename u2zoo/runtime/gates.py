"""Accuracy-parity gates: tolerances per precision, with per-target/model overrides, in YAML.

``default_gates.yaml`` beside this module is u2zoo's one tolerance table: ``u2zoo bench
--gate`` applies all of it, and ``u2zoo convert`` requires its parity limits (those it can
measure without ground truth, :func:`convert_tolerance`) before it calls an artifact a
success. A user's gate file has the same form. Any key we do not know is an error (a typo must
never silently disable a gate). ``evaluate`` names every limit a cell breaks, with the
measured value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from u2zoo.errors import ConfigError, did_you_mean, one_line
from u2zoo.runtime.compare import Tolerance
from u2zoo.runtime.precisions import PRECISIONS

DEFAULT_GATES = Path(__file__).with_name("default_gates.yaml")

# limit key → (parity field, comparison): "max" means value must be ≤ limit, "min" ≥ limit.
LIMITS: dict[str, tuple[str, str]] = {
    "max_abs": ("max_abs", "max"),
    "mean_abs": ("mean_abs", "max"),
    "iou50_min": ("iou50", "min"),
    "delta_mae_max": ("delta_mae", "max"),
    "delta_max_f_max": ("delta_max_f", "max"),
    "boundary_mae_max": ("boundary_mae", "max"),
}
# the limits `convert` can check: artifact against torch, no ground truth
PARITY_LIMITS = ("max_abs", "mean_abs", "iou50_min")
_TOP_KEYS = {"schema_version", "precisions", "overrides"}
_OVERRIDE_KEYS = {"target", "model", "precision", "limits"}


@dataclass
class Gates:
    precisions: dict[str, dict[str, float]]
    overrides: list[dict[str, Any]] = field(default_factory=list)
    source: str = "<built-in>"

    def limits_for(self, model: str, target: str, precision: str) -> dict[str, float]:
        """The precision's limits, then every matching override on top, in file order."""
        limits = dict(self.precisions.get(precision, {}))
        for rule in self.overrides:
            if all(
                rule.get(k) in (None, v) for k, v in (("model", model), ("target", target), ("precision", precision))
            ):
                limits.update(rule["limits"])
        return limits

    def evaluate(self, model: str, target: str, precision: str, parity: dict[str, Any]) -> list[str]:
        """Every broken limit as 'name value op limit'; empty when the cell passes."""
        failures = []
        for key, limit in self.limits_for(model, target, precision).items():
            field_name, kind = LIMITS[key]
            value = parity.get(field_name)
            if value is None:
                failures.append(f"{field_name} not measured (gate {key} {limit:g})")
            elif kind == "max" and not value <= limit:
                failures.append(f"{field_name} {value:.4g} > {limit:g}")
            elif kind == "min" and not value >= limit:
                failures.append(f"{field_name} {value:.4g} < {limit:g}")
        return failures


def _check_limits(limits: Any, where: str, source: str) -> dict[str, float]:
    if not isinstance(limits, dict):
        raise ConfigError(f"gate file {source}: {where} must be a mapping of limits")
    unknown = [key for key in limits if key not in LIMITS]
    if unknown:
        raise ConfigError(f"gate file {source}: unknown key {unknown[0]!r} at {where} (known: {', '.join(LIMITS)})")
    return {key: _number(value, f"{where}.{key}", source) for key, value in limits.items()}


def _number(value: Any, where: str, source: str) -> float:
    """A limit as float; YAML 1.1 reads `1e-3` (no dot) as a string, so numeric strings count."""
    if not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"gate file {source}: {where} must be a number, not {value!r}")


def _check_precision(name: Any, where: str, source: str) -> None:
    if name not in PRECISIONS:
        raise ConfigError(
            f"gate file {source}: unknown precision {name!r} at {where}{did_you_mean(str(name), PRECISIONS)}"
        )


def parse_gates(data: Any, source: str) -> Gates:
    if not isinstance(data, dict):
        raise ConfigError(f"gate file {source}: expected a mapping at the top level")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"gate file {source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    if data.get("schema_version", 1) != 1:
        raise ConfigError(f"gate file {source}: schema_version {data['schema_version']} is not supported (1)")
    precisions = {}
    for precision, limits in (data.get("precisions") or {}).items():
        _check_precision(precision, "precisions", source)
        precisions[str(precision)] = _check_limits(limits, f"precisions.{precision}", source)
    overrides = []
    for i, rule in enumerate(data.get("overrides") or []):
        if not isinstance(rule, dict):
            raise ConfigError(f"gate file {source}: overrides[{i}] must be a mapping")
        unknown = sorted(set(rule) - _OVERRIDE_KEYS)
        if unknown:
            raise ConfigError(
                f"gate file {source}: unknown key {unknown[0]!r} at overrides[{i}] "
                f"(known: {', '.join(sorted(_OVERRIDE_KEYS))})"
            )
        if rule.get("precision") is not None:
            _check_precision(rule["precision"], f"overrides[{i}]", source)
        overrides.append(dict(rule, limits=_check_limits(rule.get("limits"), f"overrides[{i}].limits", source)))
    return Gates(precisions, overrides, source)


def load_gates(path: str | Path | None = None) -> Gates:
    """Read a gate file (the shipped defaults when ``path`` is None)."""
    import yaml

    path = Path(path) if path else DEFAULT_GATES
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read gate file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"gate file {path} is not valid YAML: {one_line(exc)}") from None
    return parse_gates(data, str(path))


@functools.cache
def default_gates() -> Gates:
    """The shipped table, read once per process."""
    return load_gates()


def convert_tolerance(model: str, target: str, precision: str) -> Tolerance:
    """What ``u2zoo convert`` requires of an artifact: the default table's parity limits for
    this model, target and precision (overrides included)."""
    limits = default_gates().limits_for(model, target, precision)
    return Tolerance(**{key: limits[key] for key in PARITY_LIMITS if key in limits})
