"""Teacher soft maps, computed once per (teacher sha256, image, resolution) and kept on disk.

A teacher's map of an image does not change between epochs, so it is computed on the
*un-augmented* image (the contract's pre-processing at ``resolution``), stored as an 8-bit
PNG at that resolution, and every epoch crops/flips it exactly like the image and its mask.
Photometric augmentation is not applied to the teacher's input (the teacher is close to
invariant to it, and the cache would otherwise be useless).

Layout: ``<root>/<teacher sha256[:16]>/<H>x<W>/<image key>.png`` where the image key is the
file's stem plus a digest of its bytes (a changed image gets a new map, never a stale one).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from u2zoo.artifact import atomic_write_bytes
from u2zoo.zoo.contract import Contract, preprocess


def image_key(path: str | Path) -> str:
    """Stem + the first 12 hex digits of the file's sha256."""
    path = Path(path)
    return f"{path.stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


class TeacherCache:
    """Soft maps of one teacher at one resolution; ``computed`` counts teacher forward passes."""

    def __init__(
        self,
        root: str | Path,
        teacher_sha256: str,
        resolution: tuple[int, int],
        run_teacher: Callable[[np.ndarray], np.ndarray],
        contract: Contract,
    ):
        self.folder = Path(root) / teacher_sha256[:16] / f"{resolution[0]}x{resolution[1]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resolution, self.run_teacher, self.contract = resolution, run_teacher, contract
        self.computed = self.hits = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.png"

    def get_many(self, keys: Sequence[str], images: Sequence[np.ndarray], batch: int = 8) -> list[np.ndarray]:
        """Maps (h, w) float32 in [0, 1] at the cache resolution; missing ones are computed in batches."""
        out: list[np.ndarray | None] = [None] * len(keys)
        missing = []
        for i, key in enumerate(keys):
            path = self.path(key)
            if path.is_file():
                with Image.open(path) as img:
                    out[i] = np.asarray(img.convert("L"), np.float32) / 255.0
                self.hits += 1
            else:
                missing.append(i)
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            inputs = np.stack([preprocess(_as_float(images[i]), self.contract.pre, self.resolution) for i in chunk])
            maps = self.run_teacher(inputs)  # (n, h, w) float in [0, 1]
            for i, plane in zip(chunk, maps):
                u8 = np.clip(np.rint(plane * 255.0), 0, 255).astype(np.uint8)
                buffer = _png(u8)
                atomic_write_bytes(self.path(keys[i]), buffer)
                out[i] = u8.astype(np.float32) / 255.0
                self.computed += 1
        return out  # type: ignore[return-value]


def _as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image


def _png(plane: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(plane, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def torch_teacher_runner(
    teacher, bf16: bool = False, channels_last: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """inputs (n, 3, h, w) → the teacher's fused map d0 (n, h, w), eval mode, no gradients."""
    import torch

    teacher.eval()

    def run(inputs: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(inputs)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = teacher(x)
        d0 = out[0] if isinstance(out, (tuple, list)) else out
        return d0.float()[:, 0].numpy()

    return run
