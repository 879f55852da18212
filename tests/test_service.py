"""The caching behaviour of spec §1 and §3.6 through ``Service`` on the fake engine.

Each test names the conformance checklist item (spec §7) it walks.
"""

from __future__ import annotations

import pytest

from promptcache.cache.clock import FakeClock
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatResult, TextOut
from promptcache.engine.fake import FakeEngine
from promptcache.errors import InvalidRequest, PromptTooLong
from promptcache.service import Service
from promptcache.types import TenantId
from tests.conftest import chat, collect, make_config, make_service, run_async, text, words

SYSTEM = words(2000)


def ask(service: Service, *requests: ChatRequest) -> list[ChatResult]:
    async def body() -> list[ChatResult]:
        return [await collect(service.generate(r)) for r in requests]

    return run_async(service, body)


def usage_tuple(result: ChatResult) -> tuple[int, int, int, int, int]:
    u = result.usage
    return (
        u.uncached_tokens,
        u.read_tokens,
        u.written_total,
        u.written_tokens["5m"],
        u.written_tokens["1h"],
    )


def sys_request(question: str = "hi", ttl: str = "5m", **kw: object) -> ChatRequest:
    return chat(("user", [text(question)]), system=[text(SYSTEM, ttl)], **kw)  # type: ignore[arg-type]


def test_no_markers_reads_and_writes_nothing() -> None:  # checklist 1
    service = make_service()
    first, second = ask(service, chat(("user", [text(SYSTEM)])), chat(("user", [text(SYSTEM)])))
    for r in (first, second):
        assert r.usage.read_tokens == 0 and r.usage.written_total == 0
        assert r.usage.uncached_tokens == r.usage.prompt_tokens
    assert len(service.store) == 0


def test_system_breakpoint_write_then_read() -> None:  # checklist 2, 3, 4
    service = make_service()
    first, second = ask(service, sys_request(), sys_request())
    offset = first.usage.written_total
    assert offset > 1024
    assert usage_tuple(first) == (first.usage.prompt_tokens - offset, 0, offset, offset, 0)
    assert usage_tuple(second) == (second.usage.prompt_tokens - offset, offset, 0, 0, 0)
    assert first.content == second.content  # a hit does not change the answer


def test_count_tokens_equals_the_sum_and_touches_nothing() -> None:  # checklist 3, 31
    service = make_service()

    async def body() -> tuple[int, ChatResult]:
        n = await service.count_tokens(sys_request())
        result = await collect(service.generate(sys_request()))
        return n, result

    n, result = run_async(service, body)
    u = result.usage
    assert n == u.uncached_tokens + u.read_tokens + u.written_total
    assert u.written_total > 0  # count_tokens wrote nothing


def test_mixed_ttls_bill_by_three_positions() -> None:  # checklist 11
    service = make_service()
    req = chat(("user", [text(words(1500), "1h"), text(words(600, 3), "5m"), text("q")]))
    (result,) = ask(service, req)
    layout = service.prepare(req).layout
    end_1h, end_5m = layout.blocks[0].end, layout.blocks[1].end
    assert result.usage.written_tokens == {"1h": end_1h, "5m": end_5m - end_1h}


def test_below_minimum_is_skipped_silently() -> None:  # checklist 16
    service = make_service()
    (result,) = ask(service, chat(("user", [text("short", "5m")])))
    assert result.usage.read_tokens == 0 and result.usage.written_total == 0
    assert result.usage.uncached_tokens == result.usage.prompt_tokens


def test_lookback_window_20_blocks() -> None:  # checklist 17
    service = make_service(min_cacheable_tokens=16)
    blocks = [text(f"block {i:02d} " + words(20, i)) for i in range(36)]

    def req(marked: int) -> ChatRequest:
        marked_blocks = [
            text(b.text, "5m") if i == marked else b for i, b in enumerate(blocks[: marked + 1])
        ]
        return chat(("user", marked_blocks))

    first, hit = ask(service, req(15), req(34))
    assert hit.usage.read_tokens == first.usage.written_total > 0
    _, miss = ask(make_service(min_cacheable_tokens=16), req(15), req(35))
    assert miss.usage.read_tokens == 0


def test_second_breakpoint_miss_still_reads_through_first() -> None:  # checklist 18
    service = make_service(min_cacheable_tokens=16)
    base = [text(words(100, i)) for i in range(3)]
    first_req = chat(("user", [base[0], text(base[1].text, "5m")]))
    tail = [text(words(30, 50 + i)) for i in range(25)]
    second_req = chat(
        ("user", [base[0], text(base[1].text, "5m"), *tail[:-1], text(tail[-1].text, "5m")])
    )
    first, second = ask(service, first_req, second_req)
    assert second.usage.read_tokens == first.usage.written_total
    assert second.usage.written_total > 0


