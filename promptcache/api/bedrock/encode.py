"""``ChatEvent``/``ChatResult`` -> Bedrock runtime wire (spec §5.4, §5.5, §5.7, §5.8).

Converse usage maps the canonical quantities of spec §0 onto botocore's ``TokenUsage``::

    inputTokens            U = N - R - W   (uncached tokens after the last cache position)
    outputTokens           O
    totalTokens            N + O = U + R + W + O
    cacheReadInputTokens   R    \\
    cacheWriteInputTokens  W     > present iff the request has a cachePoint (project decision)
    cacheDetails           [{"ttl": "1h", "inputTokens": W1h}, {"ttl": "5m", ...}], non-zero only

InvokeModel answers with the Anthropic message (id ``msg_bdrk_...``) and its snake_case usage,
plus the counts in ``X-Amzn-Bedrock-*`` headers; its stream wraps each Anthropic stream event in
a ``chunk`` event whose payload is ``{"bytes": base64(event JSON)}``.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Final, Protocol

from promptcache.api.anthropic.encode import StreamEncoder
from promptcache.core.response import (
    CacheUsage,
    ChatEvent,
    ChatResult,
    Finished,
    Started,
    TextOut,
    ToolCallOut,
)
from promptcache.errors import EngineFailure
from promptcache.types import Ttl

Json = dict[str, Any]
Event = tuple[str, Json]
"""One event-stream event: its ``:event-type`` and its JSON payload."""

_DETAIL_ORDER: Final[tuple[Ttl, ...]] = ("1h", "5m")


class EventEncoder(Protocol):
    """A streaming state machine: feed ``ChatEvent``s, get event-stream events in wire order."""

    @property
    def is_finished(self) -> bool:
        """Whether the closing events have been produced."""
        ...

    def feed(self, event: ChatEvent) -> list[Event]:
        """The events ``event`` produces; raises ``EngineFailure`` if it is out of order."""
        ...


def elapsed_ms(started_at: float) -> int:
    """Milliseconds since ``started_at`` (a ``time.monotonic()`` reading)."""
    return max(0, round((time.monotonic() - started_at) * 1000))


def usage_json(usage: CacheUsage, *, has_cache_points: bool) -> Json:
    """Converse ``usage`` (spec §5.4); cache fields only for requests with a cachePoint."""
    out: Json = {
        "inputTokens": usage.uncached_tokens,
        "outputTokens": usage.output_tokens,
        "totalTokens": usage.prompt_tokens + usage.output_tokens,
    }
    if has_cache_points:
        out["cacheReadInputTokens"] = usage.read_tokens
        out["cacheWriteInputTokens"] = usage.written_total
        out["cacheDetails"] = [
            {"ttl": ttl, "inputTokens": usage.written_tokens[ttl]}
            for ttl in _DETAIL_ORDER
            if usage.written_tokens.get(ttl, 0) > 0
        ]
    return out


def content_json(piece: TextOut | ToolCallOut) -> Json:
    """One Converse output content block: ``{"text"}`` or ``{"toolUse"}``."""
    if isinstance(piece, TextOut):
        return {"text": piece.text}
    return {"toolUse": {"toolUseId": piece.id, "name": piece.name, "input": piece.input}}


def converse_json(result: ChatResult, *, has_cache_points: bool, latency_ms: int) -> Json:
    """The Converse response body."""
    content = [content_json(piece) for piece in result.content]
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": result.stop_reason,
        "usage": usage_json(result.usage, has_cache_points=has_cache_points),
        "metrics": {"latencyMs": latency_ms},
    }


def count_json(input_tokens: int) -> Json:
    """The CountTokens response: ``{"inputTokens": N}`` (spec §5.8)."""
    return {"inputTokens": input_tokens}


def invoke_headers(usage: CacheUsage, *, latency_ms: int) -> dict[str, str]:
    """The ``X-Amzn-Bedrock-*`` headers of an InvokeModel response (spec §5.7)."""
    return {
        "X-Amzn-Bedrock-Input-Token-Count": str(usage.uncached_tokens),
        "X-Amzn-Bedrock-Output-Token-Count": str(usage.output_tokens),
        "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": str(usage.read_tokens),
        "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": str(usage.written_total),
        "X-Amzn-Bedrock-Invocation-Latency": str(latency_ms),
    }


def invocation_metrics(usage: CacheUsage, *, latency_ms: int, first_byte_ms: int) -> Json:
    """``amazon-bedrock-invocationMetrics`` of the streamed ``message_stop`` (spec §5.7)."""
    return {
        "inputTokenCount": usage.uncached_tokens,
        "outputTokenCount": usage.output_tokens,
        "invocationLatency": latency_ms,
        "firstByteLatency": first_byte_ms,
        "cacheReadInputTokenCount": usage.read_tokens,
        "cacheWriteInputTokenCount": usage.written_total,
    }


class ConverseStreamEncoder:
    """The ConverseStream state machine of spec §5.5.

    ``Started`` -> ``messageStart``; text pieces share one open text block (no
    ``contentBlockStart``) until a tool call or the end closes it; a tool call is a whole block
    (``contentBlockStart`` with ``toolUse``, its input JSON as one delta, ``contentBlockStop``);
    ``Finished`` -> ``messageStop`` then ``metadata`` with the usage and latency.
    """

    def __init__(self, *, has_cache_points: bool, started_at: float) -> None:
        self.has_cache_points = has_cache_points
        self.started_at = started_at
        self.is_started = False
        self.is_finished = False
        self._index = -1
        self._text_open = False

    def feed(self, event: ChatEvent) -> list[Event]:
        """The events ``event`` produces; raises ``EngineFailure`` if it is out of order."""
        # Started comes first and only once; nothing follows Finished.
        if self.is_finished or self.is_started == isinstance(event, Started):
            raise EngineFailure(f"unexpected {type(event).__name__} event from the service")
        if isinstance(event, Started):
            self.is_started = True
            return [("messageStart", {"role": "assistant"})]
        if isinstance(event, TextOut):
            if not event.text:
                return []
            if not self._text_open:
                self._index += 1
                self._text_open = True
            return [self._delta({"text": event.text})]
        if isinstance(event, ToolCallOut):
            events = self._close()
            self._index += 1
            start = {"toolUse": {"toolUseId": event.id, "name": event.name}}
            return [
                *events,
                ("contentBlockStart", {"contentBlockIndex": self._index, "start": start}),
                self._delta({"toolUse": {"input": event.input_json}}),
                self._stop(),
            ]
        self.is_finished = True
        metadata = {
            "usage": usage_json(event.usage, has_cache_points=self.has_cache_points),
            "metrics": {"latencyMs": elapsed_ms(self.started_at)},
        }
        return [
            *self._close(),
            ("messageStop", {"stopReason": event.stop_reason}),
            ("metadata", metadata),
        ]

    def _delta(self, delta: Json) -> Event:
        return ("contentBlockDelta", {"contentBlockIndex": self._index, "delta": delta})

    def _stop(self) -> Event:
        return ("contentBlockStop", {"contentBlockIndex": self._index})

    def _close(self) -> list[Event]:
        if not self._text_open:
            return []
        self._text_open = False
        return [self._stop()]


class InvokeStreamEncoder:
    """InvokeModelWithResponseStream: the Anthropic stream events of spec §3.7 (no ``ping``),
    each as a ``chunk``; ``message_stop`` also carries ``amazon-bedrock-invocationMetrics``."""

    def __init__(self, *, model: str, message_id: str, started_at: float) -> None:
        self.started_at = started_at
        self._anthropic = StreamEncoder(model=model, message_id=message_id)
        self._first_byte_ms: int | None = None

    @property
    def is_finished(self) -> bool:
        return self._anthropic.is_finished

    def feed(self, event: ChatEvent) -> list[Event]:
        """The ``chunk`` events ``event`` produces; raises ``EngineFailure`` if out of order."""
        if self._first_byte_ms is None:
            self._first_byte_ms = elapsed_ms(self.started_at)
        chunks = []
        for name, data in self._anthropic.feed(event):
            if name == "message_stop" and isinstance(event, Finished):
                metrics = invocation_metrics(
                    event.usage,
                    latency_ms=elapsed_ms(self.started_at),
                    first_byte_ms=self._first_byte_ms,
                )
                data = {**data, "amazon-bedrock-invocationMetrics": metrics}
            chunks.append(("chunk", {"bytes": _base64_json(data)}))
        return chunks


def _base64_json(data: Json) -> str:
    raw = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return base64.b64encode(raw).decode("ascii")


__all__ = [
    "ConverseStreamEncoder",
    "Event",
    "EventEncoder",
    "InvokeStreamEncoder",
    "Json",
    "content_json",
    "converse_json",
    "count_json",
    "elapsed_ms",
    "invocation_metrics",
    "invoke_headers",
    "usage_json",
]
