"""Verbs that measure artifacts: ``bench`` (the parity-and-speed matrix), ``report``, ``sensitivity``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from u2zoo.cli.common import AddVerb, add_auto_fp_args, csv_list
from u2zoo.cli.task_args import add_contract_arg, add_weights_args
from u2zoo.errors import ConfigError
from u2zoo.runtime.precisions import PRECISIONS


def bench_config(args: argparse.Namespace, out: Path):
    """The matrix run the flags describe (``bench``, and ``publish --model``), validated."""
    from u2zoo.benchmarks.matrix import BenchConfig
    from u2zoo.runtime.gates import load_gates

    gates = load_gates(None if args.gate in (None, "default") else args.gate)
    if args.batches is None:  # GPUs are judged at the batches servers use
        args.batches = "1,8,16" if args.device == "cuda" else "1,4,8,16"
    try:
        batches = tuple(int(b) for b in csv_list(args.batches))
    except ValueError:
        raise ConfigError(f"--batches must be comma-separated integers, not {args.batches!r}") from None
    if args.data is None:
        raise ConfigError("--data is required: the images every cell is run and compared on")
    cfg = BenchConfig(
        models=csv_list(args.model),
        targets=csv_list(args.targets),
        precisions=csv_list(args.precisions),
        data=Path(args.data),
        gt=Path(args.gt) if args.gt else None,
        out=out,
        gates=gates,
        weights=args.weights,
        weights_sha256=args.weights_sha256,
        random_weights=args.random_weights,
        contract_variant=args.contract,
        runs=args.runs,
        warmup=args.warmup,
        batches=batches,
        boundary_band=args.boundary_band,
        device=args.device,
        calib=Path(args.calib) if args.calib else None,
        calib_size=args.calib_size,
        keep_fp=args.keep_fp,
        keep_fp_groups=tuple(csv_list(args.keep_fp_groups)) if args.keep_fp_groups else (),
        auto_fp=args.auto_fp,
        fp_budget=args.fp_budget,
        **({"threads": args.threads} if args.threads else {}),
    )
    cfg.validate()
    return cfg


def run_bench(args: argparse.Namespace, out: Path) -> list:
    """Run the matrix into ``out``, print its table and notes; returns the rows."""
    from u2zoo.benchmarks.matrix import run_matrix
    from u2zoo.benchmarks.report import write_results
    from u2zoo.benchmarks.results import MatrixRow
    from u2zoo.files import ensure_writable_dir

    cfg = bench_config(args, out)
    ensure_writable_dir(cfg.out)

    def progress(row: MatrixRow) -> None:
        if not args.quiet:
            print(
                f"  {row.model}/{row.target}/{row.precision}: {row.status}"
                + (f" ({row.reason})" if row.reason else ""),
                file=sys.stderr,
            )

    rows = run_matrix(cfg, on_row=progress)
    paths = write_results([row.to_dict() for row in rows], cfg.out)
    print(paths["markdown"].read_text(encoding="utf-8"))
    for note in sorted({n for row in rows for n in row.notes}):
        print(f"note: {note}")
    print(f"results: {', '.join(str(p) for p in paths.values())}")
    return rows


def cmd_bench(args: argparse.Namespace) -> int:
    """The parity-and-speed matrix; with --gate, failing cells make the exit code non-zero."""
    from u2zoo.benchmarks.ci_output import append_summary, summary_path, write_junit

    rows = run_bench(args, Path(args.out))
    dicts = [row.to_dict() for row in rows]
    if args.junit:
        print(f"junit: {write_junit(dicts, Path(args.junit))}")
    summary = summary_path(args.summary)
    if summary is not None:
        print(f"summary: {append_summary(dicts, summary, gated=args.gate is not None)}")
    failing = [r for r in rows if r.failed]
    unavailable = [r for r in rows if r.status == "unavailable"]
    if unavailable:
        print(f"{len(unavailable)} cell(s) unavailable on this host (see the reason column)")
    if args.gate is None:
        return 0
    for r in failing:
        print(f"gate failed: {r.model}/{r.target}/{r.precision}: {r.status}: {r.reason}", file=sys.stderr)
    if args.fail_on_unavailable:
        for r in unavailable:
            print(f"gate failed: {r.model}/{r.target}/{r.precision}: unavailable: {r.reason}", file=sys.stderr)
        failing += unavailable
    return 1 if failing else 0


def cmd_report(args: argparse.Namespace) -> int:
    from u2zoo.benchmarks.report import write_report
    from u2zoo.benchmarks.results import load_results
    from u2zoo.files import ensure_writable_dir

    rows = load_results([Path(p) for p in args.results])
    paths = write_report(rows, ensure_writable_dir(Path(args.out)))
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Rank layer groups by the output error their INT8 quantization alone causes."""
    import tempfile

    from u2zoo.conversion import convert_model
    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.quantization.onnx_int8 import sensitivity

    if args.eval_images < 1:
        raise ConfigError("--eval-images must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = convert_model(
            args.model,
            "onnx",
            tmp,
            weights=args.weights,
            weights_sha256=args.weights_sha256,
            random_weights=args.random_weights,
            contract_variant=args.contract,
            progress=False,
        )
        calib = calibration_set(args.calib, artifact.contract, args.calib_size)
        ranking = sensitivity(
            artifact.path,
            calib,
            artifact.inputs[0].name,
            calib.inputs[: args.eval_images],
            args.calib_method or "minmax",
            args.threads,
        )
    print(
        f"INT8 sensitivity of {args.model} (one group quantized at a time, ONNX Runtime S8S8 QDQ, "
        f"{len(calib.inputs)} calibration / {min(args.eval_images, len(calib.inputs))} evaluation images)"
    )
    print(f"{'rank':>4}  {'group':<10} {'nodes':>5}  {'mean abs':>10}  {'max abs':>8}")
    for rank, row in enumerate(ranking, start=1):
        print(f"{rank:>4}  {row.group:<10} {row.nodes:>5}  {row.mean_abs:>10.3g}  {row.max_abs:>8.3g}")
    print("keep the top groups in float with: u2zoo convert … --int8 --keep-fp N (or --keep-fp-groups a,b)")
    return 0


