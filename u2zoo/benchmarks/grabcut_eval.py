"""Does GrabCut make better training masks than the model's map alone? Scores against ground
truth: the map (soft), the map thresholded at 0.5, and the map refined by GrabCut, with MAE and
the boundary MAE (the band around the true edge), through the deploy path of the contract.

    python -m u2zoo.benchmarks.grabcut_eval --images val/images --masks val/masks [--model u2netp] [--limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from u2zoo.runtime.metrics import SaliencyMetrics
from u2zoo.tasks.grabcut import GrabCutOptions, grabcut
from u2zoo.tasks.loading import load_segmenter
from u2zoo.zoo.images import list_images, load_mask, load_rgb

VARIANTS = ("map", "map > 0.5", "map + GrabCut")


def evaluate(images: Path, masks: Path, model: str | None, limit: int | None, options: GrabCutOptions) -> dict:
    paths = list_images([images])[:limit]
    scores = {v: SaliencyMetrics(normalize=False) for v in VARIANTS}
    seconds = 0.0
    with load_segmenter(model) as segmenter:
        for path in paths:
            image = load_rgb(path)
            gt, _ = load_mask(masks / f"{path.stem}.png", image.shape[:2])
            prob = segmenter.maps([image])[0]
            started = time.perf_counter()
            refined = grabcut(image, prob, options=options)
            seconds += time.perf_counter() - started
            for name, pred in zip(VARIANTS, (prob, (prob > 0.5).astype(np.float32), refined)):
                scores[name].add(pred, gt)
    results = {name: metrics.result() for name, metrics in scores.items()}
    return {"images": len(paths), "grabcut_s_per_image": seconds / max(1, len(paths)), "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m u2zoo.benchmarks.grabcut_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--model", help="default: the best shipped saliency model")
    p.add_argument("--limit", type=int)
    p.add_argument("--iterations", type=int, default=GrabCutOptions.iterations)
    args = p.parse_args(argv)
    report = evaluate(
        Path(args.images), Path(args.masks), args.model, args.limit, GrabCutOptions(iterations=args.iterations)
    )
    print(f"{report['images']} images; GrabCut {report['grabcut_s_per_image'] * 1000:.0f} ms per image")
    print(f"{'variant':<16} {'MAE':>8} {'boundary MAE':>13} {'max F':>7}")
    for name, result in report["results"].items():
        print(f"{name:<16} {result.mae:>8.4f} {result.boundary_mae:>13.4f} {result.max_f:>7.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
