"""The canonical request every protocol adapter decodes into (spec §1.1).

A request is an ordered list of *leaf blocks* in three sections, rendered in the order
``tools -> system -> messages``. Breakpoints are carried on the blocks as ``CacheMark``s; the
automatic (Anthropic top-level) or implicit (OpenAI) breakpoint is carried on the request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from promptcache.types import DEFAULT_TENANT, Role, Section, TenantId, Ttl

BlockKind = Literal[
    "tool", "text", "tool_use", "tool_result", "thinking", "redacted_thinking", "document"
]


@dataclass(frozen=True, slots=True)
class CacheMark:
    """A breakpoint as written on the wire: its TTL and where it sits, for error messages.

    ``ttl_path`` is the dotted JSON path of the marker's ``ttl`` field as the protocol names it,
    e.g. ``messages.0.content.4.cache_control.ttl`` or ``cache_control.ttl`` (automatic).
    """

    ttl: Ttl
    ttl_path: str = "cache_control.ttl"


@dataclass(frozen=True, slots=True)
class Block:
    """One leaf block of the canonical prompt.

    ``text`` holds what the block renders: the text itself, a tool definition or ``tool_use`` input
    as JSON (key order as received, spec §1.2), or a tool result item. ``cacheable`` is false for
    blocks that may not carry a marker (thinking); ``mark`` is the block's own breakpoint.
    """

    kind: BlockKind
    text: str = ""
    name: str = ""
    ref_id: str = ""
    is_error: bool = False
    cacheable: bool = True
    mark: CacheMark | None = None

    @property
    def is_eligible(self) -> bool:
        """Whether automatic caching may put its breakpoint here (spec §3.4)."""
        return self.cacheable and not (self.kind == "text" and self.text == "")


@dataclass(frozen=True, slots=True)
class Message:
    """One conversation turn: a role and its leaf blocks in order."""

    role: Role
    blocks: tuple[Block, ...]


@dataclass(frozen=True, slots=True)
class Sampling:
    """Decoding settings. ``temperature == 0`` (or ``top_k == 1``) means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class PlacedBlock:
    """A block with its place in render order: section, role and index."""

    index: int
    section: Section
    role: Role | Literal["system"]
    block: Block


@dataclass(frozen=True, slots=True)
class DiagnosticsAsk:
    """Anthropic's ``diagnostics`` request object (spec §3.12): compare with the message named
    ``previous_message_id`` (None on a first turn), and remember this one as ``message_id``."""

    message_id: str
    previous_message_id: str | None = None
    uncovered: str = ""
    """A digest of what the comparison does not cover (tool choice, thinking, betas): when it
    differs from the previous message's, the answer is ``unavailable``."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A protocol-neutral chat request, as every adapter decodes it.

    ``auto_cache`` is a breakpoint the planner places on the last eligible block (Anthropic's
    top-level ``cache_control``); ``tenant`` and ``partition`` select the cache namespace.
    """

    model: str
    messages: tuple[Message, ...]
    sampling: Sampling
    system: tuple[Block, ...] = ()
    tools: tuple[Block, ...] = ()
    auto_cache: CacheMark | None = None
    tenant: TenantId = DEFAULT_TENANT
    partition: str = ""
    stream: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    diagnostics: DiagnosticsAsk | None = None

    def placed_blocks(self) -> Iterator[PlacedBlock]:
        """Every leaf block in render order (tools, system, messages), with its index."""
        index = 0
        for block in self.tools:
            yield PlacedBlock(index, "tools", "system", block)
            index += 1
        for block in self.system:
            yield PlacedBlock(index, "system", "system", block)
            index += 1
        for message in self.messages:
            for block in message.blocks:
                yield PlacedBlock(index, "messages", message.role, block)
                index += 1


__all__ = [
    "Block",
    "BlockKind",
    "CacheMark",
    "ChatRequest",
    "DiagnosticsAsk",
    "Message",
    "PlacedBlock",
    "Sampling",
]
