"""``ChatEvent``/``ChatResult`` -> OpenAI Chat Completions wire (spec §4.6, §4.7).

Usage maps the canonical quantities of spec §0 onto OpenAI's fields::

    prompt_tokens                              N = R + W + U   (cached and written included)
    prompt_tokens_details.cached_tokens        R  (128 * floor(R / 128) when rounding is asked)
    prompt_tokens_details.cache_write_tokens   W
    completion_tokens                          O
    total_tokens                               N + O
    cache_read_input_tokens, cache_creation_input_tokens   R, W  (Portkey style, when non-zero)

``cached_tokens`` and ``cache_write_tokens`` are always present, 0 when nothing was read or
written (checklist item 42).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

from promptcache.core.output import new_id
from promptcache.core.response import (
    CacheUsage,
    ChatEvent,
    ChatResult,
    Started,
    StopReason,
    TextOut,
    ToolCallOut,
)
from promptcache.errors import EngineFailure

Json = dict[str, Any]

FINISH_REASONS: Final[dict[StopReason, str]] = {
    "end_turn": "stop",
    "max_tokens": "length",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "model_context_window_exceeded": "length",
}
"""Canonical stop reason -> OpenAI ``finish_reason``."""

ROUNDING_TOKENS: Final = 128

_NO_COMPLETION_DETAILS: Final = {
    "reasoning_tokens": 0,
    "accepted_prediction_tokens": 0,
    "rejected_prediction_tokens": 0,
    "audio_tokens": 0,
}


@dataclass(frozen=True, slots=True)
class Completion:
    """What every body or chunk of one completion repeats: its id, creation time and model."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> Completion:
        """A fresh ``chatcmpl-<24 alphanumerics>`` id, created now, echoing ``model``."""
        return cls(new_id("chatcmpl-"), int(time.time()), model)

    def head(self, kind: str) -> Json:
        """The leading fields of an object of type ``kind``."""
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage_json(usage: CacheUsage, *, round_cached: bool = False) -> Json:
    """The ``usage`` object (spec §4.6); ``round_cached`` floors ``cached_tokens`` to 128s."""
    read = usage.read_tokens
    written = usage.written_total
    cached = read // ROUNDING_TOKENS * ROUNDING_TOKENS if round_cached else read
    body: Json = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": cached,
            "cache_write_tokens": written,
            "audio_tokens": 0,
        },
        "completion_tokens_details": dict(_NO_COMPLETION_DETAILS),
    }
    if read or written:
        # Portkey's gateway adds these Anthropic-style fields; clients built on it read them.
        body["cache_read_input_tokens"] = read
        body["cache_creation_input_tokens"] = written
    return body


def tool_call_json(call: ToolCallOut) -> Json:
    """One ``message.tool_calls`` entry; ``arguments`` is the input as a JSON string."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.input_json},
    }


def completion_json(result: ChatResult, completion: Completion, *, round_cached: bool) -> Json:
    """The non-streaming response body: one choice."""
    text = "".join(piece.text for piece in result.content if isinstance(piece, TextOut))
    calls = [tool_call_json(piece) for piece in result.content if isinstance(piece, ToolCallOut)]
    message: Json = {
        "role": "assistant",
        "content": text if text or not calls else None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": FINISH_REASONS[result.stop_reason],
    }
    return {
        **completion.head("chat.completion"),
        "choices": [choice],
        "usage": usage_json(result.usage, round_cached=round_cached),
    }


class ChunkEncoder:
    """The streaming state machine of spec §4.7: feed ``ChatEvent``s, get chunk objects.

    ``Started`` -> a chunk whose delta opens the assistant message; each text piece and each
    tool call is one chunk; ``Finished`` -> an empty delta carrying ``finish_reason``, then, with
    ``include_usage``, one chunk with ``choices: []`` and the full usage. With ``include_usage``
    every other chunk has ``"usage": null``; without it no chunk has a ``usage`` key.
    """

    def __init__(self, completion: Completion, *, include_usage: bool, round_cached: bool) -> None:
        self.completion = completion
        self.include_usage = include_usage
        self.round_cached = round_cached
        self.is_started = False
        self.is_finished = False
        self._num_tool_calls = 0

    def feed(self, event: ChatEvent) -> list[Json]:
        """The chunks that ``event`` produces; raises ``EngineFailure`` if it is out of order."""
        if self.is_finished or self.is_started == isinstance(event, Started):
            raise EngineFailure(f"unexpected {type(event).__name__} event from the service")
        if isinstance(event, Started):
            self.is_started = True
            return [self._chunk({"role": "assistant", "content": ""})]
        if isinstance(event, TextOut):
            return [self._chunk({"content": event.text})] if event.text else []
        if isinstance(event, ToolCallOut):
            call = {"index": self._num_tool_calls, **tool_call_json(event)}
            self._num_tool_calls += 1
            return [self._chunk({"tool_calls": [call]})]
        self.is_finished = True
        chunks = [self._chunk({}, finish_reason=FINISH_REASONS[event.stop_reason])]
        if self.include_usage:
            usage = usage_json(event.usage, round_cached=self.round_cached)
            chunks.append({**self._head(), "choices": [], "usage": usage})
        return chunks

    def _chunk(self, delta: Json, finish_reason: str | None = None) -> Json:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head(), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _head(self) -> Json:
        return self.completion.head("chat.completion.chunk")


__all__ = [
    "FINISH_REASONS",
    "ROUNDING_TOKENS",
    "ChunkEncoder",
    "Completion",
    "Json",
    "completion_json",
    "tool_call_json",
    "usage_json",
]
