"""Verbs that run a model or artifact on inputs: ``predict``, ``time``, ``portrait``, ``video``, ``serve``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from u2zoo.cli.common import AddVerb
from u2zoo.cli.portrait import add_portrait_arguments, cmd_portrait
from u2zoo.cli.serve import add_serve_arguments, cmd_serve
from u2zoo.cli.task_args import (
    add_contract_arg,
    add_model_arguments,
    add_output_arguments,
    add_weights_args,
    open_predictor,
)
from u2zoo.cli.video import add_video_arguments, cmd_video
from u2zoo.errors import ConfigError


def cmd_predict(args: argparse.Namespace) -> int:
    """Masks, cut-outs and composites of files and folders, through any model or artifact."""
    from u2zoo.cli.task_args import open_segmenter, output_options
    from u2zoo.files import ensure_writable_dir
    from u2zoo.tasks.folder import process_files
    from u2zoo.zoo.images import shown

    out = ensure_writable_dir(Path(args.out))
    options = output_options(args)
    with open_segmenter(args, args.batch) as segmenter:
        report = process_files(
            segmenter,
            args.inputs,
            out,
            options,
            resume=args.resume,
            max_pixels=args.max_pixels,
            progress=not args.quiet,
        )
    for path, reason in report.failed:
        print(f"u2zoo: skipped {shown(path)}: {reason}", file=sys.stderr)
    for path, note in report.notes:
        print(f"u2zoo: note: {shown(path)}: {note}", file=sys.stderr)
    if report.not_images:
        names = ", ".join(shown(p.name) for p in report.not_images[:5])
        names += ", …" if len(report.not_images) > 5 else ""
        print(f"u2zoo: skipped {len(report.not_images)} non-image file(s) in the folders: {names}", file=sys.stderr)
    resumed = f", {len(report.resumed)} already done (--resume)" if args.resume else ""
    print(
        f"wrote {len(report.written)} file(s) to {shown(out)}; {report.processed} image(s) in {report.seconds:.2f} s "
        f"= {report.images_per_s:.2f} images/s end to end at batch {segmenter.batch_size} (engine calls "
        f"{segmenter.engine_seconds:.2f} s); {len(report.failed)} input(s) failed{resumed}"
    )
    return 1 if report.failed else 0


def cmd_time(args: argparse.Namespace) -> int:
    """Engine-call latency of a model (torch) or an artifact on a real sample photo."""
    import numpy as np

    from u2zoo.runtime.pipeline import network_size, preprocess_files
    from u2zoo.runtime.timing import measure_latency
    from u2zoo.zoo.reference import sample_images

    if args.runs < 1:
        raise ConfigError("--runs must be at least 1")
    context, contract = open_predictor(args)
    with context as predictor:
        size = network_size(predictor, contract)
        batch = np.repeat(preprocess_files(sample_images()[:1], contract, size), args.batch, axis=0)
        result = measure_latency(predictor, batch, args.runs, args.warmup, args.threads)
    what = args.artifact or f"{args.model} (torch eager)"
    print(
        f"{what}: batch {result.batch} at {size[0]}×{size[1]}, threads {args.threads or 'default'}: "
        f"p50 {result.p50_ms:.2f} ms, p90 {result.p90_ms:.2f} ms, mean {result.mean_ms:.2f} ms, "
        f"{result.fps:.1f} img/s ({result.runs} runs after {result.warmup} warm-up)"
    )
    return 0


def add_predict(add: AddVerb) -> None:
    p = add("predict", cmd_predict, "masks, RGBA cut-outs and composites of image files and folders (recursive)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    add_model_arguments(p)
    add_output_arguments(p)
    p.add_argument("--resume", action="store_true", help="skip inputs whose outputs all exist (an interrupted run)")
    p.add_argument("--out", required=True, help="output folder")


def add_time(add: AddVerb) -> None:
    p = add("time", cmd_time, "median engine-call latency of a model or artifact (warm-up, then N runs)")
    p.add_argument("--model", help="architecture or weights name (torch reference)")
    p.add_argument("--artifact", help="a converted artifact")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's)")
    p.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    p.add_argument("--batch", type=int, default=1, help="batch size (dynamic artifacts)")


def add_portrait(add: AddVerb) -> None:
    p = add("portrait", cmd_portrait, "portrait line drawings: largest face cropped to 512×512, dark lines on white")
    add_portrait_arguments(p)


def add_video(add: AddVerb) -> None:
    p = add("video", cmd_video, "a video file in → mask, cut-out or composite video out (u2zoo[video])")
    add_video_arguments(p)


def add_serve(add: AddVerb) -> None:
    p = add("serve", cmd_serve, "HTTP service: POST an image, get a mask or cut-out; one session for all requests")
    add_serve_arguments(p)
