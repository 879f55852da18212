"""Bedrock runtime wire -> ``ChatRequest`` (spec §1.1, §5.2, §5.3, §5.7, §5.8).

Converse sections map to the canonical prompt as in the §1.1 table: each ``toolConfig.tools[i]``,
``system[i]`` and ``messages[].content[i]`` that is not a ``cachePoint`` is one block (a
``toolResult`` is one block, its items joined by newlines, which is how the chat format joins
the items of an Anthropic ``tool_result``). A ``cachePoint`` is not a block: it marks the block
just before it in render order, which may sit in an earlier section::

    toolConfig.tools:  [T0, T1, cachePoint]         -> mark on T1
    system:            [S0, cachePoint]             -> mark on S0
    messages[0]:       [cachePoint, U0]             -> mark on S0 (the head caches tools+system)

so all items are collected in render order first and the marks attached afterwards. This module
owns validation step 3 of spec §1.14 for Bedrock (union shape, ``cachePoint`` type and ttl,
placement, tool caching per model); count and TTL order (steps 4-6) are ``BEDROCK_RULES``, applied
by the service. InvokeModel bodies are Anthropic Messages bodies and go through the Anthropic
decoder unchanged (§5.7).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Final

from promptcache.api.anthropic.decode import decode_messages
from promptcache.api.anthropic.rules import ANTHROPIC_RULES
from promptcache.api.bedrock.rules import BEDROCK_RULES
from promptcache.api.bedrock.schema import (
    CachePoint,
    ConverseBody,
    CountTokensBody,
    Document,
    InferenceConfig,
    Loc,
    RawItem,
    Reasoning,
    ToolResult,
    ToolSpec,
    ToolUse,
    aws_path,
    constraint_error,
    validate,
)
from promptcache.api.wire import json_object, to_json
from promptcache.core.request import Block, CacheMark, ChatRequest, Message, Sampling
from promptcache.errors import InvalidRequest
from promptcache.service import MarkRules
from promptcache.types import Role, TenantId

DEFAULT_MAX_TOKENS: Final = 1024
"""``inferenceConfig.maxTokens`` when absent; generation also stops at the context window."""

INVOKE_VERSION: Final = "bedrock-2023-05-31"
MISPLACED_MESSAGE: Final = "A cachePoint must follow a content block."
TOOL_CACHING_MESSAGE: Final = "Tool caching is not supported for model {model_id}."
_NOT_MARKABLE: Final = {
    "thinking": "A cachePoint cannot follow a reasoningContent block.",
    "redacted_thinking": "A cachePoint cannot follow a reasoningContent block.",
    "text": "A cachePoint cannot follow an empty text block.",
}

_PROFILE_PREFIXES: Final = frozenset({"us", "us-gov", "eu", "apac", "jp", "au", "ca", "global"})
"""Geographic prefixes of cross-region inference profile ids (``us.anthropic.claude-...``)."""

_TEXT_FORMATS: Final = frozenset({"txt", "md", "csv", "html"})
_ROLES: Final[dict[str, Role]] = {"user": "user", "assistant": "assistant", "system": "user"}

_TOOLS: Final = -2
_SYSTEM: Final = -1
"""Group ids of the tools and system sections; message ``i`` is group ``i``."""

_Render = Callable[[Any, Loc], Block]
_Item = Block | CacheMark


# -- bodies -----------------------------------------------------------------------------------


def decode_converse(
    data: Mapping[str, Any],
    *,
    model_id: str,
    tenant: TenantId,
    tool_cache_points: bool = True,
) -> ChatRequest:
    """Decode a Converse / ConverseStream body (or CountTokens ``input.converse``).

    ``model_id`` is the URL-decoded id the client sent, echoed in errors. Raises
    ``InvalidRequest`` (ValidationException) for the first problem in render order.
    """
    wire = validate(ConverseBody, data)
    placed = _attach_marks(_items(wire, model_id, tool_cache_points))
    messages = []
    for i, message in enumerate(wire.messages):
        blocks = tuple(block for group, block in placed if group == i)
        if not blocks:
            raise InvalidRequest(
                f"The content field in the Message object at messages.{i} is empty. "
                "Add a ContentBlock object to the content field and try again."
            )
        messages.append(Message(_ROLES[message.role], blocks))
    return ChatRequest(
        model=model_id,
        messages=tuple(messages),
        sampling=_sampling(wire),
        system=tuple(block for group, block in placed if group == _SYSTEM),
        tools=tuple(block for group, block in placed if group == _TOOLS),
        tenant=tenant,
        metadata=dict(wire.requestMetadata or {}),
    )


def decode_invoke(
    data: Mapping[str, Any], *, model_id: str, tenant: TenantId, count_only: bool = False
) -> ChatRequest:
    """Decode an InvokeModel body: Anthropic Messages with ``anthropic_version`` (spec §5.7).

    The Anthropic decoder's validation and messages apply unchanged; the model is the URL's.
    """
    version = data.get("anthropic_version")
    if version is None:
        raise InvalidRequest(
            "Malformed input request: #: required key [anthropic_version] not found, "
            "please reformat your input and try again."
        )
    if version != INVOKE_VERSION:
        raise InvalidRequest(
            f"Malformed input request: #/anthropic_version: {version!r} is not supported; "
            f"use '{INVOKE_VERSION}'"
        )
    request = decode_messages({**data, "model": model_id}, tenant=tenant, count_only=count_only)
    # Pre-warming (max_tokens 0) is an Anthropic Messages feature only (spec §3.8).
    if not count_only and request.sampling.max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1")
    return replace(request, stream=False)


def decode_count_tokens(
    data: Mapping[str, Any], *, model_id: str, tenant: TenantId, tool_cache_points: bool = True
) -> tuple[ChatRequest, MarkRules]:
    """Decode a CountTokens body (spec §5.8): the request and the rules that validate it."""
    source = validate(CountTokensBody, data).input
    if (source.converse is None) == (source.invokeModel is None):
        raise constraint_error(("input",), None, "Member must have exactly one field set")
    if source.converse is not None:
        chat = decode_converse(
            source.converse, model_id=model_id, tenant=tenant, tool_cache_points=tool_cache_points
        )
        return chat, BEDROCK_RULES
    assert source.invokeModel is not None
    body = json_object(_blob(source.invokeModel.body))
    return decode_invoke(body, model_id=model_id, tenant=tenant, count_only=True), ANTHROPIC_RULES


def _blob(value: str) -> bytes:
    # A blob member is base64 in rest-json (what boto3 sends); raw JSON text is accepted too.
    if value.lstrip().startswith("{"):
        return value.encode()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
        raise InvalidRequest("input.invokeModel.body: Input should be base64-encoded") from None


def model_candidates(model_id: str) -> list[str]:
    """``model_id`` and the names it may stand for, most specific first.

    ``arn:aws:bedrock:<region>:<account>:inference-profile/us.anthropic.claude-x`` also tries
    ``us.anthropic.claude-x`` and ``anthropic.claude-x``, so one alias entry for a base model id
    serves its ARNs and cross-region inference profiles.
    """
    names = [model_id]
    if model_id.startswith("arn:") and "/" in model_id:
        names.append(model_id.rsplit("/", 1)[1])
    prefix, dot, base = names[-1].partition(".")
    if dot and prefix in _PROFILE_PREFIXES:
        names.append(base)
    return names


_PROMPT_ARN: Final = re.compile(
    r"^arn:aws(?:-[^:]+)?:bedrock:[^:]*:[^:]*:prompt/(?P<id>[^:/]+)(?::(?P<version>\d+))?$"
)


def prompt_reference(model_id: str) -> str | None:
    """``arn:aws:bedrock:<region>:<account>:prompt/<id>[:<version>]`` -> ``<id>[@<version>]``
    (the template reference of ``templates.py``); None for any other model id."""
    match = _PROMPT_ARN.match(model_id)
    if match is None:
        return None
    version = match.group("version")
    return match.group("id") + (f"@{version}" if version else "")


def prompt_variables(value: Any) -> dict[str, str]:
    """Converse ``promptVariables`` (``{"name": {"text": "..."}}``, botocore
    ``PromptVariableMap``) -> plain values."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise constraint_error(("promptVariables",), value, "Member must be a map")
    result: dict[str, str] = {}
    for name, member in value.items():
        text = member.get("text") if isinstance(member, Mapping) else None
        if not isinstance(text, str):
            raise constraint_error(
                ("promptVariables", name), member, "Member must have exactly one field set: text"
            )
        result[str(name)] = text
    return result


