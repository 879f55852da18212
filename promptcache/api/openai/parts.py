"""OpenAI messages, content parts, tool calls and tools -> canonical ``Block``s (spec §1.1, §4.3).

Sections follow the §1.1 table: each ``tools[i]`` is one block; the leading run of ``system`` /
``developer`` messages is the system section, one block per part (or one for string content);
every other message gives, in order, one block per part (string content: one block) and one
``tool_use`` block per assistant ``tool_calls[i]``. A ``role: "tool"`` message gives user-turn
``tool_result`` blocks. A ``system`` / ``developer`` message after a non-system one stays in place
(project decision) as a user turn, as the Anthropic adapter renders ``role: "system"`` messages.

Markers become ``CacheMark``s whose ``ttl_path`` is in OpenAI request coordinates
(``messages.0.content.4.cache_control.ttl``, ``tools.3.cache_control.ttl``). This module owns
validation step 3 of spec §1.14 for this surface: marker shape, empty text.

So that one entry serves every surface (spec §1.12), equal content decodes to equal blocks: an
OpenAI system message plus a user message gives the blocks of an Anthropic ``system`` text block
plus a user text block, and a function tool renders as the Anthropic tool definition
``{"name", "description", "input_schema"}`` (key order as received).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from promptcache.api.openai.schema import (
    AssistantMessage,
    CacheControl,
    Content,
    FunctionDefinition,
    FunctionTool,
    PromptCacheBreakpoint,
    RawItem,
    RefusalPart,
    SystemMessage,
    TextPart,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from promptcache.api.wire import to_json, validate
from promptcache.core.request import Block, BlockKind, CacheMark, Message
from promptcache.errors import InvalidRequest
from promptcache.types import Role, Ttl

BREAKPOINT_TTLS: Final[dict[str, Ttl]] = {"30m": "1h", "12h": "1h"}
"""``prompt_cache_breakpoint.ttl`` -> TTL class: both exceed 5m, so both get the longest, 1h."""

_AnyMessage = SystemMessage | UserMessage | AssistantMessage | ToolMessage
_MESSAGES: Final[dict[str, type[_AnyMessage]]] = {
    "system": SystemMessage,
    "developer": SystemMessage,
    "user": UserMessage,
    "assistant": AssistantMessage,
    "tool": ToolMessage,
}
_ROLES: Final[dict[str, Role]] = {
    "system": "user",
    "developer": "user",
    "user": "user",
    "assistant": "assistant",
    "tool": "user",
}
"""Wire role -> canonical turn, for messages in the ``messages`` section."""

_PART_TYPES: Final[dict[str, tuple[str, ...]]] = {
    "system": ("text",),
    "developer": ("text",),
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
    "tool": ("text",),
}
_MEDIA: Final = frozenset({"image_url", "input_audio", "file"})


@dataclass(frozen=True, slots=True)
class Markers:
    """Turns wire markers into ``CacheMark``s, filling a missing ``ttl`` with the request TTL."""

    request_ttl: Ttl

    def mark(
        self,
        cache_control: CacheControl | None,
        path: str,
        breakpoint: PromptCacheBreakpoint | None = None,
    ) -> CacheMark | None:
        """The breakpoint at ``path``, if marked. ``cache_control`` and ``prompt_cache_breakpoint``
        on one part make a single breakpoint whose TTL comes from ``cache_control`` (§4.3)."""
        if cache_control is not None:
            return CacheMark(cache_control.ttl or self.request_ttl, f"{path}.cache_control.ttl")
        if breakpoint is not None:
            ttl = BREAKPOINT_TTLS[breakpoint.ttl] if breakpoint.ttl else self.request_ttl
            return CacheMark(ttl, f"{path}.prompt_cache_breakpoint.ttl")
        return None


def tool_block(raw: RawItem, path: str, markers: Markers) -> Block:
    """The block of ``tools[i]`` at ``path``: the function definition in Anthropic's shape."""
    tool = validate(FunctionTool, raw, path)
    function = validate(FunctionDefinition, tool.function, f"{path}.function")
    # ``strict`` only steers OpenAI's constrained decoding: it is not shown to the model, and
    # leaving it out keeps the text equal to the same tool sent on the Anthropic surface.
    definition = {
        ("input_schema" if key == "parameters" else key): value
        for key, value in tool.function.items()
        if key != "strict"
    }
    mark = markers.mark(tool.cache_control, path)
    return Block("tool", text=to_json(definition), name=function.name, mark=mark)


