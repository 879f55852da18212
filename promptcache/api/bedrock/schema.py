"""Pydantic wire models for Bedrock runtime request bodies (botocore bedrock-runtime 2023-09-30).

As in the Anthropic adapter, the models check the types of the fields promptcache uses and ignore
every other field, and the union members of ``system[]``, ``messages[].content[]`` and
``toolConfig.tools[]`` are kept as raw dicts and validated one at a time by ``decode.py``, so the
first bad item is reported with its own path.

Errors read like AWS's (``validate``), with 1-based ``.member`` paths::

    1 validation error detected: Value '10m' at 'system.2.member.cachePoint.ttl' failed to satisfy
    constraint: Member must satisfy enum value set: [5m, 1h]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from promptcache.errors import InvalidRequest
from promptcache.types import Ttl

RawItem = dict[str, Any]
"""One member of a union list, e.g. ``{"text": "..."}`` or ``{"cachePoint": {...}}``."""

Loc = tuple[str | int, ...]
"""A location in the body: field names and 0-based list indices."""

_M = TypeVar("_M", bound=BaseModel)


class _Wire(BaseModel):
    """Strict types for the fields we read; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class CachePoint(_Wire):
    """``{"type": "default", "ttl"?: "5m" | "1h"}`` (botocore ``CachePointBlock``, spec §5.2)."""

    type: Literal["default"]
    ttl: Ttl | None = None


class ToolInputSchema(_Wire):
    json_schema: dict[str, Any] = Field(alias="json")


class ToolSpec(_Wire):
    name: str
    description: str | None = None
    inputSchema: ToolInputSchema


class SystemTool(_Wire):
    name: str


class ToolUse(_Wire):
    toolUseId: str
    name: str
    input: Any


class ToolResult(_Wire):
    toolUseId: str
    content: list[RawItem]
    status: Literal["success", "error"] | None = None


class DocumentSource(_Wire):
    text: str | None = None
    bytes: str | None = None
    content: list[RawItem] | None = None


class Document(_Wire):
    name: str
    format: str | None = None
    source: DocumentSource
    context: str | None = None


class ReasoningText(_Wire):
    text: str
    signature: str | None = None


class Reasoning(_Wire):
    reasoningText: ReasoningText | None = None
    redactedContent: str | None = None


class MessageParam(_Wire):
    # ``system`` is in botocore's ConversationRole; it becomes a user turn, as on Anthropic.
    role: Literal["user", "assistant", "system"]
    content: list[RawItem] = Field(min_length=1)


MAX_STOP_SEQUENCES: Final = 2500
"""botocore ``InferenceConfigurationStopSequencesList``; each item is a ``NonEmptyString``."""


class InferenceConfig(_Wire):
    """The ranges are botocore's ``InferenceConfiguration`` shapes, checked as AWS checks them."""

    maxTokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=1)
    topP: float | None = Field(default=None, ge=0, le=1)
    stopSequences: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, max_length=MAX_STOP_SEQUENCES
    )


class ToolConfig(_Wire):
    tools: list[RawItem] = Field(min_length=1)
    toolChoice: dict[str, Any] | None = None


class ConverseBody(_Wire):
    """The Converse and ConverseStream body; also ``input.converse`` of CountTokens."""

    messages: list[MessageParam] = Field(min_length=1)
    system: list[RawItem] | None = None
    inferenceConfig: InferenceConfig | None = None
    toolConfig: ToolConfig | None = None
    additionalModelRequestFields: dict[str, Any] | None = None
    requestMetadata: dict[str, str] | None = None


class InvokeModelTokens(_Wire):
    body: str
    """The InvokeModel body: a blob, so base64 in JSON (raw JSON text is accepted too)."""


class CountTokensInput(_Wire):
    converse: dict[str, Any] | None = None
    invokeModel: InvokeModelTokens | None = None


class CountTokensBody(_Wire):
    input: CountTokensInput


def aws_path(loc: Loc) -> str:
    """``("messages", 0, "content", 2)`` -> ``messages.1.member.content.3.member``."""
    return ".".join(f"{part + 1}.member" if isinstance(part, int) else part for part in loc)


def _shown(value: Any) -> str:
    if value is None:
        return "Value null"
    if isinstance(value, str | int | float | bool):
        return f"Value '{value}'"
    return "Value"


def _bound(value: Any) -> str:
    # The service model's bounds are integers (``max: 1``); pydantic hands float fields 1.0.
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _constraint(error: ErrorDetails) -> str:
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind == "missing":
        return "Member must not be null"
    if kind == "literal_error":
        values = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"Member must satisfy enum value set: [{', '.join(values)}]"
    if kind == "greater_than_equal":
        return f"Member must have value greater than or equal to {_bound(ctx['ge'])}"
    if kind == "less_than_equal":
        return f"Member must have value less than or equal to {_bound(ctx['le'])}"
    if kind in ("too_short", "string_too_short"):
        return f"Member must have length greater than or equal to {ctx['min_length']}"
    if kind in ("too_long", "string_too_long"):
        return f"Member must have length less than or equal to {ctx['max_length']}"
    return str(error["msg"])


def constraint_error(loc: Loc, value: Any, constraint: str) -> InvalidRequest:
    """One AWS-style validation error: ``Value '<v>' at '<path>' failed to satisfy ...``."""
    return _errors([(loc, value, constraint)])


def _errors(found: Sequence[tuple[Loc, Any, str]]) -> InvalidRequest:
    count = f"{len(found)} validation error{'s' if len(found) > 1 else ''} detected: "
    parts = [
        f"{_shown(value)} at '{aws_path(loc)}' failed to satisfy constraint: {constraint}"
        for loc, value, constraint in found
    ]
    return InvalidRequest(count + "; ".join(parts))


def validate(model: type[_M], data: Any, loc: Loc = ()) -> _M:
    """``model.model_validate(data)``; every error is reported in one AWS-style message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        found = [
            (loc + tuple(e["loc"]), None if e["type"] == "missing" else e["input"], _constraint(e))
            for e in errors
        ]
        raise _errors(found) from None


__all__ = [
    "MAX_STOP_SEQUENCES",
    "CachePoint",
    "ConverseBody",
    "CountTokensBody",
    "CountTokensInput",
    "Document",
    "DocumentSource",
    "InferenceConfig",
    "InvokeModelTokens",
    "Loc",
    "MessageParam",
    "RawItem",
    "Reasoning",
    "ReasoningText",
    "SystemTool",
    "ToolConfig",
    "ToolInputSchema",
    "ToolResult",
    "ToolSpec",
    "ToolUse",
    "aws_path",
    "constraint_error",
    "validate",
]
