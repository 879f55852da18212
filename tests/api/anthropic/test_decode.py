"""Wire -> ChatRequest: block order and paths, marks, marker shape, schema errors, headers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from promptcache.api.anthropic.decode import check_version, credential, decode_messages
from promptcache.core.request import Block, CacheMark, ChatRequest
from promptcache.errors import InvalidRequest
from promptcache.types import TenantId

from .conftest import body

TENANT = TenantId("t1")


def decode(count_only: bool = False, **overrides: Any) -> ChatRequest:
    raw = json.dumps(body(**overrides)).encode()
    return decode_messages(raw, tenant=TENANT, count_only=count_only)


def rejects(message: str, count_only: bool = False, **overrides: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode(count_only, **overrides)
    assert caught.value.message == message
    assert caught.value.status == 400


def cc(ttl: str | None = None, **extra: Any) -> dict[str, Any]:
    marker: dict[str, Any] = {"type": "ephemeral", **extra}
    if ttl is not None:
        marker["ttl"] = ttl
    return marker


def user(*content: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(content)}


def text(value: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


# -- sections, order and paths ---------------------------------------------------------------------


def test_minimal_request() -> None:
    request = decode()
    assert request.model == "claude-test"
    assert request.tenant == TENANT
    assert request.tools == () and request.system == () and request.auto_cache is None
    assert [(m.role, m.blocks) for m in request.messages] == [("user", (Block("text", "Hi"),))]
    assert request.sampling.max_tokens == 64
    assert request.sampling.temperature == 1.0
    assert request.stream is False


def test_blocks_in_render_order_with_marks_and_paths() -> None:
    request = decode(
        tools=[
            {"name": "a", "input_schema": {}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
            {**WEATHER_TOOL, "cache_control": cc("1h")},
        ],
        system=[text("sys 0"), text("sys 1", cache_control=cc())],
        messages=[
            {"role": "user", "content": "q0"},
            {"role": "assistant", "content": [text("a1")]},
            user(text("u2")),
            user(text("u3", cache_control=cc("5m"))),
        ],
    )
    assert [b.name for b in request.tools] == ["a", "web_search", "get_weather"]
    assert request.tools[2].mark == CacheMark("1h", "tools.2.cache_control.ttl")
    assert [b.text for b in request.system] == ["sys 0", "sys 1"]
    assert request.system[1].mark == CacheMark("5m", "system.1.cache_control.ttl")
    marks = [
        (placed.index, placed.section, placed.block.mark.ttl_path)
        for placed in request.placed_blocks()
        if placed.block.mark is not None
    ]
    assert marks == [
        (2, "tools", "tools.2.cache_control.ttl"),
        (4, "system", "system.1.cache_control.ttl"),
        (8, "messages", "messages.3.content.0.cache_control.ttl"),
    ]


def test_tool_definition_json_keeps_key_order_and_drops_the_marker() -> None:
    reordered = {"input_schema": {"b": 1, "a": 2}, "name": "zé", "cache_control": cc()}
    request = decode(tools=[reordered, WEATHER_TOOL])
    assert request.tools[0].text == '{"input_schema": {"b": 1, "a": 2}, "name": "zé"}'
    assert json.loads(request.tools[1].text) == WEATHER_TOOL
    assert list(json.loads(request.tools[1].text)) == ["name", "description", "input_schema"]
    unmarked = decode(tools=[{k: v for k, v in reordered.items() if k != "cache_control"}])
    assert unmarked.tools[0].text == request.tools[0].text


def test_server_tool_kept_as_raw_json() -> None:
    tool = {"type": "mcp_toolset", "mcp_server_name": "srv", "cache_control": cc()}
    request = decode(tools=[tool])
    assert request.tools[0].text == '{"type": "mcp_toolset", "mcp_server_name": "srv"}'
    assert request.tools[0].name == ""
    assert request.tools[0].mark == CacheMark("5m", "tools.0.cache_control.ttl")


def test_system_string_is_one_block() -> None:
    assert decode(system="You are terse.").system == (Block("text", "You are terse."),)


def test_tool_use_and_tool_result_string() -> None:
    request = decode(
        messages=[
            user(text("weather?")),
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "tu_1",
                        "name": "get_weather",
                        "input": {"z": 1, "city": "Paris"},
                        "cache_control": cc(),
                    },
                ],
            },
            user(
                {"type": "tool_result", "tool_use_id": "tu_1", "content": "12C", "is_error": True}
            ),
        ]
    )
    call = request.messages[1].blocks[0]
    assert call == Block(
        "tool_use",
        '{"z": 1, "city": "Paris"}',
        name="get_weather",
        ref_id="tu_1",
        mark=CacheMark("5m", "messages.1.content.0.cache_control.ttl"),
    )
    assert request.messages[2].blocks == (
        Block("tool_result", "12C", ref_id="tu_1", is_error=True),
    )


def test_tool_result_array_gives_one_block_per_item_and_marks_the_last() -> None:
    request = decode(
        messages=[
            user(
                text("before"),
                {
                    "type": "tool_result",
                    "tool_use_id": "tu_9",
                    "content": [text("one"), text("two", cache_control=cc()), text("three")],
                    "cache_control": cc("1h"),
                },
            )
        ]
    )
    blocks = request.messages[0].blocks
    assert [(b.kind, b.text, b.ref_id) for b in blocks] == [
        ("text", "before", ""),
        ("tool_result", "one", "tu_9"),
        ("tool_result", "two", "tu_9"),
        ("tool_result", "three", "tu_9"),
    ]
    assert blocks[2].mark == CacheMark("5m", "messages.0.content.1.content.1.cache_control.ttl")
    assert blocks[3].mark == CacheMark("1h", "messages.0.content.1.cache_control.ttl")
    assert blocks[1].mark is None


@pytest.mark.parametrize("content", [None, "", []])
def test_tool_result_without_content_is_one_empty_block(content: Any) -> None:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": "x", "cache_control": cc()}
    if content is not None:
        result["content"] = content
    blocks = decode(messages=[user(result)]).messages[0].blocks
    assert blocks == (
        Block(
            "tool_result",
            "",
            ref_id="x",
            mark=CacheMark("5m", "messages.0.content.0.cache_control.ttl"),
        ),
    )


def test_thinking_blocks_are_blocks_but_not_cacheable() -> None:
    request = decode(
        messages=[
            user(text("q")),
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "c2VjcmV0", "cache_control": None},
                    text("answer"),
                ],
            },
        ]
    )
    thinking, redacted, answer = request.messages[1].blocks
    assert thinking == Block("thinking", "hmm", cacheable=False)
    assert redacted == Block("redacted_thinking", "", cacheable=False)
    assert not thinking.is_eligible and not redacted.is_eligible and answer.is_eligible


def test_system_role_message_becomes_a_user_turn_in_place() -> None:
    request = decode(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [text("q", cache_control=cc())]},
        ]
    )
    assert [m.role for m in request.messages] == ["user", "user"]
    assert request.messages[0].blocks == (Block("text", "Be brief."),)
    assert request.system == ()
    assert request.messages[1].blocks[0].mark == CacheMark(
        "5m", "messages.1.content.0.cache_control.ttl"
    )


def test_consecutive_messages_with_the_same_role_are_kept() -> None:
    request = decode(messages=[user(text("a")), user(text("b")), {"role": "user", "content": "c"}])
    assert [m.blocks[0].text for m in request.messages] == ["a", "b", "c"]


def test_documents_and_search_results_render_as_text() -> None:
    request = decode(
        messages=[
            user(
                {
                    "type": "document",
                    "title": "T",
                    "source": {"type": "text", "media_type": "text/plain", "data": "body"},
                    "citations": {"enabled": True},
                    "cache_control": cc(),
                },
                {
                    "type": "document",
                    "source": {"type": "content", "content": [text("p1"), text("p2")]},
                },
                {"type": "document", "source": {"type": "content", "content": "plain"}},
                {
                    "type": "search_result",
                    "title": "R",
                    "source": "https://x",
                    "content": [text("hit")],
                },
            )
        ]
    )
    blocks = request.messages[0].blocks
    assert [(b.kind, b.text) for b in blocks] == [
        ("document", "T\n\nbody"),
        ("document", "p1\n\np2"),
        ("document", "plain"),
        ("document", "R\nhttps://x\nhit"),
    ]
    assert blocks[0].mark == CacheMark("5m", "messages.0.content.0.cache_control.ttl")


def test_other_block_types_render_as_json() -> None:
    request = decode(
        messages=[
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "server_tool_use",
                        "id": "srv_1",
                        "name": "web_search",
                        "input": {"query": "q"},
                    },
                    {
                        "type": "web_search_tool_result",
                        "tool_use_id": "srv_1",
                        "content": [{"type": "web_search_result", "url": "u"}],
                    },
                    {"type": "container_upload", "file_id": "f1", "cache_control": cc("1h")},
                ],
            }
        ]
    )
    use, result, upload = request.messages[0].blocks
    assert (use.kind, use.name, use.ref_id, use.text) == (
        "tool_use",
        "web_search",
        "srv_1",
        '{"query": "q"}',
    )
    assert (result.kind, result.ref_id) == ("tool_result", "srv_1")
    assert json.loads(result.text) == [{"type": "web_search_result", "url": "u"}]
    assert upload.text == '{"type": "container_upload", "file_id": "f1"}'
    assert upload.mark == CacheMark("1h", "messages.0.content.2.cache_control.ttl")


# -- caching fields ------------------------------------------------------------------------------


def test_top_level_cache_control_is_automatic_caching() -> None:
    assert decode(cache_control=cc()).auto_cache == CacheMark("5m", "cache_control.ttl")
    assert decode(cache_control=cc("1h")).auto_cache == CacheMark("1h", "cache_control.ttl")
    assert decode(cache_control=None).auto_cache is None
    raw = json.dumps({**body(), "cache_control": None}).encode()
    assert decode_messages(raw, tenant=TENANT).auto_cache is None


def test_null_block_cache_control_counts_as_absent() -> None:
    request = decode(
        messages=[user(text("", cache_control=None))], system=[text("s", cache_control=None)]
    )
    assert request.messages[0].blocks[0].mark is None and request.system[0].mark is None


@pytest.mark.parametrize(
    ("where", "overrides"),
    [
        ("tools.0", {"tools": [{**WEATHER_TOOL, "cache_control": "MARK"}]}),
        ("system.1", {"system": [text("a"), text("b", cache_control="MARK")]}),
        ("messages.0.content.1", {"messages": [user(text("a"), text("b", cache_control="MARK"))]}),
        (
            "messages.0.content.0.content.1",
            {
                "messages": [
                    user(
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [text("a"), text("b", cache_control="MARK")],
                        }
                    )
                ]
            },
        ),
        (
            "messages.0.content.0",
            {
                "messages": [
                    user({"type": "container_upload", "file_id": "f", "cache_control": "MARK"})
                ]
            },
        ),
        ("", {"cache_control": "MARK"}),
    ],
)
@pytest.mark.parametrize(
    ("marker", "problem"),
    [
        (cc("10m"), "cache_control.ttl: Input should be '5m' or '1h'"),
        (cc(None), None),
        ({"type": "persistent"}, "cache_control.type: Input should be 'ephemeral'"),
        ({"ttl": "5m"}, "cache_control.type: Field required"),
        (cc("5m", scope="global"), None),
        (cc(None, scope="organization"), None),
        (cc("5m", scope=1), "cache_control.scope: Input should be a valid string"),
        (cc("5m", share=True), "cache_control.share: Extra inputs are not permitted"),
    ],
)
def test_marker_shape(
    where: str, overrides: dict[str, Any], marker: Any, problem: str | None
) -> None:
    """Checklist 15 and spec §3.2: the exact texts, with the block's path, everywhere."""
    filled = json.loads(json.dumps(overrides).replace('"MARK"', json.dumps(marker)))
    if problem is None:
        decode(**filled)
        return
    rejects(f"{where}.{problem}" if where else problem, **filled)
    rejects(f"{where}.{problem}" if where else problem, count_only=True, **filled)