def sections(
    messages: Sequence[RawItem], markers: Markers
) -> tuple[tuple[Block, ...], tuple[Message, ...]]:
    """The system section and the conversation of ``messages``, in render order."""
    system: list[Block] = []
    turns: list[Message] = []
    for i, raw in enumerate(messages):
        role, blocks = _message(raw, f"messages.{i}", markers)
        if not turns and role in ("system", "developer"):
            system.extend(blocks)
        else:
            turns.append(Message(_ROLES[role], tuple(blocks)))
    return tuple(system), tuple(turns)


def _message(raw: RawItem, path: str, markers: Markers) -> tuple[str, list[Block]]:
    role = raw.get("role") if isinstance(raw, dict) else None
    if not isinstance(role, str) or role not in _MESSAGES:
        roles = ", ".join(f"'{name}'" for name in _MESSAGES)
        raise InvalidRequest(
            f"{path}.role: Input should be one of {roles}",
            param=f"{path}.role",
            code="invalid_value",
        )
    message = validate(_MESSAGES[role], raw, path)
    kind: BlockKind = "text"
    ref_id = ""
    if isinstance(message, ToolMessage):
        kind, ref_id = "tool_result", message.tool_call_id
    content = message.content
    if isinstance(message, AssistantMessage):
        if content is None and message.refusal is not None:
            content = message.refusal
        if message.tool_calls and content == "":
            content = None  # the usual ``"content": ""`` beside tool calls is no block
    blocks = _content(content, path, markers, _PART_TYPES[role], kind, ref_id)
    if isinstance(message, AssistantMessage):
        calls = enumerate(message.tool_calls or ())
        blocks.extend(_tool_call(item, f"{path}.tool_calls.{k}", markers) for k, item in calls)
    mark = markers.mark(message.cache_control, path)
    if mark is not None and blocks:
        # A message-level marker marks the message's last block (project decision, §4.3).
        last = blocks[-1]
        if isinstance(content, list) and len(blocks) == len(content) and last.text == "":
            raise _empty_text(f"{path}.content.{len(content) - 1}.text")
        if isinstance(content, str) and last.kind == "text" and last.text == "":
            raise _empty_text(f"{path}.content")
        blocks[-1] = replace(last, mark=mark)
    return role, blocks


def _content(
    content: Content | None,
    path: str,
    markers: Markers,
    allowed: tuple[str, ...],
    kind: BlockKind,
    ref_id: str,
) -> list[Block]:
    if content is None:
        return []
    if isinstance(content, str):
        return [Block(kind, text=content, ref_id=ref_id)]
    return [
        replace(_part(raw, f"{path}.content.{j}", markers, allowed), kind=kind, ref_id=ref_id)
        for j, raw in enumerate(content)
    ]


def _part(raw: RawItem, path: str, markers: Markers, allowed: tuple[str, ...]) -> Block:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind in allowed and kind in _MEDIA:
        # The served models read text only; the spec's media rules (§2.2) wait for one that
        # does not. Rejecting beats silently dropping what the client meant the model to see.
        raise InvalidRequest(f"{path}: {kind} content is not supported by this model", param=path)
    if kind not in allowed:
        expected = " or ".join(f"'{name}'" for name in allowed)
        problem = "Field required" if kind is None else f"Input should be {expected}"
        raise InvalidRequest(f"{path}.type: {problem}", param=f"{path}.type", code="invalid_value")
    if kind == "refusal":
        refusal = validate(RefusalPart, raw, path)
        return _text(refusal.refusal, markers.mark(refusal.cache_control, path), f"{path}.refusal")
    part = validate(TextPart, raw, path)
    mark = markers.mark(part.cache_control, path, part.prompt_cache_breakpoint)
    return _text(part.text, mark, f"{path}.text")


def _text(text: str, mark: CacheMark | None, text_path: str) -> Block:
    if mark is not None and text == "":
        raise _empty_text(text_path)
    return Block("text", text=text, mark=mark)


def _tool_call(raw: RawItem, path: str, markers: Markers) -> Block:
    call = validate(ToolCall, raw, path)
    return Block(
        "tool_use",
        # As received (spec §1.2); an empty string would leave the rendered call without input.
        text=call.function.arguments or "{}",
        name=call.function.name,
        ref_id=call.id,
        mark=markers.mark(call.cache_control, path),
    )


def _empty_text(path: str) -> InvalidRequest:
    return InvalidRequest(f"{path}: cache_control cannot be set for empty text blocks", param=path)


__all__ = ["BREAKPOINT_TTLS", "Markers", "sections", "tool_block"]
