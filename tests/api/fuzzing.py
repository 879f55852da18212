"""Fuzzing helpers: valid request bodies per route, hypothesis mutations of them, raw malformed
bodies, and the checks every response must pass (status, envelope, well-formed streams)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from botocore.eventstream import EventStreamBuffer
from hypothesis import strategies as st

Protocol = Literal["anthropic", "openai", "bedrock"]
Loc = tuple[str | int, ...]

ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
JSON_HEADERS = {"content-type": "application/json"}
OVERLOADED = frozenset({503, 529})
"""The only 5xx statuses a client may get for its input: the engine's queue is full."""

_TOOL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def _anthropic(stream: bool) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 4,
        "stream": stream,
        "temperature": 0.5,
        "stop_sequences": ["zz"],
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "weather", "description": "w", "input_schema": _TOOL_SCHEMA}],
        "metadata": {"user_id": "u1"},
        "messages": [
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "P"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                    {"type": "text", "text": "Thanks", "cache_control": {"type": "ephemeral"}},
                ],
            },
        ],
    }


def _openai(stream: bool) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 4,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["zz"],
        "seed": 7,
        "tools": [
            {"type": "function", "function": {"name": "weather", "parameters": _TOOL_SCHEMA}}
        ],
        "prompt_cache_key": "k",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"P"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
    }


def _converse() -> dict[str, Any]:
    return {
        "system": [{"text": "Be brief."}, {"cachePoint": {"type": "default"}}],
        "inferenceConfig": {
            "maxTokens": 4,
            "temperature": 0.5,
            "topP": 0.9,
            "stopSequences": ["z"],
        },
        "toolConfig": {
            "tools": [{"toolSpec": {"name": "weather", "inputSchema": {"json": _TOOL_SCHEMA}}}]
        },
        "additionalModelRequestFields": {"top_k": 5},
        "requestMetadata": {"k": "v"},
        "messages": [
            {"role": "user", "content": [{"text": "Hi"}]},
            {
                "role": "assistant",
                "content": [{"toolUse": {"toolUseId": "t1", "name": "weather", "input": {}}}],
            },
            {
                "role": "user",
                "content": [
                    {"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}},
                    {"cachePoint": {"type": "default", "ttl": "5m"}},
                ],
            },
        ],
    }


def _invoke() -> dict[str, Any]:
    body = _anthropic(False)
    del body["model"], body["stream"]
    return {"anthropic_version": "bedrock-2023-05-31", **body}


@dataclass(frozen=True, slots=True)
class Route:
    """One POST route: where it is, how it reports errors and a valid body to mutate."""

    path: str
    protocol: Protocol
    body: Callable[[], dict[str, Any]]
    headers: dict[str, str]
    stream: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1] + ("+stream" if self.stream else "")


def _count_body() -> dict[str, Any]:
    body = _anthropic(False)
    for key in ("max_tokens", "stream", "temperature", "stop_sequences", "metadata"):
        del body[key]
    return body


def _count_tokens_body() -> dict[str, Any]:
    return {"input": {"converse": _converse()}}


ROUTES: tuple[Route, ...] = (
    Route("/v1/messages", "anthropic", lambda: _anthropic(False), ANTHROPIC_HEADERS),
    Route("/v1/messages", "anthropic", lambda: _anthropic(True), ANTHROPIC_HEADERS, stream=True),
    Route("/v1/messages/count_tokens", "anthropic", _count_body, ANTHROPIC_HEADERS),
    Route("/v1/chat/completions", "openai", lambda: _openai(False), JSON_HEADERS),
    Route("/v1/chat/completions", "openai", lambda: _openai(True), JSON_HEADERS, stream=True),
    Route("/model/m/converse", "bedrock", _converse, JSON_HEADERS),
    Route("/model/m/converse-stream", "bedrock", _converse, JSON_HEADERS, stream=True),
    Route("/model/m/invoke", "bedrock", _invoke, JSON_HEADERS),
    Route("/model/m/invoke-with-response-stream", "bedrock", _invoke, JSON_HEADERS, stream=True),
    Route("/model/m/count-tokens", "bedrock", _count_tokens_body, JSON_HEADERS),
)


# -- mutations ------------------------------------------------------------------------------------

ODD_STRINGS = st.sampled_from(
    [
        "",
        "\ud800",
        "a\udfffb",
        "\x00",
        "nul\x00inside",
        "\ufeff",
        "\U0001f600",
        "\u202e",
        " ",
        "<start_of_turn>",
        "```tool_call",
        "ephemeral",
        "1h",
        "default",
        "a" * 5000,
    ]
)
ODD_NUMBERS = st.sampled_from(
    [0, -1, 1, 2, 3, 129, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308, 2.0001]
) | st.sampled_from([float("nan"), float("inf"), float("-inf")])
SCALARS = st.one_of(
    ODD_STRINGS,
    ODD_NUMBERS,
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.integers(),
    st.floats(),
)
ODD_VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=3),
    st.just({"type": "ephemeral", "ttl": "1h"}),
    st.just({"type": "text", "text": "x"}),
    st.just([{"type": "text", "text": ""}]),
    st.just([[[[[]]]]]),
)


