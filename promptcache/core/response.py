"""What the service hands back to adapters: usage, streamed events and the final result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from promptcache.types import Ttl

StopReason = Literal[
    "end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"
]


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """The canonical usage quantities of spec §0: ``N = R + W + U`` and the output count ``O``."""

    prompt_tokens: int
    read_tokens: int = 0
    written_tokens: dict[Ttl, int] = field(default_factory=lambda: {"5m": 0, "1h": 0})
    output_tokens: int = 0

    @property
    def written_total(self) -> int:
        return self.written_tokens["5m"] + self.written_tokens["1h"]

    @property
    def uncached_tokens(self) -> int:
        """``U = N - R - W``: what Anthropic reports as ``input_tokens``."""
        return self.prompt_tokens - self.read_tokens - self.written_total

    def with_output(self, output_tokens: int) -> CacheUsage:
        return CacheUsage(
            self.prompt_tokens, self.read_tokens, dict(self.written_tokens), output_tokens
        )


@dataclass(frozen=True, slots=True)
class TextOut:
    """Generated text to append to the current text block."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallOut:
    """A complete tool call the model emitted."""

    id: str
    name: str
    input: dict[str, Any]

    @property
    def input_json(self) -> str:
        return json.dumps(self.input, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Started:
    """The plan is final: usage of the prompt side is known. Always the first event."""

    usage: CacheUsage


@dataclass(frozen=True, slots=True)
class Finished:
    """Generation ended; ``usage`` carries the final output count."""

    stop_reason: StopReason
    stop_sequence: str | None
    usage: CacheUsage


ChatEvent = Started | TextOut | ToolCallOut | Finished


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A whole response, collected from the events."""

    content: list[TextOut | ToolCallOut]
    stop_reason: StopReason
    stop_sequence: str | None
    usage: CacheUsage


__all__ = [
    "CacheUsage",
    "ChatEvent",
    "ChatResult",
    "Finished",
    "Started",
    "StopReason",
    "TextOut",
    "ToolCallOut",
]
