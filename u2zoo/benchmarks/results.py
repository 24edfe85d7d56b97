"""The rows ``u2zoo bench`` writes (``results.jsonl``): their schema, reading them back (a row
that cannot be interpreted is refused, never guessed), flattening them into comparison rows,
and the labels of hosts and runs that the report's tables and plots share."""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from u2zoo.errors import ConfigError, one_line

RESULTS_SCHEMA = "u2zoo.results"
RESULTS_SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("schema", "schema_version", "status", "model", "target", "precision")
STATUSES = ("ok", "unavailable", "convert_failed", "run_failed", "parity_failed")

COLUMNS = (
    "host",
    "model",
    "target",
    "precision",
    "device",
    "status",
    "size_mb",
    "max_abs",
    "mean_abs",
    "iou50",
    "delta_mae",
    "p50_ms",
    "p90_ms",
    "fps",
    "fps_by_batch",
    "e2e_ms",
    "peak_rss_mb",
    "gate",
    "reason",
)
# Ground-truth accuracy columns: shown only when some row was benchmarked with --gt.
ACCURACY_COLUMNS = ("max_f", "mae")

HEADERS = {
    "size_mb": "size MB",
    "max_abs": "max abs",
    "mean_abs": "mean abs",
    "iou50": "IoU@0.5",
    "delta_mae": "ΔMAE",
    "p50_ms": "p50 ms",
    "p90_ms": "p90 ms",
    "fps": "FPS",
    "e2e_ms": "e2e ms",
    "peak_rss_mb": "peak RSS MB",
    "fps_by_batch": "FPS by batch",
    "max_f": "max F (GT)",
    "mae": "MAE (GT)",
}
_FORMATS = {
    "size_mb": "{:.2f}",
    "max_abs": "{:.3g}",
    "mean_abs": "{:.3g}",
    "iou50": "{:.3f}",
    "delta_mae": "{:.3g}",
    "p50_ms": "{:.1f}",
    "p90_ms": "{:.1f}",
    "fps": "{:.1f}",
    "e2e_ms": "{:.1f}",
    "peak_rss_mb": "{:.0f}",
    "max_f": "{:.3f}",
    "mae": "{:.3g}",
}
NUMERIC = frozenset(_FORMATS)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class MatrixRow:
    """One cell of ``u2zoo bench``: which model, target and precision, how it ended (``status``,
    with the ``reason`` when not ok) and what was measured. ``to_dict`` is its results.jsonl
    line; ``u2zoo report`` reads those lines back as plain dicts (files of any host)."""

    run_id: str
    model: str
    target: str
    precision: str
    status: str
    weights: dict[str, Any] | None = None
    device: str = "cpu"
    reason: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    artifact: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    data: dict[str, Any] | None = None  # the images (and ground truth) the cell was measured on

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown cell status {self.status!r} (one of {', '.join(STATUSES)})")

    @property
    def failed(self) -> bool:
        """A cell that ran into an error or missed its gate (``unavailable`` is not a failure)."""
        return self.status in ("convert_failed", "run_failed", "parity_failed")

    def to_dict(self) -> dict[str, Any]:
        """The results.jsonl row, keys in the order every results file has had."""
        return {
            "schema": RESULTS_SCHEMA,
            "schema_version": RESULTS_SCHEMA_VERSION,
            "run_id": self.run_id,
            "created": self.created,
            "model": self.model,
            "weights": self.weights,
            "target": self.target,
            "precision": self.precision,
            "device": self.device,
            "options": self.options,
            "status": self.status,
            "reason": self.reason,
            "artifact": self.artifact,
            "parity": self.parity,
            "accuracy": self.accuracy,
            "speed": self.speed,
            "gate": self.gate,
            "notes": self.notes,
            "host": self.host,
            "tools": self.tools,
            "data": self.data,
        }


# ---------------------------------------------------------------------------------------------
# Loading


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read and validate every row of every results file, in order.

    Strict on purpose: a truncated line or a row from another schema version would make the
    merged comparison quietly wrong, so it is an error naming the file and line instead.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("no results files given")
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(_read_results_file(path))
    if not rows:
        raise ConfigError(f"no result rows in {', '.join(str(p) for p in paths)}")
    return rows


