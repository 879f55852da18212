"""ChatEvent/ChatResult -> wire: usage arithmetic, message JSON, the streaming state machine."""

from __future__ import annotations

import re

import pytest

from promptcache.api.anthropic.encode import (
    StreamEncoder,
    collect,
    count_json,
    delta_usage_json,
    message_json,
    new_message_id,
    new_request_id,
    usage_json,
)
from promptcache.api.streaming import sse_event
from promptcache.core.response import CacheUsage, ChatEvent, Finished, Started, TextOut, ToolCallOut
from promptcache.errors import EngineFailure

from .conftest import CANNED, FINAL_USAGE, PROMPT_USAGE, TOOL_CALL

USAGES = [
    CacheUsage(prompt_tokens=0),
    CacheUsage(prompt_tokens=57, output_tokens=3),
    CacheUsage(prompt_tokens=5000, read_tokens=4096, output_tokens=9),
    CacheUsage(prompt_tokens=5000, written_tokens={"5m": 3000, "1h": 1500}),
    FINAL_USAGE,
]


@pytest.mark.parametrize("usage", USAGES)
def test_usage_arithmetic(usage: CacheUsage) -> None:
    """Checklist 3, 4 and 5: N = R + W + U, W = W5m + W1h, cache fields always integers."""
    wire = usage_json(usage)
    for key in (
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
    ):
        assert type(wire[key]) is int
    creation = wire["cache_creation"]
    assert set(creation) == {"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"}
    assert all(type(value) is int for value in creation.values())
    total = (
        wire["input_tokens"] + wire["cache_read_input_tokens"] + wire["cache_creation_input_tokens"]
    )
    assert total == usage.prompt_tokens
    assert wire["cache_creation_input_tokens"] == sum(creation.values())
    assert wire["service_tier"] == "standard"


def test_usage_fields() -> None:
    assert usage_json(FINAL_USAGE) == {
        "input_tokens": 30,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 40,
        "cache_creation": {"ephemeral_5m_input_tokens": 20, "ephemeral_1h_input_tokens": 10},
        "output_tokens": 7,
        "service_tier": "standard",
    }
    assert delta_usage_json(FINAL_USAGE) == {
        "input_tokens": 30,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 40,
        "output_tokens": 7,
    }


def test_message_json() -> None:
    body = message_json(collect(CANNED), model="claude-test", message_id="msg_x")
    assert body == {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [
            {"type": "text", "text": "Hello, world"},
            {
                "type": "tool_use",
                "id": "toolu_01",
                "name": "get_weather",
                "input": {"city": "Paris", "unit": "C"},
            },
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": usage_json(FINAL_USAGE),
    }


def test_prewarm_message_has_empty_content() -> None:
    """Spec §3.8: max_tokens 0 gives content [], stop_reason max_tokens, output_tokens 0."""
    events: list[ChatEvent] = [Started(PROMPT_USAGE), Finished("max_tokens", None, PROMPT_USAGE)]
    body = message_json(collect(events), model="m", message_id="msg_x")
    assert body["content"] == [] and body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 0
    assert body["usage"]["cache_creation_input_tokens"] == 30


def test_collect_joins_adjacent_text_only() -> None:
    events: list[ChatEvent] = [
        Started(PROMPT_USAGE),
        TextOut(""),
        TextOut("a"),
        TextOut("b"),
        TOOL_CALL,
        TextOut(""),
        TextOut("c"),
        Finished("stop_sequence", "END", FINAL_USAGE),
    ]
    result = collect(events)
    assert result.content == [TextOut("ab"), TOOL_CALL, TextOut("c")]
    assert (result.stop_reason, result.stop_sequence) == ("stop_sequence", "END")


def test_collect_without_finished_fails() -> None:
    with pytest.raises(EngineFailure):
        collect([Started(PROMPT_USAGE), TextOut("a")])


def test_count_json() -> None:
    assert count_json(1234) == {"input_tokens": 1234}


def test_stream_events_in_order() -> None:
    """Spec §3.7 and checklist 35/36 at the encoder level."""
    encoder = StreamEncoder(model="claude-test", message_id="msg_x")
    events = [sse for event in CANNED for sse in encoder.feed(event)]
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start == {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage_json(PROMPT_USAGE), "output_tokens": 1},
    }
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert [data["delta"] for _, data in events[2:4]] == [
        {"type": "text_delta", "text": "Hello"},
        {"type": "text_delta", "text": ", world"},
    ]
    assert events[4][1] == {"type": "content_block_stop", "index": 0}
    assert events[5][1]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_01",
        "name": "get_weather",
        "input": {},
    }
    assert events[6][1] == {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": TOOL_CALL.input_json},
    }
    assert events[7][1]["index"] == 1
    assert events[8][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": delta_usage_json(FINAL_USAGE),
    }
    assert encoder.is_finished


def test_stream_text_after_tool_call_opens_a_new_block() -> None:
    encoder = StreamEncoder(model="m", message_id="msg_x")
    events: list[ChatEvent] = [
        Started(PROMPT_USAGE),
        TOOL_CALL,
        TextOut(""),
        TextOut("after"),
        ToolCallOut("toolu_02", "f", {}),
        Finished("end_turn", None, FINAL_USAGE),
    ]
    sses = [sse for event in events for sse in encoder.feed(event)]
    starts = [data["index"] for name, data in sses if name == "content_block_start"]
    stops = [data["index"] for name, data in sses if name == "content_block_stop"]
    assert starts == stops == [0, 1, 2]


def test_stream_prewarm_shape_has_no_blocks() -> None:
    encoder = StreamEncoder(model="m", message_id="msg_x")
    names = [
        name
        for event in (Started(PROMPT_USAGE), Finished("max_tokens", None, PROMPT_USAGE))
        for name, _ in encoder.feed(event)
    ]
    assert names == ["message_start", "message_delta", "message_stop"]


@pytest.mark.parametrize(
    "events",
    [
        [TextOut("a")],
        [Started(PROMPT_USAGE), Started(PROMPT_USAGE)],
        [Started(PROMPT_USAGE), Finished("end_turn", None, FINAL_USAGE), TextOut("late")],
    ],
)
def test_stream_out_of_order_events_fail(events: list[ChatEvent]) -> None:
    encoder = StreamEncoder(model="m", message_id="msg_x")
    with pytest.raises(EngineFailure):
        for event in events:
            encoder.feed(event)


def test_sse_wire_format() -> None:
    assert sse_event({"type": "ping"}, event="ping") == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert sse_event({"t": "a\nb é"}) == 'data: {"t":"a\\nb é"}\n\n'.encode()
    assert sse_event("[DONE]") == b"data: [DONE]\n\n"


def test_ids() -> None:
    assert re.fullmatch(r"msg_[A-Za-z0-9]{24}", new_message_id())
    assert re.fullmatch(r"req_[A-Za-z0-9]{24}", new_request_id())
    assert new_request_id() != new_request_id()