def has_cache_points(request: ChatRequest) -> bool:
    """Whether any block carries a breakpoint: the Converse usage cache fields depend on it."""
    return any(item.block.mark is not None for item in request.placed_blocks())


# -- items in render order --------------------------------------------------------------------


def _items(
    wire: ConverseBody, model_id: str, tool_cache_points: bool
) -> Iterator[tuple[int, _Item]]:
    for i, raw in enumerate(wire.toolConfig.tools if wire.toolConfig else ()):
        item = _item(raw, ("toolConfig", "tools", i), _TOOL_RENDERS)
        if isinstance(item, CacheMark) and not tool_cache_points:
            raise InvalidRequest(TOOL_CACHING_MESSAGE.format(model_id=model_id))
        yield _TOOLS, item
    for i, raw in enumerate(wire.system or ()):
        yield _SYSTEM, _item(raw, ("system", i), _SYSTEM_RENDERS)
    for i, message in enumerate(wire.messages):
        for j, raw in enumerate(message.content):
            yield i, _item(raw, ("messages", i, "content", j), _CONTENT_RENDERS)


def _attach_marks(items: Iterator[tuple[int, _Item]]) -> list[tuple[int, Block]]:
    """Blocks with their group; each cachePoint becomes the mark of the block before it."""
    placed: list[tuple[int, Block]] = []
    follows_block = False
    for group, item in items:
        if isinstance(item, Block):
            placed.append((group, item))
            follows_block = True
            continue
        if not follows_block:
            raise InvalidRequest(MISPLACED_MESSAGE)
        owner, block = placed[-1]
        if not block.is_eligible:
            raise InvalidRequest(_NOT_MARKABLE[block.kind])
        placed[-1] = (owner, replace(block, mark=item))
        follows_block = False
    return placed