def _read_results_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise ConfigError(f"results file not found: {path}")
    try:
        with path.open(encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read results file {path}: {one_line(exc)}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            rows.append(_parse_row(line, path, number))
    return rows


def _parse_row(line: str, path: Path, number: int) -> dict[str, Any]:
    """One line → one validated row; the schema is checked before the fields (better message)."""
    where = f"{path} line {number}"
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise ConfigError(f"corrupt results file {where}: not JSON ({one_line(exc)})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"corrupt results file {where}: not a JSON object")
    if "schema" in row and row["schema"] != RESULTS_SCHEMA:
        raise ConfigError(
            f"{where}: schema {row['schema']!r} is not {RESULTS_SCHEMA!r} (not a u2zoo bench results file)"
        )
    if "schema_version" in row and row["schema_version"] != RESULTS_SCHEMA_VERSION:
        raise ConfigError(
            f"cannot merge results schema v{row['schema_version']} from {path} with "
            f"v{RESULTS_SCHEMA_VERSION} (line {number}; unsupported: this u2zoo reads "
            f"results schema v{RESULTS_SCHEMA_VERSION} only)"
        )
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        raise ConfigError(f"corrupt results file {where}: missing field(s) {', '.join(missing)}")
    return row


# ---------------------------------------------------------------------------------------------
# Flattening


def get_path(row: dict[str, Any], *keys: str) -> Any:
    """Nested lookup that tolerates null sections (cells that stopped early)."""
    value: Any = row
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def as_number(value: Any) -> float | None:
    """A number for arithmetic/formatting, or None (null, text or bool in a numeric field)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _short_cpu(cpu: Any) -> str | None:
    """'AMD EPYC 7B13 64-Core Processor' → 'AMD EPYC 7B13': keeps labels legible in legends."""
    if not cpu:
        return None
    text = re.sub(r"\((R|TM|tm|r)\)", "", str(cpu))
    text = re.sub(r"\b\d+-Core Processor\b|\bProcessor\b|\bCPU\b", "", text)
    return " ".join(text.split()) or str(cpu)


def run_threads(rows: Iterable[dict[str, Any]]) -> dict[tuple[Any, Any], int]:
    """Thread count per (run_id, hostname), from any timed cell of that run.

    A bench run uses one thread count, but cells that never got timed (unavailable, failed)
    carry no ``speed``; this lets them join their run's host label instead of a stray one.
    """
    threads: dict[tuple[Any, Any], int] = {}
    for row in rows:
        value = get_path(row, "speed", "threads")
        if isinstance(value, int) and not isinstance(value, bool):
            threads.setdefault((row.get("run_id"), get_path(row, "host", "hostname")), value)
    return threads


def host_label(row: dict[str, Any], threads: int | None = None) -> str:
    """'hostname · cpu · Nt [· gpu]': the same machine at 1 and 2 threads is two 'hosts'."""
    host = row.get("host") if isinstance(row.get("host"), dict) else {}
    parts = [str(host.get("hostname") or "unknown host")]
    cpu = _short_cpu(host.get("cpu"))
    if cpu:
        parts.append(cpu)
    value = get_path(row, "speed", "threads")
    threads = value if isinstance(value, int) and not isinstance(value, bool) else threads
    if threads is not None:
        parts.append(f"{threads}t")
    if host.get("gpu"):
        parts.append(str(host["gpu"]))
    return " · ".join(parts)


def labels_of(rows: list[dict[str, Any]]) -> list[str]:
    threads = run_threads(rows)
    return [host_label(r, threads.get((r.get("run_id"), get_path(r, "host", "hostname")))) for r in rows]


def _gate(row: dict[str, Any]) -> str:
    passed = get_path(row, "gate", "passed")
    return "-" if passed is None else ("pass" if passed else "fail")


def _device(row: dict[str, Any]) -> str:
    """cpu or cuda; rows written before the device field existed ran on CPU."""
    return str(row.get("device") or get_path(row, "options", "device") or "cpu")


def _fps_by_batch(row: dict[str, Any]) -> str | None:
    """'1: 5.3 · 8: 41.0 · 16: 70.2' from the cell's throughput runs."""
    throughput = get_path(row, "speed", "throughput")
    if not isinstance(throughput, dict) or not throughput:
        return None
    items = sorted(((int(b), as_number(v)) for b, v in throughput.items() if str(b).isdigit()), key=lambda x: x[0])
    return " · ".join(f"{b}: {v:.1f}" for b, v in items if v is not None) or None


def _flat(row: dict[str, Any], host: str) -> dict[str, Any]:
    size = as_number(get_path(row, "artifact", "size_bytes"))
    return {
        "host": host,
        "model": row.get("model"),
        "target": row.get("target"),
        "precision": row.get("precision"),
        "device": _device(row),
        "status": row.get("status"),
        "size_mb": None if size is None else size / 1e6,
        "max_abs": as_number(get_path(row, "parity", "max_abs")),
        "mean_abs": as_number(get_path(row, "parity", "mean_abs")),
        "iou50": as_number(get_path(row, "parity", "iou50")),
        "delta_mae": as_number(get_path(row, "parity", "delta_mae")),
        "p50_ms": as_number(get_path(row, "speed", "latency_ms_p50")),
        "p90_ms": as_number(get_path(row, "speed", "latency_ms_p90")),
        "fps": as_number(get_path(row, "speed", "fps")),
        "fps_by_batch": _fps_by_batch(row),
        "e2e_ms": as_number(get_path(row, "speed", "e2e_ms_p50")),
        "peak_rss_mb": as_number(get_path(row, "speed", "peak_rss_mb")),
        "gate": _gate(row),
        "reason": row.get("reason"),
        "max_f": as_number(get_path(row, "accuracy", "max_f")),
        "mae": as_number(get_path(row, "accuracy", "mae")),
    }


def _sort_key(flat: dict[str, Any]) -> tuple[str, ...]:
    return tuple("" if flat[k] is None else str(flat[k]) for k in ("model", "target", "precision", "host"))


def comparison_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per cell (``COLUMNS`` plus GT ``max_f``/``mae``), sorted model/target/precision/host."""
    return sorted((_flat(r, label) for r, label in zip(rows, labels_of(rows))), key=_sort_key)


def table_columns(flat_rows: list[dict[str, Any]]) -> list[str]:
    """The spec columns, plus GT accuracy columns when any cell was measured against ground truth."""
    extra = [c for c in ACCURACY_COLUMNS if any(r.get(c) is not None for r in flat_rows)]
    return [*COLUMNS[:-2], *extra, *COLUMNS[-2:]]  # keep gate/reason last: reason is the wide one


def format_value(column: str, value: Any) -> str:
    """Human formatting: ms to 1 decimal, errors to 3 significant digits, '-' for null."""
    if value is None:
        return "-"
    if column in NUMERIC and isinstance(value, (int, float)):
        return _FORMATS[column].format(value)
    return one_line(value)


# ---------------------------------------------------------------------------------------------
# Host and run summaries


def hosts_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Label → merged host info, tool versions (union) and run ids, in first-seen order."""
    hosts: dict[str, dict[str, Any]] = {}
    for row, label in zip(rows, labels_of(rows)):
        entry = hosts.setdefault(label, {"host": {}, "tools": {}, "runs": []})
        if isinstance(row.get("host"), dict):
            for key, value in row["host"].items():
                entry["host"].setdefault(key, value)
        if isinstance(row.get("tools"), dict):
            for key, value in row["tools"].items():
                if value is not None:
                    entry["tools"].setdefault(key, value)
        if row.get("run_id") and row["run_id"] not in entry["runs"]:
            entry["runs"].append(row["run_id"])
    return hosts


def host_summary(info: dict[str, Any]) -> str:
    host, tools = info["host"], info["tools"]
    parts = [f"CPU {host.get('cpu') or '?'}", f"{host.get('cores') or '?'} cores"]
    if host.get("gpu"):
        parts.append(f"GPU {host['gpu']}" + (f" (driver {host['driver']})" if host.get("driver") else ""))
    else:
        parts.append("no GPU")
    load = host.get("load_avg")
    if isinstance(load, list) and load and all(as_number(v) is not None for v in load):
        parts.append("load " + "/".join(f"{v:.2f}" for v in load))
    for key, prefix in (("os", ""), ("python", "Python ")):
        if host.get(key):
            parts.append(f"{prefix}{host[key]}")
    text = ", ".join(parts)
    if tools:
        text += "; tools: " + ", ".join(f"{k} {v}" for k, v in sorted(tools.items()))
    if info["runs"]:
        text += "; run " + ", ".join(info["runs"])
    return text


def run_ids(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["run_id"]) for r in rows if r.get("run_id")))
