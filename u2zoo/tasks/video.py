"""Video files in → mask, cut-out or composite videos out (``u2zoo video``, needs ``u2zoo[video]``).

Frames are decoded with PyAV, run through the same ``Segmenter`` and ``render`` as images
(``segmenter.batch_size`` frames per engine call) and encoded again. Frames are turned upright
by the input's display rotation first (a phone video stored sideways), as images are by their
EXIF orientation: the output keeps the input's displayed frame size and its average frame
rate; frames are renumbered at that constant rate, so a variable-frame-rate input comes out
constant-rate. **Audio, subtitles and metadata are not copied**: the outputs hold one video
stream.

The output file's suffix picks the codec (``encoder_for``); pixel formats are for mask /
cut-out / composite:

- ``.mp4``: H.264 (libx264, else mpeg4), lossy, yuv420p / refused (no alpha) / yuv420p
- ``.mov``: PNG frames, lossless, gray / rgba / rgb24
- ``.mkv``: FFV1, lossless, gray / bgra / bgr0
- ``.webm``: VP9 (libvpx-vp9), lossy, yuv420p / yuva420p / yuv420p

``--smooth A`` averages each map with the previous one (``Smoother``) before rendering, to
damp flicker. Portrait (face-crop) contracts write their size×size crop, not the frame.

Several ``--outputs`` are written in one decoding pass, one video per kind, named like the
image pipeline's files: ``name.mp4``, ``name_cutout.mov``, ``name_composite.mp4``.

Nothing half-written is left: each video is encoded to a hidden temp file in the output
folder and renamed once complete; on any failure the temp files are removed. So an existing
output is a complete one, which is what ``--resume`` relies on.

A bad input fails alone (reported with a one-line reason, the others go on, exit code 1):
one that cannot be opened (random bytes, zero bytes, an .mp4 cut before its index), has no
video stream, is over ``--max-pixels``, fails to decode part way, or **ends early** — fewer
frames than its header's duration promises. A truncated video is failed as a whole and keeps
no output, although its first frames decode: a quietly shortened mask video would pass for
a finished one, and ``--resume`` would then skip it for ever.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from u2zoo.errors import BackendUnavailable, ConfigError, VideoError, one_line
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.outputs import SUFFIXES, OutputOptions, render
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS

CONTAINERS = ("mp4", "mov", "mkv", "webm")
# --out FOLDER without --format: H.264 plays everywhere, but has no alpha channel
DEFAULT_CONTAINER = {"mask": "mp4", "cutout": "mov", "composite": "mp4"}
_MUXERS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm"}
_PIL_TO_AV = {"L": "gray", "RGB": "rgb24", "RGBA": "rgba"}


def import_av() -> Any:
    try:
        import av
    except ImportError:
        raise BackendUnavailable("video needs PyAV, which is not installed", extra="video") from None
    return av


# ---------------------------------------------------------------- codecs and output names


def encoder_for(container: str, kind: str) -> tuple[str, str, dict[str, str]]:
    """(codec, pixel format, codec options) for one output kind in one container."""
    av = import_av()
    if container == "mp4":
        if kind == "cutout":
            raise ConfigError(
                "an .mp4 (H.264) video has no alpha channel, so it cannot hold a cut-out: "
                "write cut-outs to .mov, .mkv or .webm (--format mov)"
            )
        if "libx264" in av.codecs_available:
            return "libx264", "yuv420p", {"crf": "18"}  # near-transparent quality; masks compress well anyway
        return "mpeg4", "yuv420p", {"b": "8M"}  # its default 200 kb/s smears mask edges
    if container == "mov":
        return "png", {"mask": "gray", "cutout": "rgba", "composite": "rgb24"}[kind], {}
    if container == "mkv":
        return "ffv1", {"mask": "gray", "cutout": "bgra", "composite": "bgr0"}[kind], {}
    if container == "webm":
        if "libvpx-vp9" not in av.codecs_available:
            raise ConfigError("this PyAV build has no VP9 encoder (libvpx-vp9) for .webm: use .mov or .mkv")
        # constant quality (b=0 + crf) instead of libvpx's low default bit rate
        return "libvpx-vp9", "yuva420p" if kind == "cutout" else "yuv420p", {"crf": "30", "b": "0", "row-mt": "1"}
    raise ConfigError(f"unknown video format {container!r} (choose from: {', '.join(CONTAINERS)})")


def container_of(path: Path) -> str | None:
    """``mp4`` for ``x.MP4``; None when the suffix is not a video container we write."""
    suffix = path.suffix.lower().lstrip(".")
    return suffix if suffix in CONTAINERS else None


def plan_outputs(
    inputs: list[Path], out: Path, kinds: tuple[str, ...], fmt: str | None = None
) -> list[tuple[Path, dict[str, Path]]]:
    """(input, {kind: output path}) for every input, checking every (container, kind) pair.

    ``out`` is one file when there is one input and it has a video suffix (with several
    kinds, ``name_cutout.ext`` and ``name_composite.ext`` go beside it); otherwise a folder
    where each input gives ``stem{_kind}.{format}``.
    """
    if fmt is not None and fmt not in CONTAINERS:
        raise ConfigError(f"unknown --format {fmt!r} (choose from: {', '.join(CONTAINERS)})")
    out_container = None if out.is_dir() else container_of(out)
    plans: list[tuple[Path, dict[str, Path]]] = []
    if out_container is not None:
        if len(inputs) > 1:
            raise ConfigError(f"{len(inputs)} inputs need --out to be a folder, not the file {out}")
        if fmt is not None and fmt != out_container:
            raise ConfigError(f"--format {fmt} disagrees with --out {out.name}")
        if len(kinds) == 1:
            targets = {kinds[0]: out}
        else:
            targets = {kind: out.with_name(f"{out.stem}{SUFFIXES[kind]}{out.suffix}") for kind in kinds}
        plans.append((inputs[0], targets))
    else:
        for source in inputs:
            plans.append(
                (
                    source,
                    {kind: out / f"{source.stem}{SUFFIXES[kind]}.{fmt or DEFAULT_CONTAINER[kind]}" for kind in kinds},
                )
            )
    seen: dict[Path, Path] = {}
    sources = {source.resolve() for source in inputs}
    for source, targets in plans:
        for kind, target in targets.items():
            encoder_for(container_of(target) or "", kind)  # refuse e.g. a cut-out to .mp4 before any work
            key = target.resolve()
            if key in sources:
                raise ConfigError(f"the output {target} would overwrite an input")
            if key in seen:
                raise ConfigError(
                    f"{seen[key]} and {source} would both write {target}: "
                    "give them different names or run them separately"
                )
            seen[key] = source
    return plans


# ---------------------------------------------------------------- reading


def frame_rate(stream: Any) -> Fraction:
    """The input's average frame rate, kept by the output (a VFR input comes out constant)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise VideoError("the video has no frame rate")
    # MPEG-4 part 2 caps the time base denominator at 65535; 30000/1001 etc. stay exact
    return Fraction(rate).limit_denominator(65535)


