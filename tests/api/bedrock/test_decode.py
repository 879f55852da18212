"""Converse, InvokeModel and CountTokens bodies -> ``ChatRequest`` (spec §1.1, §5.2, §5.3, §5.8)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from promptcache.api.anthropic.decode import decode_messages
from promptcache.api.anthropic.rules import ANTHROPIC_RULES
from promptcache.api.bedrock.decode import (
    DEFAULT_MAX_TOKENS,
    MISPLACED_MESSAGE,
    decode_converse,
    decode_count_tokens,
    decode_invoke,
    has_cache_points,
    model_candidates,
)
from promptcache.api.bedrock.rules import BEDROCK_RULES
from promptcache.core.request import Block, CacheMark, ChatRequest, Sampling
from promptcache.errors import InvalidRequest
from promptcache.types import DEFAULT_TENANT
from tests.api.bedrock.conftest import MODEL_ID, converse_body, invoke_body

POINT = {"cachePoint": {"type": "default"}}
POINT_1H = {"cachePoint": {"type": "default", "ttl": "1h"}}
WEATHER = {
    "toolSpec": {
        "name": "get_weather",
        "description": "Weather for a city",
        "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
}


def decode(tool_cache_points: bool = True, **body: Any) -> ChatRequest:
    return decode_converse(
        converse_body(**body),
        model_id=MODEL_ID,
        tenant=DEFAULT_TENANT,
        tool_cache_points=tool_cache_points,
    )


def error(tool_cache_points: bool = True, **body: Any) -> str:
    with pytest.raises(InvalidRequest) as info:
        decode(tool_cache_points, **body)
    return info.value.message


def user(*content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(content)}]


def marks(request: ChatRequest) -> dict[int, str]:
    return {p.index: p.block.mark.ttl for p in request.placed_blocks() if p.block.mark}


# -- blocks ----------------------------------------------------------------------------------------


def test_sections_and_blocks() -> None:
    request = decode(
        toolConfig={"tools": [WEATHER, {"systemTool": {"name": "nova_grounding"}}]},
        system=[{"text": "Be brief."}, {"guardContent": {"text": {"text": "g"}}}],
        messages=[
            {"role": "user", "content": [{"text": "Weather?"}]},
            {
                "role": "assistant",
                "content": [
                    {"reasoningContent": {"reasoningText": {"text": "hmm", "signature": "s"}}},
                    {"reasoningContent": {"redactedContent": "AAAA"}},
                    {
                        "toolUse": {
                            "toolUseId": "t1",
                            "name": "get_weather",
                            "input": {"b": 1, "a": 2},
                        }
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "toolResult": {
                            "toolUseId": "t1",
                            "status": "error",
                            "content": [{"text": "line 1"}, {"json": {"temp": 20}}],
                        }
                    }
                ],
            },
            {"role": "system", "content": [{"text": "late system text"}]},
        ],
    )
    assert request.model == MODEL_ID
    assert request.auto_cache is None  # no implicit breakpoint on Converse (§5.2)
    assert [b.kind for b in request.tools] == ["tool", "tool"]
    assert request.tools[0].name == "get_weather"
    assert json.loads(request.tools[1].text) == {"name": "nova_grounding"}
    assert request.system == (
        Block("text", text="Be brief."),
        Block("text", text='{"guardContent": {"text": {"text": "g"}}}'),
    )
    assistant = request.messages[1]
    assert assistant.role == "assistant"
    assert assistant.blocks == (
        Block("thinking", text="hmm", cacheable=False),
        Block("redacted_thinking", cacheable=False),
        Block("tool_use", text='{"b": 1, "a": 2}', name="get_weather", ref_id="t1"),
    )
    # A toolResult is one block; its items are joined as the Anthropic items would be.
    assert request.messages[2].blocks == (
        Block("tool_result", text='line 1\n{"temp": 20}', ref_id="t1", is_error=True),
    )
    assert request.messages[3].role == "user"
    assert not has_cache_points(request)


def test_same_canonical_blocks_as_anthropic() -> None:
    """Checklist 67: equivalent requests render identically on both surfaces."""
    converse = decode(
        toolConfig={"tools": [WEATHER, POINT]},
        system=[{"text": "You are a helpful assistant"}, POINT],
        messages=user({"text": "Summarize the above document"}),
    )
    anthropic = decode_messages(
        json.dumps(
            {
                "model": "m",
                "max_tokens": 5,
                "tools": [
                    {
                        "name": "get_weather",
                        "description": "Weather for a city",
                        "input_schema": WEATHER["toolSpec"]["inputSchema"]["json"],
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
                "system": [
                    {
                        "type": "text",
                        "text": "You are a helpful assistant",
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
                "messages": [{"role": "user", "content": "Summarize the above document"}],
            }
        ).encode(),
        tenant=DEFAULT_TENANT,
    )
    unmarked = [
        (p.section, p.role, Block(p.block.kind, p.block.text, p.block.name))
        for p in converse.placed_blocks()
    ]
    assert unmarked == [
        (p.section, p.role, Block(p.block.kind, p.block.text, p.block.name))
        for p in anthropic.placed_blocks()
    ]
    assert marks(converse) == marks(anthropic) == {0: "5m", 1: "5m"}


def test_documents() -> None:
    text = base64.b64encode(b"bytes body").decode()
    request = decode(
        messages=user(
            {"document": {"name": "a", "format": "txt", "source": {"text": "plain"}}},
            {"document": {"name": "b", "context": "ctx", "source": {"content": [{"text": "c1"}]}}},
            {"document": {"name": "c", "format": "md", "source": {"bytes": text}}},
        )
    )
    assert [b.text for b in request.messages[0].blocks] == [
        "a\n\nplain",
        "b\n\nctx\n\nc1",
        "c\n\nbytes body",
    ]
    pdf = {"document": {"name": "d", "format": "pdf", "source": {"bytes": text}}}
    assert "only text documents" in error(messages=user(pdf))


def test_media_is_not_supported() -> None:
    image = {"image": {"format": "png", "source": {"bytes": "AAAA"}}}
    assert error(messages=user(image)) == (
        "messages.1.member.content.1.member.image: image content is not supported by this model"
    )


def test_sampling() -> None:
    request = decode(
        inferenceConfig={"maxTokens": 7, "temperature": 0, "topP": 0.5, "stopSequences": ["X"]},
        additionalModelRequestFields={"top_k": 3},
        requestMetadata={"team": "a"},
    )
    assert request.sampling == Sampling(
        max_tokens=7, temperature=0.0, top_p=0.5, top_k=3, stop_sequences=("X",)
    )
    assert request.metadata == {"team": "a"}
    assert decode().sampling == Sampling(max_tokens=DEFAULT_MAX_TOKENS)


# -- cachePoints -----------------------------------------------------------------------------------


def test_cache_point_marks_the_block_before_it() -> None:
    request = decode(
        toolConfig={"tools": [WEATHER, POINT_1H]},
        system=[{"text": "s0"}, {"text": "s1"}, POINT],
        messages=user({"text": "u0"}, POINT, {"text": "u1"}),
    )
    assert marks(request) == {0: "1h", 2: "5m", 3: "5m"}
    assert request.system[1].mark == CacheMark("5m", "system.3.member.cachePoint.ttl")
    assert has_cache_points(request)


def test_cache_point_at_the_head_of_messages_marks_the_previous_section() -> None:
    request = decode(
        toolConfig={"tools": [WEATHER]},
        system=[{"text": "s0"}],
        messages=user(POINT, {"text": "u0"}),
    )
    assert marks(request) == {1: "5m"}  # the system block: tools and system are cached
    no_system = decode(toolConfig={"tools": [WEATHER]}, messages=user(POINT, {"text": "u0"}))
    assert marks(no_system) == {0: "5m"}


@pytest.mark.parametrize(
    "body",
    [
        {"system": [POINT, {"text": "s"}]},
        {"messages": user(POINT, {"text": "u"})},
        {"system": [{"text": "s"}, POINT, POINT]},
        {"toolConfig": {"tools": [WEATHER, POINT]}, "system": [POINT, {"text": "s"}]},
    ],
    ids=["first-system", "first-message", "twice", "across-sections"],
)
def test_misplaced_cache_point(body: dict[str, Any]) -> None:
    assert error(**body) == MISPLACED_MESSAGE


def test_cache_point_after_an_unmarkable_block() -> None:
    reasoning = {"reasoningContent": {"reasoningText": {"text": "t"}}}
    messages = [*user({"text": "q"}), {"role": "assistant", "content": [reasoning, POINT]}]
    assert error(messages=messages) == "A cachePoint cannot follow a reasoningContent block."
    assert error(messages=user({"text": ""}, POINT)) == (
        "A cachePoint cannot follow an empty text block."
    )


def test_tool_cache_point_on_a_model_without_tool_caching() -> None:
    body = {"toolConfig": {"tools": [WEATHER, POINT]}}
    assert error(tool_cache_points=False, **body) == (
        f"Tool caching is not supported for model {MODEL_ID}."
    )
    # The usual workaround: a cachePoint at the head of the messages (§5.2).
    request = decode(
        tool_cache_points=False,
        toolConfig={"tools": [WEATHER]},
        system=[{"text": "s"}],
        messages=user(POINT, {"text": "u"}),
    )
    assert marks(request) == {1: "5m"}


@pytest.mark.parametrize(
    ("point", "message"),
    [
        (
            {"type": "default", "ttl": "10m"},
            "Value '10m' at 'system.2.member.cachePoint.ttl' failed to satisfy constraint: "
            "Member must satisfy enum value set: [5m, 1h]",
        ),
        (
            {"type": "ephemeral"},
            "Value 'ephemeral' at 'system.2.member.cachePoint.type' failed to satisfy "
            "constraint: Member must satisfy enum value set: [default]",
        ),
        (
            {"ttl": "5m"},
            "Value null at 'system.2.member.cachePoint.type' failed to satisfy constraint: "
            "Member must not be null",
        ),
    ],
    ids=["ttl", "type", "missing-type"],
)
def test_cache_point_shape(point: dict[str, Any], message: str) -> None:
    assert error(system=[{"text": "s"}, {"cachePoint": point}]) == (
        f"1 validation error detected: {message}"
    )


def test_union_members_and_schema_errors() -> None:
    assert error(messages=user({"text": "a", "cachePoint": {"type": "default"}})) == (
        "1 validation error detected: Value at 'messages.1.member.content.1.member' failed to "
        "satisfy constraint: Member must have exactly one field set"
    )
    assert "Member must have exactly one field set" in error(messages=user({"unknown": 1}))
    assert error(inferenceConfig={"maxTokens": 0, "temperature": 2}) == (
        "2 validation errors detected: Value '0' at 'inferenceConfig.maxTokens' failed to "
        "satisfy constraint: Member must have value greater than or equal to 1; Value '2' at "
        "'inferenceConfig.temperature' failed to satisfy constraint: Member must have value "
        "less than or equal to 1"
    )
    assert error(messages=[]) == (
        "1 validation error detected: Value at 'messages' failed to satisfy constraint: "
        "Member must have length greater than or equal to 1"
    )
    assert error(messages=user({"text": 5})) == (
        "1 validation error detected: Value '5' at 'messages.1.member.content.1.member.text' "
        "failed to satisfy constraint: Input should be a valid string"
    )


def test_message_with_only_a_cache_point_is_empty() -> None:
    messages = [*user({"text": "q"}), {"role": "assistant", "content": [POINT]}]
    assert error(messages=messages) == (
        "The content field in the Message object at messages.1 is empty. "
        "Add a ContentBlock object to the content field and try again."
    )


# -- InvokeModel and CountTokens -------------------------------------------------------------------


def test_invoke_decodes_the_anthropic_body() -> None:
    marked = [{"type": "text", "text": "doc", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    request = decode_invoke(
        invoke_body(system=marked, cache_control={"type": "ephemeral"}, stream=True),
        model_id=MODEL_ID,
        tenant=DEFAULT_TENANT,
    )
    assert request.model == MODEL_ID
    assert request.system == (
        Block("text", "doc", mark=CacheMark("1h", "system.0.cache_control.ttl")),
    )
    assert request.auto_cache is not None  # top-level cache_control accepted (§3.4)
    assert request.sampling.max_tokens == 64
    assert not request.stream  # the route decides


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (invoke_body(anthropic_version=None), "required key [anthropic_version] not found"),
        (invoke_body(anthropic_version="2023-06-01"), "bedrock-2023-05-31"),
        (invoke_body(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        (
            invoke_body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a", "cache_control": {"type": "x"}}],
                    }
                ]
            ),
            "messages.0.content.0.cache_control.type: Input should be 'ephemeral'",
        ),
    ],
    ids=["no-version", "wrong-version", "max-tokens-0", "anthropic-text"],
)
def test_invoke_errors(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_invoke(body, model_id=MODEL_ID, tenant=DEFAULT_TENANT)


def test_count_tokens_bodies() -> None:
    kwargs: dict[str, Any] = {"model_id": MODEL_ID, "tenant": DEFAULT_TENANT}
    chat, rules = decode_count_tokens({"input": {"converse": converse_body()}}, **kwargs)
    assert rules is BEDROCK_RULES and chat.messages[0].blocks == (Block("text", "Hi"),)
    raw = json.dumps(invoke_body(max_tokens=None))
    for encoded in (base64.b64encode(raw.encode()).decode(), raw):
        chat, rules = decode_count_tokens({"input": {"invokeModel": {"body": encoded}}}, **kwargs)
        assert rules is ANTHROPIC_RULES and chat.messages[0].blocks == (Block("text", "Hi"),)
    for bad in ({}, {"converse": converse_body(), "invokeModel": {"body": raw}}):
        with pytest.raises(InvalidRequest, match="exactly one field set"):
            decode_count_tokens({"input": bad}, **kwargs)
    with pytest.raises(InvalidRequest, match="base64"):
        decode_count_tokens({"input": {"invokeModel": {"body": "not base64!"}}}, **kwargs)
    with pytest.raises(InvalidRequest, match="Tool caching"):
        decode_count_tokens(
            {"input": {"converse": converse_body(toolConfig={"tools": [WEATHER, POINT]})}},
            tool_cache_points=False,
            **kwargs,
        )


def test_model_candidates() -> None:
    assert model_candidates(MODEL_ID) == [MODEL_ID]
    assert model_candidates("us.anthropic.claude-x:0") == [
        "us.anthropic.claude-x:0",
        "anthropic.claude-x:0",
    ]
    arn = "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.anthropic.claude-x:0"
    assert model_candidates(arn) == [arn, "eu.anthropic.claude-x:0", "anthropic.claude-x:0"]
    foundation = "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-pro-v1:0"
    assert model_candidates(foundation) == [foundation, "amazon.nova-pro-v1:0"]
