"""Command-line options every task verb shares (predict, video, serve, portrait): which model
or artifact, which weights and contract, which outputs, which refinement, how big a batch and
how big an image; and opening the model or artifact they name. ``u2zoo.cli`` builds on this
module, never the other way round."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Iterator

from u2zoo.errors import ConfigError, U2ZooError
from u2zoo.tasks.engine import Segmenter, auto_batch_size
from u2zoo.tasks.outputs import KINDS, OutputOptions, parse_colour
from u2zoo.tasks.refine import CrfOptions, MattingOptions
from u2zoo.zoo.contract import VARIANTS
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS, load_rgb

_WEIGHTS_HELP = "weights: a local .pth path or an http(s)/file URL (with --weights-sha256); default: the registry's"


def add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help=_WEIGHTS_HELP)
    p.add_argument("--weights-sha256", help="expected sha256 of --weights (required for URLs)")
    p.add_argument("--random-weights", action="store_true", help="use an untrained model (for tests and timing)")


def add_contract_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--contract",
        choices=VARIANTS,
        help="pre/post resize variant: official (the default: it scored better on DUTS-TR val/) or "
        "antialiased (Lanczos in and out, as rembg; better on photos much larger than 320 px)",
    )


def add_model_arguments(p: argparse.ArgumentParser, batch: bool = True) -> None:
    p.add_argument(
        "--model",
        help="architecture or weights name (torch reference); default: the best shipped saliency model (printed)",
    )
    p.add_argument("--artifact", help="a converted artifact (runs in its own runtime with its own contract)")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--threads", type=int, help="intra-op threads")
    if batch:
        p.add_argument(
            "--batch",
            default="1",
            help="images per engine call: N, or auto (from free memory); "
            "N > 1 needs a dynamic-batch artifact (default 1)",
        )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images before decoding them (default {DEFAULT_MAX_PIXELS:,})",
    )


def add_output_arguments(p: argparse.ArgumentParser, default: str = "mask") -> None:
    p.add_argument("--outputs", default=default, help=f"comma-separated: {', '.join(KINDS)} (default {default})")
    p.add_argument("--cutout", action="store_true", help="also write RGBA cut-outs (adds cutout to --outputs)")
    p.add_argument("--bg-colour", "--bg-color", dest="bg_colour", help="composite background: #RRGGBB, R,G,B or a name")
    p.add_argument("--bg-image", help="composite background image (scaled to cover, centre-cropped)")
    p.add_argument("--crf", action="store_true", help="refine the map with a dense CRF on the image (u2zoo[crf])")
    p.add_argument("--crf-iterations", type=int, default=CrfOptions.iterations, help="CRF mean-field iterations")
    p.add_argument(
        "--alpha-matting", action="store_true", help="soft edges by closed-form matting on a trimap (u2zoo[matting])"
    )
    p.add_argument(
        "--decontaminate",
        action="store_true",
        help="cut-outs and composites: estimate the foreground colour at soft edges, so no old background "
        "colour shows in hair (u2zoo[matting])",
    )
    p.add_argument(
        "--fg-threshold",
        type=int,
        default=MattingOptions.fg_threshold,
        help=f"matting: map value (0-255) from which a pixel is sure foreground "
        f"(default {MattingOptions.fg_threshold})",
    )
    p.add_argument(
        "--bg-threshold",
        type=int,
        default=MattingOptions.bg_threshold,
        help=f"matting: map value up to which a pixel is sure background (default {MattingOptions.bg_threshold})",
    )
    p.add_argument(
        "--erode",
        type=int,
        default=MattingOptions.erode,
        help=f"matting: shrink the sure regions by N px where they meet (default {MattingOptions.erode})",
    )


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
        decontaminate=getattr(args, "decontaminate", False),
    )


def _model_arch(args: argparse.Namespace, artifact_manifest: dict | None) -> str:
    if artifact_manifest is not None:
        return artifact_manifest["model"]["arch"]
    from u2zoo.zoo.weights import resolve_model_name

    return resolve_model_name(args.model)[0]


def open_predictor(args: argparse.Namespace):
    """A runner for ``--artifact`` or the torch reference for ``--model``; plus its contract.

    With neither, the best shipped saliency model (``u2zoo.zoo.default_model``), said in one line.
    """
    if args.artifact and args.model:
        raise U2ZooError("give one of --model NAME or --artifact FILE, not both")
    if args.artifact and getattr(args, "contract", None):
        raise ConfigError(
            "--contract is for --model: an artifact carries its own contract "
            "(convert it again with --contract to change it)"
        )
    if not args.artifact and not args.model:
        from u2zoo.zoo.default_model import choose_default

        choice = choose_default()
        print(choice.describe())
        args.model = choice.name
    if args.artifact:
        from u2zoo.artifact import open_artifact
        from u2zoo.converters import get_target

        artifact = open_artifact(args.artifact)
        spec = get_target(artifact.target)
        spec.ensure_available()
        return spec.runner(artifact, threads=args.threads), artifact.contract
    from contextlib import nullcontext

    from u2zoo.zoo.reference import TorchPredictor
    from u2zoo.zoo.weights import load_model

    model, info, contract = load_model(
        args.model,
        args.weights,
        args.weights_sha256,
        args.random_weights,
        progress=not getattr(args, "quiet", False),
        contract_variant=args.contract,
    )
    if info.source == "random":
        print("NOTE: random weights: the masks are meaningless")
    return nullcontext(TorchPredictor(model, threads=args.threads)), contract


@contextmanager
def open_segmenter(args: argparse.Namespace, batch: str | int = 1) -> Iterator[Segmenter]:
    """Load the model or artifact once; yield a Segmenter at the asked batch (``auto``
    resolved from free memory and printed)."""
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


def add_upscale_arguments(p: argparse.ArgumentParser) -> None:
    from u2zoo.tasks.upscale import DEFAULT_OVERLAP, DEFAULT_TILE

    group = p.add_argument_group("super-resolution", "--upscale enlarges each photo first (u2zoo[sr]: spandrel)")
    group.add_argument(
        "--upscale",
        action="store_true",
        help="super-resolve each photo with --sr-weights before the model sees it: every output is scale × the input",
    )
    group.add_argument(
        "--sr-weights",
        metavar="FILE",
        help="your SR checkpoint (.pth/.safetensors: ESRGAN, Real-ESRGAN, SRVGGNetCompact, SwinIR, …; "
        "read with weights_only; u2zoo downloads none)",
    )
    group.add_argument(
        "--sr-tile",
        type=int,
        metavar="PX",
        default=DEFAULT_TILE,
        help=f"tile side in input px, 0 = untiled (default {DEFAULT_TILE})",
    )
    group.add_argument(
        "--sr-overlap",
        metavar="PX",
        type=int,
        default=DEFAULT_OVERLAP,
        help=f"px of context around each tile (default {DEFAULT_OVERLAP})",
    )
    group.add_argument(
        "--sr-device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if a GPU is visible"
    )


def open_upscaler(args: argparse.Namespace):
    """The Upscaler ``--upscale`` asks for (printed), or None; SR flags without it are refused."""
    from u2zoo.tasks.upscale import DEFAULT_OVERLAP, DEFAULT_TILE, load_upscaler

    if not args.upscale:
        given = [
            flag
            for flag, value, default in (
                ("--sr-weights", args.sr_weights, None),
                ("--sr-tile", args.sr_tile, DEFAULT_TILE),
                ("--sr-overlap", args.sr_overlap, DEFAULT_OVERLAP),
                ("--sr-device", args.sr_device, "auto"),
            )
            if value != default
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --upscale; add --upscale")
        return None
    if not args.sr_weights:
        raise ConfigError(
            "--upscale needs --sr-weights FILE: your super-resolution checkpoint (ESRGAN, Real-ESRGAN, "
            "SRVGGNetCompact, SwinIR, …); u2zoo ships and downloads none"
        )
    upscaler = load_upscaler(args.sr_weights, args.sr_tile, args.sr_overlap, args.sr_device)
    print(f"upscaling with {upscaler.describe()}")
    return upscaler