def test_changing_a_character_misses() -> None:  # checklist 19
    service = make_service()
    altered = chat(("user", [text("hi")]), system=[text("X" + SYSTEM[1:], "5m")])
    _first, second = ask(service, sys_request(), altered)
    assert second.usage.read_tokens == 0 and second.usage.written_total > 0


def test_hierarchy_tools_then_system_then_messages() -> None:  # checklist 20
    from promptcache.core.request import Block

    def req(tool_desc: str, question: str) -> ChatRequest:
        tool = Block("tool", f'{{"name": "t", "description": "{tool_desc}"}}', name="t")
        return chat(
            ("user", [text(words(1200, 9)), text(question, "5m")]),
            system=[text(SYSTEM, "5m")],
            tools=[tool],
        )

    service = make_service()
    _first, new_question, new_tool = ask(service, req("a", "q1"), req("a", "q2"), req("b", "q1"))
    system_end = service.prepare(req("a", "q1")).layout.blocks[1].end
    assert new_question.usage.read_tokens == system_end  # system entry still hits
    assert new_tool.usage.read_tokens == 0  # a tool change invalidates everything after it


@pytest.mark.parametrize(
    ("ttl", "age", "hits"),
    [("5m", 299, True), ("5m", 301, False), ("1h", 59 * 60, True), ("1h", 61 * 60, False)],
)
def test_ttl_expiry(ttl: str, age: int, hits: bool) -> None:  # checklist 21, 23
    clock = FakeClock()
    service = make_service(clock=clock)

    async def body() -> ChatResult:
        await collect(service.generate(sys_request(ttl=ttl)))
        clock.advance(age)
        return await collect(service.generate(sys_request(ttl=ttl)))

    second = run_async(service, body)
    assert (second.usage.read_tokens > 0) is hits


def test_read_refreshes_ttl() -> None:  # checklist 22
    clock = FakeClock()
    service = make_service(clock=clock)

    async def body() -> list[ChatResult]:
        out = [await collect(service.generate(sys_request()))]
        clock.advance(240)
        out.append(await collect(service.generate(sys_request())))
        clock.advance(240)
        out.append(await collect(service.generate(sys_request())))
        return out

    _, at_4, at_8 = run_async(service, body)
    assert at_4.usage.read_tokens > 0 and at_8.usage.read_tokens > 0


def test_lifetime_counts_from_request_start() -> None:  # checklist 24
    clock = FakeClock()
    service = make_service(clock=clock)

    async def body() -> ChatResult:
        events = service.generate(sys_request())
        await events.__anext__()  # the request started at t0 and wrote its entry
        clock.advance(240)  # its response streams for four minutes
        await collect_rest(events)
        clock.advance(61)  # t0 + 5 min + 1 s
        return await collect(service.generate(sys_request()))

    assert run_async(service, body).usage.read_tokens == 0


async def collect_rest(events: object) -> None:
    async for _ in events:  # type: ignore[attr-defined]
        pass


def test_tenants_are_isolated_and_shared_keys_share() -> None:  # checklist 25, 26, 27
    service = make_service()
    a = sys_request(tenant=TenantId("a"))
    a_again = sys_request(tenant=TenantId("a"), metadata={"user_id": "b"})
    b = sys_request(tenant=TenantId("b"))
    first, same, other = ask(service, a, a_again, b)
    assert same.usage.read_tokens == first.usage.written_total
    assert other.usage.read_tokens == 0


def test_rejected_request_does_not_refresh() -> None:  # checklist 30
    clock = FakeClock()
    service = make_service(clock=clock)
    bad = chat(
        ("user", [text(str(i), "5m") for i in range(4)] + [text("x", "5m")]),
        system=[text(SYSTEM, "5m")],
    )

    async def body() -> ChatResult:
        await collect(service.generate(sys_request()))
        clock.advance(200)
        with pytest.raises(InvalidRequest):
            await collect(service.generate(bad))
        clock.advance(101)  # past the original expiry
        return await collect(service.generate(sys_request()))

    assert run_async(service, body).usage.read_tokens == 0


