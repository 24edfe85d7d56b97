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
from pathlib import Path
from typing import Any

from u2zoo.artifact import atomic_write_text
from u2zoo.benchmarks.report_plots import _matplotlib, accuracy_metric, plot_accuracy_vs_fps, plot_latency
from u2zoo.benchmarks.results import (
    HEADERS,
    NUMERIC,
    comparison_rows,
    format_value,
    host_summary,
    hosts_of,
    run_ids,
    table_columns,
)
from u2zoo.errors import ConfigError, one_line

# ---------------------------------------------------------------------------------------------
# Text outputs


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def render_markdown(
    rows: list[dict[str, Any]], plots: dict[str, Path] | None = None, title: str = "u2zoo benchmark report"
) -> str:
    """The comparison table plus one line per host (hardware and tool versions)."""
    flat = comparison_rows(rows)
    columns = table_columns(flat)
    hosts = hosts_of(rows)
    lines = [
        f"# {title}",
        "",
        f"{len(flat)} cells from {len(hosts)} host(s); runs: {', '.join(run_ids(rows)) or '-'}.",
        "",
        "| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
        "|" + "|".join("---:" if c in NUMERIC else "---" for c in columns) + "|",
    ]
    for r in flat:
        lines.append("| " + " | ".join(_md_cell(format_value(c, r[c])) for c in columns) + " |")
    lines += ["", "## Hosts", ""]
    lines += [f"- **{_md_cell(label)}**: {_md_cell(host_summary(info))}" for label, info in hosts.items()]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{kind}]({path.name})" for kind, path in plots.items()]
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]]) -> str:
    """Same columns as the table, raw numbers, empty for null: for spreadsheets and scripts."""
    flat = comparison_rows(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table_columns(flat), extrasaction="ignore", lineterminator="\n")
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
    columns = table_columns(flat)
    hosts = hosts_of(rows)
    head = "".join(f"<th>{esc(HEADERS.get(c, c))}</th>" for c in columns)
    body = []
    for r in flat:
        cells = "".join(
            f'<td class="{"num" if c in NUMERIC else c}">{esc(format_value(c, r[c]))}</td>' for c in columns
        )
        body.append(f'<tr class="{esc(str(r["status"]))}">{cells}</tr>')
    host_items = "".join(f"<li><b>{esc(label)}</b>: {esc(host_summary(info))}</li>" for label, info in hosts.items())
    plots = "".join(
        f'<h2>{esc(title)}</h2><img alt="{esc(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode("ascii")}">'
        for title, data in images.items()
    )
    runs = ", ".join(run_ids(rows)) or "-"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>u2zoo benchmark report</title><style>{_CSS}</style></head><body>\n"
        f"<h1>u2zoo benchmark report</h1>\n"
        f'<p class="meta">Merged {len(flat)} cells from {len(hosts)} host(s): '
        f"{esc('; '.join(hosts))}.<br>Runs: {esc(runs)}.</p>\n"
        f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>\n"
        f"<h2>Hosts</h2><ul>{host_items}</ul>\n{plots}\n</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def write_results(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """What one ``u2zoo bench`` run leaves behind: results.jsonl (the merge input) + CSV + Markdown.

    Needs no matplotlib, so a bare CI host can bench; plots are made later by ``u2zoo report``.
    The JSONL is rewritten whole (atomically): one file is one run, merging is the report's job.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": out_dir / "results.jsonl", "csv": out_dir / "results.csv", "markdown": out_dir / "results.md"}
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
    images = {
        f"Accuracy vs speed ({label_text})": plots["accuracy_vs_fps"].read_bytes(),
        "Latency per host": plots["latency"].read_bytes(),
    }
    paths["html"] = out_dir / "report.html"
    atomic_write_text(paths["html"], render_html(rows, images))
    return paths
