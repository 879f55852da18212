"""Tiers through ``Service`` on a real (tiny) transformers model: nested breakpoints share their
bytes, and entries read back from disk (or found damaged there) give the cold run's tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from promptcache.core.request import Block, ChatRequest
from promptcache.core.response import ChatResult
from promptcache.engine.hf.engine import HFEngine
from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.service import Service
from tests.conftest import chat, collect, make_service, run_async, text, words


@pytest.fixture(scope="module")
def gemma() -> HFEngine:
    # No stop tokens: every answer runs to max_tokens, so comparing answers compares 12 tokens.
    return build_tiny_engine("gemma3", stop_token_ids=())


def ask(service: Service, *requests: ChatRequest) -> list[ChatResult]:
    async def body() -> list[ChatResult]:
        return [await collect(service.generate(r)) for r in requests]

    return run_async(service, body)


def conversation(turns: int) -> ChatRequest:
    """tools -> system -> a document -> a conversation, with a breakpoint after the system, after
    the document and on the last user turn: three nested entries over one prefix."""
    spec = json.dumps({"name": "lookup", "description": words(200, 5)})
    tool = Block("tool", spec, name="lookup")
    messages: list[tuple[str, list[Block]]] = [("user", [text(words(900, 2), "5m")])]
    for turn in range(turns):
        messages += [("assistant", [text(f"answer {turn}")]), ("user", [text(words(300, turn))])]
    last_role, last_blocks = messages[-1]
    messages[-1] = (
        last_role,
        [*last_blocks[:-1], Block("text", last_blocks[-1].text, mark=text("", "5m").mark)],
    )
    return chat(*messages, system=[text(words(500, 1), "5m")], tools=[tool])  # type: ignore[arg-type]


def test_nested_breakpoints_hold_their_common_prefix_once(gemma: HFEngine) -> None:
    service = make_service(gemma, min_cacheable_tokens=256, capacity_bytes=1 << 30)
    first, second = ask(service, conversation(1), conversation(2))
    assert first.usage.written_total > 0 and second.usage.read_tokens > 0
    entries = service.store.entries()
    assert len(entries) == 4  # system, document, turn 1, then turn 2 (restored and extended)
    longest = max(e.nbytes for e in entries)
    total_if_copied = sum(e.nbytes for e in entries)
    assert total_if_copied > 2.5 * longest
    assert service.store.used_bytes <= 1.1 * longest
    service.store.check_integrity()


def test_disk_round_trip_and_damage_keep_the_cold_tokens(gemma: HFEngine, tmp_path: Path) -> None:
    def request(seed: int, n: int) -> ChatRequest:
        return chat(("user", [text("go on")]), system=[text(words(n, seed), "5m")], max_tokens=12)

    a, b = request(1, 700), request(2, 760)
    cold_a, cold_b = ask(make_service(gemma, min_cacheable_tokens=10**6), a, b)
    probe = make_service(gemma, min_cacheable_tokens=256, disk_dir=tmp_path / "probe")
    ask(probe, b)
    one_entry = probe.store.tiers.tier("disk").used_bytes  # b's file, written at shutdown
    cache: dict[str, Any] = {"min_cacheable_tokens": 256, "disk_dir": tmp_path / "tier"}
    service = make_service(gemma, capacity_bytes=one_entry, **cache)
    a1, b1, a2 = ask(service, a, b, a)
    assert a1.usage.written_total > 0 and b1.usage.written_total > 0
    assert a2.usage.read_tokens == a1.usage.written_total  # a came back from disk
    assert service.store.stats.promotions[("disk", "hit")] == 1
    assert a1.content == a2.content == cold_a.content
    assert b1.content == cold_b.content
    # b went to disk at shutdown; damage its file: the next read is a miss with b's answer.
    (entry,) = [e for e in service.store.entries() if e.num_tokens == b1.usage.written_total]
    path = service.store.tiers.path(entry.key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    (again,) = ask(service, b)
    assert again.usage.read_tokens == 0 and again.usage.written_total == b1.usage.written_total
    assert again.content == cold_b.content
    assert service.store.stats.evictions[("disk", "corrupt")] == 1
