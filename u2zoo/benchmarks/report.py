"""Merge ``results.jsonl`` files from several machines into one comparison report.

``u2zoo bench`` writes one JSON row per matrix cell; each machine (and each thread count)
gets its own file. ``u2zoo report`` reads them all, refuses rows it cannot interpret (a
half-written line or another schema version would silently skew a comparison), and writes a
Markdown table, a CSV, two plots and a single self-contained HTML page.

matplotlib is an optional extra (``u2zoo[report]``): it is imported only when plotting.
Plots are drawn with matplotlib's object API on an Agg canvas — pyplot is never imported,
so no GUI backend is selected and no global figure state is touched.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from u2zoo.artifact import atomic_write_text
from u2zoo.errors import BackendUnavailable, ConfigError, one_line

RESULTS_SCHEMA = "u2zoo.results"
RESULTS_SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("schema", "schema_version", "status", "model", "target", "precision")
STATUSES = ("ok", "unavailable", "convert_failed", "run_failed", "parity_failed")

COLUMNS = ("host", "model", "target", "precision", "device", "status", "size_mb", "max_abs", "mean_abs",
           "iou50", "delta_mae", "p50_ms", "p90_ms", "fps", "fps_by_batch", "e2e_ms", "peak_rss_mb", "gate",
           "reason")
# Ground-truth accuracy columns: shown only when some row was benchmarked with --gt.
ACCURACY_COLUMNS = ("max_f", "mae")

_HEADERS = {"size_mb": "size MB", "max_abs": "max abs", "mean_abs": "mean abs", "iou50": "IoU@0.5",
            "delta_mae": "ΔMAE", "p50_ms": "p50 ms", "p90_ms": "p90 ms", "fps": "FPS", "e2e_ms": "e2e ms",
            "peak_rss_mb": "peak RSS MB", "fps_by_batch": "FPS by batch", "max_f": "max F (GT)", "mae": "MAE (GT)"}
_FORMATS = {"size_mb": "{:.2f}", "max_abs": "{:.3g}", "mean_abs": "{:.3g}", "iou50": "{:.3f}",
            "delta_mae": "{:.3g}", "p50_ms": "{:.1f}", "p90_ms": "{:.1f}", "fps": "{:.1f}",
            "e2e_ms": "{:.1f}", "peak_rss_mb": "{:.0f}", "max_f": "{:.3f}", "mae": "{:.3g}"}
_NUMERIC = frozenset(_FORMATS)


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
        raise ConfigError(f"{where}: schema {row['schema']!r} is not {RESULTS_SCHEMA!r} "
                          "(not a u2zoo bench results file)")
    if "schema_version" in row and row["schema_version"] != RESULTS_SCHEMA_VERSION:
        raise ConfigError(f"cannot merge results schema v{row['schema_version']} from {path} with "
                          f"v{RESULTS_SCHEMA_VERSION} (line {number}; unsupported: this u2zoo reads "
                          f"results schema v{RESULTS_SCHEMA_VERSION} only)")
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        raise ConfigError(f"corrupt results file {where}: missing field(s) {', '.join(missing)}")
    return row


# ---------------------------------------------------------------------------------------------
# Flattening


def _get(row: dict[str, Any], *keys: str) -> Any:
    """Nested lookup that tolerates null sections (cells that stopped early)."""
    value: Any = row
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value: Any) -> float | None:
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
        value = _get(row, "speed", "threads")
        if isinstance(value, int) and not isinstance(value, bool):
            threads.setdefault((row.get("run_id"), _get(row, "host", "hostname")), value)
    return threads


def host_label(row: dict[str, Any], threads: int | None = None) -> str:
    """'hostname · cpu · Nt [· gpu]': the same machine at 1 and 2 threads is two 'hosts'."""
    host = row.get("host") if isinstance(row.get("host"), dict) else {}
    parts = [str(host.get("hostname") or "unknown host")]
    cpu = _short_cpu(host.get("cpu"))
    if cpu:
        parts.append(cpu)
    value = _get(row, "speed", "threads")
    threads = value if isinstance(value, int) and not isinstance(value, bool) else threads
    if threads is not None:
        parts.append(f"{threads}t")
    if host.get("gpu"):
        parts.append(str(host["gpu"]))
    return " · ".join(parts)


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    threads = run_threads(rows)
    return [host_label(r, threads.get((r.get("run_id"), _get(r, "host", "hostname")))) for r in rows]


def _gate(row: dict[str, Any]) -> str:
    passed = _get(row, "gate", "passed")
    return "-" if passed is None else ("pass" if passed else "fail")


def _device(row: dict[str, Any]) -> str:
    """cpu or cuda; rows written before the device field existed ran on CPU."""
    return str(row.get("device") or _get(row, "options", "device") or "cpu")


def _fps_by_batch(row: dict[str, Any]) -> str | None:
    """'1: 5.3 · 8: 41.0 · 16: 70.2' from the cell's throughput runs."""
    throughput = _get(row, "speed", "throughput")
    if not isinstance(throughput, dict) or not throughput:
        return None
    items = sorted(((int(b), _num(v)) for b, v in throughput.items() if str(b).isdigit()), key=lambda x: x[0])
    return " · ".join(f"{b}: {v:.1f}" for b, v in items if v is not None) or None