def test_scope_changes_nothing() -> None:
    """Spec §3.2: ``scope`` is accepted and ignored; it cannot widen sharing (the tenant comes
    from the credential alone), so a scoped marker decodes to the same request as a plain one."""
    scoped = decode(system=[text("s", cache_control=cc("1h", scope="global"))])
    plain = decode(system=[text("s", cache_control=cc("1h"))])
    assert scoped == plain and scoped.tenant == TENANT


# -- Claude Code's attribution block (spec §3.11) -------------------------------------------------

STATIC = "You are Claude Code, Anthropic's official CLI for Claude."


def billing(hex3: str) -> str:
    return f"x-anthropic-billing-header: cc_version=2.1.197.{hex3}; cc_entrypoint=sdk-cli;"


def claude_code_system(hex3: str) -> list[dict[str, Any]]:
    # The shape Claude Code 2.1.x sends: attribution, then the static prompt, scoped.
    return [text(billing(hex3)), text(STATIC, cache_control=cc("1h", scope="global"))]


def test_attribution_block_is_not_part_of_the_prompt() -> None:
    first = decode(system=claude_code_system("a1f"))
    assert first.system == (
        Block("text", STATIC, mark=CacheMark("1h", "system.1.cache_control.ttl")),
    )
    # Another prompt, another hex: the same canonical request, so the same keys.
    assert decode(system=claude_code_system("07c")) == first
    assert decode(count_only=True, system=claude_code_system("07c")).system == first.system


