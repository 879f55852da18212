"""Request bodies and stream parsing for the two protocols the benchmark speaks.

Anthropic Messages carries breakpoints as ``cache_control`` on blocks and tools. On OpenAI Chat
Completions the same markers go on message objects and tools (spec §4.3: promptcache honours them,
other OpenAI-compatible servers ignore unknown keys), and every text is sent as a plain string so
that servers whose chat templates expect strings see the whole prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from promptcache.bench.workloads import BenchRequest, Message, Text, Tool, ToolResult, ToolUse

Protocol = Literal["anthropic", "openai"]
PROTOCOLS: tuple[Protocol, ...] = ("anthropic", "openai")
PATHS: dict[Protocol, str] = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}


def _marker(ttl: str | None) -> dict[str, Any]:
    if ttl is None:
        return {}
    return {"cache_control": {"type": "ephemeral", "ttl": ttl}}


def anthropic_body(req: BenchRequest, model: str) -> dict[str, Any]:
    """The streaming ``POST /v1/messages`` body of ``req``."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "messages": [_anthropic_message(m) for m in req.messages],
    }
    if req.system:
        body["system"] = [{"type": "text", "text": s.text, **_marker(s.cache)} for s in req.system]
    if req.tools:
        body["tools"] = [_anthropic_tool(t) for t in req.tools]
    return body


def _anthropic_tool(tool: Tool) -> dict[str, Any]:
    return {
        "name": tool.name,
        "description": tool.description,
        "input_schema": tool.schema,
        **_marker(tool.cache),
    }


def _anthropic_message(msg: Message) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    for p in msg.parts:
        if isinstance(p, Text):
            blocks.append({"type": "text", "text": p.text, **_marker(p.cache)})
        elif isinstance(p, ToolUse):
            blocks.append({"type": "tool_use", "id": p.id, "name": p.name, "input": p.input})
        else:
            blocks.append(
                {
                    "type": "tool_result",
                    "tool_use_id": p.tool_use_id,
                    "content": p.text,
                    **_marker(p.cache),
                }
            )
    return {"role": msg.role, "content": blocks}


def openai_body(req: BenchRequest, model: str) -> dict[str, Any]:
    """The streaming ``POST /v1/chat/completions`` body of ``req``."""
    messages: list[dict[str, Any]] = []
    if req.system:
        last = req.system[-1].cache
        text = "\n\n".join(s.text for s in req.system)
        messages.append({"role": "system", "content": text, **_marker(last)})
    for m in req.messages:
        messages.extend(_openai_messages(m))
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": messages,
    }
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.schema},
                **_marker(t.cache),
            }
            for t in req.tools
        ]
    if not req.caching:
        # Without markers promptcache would still cache implicitly (spec §4.2); "explicit" with
        # no marker switches caching off for the cold control.
        body["prompt_cache_options"] = {"mode": "explicit"}
    return body


def _openai_messages(msg: Message) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    texts = [p for p in msg.parts if isinstance(p, Text)]
    calls = [p for p in msg.parts if isinstance(p, ToolUse)]
    results = [p for p in msg.parts if isinstance(p, ToolResult)]
    for r in results:
        out.append(
            {"role": "tool", "tool_call_id": r.tool_use_id, "content": r.text, **_marker(r.cache)}
        )
    if texts or calls:
        entry: dict[str, Any] = {
            "role": msg.role,
            "content": "\n\n".join(t.text for t in texts) if texts else None,
            **_marker(texts[-1].cache if texts else None),
        }
        if calls:
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.input)},
                }
                for c in calls
            ]
        out.append(entry)
    return out


def body_for(protocol: Protocol, req: BenchRequest, model: str) -> dict[str, Any]:
    """The request body of ``req`` in ``protocol``."""
    return anthropic_body(req, model) if protocol == "anthropic" else openai_body(req, model)


@dataclass
class Usage:
    """Token counts as the server reported them; ``None`` where it reported nothing.

    ``prompt`` is the whole input (uncached + read + written), whatever the protocol calls it.
    """

    prompt: int | None = None
    cache_read: int | None = None
    cache_write: int | None = None
    cache_write_1h: int | None = None
    output: int | None = None


