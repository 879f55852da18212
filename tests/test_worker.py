from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import pytest

from promptcache.core.request import Sampling
from promptcache.engine.base import EngineEvent, EngineRequest, Prefilled, Stopped, TokenOut
from promptcache.engine.stepper import GeneratorEngine
from promptcache.errors import Overloaded
from promptcache.worker import EngineWorker, Job

Script = Generator[EngineEvent, None, None]


class Scripted(GeneratorEngine):
    """Runs the generator given with each submission (as the request's ``tokens``' owner)."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[int, Script] = {}

    def generate(self, request: EngineRequest) -> Script:
        return self.scripts.pop(request.tokens[0])


ENGINE = Scripted()


def submit(worker: EngineWorker, script: Script) -> Job:
    """Submit ``script`` as one request of ``ENGINE``."""
    key = id(script)
    ENGINE.scripts[key] = script
    return worker.submit(ENGINE, EngineRequest([key], Sampling(max_tokens=1)))


def counting(
    name: str, log: list[str], steps: int, closed: list[str]
) -> Generator[EngineEvent, None, None]:
    try:
        log.append(f"{name}:prefill")
        yield Prefilled({}, 0)
        for i in range(steps):
            log.append(f"{name}:{i}")
            yield TokenOut(i)
        yield Stopped("end_turn")
    finally:
        closed.append(name)


async def drain(job: Job) -> list[EngineEvent]:
    """Every remaining event of ``job``."""
    out = []
    while (event := await job.next()) is not None:
        out.append(event)
    return out


def with_worker(body: Callable[[EngineWorker], Awaitable[None]]) -> None:
    """Run ``body`` against a started worker, stopping it afterwards."""

    async def main() -> None:
        worker = EngineWorker()
        worker.start()
        try:
            await body(worker)
        finally:
            worker.stop()

    asyncio.run(main())


def test_jobs_progress_together_round_robin() -> None:
    log: list[str] = []
    closed: list[str] = []

    async def body(worker: EngineWorker) -> None:
        a = submit(worker, counting("a", log, 3, closed))
        b = submit(worker, counting("b", log, 3, closed))
        ra, rb = await asyncio.gather(drain(a), drain(b))
        assert [type(e) for e in ra] == [Prefilled, TokenOut, TokenOut, TokenOut, Stopped]
        assert len(rb) == 5

    with_worker(body)
    # Neither job ran to completion before the other started: steps interleave.
    assert log.index("b:prefill") < log.index("a:2")
    assert log.index("a:prefill") < log.index("b:2")
    assert sorted(closed) == ["a", "b"]


def test_a_steps_events_reach_the_loop_in_one_wake_up_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All of a step's events for every job are handed to the event loop at once (one
    ``call_soon_threadsafe`` a step, not one an event), each job's still in order, its end
    after its last event."""
    from promptcache import worker as worker_module

    deliveries: list[int] = []
    deliver = worker_module._deliver

    def counted(items: list[tuple[Job, Any]]) -> None:
        deliveries.append(len(items))
        deliver(items)

    monkeypatch.setattr(worker_module, "_deliver", counted)
    log: list[str] = []
    closed: list[str] = []

    async def body(worker: EngineWorker) -> None:
        jobs = [submit(worker, counting(name, log, 4, closed)) for name in "abc"]
        results = await asyncio.gather(*(drain(job) for job in jobs))
        for events in results:
            assert [type(e) for e in events] == [Prefilled] + [TokenOut] * 4 + [Stopped]
            assert [e.token_id for e in events if isinstance(e, TokenOut)] == [0, 1, 2, 3]

    with_worker(body)
    assert sum(deliveries) == 3 * (6 + 1)  # each job's 6 events and its end
    assert max(deliveries) > 1  # several jobs' events in one wake-up


def test_cancel_closes_the_generator_and_stops_work() -> None:
    log: list[str] = []
    closed: list[str] = []

    async def body(worker: EngineWorker) -> None:
        job = submit(worker, counting("a", log, 10_000_000, closed))
        assert isinstance(await job.next(), Prefilled)
        job.cancel()
        await drain(job)

    with_worker(body)
    assert closed == ["a"]
    assert len(log) < 10_000_000


def test_engine_errors_reach_only_their_request() -> None:
    def failing() -> Generator[EngineEvent, None, None]:
        yield Prefilled({}, 0)
        raise RuntimeError("boom")

    async def body(worker: EngineWorker) -> None:
        bad = submit(worker, failing())
        good = submit(worker, counting("g", [], 2, []))
        assert isinstance(await bad.next(), Prefilled)
        with pytest.raises(RuntimeError, match="boom"):
            await bad.next()
        events = await drain(good)
        assert isinstance(events[-1], Stopped)

    with_worker(body)


def test_queue_limit_is_overloaded() -> None:
    async def main() -> None:
        worker = EngineWorker(max_jobs=1)  # not started: jobs stay queued
        submit(worker, counting("a", [], 1, []))
        with pytest.raises(Overloaded):
            submit(worker, counting("b", [], 1, []))

    asyncio.run(main())