def _flat(row: dict[str, Any], host: str) -> dict[str, Any]:
    size = _num(_get(row, "artifact", "size_bytes"))
    return {
        "host": host, "model": row.get("model"), "target": row.get("target"),
        "precision": row.get("precision"), "device": _device(row), "status": row.get("status"),
        "size_mb": None if size is None else size / 1e6,
        "max_abs": _num(_get(row, "parity", "max_abs")), "mean_abs": _num(_get(row, "parity", "mean_abs")),
        "iou50": _num(_get(row, "parity", "iou50")), "delta_mae": _num(_get(row, "parity", "delta_mae")),
        "p50_ms": _num(_get(row, "speed", "latency_ms_p50")), "p90_ms": _num(_get(row, "speed", "latency_ms_p90")),
        "fps": _num(_get(row, "speed", "fps")), "fps_by_batch": _fps_by_batch(row), "e2e_ms": _num(_get(row, "speed", "e2e_ms_p50")),
        "peak_rss_mb": _num(_get(row, "speed", "peak_rss_mb")), "gate": _gate(row),
        "reason": row.get("reason"),
        "max_f": _num(_get(row, "accuracy", "max_f")), "mae": _num(_get(row, "accuracy", "mae")),
    }


def _sort_key(flat: dict[str, Any]) -> tuple[str, ...]:
    return tuple("" if flat[k] is None else str(flat[k]) for k in ("model", "target", "precision", "host"))


def comparison_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per cell (``COLUMNS`` plus GT ``max_f``/``mae``), sorted model/target/precision/host."""
    return sorted((_flat(r, label) for r, label in zip(rows, _labels(rows))), key=_sort_key)


def _columns(flat_rows: list[dict[str, Any]]) -> list[str]:
    """The spec columns, plus GT accuracy columns when any cell was measured against ground truth."""
    extra = [c for c in ACCURACY_COLUMNS if any(r.get(c) is not None for r in flat_rows)]
    return [*COLUMNS[:-2], *extra, *COLUMNS[-2:]]  # keep gate/reason last: reason is the wide one


def format_value(column: str, value: Any) -> str:
    """Human formatting: ms to 1 decimal, errors to 3 significant digits, '-' for null."""
    if value is None:
        return "-"
    if column in _NUMERIC and isinstance(value, (int, float)):
        return _FORMATS[column].format(value)
    return one_line(value)


# ---------------------------------------------------------------------------------------------
# Host and run summaries


def _hosts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Label → merged host info, tool versions (union) and run ids, in first-seen order."""
    hosts: dict[str, dict[str, Any]] = {}
    for row, label in zip(rows, _labels(rows)):
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


