"""A fake ``Service`` that yields canned events, and a TestClient serving the Anthropic routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from promptcache.api.anthropic import routes
from promptcache.core.request import ChatRequest
from promptcache.core.response import (
    CacheUsage,
    ChatEvent,
    Finished,
    Started,
    TextOut,
    ToolCallOut,
)
from promptcache.errors import AuthenticationFailed, NotFound
from promptcache.types import DEFAULT_TENANT, TenantId

# N = 100 = R 40 + W1h 10 + W5m 20 + U 30; O = 7.
PROMPT_USAGE = CacheUsage(prompt_tokens=100, read_tokens=40, written_tokens={"5m": 20, "1h": 10})
FINAL_USAGE = PROMPT_USAGE.with_output(7)
TOOL_CALL = ToolCallOut("toolu_01", "get_weather", {"city": "Paris", "unit": "C"})
CANNED: list[ChatEvent] = [
    Started(PROMPT_USAGE),
    TextOut("Hello"),
    TextOut(", world"),
    TOOL_CALL,
    Finished("tool_use", None, FINAL_USAGE),
]

HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "key-a"}

Step = ChatEvent | BaseException | Callable[[], Awaitable[None]]
"""What the fake's generator does next: yield an event, raise, or await something."""


@dataclass
class FakeService:
    """Satisfies the Service contract: validation errors and events come from ``steps``."""

    steps: list[Step] = field(default_factory=lambda: list(CANNED))
    keys: dict[str, str] | None = None
    models: set[str] | None = None
    input_tokens: int = 100
    count_error: BaseException | None = None
    requests: list[ChatRequest] = field(default_factory=list)
    num_closed: int = 0
    num_started: int = 0

    def authenticate(self, credential: str | None) -> TenantId:
        if self.keys is None:
            return DEFAULT_TENANT
        if credential is None or credential not in self.keys:
            raise AuthenticationFailed("invalid x-api-key")
        return TenantId(self.keys[credential])

    def resolve_model(self, name: str) -> str:
        if self.models is not None and name not in self.models:
            raise NotFound(f"model: {name}")
        return "served-model"

    async def generate(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        self.requests.append(request)
        self.num_started += 1
        try:
            for step in self.steps:
                if isinstance(step, BaseException):
                    raise step
                if callable(step):
                    await step()
                    continue
                yield step
        finally:
            self.num_closed += 1

    async def count_tokens(self, request: ChatRequest) -> int:
        self.requests.append(request)
        if self.count_error is not None:
            raise self.count_error
        return self.input_tokens


def body(**overrides: Any) -> dict[str, Any]:
    """A minimal valid Messages body with ``overrides`` applied (``None`` removes a field)."""
    base: dict[str, Any] = {
        "model": "claude-test",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE transcript into ``(event name, data)`` pairs, checking the framing."""
    assert raw.endswith("\n\n")
    events = []
    for frame in raw.split("\n\n")[:-1]:
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        name, data = name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def client(service: FakeService) -> Iterator[TestClient]:
    with TestClient(Starlette(routes=routes(service))) as test_client:
        yield test_client
