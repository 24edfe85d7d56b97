"""Files and folders in, masks / cut-outs / composites out.

Folders are walked recursively and their structure is kept under the output folder; an
output folder inside an input folder is not walked (its masks are no inputs). A file that
cannot be read (not an image, empty, corrupt, over the pixel limit) or whose outputs cannot be
written is reported and skipped; the rest go on. Inputs whose outputs would share a name
(``x.jpg`` and ``x.png``) keep their extension in it (``x_jpg.png``, ``x_png.png``), with a
note, so none overwrites another. ``resume`` skips inputs whose outputs all exist already
(every output is written to a temp name and renamed, so an existing one is complete).
"""

from __future__ import annotations

import os
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from u2zoo.errors import ConfigError, ImageError, U2ZooError
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.outputs import SUFFIXES, OutputOptions, render
from u2zoo.tasks.upscale import Upscaler, upscale_photo
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, load_rgb, shown


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


def collect_inputs(inputs: list[str | Path], out_dir: Path | None = None) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image path, output stem) pairs and the non-image files found in folders.

    A file named directly is always tried (its decoder decides); in folders only image
    suffixes are; hidden files are ignored, and so is ``out_dir`` inside an input folder: a
    rerun would otherwise take the last run's masks for photos (``masks/masks/a.png``).
    """
    images: list[tuple[Path, Path]] = []
    others: list[Path] = []
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            skipped = _inside(out_dir, root)
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                relative = path.relative_to(root)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if skipped is not None and relative.parts[: len(skipped)] == skipped:
                    continue
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    images.append((path, relative.with_suffix("")))
                else:
                    others.append(path)
        elif root.exists():
            images.append((root, Path(root.stem)))
        else:
            raise ImageError(f"input not found: {shown(root)}")
    return images, others


def _inside(out_dir: Path | None, root: Path) -> tuple[str, ...] | None:
    """``out_dir``'s parts relative to the input folder ``root`` if it lies inside it; an output
    folder that is the input folder itself is refused: its outputs would be read back as inputs."""
    if out_dir is None:
        return None
    out, root = out_dir.resolve(), root.resolve()
    if out == root:
        raise ConfigError(
            f"--out {shown(out_dir)} is an input folder: its outputs would be taken for inputs "
            "next time; write them to another folder (one inside the input folder is skipped)"
        )
    return out.relative_to(root).parts if out.is_relative_to(root) else None


def unique_stems(
    images: list[tuple[Path, Path]], suffixes: list[str]
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """Inputs whose outputs (``stem + suffix``) would share a name, ignoring case as some file
    systems do, keep their extension in the stem (``x.jpg`` → ``x_jpg``): no output silently
    overwrites another, and a note says so for each. Outputs still identical (the same file
    name in two input folders) are a ConfigError, before anything runs."""

    def clashes(pairs: list[tuple[Path, Path]], fold: bool) -> set[int]:
        owners: dict[str, list[int]] = defaultdict(list)
        for index, (_, stem) in enumerate(pairs):
            for suffix in suffixes:
                name = f"{stem.as_posix()}{suffix}"
                owners[name.casefold() if fold else name].append(index)
        return {i for group in owners.values() if len(group) > 1 for i in group}

    clashing = clashes(images, fold=True)
    if not clashing:
        return images, []
    renamed = [
        (path, stem.with_name(f"{stem.name}_{path.suffix.lstrip('.')}") if i in clashing else stem)
        for i, (path, stem) in enumerate(images)
    ]
    still = sorted(clashes(renamed, fold=False))
    if still:
        names = ", ".join(shown(images[i][0]) for i in still[:6]) + (", …" if len(still) > 6 else "")
        raise ConfigError(
            f"{len(still)} inputs would write the same output files: {names}; rename them or run them separately"
        )
    notes = [
        (
            renamed[i][0],
            f"another input has the same name, so its outputs keep the extension: "
            f"{shown(renamed[i][1].name)}{suffixes[0]}.png",
        )
        for i in sorted(clashing)
    ]
    return renamed, notes


def output_paths(out_dir: Path, stem: Path, options: OutputOptions) -> dict[str, Path]:
    return {kind: out_dir / stem.parent / f"{stem.name}{SUFFIXES[kind]}.png" for kind in options.kinds}


def temp_path(target: Path) -> Path:
    """Where ``save_png`` writes ``target`` first: hidden, and unique to the process and the
    call (``.x.png.<pid>-<8 hex>.tmp``), so two writers of one target (a Ray batch redone while
    the lost worker still runs) never share a temp file."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def save_png(image: Image.Image, target: Path, format: str = "PNG") -> None:
    """Save through a temp name and rename, so an interrupted run leaves no broken file
    (a PNG unless ``format`` names another Pillow format)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        image.save(tmp, format=format)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def process_files(
    segmenter: Segmenter,
    inputs: list[str | Path],
    out_dir: Path,
    options: OutputOptions | None = None,
    resume: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    upscaler: Upscaler | None = None,
) -> FolderReport:
    """Run every readable image through ``segmenter``, ``segmenter.batch_size`` per engine call;
    with an ``upscaler``, each image is super-resolved first and every output is its size."""
    from tqdm import tqdm

    options = options or OutputOptions()
    images, others = collect_inputs(inputs, out_dir)
    if not images:
        raise U2ZooError(f"no images found in: {', '.join(map(shown, inputs))}")
    images, renamed = unique_stems(images, [SUFFIXES[kind] for kind in options.kinds])
    report = FolderReport(not_images=others, notes=renamed)
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
                image = load_rgb(path, max_pixels)
                if upscaler is not None:
                    image = upscale_photo(upscaler, image, max_pixels, progress)
                pending.append((path, stem, segmenter.prepare(image)))
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


def _run(
    segmenter: Segmenter,
    pending: list[tuple[Path, Path, np.ndarray]],
    out_dir: Path,
    options: OutputOptions,
    report: FolderReport,
) -> None:
    maps = segmenter.maps([image for _, _, image in pending])
    for (path, stem, image), prob in zip(pending, maps):
        rendered = render(image, prob, options)
        report.notes.extend((path, note) for note in rendered.notes)
        try:
            for kind, target in output_paths(out_dir, stem, options).items():
                save_png(rendered.images[kind], target)
                report.written.append(target)
        except OSError as exc:
            report.failed.append((path, write_error(target, exc)))
            continue
        report.processed += 1


def write_error(target: Path, exc: OSError) -> str:
    """Why ``target`` could not be written, naming a file that sits where a folder must be."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"cannot write {shown(target)}: {shown(parent)} is a file, not a folder"
            break
    return f"cannot write {shown(target)}: {exc.strerror or exc}"