def test_attribution_line_of_a_string_system_is_dropped() -> None:
    request = decode(system=f"{billing('123')}\n{STATIC}")
    assert request.system == (Block("text", STATIC),)
    assert decode(system=billing("123")).system == ()


def test_attribution_line_keeps_the_rest_of_its_block() -> None:
    request = decode(system=[text(f"{billing('fff')}\nrules", cache_control=cc())])
    assert request.system == (
        Block("text", "rules", mark=CacheMark("5m", "system.0.cache_control.ttl")),
    )


@pytest.mark.parametrize(
    "system",
    [
        [text(STATIC), text(billing("abc"))],  # not leading
        [text(" " + billing("abc"))],  # not at the start of the text
        "See x-anthropic-billing-header: in the docs",
    ],
)
def test_other_mentions_of_the_header_stay(system: Any) -> None:
    request = decode(system=system)
    expected = system if isinstance(system, str) else None
    texts = [block.text for block in request.system]
    assert texts == ([expected] if expected else [item["text"] for item in system])


def test_attribution_block_is_still_validated() -> None:
    rejects(
        "system.0.cache_control.ttl: Input should be '5m' or '1h'",
        system=[text(billing("abc"), cache_control=cc("2h"))],
    )


@pytest.mark.parametrize("kind", ["thinking", "redacted_thinking"])
def test_marker_on_thinking_is_rejected(kind: str) -> None:
    """Checklist 12 and 13."""
    block = {"type": kind, "thinking": "t", "signature": "s", "data": "d", "cache_control": cc()}
    messages = [user(text("q")), {"role": "assistant", "content": [text("a"), block]}]
    rejects(
        f"messages.1.content.1.{kind}.cache_control: Extra inputs are not permitted",
        messages=messages,
    )


