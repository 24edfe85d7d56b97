"""Gate results in the forms CI systems show: JUnit XML (GitHub, GitLab and Jenkins list its test
cases) and a Markdown summary (GitHub renders ``$GITHUB_STEP_SUMMARY`` on the job page).

One test case per matrix cell: a cell that failed (conversion, run or gate) is a ``failure``
whose message is the value that failed; an ``unavailable`` cell is ``skipped`` with its reason.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from u2zoo.artifact import atomic_write_text
from u2zoo.benchmarks.report import render_markdown

SUITE_NAME = "u2zoo bench"


def _case_name(row: dict[str, Any]) -> str:
    return f"{row['model']}/{row['target']}/{row['precision']}"


def _seconds(row: dict[str, Any]) -> float:
    speed = row.get("speed") or {}
    return round(float(speed.get("load_s") or 0.0), 3)


def junit_xml(rows: list[dict[str, Any]], suite: str = SUITE_NAME) -> str:
    """The JUnit XML document of a bench run: one ``testcase`` per cell."""
    failures = sum(r["status"] in ("convert_failed", "run_failed", "parity_failed") for r in rows)
    skipped = sum(r["status"] == "unavailable" for r in rows)
    root = ET.Element("testsuites", name=suite, tests=str(len(rows)), failures=str(failures), skipped=str(skipped))
    run_ids = sorted({str(r.get("run_id")) for r in rows})
    host = (rows[0].get("host") or {}) if rows else {}
    testsuite = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(rows)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        hostname=str(host.get("hostname") or ""),
        timestamp=str(rows[0].get("created") or "") if rows else "",
    )
    properties = ET.SubElement(testsuite, "properties")
    ET.SubElement(properties, "property", name="run_id", value=",".join(run_ids))
    ET.SubElement(properties, "property", name="cpu", value=str(host.get("cpu") or ""))
    for row in rows:
        case = ET.SubElement(
            testsuite,
            "testcase",
            classname=f"u2zoo.bench.{row['model']}",
            name=_case_name(row),
            time=str(_seconds(row)),
        )
        status, reason = row["status"], row.get("reason") or ""
        if status == "unavailable":
            ET.SubElement(case, "skipped", message=f"unavailable: {reason}")
        elif status != "ok":
            failure = ET.SubElement(case, "failure", message=f"{status}: {reason}", type=status)
            failure.text = _failure_detail(row)
        parity = row.get("parity") or {}
        if parity:
            out = ET.SubElement(case, "system-out")
            out.text = ", ".join(f"{k}={parity[k]:.4g}" for k in ("max_abs", "mean_abs", "iou50") if k in parity)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _failure_detail(row: dict[str, Any]) -> str:
    gate = row.get("gate") or {}
    lines = [f"{row['status']}: {row.get('reason') or ''}"]
    lines += [f"gate: {failure}" for failure in gate.get("failures", [])]
    if gate.get("source"):
        lines.append(f"gates from {gate['source']}")
    return "\n".join(lines)


def write_junit(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, junit_xml(rows))
    return path


def summary_markdown(rows: list[dict[str, Any]], gated: bool) -> str:
    """The job-page summary: a verdict line, then the bench's own Markdown table."""
    failed = [r for r in rows if r["status"] in ("convert_failed", "run_failed", "parity_failed")]
    unavailable = [r for r in rows if r["status"] == "unavailable"]
    ok = len(rows) - len(failed) - len(unavailable)
    verdict = "❌ gate failed" if gated and failed else ("✅ gate passed" if gated else "ℹ️ not gated")
    lines = [f"### u2zoo bench: {verdict}", "", f"{ok} ok, {len(failed)} failed, {len(unavailable)} unavailable", ""]
    lines += [f"- **{_case_name(r)}**: {r['status']}: {r.get('reason')}" for r in failed]
    lines += ["", render_markdown(rows, title="u2zoo bench results")]
    return "\n".join(lines) + "\n"


def summary_path(given: str | None) -> Path | None:
    """``--summary FILE``, else ``$GITHUB_STEP_SUMMARY`` when GitHub Actions sets it, else none."""
    if given:
        return Path(given)
    env = os.environ.get("GITHUB_STEP_SUMMARY")
    return Path(env) if env else None


def append_summary(rows: list[dict[str, Any]], path: Path, gated: bool) -> Path:
    """Append (GitHub's summary file collects every step's Markdown)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(summary_markdown(rows, gated))
    return path