def _duration_seconds(container: Any, stream: Any) -> float | None:
    """How long the header says the video stream is, if it says."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")  # Matroska / WebM write one per stream
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            pass
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE; only trusted when nothing else is in the file
    return None


def expected_frames(container: Any, stream: Any, rate: Fraction) -> int | None:
    """Frames the header promises (duration × rate, else its frame count); None if unknown."""
    seconds = _duration_seconds(container, stream)
    if seconds:
        return round(seconds * rate)
    return stream.frames or None


def check_complete(source: Path, decoded: int, expected: int | None) -> None:
    """Refuse a video that ended early: streamable containers (mkv, webm) cut short decode
    without any error, so the shortfall against the header is the only sign."""
    if decoded == 0:
        raise VideoError(f"{source}: no frame could be decoded")
    if expected and expected - decoded > max(1, expected // 100):  # rounding of duration × rate
        raise VideoError(
            f"{source} is truncated: it ends after {decoded} of the {expected} frames its header "
            "promises; no output kept"
        )


# ---------------------------------------------------------------- writing


class VideoWriter:
    """One output video, encoded to a hidden temp file beside ``target`` and renamed by
    ``finish`` only when complete; ``abort`` removes the temp file."""

    def __init__(self, target: Path, kind: str, rate: Fraction, width: int, height: int):
        av = import_av()
        container = container_of(target)
        codec, pix_fmt, codec_options = encoder_for(container or "", kind)
        if pix_fmt.startswith("yuv") and (width % 2 or height % 2) and codec != "libvpx-vp9":
            raise VideoError(
                f"cannot write {target}: the frames are {width}×{height} and {codec} in .{container} "
                "needs an even width and height; write .mkv or .mov"
            )
        self.target = target
        self.tmp = target.with_name(f".{target.name}.tmp")
        self.count = 0
        self.output = None
        try:
            self.output = av.open(str(self.tmp), "w", format=_MUXERS[container or ""])
            self.stream = self.output.add_stream(codec, rate=rate, options=codec_options)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
        except (av.error.FFmpegError, OSError) as exc:
            self.abort()
            raise VideoError(f"cannot write {target}: {_reason(exc)}") from None

    def write(self, image: Image.Image) -> None:
        frame = import_av().VideoFrame.from_ndarray(np.asarray(image), format=_PIL_TO_AV[image.mode])
        frame.pts = self.count  # in 1/rate units: the encoder's time base
        self.count += 1
        with self._errors():
            self.output.mux(self.stream.encode(frame))

    def finish(self) -> None:
        """Flush the encoder, close the file and rename it into place."""
        with self._errors():
            self.output.mux(self.stream.encode())  # no frame: drain the encoder's delayed frames
            self.output.close()
            self.tmp.replace(self.target)

    def abort(self) -> None:
        try:
            if self.output is not None:
                self.output.close()
        except Exception:  # the file is going anyway; the first error is the one to report
            pass
        self.tmp.unlink(missing_ok=True)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Encoder, muxer and disk errors as one VideoError naming the output."""
        av = import_av()
        try:
            yield
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot write {self.target}: {_reason(exc)}") from None