def _item(raw: RawItem, loc: Loc, renders: Mapping[str, _Render | None]) -> _Item:
    """One union member: a ``CacheMark`` for a cachePoint, else its block."""
    members = [key for key in raw if key in renders]
    if len(members) != 1:
        raise constraint_error(loc, raw, "Member must have exactly one field set")
    member = members[0]
    value, where = raw[member], (*loc, member)
    if member == "cachePoint":
        point = validate(CachePoint, value, where)
        return CacheMark(point.ttl or "5m", f"{aws_path(where)}.ttl")
    render = renders[member] or _as_json
    return render(value, where)


# -- renderers: (member value, its location) -> Block ------------------------------------------


def _string(value: Any, loc: Loc) -> str:
    if not isinstance(value, str):
        raise constraint_error(loc, value, "Input should be a valid string")
    return value


def _text(value: Any, loc: Loc) -> Block:
    return Block("text", text=_string(value, loc))


def _as_json(value: Any, loc: Loc) -> Block:
    # Members we do not interpret (guardContent, citationsContent, searchResult, ...) are shown
    # to the model as their JSON, so a body the hosted API accepts is accepted.
    return Block("text", text=to_json({loc[-1]: value}))


def _unsupported(value: Any, loc: Loc) -> Block:
    raise InvalidRequest(f"{aws_path(loc)}: {loc[-1]} content is not supported by this model")


def _tool_spec(value: Any, loc: Loc) -> Block:
    spec = validate(ToolSpec, value, loc)
    # The Anthropic field names and order, so the same tool renders to the same tokens on
    # both surfaces and their cache entries are shared (spec §1.12, checklist 67).
    definition: dict[str, Any] = {"name": spec.name}
    if spec.description is not None:
        definition["description"] = spec.description
    definition["input_schema"] = spec.inputSchema.json_schema
    return Block("tool", text=to_json(definition), name=spec.name)


def _system_tool(value: Any, loc: Loc) -> Block:
    name = _string(value.get("name") if isinstance(value, dict) else None, (*loc, "name"))
    return Block("tool", text=to_json({"name": name}), name=name)


