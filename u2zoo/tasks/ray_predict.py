"""``u2zoo predict --engine ray``: the folder pipeline on a Ray cluster, through Ray Data.

The driver lists the inputs (local files and folders as ``u2zoo predict`` does, or any fsspec
URL), names every output as the local engine would (``collect_inputs``, ``unique_stems``,
``output_paths``), drops what ``resume`` finds done, and hands Ray Data a dataset of paths.
A fixed pool of actors, each holding one loaded Segmenter, reads, segments, renders and writes
a few images per task and returns one small row per image (what went wrong, if anything).

Outputs are written through a temp name unique to the writer and renamed (``save_png``), so a
target is complete or absent. An actor that dies mid-task is restarted and the task is redone
by Ray (``max_restarts``/``max_task_retries`` -1: Ray Data 2.60's defaults for actor pools, which
it now deprecates passing by hand): its outputs are written again under the same names, none is
lost, none doubled; the temp files a killed writer left are removed at the end. ``--out`` must
be a folder every node can reach (on one machine any folder; on a cluster a shared file system),
and so must local inputs and the artifact; fsspec URLs are read by the actors themselves.

Ray is imported only here, only when the engine runs: ``import u2zoo`` stays fast without it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import threading
import time
from contextlib import ExitStack, redirect_stdout
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from u2zoo.errors import BackendUnavailable, ConfigError, ImageError, U2ZooError, one_line, tool_failure
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.folder import collect_inputs, output_paths, save_png, unique_stems, write_error
from u2zoo.tasks.loading import load_segmenter
from u2zoo.tasks.outputs import SUFFIXES, OutputOptions, render
from u2zoo.zoo.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, decode_image, load_rgb, shown

# A TCP connection to --address must open within this: an unreachable cluster is one line, fast.
CONNECT_TIMEOUT_S = 5.0
# ray.init on a reachable address (something accepts the connection: a port that is no Ray
# head, or a network proxy that accepts everything) must return within this, where it would
# otherwise retry for minutes.
INIT_TIMEOUT_S = 30.0
# Images per Ray task: enough to amortise the task's overhead, few enough to balance the
# actors at the end of a job and to redo little when an actor dies.
IMAGES_PER_TASK = 8
# Tasks queued on one actor: one running, one waiting with its input already there.
TASKS_IN_FLIGHT_PER_ACTOR = 2
# What save_png names its temp files (u2zoo.tasks.folder.temp_path): the target's name inside.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.\d+-[0-9a-f]{8}\.tmp$")
_RAY_LOGGERS = ("ray", "ray.data")
# Ray Data says on every run that its progress bars are off (ours is on unless -q)
_RAY_PROGRESS_LOGGER = "ray.data._internal.progress"


@dataclass(frozen=True)
class ModelSpec:
    """What each actor loads (picklable): ``load_segmenter``'s arguments."""

    model: str | None = None
    artifact: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    random_weights: bool = False
    contract: str | None = None
    threads: int | None = None
    batch_size: int = 1

    def open(self) -> Segmenter:
        return load_segmenter(
            self.model,
            artifact=self.artifact,
            weights=self.weights,
            weights_sha256=self.weights_sha256,
            random_weights=self.random_weights,
            contract=self.contract,
            threads=self.threads,
            batch_size=self.batch_size,
        )


