"""Anthropic Messages wire -> ``ChatRequest`` (spec §1.1, §3.1-§3.3, §3.8).

Pure functions: headers and body bytes in, a ``ChatRequest`` or an ``InvalidRequest`` out. This
module owns validation steps 2 and 3 of spec §1.14 (protocol headers, marker shape and placement)
and the pre-warm combinations of §3.8. Breakpoint count, automatic-caching conflicts and TTL order
(steps 4-6) belong to the cache policy, which the service applies.

Sections map to the canonical prompt as in the §1.1 table: each ``tools[i]`` is one block; a
string ``system`` is one block and an array one block per item; a message's string content is one
block, and an array gives the blocks of each item (``blocks.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Final

from promptcache.api.anthropic.blocks import (
    cache_mark,
    content_blocks,
    text_block,
    to_json,
    validate,
)
from promptcache.api.anthropic.schema import (
    CountTokensBody,
    CustomTool,
    MessagesBody,
    RawBlock,
    ServerTool,
    TextBlock,
)
from promptcache.api.http import bearer_token
from promptcache.api.wire import json_object, string_metadata
from promptcache.core.request import Block, ChatRequest, DiagnosticsAsk, Message, Sampling
from promptcache.errors import InvalidRequest
from promptcache.types import Role, TenantId

ACCEPTED_VERSIONS: Final = frozenset({"2023-06-01", "2023-01-01", "2026-10-21"})
"""Spec §3.1 names the first two. The anthropic SDK this project pins (2.12) sends
``2026-10-21``, and the spec's clients are the unmodified SDKs, so that value is accepted too."""

# -- headers (validation step 2) ------------------------------------------------------------------


def credential(headers: Mapping[str, str]) -> str | None:
    """The client's credential: ``x-api-key``, else an ``Authorization: Bearer`` token."""
    if key := headers.get("x-api-key"):
        return key
    return bearer_token(headers)


def check_version(headers: Mapping[str, str]) -> None:
    """Require an accepted ``anthropic-version`` header (spec §3.1); raise ``InvalidRequest``."""
    version = headers.get("anthropic-version")
    if version is None:
        raise InvalidRequest("anthropic-version: header is required")
    if version not in ACCEPTED_VERSIONS:
        raise InvalidRequest(
            f"anthropic-version: {version!r} is not a supported version; "
            f"use one of {', '.join(sorted(ACCEPTED_VERSIONS, reverse=True))}"
        )


# -- body ------------------------------------------------------------------------------------------


def decode_messages(
    body: bytes | Mapping[str, Any], *, tenant: TenantId, count_only: bool = False
) -> ChatRequest:
    """Decode a Messages (or, with ``count_only``, a count_tokens) body into a ``ChatRequest``.

    ``body`` is the raw bytes or an already parsed object (Bedrock InvokeModel passes its body
    with the URL's model id added). ``model`` is the name the client sent; responses echo it.
    Raises ``InvalidRequest`` with a hosted-style ``<path>: <problem>`` message for the first
    thing wrong with the body.
    """
    data = body if isinstance(body, Mapping) else json_object(body)
    wire = validate(CountTokensBody if count_only else MessagesBody, data, "")
    # Built in render order, so the first bad block reported is the first in the prompt.
    tools = tuple(_tool(raw, f"tools.{i}") for i, raw in enumerate(wire.tools or ()))
    system = tuple(_system(wire.system))
    messages = tuple(_messages(wire))
    request = ChatRequest(
        model=wire.model,
        messages=messages,
        sampling=Sampling(max_tokens=0),
        system=system,
        tools=tools,
        auto_cache=cache_mark(wire.cache_control, ""),
        tenant=tenant,
    )
    if not isinstance(wire, MessagesBody):
        return request
    _check_prewarm(wire)
    return replace(
        request,
        sampling=_sampling(wire),
        stream=bool(wire.stream),
        metadata=string_metadata(wire.metadata),
    )


# The wire names equal the ``Sampling`` field names; ``None`` keeps Sampling's default.
_SAMPLING_FIELDS: Final = ("temperature", "top_p", "top_k")


def _sampling(wire: MessagesBody) -> Sampling:
    optional = {name: getattr(wire, name) for name in _SAMPLING_FIELDS}
    return Sampling(
        max_tokens=wire.max_tokens,
        stop_sequences=tuple(wire.stop_sequences or ()),
        **{name: value for name, value in optional.items() if value is not None},
    )


_PREWARM_CONFLICTS: Final[tuple[tuple[str, Callable[[MessagesBody], bool]], ...]] = (
    ("stream", lambda wire: wire.stream is True),
    ("thinking", lambda wire: (wire.thinking or {}).get("type") == "enabled"),
    ("output_config.format", lambda wire: (wire.output_config or {}).get("format") is not None),
    ("tool_choice", lambda wire: (wire.tool_choice or {}).get("type") in ("tool", "any")),
)
"""Settings that cannot go with ``max_tokens: 0`` (spec §3.8), in the order they are checked."""


