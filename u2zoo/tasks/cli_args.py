"""Command-line options every task verb shares (predict, video, serve, portrait): which model
or artifact, which outputs, which refinement, how big a batch and how big an image."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Iterator

from u2zoo.errors import ConfigError
from u2zoo.tasks.engine import Segmenter, auto_batch_size
from u2zoo.tasks.outputs import KINDS, OutputOptions, parse_colour
from u2zoo.tasks.refine import CrfOptions, MattingOptions
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS, load_rgb


def add_model_arguments(p: argparse.ArgumentParser, batch: bool = True) -> None:
    from u2zoo.cli import _add_weights_args, add_contract_arg

    p.add_argument("--model", help="architecture or weights name (torch reference); default: the best "
                                   "shipped saliency model (printed)")
    p.add_argument("--artifact", help="a converted artifact (runs in its own runtime with its own contract)")
    _add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--threads", type=int, help="intra-op threads")
    if batch:
        p.add_argument("--batch", default="1", help="images per engine call: N, or auto (from free memory); "
                                                    "N > 1 needs a dynamic-batch artifact (default 1)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images before decoding them (default {DEFAULT_MAX_PIXELS:,})")


def add_output_arguments(p: argparse.ArgumentParser, default: str = "mask") -> None:
    p.add_argument("--outputs", default=default, help=f"comma-separated: {', '.join(KINDS)} (default {default})")
    p.add_argument("--cutout", action="store_true", help="also write RGBA cut-outs (adds cutout to --outputs)")
    p.add_argument("--bg-colour", "--bg-color", dest="bg_colour",
                   help="composite background: #RRGGBB, R,G,B or a name")
    p.add_argument("--bg-image", help="composite background image (scaled to cover, centre-cropped)")
    p.add_argument("--crf", action="store_true", help="refine the map with a dense CRF on the image (u2zoo[crf])")
    p.add_argument("--crf-iterations", type=int, default=CrfOptions.iterations, help="CRF mean-field iterations")
    p.add_argument("--alpha-matting", action="store_true",
                   help="soft edges by closed-form matting on a trimap (u2zoo[matting])")
    p.add_argument("--fg-threshold", type=int, default=MattingOptions.fg_threshold,
                   help=f"matting: map value (0-255) from which a pixel is sure foreground "
                        f"(default {MattingOptions.fg_threshold})")
    p.add_argument("--bg-threshold", type=int, default=MattingOptions.bg_threshold,
                   help=f"matting: map value up to which a pixel is sure background (default {MattingOptions.bg_threshold})")
    p.add_argument("--erode", type=int, default=MattingOptions.erode,
                   help=f"matting: shrink the sure regions by N px where they meet (default {MattingOptions.erode})")


def output_options(args: argparse.Namespace) -> OutputOptions:
    """The OutputOptions the flags ask for; a matting or CRF flag alone is not an output."""
    kinds = tuple(k.strip() for k in args.outputs.split(",") if k.strip())
    if args.cutout and "cutout" not in kinds:
        kinds += ("cutout",)
    return OutputOptions(
        kinds=kinds,
        background_colour=parse_colour(args.bg_colour) if args.bg_colour else None,
        background_image=load_rgb(args.bg_image) if args.bg_image else None,
        crf=CrfOptions(iterations=args.crf_iterations) if args.crf else None,
        matting=MattingOptions(args.fg_threshold, args.bg_threshold, args.erode) if args.alpha_matting else None,
    )


def _model_arch(args: argparse.Namespace, artifact_manifest: dict | None) -> str:
    if artifact_manifest is not None:
        return artifact_manifest["model"]["arch"]
    from u2zoo.zoo.weights import resolve_model_name

    return resolve_model_name(args.model)[0]


@contextmanager
def open_segmenter(args: argparse.Namespace, batch: str | int = 1) -> Iterator[Segmenter]:
    """Load the model or artifact once; yield a Segmenter at the asked batch (``auto``
    resolved from free memory and printed)."""
    from u2zoo.cli import open_predictor

    context, contract = open_predictor(args)
    with context as predictor:
        batch_text = str(batch).strip().lower()
        if batch_text == "auto":
            manifest = getattr(getattr(predictor, "artifact", None), "manifest", None)
            device = "cuda" if getattr(predictor, "device", "cpu") == "cuda" else "cpu"
            choice = auto_batch_size(predictor, contract, _model_arch(args, manifest), device)
            print(choice.describe())
            size = choice.batch_size
        else:
            try:
                size = int(batch_text)
            except ValueError:
                raise ConfigError(f"--batch takes a number or auto, got {batch!r}") from None
        yield Segmenter(predictor, contract, size)
