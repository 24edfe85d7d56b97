"""``u2zoo portrait``: its flags, and the report of ``u2zoo.tasks.drawing``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from u2zoo.errors import ConfigError
from u2zoo.tasks.drawing import Blend, check_portrait_contract, draw_files
from u2zoo.zoo.images import shown


def add_portrait_arguments(p: argparse.ArgumentParser) -> None:
    from u2zoo.cli.task_args import add_model_arguments, add_upscale_arguments

    p.add_argument("inputs", nargs="+", help="photos or folders of photos")
    add_model_arguments(p, batch=False)
    p.add_argument(
        "--align",
        action="store_true",
        help="level the eyes first (dlib 68-point landmarks; u2zoo[landmarks] and --landmarks-model)",
    )
    p.add_argument("--landmarks-model", help="dlib's shape_predictor_68_face_landmarks.dat (for --align)")
    p.add_argument("--save-crop", action="store_true", help="also write the 512×512 face crop the network saw")
    p.add_argument(
        "--blend",
        action="store_true",
        help="also write the official composite: the crop blurred, mixed with the drawing (stem_composite.png)",
    )
    p.add_argument("--blend-sigma", type=float, default=Blend.sigma, help=f"blur in px (default {Blend.sigma:g})")
    p.add_argument(
        "--blend-alpha", type=float, default=Blend.alpha, help=f"weight of the blurred photo (default {Blend.alpha:g})"
    )
    p.add_argument("--out", required=True, help="output folder")
    add_upscale_arguments(p)


def cmd_portrait(args: argparse.Namespace) -> int:
    from u2zoo.cli.task_args import open_segmenter, open_upscaler
    from u2zoo.files import ensure_writable_dir
    from u2zoo.tasks.upscale import record_upscale

    blend = Blend(args.blend_sigma, args.blend_alpha) if args.blend else None
    if args.landmarks_model and not args.align:
        raise ConfigError("--landmarks-model is for --align; add --align or drop it")
    aligner = None
    if args.align:
        from u2zoo.tasks.portrait import LandmarkAligner

        if not args.landmarks_model:
            raise ConfigError("--align needs --landmarks-model PATH (dlib's shape_predictor_68_face_landmarks.dat)")
        aligner = LandmarkAligner(args.landmarks_model)
    if not args.artifact and not args.model:
        args.model = "u2net_portrait"  # the verb's own default model, printed below
    upscaler = open_upscaler(args)
    out = ensure_writable_dir(Path(args.out))
    with open_segmenter(args) as segmenter:
        what = args.artifact or args.model
        check_portrait_contract(segmenter, what)
        report = draw_files(
            segmenter,
            args.inputs,
            out,
            aligner,
            args.save_crop,
            args.max_pixels,
            progress=not args.quiet,
            blend=blend,
            upscaler=upscaler,
        )
    if upscaler is not None and report.drawn:
        print(f"upscaled {report.drawn} photo(s) ×{upscaler.scale}; recorded in {shown(record_upscale(out, upscaler))}")
    for path, reason in report.failed:
        print(f"u2zoo: skipped {shown(path)}: {reason}", file=sys.stderr)
    for path, note in report.notes:
        print(f"u2zoo: note: {shown(path)}: {note}", file=sys.stderr)
    for path in report.no_face:
        print(f"u2zoo: note: no face found in {shown(path)}: drew the whole photo, resized to 512×512", file=sys.stderr)
    for path, degrees in report.aligned.items():
        print(f"aligned {shown(path.name)}: rotated {degrees:+.1f}° to level the eyes")
    print(
        f"drew {report.drawn} portrait(s) with {what} into {shown(out)} ({report.drawn - len(report.no_face)} face "
        f"crop(s), {len(report.no_face)} whole photo(s)) in {report.seconds:.1f} s; "
        f"{len(report.failed)} input(s) failed"
    )
    return 1 if report.failed else 0