@pytest.mark.parametrize(
    ("where", "overrides"),
    [
        ("messages.0.content.0", {"messages": [user(text("", cache_control=cc()))]}),
        ("system.0", {"system": [text("", cache_control=cc("1h"))]}),
        (
            "messages.0.content.0.content.1",
            {
                "messages": [
                    user(
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [text("a"), text("")],
                            "cache_control": cc(),
                        }
                    )
                ]
            },
        ),
        (
            "messages.0.content.0.content.0",
            {
                "messages": [
                    user(
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [text("", cache_control=cc())],
                        }
                    )
                ]
            },
        ),
    ],
)
def test_marker_on_empty_text_is_rejected(where: str, overrides: dict[str, Any]) -> None:
    """Checklist 14 (with the project's path prefix)."""
    rejects(f"{where}.text: cache_control cannot be set for empty text blocks", **overrides)


def test_empty_text_without_marker_is_accepted() -> None:
    block = decode(messages=[user(text(""))]).messages[0].blocks[0]
    assert block == Block("text", "") and not block.is_eligible


# -- pre-warming (spec §3.8) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("stream", {"stream": True}),
        ("thinking", {"thinking": {"type": "enabled", "budget_tokens": 1024}}),
        (
            "output_config.format",
            {"output_config": {"format": {"type": "json_schema", "schema": {}}}},
        ),
        ("tool_choice", {"tool_choice": {"type": "any"}}),
        ("tool_choice", {"tool_choice": {"type": "tool", "name": "get_weather"}}),
    ],
)
def test_prewarm_conflicts(field: str, overrides: dict[str, Any]) -> None:
    """Checklist 34."""
    rejects(
        f"max_tokens: 0 (cache pre-warming) cannot be combined with {field}",
        max_tokens=0,
        **overrides,
    )
    decode(max_tokens=1, **overrides)  # fine with a real generation
    decode(count_only=True, max_tokens=0, **overrides)  # count_tokens does not pre-warm


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"stream": False},
        {"thinking": {"type": "disabled"}},
        {"tool_choice": {"type": "auto"}},
        {"tool_choice": {"type": "none"}},
        {"output_config": {"effort": "low"}},
    ],
)
def test_prewarm_accepted(overrides: dict[str, Any]) -> None:
    request = decode(max_tokens=0, cache_control=cc(), **overrides)
    assert request.sampling.max_tokens == 0


