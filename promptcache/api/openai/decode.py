"""OpenAI Chat Completions wire -> ``ChatRequest`` (spec §1.1, §4.1-§4.5).

Pure functions: headers and body bytes in, a ``ChatCall`` or an ``InvalidRequest`` out. The body's
own fields are checked first (the hosted ranges of ``limits.py``, types, enumerations, ``n``),
then the blocks in render order (``parts.py``: marker shape, empty text). Breakpoint count and
TTL order (validation steps 4-6) belong to the cache policy (``OPENAI_RULES``), which the service
applies.

Caching fields:

- ``prompt_cache_options.mode``: ``implicit`` (default) puts the implicit breakpoint on the last
  eligible block (``ChatRequest.auto_cache``), ``explicit`` leaves only the markers;
- the request TTL (§4.5): ``5m``; ``prompt_cache_retention: "24h"`` -> ``1h``;
  ``prompt_cache_options.ttl: "30m"`` -> ``1h`` and wins over the retention;
- ``prompt_cache_key`` -> ``ChatRequest.partition`` (§4.4); ``user`` has no effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from promptcache.api.http import bearer_token
from promptcache.api.openai.limits import check_limits
from promptcache.api.openai.parts import Markers, sections, tool_block
from promptcache.api.openai.schema import ChatBody
from promptcache.api.wire import json_object, string_metadata, validate
from promptcache.core.request import CacheMark, ChatRequest, Sampling
from promptcache.errors import InvalidRequest
from promptcache.types import TenantId, Ttl

DEFAULT_MAX_TOKENS: Final = 2**31 - 1
"""Without ``max_tokens`` / ``max_completion_tokens`` the model runs until it stops or the
context window is full, as on the hosted API."""

COMPAT_HEADER: Final = "x-promptcache-compat"
ROUND_CACHED_FLAG: Final = "openai-cached-128"
"""``x-promptcache-compat: openai-cached-128`` asks for 128-token ``cached_tokens`` (§4.6)."""

RETENTION_TTLS: Final[dict[str, Ttl]] = {"in_memory": "5m", "24h": "1h"}
OPTIONS_TTLS: Final[dict[str, Ttl]] = {"30m": "1h"}


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A decoded request and the OpenAI-only settings its response needs."""

    request: ChatRequest
    include_usage: bool = False


def credentials(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(Authorization bearer token, x-portkey-api-key)``: the credentials a client sent (§4.1)."""
    return bearer_token(headers), headers.get("x-portkey-api-key") or None


def wants_rounding(headers: Mapping[str, str]) -> bool:
    """Whether the request asks for 128-token rounding of ``cached_tokens`` (spec §4.6)."""
    flags = headers.get(COMPAT_HEADER, "").split(",")
    return ROUND_CACHED_FLAG in (flag.strip().lower() for flag in flags)


def decode_chat(body: bytes, *, tenant: TenantId) -> ChatCall:
    """Decode a Chat Completions body into a ``ChatCall``.

    ``model`` is the name the client sent; responses echo it. Raises ``InvalidRequest`` with a
    ``<path>: <problem>`` message and ``param`` naming the field for the first thing wrong.
    """
    return decode_chat_data(json_object(body), tenant=tenant)


def decode_chat_data(data: dict[str, Any], *, tenant: TenantId) -> ChatCall:
    """``decode_chat`` of a parsed body (a rendered prompt template's, for one)."""
    check_limits(data)
    wire = validate(ChatBody, data, "")
    if wire.n not in (None, 1):
        raise InvalidRequest(
            "n: only n=1 is supported by this server", param="n", code="invalid_value"
        )
    ttl = request_ttl(wire)
    markers = Markers(ttl)
    # Built in render order, so the first bad block reported is the first in the prompt.
    tools = tuple(tool_block(raw, f"tools.{i}", markers) for i, raw in enumerate(wire.tools or ()))
    system, messages = sections(wire.messages, markers)
    options = wire.prompt_cache_options
    implicit = options is None or options.mode == "implicit"
    request = ChatRequest(
        model=wire.model,
        messages=messages,
        sampling=_sampling(wire),
        system=system,
        tools=tools,
        auto_cache=CacheMark(ttl, "prompt_cache_options.ttl") if implicit else None,
        tenant=tenant,
        partition=wire.prompt_cache_key or "",
        stream=bool(wire.stream),
        metadata=string_metadata(wire.metadata),
    )
    include_usage = bool(wire.stream and wire.stream_options and wire.stream_options.include_usage)
    return ChatCall(request, include_usage=include_usage)


def request_ttl(wire: ChatBody) -> Ttl:
    """The TTL of the implicit breakpoint and of markers without ``ttl`` (spec §4.5)."""
    options = wire.prompt_cache_options
    if options is not None and options.ttl is not None:
        return OPTIONS_TTLS[options.ttl]
    if wire.prompt_cache_retention is not None:
        return RETENTION_TTLS[wire.prompt_cache_retention]
    return "5m"


def _sampling(wire: ChatBody) -> Sampling:
    stop = (wire.stop,) if isinstance(wire.stop, str) else tuple(wire.stop or ())
    return Sampling(
        max_tokens=wire.max_completion_tokens or wire.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=1.0 if wire.temperature is None else wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        stop_sequences=stop,
        seed=wire.seed,
    )


__all__ = [
    "COMPAT_HEADER",
    "DEFAULT_MAX_TOKENS",
    "OPTIONS_TTLS",
    "RETENTION_TTLS",
    "ROUND_CACHED_FLAG",
    "ChatCall",
    "credentials",
    "decode_chat",
    "decode_chat_data",
    "request_ttl",
    "wants_rounding",
]
