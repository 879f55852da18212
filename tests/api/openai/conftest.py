"""A fake ``Service`` for the OpenAI route (the Anthropic tests' fake, recording the mark rules),
a TestClient serving it, and request/stream helpers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from promptcache.api.anthropic.rules import ANTHROPIC_RULES
from promptcache.api.openai import routes
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatEvent
from promptcache.service import MarkRules
from tests.api.anthropic import conftest as anthropic_fakes

CANNED = anthropic_fakes.CANNED
FINAL_USAGE = anthropic_fakes.FINAL_USAGE
PROMPT_USAGE = anthropic_fakes.PROMPT_USAGE
TOOL_CALL = anthropic_fakes.TOOL_CALL
HEADERS = {"authorization": "Bearer key-a"}


@dataclass
class FakeService(anthropic_fakes.FakeService):
    """The Anthropic tests' fake service; ``generate`` also takes and records the mark rules."""

    rules: list[MarkRules] = field(default_factory=list)

    def generate(
        self, request: ChatRequest, rules: MarkRules = ANTHROPIC_RULES
    ) -> AsyncIterator[ChatEvent]:
        self.rules.append(rules)
        return super().generate(request)


def body(**overrides: Any) -> dict[str, Any]:
    """A minimal valid Chat Completions body with ``overrides`` (``None`` removes a field)."""
    base: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def data_lines(raw: str) -> list[Any]:
    """Parse an OpenAI SSE transcript: the JSON of every ``data:`` line, ``[DONE]`` as a string.

    Checks the framing: only ``data:`` frames (and ``:`` comments, skipped), blank-line ended.
    """
    assert raw.endswith("\n\n")
    out: list[Any] = []
    for frame in raw.split("\n\n")[:-1]:
        if frame.startswith(":"):
            continue
        assert frame.startswith("data: ") and "\n" not in frame, frame
        payload = frame.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def client(service: FakeService) -> Iterator[TestClient]:
    with TestClient(Starlette(routes=routes(service))) as test_client:
        yield test_client
