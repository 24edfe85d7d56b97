"""Dynamic batching: concurrent requests share engine calls, each gets its own answer."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from u2zoo.errors import ConfigError
from u2zoo.tasks.batcher import BatcherClosed, DynamicBatcher, choose_max_batch


class Recorder:
    """A fake engine: each image's map is its own mean, so answers can be told apart; it waits
    on ``gate`` (when given) so a test can pile requests up behind a running call."""

    def __init__(self, gate: threading.Event | None = None, fail_on: float | None = None):
        self.calls: list[int] = []
        self.gate = gate
        self.fail_on = fail_on

    def __call__(self, images):
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append(len(images))
        if self.fail_on is not None and any(float(i.mean()) == self.fail_on for i in images):
            raise RuntimeError("engine exploded")
        return [np.full((2, 2), float(i.mean()), np.float32) for i in images]


def image(value: float) -> np.ndarray:
    return np.full((4, 4, 3), value, np.float32)


def test_concurrent_requests_share_calls_and_each_gets_its_own_map():
    async def main():
        gate = threading.Event()
        engine = Recorder(gate)
        async with DynamicBatcher(engine, max_batch=4, max_wait_s=0.05) as batcher:
            first = asyncio.ensure_future(batcher.submit(image(0.0)))  # opens a call, held at the gate
            await asyncio.sleep(0.1)
            rest = [asyncio.ensure_future(batcher.submit(image(v))) for v in (1, 2, 3, 4, 5, 6, 7, 8)]
            await asyncio.sleep(0.05)
            gate.set()
            results = await asyncio.gather(first, *rest)
        return engine, batcher, results

    engine, batcher, results = asyncio.run(main())
    assert [float(r[0, 0]) for r in results] == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # each its own answer
    assert engine.calls == [1, 4, 4]  # the 8 that queued behind the first call went in 2 full batches
    assert batcher.batch_sizes == {1: 1, 4: 2}


def test_a_lone_request_is_answered_after_the_wait_without_a_full_batch():
    async def main():
        engine = Recorder()
        async with DynamicBatcher(engine, max_batch=16, max_wait_s=0.01) as batcher:
            return engine, await batcher.submit(image(0.5))

    engine, result = asyncio.run(main())
    assert engine.calls == [1] and float(result[0, 0]) == 0.5


def test_an_engine_error_reaches_every_request_of_its_batch_and_the_batcher_goes_on():
    async def main():
        gate = threading.Event()
        engine = Recorder(gate, fail_on=3.0)
        async with DynamicBatcher(engine, max_batch=2, max_wait_s=0.05) as batcher:
            head = asyncio.ensure_future(batcher.submit(image(1.0)))
            await asyncio.sleep(0.1)
            bad = [asyncio.ensure_future(batcher.submit(image(v))) for v in (2.0, 3.0)]
            await asyncio.sleep(0.05)
            gate.set()
            outcomes = await asyncio.gather(head, *bad, return_exceptions=True)
            after = await batcher.submit(image(4.0))
        return outcomes, after

    outcomes, after = asyncio.run(main())
    assert float(outcomes[0][0, 0]) == 1.0
    assert all(isinstance(o, RuntimeError) and "exploded" in str(o) for o in outcomes[1:])
    assert float(after[0, 0]) == 4.0


def test_a_client_that_goes_away_does_not_disturb_the_others():
    async def main():
        gate = threading.Event()
        engine = Recorder(gate)
        async with DynamicBatcher(engine, max_batch=4, max_wait_s=0.05) as batcher:
            head = asyncio.ensure_future(batcher.submit(image(1.0)))
            await asyncio.sleep(0.1)
            gone = asyncio.ensure_future(batcher.submit(image(2.0)))
            kept = asyncio.ensure_future(batcher.submit(image(3.0)))
            await asyncio.sleep(0.01)
            gone.cancel()
            gate.set()
            return engine, await head, await kept

    engine, head, kept = asyncio.run(main())
    assert float(head[0, 0]) == 1.0 and float(kept[0, 0]) == 3.0
    assert engine.calls == [1, 1]  # the cancelled request was not run


def test_close_answers_what_is_queued_then_refuses_new_requests():
    async def main():
        gate = threading.Event()
        batcher = DynamicBatcher(Recorder(gate), max_batch=2, max_wait_s=0.01)
        pending = [asyncio.ensure_future(batcher.submit(image(v))) for v in (1.0, 2.0, 3.0)]
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        gate.set()
        await closing
        answers = [float(p.result()[0, 0]) for p in pending]
        with pytest.raises(BatcherClosed):
            await batcher.submit(image(4.0))
        return answers

    assert asyncio.run(main()) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("max_batch, wait, pattern", [(0, 0.01, "--max-batch must be at least 1"), (4, -1, "≥ 0")])
def test_bad_settings_are_config_errors(max_batch, wait, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DynamicBatcher(Recorder(), max_batch, wait)


class FakePredictor:
    def __init__(self, fixed_batch=None, max_batch=None):
        self.fixed_batch, self.max_batch, self.fixed_size = fixed_batch, max_batch, None


def test_the_batch_follows_what_the_artifact_takes():
    assert choose_max_batch(FakePredictor(), 8).max_batch == 8
    static = choose_max_batch(FakePredictor(fixed_batch=1), 8)
    assert static.max_batch == 1 and "static-batch artifact" in static.note
    bounded = choose_max_batch(FakePredictor(max_batch=4), 8)
    assert bounded.max_batch == 4 and "at most 4" in bounded.note
    with pytest.raises(ConfigError):
        choose_max_batch(FakePredictor(), 0)


def test_batched_maps_equal_one_by_one_maps_on_a_real_model():
    """Mixed image sizes through the contract, batched, give the maps of one call per image."""
    from u2zoo.tasks.engine import Segmenter
    from u2zoo.zoo.reference import TorchPredictor
    from u2zoo.zoo.weights import load_model

    model, _, contract = load_model("u2net-tiny", random_weights=True, progress=False)
    rng = np.random.default_rng(0)
    images = [rng.random((h, w, 3)).astype(np.float32) for h, w in ((40, 56), (64, 64), (30, 90), (50, 20))]
    single = [Segmenter(TorchPredictor(model, threads=1), contract).maps([i])[0] for i in images]

    async def main():
        segmenter = Segmenter(TorchPredictor(model, threads=1), contract)
        async with DynamicBatcher.for_segmenter(segmenter, max_batch=4, max_wait_s=0.05) as batcher:
            maps = await asyncio.gather(*(batcher.submit(i) for i in images))
        return maps, batcher

    maps, batcher = asyncio.run(main())
    assert sum(batcher.batch_sizes.values()) < len(images)  # some calls were shared
    for got, want, img in zip(maps, single, images):
        assert got.shape == img.shape[:2] and np.abs(got - want).max() < 1e-5
