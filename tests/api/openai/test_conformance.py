"""Spec §7 checklist items 41-53 and 68 (OpenAI part), through the app on the real ``Service``
with the fake engine (byte tokenizer: ``words(n)`` is about ``n`` tokens) and a fake clock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.api.openai.decode import decode_chat
from promptcache.api.openai.rules import OPENAI_RULES
from promptcache.cache.clock import FakeClock
from promptcache.config import ApiConfig
from promptcache.service import Service
from promptcache.types import DEFAULT_TENANT
from tests.conftest import make_service, words

from .conftest import data_lines

URL = "/v1/chat/completions"
DOC = words(1500, 11)
EXPLICIT = {"mode": "explicit"}


@dataclass
class Server:
    service: Service
    clock: FakeClock
    client: TestClient

    def chat(self, **fields: Any) -> dict[str, Any]:
        response = self.client.post(URL, json=request(**fields))
        assert response.status_code == 200, response.text
        return dict(response.json()["usage"])

    def error(self, **fields: Any) -> tuple[int, dict[str, Any]]:
        response = self.client.post(URL, json=request(**fields))
        return response.status_code, response.json()["error"]

    def block_ends(self, **fields: Any) -> list[int]:
        """``offset(i)`` of every block (spec §2.3), as the service renders the request."""
        raw = json.dumps(request(**fields)).encode()
        chat = decode_chat(raw, tenant=DEFAULT_TENANT).request
        return [block.end for block in self.service.prepare(chat, OPENAI_RULES).layout.blocks]


def request(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "gpt-test",
        "max_tokens": 3,
        "temperature": 0,
        "messages": [{"role": "system", "content": DOC}, {"role": "user", "content": "Question?"}],
    }
    return {**base, **fields}


def serve(**api: Any) -> Iterator[Server]:
    clock = FakeClock()
    service = make_service(clock=clock)
    service.config = replace(service.config, api=replace(ApiConfig(), **api))
    with TestClient(build_app(service)) as client:
        yield Server(service, clock, client)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from serve()


def cached(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def written(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens_details"]["cache_write_tokens"])


def cc(ttl: str | None = None) -> dict[str, Any]:
    return {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}


def test_41_implicit_caching_of_a_repeated_long_prompt(server: Server) -> None:
    first, second = server.chat(), server.chat()
    assert cached(first) == 0 and written(first) > 1024
    assert cached(second) == written(first) > 0
    assert second["prompt_tokens"] == first["prompt_tokens"]
    assert written(second) == 0


def test_42_short_prompt_reports_zero_cached_tokens(server: Server) -> None:
    short = [{"role": "user", "content": "Hi there"}]
    for usage in (server.chat(messages=short), server.chat(messages=short)):
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert usage["prompt_tokens_details"]["cache_write_tokens"] == 0


def test_43_exact_by_default_rounded_on_request(server: Server) -> None:
    server.chat()
    exact = server.chat()
    implicit_offset = server.block_ends()[-1]  # the end of the latest message
    assert cached(exact) == implicit_offset and implicit_offset % 128 != 0
    header = {"x-promptcache-compat": "openai-cached-128"}
    rounded = server.client.post(URL, json=request(), headers=header).json()["usage"]
    assert cached(rounded) == implicit_offset // 128 * 128
    assert rounded["prompt_tokens"] == exact["prompt_tokens"]
    assert rounded["cache_read_input_tokens"] == implicit_offset


def test_43_rounding_as_a_deployment_option() -> None:
    for server in serve(openai_round_cached_tokens=True):
        first = server.chat()
        usage = server.chat()
        offset = server.block_ends()[-1]
        assert cached(usage) == offset // 128 * 128 > 0
        assert written(first) == offset  # writes stay exact
        assert usage["prompt_tokens"] == first["prompt_tokens"]


def marked_doc(marker: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": DOC, **marker}]},
        {"role": "user", "content": "Question?"},
    ]


@pytest.mark.parametrize(("ttl", "alive_s", "dead_s"), [("1h", 59 * 60, 61 * 60), ("5m", 299, 301)])
def test_44_ttl_on_a_text_part(ttl: str, alive_s: int, dead_s: int) -> None:
    for elapsed, hit in ((alive_s, True), (dead_s, False)):
        for server in serve():
            messages = marked_doc({"cache_control": cc(ttl)})
            first = server.chat(messages=messages, prompt_cache_options=EXPLICIT)
            offset = server.block_ends(messages=messages)[0]
            assert written(first) == offset
            server.clock.advance(elapsed)
            again = server.chat(messages=messages, prompt_cache_options=EXPLICIT)
            assert cached(again) == (offset if hit else 0)


def test_45_message_level_marker_on_a_string_system_message(server: Server) -> None:
    messages = [
        {"role": "system", "content": DOC, "cache_control": cc()},
        {"role": "user", "content": "Question?"},
    ]
    first = server.chat(messages=messages, prompt_cache_options=EXPLICIT)
    assert written(first) == server.block_ends(messages=messages)[0]
    other = [messages[0], {"role": "user", "content": "Another question?"}]
    assert cached(server.chat(messages=other, prompt_cache_options=EXPLICIT)) == written(first)


def test_46_marker_on_a_tool(server: Server) -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": f"tool_{i}", "description": words(700, i), "parameters": {}},
            **({"cache_control": cc()} if i == 1 else {}),
        }
        for i in range(3)
    ]
    messages = [{"role": "user", "content": "Hi"}]
    first = server.chat(tools=tools, messages=messages, prompt_cache_options=EXPLICIT)
    assert written(first) == server.block_ends(tools=tools, messages=messages)[1]
    second = server.chat(tools=tools, messages=messages, prompt_cache_options=EXPLICIT)
    assert cached(second) == written(first)


def test_47_breakpoint_part_in_explicit_mode(server: Server) -> None:
    messages = marked_doc({"prompt_cache_breakpoint": {"mode": "explicit"}})
    first = server.chat(messages=messages, prompt_cache_options=EXPLICIT)
    assert written(first) == server.block_ends(messages=messages)[0] > 1024


def test_48_explicit_mode_without_markers_caches_nothing(server: Server) -> None:
    for _ in range(2):
        usage = server.chat(prompt_cache_options=EXPLICIT)
        assert cached(usage) == written(usage) == 0


def test_49_prompt_cache_key_partitions(server: Server) -> None:
    a = server.chat(prompt_cache_key="a")
    b = server.chat(prompt_cache_key="b")
    a_again = server.chat(prompt_cache_key="a")
    plain = server.chat()
    assert written(a) > 0 and cached(b) == 0 and written(b) == written(a)
    assert cached(a_again) == written(a)
    assert cached(plain) == 0  # the empty partition is a partition of its own


def test_50_streaming_usage_chunk(server: Server) -> None:
    plain = server.chat()
    payload = request(stream=True, stream_options={"include_usage": True})
    raw = server.client.post(URL, json=payload).text
    *chunks, done = data_lines(raw)
    assert done == "[DONE]"
    *content, last = chunks
    assert all(c["usage"] is None for c in content)
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == plain["prompt_tokens"]
    assert cached(last["usage"]) == written(plain)
    assert last["usage"]["completion_tokens"] == plain["completion_tokens"]


def test_51_five_explicit_markers(server: Server) -> None:
    parts = [{"type": "text", "text": f"part {i}", "cache_control": cc()} for i in range(5)]
    status, error = server.error(messages=[{"role": "user", "content": parts}])
    assert status == 400
    assert error == {
        "message": "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_51_four_markers_leave_the_implicit_breakpoint_out(server: Server) -> None:
    """§4.2: the implicit breakpoint takes a slot only if one is free; never a count error."""
    parts = [{"type": "text", "text": f"part {i}", "cache_control": cc()} for i in range(4)]
    server.chat(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "q"}]}])


def test_order_error_uses_openai_paths(server: Server) -> None:
    tools = [{"type": "function", "function": {"name": "t"}, "cache_control": cc("5m")}]
    parts = [{"type": "text", "text": f"p{i}"} for i in range(4)]
    parts.append({"type": "text", "text": "late", "cache_control": cc("1h")})
    status, error = server.error(tools=tools, messages=[{"role": "user", "content": parts}])
    assert status == 400 and (error["param"], error["code"]) == (None, None)
    assert error["message"].startswith(
        "messages.0.content.4.cache_control.ttl: a ttl='1h' cache_control block must not come "
        "after a ttl='5m' cache_control block."
    )


def test_52_bad_retention(server: Server) -> None:
    status, error = server.error(prompt_cache_retention="forever")
    assert status == 400 and error["param"] == "prompt_cache_retention"
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"


def test_53_long_retention_with_an_explicit_5m_marker(server: Server) -> None:
    messages = marked_doc({"cache_control": cc("5m")})
    first = server.chat(messages=messages, prompt_cache_retention="24h")
    assert written(first) == server.block_ends(messages=messages)[-1]
    # The implicit breakpoint was lowered to 5m: after 6 minutes nothing is left.
    server.clock.advance(6 * 60)
    assert cached(server.chat(messages=messages, prompt_cache_retention="24h")) == 0


def test_24h_retention_alone_writes_1h_entries(server: Server) -> None:
    first = server.chat(prompt_cache_retention="24h")
    server.clock.advance(59 * 60)
    assert cached(server.chat(prompt_cache_retention="24h")) == written(first) > 0


def test_a_rejected_request_touches_no_entry(server: Server) -> None:
    """§1.14: a 400 neither reads nor refreshes (checklist 30, OpenAI side)."""
    first = server.chat()
    server.clock.advance(200)
    status, _ = server.error(prompt_cache_options={"mode": "explicit", "ttl": "1h"})
    assert status == 400
    server.clock.advance(200)  # 400 s after the write: expired unless the 400 refreshed it
    assert cached(server.chat()) == 0 and written(first) > 0


def test_68_same_uncached_count_as_anthropic(server: Server) -> None:
    """For one logical request, Anthropic ``input_tokens`` = OpenAI ``prompt_tokens`` minus the
    cached and written tokens (rounding off), whichever surface writes and which reads."""
    anthropic_body = {
        "model": "m",
        "max_tokens": 3,
        "temperature": 0,
        "system": [{"type": "text", "text": DOC, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Question?"}],
    }
    headers = {"anthropic-version": "2023-06-01"}
    anthropic = server.client.post("/v1/messages", json=anthropic_body, headers=headers).json()
    openai = server.chat(
        messages=marked_doc({"cache_control": cc()}), prompt_cache_options=EXPLICIT
    )
    uncached = openai["prompt_tokens"] - cached(openai) - written(openai)
    assert anthropic["usage"]["input_tokens"] == uncached
    assert cached(openai) == anthropic["usage"]["cache_creation_input_tokens"] > 0
    total = anthropic["usage"]["input_tokens"] + anthropic["usage"]["cache_creation_input_tokens"]
    assert openai["prompt_tokens"] == total