# -- sampling and ignored fields -------------------------------------------------------------------


def test_sampling_fields() -> None:
    request = decode(
        temperature=0,
        top_p=0.9,
        top_k=5,
        stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "u-1", "n": 3},
        stream=True,
    )
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.0, 0.9, 5)
    assert sampling.stop_sequences == ("\n\nHuman:",) and sampling.is_greedy
    assert request.metadata == {"user_id": "u-1"}
    assert request.stream is True


def test_fields_a_local_model_cannot_honour_are_ignored() -> None:
    request = decode(
        service_tier="auto",
        container={"id": "c"},
        mcp_servers=[{"type": "url", "url": "https://x", "name": "m"}],
        context_management={"edits": []},
        inference_geo="us",
        speed="fast",
        diagnostics={"enabled": True},
        some_future_field={"x": 1},
        messages=[user(text("hi", citations=[{"type": "char_location"}], unknown=1))],
    )
    assert request.messages[0].blocks == (Block("text", "hi"),)


def test_count_only_does_not_need_max_tokens() -> None:
    request = decode(count_only=True, max_tokens=None, stream=True, cache_control=cc())
    assert request.sampling.max_tokens == 0 and request.stream is False
    assert request.auto_cache == CacheMark("5m", "cache_control.ttl")


# -- schema errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "overrides"),
    [
        ("max_tokens: Field required", {"max_tokens": None}),
        ("max_tokens: Input should be a valid integer", {"max_tokens": "10"}),
        ("max_tokens: Input should be greater than or equal to 0", {"max_tokens": -1}),
        ("messages: Field required", {"messages": None}),
        ("model: Input should be a valid string", {"model": 3}),
        ("messages: List should have at least 1 item after validation, not 0", {"messages": []}),
        (
            "messages.0.role: Input should be 'user', 'assistant' or 'system'",
            {"messages": [{"role": "tool", "content": "x"}]},
        ),
        (
            "messages.0.content: Input should be a valid string or a list of content blocks",
            {"messages": [{"role": "user", "content": 5}]},
        ),
        ("system: Input should be a valid string or a list of text blocks", {"system": 5}),
        ("system.0.type: Input should be 'text'", {"system": [{"type": "image", "text": "x"}]}),
        ("messages.0.content.0.text: Field required", {"messages": [user({"type": "text"})]}),
        ("messages.0.content.0.type: Field required", {"messages": [user({"text": "x"})]}),
        (
            "messages.0.content.0.type: Input should be a valid string",
            {"messages": [user({"type": 1})]},
        ),
        (
            "messages.0.content.0.input: Input should be a valid dictionary",
            {"messages": [user({"type": "tool_use", "id": "i", "name": "n", "input": "{}"})]},
        ),
        (
            "messages.0.content.0.is_error: Input should be a valid boolean",
            {"messages": [user({"type": "tool_result", "tool_use_id": "t", "is_error": "yes"})]},
        ),
        ("tools.0.input_schema: Field required", {"tools": [{"name": "x"}]}),
        ("tools.0: Input should be a valid dictionary", {"tools": ["x"]}),
        ("stream: Input should be a valid boolean", {"stream": "true"}),
        ("temperature: Input should be a valid number", {"temperature": "hot"}),
    ],
)
def test_schema_errors(message: str, overrides: dict[str, Any]) -> None:
    rejects(message, **overrides)


