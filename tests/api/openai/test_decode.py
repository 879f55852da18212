"""Wire -> ChatRequest: sections, tool calls, markers and their paths, TTLs, errors, headers."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from promptcache.api.anthropic.decode import decode_messages
from promptcache.api.openai.decode import (
    DEFAULT_MAX_TOKENS,
    ChatCall,
    credentials,
    decode_chat,
    wants_rounding,
)
from promptcache.core.request import Block, CacheMark, ChatRequest, Message, Sampling
from promptcache.errors import InvalidRequest
from promptcache.types import TenantId

from .conftest import body

TENANT = TenantId("t1")


def call(**overrides: Any) -> ChatCall:
    return decode_chat(json.dumps(body(**overrides)).encode(), tenant=TENANT)


def decode(**overrides: Any) -> ChatRequest:
    return call(**overrides).request


def rejects(
    message: str, *, param: str | None = None, code: str | None = None, **overrides: Any
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode(**overrides)
    assert caught.value.message == message
    assert (caught.value.param, caught.value.code) == (param, code)


def cc(ttl: str | None = None, **extra: Any) -> dict[str, Any]:
    marker: dict[str, Any] = {"type": "ephemeral", **extra}
    if ttl is not None:
        marker["ttl"] = ttl
    return marker


def text(value: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


def msg(role: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":  "Paris"}'},
}


# -- sections --------------------------------------------------------------------------------------


def test_minimal_request() -> None:
    request = decode()
    assert request.model == "gpt-test" and request.tenant == TENANT
    assert request.messages == (Message("user", (Block("text", "Hi"),)),)
    assert request.auto_cache == CacheMark("5m", "prompt_cache_options.ttl")
    assert request.partition == "" and request.stream is False
    assert request.sampling == Sampling(max_tokens=DEFAULT_MAX_TOKENS)


def test_leading_system_and_developer_messages_form_the_system_section() -> None:
    request = decode(
        messages=[
            msg("system", "You are terse."),
            msg("developer", [text("Rule one."), text("Rule two.")]),
            msg("user", "Hi"),
            msg("system", "Late note."),
            msg("developer", [text("Later rule.")]),
        ]
    )
    assert request.system == (
        Block("text", "You are terse."),
        Block("text", "Rule one."),
        Block("text", "Rule two."),
    )
    # project decision §1.1: later system messages stay in place, as user turns.
    assert request.messages == (
        Message("user", (Block("text", "Hi"),)),
        Message("user", (Block("text", "Late note."),)),
        Message("user", (Block("text", "Later rule."),)),
    )


def test_tools_tool_calls_and_tool_results() -> None:
    request = decode(
        tools=[{"type": "function", "function": {**WEATHER, "strict": True}}],
        messages=[
            msg("user", "Weather in Paris?"),
            msg("assistant", None, tool_calls=[WEATHER_CALL]),
            msg("tool", "18C, sunny", tool_call_id="call_1"),
            msg("tool", [text("part one"), text("part two")], tool_call_id="call_2"),
            msg("assistant", [text("It is "), {"type": "refusal", "refusal": "no"}]),
        ],
    )
    [tool] = request.tools
    assert tool.kind == "tool" and tool.name == "get_weather"
    # Anthropic's shape, key order as received, ``strict`` left out.
    assert json.loads(tool.text) == {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": WEATHER["parameters"],
    }
    assert list(json.loads(tool.text)) == ["name", "description", "input_schema"]
    assert request.messages[1] == Message(
        "assistant", (Block("tool_use", '{"city":  "Paris"}', "get_weather", "call_1"),)
    )
    assert request.messages[2] == Message(
        "user", (Block("tool_result", "18C, sunny", ref_id="call_1"),)
    )
    assert request.messages[3].blocks == (
        Block("tool_result", "part one", ref_id="call_2"),
        Block("tool_result", "part two", ref_id="call_2"),
    )
    assert request.messages[4] == Message(
        "assistant", (Block("text", "It is "), Block("text", "no"))
    )


def test_empty_content_beside_tool_calls_is_no_block() -> None:
    request = decode(messages=[msg("user", "x"), msg("assistant", "", tool_calls=[WEATHER_CALL])])
    assert [b.kind for b in request.messages[1].blocks] == ["tool_use"]


def test_same_request_as_anthropic_decodes_to_the_same_blocks() -> None:
    """The cross-surface cache hit (spec §1.12) needs identical canonical blocks."""
    # The openai SDK user serialises arguments with json.dumps, as Anthropic's input is.
    call_json = {
        **WEATHER_CALL,
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    openai = decode(
        tools=[{"type": "function", "function": WEATHER}],
        messages=[
            msg("system", [text("Long document.", cache_control=cc())]),
            msg("user", "Question?"),
            msg("assistant", None, tool_calls=[call_json]),
            msg("tool", "18C", tool_call_id="call_1"),
        ],
    )
    anthropic_tool = {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": WEATHER["parameters"],
    }
    tool_use = {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    tool_result = {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"}
    anthropic_body = {
        "model": "m",
        "max_tokens": 4,
        "tools": [anthropic_tool],
        "system": [{"type": "text", "text": "Long document.", "cache_control": cc()}],
        "messages": [
            {"role": "user", "content": "Question?"},
            {"role": "assistant", "content": [tool_use]},
            {"role": "user", "content": [tool_result]},
        ],
    }
    anthropic = decode_messages(json.dumps(anthropic_body).encode(), tenant=TENANT)
    assert _unmarked(openai) == _unmarked(anthropic)


def _unmarked(request: ChatRequest) -> list[tuple[str, str, Block]]:
    # Marker paths differ between the surfaces; what renders (and is hashed) must not.
    return [(p.section, p.role, replace(p.block, mark=None)) for p in request.placed_blocks()]


# -- markers ---------------------------------------------------------------------------------------


def test_marker_paths_and_ttls() -> None:
    request = decode(
        tools=[{"type": "function", "function": WEATHER, "cache_control": cc("1h")}],
        messages=[
            msg("system", "Static.", cache_control=cc("1h")),
            msg(
                "user",
                [
                    text("a", cache_control=cc()),
                    text("b", prompt_cache_breakpoint={"mode": "explicit"}),
                    text("c", cache_control=cc("1h"), prompt_cache_breakpoint={"mode": "explicit"}),
                ],
            ),
            msg("assistant", None, tool_calls=[{**WEATHER_CALL, "cache_control": cc()}]),
        ],
    )
    marks = [b.block.mark for b in request.placed_blocks()]
    assert marks == [
        CacheMark("1h", "tools.0.cache_control.ttl"),
        CacheMark("1h", "messages.0.cache_control.ttl"),
        CacheMark("5m", "messages.1.content.0.cache_control.ttl"),
        CacheMark("5m", "messages.1.content.1.prompt_cache_breakpoint.ttl"),
        # project decision §4.3: both markers on one part make one breakpoint, cache_control's TTL.
        CacheMark("1h", "messages.1.content.2.cache_control.ttl"),
        CacheMark("5m", "messages.2.tool_calls.0.cache_control.ttl"),
    ]


def test_message_level_marker_on_array_content_marks_the_last_part() -> None:
    request = decode(
        messages=[msg("user", [text("a"), text("b")], cache_control=cc("1h")), msg("user", "q")]
    )
    first, second = request.messages[0].blocks
    assert first.mark is None
    assert second.mark == CacheMark("1h", "messages.0.cache_control.ttl")


def test_marker_without_ttl_takes_the_request_ttl() -> None:
    content = [
        text("a", cache_control=cc()),
        text("b", prompt_cache_breakpoint={"mode": "explicit"}),
    ]
    for extra, ttl in [
        ({}, "5m"),
        ({"prompt_cache_retention": "in_memory"}, "5m"),
        ({"prompt_cache_retention": "24h"}, "1h"),
        ({"prompt_cache_options": {"ttl": "30m"}}, "1h"),
        # The options win over the retention (§4.5).
        ({"prompt_cache_options": {"ttl": "30m"}, "prompt_cache_retention": "in_memory"}, "1h"),
    ]:
        request = decode(messages=[msg("user", content)], **extra)
        assert [b.mark.ttl for b in request.messages[0].blocks if b.mark] == [ttl, ttl], extra
        assert request.auto_cache is not None and request.auto_cache.ttl == ttl


def test_breakpoint_ttl_values_of_the_sdk_map_to_1h() -> None:
    for value in ("30m", "12h"):
        part = text("a", prompt_cache_breakpoint={"mode": "explicit", "ttl": value})
        [block] = decode(messages=[msg("user", [part])]).messages[0].blocks
        assert block.mark is not None and block.mark.ttl == "1h"


def test_explicit_mode_has_no_implicit_breakpoint() -> None:
    assert decode(prompt_cache_options={"mode": "explicit"}).auto_cache is None
    assert decode(prompt_cache_options={"mode": "implicit"}).auto_cache is not None


def test_prompt_cache_key_is_the_partition() -> None:
    assert decode(prompt_cache_key="conversation-7").partition == "conversation-7"
    assert decode(prompt_cache_key=None, user="someone").partition == ""


# -- marker and body errors ------------------------------------------------------------------------


def test_empty_text_with_a_marker() -> None:
    message = "cache_control cannot be set for empty text blocks"
    rejects(
        f"messages.0.content.1.text: {message}",
        param="messages.0.content.1.text",
        messages=[msg("user", [text("a"), text("", cache_control=cc())])],
    )
    rejects(
        f"messages.0.content: {message}",
        param="messages.0.content",
        messages=[msg("system", "", cache_control=cc()), msg("user", "q")],
    )
    rejects(
        f"messages.0.content.0.text: {message}",
        param="messages.0.content.0.text",
        messages=[msg("user", [text("")], cache_control=cc())],
    )
    rejects(
        f"messages.0.content.0.text: {message}",
        param="messages.0.content.0.text",
        messages=[msg("user", [text("", prompt_cache_breakpoint={"mode": "explicit"})])],
    )
    rejects(
        f"messages.0.content.1.text: {message}",
        param="messages.0.content.1.text",
        messages=[msg("tool", [text("a"), text("")], tool_call_id="c", cache_control=cc())],
    )
    # As on Anthropic, an empty tool result (not a text block) may be marked.
    [result] = decode(messages=[msg("tool", "", tool_call_id="c", cache_control=cc())]).messages
    assert result.blocks[0].kind == "tool_result" and result.blocks[0].mark is not None


def test_bad_marker_values() -> None:
    rejects(
        "messages.0.content.0.cache_control.ttl: Input should be '5m' or '1h'",
        param="messages.0.content.0.cache_control.ttl",
        code="invalid_value",
        messages=[msg("user", [text("a", cache_control=cc("10m"))])],
    )
    rejects(
        "tools.0.cache_control.type: Input should be 'ephemeral'",
        param="tools.0.cache_control.type",
        code="invalid_value",
        tools=[{"type": "function", "function": WEATHER, "cache_control": {"type": "persistent"}}],
    )
    rejects(
        "messages.0.cache_control.scope: Extra inputs are not permitted",
        param="messages.0.cache_control.scope",
        messages=[msg("user", "a", cache_control=cc(scope="global"))],
    )
    rejects(
        "messages.0.content.0.prompt_cache_breakpoint.mode: Input should be 'explicit'",
        param="messages.0.content.0.prompt_cache_breakpoint.mode",
        code="invalid_value",
        messages=[msg("user", [text("a", prompt_cache_breakpoint={"mode": "implicit"})])],
    )


def test_bad_caching_enums_name_the_field() -> None:
    """Checklist 52 and the other §4.5 values."""
    rejects(
        "prompt_cache_retention: Input should be 'in_memory' or '24h'",
        param="prompt_cache_retention",
        code="invalid_value",
        prompt_cache_retention="forever",
    )
    rejects(
        "prompt_cache_options.mode: Input should be 'implicit' or 'explicit'",
        param="prompt_cache_options.mode",
        code="invalid_value",
        prompt_cache_options={"mode": "auto"},
    )
    rejects(
        "prompt_cache_options.ttl: Input should be '30m'",
        param="prompt_cache_options.ttl",
        code="invalid_value",
        prompt_cache_options={"ttl": "1h"},
    )


def test_body_errors() -> None:
    rejects("n: only n=1 is supported by this server", param="n", code="invalid_value", n=2)
    assert decode(n=1).sampling.max_tokens == DEFAULT_MAX_TOKENS
    rejects("messages: Field required", param="messages", messages=None)
    rejects(
        "messages.0.role: Input should be one of 'system', 'developer', 'user', 'assistant', "
        "'tool'",
        param="messages.0.role",
        code="invalid_value",
        messages=[{"role": "function", "content": "x"}],
    )
    rejects(
        "messages.0.tool_call_id: Field required",
        param="messages.0.tool_call_id",
        messages=[msg("tool", "x")],
    )
    rejects(
        "messages.0.content.0.type: Input should be 'text'",
        param="messages.0.content.0.type",
        code="invalid_value",
        messages=[msg("system", [{"type": "refusal", "refusal": "x"}])],
    )
    rejects(
        "messages.0.content.0: image_url content is not supported by this model",
        param="messages.0.content.0",
        messages=[msg("user", [{"type": "image_url", "image_url": {"url": "data:,"}}])],
    )
    rejects(
        "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 "
        "instead.",
        param="max_tokens",
        code="integer_below_min_value",
        max_tokens=0,
    )
    rejects("temperature: Input should be a valid number", param="temperature", temperature="0")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        decode_chat(b"{", tenant=TENANT)


# -- sampling, streaming and headers ---------------------------------------------------------------


def test_sampling() -> None:
    request = decode(
        max_tokens=10, temperature=0, top_p=0.5, stop="END", seed=7, metadata={"k": "v", "n": 1}
    )
    assert request.sampling == Sampling(
        max_tokens=10, temperature=0.0, top_p=0.5, stop_sequences=("END",), seed=7
    )
    assert request.metadata == {"k": "v"}
    both = decode(max_tokens=10, max_completion_tokens=20, stop=["a", "b"])
    assert both.sampling.max_tokens == 20 and both.sampling.stop_sequences == ("a", "b")


def test_stream_options() -> None:
    assert call(stream=True, stream_options={"include_usage": True}).include_usage is True
    assert call(stream=True).include_usage is False
    # Without streaming there is no usage chunk to send.
    assert call(stream_options={"include_usage": True}).include_usage is False


def test_credentials_and_compat_header() -> None:
    assert credentials({"authorization": "Bearer sk-1"}) == ("sk-1", None)
    assert credentials({"x-portkey-api-key": "pk-1"}) == (None, "pk-1")
    assert credentials({"authorization": "Basic abc", "x-api-key": "k"}) == (None, None)
    assert wants_rounding({"x-promptcache-compat": "other, openai-cached-128"})
    assert not wants_rounding({"x-promptcache-compat": "other"})
    assert not wants_rounding({})
