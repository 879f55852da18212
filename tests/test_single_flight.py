"""Single flight (spec §1.11, checklist 28 and 29) through ``Service`` on the fake engine."""

from __future__ import annotations

import asyncio
import threading

from promptcache.core.response import ChatResult
from promptcache.engine.fake import FakeEngine
from tests.conftest import chat, collect, make_service, run_async, text, words

SYSTEM = words(3000, 11)


def request() -> object:
    return chat(("user", [text("question")]), system=[text(SYSTEM, "5m")])


def test_eight_concurrent_identical_requests_prefill_the_prefix_once() -> None:
    engine = FakeEngine()
    service = make_service(engine)

    async def body() -> list[ChatResult]:
        return list(await asyncio.gather(*(collect(service.generate(request())) for _ in range(8))))  # type: ignore[arg-type]

    results = run_async(service, body)
    writes = [r for r in results if r.usage.written_total > 0]
    reads = [r for r in results if r.usage.read_tokens > 0]
    assert len(writes) == 1 and len(reads) == 7
    offset = writes[0].usage.written_total
    assert all(r.usage.read_tokens == offset for r in reads)
    n = results[0].usage.prompt_tokens
    assert engine.num_prefill_tokens_total == n + 7 * (n - offset)
    assert len({tuple(r.content) for r in results}) == 1
    assert len(service.inflight) == 0


def test_cancelled_writer_hands_over_to_a_waiter() -> None:
    gate = threading.Event()
    engine = FakeEngine(prefill_gate=gate)
    service = make_service(engine)

    async def body() -> ChatResult:
        writer = asyncio.create_task(collect(service.generate(request())))  # type: ignore[arg-type]
        while len(service.inflight) == 0:  # the writer has planned and registered its key
            await asyncio.sleep(0)
        waiter = asyncio.create_task(collect(service.generate(request())))  # type: ignore[arg-type]
        for _ in range(20):  # let the waiter plan and start waiting
            await asyncio.sleep(0)
        assert not waiter.done()
        writer.cancel()
        gate.set()
        return await waiter

    result = run_async(service, body)
    assert result.usage.written_total > 0 and result.usage.read_tokens == 0
    assert len(service.inflight) == 0


def test_failed_writer_releases_waiters() -> None:
    engine = FakeEngine(fail_after_prefill=False)
    service = make_service(engine)
    # A writer whose engine step raises before prefill: the worker reports the error.
    original = engine.generate
    calls = {"n": 0}

    def flaky(req):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("engine down")
        return original(req)

    engine.generate = flaky  # type: ignore[method-assign]

    async def body() -> list[object]:
        return list(
            await asyncio.gather(
                *(collect(service.generate(request())) for _ in range(2)),  # type: ignore[arg-type]
                return_exceptions=True,
            )
        )

    first, second = run_async(service, body)
    assert isinstance(first, Exception)
    assert isinstance(second, ChatResult) and second.usage.written_total > 0
