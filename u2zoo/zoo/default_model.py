"""Which shipped model a user meets when they name none: a rule, not a constant.

U2NET-lite is the faster model, but it becomes the default only once its ratchet record (the
JSON shipped beside its weights by ``u2zoo.training.ship``) shows that *these* weights meet
its ship targets on the held-out DUTS-TR ``val/`` split. Until then the default is U2NETP,
whose real weights ship in the package too. A missing, unreadable or stale record never
promotes the lite, and nothing here ever falls back to random weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The lite's ship targets on val/ (issue 14): deploy-path MAE and max F against ground truth.
LITE_MAX_MAE = 0.05
LITE_MIN_MAX_F = 0.92
FALLBACK = "u2netp"
CANDIDATE = "u2net-lite"


@dataclass(frozen=True)
class DefaultChoice:
    name: str  # a --model name
    reason: str

    def describe(self) -> str:
        return f"default: {self.name} ({self.reason})"


def lite_record_path() -> Path:
    from u2zoo.zoo.weights import REGISTRY

    return REGISTRY[CANDIDATE].cache_path().with_suffix(".json")


def choose_default(record_path: Path | None = None) -> DefaultChoice:
    """U2NET-lite if its ratchet record proves the ship targets for the shipped file, else U2NETP."""
    from u2zoo.zoo.weights import REGISTRY

    path = record_path or lite_record_path()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return DefaultChoice(FALLBACK, f"{CANDIDATE} ratchet record missing: {path.name}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return DefaultChoice(FALLBACK, f"{CANDIDATE} ratchet record unreadable: {path.name}")
    val = (record.get("metrics") or {}).get("val") if isinstance(record, dict) else None
    try:
        mae, max_f = float(val["mae"]), float(val["max_f"])
    except (TypeError, KeyError, ValueError):
        return DefaultChoice(FALLBACK, f"{CANDIDATE} ratchet record has no val/ score")
    if record.get("sha256") != REGISTRY[CANDIDATE].sha256:
        return DefaultChoice(FALLBACK, f"{CANDIDATE} ratchet record scores other weights than the shipped ones")
    misses = ([f"val MAE {mae:.3f} > {LITE_MAX_MAE}"] if mae > LITE_MAX_MAE else []) + (
        [f"val max F {max_f:.3f} < {LITE_MIN_MAX_F}"] if max_f < LITE_MIN_MAX_F else []
    )
    if misses:
        return DefaultChoice(FALLBACK, f"{CANDIDATE} " + ", ".join(misses))
    return DefaultChoice(
        CANDIDATE, f"{CANDIDATE} val MAE {mae:.3f} ≤ {LITE_MAX_MAE}, max F {max_f:.3f} ≥ {LITE_MIN_MAX_F}"
    )
