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
    add_upscale_arguments,
    add_weights_args,
    open_predictor,
)
from u2zoo.cli.video import add_video_arguments, cmd_video
from u2zoo.errors import ConfigError

# predict's flags for --engine ray only, and what they are called on the command line
RAY_FLAGS = {
    "address": "--address",
    "num_actors": "--num-actors",
    "actor_cpus": "--actor-cpus",
    "actor_gpus": "--actor-gpus",
}


def cmd_predict(args: argparse.Namespace) -> int:
    """Masks, cut-outs and composites of files and folders, through any model or artifact."""
    from u2zoo.cli.task_args import open_segmenter, open_upscaler, output_options
    from u2zoo.files import ensure_writable_dir
    from u2zoo.tasks.folder import process_files
    from u2zoo.tasks.upscale import record_upscale
    from u2zoo.zoo.images import shown

    if args.engine == "ray":
        if args.upscale:
            raise ConfigError("--upscale runs with --engine local only (each Ray actor would need the SR model)")
        return _predict_on_ray(args)
    given = [flag for name, flag in RAY_FLAGS.items() if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --engine ray")
    options = output_options(args)
    upscaler = open_upscaler(args)  # bad SR weights are one line before any model loads
    out = ensure_writable_dir(Path(args.out))
    with open_segmenter(args, args.batch) as segmenter:
        report = process_files(
            segmenter,
            args.inputs,
            out,
            options,
            resume=args.resume,
            max_pixels=args.max_pixels,
            progress=not args.quiet,
            upscaler=upscaler,
        )
    if upscaler is not None and report.processed:
        print(
            f"upscaled {report.processed} image(s) ×{upscaler.scale}; recorded in {shown(record_upscale(out, upscaler))}"
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


def _predict_on_ray(args: argparse.Namespace) -> int:
    """``predict --engine ray``: the same outputs, written by a pool of Ray actors."""
    from u2zoo.cli.task_args import open_segmenter, output_options
    from u2zoo.files import ensure_writable_dir
    from u2zoo.tasks.ray_predict import ActorPool, ModelSpec, import_ray, predict_on_ray
    from u2zoo.zoo.images import shown

    pool = ActorPool(
        args.num_actors,
        1.0 if args.actor_cpus is None else args.actor_cpus,
        0.0 if args.actor_gpus is None else _above_zero("--actor-gpus", args.actor_gpus),
    )
    import_ray()  # the missing extra is the first thing said
    out_text = args.out[len("file://") :] if args.out.startswith("file://") else args.out
    if "://" in out_text:
        raise ConfigError(
            f"--out {shown(args.out)}: --engine ray writes to a local folder (on a cluster: one every node "
            "mounts, e.g. NFS), not to a URL"
        )
    out = ensure_writable_dir(Path(out_text))
    options = output_options(args)
    # open the model once here: a bad artifact, weights or batch is one line before Ray starts
    with open_segmenter(args, args.batch) as segmenter:
        batch = segmenter.batch_size
    artifact = str(Path(args.artifact).resolve()) if args.artifact else None
    weights = args.weights
    if weights and "://" not in weights:
        weights = str(Path(weights).resolve())
    spec = ModelSpec(
        model=None if artifact else args.model,
        artifact=artifact,
        weights=None if artifact else weights,
        weights_sha256=None if artifact else args.weights_sha256,
        random_weights=False if artifact else args.random_weights,
        contract=None if artifact else args.contract,
        threads=args.threads,
        batch_size=batch,
    )
    inputs = [item if "://" in item else Path(item) for item in args.inputs]
    report = predict_on_ray(
        spec,
        inputs,
        out,
        options,
        address=args.address,
        pool=pool,
        resume=args.resume,
        max_pixels=args.max_pixels,
        progress=not args.quiet,
        quiet=args.quiet,
    )
    for path, reason in report.failed:
        print(f"u2zoo: skipped {shown(path)}: {reason}", file=sys.stderr)
    for path, note in report.notes:
        print(f"u2zoo: note: {shown(path)}: {note}", file=sys.stderr)
    if report.not_images:
        names = ", ".join(shown(Path(p).name) for p in report.not_images[:5])
        names += ", …" if len(report.not_images) > 5 else ""
        print(f"u2zoo: skipped {len(report.not_images)} non-image file(s) in the folders: {names}", file=sys.stderr)
    resumed = f", {len(report.resumed)} already done (--resume)" if args.resume else ""
    cleaned = f"; removed {report.temps_removed} temp file(s) of lost workers" if report.temps_removed else ""
    print(
        f"wrote {report.written} file(s) to {shown(out)}; {report.processed} image(s) in {report.seconds:.2f} s "
        f"= {report.images_per_s:.2f} images/s end to end on {report.num_actors} Ray actor(s) × {pool.cpus:g} CPU"
        f"{f' + {pool.gpus:g} GPU' if pool.gpus else ''}, {report.threads} thread(s) each, at batch {batch} "
        f"({report.cluster}; start-up {report.startup_seconds:.2f} s; engine calls {report.engine_seconds:.2f} s over all "
        f"actors){cleaned}; {len(report.failed)} input(s) failed{resumed}"
    )
    return 1 if report.failed else 0


def _above_zero(flag: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{flag} must be a number above 0, got {value:g}")
    return value


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
    add_upscale_arguments(p)
    p.add_argument("--resume", action="store_true", help="skip inputs whose outputs all exist (an interrupted run)")
    p.add_argument("--out", required=True, help="output folder")
    ray = p.add_argument_group(
        "engines", "--engine ray (u2zoo[ray]) runs the same job on a Ray cluster, through Ray Data"
    )
    ray.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (the default); ray: a pool of Ray actors, each with the model loaded; "
        "inputs may also be fsspec URLs (s3://… with s3fs); --out must be a folder every node reaches",
    )
    ray.add_argument(
        "--address",
        metavar="ADDR",
        help="the Ray cluster: HOST:PORT of its head, ray://HOST:PORT or auto (default: start a local Ray instance)",
    )
    ray.add_argument(
        "--num-actors",
        type=int,
        metavar="N",
        help="actors in the pool (default: as many as the cluster's CPUs hold at --actor-cpus each)",
    )
    ray.add_argument(
        "--actor-cpus",
        type=float,
        metavar="X",
        help="CPUs each actor reserves (default 1); also its runtime's threads unless --threads is given",
    )
    ray.add_argument("--actor-gpus", type=float, metavar="X", help="GPUs each actor reserves (default none)")


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
    p = add("serve", cmd_serve, "HTTP service (u2zoo[serve]): POST an image, get a mask or cut-out; requests batched")
    add_serve_arguments(p)