@dataclass(frozen=True)
class ActorPool:
    """How many actors, and what each reserves. ``num_actors`` None: as many as the cluster's
    CPUs (and GPUs, when asked for) hold."""

    num_actors: int | None = None
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"--num-actors must be at least 1, got {self.num_actors}")
        if not (math.isfinite(self.cpus) and self.cpus > 0):
            raise ConfigError(f"--actor-cpus must be a number above 0, got {self.cpus:g}")
        if not (math.isfinite(self.gpus) and self.gpus >= 0):
            raise ConfigError(f"--actor-gpus must be a number above 0, got {self.gpus:g}")

    def size(self, resources: dict[str, float]) -> int:
        fits = int(resources.get("CPU", 0) // self.cpus)
        if self.gpus:
            fits = min(fits, int(resources.get("GPU", 0) // self.gpus))
        return self.num_actors or max(fits, 1)

    def default_threads(self) -> int:
        """Intra-op threads of one actor's runtime: its CPU share (a runtime left to its own
        default takes every core of the node, however many actors share them)."""
        return max(1, int(self.cpus))


@dataclass
class RayReport:
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    processed: int = 0
    seconds: float = 0.0  # the Ray Data job: first task submitted to last row back
    startup_seconds: float = 0.0  # importing Ray and starting or joining the cluster
    engine_seconds: float = 0.0  # inside the runtime, summed over the actors
    num_actors: int = 0
    threads: int = 0
    temps_removed: int = 0
    cluster: str = ""  # which: the address, a local instance started here, or the one already connected

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")


class UrlInput(str):
    """An fsspec URL among the inputs; ``suffix`` and ``name`` as a path's, for ``unique_stems``."""

    @property
    def suffix(self) -> str:
        return PurePosixPath(urlsplit(self).path).suffix

    @property
    def name(self) -> str:
        return PurePosixPath(urlsplit(self).path).name


def import_ray() -> Any:
    """Ray with Ray Data, or the one line that says how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BackendUnavailable("--engine ray needs Ray Data, which is not installed", extra="ray") from None
    return ray


def is_url(item: str | Path) -> bool:
    return isinstance(item, str) and "://" in item


def open_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path in it; a protocol whose package is not
    installed (``s3://`` without s3fs) or that fsspec does not know is one line naming it."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        known = known_implementations.get(protocol, {})
        package = known.get("class", "").split(".")[0] or str(exc)
        raise ConfigError(
            f"cannot read {shown(url)}: fsspec's {protocol}:// file system needs the {package} package, "
            f"which is not installed (pip install {package})"
        ) from None
    except ValueError:
        raise ConfigError(f"cannot read {shown(url)}: fsspec knows no {protocol}:// file system") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError, OSError) as exc:
        raise ConfigError(f"cannot open {shown(url)}: {tool_failure(exc)}") from None


def collect_sources(
    inputs: list[str | Path], out_dir: Path | None = None
) -> tuple[list[tuple[Path | UrlInput, Path]], list[str]]:
    """``collect_inputs`` for local paths, the same rules for fsspec URLs (a folder is walked,
    hidden parts skipped, image suffixes only): (input, output stem) pairs and the non-images."""
    images: list[tuple[Path | UrlInput, Path]] = []
    others: list[str] = []
    for item in inputs:
        if not is_url(item):
            found, skipped = collect_inputs([item], out_dir)
            images.extend(found)
            others.extend(map(str, skipped))
            continue
        fs, root = open_filesystem(str(item))
        try:
            if fs.isdir(root):
                root = root.rstrip("/")
                for path in sorted(fs.find(root, detail=False)):
                    relative = PurePosixPath(path[len(root) :].lstrip("/"))
                    if any(part.startswith(".") for part in relative.parts):
                        continue
                    url = UrlInput(fs.unstrip_protocol(path))
                    if relative.suffix.lower() in IMAGE_SUFFIXES:
                        images.append((url, Path(relative.with_suffix(""))))
                    else:
                        others.append(url)
            elif fs.isfile(root):
                images.append((UrlInput(fs.unstrip_protocol(root)), Path(PurePosixPath(root).stem)))
            else:
                raise ImageError(f"input not found: {shown(item)}")
        except (OSError, ValueError) as exc:  # credentials, a bucket that is not there, …
            raise ConfigError(f"cannot list {shown(item)}: {tool_failure(exc)}") from None
    return images, others


def read_image(source: str, url: bool, max_pixels: int | None) -> np.ndarray:
    """An input as (H, W, 3) float RGB: a local file through ``load_rgb``, a URL through fsspec."""
    if not url:
        return load_rgb(source, max_pixels)
    import fsspec

    try:
        with fsspec.open(source, "rb") as fh:
            data = fh.read()
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read {shown(source)}: {tool_failure(exc)}") from None
    return decode_image(data, max_pixels, what=f"image {shown(source)}")


class SegmentWriter:
    """One Ray actor: one loaded Segmenter; each call reads, segments, renders and writes a few
    inputs and returns one row per input."""

    def __init__(self, spec: ModelSpec, out_dir: str, options: OutputOptions, max_pixels: int | None):
        self.segmenter = spec.open()
        self.out_dir, self.options, self.max_pixels = Path(out_dir), options, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        sources, stems, urls = list(batch["src"]), list(batch["stem"]), list(batch["url"])
        errors = [""] * len(sources)
        notes = [""] * len(sources)
        written = [0] * len(sources)
        loaded: list[tuple[int, np.ndarray]] = []
        for i, (source, url) in enumerate(zip(sources, urls)):
            try:
                loaded.append((i, self.segmenter.prepare(read_image(str(source), bool(url), self.max_pixels))))
            except U2ZooError as exc:
                errors[i] = one_line(exc)
        before = self.segmenter.engine_seconds
        maps = self.segmenter.maps([image for _, image in loaded]) if loaded else []
        engine = self.segmenter.engine_seconds - before
        for (i, image), prob in zip(loaded, maps):
            rendered = render(image, prob, self.options)
            notes[i] = "\n".join(rendered.notes)
            try:
                for kind, target in output_paths(self.out_dir, Path(str(stems[i])), self.options).items():
                    save_png(rendered.images[kind], target)
                    written[i] += 1
            except OSError as exc:
                errors[i] = write_error(target, exc)
        engine_share = [0.0] * len(sources)
        for i, _ in loaded:
            engine_share[i] = engine / len(loaded)
        return {
            "src": [str(s) for s in sources],
            "error": errors,
            "notes": notes,
            "written": written,
            "engine_s": engine_share,
        }

    def __del__(self) -> None:
        segmenter = getattr(self, "segmenter", None)
        if segmenter is not None:
            segmenter.close()


def check_reachable(address: str, timeout: float | None = None) -> None:
    """A TCP connection to the host:port of ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``)
    opens within ``timeout`` (default ``CONNECT_TIMEOUT_S``), or one line says why not;
    ``auto`` is left to Ray."""
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if parts.scheme not in ("", "ray") or not host or port is None:
        raise ConfigError(f"--address takes HOST:PORT, ray://HOST:PORT or auto, got {shown(address)!r}")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise ConfigError(f"cannot reach the Ray cluster at {shown(address)}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {shown(address)}: {exc.strerror or exc}") from None


def _join_cluster(ray: Any, address: str, timeout: float) -> None:
    """``ray.init(address)``, given up after ``timeout`` (it retries for minutes on a port that
    is no Ray head). The thread is left behind on a timeout: the command is ending anyway."""
    outcome: dict[str, BaseException] = {}

    def connect() -> None:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="u2zoo-ray-init", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ConfigError(
            f"cannot reach the Ray cluster at {shown(address)}: it accepted a connection but no Ray "
            f"head answered within {timeout:g} s (the head's GCS port is 6379 unless set, ray:// uses 10001)"
        )
    if "error" in outcome:
        raise ConfigError(f"cannot join the Ray cluster at {shown(address)}: {tool_failure(outcome['error'])}")


def _start_local(ray: Any) -> None:
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,  # not its note on token authentication, for a cluster of this process
    )


def _check_fits(pool: ActorPool, size: int, resources: dict[str, float], local: bool) -> None:
    """Refuse a pool a local cluster cannot hold (Ray Data would wait for it for ever); on a
    remote one only warn: an autoscaling cluster adds nodes for it."""
    wants = [("CPU", pool.cpus, "--actor-cpus"), ("GPU", pool.gpus, "--actor-gpus")]
    for resource, each, flag in wants:
        have = resources.get(resource, 0.0)
        if each and size * each > have + 1e-9:
            message = (
                f"{size} actor(s) × {each:g} {resource} ({flag}) need {size * each:g} {resource}(s); "
                f"the Ray cluster has {have:g}"
            )
            if local:
                raise ConfigError(f"{message} (lower --num-actors or {flag})")
            print(f"u2zoo: warning: {message}; the job waits for the cluster to grow", file=sys.stderr)


class _data_context:
    """Ray Data's context with some fields set for a while (it is the process's)."""

    def __init__(self, ray: Any, **values: Any) -> None:
        self.context, self.values = ray.data.DataContext.get_current(), values
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        for name, value in self.values.items():
            if hasattr(self.context, name):
                self.saved[name] = getattr(self.context, name)
                setattr(self.context, name, value)

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            setattr(self.context, name, value)


def remove_stale_temps(targets: list[Path]) -> int:
    """Delete the temp files ``save_png`` left for ``targets`` (a killed writer's): one listing
    per folder; another process's files are left alone."""
    by_folder: dict[Path, set[str]] = {}
    for target in targets:
        by_folder.setdefault(target.parent, set()).add(target.name)
    removed = 0
    for folder, names in by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if match and match["name"] in names:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


# how a U2ZooError raised in an actor's constructor ends its traceback, which is all Ray keeps
# of it (ActorDiedError holds the message, not the exception)
_OWN_ERROR_LINE = re.compile(r"^u2zoo\.errors\.\w+: (?P<message>.+)$", re.MULTILINE)


def _ray_error(exc: BaseException) -> U2ZooError | None:
    """The U2ZooError an actor raised (its constructor: an artifact missing on a node, …), from
    the chain of Ray's wrappers around it or, failing that, from the traceback in their text."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, U2ZooError):
            return current
        pending.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    lines = _OWN_ERROR_LINE.findall(str(exc))
    return U2ZooError(f"a Ray actor failed: {lines[-1]}") if lines else None


def predict_on_ray(
    spec: ModelSpec,
    inputs: list[str | Path],
    out_dir: Path,
    options: OutputOptions | None = None,
    *,
    address: str | None = None,
    pool: ActorPool | None = None,
    resume: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    quiet: bool = False,
) -> RayReport:
    """Every readable input through a pool of actors on a Ray cluster: the one at ``address``,
    the one this process is already connected to, or a local one started (and stopped) here."""
    from tqdm import tqdm

    options = options or OutputOptions()
    pool = pool or ActorPool()
    started = time.perf_counter()
    ray = import_ray()
    out_dir = Path(out_dir).resolve()
    images, others = collect_sources(inputs, out_dir)
    if not images:
        raise U2ZooError(f"no images found in: {', '.join(map(shown, map(str, inputs)))}")
    images, renamed = unique_stems(images, [SUFFIXES[kind] for kind in options.kinds])  # type: ignore[arg-type]
    report = RayReport(not_images=others, notes=[(str(path), note) for path, note in renamed])
    rows, targets = [], []
    given: dict[str, str] = {}  # what a row's source is called in messages: the input as given
    for source, stem in images:
        outputs = list(output_paths(out_dir, stem, options).values())
        targets.extend(outputs)
        if resume and all(t.is_file() for t in outputs):
            report.resumed.append(str(source))
            continue
        url = isinstance(source, UrlInput)
        where = str(source) if url else os.path.abspath(source)  # the actors' working folder is not ours
        given[where] = str(source)
        rows.append({"src": where, "stem": stem.as_posix(), "url": url})
    if address is not None:
        check_reachable(address)
    if not rows:
        report.startup_seconds = time.perf_counter() - started
        return report

    with ExitStack() as stack:
        stack.enter_context(_loggers_at(*_RAY_LOGGERS, level=logging.ERROR if quiet else logging.WARNING))
        if quiet:  # Ray's C++ core writes its own log lines to stderr, its driver relays the raylet's to stdout
            from u2zoo.quiet import native_output_discarded

            stack.enter_context(native_output_discarded())
            stack.enter_context(redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        if ray.is_initialized():
            report.cluster = "the Ray cluster already connected"
        else:
            if address is None:
                _start_local(ray)
                report.cluster = "a local Ray instance"
            else:
                _join_cluster(ray, address, INIT_TIMEOUT_S)
                report.cluster = address
            stack.callback(ray.shutdown)
        resources = ray.cluster_resources()
        report.num_actors = pool.size(resources)
        _check_fits(pool, report.num_actors, resources, local=address is None)
        report.threads = spec.threads or pool.default_threads()
        spec = replace(spec, threads=report.threads)
        report.startup_seconds = time.perf_counter() - started

        stack.enter_context(_data_context(ray, enable_progress_bars=False, print_on_execution_start=False))
        per_task = max(IMAGES_PER_TASK, spec.batch_size)
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_task)))
        # No max_restarts/max_task_retries here: Ray Data 2.60 gives its actor pools -1/-1 (a dead
        # actor restarts, its tasks are redone), and passing them now is deprecated.
        results = dataset.map_batches(
            SegmentWriter,
            fn_constructor_kwargs={
                "spec": spec,
                "out_dir": str(out_dir),
                "options": options,
                "max_pixels": max_pixels,
            },
            batch_size=per_task,
            compute=ray.data.ActorPoolStrategy(
                size=report.num_actors, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR
            ),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus or None,
        )
        job_started = time.perf_counter()
        try:
            with (
                _loggers_at(_RAY_PROGRESS_LOGGER, level=logging.ERROR),
                tqdm(total=len(rows), desc="predict (ray)", unit="img", disable=not progress) as bar,
            ):
                for row in results.iter_rows():
                    source = given.get(str(row["src"]), str(row["src"]))
                    report.written += int(row["written"])
                    report.engine_seconds += float(row["engine_s"])
                    report.notes.extend((source, note) for note in str(row["notes"]).split("\n") if note)
                    if row["error"]:
                        report.failed.append((source, str(row["error"])))
                    else:
                        report.processed += 1
                    bar.update()
        except Exception as exc:
            own_error = _ray_error(exc)
            if own_error is not None:
                raise own_error from None
            if isinstance(exc, ray.exceptions.RayError):
                raise U2ZooError(f"the Ray job failed: {tool_failure(exc)}") from None
            raise
        finally:
            report.temps_removed = remove_stale_temps(targets)
        report.seconds = time.perf_counter() - job_started
    return report


class _loggers_at:
    """Loggers at ``level`` at least for a while (Ray Data logs every execution at INFO)."""

    def __init__(self, *names: str, level: int) -> None:
        self.names, self.level = names, level
        self.saved: list[tuple[logging.Logger, int]] = []

    def __enter__(self) -> None:
        for name in self.names:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.level))
            logger.setLevel(max(self.level, logger.level))

    def __exit__(self, *exc: object) -> None:
        for logger, level in self.saved:
            logger.setLevel(level)
