"""Miss reasons through ``Service`` on the fake engine: one test per reason, and never another
tenant's entries (docs/architecture.md, "Miss reasons")."""

from __future__ import annotations

from dataclasses import replace

import pytest

from promptcache.cache.clock import FakeClock
from promptcache.core.request import Block, ChatRequest, DiagnosticsAsk
from promptcache.core.response import CacheMiss, ChatEvent, Diagnosis, Started
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from promptcache.types import TenantId
from tests.conftest import chat, make_service, run_async, text, words

SYSTEM = words(2000)
BPT = 64  # FakeEngine's KV bytes per token


def starts(service: Service, *requests: ChatRequest) -> list[Started]:
    """Each request's ``Started`` event, served one after the other."""

    async def body() -> list[Started]:
        out = []
        for request in requests:
            events: list[ChatEvent] = [e async for e in service.generate(request)]
            first = events[0]
            assert isinstance(first, Started)
            out.append(first)
        return out

    return run_async(service, body)


def sys_request(system: str = SYSTEM, **kw: object) -> ChatRequest:
    return chat(("user", [text("hi")]), system=[text(system, "5m")], **kw)  # type: ignore[arg-type]


def only(started: Started) -> CacheMiss:
    (miss,) = started.misses
    return miss


def test_first_request_is_never_written_then_a_hit_has_no_miss() -> None:
    first, second = starts(make_service(), sys_request(), sys_request())
    miss = only(first)
    assert (miss.reason, miss.block) == ("never_written", 0)
    assert miss.tokens == first.usage.written_total
    assert second.misses == () and second.usage.read_tokens > 0
    assert second.read_tier == "host"


def test_expired_says_how_long_ago() -> None:
    clock = FakeClock()
    service = make_service(clock=clock)

    async def body() -> list[Started]:
        out = []
        for wait in (0, 300 + 42):
            clock.advance(wait)
            events = [e async for e in service.generate(sys_request())]
            assert isinstance(events[0], Started)
            out.append(events[0])
        return out

    _, later = run_async(service, body)
    miss = only(later)
    assert miss.reason == "expired"
    assert miss.age_s == pytest.approx(42, abs=1)


def test_evicted_names_the_tier_and_the_cause() -> None:
    service = make_service(capacity_bytes=BPT * 2100)  # room for one ~2000-token entry
    _, _, again = starts(service, sys_request(), sys_request(words(2000, 5)), sys_request())
    miss = only(again)
    assert (miss.reason, miss.tier, miss.cause) == ("evicted", "host", "capacity")


def test_an_edited_tool_is_prefix_changed_at_its_block() -> None:
    def request(description: str) -> ChatRequest:
        tools = [
            Block("tool", '{"name": "a", "description": "first"}', name="a"),
            Block("tool", f'{{"name": "b", "description": "{description}"}}', name="b"),
        ]
        return chat(("user", [text("hi")]), system=[text(SYSTEM, "5m")], tools=tools)

    _, edited = starts(make_service(), request("second"), request("edited"))
    miss = only(edited)
    assert miss.reason == "prefix_changed"
    assert (miss.block, miss.matched_blocks, miss.first_diff, miss.section) == (2, 1, 1, "tools")


def test_a_short_breakpoint_is_below_minimum() -> None:
    (started,) = starts(make_service(), sys_request(words(300)))
    assert only(started).reason == "below_minimum"
    assert started.usage.written_total == 0


def test_an_entry_more_than_20_blocks_back_is_outside_the_lookback() -> None:
    tail = [text(f"turn {i}") for i in range(25)]
    tail[-1] = text("last turn", "5m")
    later = chat(("user", tail), system=[text(SYSTEM, "5m")])
    # The first request writes the system prompt; the second marks only its last block, 25
    # blocks past it, so its 20-block lookback never reaches the live entry.
    without_system_mark = replace(later, system=(text(SYSTEM),))
    _, started = starts(make_service(), sys_request(), without_system_mark)
    miss = only(started)
    assert (miss.reason, miss.block, miss.found) == ("outside_lookback", 25, 0)


def test_the_same_prompt_under_another_model_is_model_changed() -> None:
    first = make_service()
    starts(first, sys_request())
    second = make_service()
    second.history = first.history  # as if the weights were replaced under one server
    engine = second.engine
    assert isinstance(engine, FakeEngine)
    engine._info = replace(engine.info, revision="fake-2")
    (started,) = starts(second, sys_request())
    assert only(started).reason == "model_changed"


def test_another_tenants_entry_is_never_written_and_never_shown() -> None:
    service = make_service()
    a, b = TenantId("a"), TenantId("b")
    first, other = starts(service, sys_request(tenant=a), sys_request(tenant=b))
    assert only(first).reason == "never_written"
    assert only(other).reason == "never_written"
    assert other.usage.read_tokens == 0


def test_tombstones_are_bounded() -> None:
    service = make_service(capacity_bytes=BPT * 2100)
    service.store.tombstones.limit = 2
    starts(service, *(sys_request(words(2000, seed)) for seed in range(5)))
    assert len(service.store.tombstones) == 2


# -- Anthropic's diagnostics (spec §3.12) at the service ------------------------------------------


def asking(request: ChatRequest, message_id: str, previous: str | None = None) -> ChatRequest:
    return replace(request, diagnostics=DiagnosticsAsk(message_id, previous))


def test_diagnostics_compare_with_the_previous_message_of_the_tenant() -> None:
    edited = sys_request(words(2000, 3))
    one, same, changed, unknown, foreign = starts(
        make_service(),
        asking(sys_request(), "msg_1"),
        asking(sys_request(), "msg_2", "msg_1"),
        asking(edited, "msg_3", "msg_2"),
        asking(sys_request(), "msg_4", "msg_nope"),
        asking(sys_request(tenant=TenantId("other")), "msg_5", "msg_1"),
    )
    assert one.diagnosis == Diagnosis(None)
    assert same.diagnosis == Diagnosis(None)
    assert changed.diagnosis == Diagnosis("system_changed", one.usage.written_total)
    assert unknown.diagnosis == Diagnosis("previous_message_not_found")
    assert foreign.diagnosis == Diagnosis("previous_message_not_found")


def test_diagnostics_say_unavailable_when_only_uncovered_fields_differ() -> None:
    first = replace(sys_request(), diagnostics=DiagnosticsAsk("msg_1", None, "choice-a"))
    second = replace(sys_request(), diagnostics=DiagnosticsAsk("msg_2", "msg_1", "choice-b"))
    _, started = starts(make_service(), first, second)
    assert started.diagnosis == Diagnosis("unavailable")


def test_requests_without_diagnostics_store_nothing() -> None:
    service = make_service()
    (started,) = starts(service, sys_request())
    assert started.diagnosis is None
    assert service.messages.find(TenantId("default"), "msg_x") is None