def add_matrix_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags of a matrix run, shared by ``bench`` and ``publish --model``."""
    p.add_argument(
        "--model",
        required=required,
        help="comma-separated models, e.g. u2netp,u2net-lite; NAME@PATH adds "
        "another checkpoint of NAME to the same run, e.g. u2netp,u2netp@u2netp_pruned30.pth",
    )
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--targets", default="onnx", help="comma-separated targets (default: onnx)")
    p.add_argument("--precisions", default="fp32", help=f"comma-separated, of: {','.join(PRECISIONS)} (default: fp32)")
    p.add_argument("--data", required=required, help="folder of images (any sizes and modes)")
    p.add_argument("--gt", help="folder of ground-truth masks paired by file stem (adds accuracy columns)")
    p.add_argument("--gate", help="gate YAML ('default' = the shipped gates); failing cells → exit 1")
    p.add_argument("--fail-on-unavailable", action="store_true", help="with --gate: unavailable cells fail too")
    p.add_argument("--threads", type=int, help="threads for every runtime (default: all cores)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per cell (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs (default 3)")
    p.add_argument(
        "--batches",
        help="batch sizes for throughput (dynamic artifacts; default 1,4,8,16 on CPU, 1,8,16 with --device cuda)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: where torch, torch-compile and aoti cells run (tensorrt always runs on cuda)",
    )
    p.add_argument("--boundary-band", type=int, default=5, help="band width in px for the boundary error")
    p.add_argument("--calib", help="int8 calibration images (default: the readable images of --data)")
    p.add_argument(
        "--calib-size",
        type=int,
        help="int8: N calibration images (default 256; a larger folder is sampled with a fixed seed)",
    )
    p.add_argument("--keep-fp", type=int, default=0, help="int8: keep the N most sensitive layer groups in float")
    p.add_argument("--keep-fp-groups", help="int8: comma-separated layer groups to keep in float")
    add_auto_fp_args(p)


def add_bench(add: AddVerb) -> None:
    p = add("bench", cmd_bench, "parity-and-speed matrix: models × targets × precisions on your images")
    add_matrix_args(p)
    p.add_argument("--out", required=True, help="output folder (artifacts, results.jsonl/csv/md)")
    p.add_argument("--junit", metavar="FILE", help="also write one JUnit XML test case per cell (CI test reports)")
    p.add_argument(
        "--summary",
        metavar="FILE",
        help="append the Markdown table and verdict to FILE (default: $GITHUB_STEP_SUMMARY when set)",
    )


def add_report(add: AddVerb) -> None:
    p = add("report", cmd_report, "merge results.jsonl files from several machines into tables, plots and HTML")
    p.add_argument("results", nargs="+", help="results.jsonl files")
    p.add_argument("--out", required=True, help="output folder")


def add_sensitivity(add: AddVerb) -> None:
    p = add("sensitivity", cmd_sensitivity, "rank layer groups by their INT8 quantization error")
    p.add_argument("--model", required=True, help="architecture or weights name")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--calib", required=True, help="folder of calibration images")
    p.add_argument(
        "--calib-size",
        type=int,
        help="N calibration images (default 256; a larger folder is sampled with a fixed seed)",
    )
    p.add_argument("--calib-method", help="minmax (default), entropy or percentile")
    p.add_argument("--eval-images", type=int, default=8, help="images the error is measured on (default 8)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads")
