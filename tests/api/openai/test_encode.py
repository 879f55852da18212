"""ChatResult/ChatEvent -> OpenAI wire: usage arithmetic and rounding, bodies, the chunk machine."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.api.openai.encode import ChunkEncoder, Completion, completion_json, usage_json
from promptcache.api.openai.errors import error_detail, status_of
from promptcache.core.response import (
    CacheUsage,
    ChatResult,
    Finished,
    Started,
    TextOut,
    ToolCallOut,
)
from promptcache.errors import (
    AuthenticationFailed,
    EngineFailure,
    InvalidRequest,
    NotFound,
    Overloaded,
    PromptTooLong,
)

from .conftest import FINAL_USAGE, PROMPT_USAGE, TOOL_CALL

COMPLETION = Completion("chatcmpl-1", 1700000000, "gpt-test")


def test_usage_exact() -> None:
    # N = 100 = R 40 + W 30 + U 30; O = 7.
    assert usage_json(FINAL_USAGE) == {
        "prompt_tokens": 100,
        "completion_tokens": 7,
        "total_tokens": 107,
        "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 30, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
            "audio_tokens": 0,
        },
        "cache_read_input_tokens": 40,
        "cache_creation_input_tokens": 30,
    }


def test_usage_without_cache_activity_keeps_the_details() -> None:
    """Checklist 42: ``cached_tokens`` is present and 0, not absent."""
    usage = usage_json(CacheUsage(prompt_tokens=12, output_tokens=3))
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["prompt_tokens_details"]["cache_write_tokens"] == 0
    assert "cache_read_input_tokens" not in usage and "cache_creation_input_tokens" not in usage


@pytest.mark.parametrize(("read", "rounded"), [(0, 0), (127, 0), (128, 128), (1300, 1280)])
def test_usage_rounding(read: int, rounded: int) -> None:
    """Checklist 43: a multiple of 128; ``prompt_tokens`` and the write count stay exact."""
    usage = CacheUsage(prompt_tokens=2000, read_tokens=read, written_tokens={"5m": 77, "1h": 0})
    body = usage_json(usage, round_cached=True)
    assert body["prompt_tokens_details"]["cached_tokens"] == rounded
    assert body["prompt_tokens_details"]["cache_write_tokens"] == 77
    assert body["prompt_tokens"] == 2000
    assert body["cache_read_input_tokens"] == read


def test_completion_body() -> None:
    result = ChatResult([TextOut("Hello"), TOOL_CALL], "tool_use", None, FINAL_USAGE)
    body = completion_json(result, COMPLETION, round_cached=False)
    assert body["id"] == "chatcmpl-1" and body["object"] == "chat.completion"
    assert body["created"] == 1700000000 and body["model"] == "gpt-test"
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello",
        "refusal": None,
        "annotations": [],
        "tool_calls": [
            {
                "id": "toolu_01",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
            }
        ],
    }
    assert body["usage"] == usage_json(FINAL_USAGE)


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("tool_use", "tool_calls"),
        ("model_context_window_exceeded", "length"),
    ],
)
def test_finish_reasons(stop: Any, finish: str) -> None:
    body = completion_json(ChatResult([], stop, None, FINAL_USAGE), COMPLETION, round_cached=False)
    assert body["choices"][0]["finish_reason"] == finish
    assert body["choices"][0]["message"]["content"] == ""


def test_only_a_tool_call_has_null_content() -> None:
    result = ChatResult([TOOL_CALL], "tool_use", None, FINAL_USAGE)
    body = completion_json(result, COMPLETION, round_cached=False)
    assert body["choices"][0]["message"]["content"] is None


def feed_all(encoder: ChunkEncoder) -> list[dict[str, Any]]:
    events = [
        Started(PROMPT_USAGE),
        TextOut("Hel"),
        TextOut(""),
        TextOut("lo"),
        TOOL_CALL,
        ToolCallOut("toolu_02", "get_time", {}),
        Finished("tool_use", None, FINAL_USAGE),
    ]
    return [chunk for event in events for chunk in encoder.feed(event)]


def test_chunks_with_usage() -> None:
    """Checklist 50, encoder side: ``usage: null`` everywhere but the last, ``choices: []``."""
    chunks = feed_all(ChunkEncoder(COMPLETION, include_usage=True, round_cached=False))
    assert all(c["id"] == "chatcmpl-1" for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    *content, last = chunks
    assert all(c["usage"] is None for c in content)
    assert last["choices"] == [] and last["usage"] == usage_json(FINAL_USAGE)
    deltas = [c["choices"][0]["delta"] for c in content]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1:3] == [{"content": "Hel"}, {"content": "lo"}]
    assert [d["tool_calls"][0]["index"] for d in deltas[3:5]] == [0, 1]
    assert deltas[3]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert deltas[5] == {}
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 5 + ["tool_calls"]


def test_chunks_without_usage() -> None:
    chunks = feed_all(ChunkEncoder(COMPLETION, include_usage=False, round_cached=False))
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chunk_order_is_enforced() -> None:
    encoder = ChunkEncoder(COMPLETION, include_usage=False, round_cached=False)
    with pytest.raises(EngineFailure):
        encoder.feed(TextOut("early"))
    encoder.feed(Started(PROMPT_USAGE))
    with pytest.raises(EngineFailure):
        encoder.feed(Started(PROMPT_USAGE))
    encoder.feed(Finished("end_turn", None, FINAL_USAGE))
    assert encoder.is_finished
    with pytest.raises(EngineFailure):
        encoder.feed(TextOut("late"))


def test_error_envelope_values() -> None:
    """Spec §4.8: types, codes and params by class and status."""
    count = InvalidRequest("A maximum of 4 blocks with cache_control may be provided. Found 5.")
    assert error_detail(count) == {
        "message": "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    key = error_detail(AuthenticationFailed("Incorrect API key provided."))
    assert (key["type"], key["code"]) == ("invalid_request_error", "invalid_api_key")
    model = error_detail(NotFound("no such model"))
    assert (model["type"], model["code"]) == ("invalid_request_error", "model_not_found")
    long = error_detail(PromptTooLong("too long"))
    assert (long["param"], long["code"]) == ("messages", "context_length_exceeded")
    assert status_of(Overloaded("busy")) == 503
    assert error_detail(Overloaded("busy"))["type"] == "server_error"
    bug = error_detail(RuntimeError("secret detail"))
    assert bug["type"] == "server_error" and "secret" not in bug["message"]
    assert status_of(RuntimeError()) == 500
