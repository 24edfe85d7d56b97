"""``u2zoo video``: its flags, and the report of a run of ``u2zoo.tasks.video``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from u2zoo.tasks.video import Smoother, VideoError, VideoResult, import_av, plan_outputs, process_videos
from u2zoo.zoo.images import shown


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `u2zoo video`."""
    from u2zoo.cli.task_args import add_model_arguments, add_output_arguments

    p.add_argument("inputs", nargs="+", help="video files (audio is not copied)")
    add_model_arguments(p)
    add_output_arguments(p)
    p.add_argument("--out", required=True, help="output file (one input, a .mp4/.mov/.mkv/.webm name) or folder")
    p.add_argument(
        "--format",
        help="container for outputs in a folder: mp4, mov, mkv or webm "
        "(default: mp4 for masks and composites, mov for cut-outs)",
    )
    p.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="temporal smoothing A in [0, 1): map_t = A·map_t-1 + (1-A)·raw_t (default 0 = off)",
    )
    p.add_argument("--resume", action="store_true", help="skip inputs whose outputs all exist")


def cmd_video(args: argparse.Namespace) -> int:
    """Mask, cut-out or composite videos of video files, through any model or artifact."""
    from u2zoo.cli.task_args import open_segmenter, output_options
    from u2zoo.files import ensure_writable_dir

    import_av()
    Smoother(args.smooth)  # validate before the model loads
    inputs = [Path(item) for item in args.inputs]
    for source in inputs:
        if not source.exists():
            raise VideoError(f"input not found: {shown(source)}")
        if not source.is_file():
            raise VideoError(f"{shown(source)} is not a file (give video files)")
    options = output_options(args)
    plans = plan_outputs(inputs, Path(args.out), options.kinds, args.format.lower() if args.format else None)
    for folder in {target.parent for _, targets in plans for target in targets.values()}:
        ensure_writable_dir(folder)

    def show(result: VideoResult) -> None:
        print(
            f"{shown(result.source)}: {result.frames} frame(s) in {result.seconds:.2f} s = "
            f"{result.frames_per_s:.2f} frames/s end to end → {', '.join(map(shown, result.outputs))}"
        )
        for note in result.notes:
            print(f"u2zoo: note: {shown(result.source)}: {note}", file=sys.stderr)

    with open_segmenter(args, args.batch) as segmenter:
        report = process_videos(
            segmenter, plans, options, args.smooth, args.resume, args.max_pixels, progress=not args.quiet, on_done=show
        )
    for source, reason in report.failed:
        print(f"u2zoo: skipped {shown(source)}: {reason}", file=sys.stderr)
    frames = sum(r.frames for r in report.done)
    seconds = sum(r.seconds for r in report.done)
    speed = f" = {frames / seconds:.2f} frames/s" if seconds > 0 else ""
    resumed = f", {len(report.resumed)} already done (--resume)" if args.resume else ""
    print(
        f"wrote {len(report.written)} video(s); {frames} frame(s) in {seconds:.2f} s{speed} at batch "
        f"{segmenter.batch_size}; {len(report.failed)} input(s) failed{resumed}"
    )
    return 1 if report.failed else 0
