"""``ChatEvent``/``ChatResult`` -> Anthropic Messages wire (spec §3.6, §3.7, §3.9).

Usage maps the canonical quantities of spec §0 onto Anthropic's fields::

    input_tokens                 U = N - R - W   (uncached tokens after the last breakpoint)
    cache_read_input_tokens      R
    cache_creation_input_tokens  W = W5m + W1h
    cache_creation               {ephemeral_5m_input_tokens: W5m, ephemeral_1h_input_tokens: W1h}
    output_tokens                O

The three cache fields are always integers, never null or absent (checklist item 5).
"""

from __future__ import annotations

import secrets
import string
from typing import Any, Final, Literal

from promptcache.api.events import collect
from promptcache.core.response import (
    CacheUsage,
    ChatEvent,
    ChatResult,
    Diagnosis,
    Started,
    TextOut,
    ToolCallOut,
)
from promptcache.errors import EngineFailure
from promptcache.types import Ttl

Json = dict[str, Any]
SSE = tuple[str, Json]
"""One server-sent event: its name and its ``data`` object (whose ``type`` is the same name)."""

_ID_ALPHABET: Final = string.ascii_letters + string.digits
_TTL_FIELDS: Final[dict[Ttl, str]] = {
    "5m": "ephemeral_5m_input_tokens",
    "1h": "ephemeral_1h_input_tokens",
}


def _random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def new_message_id(prefix: str = "msg_") -> str:
    """A fresh ``msg_<24 alphanumerics>`` id (Bedrock InvokeModel uses ``msg_bdrk_``)."""
    return _random_id(prefix)


def new_request_id() -> str:
    """A fresh ``req_<24 alphanumerics>`` id for the ``request-id`` header (spec §3.1)."""
    return _random_id("req_")


def usage_json(usage: CacheUsage) -> Json:
    """The full ``usage`` object of a message (spec §3.6)."""
    return {
        "input_tokens": usage.uncached_tokens,
        "cache_creation_input_tokens": usage.written_total,
        "cache_read_input_tokens": usage.read_tokens,
        "cache_creation": {
            field: usage.written_tokens.get(ttl, 0) for ttl, field in _TTL_FIELDS.items()
        },
        "output_tokens": usage.output_tokens,
        "service_tier": "standard",
    }


def delta_usage_json(usage: CacheUsage) -> Json:
    """``message_delta.usage``: cumulative, the cache fields repeated, no breakdown (§3.7)."""
    return {
        "input_tokens": usage.uncached_tokens,
        "cache_creation_input_tokens": usage.written_total,
        "cache_read_input_tokens": usage.read_tokens,
        "output_tokens": usage.output_tokens,
    }


def count_json(input_tokens: int) -> Json:
    """The count_tokens response: exactly ``{"input_tokens": N}`` (spec §3.9)."""
    return {"input_tokens": input_tokens}


def content_json(piece: TextOut | ToolCallOut) -> Json:
    """One response content block."""
    if isinstance(piece, TextOut):
        return {"type": "text", "text": piece.text}
    return {"type": "tool_use", "id": piece.id, "name": piece.name, "input": piece.input}


def diagnostics_json(diagnosis: Diagnosis) -> Json:
    """``diagnostics`` of the beta ``cache-diagnosis-2026-04-07`` (spec §3.12)."""
    if diagnosis.miss is None:
        return {"cache_miss_reason": None}
    reason: Json = {"type": diagnosis.miss}
    if diagnosis.miss not in ("previous_message_not_found", "unavailable"):
        reason["cache_missed_input_tokens"] = diagnosis.missed_tokens
    return {"cache_miss_reason": reason}


def message_json(
    result: ChatResult, *, model: str, message_id: str, diagnosis: Diagnosis | None = None
) -> Json:
    """The non-streaming response body. ``max_tokens: 0`` naturally gives ``content: []``;
    ``diagnostics`` only when the request asked for it."""
    body: Json = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [content_json(piece) for piece in result.content],
        "stop_reason": result.stop_reason,
        "stop_sequence": result.stop_sequence,
        "usage": usage_json(result.usage),
    }
    if diagnosis is not None:
        body["diagnostics"] = diagnostics_json(diagnosis)
    return body


class StreamEncoder:
    """The streaming state machine of spec §3.7: feed ``ChatEvent``s, get SSEs in wire order.

    ``Started`` -> ``message_start`` (prompt-side usage, ``output_tokens`` 1); text pieces share
    one open text block until a tool call or the end closes it; a tool call is a whole block
    (``input: {}`` at start, then the full JSON as one ``input_json_delta``); ``Finished`` closes
    the open block and ends with ``message_delta`` and ``message_stop``.
    """

    def __init__(self, *, model: str, message_id: str) -> None:
        self.model = model
        self.message_id = message_id
        self.is_started = False
        self.is_finished = False
        self._num_blocks = 0
        self._open: Literal["text"] | None = None

    def feed(self, event: ChatEvent) -> list[SSE]:
        """The events that ``event`` produces; raises ``EngineFailure`` if it is out of order."""
        # Started comes first and only once; nothing follows Finished.
        if self.is_finished or self.is_started == isinstance(event, Started):
            raise EngineFailure(f"unexpected {type(event).__name__} event from the service")
        if isinstance(event, Started):
            self.is_started = True
            return [("message_start", {"type": "message_start", "message": self._message(event)})]
        if isinstance(event, TextOut):
            return self._text(event.text)
        if isinstance(event, ToolCallOut):
            return self._tool_call(event)
        self.is_finished = True
        delta = {"stop_reason": event.stop_reason, "stop_sequence": event.stop_sequence}
        return [
            *self._close(),
            (
                "message_delta",
                {"type": "message_delta", "delta": delta, "usage": delta_usage_json(event.usage)},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]

    def _message(self, started: Started) -> Json:
        message: Json = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # project decision (§3.7): output_tokens is 1 at message_start, as the hosted stream.
            "usage": usage_json(started.usage.with_output(1)),
        }
        if started.diagnosis is not None:
            message["diagnostics"] = diagnostics_json(started.diagnosis)
        return message

    def _text(self, text: str) -> list[SSE]:
        if not text:  # never open a block for nothing
            return []
        events = [] if self._open == "text" else self._start({"type": "text", "text": ""})
        self._open = "text"
        delta = {"type": "text_delta", "text": text}
        return [*events, self._delta(delta)]

    def _tool_call(self, call: ToolCallOut) -> list[SSE]:
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        events = self._start(block)
        events.append(self._delta({"type": "input_json_delta", "partial_json": call.input_json}))
        events.extend(self._stop())
        return events

    def _start(self, block: Json) -> list[SSE]:
        events = self._close()
        self._num_blocks += 1
        data = {"type": "content_block_start", "index": self._index, "content_block": block}
        return [*events, ("content_block_start", data)]

    def _delta(self, delta: Json) -> SSE:
        data = {"type": "content_block_delta", "index": self._index, "delta": delta}
        return ("content_block_delta", data)

    def _close(self) -> list[SSE]:
        if self._open is None:
            return []
        return self._stop()

    def _stop(self) -> list[SSE]:
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    @property
    def _index(self) -> int:
        return self._num_blocks - 1


__all__ = [
    "SSE",
    "Json",
    "StreamEncoder",
    "collect",
    "content_json",
    "count_json",
    "delta_usage_json",
    "diagnostics_json",
    "message_json",
    "new_message_id",
    "new_request_id",
    "usage_json",
]
