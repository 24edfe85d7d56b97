"""Files and folders in, masks / cut-outs / composites out.

Folders are walked recursively and their structure is kept under the output folder. A file
that cannot be read (not an image, empty, corrupt, over the pixel limit) is reported and
skipped; the rest go on. ``resume`` skips inputs whose outputs all exist already (every
output is written to a temp name and renamed, so an existing one is complete).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from u2zoo.errors import ImageError, U2ZooError
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.outputs import SUFFIXES, OutputOptions, render
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, load_rgb


@dataclass
class FolderReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # unreadable inputs, with the reason
    not_images: list[Path] = field(default_factory=list)  # files in folders without an image suffix
    resumed: list[Path] = field(default_factory=list)  # skipped: their outputs exist
    notes: list[tuple[Path, str]] = field(default_factory=list)  # e.g. matting skipped for an image
    processed: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")


def collect_inputs(inputs: list[str | Path]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image path, output stem) pairs and the non-image files found in folders.

    A file named directly is always tried (its decoder decides); in folders only image
    suffixes are; hidden files are ignored.
    """
    images: list[tuple[Path, Path]] = []
    others: list[Path] = []
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                relative = path.relative_to(root)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    images.append((path, relative.with_suffix("")))
                else:
                    others.append(path)
        elif root.exists():
            images.append((root, Path(root.stem)))
        else:
            raise ImageError(f"input not found: {root}")
    return images, others


def output_paths(out_dir: Path, stem: Path, options: OutputOptions) -> dict[str, Path]:
    return {kind: out_dir / stem.parent / f"{stem.name}{SUFFIXES[kind]}.png" for kind in options.kinds}


def save_png(image: Image.Image, target: Path) -> None:
    """Save through a temp name and rename, so an interrupted run leaves no broken PNG."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def process_files(segmenter: Segmenter, inputs: list[str | Path], out_dir: Path,
                  options: OutputOptions | None = None, resume: bool = False,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, progress: bool = True) -> FolderReport:
    """Run every readable image through ``segmenter``, ``segmenter.batch_size`` per engine call."""
    from tqdm import tqdm

    options = options or OutputOptions()
    images, others = collect_inputs(inputs)
    report = FolderReport(not_images=others)
    if not images:
        raise U2ZooError(f"no images found in: {', '.join(map(str, inputs))}")
    started = time.perf_counter()
    pending: list[tuple[Path, Path, np.ndarray]] = []
    with tqdm(total=len(images), desc="predict", unit="img", disable=not progress) as bar:
        for path, stem in images:
            targets = output_paths(out_dir, stem, options)
            if resume and all(t.is_file() for t in targets.values()):
                report.resumed.append(path)
                bar.update()
                continue
            try:
                pending.append((path, stem, segmenter.prepare(load_rgb(path, max_pixels))))
            except U2ZooError as exc:
                report.failed.append((path, str(exc)))
                bar.update()
                continue
            if len(pending) == segmenter.batch_size:
                _run(segmenter, pending, out_dir, options, report)
                bar.update(len(pending))
                pending = []
        if pending:
            _run(segmenter, pending, out_dir, options, report)
            bar.update(len(pending))
    report.seconds = time.perf_counter() - started
    return report


def _run(segmenter: Segmenter, pending: list[tuple[Path, Path, np.ndarray]], out_dir: Path,
         options: OutputOptions, report: FolderReport) -> None:
    maps = segmenter.maps([image for _, _, image in pending])
    for (path, stem, image), prob in zip(pending, maps):
        rendered = render(image, prob, options)
        report.notes.extend((path, note) for note in rendered.notes)
        for kind, target in output_paths(out_dir, stem, options).items():
            save_png(rendered.images[kind], target)
            report.written.append(target)
        report.processed += 1
