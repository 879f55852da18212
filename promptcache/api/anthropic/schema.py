"""Pydantic wire models for Anthropic Messages request bodies (spec §3).

The models check the types of the fields promptcache uses and ignore every other field, so a body
the hosted API accepts is never rejected for a feature a local model cannot honour (``container``,
``mcp_servers``, ``service_tier``, ``context_management``, citations, ...). Validation is strict: a
string is not an integer, so ``"max_tokens": "10"`` is a 400 rather than silently coerced.

Content blocks are kept as raw dicts at the top level and validated one at a time by
``blocks.py`` with the model its block table names for their ``type``. That keeps error
paths in the hosted style (``messages.0.content.1.text: Field required``) instead of pydantic's
union-member labels, and keeps JSON key order for tool definitions and ``tool_use`` input.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from promptcache.api.wire import one_of
from promptcache.types import Ttl

RawBlock = dict[str, Any]


Content = Annotated[
    str | list[RawBlock], one_of("Input should be a valid string or a list of content blocks")
]
SystemContent = Annotated[
    str | list[RawBlock], one_of("Input should be a valid string or a list of text blocks")
]


def _unit_range(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise PydanticCustomError("range", "range: 0..1")
    return value


UnitInterval = Annotated[float, AfterValidator(_unit_range)]
"""``temperature`` and ``top_p``: the hosted API answers ``temperature: range: 0..1``."""


class _Wire(BaseModel):
    """Strict types for the fields we read; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class CacheControl(BaseModel):
    """``{"type": "ephemeral", "ttl"?: "5m" | "1h", "scope"?: str}`` (spec §3.2). Other keys are
    an error.

    ``scope`` (Claude Code sends ``"global"``) is accepted and never read: entries stay within
    the tenant whatever it says (§1.12), so no value can widen sharing.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["ephemeral"]
    ttl: Ttl = "5m"
    scope: str | None = None


class Marked(_Wire):
    """Any block that may carry a marker; also validates blocks we only render as JSON."""

    cache_control: CacheControl | None = None


class TextBlock(Marked):
    type: Literal["text"]
    text: str


class ToolUseBlock(Marked):
    """``tool_use``, ``server_tool_use`` and ``mcp_tool_use``: a call with JSON input."""

    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Marked):
    tool_use_id: str
    content: str | list[RawBlock] | None = None
    is_error: bool | None = None


class TextSource(_Wire):
    type: Literal["text"]
    data: str


class ContentSource(_Wire):
    type: Literal["content"]
    content: Content


class DocumentBlock(Marked):
    source: dict[str, Any]
    title: str | None = None
    context: str | None = None


class SearchResultBlock(Marked):
    source: str
    title: str
    content: list[TextBlock]


class ServerToolResultBlock(Marked):
    """``web_search_tool_result``, ``mcp_tool_result`` and the other ``*_tool_result`` blocks."""

    tool_use_id: str
    content: Any = None


class ThinkingBlock(_Wire):
    # The hosted API requires ``signature``; a local model cannot check it, so it may be absent.
    thinking: str


class RedactedThinkingBlock(_Wire):
    data: str


class CustomTool(Marked):
    """A client tool: ``type`` absent or ``"custom"``."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ServerTool(Marked):
    """A server or builtin tool (``web_search_20250305``, ``mcp_toolset``, ...): kept as JSON."""

    type: str
    name: str = ""


class MessageParam(_Wire):
    # ``system`` is accepted as a role because some clients send it; decode.py explains the mapping.
    role: Literal["user", "assistant", "system"]
    content: Content


class CountTokensBody(_Wire):
    """The body of ``POST /v1/messages/count_tokens``: a Messages body without ``max_tokens``."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: SystemContent | None = None
    tools: list[RawBlock] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    cache_control: CacheControl | None = None


class MessagesBody(CountTokensBody):
    """The body of ``POST /v1/messages``. ``max_tokens: 0`` asks for cache pre-warming (§3.8)."""

    max_tokens: int = Field(ge=0)
    temperature: UnitInterval | None = None
    top_p: UnitInterval | None = None
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    metadata: dict[str, Any] | None = None


__all__ = [
    "CacheControl",
    "ContentSource",
    "CountTokensBody",
    "CustomTool",
    "DocumentBlock",
    "Marked",
    "MessageParam",
    "MessagesBody",
    "RawBlock",
    "RedactedThinkingBlock",
    "SearchResultBlock",
    "ServerTool",
    "ServerToolResultBlock",
    "TextBlock",
    "TextSource",
    "ThinkingBlock",
    "ToolResultBlock",
    "ToolUseBlock",
    "UnitInterval",
]
