"""Peak memory and time of tiled super-resolution (``--upscale``) on one large photo.

With no ``--weights`` the network is ESRGAN's ×4 RRDBNet at the size of Real-ESRGAN's
``RealESRGAN_x4plus.pth`` (64 features, 23 blocks, 16.7 M parameters), randomly initialised:
memory and time depend on the shape, not on the values. The process's peak RSS (``VmHWM``)
covers everything: torch, the model, the photo and the ×4 result. Not ``ru_maxrss``: Linux
carries it over from the parent through fork and exec, so a run started by a big process (a test
suite at 7 GB) would report the parent's peak, not its own.

    python -m u2zoo.benchmarks.sr_memory --size 2000 [--tile 256] [--overlap 32] [--blocks 23]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from u2zoo.runtime.timing import peak_rss_mb
from u2zoo.tasks.upscale import DEFAULT_OVERLAP, DEFAULT_TILE, import_spandrel, load_upscaler, tile_boxes


def random_rrdbnet(path: Path, blocks: int = 23, features: int = 64) -> Path:
    """An ESRGAN ×4 checkpoint of random weights (spandrel's own RRDBNet, old ESRGAN key names)."""
    import torch

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=features, num_blocks=blocks, scale=4)
    torch.save(net.state_dict(), path)
    return path


def peak_rss_gb() -> float:
    """This process's own peak resident memory since it started (VmHWM on Linux)."""
    return (peak_rss_mb() or 0.0) / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="photo side in px (default 2000)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE)
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    parser.add_argument("--blocks", type=int, default=23, help="RRDB blocks of the random RRDBNet (default 23)")
    parser.add_argument("--weights", help="an SR checkpoint instead of the random RRDBNet")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(args.weights) if args.weights else random_rrdbnet(Path(scratch) / "rrdbnet_x4.pth", args.blocks)
        upscaler = load_upscaler(weights, args.tile, args.overlap, args.device)
        rss_loaded = peak_rss_gb()
        photo = np.random.default_rng(0).random((args.size, args.size, 3), dtype=np.float32)
        started = time.perf_counter()
        result = upscaler.upscale(photo, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in upscaler.descriptor.model.parameters())
    print(
        json.dumps(
            {
                "sr": upscaler.to_dict() | {"weights": args.weights or f"random RRDBNet, {args.blocks} blocks"},
                "parameters": parameters,
                "input": [args.size, args.size],
                "output": list(result.shape[:2]),
                "tiles": len(tile_boxes(args.size, args.size, args.tile)),
                "seconds": round(seconds, 1),
                "peak_rss_gb_after_load": round(rss_loaded, 3),
                "peak_rss_gb": round(peak_rss_gb(), 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