def _host_summary(info: dict[str, Any]) -> str:
    host, tools = info["host"], info["tools"]
    parts = [f"CPU {host.get('cpu') or '?'}", f"{host.get('cores') or '?'} cores"]
    if host.get("gpu"):
        parts.append(f"GPU {host['gpu']}" + (f" (driver {host['driver']})" if host.get("driver") else ""))
    else:
        parts.append("no GPU")
    load = host.get("load_avg")
    if isinstance(load, list) and load and all(_num(v) is not None for v in load):
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


def _run_ids(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["run_id"]) for r in rows if r.get("run_id")))


# ---------------------------------------------------------------------------------------------
# Text outputs


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def render_markdown(rows: list[dict[str, Any]], plots: dict[str, Path] | None = None,
                    title: str = "u2zoo benchmark report") -> str:
    """The comparison table plus one line per host (hardware and tool versions)."""
    flat = comparison_rows(rows)
    columns = _columns(flat)
    hosts = _hosts(rows)
    lines = [f"# {title}", "",
             f"{len(flat)} cells from {len(hosts)} host(s); runs: {', '.join(_run_ids(rows)) or '-'}.", "",
             "| " + " | ".join(_HEADERS.get(c, c) for c in columns) + " |",
             "|" + "|".join("---:" if c in _NUMERIC else "---" for c in columns) + "|"]
    for r in flat:
        lines.append("| " + " | ".join(_md_cell(format_value(c, r[c])) for c in columns) + " |")
    lines += ["", "## Hosts", ""]
    lines += [f"- **{_md_cell(label)}**: {_md_cell(_host_summary(info))}" for label, info in hosts.items()]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{kind}]({path.name})" for kind, path in plots.items()]
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]]) -> str:
    """Same columns as the table, raw numbers, empty for null: for spreadsheets and scripts."""
    flat = comparison_rows(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(flat), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in flat:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buffer.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
.meta{color:#555;font-size:.9em}
.wrap{overflow-x:auto}
table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;white-space:nowrap}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.reason{white-space:normal;max-width:32em}
tr.ok td.status{color:#1a7f37}tr.unavailable td.status{color:#777}
tr.convert_failed td.status,tr.run_failed td.status,tr.parity_failed td.status{color:#c62828;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:1em 0}
"""


def render_html(rows: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    """One self-contained page: table, hosts and the plots inlined as data URIs (mailable)."""
    esc = html.escape
    flat = comparison_rows(rows)
    columns = _columns(flat)
    hosts = _hosts(rows)
    head = "".join(f"<th>{esc(_HEADERS.get(c, c))}</th>" for c in columns)
    body = []
    for r in flat:
        cells = "".join(f'<td class="{"num" if c in _NUMERIC else c}">{esc(format_value(c, r[c]))}</td>'
                        for c in columns)
        body.append(f'<tr class="{esc(str(r["status"]))}">{cells}</tr>')
    host_items = "".join(f"<li><b>{esc(label)}</b>: {esc(_host_summary(info))}</li>" for label, info in hosts.items())
    plots = "".join(f'<h2>{esc(title)}</h2><img alt="{esc(title)}" src="data:image/png;base64,'
                    f'{base64.b64encode(data).decode("ascii")}">' for title, data in images.items())
    runs = ", ".join(_run_ids(rows)) or "-"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>u2zoo benchmark report</title><style>{_CSS}</style></head><body>\n"
            f"<h1>u2zoo benchmark report</h1>\n"
            f'<p class="meta">Merged {len(flat)} cells from {len(hosts)} host(s): '
            f"{esc('; '.join(hosts))}.<br>Runs: {esc(runs)}.</p>\n"
            f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>\n"
            f"<h2>Hosts</h2><ul>{host_items}</ul>\n{plots}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------
# Plots


def _matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or BackendUnavailable naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BackendUnavailable("report plots need matplotlib", extra="report") from None
    return Figure, FigureCanvasAgg


def _new_figure(width: float, height: float) -> Any:
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _styles(labels: list[str]) -> dict[str, tuple[Any, str]]:
    """A fixed colour + marker per host, shared by both plots so they read together."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    markers = "osD^vP*Xh<>"
    return {label: (colours[i % len(colours)], markers[i % len(markers)]) for i, label in enumerate(labels)}


def _no_data(fig: Any, title: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, "no timed cells\n(no row with status ok and speed data)", ha="center", va="center",
            fontsize=13, color="#555", transform=ax.transAxes,
            bbox={"boxstyle": "round,pad=0.6", "fc": "#f4f4f4", "ec": "#bbb"})


def _timed(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(raw row, host label) for ok cells that have a latency or an FPS."""
    return [(r, label) for r, label in zip(rows, _labels(rows)) if r.get("status") == "ok"
            and (_finite(_get(r, "speed", "fps")) or _finite(_get(r, "speed", "latency_ms_p50")))]


def _finite(value: Any) -> bool:
    number = _num(value)
    return number is not None and math.isfinite(number)


def accuracy_metric(rows: list[dict[str, Any]]) -> tuple[str, Callable[[dict[str, Any]], Any]]:
    """Ground-truth max F when every timed ok cell has it; otherwise parity IoU@0.5 vs torch.

    All-or-nothing so one plot never mixes two different accuracies on the same axis.
    """
    timed = [r for r, _ in _timed(rows) if _finite(_get(r, "speed", "fps"))]
    if timed and all(_finite(_get(r, "accuracy", "max_f")) for r in timed):
        return "max F-measure vs ground truth", lambda r: _get(r, "accuracy", "max_f")
    return "IoU@0.5 vs torch reference (parity)", lambda r: _get(r, "parity", "iou50")


# (dx, dy) in points, nearest first; far ones get a leader line back to their point.
_LABEL_OFFSETS = [(7, 0), (5, 5), (5, -5), (-7, 0), (-5, 5), (-5, -5), (0, 9), (0, -9)]
_LABEL_OFFSETS += [(dx * k, dy * k) for k in (2.2, 3.6) for dx, dy in _LABEL_OFFSETS]


def _place_labels(fig: Any, ax: Any, points: list[tuple[float, float, str, Any]]) -> None:
    """Annotate points, each at the nearest offset that overlaps no marker and no earlier label.

    Parity IoU is often exactly 1.0 for every cell, so naive labels would pile up on one line.
    """
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    radius = 6 * fig.dpi / 72  # a scatter marker of s=55 is ~7.4 pt across
    centres = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    placed = [Bbox.from_extents(cx - radius, cy - radius, cx + radius, cy + radius) for cx, cy in centres]
    for x, y, text, colour in sorted(points, key=lambda p: (p[0], p[1])):
        candidates = [*_LABEL_OFFSETS, _LABEL_OFFSETS[0]]  # crowded: overlap rather than drop it
        for n, (dx, dy) in enumerate(candidates):
            last = n == len(candidates) - 1
            far = abs(dx) > 10 or abs(dy) > 10
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7.5,
                              color=colour, ha="left" if dx > 0 else "right" if dx < 0 else "center",
                              va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                              arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "shrinkA": 0,
                                          "shrinkB": 4} if far else None)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer).expanded(1.04, 1.08)  # text only, not the leader
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if last or (fits and not any(box.overlaps(other) for other in placed)):
                placed.append(box)
                break
            ann.remove()


def plot_accuracy_vs_fps(rows: list[dict[str, Any]], path: Path) -> Path:
    """Scatter of accuracy against FPS, one series per host: the deployment trade-off at a glance.

    One panel per model (shared axes), so labels only need target/precision and stay legible.
    """
    label_text, metric = accuracy_metric(rows)
    title = f"Accuracy vs speed — {label_text}"
    points = [(r, host) for r, host in _timed(rows) if _finite(_get(r, "speed", "fps")) and _finite(metric(r))]
    if not points:
        fig = _new_figure(8.5, 6.0)
        _no_data(fig, title)
        return _save_png(fig, path)
    models = sorted({str(r.get("model")) for r, _ in points})
    hosts = sorted({h for _, h in points})
    styles = _styles(sorted(set(_labels(rows))))
    fig = _new_figure(8.5, 6.0 if len(models) == 1 else 1.4 + 4.0 * len(models))
    axes = fig.subplots(len(models), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    xs = [float(_get(r, "speed", "fps")) for r, _ in points]
    ys = [float(metric(r)) for r, _ in points]
    for ax, model in zip(axes, models):
        for host in hosts:
            colour, marker = styles[host]
            sel = [i for i, (r, h) in enumerate(points) if h == host and str(r.get("model")) == model]
            ax.scatter([xs[i] for i in sel], [ys[i] for i in sel], color=colour, marker=marker, s=55,
                       edgecolor="black", linewidth=0.5, label=host if ax is axes[0] else None, zorder=3)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(model, fontsize=10, loc="left")
    _set_limits(axes[0], xs, ys)
    log = axes[0].get_xscale() == "log"
    axes[-1].set_xlabel("throughput (FPS, higher is better)" + (" — log scale" if log else ""))
    fig.supylabel(f"{label_text} (higher is better)", fontsize=10)
    fig.suptitle(title)
    fig.legend(loc="outside lower center", ncols=min(2, len(hosts)), fontsize=8, title="host", title_fontsize=8)
    fig.canvas.draw()  # positions are final only after layout; labels are placed in display space
    for ax, model in zip(axes, models):
        _place_labels(fig, ax, [(x, y, _cell_name(r), styles[h][0])
                                for x, y, (r, h) in zip(xs, ys, points) if str(r.get("model")) == model])
    return _save_png(fig, path)


def _cell_name(row: dict[str, Any]) -> str:
    return f"{row.get('target')}/{row.get('precision')}"


def _plain_log_ticks(axis: Any) -> None:
    """1, 2, 5, 10, 20 … instead of bare powers of ten: readable ms/FPS on a log axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _set_limits(ax: Any, xs: list[float], ys: list[float]) -> None:
    """Log x when FPS spans more than 10×; padded limits so edge labels stay inside the axes."""
    lo, hi = min(xs), max(xs)
    if lo > 0 and hi / lo > 10:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.6, hi * 1.6)
        _plain_log_ticks(ax.xaxis)
    else:
        pad = max(hi - lo, abs(hi) * 0.1, 1e-9) * 0.35
        ax.set_xlim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
    ylo, yhi = min(ys), max(ys)
    span = max(yhi - ylo, 0.01)
    top = yhi + span * 0.4
    if yhi <= 1.0:  # IoU / F-measure cannot exceed 1: keep impossible values off the axis
        top = min(top, 1.0 + span * 0.12)
    ax.set_ylim(ylo - span * 0.4, top)


def plot_latency(rows: list[dict[str, Any]], path: Path) -> Path:
    """Horizontal bars of p50 per cell, one bar per host, whisker to p90: where time goes, per host."""
    timed = [(r, h) for r, h in _timed(rows) if _finite(_get(r, "speed", "latency_ms_p50"))]
    title = "Engine latency per call (p50, whisker to p90)"
    if not timed:
        fig = _new_figure(8.5, 4.0)
        _no_data(fig, title)
        return _save_png(fig, path)
    groups = sorted({f"{r.get('model')}/{r.get('target')}/{r.get('precision')}" for r, _ in timed})
    hosts = sorted({h for _, h in timed})
    cell: dict[tuple[str, str], dict[str, Any]] = {}
    for r, h in timed:  # a repeated cell on the same host: the latest row wins
        key = (f"{r.get('model')}/{r.get('target')}/{r.get('precision')}", h)
        if key not in cell or str(r.get("created") or "") >= str(cell[key].get("created") or ""):
            cell[key] = r
    statuses = {(f"{r.get('model')}/{r.get('target')}/{r.get('precision')}", h): str(r.get("status"))
                for r, h in zip(rows, _labels(rows))}
    styles = _styles(sorted(set(_labels(rows))))
    height = 0.8 / len(hosts)
    fig = _new_figure(8.5, max(3.5, 0.32 * len(groups) * len(hosts) + 0.45 * len(groups) + 1.8))
    ax = fig.add_subplot()
    values = []
    for j, host in enumerate(hosts):
        colour, _ = styles[host]
        ys, p50s, whiskers = [], [], []
        for i, group in enumerate(groups):
            r = cell.get((group, host))
            if r is None:  # say why the bar is missing instead of leaving a silent gap
                ax.text(0.01, i - 0.4 + height * (j + 0.5), statuses.get((group, host), "not run"),
                        transform=ax.get_yaxis_transform(), va="center", fontsize=7, color="#777",
                        style="italic")
                continue
            p50 = float(_get(r, "speed", "latency_ms_p50"))
            p90 = _num(_get(r, "speed", "latency_ms_p90"))
            ys.append(i - 0.4 + height * (j + 0.5))
            p50s.append(p50)
            whiskers.append(max(p90 - p50, 0.0) if p90 is not None and math.isfinite(p90) else 0.0)
            values += [p50, p50 + whiskers[-1]]
        ax.barh(ys, p50s, height=height * 0.9, color=colour, label=host, edgecolor="black", linewidth=0.4,
                xerr=[[0.0] * len(whiskers), whiskers], error_kw={"ecolor": "#333", "capsize": 3, "lw": 1})
        for y, p50, w in zip(ys, p50s, whiskers):
            ax.annotate(f"{p50:.1f}", (p50 + w, y), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7, color="#333")
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylim(len(groups) - 0.5, -0.5)  # first group on top
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 2, max(positive) * 2.5)
        _plain_log_ticks(ax.xaxis)
    else:
        ax.set_xlim(0, max(values) * 1.15 if values and max(values) > 0 else 1)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_xlabel("latency per engine call (ms, lower is better)"
                  + (" — log scale" if ax.get_xscale() == "log" else ""))
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=min(2, len(hosts)), fontsize=8, title="host", title_fontsize=8)
    return _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> Path:
    """Save beside the target under a temp name, then rename: a reader never sees half a PNG."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------------
# Entry point


def write_results(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """What one ``u2zoo bench`` run leaves behind: results.jsonl (the merge input) + CSV + Markdown.

    Needs no matplotlib, so a bare CI host can bench; plots are made later by ``u2zoo report``.
    The JSONL is rewritten whole (atomically): one file is one run, merging is the report's job.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": out_dir / "results.jsonl", "csv": out_dir / "results.csv",
             "markdown": out_dir / "results.md"}
    atomic_write_text(paths["jsonl"], "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write_text(paths["csv"], render_csv(rows))
    atomic_write_text(paths["markdown"], render_markdown(rows, title="u2zoo bench results"))
    return paths


def write_report(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """Write report.md/.csv/.html and the two PNGs into ``out_dir``; return their paths by kind.

    Plots are made first (the HTML embeds them), so a missing matplotlib fails before any
    file is written rather than leaving a partial report.
    """
    if not rows:
        raise ConfigError("no result rows to report")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create report folder {out_dir}: {one_line(exc)}") from None
    _matplotlib()
    paths: dict[str, Path] = {
        "accuracy_vs_fps": plot_accuracy_vs_fps(rows, out_dir / "accuracy_vs_fps.png"),
        "latency": plot_latency(rows, out_dir / "latency.png"),
    }
    plots = dict(paths)
    paths["markdown"] = out_dir / "report.md"
    atomic_write_text(paths["markdown"], render_markdown(rows, plots))
    paths["csv"] = out_dir / "report.csv"
    atomic_write_text(paths["csv"], render_csv(rows))
    label_text, _ = accuracy_metric(rows)
    images = {f"Accuracy vs speed ({label_text})": plots["accuracy_vs_fps"].read_bytes(),
              "Latency per host": plots["latency"].read_bytes()}
    paths["html"] = out_dir / "report.html"
    atomic_write_text(paths["html"], render_html(rows, images))
    return paths
