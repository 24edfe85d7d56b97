"""Dynamic batching for a service: concurrent requests share one engine call.

The first image to arrive opens a batch; the batch closes when it holds ``max_batch`` images
or ``max_wait_s`` after it opened, whichever comes first, and runs as one call on a single
engine thread, so the event loop keeps accepting and decoding requests meanwhile. Each request
gets its own map back (or the engine's error); a request whose client went away is dropped from
the answers without disturbing the others. ``close()`` stops new requests and finishes the ones
already queued (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from u2zoo.errors import ConfigError, U2ZooError
from u2zoo.runtime.pipeline import Predictor
from u2zoo.tasks.engine import Segmenter

RunBatch = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


class BatcherClosed(U2ZooError):
    """The service is shutting down: no new requests."""


@dataclass(frozen=True)
class BatchChoice:
    max_batch: int
    note: str | None = None  # why it is not what was asked, when it is not


def choose_max_batch(predictor: Predictor, asked: int) -> BatchChoice:
    """The largest batch this predictor takes, up to ``asked``: a static-batch artifact runs its
    own batch (usually 1), a bounded one (TensorRT profile, AOTI range) at most its maximum."""
    if asked < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {asked}")
    fixed = predictor.fixed_batch
    if fixed is not None and fixed != asked:
        return BatchChoice(fixed, f"static-batch artifact: batches of {fixed} (convert with --dynamic to batch)")
    limit = getattr(predictor, "max_batch", None)
    if limit is not None and asked > limit:
        return BatchChoice(limit, f"this artifact takes at most {limit} images per call")
    return BatchChoice(asked)


class DynamicBatcher:
    """``await batcher.submit(image)`` → that image's map, batched with its neighbours in time."""

    def __init__(self, run_batch: RunBatch, max_batch: int, max_wait_s: float):
        if max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ConfigError(f"--max-wait-ms must be ≥ 0, got {max_wait_s * 1000:g}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batch_sizes: Counter[int] = Counter()  # for metrics: how full the calls were
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self._engine = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="u2zoo-engine")
        self._task: asyncio.Task | None = None
        self._closing = False
        self.note: str | None = None  # why max_batch is not what was asked, when it is not
        self.on_batch: Callable[[int], None] | None = None  # told each engine call's batch size

    @classmethod
    def for_segmenter(cls, segmenter: Segmenter, max_batch: int, max_wait_s: float) -> "DynamicBatcher":
        """Batches of images through ``segmenter``: its contract, one engine call per batch."""
        choice = choose_max_batch(segmenter.predictor, max_batch)
        segmenter.batch_size = choice.max_batch
        return cls(segmenter.maps, choice.max_batch, max_wait_s)

    @classmethod
    def for_network_inputs(cls, segmenter: Segmenter, max_batch: int, max_wait_s: float) -> "DynamicBatcher":
        """Batches of already pre-processed inputs (``segmenter.network_input``) → raw network
        outputs: the engine thread runs only the engine, the callers resize in their own threads."""
        choice = choose_max_batch(segmenter.predictor, max_batch)
        segmenter.batch_size = choice.max_batch

        def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
            return list(segmenter.run_inputs(np.stack(inputs)))

        batcher = cls(run, choice.max_batch, max_wait_s)
        batcher.note = choice.note
        return batcher

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    async def submit(self, image: np.ndarray) -> np.ndarray:
        if self._closing:
            raise BatcherClosed("the service is shutting down")
        self.start()
        answer = asyncio.get_running_loop().create_future()
        await self._queue.put((image, answer))
        return await answer

    async def close(self) -> None:
        """No new requests; the queued ones are answered, then the engine thread ends."""
        self._closing = True
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._engine.shutdown(wait=True)

    async def __aenter__(self) -> "DynamicBatcher":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """One batch: the first request, then whatever arrives before it is full or its time is up."""
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(image, answer) for image, answer in batch if not answer.done()]  # client gone: skip
            try:
                if live:
                    maps = await loop.run_in_executor(self._engine, self.run_batch, [image for image, _ in live])
                    self.batch_sizes[len(live)] += 1
                    if self.on_batch is not None:
                        self.on_batch(len(live))
                    for (_, answer), prob in zip(live, maps):
                        if not answer.done():
                            answer.set_result(prob)
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets the engine's error
                for _, answer in live:
                    if not answer.done():
                        answer.set_exception(exc)
            finally:
                for _ in batch:
                    self._queue.task_done()
