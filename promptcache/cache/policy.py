"""Breakpoint rules as data, and their resolution into a validated list of breakpoints.

``resolve_breakpoints`` runs validation steps 4-6 of spec §1.14 (count, automatic-caching
conflict, TTL order) over the canonical blocks; step 3 (marker shape) belongs to the adapters.
Each surface brings its ``MarkRules`` (the adapters own them: ``api/*/rules.py``; the defaults
are the hosted Anthropic texts); each served model has a ``ModelCachePolicy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from promptcache.core.request import CacheMark, PlacedBlock
from promptcache.errors import InvalidRequest
from promptcache.types import Ttl

ANTHROPIC_ORDER_MESSAGE = (
    "{path}: a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
    "Note that blocks are processed in the following order: `tools`, `system`, `messages`."
)


@dataclass(frozen=True, slots=True)
class MarkRules:
    """How a surface counts, orders and places breakpoints (spec §1.9, §1.10, §3.4, §4.2).

    ``auto_mode`` says what the request-level breakpoint does: ``automatic`` (Anthropic: takes a
    slot, conflicts are errors) or ``implicit`` (OpenAI: only a free slot, TTL lowered so it never
    breaks the order).
    """

    max_breakpoints: int = 4
    count_message: str = "A maximum of 4 blocks with cache_control may be provided. Found {n}."
    order_message: str = ANTHROPIC_ORDER_MESSAGE
    conflict_message: str = (
        "cache_control.ttl: the top-level cache_control ttl='{auto}' conflicts with "
        "ttl='{block}' on the last cacheable block"
    )
    auto_mode: Literal["automatic", "implicit"] = "automatic"


@dataclass(frozen=True, slots=True)
class ModelCachePolicy:
    """Per-model caching limits (spec §1.8, §5.9)."""

    min_cacheable_tokens: int = 1024
    max_cacheable_tokens: int | None = None
    tool_cache_points: bool = True
    ttl_1h: bool = True


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """A validated breakpoint: the block it closes (render order) and its TTL class."""

    block_index: int
    ttl: Ttl
    is_tool: bool = False


_HOSTED = MarkRules()


def _last_eligible(placed: Sequence[PlacedBlock]) -> int | None:
    for item in reversed(placed):
        if item.block.is_eligible:
            return item.index
    return None


def _lowest_ttl(marks: Sequence[CacheMark], ttl: Ttl) -> Ttl:
    # An implicit breakpoint comes last in render order: a 5m marker before it forces 5m.
    return "5m" if any(m.ttl == "5m" for m in marks) else ttl


def resolve_breakpoints(
    placed: Sequence[PlacedBlock], auto: CacheMark | None, rules: MarkRules = _HOSTED
) -> list[Breakpoint]:
    """Validate the marks of ``placed`` (render order) and return the breakpoints.

    Raises ``InvalidRequest`` with the surface's messages: too many breakpoints (the automatic
    slot counted), an automatic TTL that conflicts with the marker already on its block, or a 1h
    breakpoint after a 5m one.
    """
    marked = [(item.index, item.block.mark) for item in placed if item.block.mark is not None]
    marks: dict[int, CacheMark] = {i: m for i, m in marked if m is not None}
    target = _last_eligible(placed) if auto is not None else None
    if auto is not None and target is not None:
        existing = marks.get(target)
        if rules.auto_mode == "implicit":
            if existing is None and len(marks) < rules.max_breakpoints:
                marks[target] = CacheMark(
                    _lowest_ttl(list(marks.values()), auto.ttl), auto.ttl_path
                )
        else:
            if existing is None and len(marks) + 1 > rules.max_breakpoints:
                raise InvalidRequest(rules.count_message.format(n=len(marks) + 1))
            if existing is not None and existing.ttl != auto.ttl:
                raise InvalidRequest(
                    rules.conflict_message.format(auto=auto.ttl, block=existing.ttl)
                )
            if existing is None:
                marks[target] = auto
    if len(marks) > rules.max_breakpoints:
        raise InvalidRequest(rules.count_message.format(n=len(marks)))
    seen_5m = False
    for index in sorted(marks):
        mark = marks[index]
        if mark.ttl == "5m":
            seen_5m = True
        elif seen_5m:
            raise InvalidRequest(rules.order_message.format(path=mark.ttl_path))
    return [
        Breakpoint(i, marks[i].ttl, is_tool=placed[i].section == "tools") for i in sorted(marks)
    ]


__all__ = [
    "ANTHROPIC_ORDER_MESSAGE",
    "Breakpoint",
    "MarkRules",
    "ModelCachePolicy",
    "resolve_breakpoints",
]
