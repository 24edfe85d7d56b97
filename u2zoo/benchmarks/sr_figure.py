"""A small ×4 super-resolution model trained here, scored against bicubic, for the README figure.

u2zoo ships no SR weights and none can be downloaded here, so ``--upscale`` is shown with a
model trained for minutes on the CPU: Real-ESRGAN's SRVGGNetCompact (spandrel's class, official
key names, saved under ``params`` as Real-ESRGAN does), L1 loss, random 128 px crops of DUTS-TR
``train/`` downscaled ×4 (bicubic, antialiased) as inputs. It is scored on ``val/`` (held out):
each 320 px image downscaled ×4 to 80 px, then enlarged ×4 by bicubic and by the model through
``u2zoo.tasks.upscale`` (the ``--upscale`` path), PSNR against the original. A user's
Real-ESRGAN weights do far better; this only shows the pipeline working on real photos.

    python -m u2zoo.benchmarks.sr_figure train --data ../shared/data/duts-tr --out sr.pth --minutes 15
    python -m u2zoo.benchmarks.sr_figure score --data ../shared/data/duts-tr --weights sr.pth [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from u2zoo.tasks.upscale import import_spandrel, load_upscaler
from u2zoo.zoo.images import list_images

SCALE = 4
HR_CROP = 128


def downscale(hr):
    """The degradation the model learns to undo: ×4 bicubic with antialiasing (torch, NCHW)."""
    import torch.nn.functional as F

    return F.interpolate(hr, scale_factor=1 / SCALE, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def train(data: Path, out: Path, minutes: float, images: int, features: int, convs: int, seed: int = 0) -> dict:
    import torch

    import_spandrel()
    from spandrel.architectures.Compact import Compact as SRVGGNetCompact

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    paths = list_images([data / "train" / "images"])[:images]
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    photos = [p for p in photos if min(p.shape[:2]) >= HR_CROP]
    net = SRVGGNetCompact(num_feat=features, num_conv=convs, upscale=SCALE)
    optimiser = torch.optim.Adam(net.parameters(), lr=5e-4)
    deadline, started, step, seen = time.monotonic() + minutes * 60, time.monotonic(), 0, 0
    losses: list[float] = []
    while time.monotonic() < deadline:
        batch = []
        for index in rng.integers(0, len(photos), 16):
            photo = photos[index]
            y, x = rng.integers(0, photo.shape[0] - HR_CROP + 1), rng.integers(0, photo.shape[1] - HR_CROP + 1)
            crop = photo[y : y + HR_CROP, x : x + HR_CROP]
            batch.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        hr = torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2).astype(np.float32) / 255)
        loss = (net(downscale(hr)) - hr).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step, seen = step + 1, seen + len(batch)
        losses.append(loss.item())
        if step % 200 == 0:
            print(f"step {step}: L1 {np.mean(losses[-200:]):.4f}, {seen / (time.monotonic() - started):.1f} crops/s")
    torch.save({"params": net.state_dict()}, out)
    return {
        "steps": step,
        "crops": seen,
        "minutes": minutes,
        "train_images": len(photos),
        "l1_last_200": np.mean(losses[-200:]),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


def low_resolution(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(original uint8 cropped to a multiple of 4, its ×4 downscale as float RGB in [0, 1])."""
    import torch

    photo = np.asarray(Image.open(path).convert("RGB"))
    height, width = photo.shape[0] // SCALE * SCALE, photo.shape[1] // SCALE * SCALE
    photo = photo[:height, :width]
    hr = torch.from_numpy(photo.transpose(2, 0, 1).astype(np.float32)[None] / 255)
    return photo, downscale(hr)[0].permute(1, 2, 0).numpy()


def bicubic(small: np.ndarray) -> np.ndarray:
    image = Image.fromarray((small * 255).round().astype(np.uint8))
    return np.asarray(image.resize((image.width * SCALE, image.height * SCALE), Image.BICUBIC))


def score(data: Path, weights: Path, limit: int) -> dict:
    upscaler = load_upscaler(weights)
    scores: dict[str, list[float]] = {"bicubic": [], "sr": []}
    for path in list_images([data / "val" / "images"])[:limit]:
        photo, small = low_resolution(path)
        scores["bicubic"].append(psnr(bicubic(small), photo))
        scores["sr"].append(psnr(upscaler.upscale(small), photo))
    return {
        "model": upscaler.describe(),
        "data": f"{data}/val (held out), first {len(scores['sr'])} images, ×4 bicubic-antialiased downscale",
        "psnr_db": {name: round(float(np.mean(values)), 2) for name, values in scores.items()},
        "sr_better_on": int(np.sum(np.array(scores["sr"]) > np.array(scores["bicubic"]))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("train", "score"))
    parser.add_argument("--data", type=Path, required=True, help="the duts-tr folder (train/ and val/)")
    parser.add_argument("--out", type=Path, default=Path("sr_compact_x4.pth"))
    parser.add_argument("--weights", type=Path, help="score: the trained checkpoint")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--images", type=int, default=1500, help="train/ images held in memory")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--convs", type=int, default=8)
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args(argv)
    if args.action == "train":
        result = train(args.data, args.out, args.minutes, args.images, args.features, args.convs)
    else:
        result = score(args.data, args.weights or args.out, args.limit)
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
