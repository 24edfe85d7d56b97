"""Load test of `u2zoo serve`.

A running server: N requests one after another, then rounds of M in flight at once; errors,
latency median/p90/p99 of each phase and the server's RSS before and after.

    python -m u2zoo.benchmarks.serve_load --url http://127.0.0.1:8000 --image photo.png \\
        [--sequential 200 --concurrent 20 --rounds 1 --warmup 2]

Designs compared in one run (``u2zoo.benchmarks.serve_compare``): each server started in turn
with its flags, C clients each sending requests back to back, at every C of ``--clients``.

    python -m u2zoo.benchmarks.serve_load --artifact u2netp.onnx --image photo.jpg \\
        --design "old=--max-batch 1 --workers 1" --design "new=--max-batch 8 --workers 2" \\
        --clients 1,8,32 --requests 64

Exits non-zero when any request fails, so it can gate a deployment. Latency is measured at
the client (connect, upload, inference, download); the RSS comes from the server's /health.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.benchmarks.http_client import TIMEOUT_S, health, post


def _phase(results: list[tuple[float, str | None]], wall_s: float) -> dict[str, Any]:
    """Latency percentiles of a phase's requests, and its throughput: answered requests per
    second of the phase's wall time (what a client population gets, queueing included)."""
    seconds = np.array([s for s, _ in results]) * 1000.0
    errors = [e for _, e in results if e is not None]
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "median_ms": float(np.median(seconds)) if len(seconds) else float("nan"),
        "p90_ms": float(np.percentile(seconds, 90)) if len(seconds) else float("nan"),
        "p99_ms": float(np.percentile(seconds, 99)) if len(seconds) else float("nan"),
        "wall_s": wall_s,
        "requests_per_s": (len(results) - len(errors)) / wall_s if wall_s > 0 else float("nan"),
    }


def _in_flight(
    url: str, body: bytes, concurrent: int, rounds: int, content_type: str, timeout: float
) -> list[tuple[float, str | None]]:
    """``rounds`` rounds of ``concurrent`` simultaneous requests, each round waited for."""
    results: list[tuple[float, str | None]] = []
    if concurrent > 0 and rounds > 0:
        with ThreadPoolExecutor(max_workers=concurrent) as pool:
            for _ in range(rounds):
                results.extend(pool.map(lambda _: post(url, body, content_type, timeout), range(concurrent)))
    return results


def load_test(
    url: str,
    body: bytes,
    sequential: int = 200,
    concurrent: int = 20,
    content_type: str = "image/png",
    *,
    rounds: int = 1,
    warmup: int = 2,
    timeout: float = TIMEOUT_S,
) -> dict[str, Any]:
    """``sequential`` requests one at a time, then ``rounds`` rounds of ``concurrent``
    simultaneous requests (each round waits for all of its requests).

    ``warmup`` rounds of ``concurrent`` requests go first, unmeasured, so that the runtime's
    and the request threads' first allocations are not taken for growth: a fresh server's RSS
    rises over its first two rounds or so (by 80-110 MB for the tiny test network in ONNX
    Runtime), then stays flat. Returns ``{"sequential": phase, "concurrent": phase,
    "errors": total, "warmup_errors", "rss_before_mb", "rss_after_mb", …}``, where a phase is
    ``{"requests", "errors", "error_samples", "median_ms", "p90_ms", "p99_ms", "wall_s",
    "requests_per_s"}``. Any non-200 answer or
    failed connection is an error.
    """
    warm = _in_flight(url, body, max(concurrent, 1), warmup, content_type, timeout)
    before = health(url, timeout)
    started = time.perf_counter()
    seq = [post(url, body, content_type, timeout) for _ in range(sequential)]
    seq_wall = time.perf_counter() - started
    started = time.perf_counter()
    par = _in_flight(url, body, concurrent, rounds, content_type, timeout)
    par_wall = time.perf_counter() - started
    after = health(url, timeout)
    result = {
        "url": url,
        "body_bytes": len(body),
        "sequential": _phase(seq, seq_wall),
        "concurrent": {**_phase(par, par_wall), "in_flight": concurrent, "rounds": rounds},
        "warmup_errors": sum(error is not None for _, error in warm),
        "rss_before_mb": before.get("rss_mb"),
        "rss_after_mb": after.get("rss_mb"),
    }
    result["errors"] = result["sequential"]["errors"] + result["concurrent"]["errors"] + result["warmup_errors"]
    return result


