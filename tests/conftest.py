"""Shared helpers: a service on the fake engine with a fake clock, request builders, and a
throwaway Redis server (``redis_server``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from promptcache.cache.clock import FakeClock
from promptcache.config import CacheConfig, ServerConfig
from promptcache.core.request import Block, CacheMark, ChatRequest, Message, Sampling
from promptcache.core.response import ChatEvent, ChatResult, Finished, Started, TextOut, ToolCallOut
from promptcache.engine.base import Engine
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from promptcache.types import Ttl
from tests.redis_server import RedisServer

T = TypeVar("T")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running ``redis-server`` of its own on a free loopback port (``.url``), killed after
    the test; skips, saying why, where ``redis-server`` is not installed."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


def make_config(**cache: Any) -> ServerConfig:
    base = ServerConfig()
    return replace(base, cache=replace(CacheConfig(), **cache))


def make_service(
    engine: Engine | None = None, clock: FakeClock | None = None, **cache: Any
) -> Service:
    return Service(engine or FakeEngine(), make_config(**cache), clock=clock or FakeClock())


def run_async(service: Service, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Start ``service``, run ``body`` on its loop, stop it."""

    async def main() -> T:
        await service.start()
        try:
            return await body()
        finally:
            await service.stop()

    return asyncio.run(main())


async def collect(events: AsyncIterator[ChatEvent]) -> ChatResult:
    content: list[TextOut | ToolCallOut] = []
    started = finished = None
    async for event in events:
        if isinstance(event, Started):
            started = event
        elif isinstance(event, Finished):
            finished = event
        else:
            assert started is not None, "content before Started"
            content.append(event)
    assert started is not None and finished is not None
    assert finished.usage.prompt_tokens == started.usage.prompt_tokens
    return ChatResult(content, finished.stop_reason, finished.stop_sequence, finished.usage)


def mark(ttl: Ttl = "5m", path: str = "x") -> CacheMark:
    return CacheMark(ttl, f"{path}.cache_control.ttl")


def text(value: str, ttl: Ttl | None = None) -> Block:
    return Block("text", value, mark=mark(ttl) if ttl else None)


def chat(
    *turns: tuple[str, list[Block]],
    system: list[Block] | None = None,
    tools: list[Block] | None = None,
    auto: Ttl | None = None,
    max_tokens: int = 8,
    **kwargs: Any,
) -> ChatRequest:
    return ChatRequest(
        model="any",
        messages=tuple(Message(role, tuple(blocks)) for role, blocks in turns),  # type: ignore[arg-type]
        sampling=Sampling(max_tokens=max_tokens, temperature=0.0),
        system=tuple(system or ()),
        tools=tuple(tools or ()),
        auto_cache=CacheMark(auto) if auto else None,
        **kwargs,
    )


def words(n: int, seed: int = 0) -> str:
    """About ``n`` bytes of deterministic text (the byte tokenizer makes it ``n`` tokens)."""
    out = []
    i = seed
    while sum(len(w) + 1 for w in out) < n:
        out.append(f"w{i % 97}")
        i += 7
    return " ".join(out)[:n]