def _check_prewarm(wire: MessagesBody) -> None:
    if wire.max_tokens != 0:
        return
    for field, conflicts in _PREWARM_CONFLICTS:
        if conflicts(wire):
            raise InvalidRequest(
                f"max_tokens: 0 (cache pre-warming) cannot be combined with {field}"
            )


# -- sections -------------------------------------------------------------------------------------


def _tool(raw: RawBlock, path: str) -> Block:
    tool: CustomTool | ServerTool
    if raw.get("type") in (None, "custom"):
        tool = validate(CustomTool, raw, path)
    else:
        tool = validate(ServerTool, raw, path)
    # The marker is not part of the definition: adding or moving one must not change the tokens.
    definition = {key: value for key, value in raw.items() if key != "cache_control"}
    return Block(
        "tool", text=to_json(definition), name=tool.name, mark=cache_mark(tool.cache_control, path)
    )


ATTRIBUTION_PREFIX: Final = "x-anthropic-billing-header:"
"""Claude Code's attribution line (spec §3.11): ``x-anthropic-billing-header: cc_version=
2.1.197.<3 hex>; cc_entrypoint=sdk-cli;``. The hex changes with every prompt and the line comes
first, so rendering it would give every new question a new key for the whole prefix."""


def _system(system: str | list[RawBlock] | None) -> Iterator[Block]:
    if isinstance(system, str):
        if text := _without_attribution(system):
            yield Block("text", text=text)
        return
    for i, raw in enumerate(system or ()):
        path = f"system.{i}"
        item = validate(TextBlock, raw, path)
        text = _without_attribution(item.text) if i == 0 else item.text
        if text or text == item.text:
            yield text_block(text, item.cache_control, path)


def _without_attribution(text: str) -> str:
    """``text`` without a leading attribution line (spec §3.11), which is metadata, not prompt:
    it is kept out of the rendered prompt, the cache key and ``input_tokens``. A block that was
    only that line disappears, marker and all (Claude Code never marks it)."""
    if not text.startswith(ATTRIBUTION_PREFIX):
        return text
    _line, _newline, rest = text.partition("\n")
    return rest


# Clients may send ``system``-role messages (the SDK types them: text content), but the canonical
# roles are user and assistant. Such a message becomes a user turn at its own position: the model
# still sees the text, block paths stay ``messages.<n>.content.<m>``, and nothing is moved into
# the system section, which would reorder the prompt (and its key chain) behind the client's back.
_ROLES: Final[dict[str, Role]] = {"user": "user", "assistant": "assistant", "system": "user"}


def _messages(wire: CountTokensBody) -> Iterator[Message]:
    for i, message in enumerate(wire.messages):
        if isinstance(message.content, str):
            blocks = [Block("text", text=message.content)]
        else:
            blocks = [
                block
                for j, raw in enumerate(message.content)
                for block in content_blocks(raw, f"messages.{i}.content.{j}")
            ]
        yield Message(_ROLES[message.role], tuple(blocks))


DIAGNOSTICS_BETA: Final = "cache-diagnosis-2026-04-07"

# What the diagnostics comparison does not cover (spec §3.12): a change here is ``unavailable``.
_UNCOVERED: Final = ("tool_choice", "thinking", "context_management", "output_config")


def betas(headers: Mapping[str, str]) -> frozenset[str]:
    """The ``anthropic-beta`` names (comma-separated, possibly repeated headers joined)."""
    return frozenset(b.strip() for b in headers.get("anthropic-beta", "").split(",") if b.strip())


def decode_diagnostics(
    data: Mapping[str, Any], headers: Mapping[str, str], *, message_id: str
) -> DiagnosticsAsk | None:
    """The request's ``diagnostics`` object under the beta ``cache-diagnosis-2026-04-07``
    (spec §3.12), to be remembered as ``message_id``; None without the beta or the object."""
    found = betas(headers)
    raw = data.get("diagnostics")
    if DIAGNOSTICS_BETA not in found or raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidRequest("diagnostics: Input should be a valid dictionary")
    previous = raw.get("previous_message_id")
    if previous is not None and not isinstance(previous, str):
        raise InvalidRequest("diagnostics.previous_message_id: Input should be a valid string")
    uncovered = {name: data.get(name) for name in _UNCOVERED}
    uncovered["betas"] = sorted(found)
    text = json.dumps(uncovered, sort_keys=True, ensure_ascii=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return DiagnosticsAsk(message_id, previous, digest)


__all__ = [
    "ACCEPTED_VERSIONS",
    "ATTRIBUTION_PREFIX",
    "DIAGNOSTICS_BETA",
    "betas",
    "check_version",
    "credential",
    "decode_diagnostics",
    "decode_messages",
]