@pytest.mark.parametrize(
    ("where", "block"),
    [
        ("messages.0.content.1", {"type": "image", "source": {"type": "base64", "data": "x"}}),
        (
            "messages.0.content.1.content.0",
            {
                "type": "tool_result",
                "tool_use_id": "t",
                "content": [{"type": "image", "source": {}}],
            },
        ),
        (
            "messages.0.content.1.source.content.0",
            {"type": "document", "source": {"type": "content", "content": [{"type": "image"}]}},
        ),
    ],
)
def test_images_are_rejected(where: str, block: dict[str, Any]) -> None:
    rejects(f"{where}: images are not supported by this model", messages=[user(text("a"), block)])


@pytest.mark.parametrize("source_type", ["base64", "url", "file"])
def test_non_text_documents_are_rejected(source_type: str) -> None:
    block = {"type": "document", "source": {"type": source_type, "data": "JVBERi0="}}
    with pytest.raises(
        InvalidRequest,
        match=r"^messages\.0\.content\.0\.source\.type: only "
        r"plain-text document sources",
    ):
        decode(messages=[user(block)])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"\xff\xfe\x00", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b"", "request body is not valid JSON"),
        (b"[" * 100_000, "request body is not valid JSON"),
    ],
)
def test_body_that_is_not_a_json_object(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^{message}"):
        decode_messages(raw, tenant=TENANT)


# -- headers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-api-key": "k1"}, "k1"),
        ({"authorization": "Bearer k2"}, "k2"),
        ({"authorization": "bearer  k3 "}, "k3"),
        ({"x-api-key": "k1", "authorization": "Bearer k2"}, "k1"),
        ({"authorization": "Basic abc"}, None),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_credential(headers: dict[str, str], expected: str | None) -> None:
    assert credential(headers) == expected


def test_anthropic_version() -> None:
    """Checklist 37 and spec §3.1."""
    check_version({"anthropic-version": "2023-06-01"})
    check_version({"anthropic-version": "2023-01-01"})
    check_version({"anthropic-version": "2026-10-21"})  # what the pinned anthropic SDK sends
    with pytest.raises(InvalidRequest) as missing:
        check_version({})
    assert missing.value.message == "anthropic-version: header is required"
    with pytest.raises(
        InvalidRequest, match=r"^anthropic-version: '2024-01-01' is not a supported"
    ):
        check_version({"anthropic-version": "2024-01-01"})


def test_first_bad_block_in_render_order_is_reported() -> None:
    bad = {"type": "ephemeral", "ttl": "2h"}
    rejects(
        "tools.0.cache_control.ttl: Input should be '5m' or '1h'",
        tools=[{**WEATHER_TOOL, "cache_control": bad}],
        system=[text("s", cache_control=bad)],
        messages=[user(text("m", cache_control=bad))],
    )
    rejects(
        "system.0.cache_control.ttl: Input should be '5m' or '1h'",
        system=[text("s", cache_control=bad)],
        messages=[user(text("m", cache_control=bad))],
    )
