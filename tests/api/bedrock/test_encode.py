"""Events and results -> Bedrock wire: usage rules, stream state machines, errors (§5.3-§5.7)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from promptcache.api.bedrock.encode import (
    ConverseStreamEncoder,
    InvokeStreamEncoder,
    converse_json,
    invoke_headers,
    usage_json,
)
from promptcache.api.bedrock.errors import InvalidSignature, aws_error, exception_frame
from promptcache.core.response import (
    CacheUsage,
    ChatEvent,
    ChatResult,
    Finished,
    Started,
    TextOut,
)
from promptcache.errors import (
    AuthenticationFailed,
    EngineFailure,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    PromptCacheError,
    PromptTooLong,
    RequestTooLarge,
)
from tests.api.anthropic.conftest import CANNED, FINAL_USAGE, PROMPT_USAGE, TOOL_CALL
from tests.api.bedrock.conftest import stream_events

# N = 100 = R 40 + W1h 10 + W5m 20 + U 30; O = 7.
FULL_USAGE = {
    "inputTokens": 30,
    "outputTokens": 7,
    "totalTokens": 107,
    "cacheReadInputTokens": 40,
    "cacheWriteInputTokens": 30,
    "cacheDetails": [{"ttl": "1h", "inputTokens": 10}, {"ttl": "5m", "inputTokens": 20}],
}


def test_usage_with_cache_points() -> None:
    usage = usage_json(FINAL_USAGE, has_cache_points=True)
    assert usage == FULL_USAGE
    # Checklist 55 and 56: totals add up; cacheDetails sums to the writes, 1h first.
    assert usage["totalTokens"] == sum(
        usage[k]
        for k in ("inputTokens", "cacheReadInputTokens", "cacheWriteInputTokens", "outputTokens")
    )
    assert sum(d["inputTokens"] for d in usage["cacheDetails"]) == usage["cacheWriteInputTokens"]


@pytest.mark.parametrize(
    ("written", "details"),
    [
        ({"5m": 0, "1h": 0}, []),
        ({"5m": 5, "1h": 0}, [{"ttl": "5m", "inputTokens": 5}]),
        ({"5m": 0, "1h": 5}, [{"ttl": "1h", "inputTokens": 5}]),
    ],
)
def test_cache_details_omit_zero_classes(written: dict[str, int], details: list[Any]) -> None:
    usage = CacheUsage(prompt_tokens=50, read_tokens=10, written_tokens=written)  # type: ignore[arg-type]
    assert usage_json(usage, has_cache_points=True)["cacheDetails"] == details


def test_usage_without_cache_points_omits_the_cache_fields() -> None:
    assert usage_json(CacheUsage(prompt_tokens=12, output_tokens=3), has_cache_points=False) == {
        "inputTokens": 12,
        "outputTokens": 3,
        "totalTokens": 15,
    }


def test_converse_json() -> None:
    result = ChatResult([TextOut("Hello"), TOOL_CALL], "tool_use", None, FINAL_USAGE)
    assert converse_json(result, has_cache_points=True, latency_ms=12) == {
        "output": {
            "message": {
                "role": "assistant",
                "content": [
                    {"text": "Hello"},
                    {
                        "toolUse": {
                            "toolUseId": "toolu_01",
                            "name": "get_weather",
                            "input": {"city": "Paris", "unit": "C"},
                        }
                    },
                ],
            }
        },
        "stopReason": "tool_use",
        "usage": FULL_USAGE,
        "metrics": {"latencyMs": 12},
    }


def feed_all(encoder: ConverseStreamEncoder | InvokeStreamEncoder, events: list[ChatEvent]) -> Any:
    return [out for event in events for out in encoder.feed(event)]


def test_converse_stream_events() -> None:
    encoder = ConverseStreamEncoder(has_cache_points=True, started_at=time.monotonic())
    out = feed_all(encoder, CANNED)
    assert [name for name, _ in out] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockStop",
        "contentBlockStart",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert out[0][1] == {"role": "assistant"}
    assert out[2][1] == {"contentBlockIndex": 0, "delta": {"text": ", world"}}
    assert out[4][1] == {
        "contentBlockIndex": 1,
        "start": {"toolUse": {"toolUseId": "toolu_01", "name": "get_weather"}},
    }
    assert out[5][1] == {
        "contentBlockIndex": 1,
        "delta": {"toolUse": {"input": '{"city": "Paris", "unit": "C"}'}},
    }
    assert out[7][1] == {"stopReason": "tool_use"}
    assert out[8][1]["usage"] == FULL_USAGE
    assert isinstance(out[8][1]["metrics"]["latencyMs"], int)
    assert encoder.is_finished


def test_converse_stream_text_after_tool_opens_a_new_block() -> None:
    encoder = ConverseStreamEncoder(has_cache_points=False, started_at=time.monotonic())
    events = [
        Started(PROMPT_USAGE),
        TOOL_CALL,
        TextOut(""),
        TextOut("after"),
        Finished("end_turn", None, FINAL_USAGE),
    ]
    out = feed_all(encoder, events)
    indices = [data.get("contentBlockIndex") for _, data in out]
    assert indices == [None, 0, 0, 0, 1, 1, None, None]
    assert "cacheReadInputTokens" not in out[-1][1]["usage"]


@pytest.mark.parametrize(
    "events",
    [[TextOut("x")], [Started(PROMPT_USAGE), Started(PROMPT_USAGE)], [*CANNED, TextOut("x")]],
    ids=["no-start", "two-starts", "after-finish"],
)
def test_stream_encoders_reject_out_of_order_events(events: list[ChatEvent]) -> None:
    for encoder in (
        ConverseStreamEncoder(has_cache_points=True, started_at=0.0),
        InvokeStreamEncoder(model="m", message_id="msg_bdrk_1", started_at=0.0),
    ):
        with pytest.raises(EngineFailure):
            feed_all(encoder, events)


def test_invoke_stream_chunks_are_base64_anthropic_events() -> None:
    encoder = InvokeStreamEncoder(model="m", message_id="msg_bdrk_1", started_at=time.monotonic())
    chunks = feed_all(encoder, CANNED)
    assert {name for name, _ in chunks} == {"chunk"}
    decoded = [json.loads(base64.b64decode(data["bytes"])) for _, data in chunks]
    assert [d["type"] for d in decoded] == [
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
    start_usage = decoded[0]["message"]["usage"]
    assert start_usage["cache_read_input_tokens"] == 40
    assert start_usage["cache_creation"] == {
        "ephemeral_5m_input_tokens": 20,
        "ephemeral_1h_input_tokens": 10,
    }
    metrics = decoded[-1]["amazon-bedrock-invocationMetrics"]
    assert {k: v for k, v in metrics.items() if "Latency" not in k} == {
        "inputTokenCount": 30,
        "outputTokenCount": 7,
        "cacheReadInputTokenCount": 40,
        "cacheWriteInputTokenCount": 30,
    }
    assert encoder.is_finished


def test_invoke_headers() -> None:
    assert invoke_headers(FINAL_USAGE, latency_ms=9) == {
        "X-Amzn-Bedrock-Input-Token-Count": "30",
        "X-Amzn-Bedrock-Output-Token-Count": "7",
        "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": "40",
        "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": "30",
        "X-Amzn-Bedrock-Invocation-Latency": "9",
    }


@pytest.mark.parametrize(
    ("exc", "status", "code", "stream_code"),
    [
        (InvalidRequest("bad"), 400, "ValidationException", "validationException"),
        (PromptTooLong("long"), 400, "ValidationException", "validationException"),
        (RequestTooLarge("big"), 400, "ValidationException", "validationException"),
        (InvalidSignature("sig"), 403, "InvalidSignatureException", "internalServerException"),
        (
            AuthenticationFailed("key"),
            403,
            "UnrecognizedClientException",
            "internalServerException",
        ),
        (PermissionDenied("no"), 403, "AccessDeniedException", "internalServerException"),
        (NotFound("model"), 404, "ResourceNotFoundException", "internalServerException"),
        (Overloaded("busy"), 503, "ServiceUnavailableException", "serviceUnavailableException"),
        (EngineFailure("boom"), 424, "ModelErrorException", "modelStreamErrorException"),
        (PromptCacheError("odd"), 500, "InternalServerException", "internalServerException"),
        (RuntimeError("secret"), 500, "InternalServerException", "internalServerException"),
    ],
)
def test_error_mapping(exc: Exception, status: int, code: str, stream_code: str) -> None:
    error, message = aws_error(exc)
    assert (error.status, error.code, error.stream_code) == (status, code, stream_code)
    assert "secret" not in message
    assert stream_events(exception_frame(exc)) == [(stream_code, {"message": message})]


def test_unknown_credential_text_is_aws_not_anthropic() -> None:
    _, message = aws_error(AuthenticationFailed("invalid x-api-key"))
    assert message == "The security token included in the request is invalid."