# ---------------------------------------------------------------- the pipeline


class Smoother:
    """Exponential moving average of the maps, m_t = A·m_{t−1} + (1−A)·raw_t: damps the
    frame-to-frame flicker of a per-image model. A = 0 is off."""

    def __init__(self, amount: float = 0.0):
        if not 0.0 <= amount < 1.0:  # also refuses NaN
            raise ConfigError(f"--smooth must be in [0, 1) (0 = off), got {amount}")
        self.amount = amount
        self.previous: np.ndarray | None = None

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.amount == 0.0 or self.previous is None or self.previous.shape != raw.shape:
            smoothed = raw
        else:
            smoothed = self.amount * self.previous + (1.0 - self.amount) * raw
        self.previous = smoothed
        return smoothed


@dataclass
class VideoResult:
    source: Path
    outputs: list[Path]
    frames: int
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. matting skipped on some frames

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class VideoReport:
    done: list[VideoResult] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # with a one-line reason
    resumed: list[Path] = field(default_factory=list)  # skipped: their outputs exist

    @property
    def written(self) -> list[Path]:
        return [path for result in self.done for path in result.outputs]


def process_video(
    segmenter: Segmenter,
    source: Path,
    targets: dict[str, Path],
    options: OutputOptions | None = None,
    smooth: float = 0.0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = False,
) -> VideoResult:
    """Decode ``source``, segment its frames in batches, encode one video per kind in
    ``targets``. Raises VideoError if the video is unusable; whatever the error, no output
    file or temp file is left behind."""
    av = import_av()
    options = options or OutputOptions(kinds=tuple(targets))
    smoother = Smoother(smooth)
    started = time.perf_counter()
    if source.is_file() and source.stat().st_size == 0:
        raise VideoError(f"{source} is empty (0 bytes)")
    try:
        container = av.open(str(source))
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"cannot open video {source} (corrupt, cut short or not a video): {_reason(exc)}") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{source} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        if max_pixels and width * height > max_pixels:
            raise VideoError(
                f"{source} is {width}×{height} = {width * height:,} pixels per frame, over the "
                f"limit of {max_pixels:,} (raise it with --max-pixels)"
            )
        rate = frame_rate(stream)
        expected = expected_frames(container, stream, rate)
        writers: dict[str, VideoWriter] = {}
        notes: set[str] = set()

        def run(batch: list[np.ndarray]) -> None:
            for image, raw in zip(batch, segmenter.maps(batch)):
                rendered = render(image, smoother(raw), options)
                notes.update(rendered.notes)
                for kind, target in targets.items():
                    if kind not in writers:  # opened on the first frame: a portrait crop sets the size
                        writers[kind] = VideoWriter(target, kind, rate, image.shape[1], image.shape[0])
                    writers[kind].write(rendered.images[kind])

        from tqdm import tqdm

        try:
            batch: list[np.ndarray] = []
            decoded = 0
            with tqdm(total=expected, desc=source.name, unit="frame", disable=not progress) as bar:
                for frame in _decode(av, container, stream, source):
                    batch.append(segmenter.prepare(frame))
                    decoded += 1
                    if len(batch) == segmenter.batch_size:
                        run(batch)
                        bar.update(len(batch))
                        batch = []
                if batch:
                    run(batch)
                    bar.update(len(batch))
            check_complete(source, decoded, expected)
            for writer in writers.values():
                writer.finish()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
    return VideoResult(
        source, [w.target for w in writers.values()], decoded, time.perf_counter() - started, sorted(notes)
    )


def _decode(av: Any, container: Any, stream: Any, source: Path):
    """Upright frames as float RGB (H, W, 3) in [0, 1]; a decoding error names how far it got.
    The outputs carry no display rotation, so the frames are turned as a player would show them."""
    count = 0
    try:
        for frame in container.decode(stream):
            pixels = frame.to_ndarray(format="rgb24")
            quarter_turns = round((getattr(frame, "rotation", 0) or 0) / 90)  # counter-clockwise
            yield np.rot90(pixels, quarter_turns).astype(np.float32) / 255.0
            count += 1
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(
            f"{source} is corrupt or truncated: decoding failed after {count} frame(s) ({_reason(exc)}); no output kept"
        ) from None


def _reason(exc: Exception) -> str:
    """PyAV's message without the file name it appends."""
    return getattr(exc, "strerror", None) or str(exc)


def process_videos(
    segmenter: Segmenter,
    plans: list[tuple[Path, dict[str, Path]]],
    options: OutputOptions,
    smooth: float = 0.0,
    resume: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    on_done: Callable[[VideoResult], None] | None = None,
) -> VideoReport:
    """Every planned video in turn; a bad one is reported and skipped, the rest go on."""
    report = VideoReport()
    for source, targets in plans:
        if resume and all(t.is_file() for t in targets.values()):
            report.resumed.append(source)
            continue
        try:
            result = process_video(segmenter, source, targets, options, smooth, max_pixels, progress)
        except VideoError as exc:
            report.failed.append((source, one_line(exc)))
            continue
        report.done.append(result)
        if on_done is not None:
            on_done(result)
    return report
