"""Pydantic wire models for OpenAI Chat Completions request bodies (spec §4).

As on the Anthropic surface, the models check the types of the fields promptcache uses and ignore
every other field (``logprobs``, ``response_format``, ``parallel_tool_calls``, ``store``, ...), so
a body the hosted API accepts is not rejected for a feature a local model cannot honour.
Validation is strict: ``"max_tokens": "10"`` is a 400, not silently coerced.

Messages and content parts are kept as raw dicts at the top level and validated one at a time
(``parts.py``) with the model for their ``role`` or ``type``, so error paths read
``messages.2.content.1.text: Field required`` and JSON key order is kept for tool definitions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from promptcache.api.wire import one_of
from promptcache.types import Ttl

RawItem = dict[str, Any]

Content = Annotated[
    str | list[RawItem], one_of("Input should be a valid string or a list of content parts")
]
Stop = Annotated[str | list[str], one_of("Input should be a valid string or a list of strings")]


class _Wire(BaseModel):
    """Strict types for the fields we read; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class CacheControl(BaseModel):
    """``{"type": "ephemeral", "ttl"?: "5m" | "1h"}`` (spec §3.2, §4.3). Extra keys are an error.

    Unlike Anthropic's, a missing ``ttl`` stays ``None``: it takes the request TTL (spec §4.5).
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["ephemeral"]
    ttl: Ttl | None = None


class PromptCacheBreakpoint(BaseModel):
    """``{"mode": "explicit", "ttl"?: "30m" | "12h"}`` (openai-python content-part types)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class Marked(_Wire):
    """Anything that may carry a ``cache_control`` marker."""

    cache_control: CacheControl | None = None


class Part(Marked):
    """A content part that may also carry ``prompt_cache_breakpoint`` (spec §4.3)."""

    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class TextPart(Part):
    type: Literal["text"]
    text: str


class RefusalPart(Marked):
    type: Literal["refusal"]
    refusal: str


class FunctionCall(_Wire):
    name: str
    # A JSON string, rendered exactly as received (spec §1.2).
    arguments: str


class ToolCall(Marked):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(Marked):
    """``system`` and ``developer`` messages: text only."""

    role: Literal["system", "developer"]
    content: Content


class UserMessage(Marked):
    role: Literal["user"]
    content: Content


class AssistantMessage(Marked):
    role: Literal["assistant"]
    content: Content | None = None
    refusal: str | None = None
    tool_calls: list[RawItem] | None = None


class ToolMessage(Marked):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionDefinition(_Wire):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(Marked):
    type: Literal["function"]
    function: RawItem


class PromptCacheOptions(_Wire):
    """``prompt_cache_options`` (spec §4.2, §4.5): accepted values only."""

    mode: Literal["implicit", "explicit"] = "implicit"
    ttl: Literal["30m"] | None = None


class StreamOptions(_Wire):
    include_usage: bool | None = None


class ChatBody(_Wire):
    """The body of ``POST /v1/chat/completions``."""

    model: str
    messages: list[RawItem] = Field(min_length=1)
    tools: list[RawItem] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)  # not OpenAI's; vLLM-style clients send it
    stop: Stop | None = None
    n: int | None = None
    seed: int | None = None
    # Not honoured (ignored), but typed, as the hosted API types them; ranges are in limits.py.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    metadata: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None


__all__ = [
    "AssistantMessage",
    "CacheControl",
    "ChatBody",
    "Content",
    "FunctionCall",
    "FunctionDefinition",
    "FunctionTool",
    "Marked",
    "Part",
    "PromptCacheBreakpoint",
    "PromptCacheOptions",
    "RawItem",
    "RefusalPart",
    "StreamOptions",
    "SystemMessage",
    "TextPart",
    "ToolCall",
    "ToolMessage",
    "UserMessage",
]