def format_table(result: dict[str, Any]) -> str:
    """A short plain-text table of a ``load_test`` result."""
    lines = [
        f"{result['url']}: {result['body_bytes']:,}-byte body"
        + (f", {result['warmup_errors']} error(s) in the warm-up" if result["warmup_errors"] else ""),
        f"{'phase':<22} {'requests':>8} {'errors':>6} {'median ms':>9} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>7}",
    ]
    conc = result["concurrent"]
    for name, phase in (
        ("sequential", result["sequential"]),
        (f"concurrent {conc['in_flight']}×{conc['rounds']}", conc),
    ):
        lines.append(
            f"{name:<22} {phase['requests']:>8} {phase['errors']:>6} {phase['median_ms']:>9.1f} "
            f"{phase['p90_ms']:>8.1f} {phase['p99_ms']:>8.1f} {phase['requests_per_s']:>7.2f}"
        )
    for phase in (result["sequential"], conc):
        lines.extend(f"  error: {sample}" for sample in phase["error_samples"])
    before, after = result["rss_before_mb"], result["rss_after_mb"]
    if before is not None and after is not None:
        lines.append(f"server RSS: {before:.1f} MB before, {after:.1f} MB after ({after - before:+.1f} MB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m u2zoo.benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--design",
        action="append",
        default=[],
        help="compare designs instead: NAME=FLAGS (u2zoo serve flags; started here, one at a time) or "
        "NAME=URL (a server already running); repeat; the first is the baseline of the ratios",
    )
    p.add_argument("--artifact", help="with --design: the artifact every started server serves")
    p.add_argument("--clients", default="1,8,32", help="with --design: client counts (default 1,8,32)")
    p.add_argument("--requests", type=int, default=64, help="with --design: requests per client count (default 64)")
    p.add_argument("--json-out", help="with --design: also write the rows as JSON here")
    p.add_argument("--image", required=True, help="the image to POST")
    p.add_argument("--sequential", type=int, default=200, help="requests one after another (default 200)")
    p.add_argument("--concurrent", type=int, default=20, help="requests in flight at once (default 20)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of --concurrent requests (default 1)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="unmeasured rounds of --concurrent requests before the RSS 'before' reading (default 2)",
    )
    args = p.parse_args(argv)
    if min(args.sequential, args.concurrent, args.rounds, args.warmup) < 0:
        p.error("--sequential, --concurrent, --rounds and --warmup cannot be negative")
    if bool(args.url) == bool(args.design):
        p.error("give --url (one running server) or --design (designs compared), not both or neither")
    try:
        body = Path(args.image).read_bytes()
    except OSError as exc:
        print(f"serve_load: error: cannot read {args.image}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    content_type = mimetypes.guess_type(args.image)[0] or "application/octet-stream"
    if args.design:
        return compare_main(p, args, body, content_type)
    try:
        result = load_test(
            args.url, body, args.sequential, args.concurrent, content_type, rounds=args.rounds, warmup=args.warmup
        )
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"serve_load: error: cannot reach {args.url}/health: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 1 if result["errors"] else 0


def compare_main(p: argparse.ArgumentParser, args: argparse.Namespace, body: bytes, content_type: str) -> int:
    """``--design``: each design's server in turn, every client count; the table and JSON."""
    from u2zoo.benchmarks.serve_compare import Design, format_comparison, machine, run_design

    try:
        designs = [Design.parse(text) for text in args.design]
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError as exc:
        p.error(str(exc))
    if min(clients) < 1 or args.requests < 1:
        p.error("--clients and --requests must be at least 1")
    if any(d.url is None for d in designs) and not args.artifact:
        p.error("--design NAME=FLAGS starts servers: give --artifact")
    rows: list[dict[str, Any]] = []
    for design in designs:
        print(f"design {design.name}: {' '.join(design.flags) or design.url}", file=sys.stderr, flush=True)
        rows.extend(run_design(design, args.artifact, body, clients, args.requests, content_type, args.warmup * 8))
    print(f"{machine()}; {len(body):,}-byte {content_type} body; {args.requests} requests per level")
    print(format_comparison(rows, designs[0].name))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