def anthropic_usage(usage: dict[str, Any], into: Usage) -> None:
    """Fold an Anthropic ``usage`` object (``message_start`` or ``message_delta``) into ``into``."""
    if isinstance(usage.get("output_tokens"), int):
        into.output = usage["output_tokens"]
    fields = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    values = [usage.get(f) for f in fields]
    if all(isinstance(v, int) for v in values):
        uncached, read, written = (int(v) for v in values)  # type: ignore[arg-type]
        into.prompt, into.cache_read, into.cache_write = uncached + read + written, read, written
    elif isinstance(values[0], int) and into.prompt is None:
        into.prompt = int(values[0])  # a server without caching fields: input is all there is
    creation = usage.get("cache_creation")
    if isinstance(creation, dict) and isinstance(creation.get("ephemeral_1h_input_tokens"), int):
        into.cache_write_1h = creation["ephemeral_1h_input_tokens"]


def openai_usage(usage: dict[str, Any], into: Usage) -> None:
    """Fold an OpenAI ``usage`` object into ``into`` (spec §4.6; Portkey-style extras too)."""
    if isinstance(usage.get("prompt_tokens"), int):
        into.prompt = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        into.output = usage["completion_tokens"]
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    read = details.get("cached_tokens", usage.get("cache_read_input_tokens"))
    written = details.get("cache_write_tokens", usage.get("cache_creation_input_tokens"))
    if isinstance(read, int):
        into.cache_read = read
    if isinstance(written, int):
        into.cache_write = written


@dataclass
class StreamState:
    """What a stream has shown so far: whether content started, usage, text, an error."""

    usage: Usage
    first_content: bool = False
    # Content deltas seen: a stand-in for output tokens where the usage says none (servers that
    # stream token by token send one delta per token, or fewer when a character spans tokens).
    chunks: int = 0
    done: bool = False
    text: str = ""
    error: str | None = None


def anthropic_event(data: dict[str, Any], state: StreamState) -> bool:
    """Apply one SSE ``data`` object; True when this event is the first token's arrival."""
    kind = data.get("type")
    if kind == "message_start":
        anthropic_usage(data.get("message", {}).get("usage") or {}, state.usage)
    elif kind == "content_block_delta":
        delta = data.get("delta") or {}
        state.text += str(delta.get("text") or delta.get("partial_json") or "")
        state.chunks += 1
        return _first(state)
    elif kind == "content_block_start" and (data.get("content_block") or {}).get("type") in (
        "tool_use",
        "thinking",
    ):
        return _first(state)
    elif kind == "message_delta":
        anthropic_usage(data.get("usage") or {}, state.usage)
        # A reply that ends before any content (an immediate end of turn) still had a first token.
        return _first(state)
    elif kind == "message_stop":
        state.done = True
    elif kind == "error":
        state.error = str((data.get("error") or {}).get("message") or data)
    return False


def openai_event(data: dict[str, Any], state: StreamState) -> bool:
    """Apply one chunk; True when this chunk is the first token's arrival."""
    if "error" in data:
        err = data["error"]
        state.error = str(err.get("message") if isinstance(err, dict) else err)
        return False
    if isinstance(data.get("usage"), dict):
        openai_usage(data["usage"], state.usage)
    first = False
    for choice in data.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls"):
            state.text += str(delta.get("content") or "")
            state.chunks += 1
            first = _first(state) or first
        elif choice.get("finish_reason"):
            first = _first(state) or first
    return first


def _first(state: StreamState) -> bool:
    if state.first_content:
        return False
    state.first_content = True
    return True


def sse_data(line: str) -> dict[str, Any] | None:
    """The JSON object of an SSE ``data:`` line; None for other lines and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


__all__ = [
    "PATHS",
    "PROTOCOLS",
    "Protocol",
    "StreamState",
    "Usage",
    "anthropic_body",
    "anthropic_event",
    "anthropic_usage",
    "body_for",
    "openai_body",
    "openai_event",
    "openai_usage",
    "sse_data",
]
