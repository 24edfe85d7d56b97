"""Does dense-CRF refinement help? Boundary-band and whole-image error before and after it.

    python -m u2zoo.benchmarks.crf_eval --artifact A.onnx --images DIR --reference DIR [--save DIR]

``--reference`` holds masks paired by file stem, binarised at 0.5: ground truth where you
have it, or a stronger model's outputs (e.g. the official U2NET results) as a pseudo ground
truth. A CRF's output is nearly binary, which alone lowers the error against a binary reference,
so the table also scores the plain map binarised at 0.5: CRF helps where it beats that
control. ``--save`` writes image | map | CRF map strips to look at.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from u2zoo.errors import U2ZooError, one_line
from u2zoo.runtime.metrics import DEFAULT_BOUNDARY_BAND, boundary_mae, mae, prepare
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.refine import CrfOptions, dense_crf
from u2zoo.zoo.contract import to_uint8
from u2zoo.zoo.images import list_images, load_mask, load_rgb


@dataclass(frozen=True)
class CrfScore:
    name: str
    mae_before: float
    mae_after: float
    boundary_before: float
    boundary_after: float
    boundary_thresholded: float  # the control: the map binarised at 0.5, no CRF


def evaluate_crf(
    segmenter: Segmenter,
    images: list[Path],
    references: Path,
    options: CrfOptions = CrfOptions(),
    band: int = DEFAULT_BOUNDARY_BAND,
    save: Path | None = None,
) -> list[CrfScore]:
    """Score each image's map and its CRF refinement against the reference mask of the same stem."""
    scores = []
    for path in images:
        matches = sorted(references.glob(path.stem + ".*"))
        if not matches:
            continue
        image = segmenter.prepare(load_rgb(path))
        (prob,) = segmenter.maps([image])
        refined = dense_crf(image, prob, options)
        gt_soft, _ = load_mask(matches[0], prob.shape, resample="bilinear")
        before, gt = prepare(prob, gt_soft, normalize=False)
        after, _ = prepare(np.clip(refined, 0, 1), gt_soft, normalize=False)
        scores.append(
            CrfScore(
                path.stem,
                mae(before, gt),
                mae(after, gt),
                boundary_mae(before, gt, band),
                boundary_mae(after, gt, band),
                boundary_mae((before > 0.5).astype(float), gt, band),
            )
        )
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            strip = np.concatenate(
                [to_uint8(image), *(np.repeat(to_uint8(m)[..., None], 3, 2) for m in (prob, refined))], 1
            )
            Image.fromarray(strip).save(save / f"{path.stem}_crf.png")
    if not scores:
        raise U2ZooError(f"no image in the list has a reference mask of the same name in {references}")
    return scores


def format_scores(scores: list[CrfScore], band: int) -> str:
    fields = ("mae_before", "mae_after", "boundary_before", "boundary_after", "boundary_thresholded")
    lines = [
        f"| image | MAE before | MAE after CRF | boundary MAE ({band} px) before | after CRF | map > 0.5, no CRF |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join([s.name, *(f"{getattr(s, f):.4f}" for f in fields)]) + " |" for s in scores]
    means = [f"{np.mean([getattr(s, f) for s in scores]):.4f}" for f in fields]
    lines.append("| " + " | ".join([f"**mean of {len(scores)}**", *means]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from u2zoo.tasks.loading import load_segmenter

    parser = argparse.ArgumentParser(prog="python -m u2zoo.benchmarks.crf_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="architecture or weights name (default: the best shipped saliency model)")
    parser.add_argument("--artifact", help="a converted artifact, run in its own runtime")
    parser.add_argument("--weights", help="a local .pth for --model")
    parser.add_argument("--threads", type=int, help="intra-op threads")
    parser.add_argument("--images", required=True, help="folder of images")
    parser.add_argument("--reference", required=True, help="folder of reference masks paired by file stem")
    parser.add_argument("--band", type=int, default=DEFAULT_BOUNDARY_BAND, help="boundary band width in px")
    parser.add_argument("--iterations", type=int, default=CrfOptions.iterations, help="CRF iterations")
    parser.add_argument("--save", help="folder for image | map | CRF strips")
    args = parser.parse_args(argv)
    try:
        with load_segmenter(
            args.model, artifact=args.artifact, weights=args.weights, threads=args.threads
        ) as segmenter:
            scores = evaluate_crf(
                segmenter,
                list_images([args.images]),
                Path(args.reference),
                CrfOptions(iterations=args.iterations),
                args.band,
                Path(args.save) if args.save else None,
            )
    except U2ZooError as exc:
        print(f"u2zoo: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    print(format_scores(scores, args.band))
    return 0


if __name__ == "__main__":
    sys.exit(main())