def test_prewarm_max_tokens_zero() -> None:  # checklist 33
    engine = FakeEngine()
    service = make_service(engine)
    warm, real = ask(service, sys_request(max_tokens=0), sys_request())
    assert warm.content == [] and warm.stop_reason == "max_tokens"
    assert warm.usage.output_tokens == 0 and warm.usage.written_total > 0
    assert real.usage.read_tokens == warm.usage.written_total


def test_automatic_caching_moves_forward() -> None:  # checklist 39
    service = make_service()
    turn1 = chat(("user", [text(words(1500))]), auto="5m")
    turn2 = chat(
        ("user", [text(words(1500))]),
        ("assistant", [text("ok")]),
        ("user", [text("more " + words(200, 4))]),
        auto="5m",
    )
    first, second = ask(service, turn1, turn2)
    assert second.usage.read_tokens == first.usage.written_total > 0
    assert second.usage.written_total > 0


def test_prefill_counts_only_the_uncached_part() -> None:
    engine = FakeEngine()
    service = make_service(engine)
    ask(service, sys_request())
    before = engine.num_prefill_tokens_total
    (second,) = ask(service, sys_request())
    assert engine.num_prefill_tokens_total - before == second.usage.uncached_tokens


def test_whole_prompt_hit_recomputes_last_token() -> None:  # checklist 69 (fake engine)
    engine = FakeEngine()
    service = make_service(engine)
    prefill = chat(("user", [text(SYSTEM)]), ("assistant", [text("Sure", "5m")]))
    cold = ask(
        make_service(FakeEngine()), chat(("user", [text(SYSTEM)]), ("assistant", [text("Sure")]))
    )[0]
    first, second = ask(service, prefill, prefill)
    assert second.usage.read_tokens == second.usage.prompt_tokens
    assert second.usage.uncached_tokens == 0
    assert first.content == second.content == cold.content


def test_extending_a_prefix_keeps_the_original() -> None:  # checklist 70
    service = make_service()
    longer = chat(("user", [text("hi"), text(words(300, 5), "5m")]), system=[text(SYSTEM, "5m")])
    first, _, again = ask(service, sys_request(), longer, sys_request())
    assert again.usage.read_tokens == first.usage.written_total
    assert again.content == first.content


def test_eviction_is_a_miss_not_an_error() -> None:
    service = make_service(capacity_bytes=64 * 2100)  # room for one entry
    other = chat(("user", [text("hi")]), system=[text(words(2000, 1), "5m")])
    _first, _, again = ask(service, sys_request(), other, sys_request())
    assert again.usage.read_tokens == 0 and again.usage.written_total > 0
    service.store.check_integrity()


def test_prompt_too_long() -> None:
    service = make_service(FakeEngine(max_context_tokens=100))
    with pytest.raises(PromptTooLong, match="prompt is too long"):
        ask(service, chat(("user", [text(words(200))])))


def test_max_tokens_beyond_context_stops_with_context_reason() -> None:
    service = make_service(FakeEngine(max_context_tokens=40, reply_tokens=100))
    (result,) = ask(service, chat(("user", [text("hi")]), max_tokens=100_000))
    assert result.stop_reason in ("model_context_window_exceeded", "end_turn")


def test_stop_sequences() -> None:
    service = make_service()
    (free,) = ask(service, sys_request())
    produced = "".join(p.text for p in free.content if isinstance(p, TextOut))
    assert len(produced) >= 2
    stop = produced[1:3] if len(produced) >= 3 else produced[1:]
    (stopped,) = ask(make_service(), _with_stop(stop))
    out = "".join(p.text for p in stopped.content if isinstance(p, TextOut))
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert out == produced[: produced.index(stop)]


def _with_stop(stop: str) -> ChatRequest:
    from dataclasses import replace

    req = sys_request()
    return replace(req, sampling=replace(req.sampling, stop_sequences=(stop,)))


def test_deployment_caps_max_tokens() -> None:
    from dataclasses import replace as dc_replace

    from promptcache.config import EngineConfig

    config = make_config()
    config = dc_replace(config, engine=dc_replace(EngineConfig(), max_output_tokens=2))
    service = Service(FakeEngine(reply_tokens=10**6), config, clock=FakeClock())
    (result,) = ask(service, chat(("user", [text("hi")]), max_tokens=1000))
    assert result.usage.output_tokens == 2 and result.stop_reason == "end_turn"
    (own,) = ask(
        make_service(FakeEngine(reply_tokens=10**6)), chat(("user", [text("hi")]), max_tokens=2)
    )
    assert own.usage.output_tokens == 2 and own.stop_reason == "max_tokens"