def locations(value: Any, loc: Loc = ()) -> list[Loc]:
    """Every location inside a JSON value, the value itself first."""
    found = [loc]
    if isinstance(value, dict):
        for key, item in value.items():
            found += locations(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += locations(item, (*loc, i))
    return found


def _parent(body: Any, loc: Loc) -> Any:
    for part in loc[:-1]:
        body = body[part]
    return body


@st.composite
def mutated(draw: st.DrawFn, route: Route) -> dict[str, Any]:
    """``route``'s valid body with one to three mutations: a field deleted, a value replaced
    (odd strings, numbers, other types), a key added, a list element repeated."""
    body = copy.deepcopy(route.body())  # the templates share nested dicts
    for _ in range(draw(st.integers(1, 3))):
        places = [loc for loc in locations(body) if loc]
        if not places:
            break
        loc = draw(st.sampled_from(places))
        parent, key = _parent(body, loc), loc[-1]
        action = draw(st.sampled_from(["delete", "replace", "replace", "add", "repeat"]))
        if action == "delete":
            del parent[key]
        elif action == "replace":
            parent[key] = copy.deepcopy(draw(ODD_VALUES))  # st.just shares its value
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.one_of(ODD_STRINGS, st.text(max_size=8)))] = copy.deepcopy(
                draw(ODD_VALUES)
            )
        elif action == "repeat" and isinstance(parent, list):
            parent.insert(int(key), copy.deepcopy(parent[int(key)]))
        elif action == "repeat" and isinstance(parent, dict):
            parent[key] = [parent[key], copy.deepcopy(parent[key])]
    return body


def encode(body: Any) -> bytes:
    """JSON bytes of ``body`` as a careless client writes them: lone surrogates kept as
    ``\\ud800`` escapes, NaN and Infinity as bare words."""
    return json.dumps(body, ensure_ascii=True).encode()


@st.composite
def raw_bodies(draw: st.DrawFn, route: Route) -> bytes:
    """Bodies that are not a JSON object: truncated, non-UTF-8, deeply nested, not JSON."""
    valid = encode(route.body())
    kind = draw(st.sampled_from(["truncated", "bytes", "deep", "other", "empty"]))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "bytes":
        at = draw(st.integers(0, len(valid)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xfe\xff"]))
        return valid[:at] + junk + valid[at:]
    if kind == "deep":
        depth = draw(st.sampled_from([127, 129, 1000, 10_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = opener * depth + b"1" + closer * depth
        return b'{"messages":' + inner + b"}" if draw(st.booleans()) else inner
    if kind == "other":
        return draw(
            st.sampled_from(
                [b"null", b"[]", b"1", b'"x"', b"true", b"NaN", b"{", b"\xef\xbb\xbf{}"]
            )
        ) or draw(st.binary(max_size=64))
    return b""


# -- checks ---------------------------------------------------------------------------------------


def check_response(route: Route, response: httpx.Response) -> None:
    """The response is no 5xx (overload aside), its error is in the protocol's envelope, and a
    stream is well-formed to its end."""
    status = response.status_code
    assert status < 500 or status in OVERLOADED, (status, response.content[:300])
    kind = response.headers.get("content-type", "")
    # A mutation may have turned streaming off (``"stream"`` deleted): the type tells.
    if status == 200 and route.stream and route.protocol == "bedrock":
        assert kind == "application/vnd.amazon.eventstream", kind
        _check_event_stream(response.content)
        return
    if status == 200 and kind.startswith("text/event-stream"):
        assert route.stream, route
        _check_sse(route.protocol, response.text)
        return
    assert kind == "application/json", (status, kind, response.content[:200])
    data = response.json()
    if status >= 400:
        check_envelope(route.protocol, response, data)


def check_envelope(protocol: Protocol, response: httpx.Response, data: Any) -> None:
    """``data`` is the error envelope of ``protocol``."""
    if protocol == "anthropic":
        assert data["type"] == "error" and set(data["error"]) == {"type", "message"}, data
        assert isinstance(data["error"]["message"], str) and data["request_id"].startswith("req_")
    elif protocol == "openai":
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code"}, data
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
    else:
        assert set(data) == {"message"} and isinstance(data["message"], str), data
        assert response.headers["x-amzn-errortype"], response.headers


def _check_sse(protocol: Protocol, raw: str) -> None:
    assert raw.endswith("\n\n"), raw[-200:]
    frames = [f for f in raw.split("\n\n")[:-1] if not f.startswith(":")]
    assert frames
    if protocol == "anthropic":
        names = []
        for frame in frames:
            name_line, data_line = frame.split("\n")
            name = name_line.removeprefix("event: ")
            assert json.loads(data_line.removeprefix("data: "))["type"] == name
            names.append(name)
        assert names[-1] in ("message_stop", "error"), names
        assert "error" not in names[:-1], names
        return
    payloads = [frame.removeprefix("data: ") for frame in frames]
    for payload in payloads[:-1]:
        assert "error" not in json.loads(payload), payload
    last = payloads[-1]
    assert last == "[DONE]" or set(json.loads(last)) == {"error"}, last


def _check_event_stream(raw: bytes) -> None:
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    messages = list(buffer)
    assert sum(m.prelude.total_length for m in messages) == len(raw), "trailing bytes"
    kinds = [m.headers[":message-type"] for m in messages]
    assert kinds and "exception" not in kinds[:-1], kinds
    for message in messages:
        json.loads(message.payload)
    if kinds[-1] == "event":
        assert messages[-1].headers[":event-type"] in ("metadata", "chunk"), messages[-1].headers


__all__ = [
    "ANTHROPIC_HEADERS",
    "JSON_HEADERS",
    "ROUTES",
    "Route",
    "check_envelope",
    "check_response",
    "encode",
    "locations",
    "mutated",
    "raw_bodies",
]
