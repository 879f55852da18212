"""What the service hands back to adapters: usage, streamed events and the final result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from promptcache.types import Section, TierName, Ttl

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


MissReason = Literal[
    "never_written",
    "expired",
    "evicted",
    "below_minimum",
    "outside_lookback",
    "prefix_changed",
    "model_changed",
]
"""Why a breakpoint was not read (docs/architecture.md, "Miss reasons")."""


@dataclass(frozen=True, slots=True)
class CacheMiss:
    """One breakpoint that was not read, and why. Metadata only: never another tenant's.

    ``block`` is the breakpoint's block (render order) and ``tokens`` its offset. ``expired``
    carries ``age_s`` (seconds since it expired); ``evicted`` the ``tier`` it left and its
    ``cause`` (``capacity``, ``tenant_share``, ...); ``prefix_changed`` the ``matched_blocks`` of
    the nearest earlier entry of the tenant, ``first_diff`` (the first differing block) and its
    ``section``; ``outside_lookback`` the block of the live entry found too far back (``found``).
    """

    reason: MissReason
    block: int
    tokens: int
    age_s: float | None = None
    tier: TierName | None = None
    cause: str | None = None
    matched_blocks: int | None = None
    first_diff: int | None = None
    section: Section | None = None
    found: int | None = None


DiagnosisType = Literal[
    "model_changed",
    "system_changed",
    "tools_changed",
    "messages_changed",
    "previous_message_not_found",
    "unavailable",
]


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Anthropic's ``diagnostics.cache_miss_reason`` (spec §3.12); None on ``Started`` means
    the request asked for nothing, ``miss=None`` that the requests match."""

    miss: DiagnosisType | None = None
    missed_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Started:
    """The plan is final: usage of the prompt side is known. Always the first event.

    ``misses`` explains every breakpoint that was not read; ``read_tier`` is where the hit was
    found (before any promotion); ``diagnosis`` answers a request that asked for diagnostics.
    """

    usage: CacheUsage
    misses: tuple[CacheMiss, ...] = ()
    read_tier: TierName | None = None
    diagnosis: Diagnosis | None = None


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
    "CacheMiss",
    "CacheUsage",
    "ChatEvent",
    "ChatResult",
    "Diagnosis",
    "DiagnosisType",
    "Finished",
    "MissReason",
    "Started",
    "StopReason",
    "TextOut",
    "ToolCallOut",
]