def _tool_use(value: Any, loc: Loc) -> Block:
    call = validate(ToolUse, value, loc)
    return Block("tool_use", text=to_json(call.input), name=call.name, ref_id=call.toolUseId)


def _tool_result(value: Any, loc: Loc) -> Block:
    result = validate(ToolResult, value, loc)
    texts = []
    for j, raw in enumerate(result.content):
        item = _item(raw, (*loc, "content", j), _RESULT_RENDERS)
        assert isinstance(item, Block)  # no cachePoint member in a tool result
        texts.append(item.text)
    return Block(
        "tool_result",
        text="\n".join(texts),
        ref_id=result.toolUseId,
        is_error=result.status == "error",
    )


def _json_result(value: Any, loc: Loc) -> Block:
    return Block("text", text=to_json(value))


def _document(value: Any, loc: Loc) -> Block:
    doc = validate(Document, value, loc)
    source, where = doc.source, (*loc, "source")
    if source.text is not None:
        text = source.text
    elif source.content is not None:
        text = "\n\n".join(
            _string(item.get("text"), (*where, "content", j, "text"))
            for j, item in enumerate(source.content)
        )
    elif source.bytes is not None and (doc.format or "txt") in _TEXT_FORMATS:
        try:
            text = base64.b64decode(source.bytes, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidRequest(f"{aws_path(where)}.bytes: not base64 UTF-8 text") from None
    else:
        raise InvalidRequest(
            f"{aws_path(where)}: only text documents ({', '.join(sorted(_TEXT_FORMATS))}) given "
            "as text, content or bytes are supported by this model"
        )
    parts = (doc.name, doc.context, text)
    return Block("document", text="\n\n".join(part for part in parts if part))


def _reasoning(value: Any, loc: Loc) -> Block:
    reasoning = validate(Reasoning, value, loc)
    if reasoning.reasoningText is not None:
        return Block("thinking", text=reasoning.reasoningText.text, cacheable=False)
    # Redacted reasoning is ciphertext a local model cannot read; it keeps its position (§1.1).
    return Block("redacted_thinking", cacheable=False)


_MEDIA: Final[dict[str, _Render | None]] = {
    "image": _unsupported,
    "video": _unsupported,
    "audio": _unsupported,
}
_CONTENT_RENDERS: Final[dict[str, _Render | None]] = {
    "text": _text,
    "document": _document,
    "toolUse": _tool_use,
    "toolResult": _tool_result,
    "reasoningContent": _reasoning,
    "cachePoint": None,
    **_MEDIA,
    "guardContent": None,
    "citationsContent": None,
    "searchResult": None,
    "toolAddition": None,
    "toolRemoval": None,
}
"""``ContentBlock`` member -> renderer; ``None`` renders the member as JSON (cachePoint aside)."""

_SYSTEM_RENDERS: Final[dict[str, _Render | None]] = {
    "text": _text,
    "cachePoint": None,
    "guardContent": None,
}
_TOOL_RENDERS: Final[dict[str, _Render | None]] = {
    "toolSpec": _tool_spec,
    "systemTool": _system_tool,
    "cachePoint": None,
}
_RESULT_RENDERS: Final[dict[str, _Render | None]] = {
    "text": _text,
    "json": _json_result,
    "document": _document,
    **_MEDIA,
    "searchResult": None,
}


def _sampling(wire: ConverseBody) -> Sampling:
    config = wire.inferenceConfig or InferenceConfig()
    top_k = (wire.additionalModelRequestFields or {}).get("top_k")
    return Sampling(
        max_tokens=config.maxTokens or DEFAULT_MAX_TOKENS,
        temperature=1.0 if config.temperature is None else config.temperature,
        top_p=config.topP,
        # Anthropic models on Bedrock take top_k through additionalModelRequestFields.
        top_k=top_k
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0
        else None,
        stop_sequences=tuple(config.stopSequences or ()),
    )


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "INVOKE_VERSION",
    "MISPLACED_MESSAGE",
    "TOOL_CACHING_MESSAGE",
    "decode_converse",
    "decode_count_tokens",
    "decode_invoke",
    "has_cache_points",
    "model_candidates",
]
