"""Anthropic's cache diagnostics (beta ``cache-diagnosis-2026-04-07``, spec §3.12).

A request that carries ``diagnostics`` is remembered under its message id (per tenant, the last
``per_tenant`` ids of at most ``tenants`` tenants, metadata only: model, the model-neutral key
chain of its blocks, their sections and ends, how far it was cached, and a digest of what the
comparison does not cover). A later request naming it as ``previous_message_id`` is compared
with it: the first differing block's section says ``tools_changed``, ``system_changed`` or
``messages_changed``; another model says ``model_changed``; the same prefix with another tool
choice, thinking or beta set says ``unavailable``; an unknown id, or one of another tenant,
``previous_message_not_found``. ``cache_missed_input_tokens`` is what the previous message had
cached but this one did not read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from promptcache.core.response import Diagnosis
from promptcache.types import BlockHash, Section, TenantId

MESSAGES_PER_TENANT = 256
TENANTS = 1024


@dataclass(frozen=True, slots=True)
class PromptShape:
    """What the comparison needs of one request; no text."""

    model: str
    chain: tuple[BlockHash, ...]
    sections: tuple[Section, ...]
    ends: tuple[int, ...]
    cached_tokens: int
    uncovered: str


def compare(previous: PromptShape, current: PromptShape, read_tokens: int) -> Diagnosis:
    """The diagnosis of ``current`` (which read ``read_tokens``) against ``previous``."""
    matched = 0
    for mine, theirs in zip(current.chain, previous.chain, strict=False):
        if mine != theirs:
            break
        matched += 1
    common = current.ends[matched - 1] if matched else 0
    if previous.model != current.model:
        missed = max(0, min(previous.cached_tokens, common) - read_tokens)
        return Diagnosis("model_changed", missed)
    if common < previous.cached_tokens:
        sections = current.sections if matched < len(current.sections) else previous.sections
        section = sections[min(matched, len(sections) - 1)]
        missed = max(0, previous.cached_tokens - read_tokens)
        kind = {
            "tools": "tools_changed",
            "system": "system_changed",
            "messages": "messages_changed",
        }[section]
        return Diagnosis(kind, missed)  # type: ignore[arg-type]
    if previous.uncovered != current.uncovered:
        return Diagnosis("unavailable")
    return Diagnosis(None)


class RecentMessages:
    """The remembered message ids, per tenant, bounded."""

    def __init__(self, per_tenant: int = MESSAGES_PER_TENANT, tenants: int = TENANTS) -> None:
        self.per_tenant = per_tenant
        self.tenants = tenants
        self._by_tenant: OrderedDict[TenantId, OrderedDict[str, PromptShape]] = OrderedDict()

    def remember(self, tenant: TenantId, message_id: str, shape: PromptShape) -> None:
        messages = self._by_tenant.setdefault(tenant, OrderedDict())
        self._by_tenant.move_to_end(tenant)
        messages[message_id] = shape
        while len(messages) > self.per_tenant:
            messages.popitem(last=False)
        while len(self._by_tenant) > self.tenants:
            self._by_tenant.popitem(last=False)

    def find(self, tenant: TenantId, message_id: str) -> PromptShape | None:
        """Only the tenant's own messages: another tenant's id is simply not found."""
        messages = self._by_tenant.get(tenant)
        return messages.get(message_id) if messages is not None else None

    def diagnose(
        self,
        tenant: TenantId,
        previous_id: str | None,
        current: PromptShape,
        read_tokens: int,
    ) -> Diagnosis:
        """``null`` on a first turn (no previous id); otherwise the comparison."""
        if previous_id is None:
            return Diagnosis(None)
        previous = self.find(tenant, previous_id)
        if previous is None:
            return Diagnosis("previous_message_not_found")
        return compare(previous, current, read_tokens)


def shape_of(
    *,
    model: str,
    chain: Sequence[BlockHash],
    sections: Sequence[Section],
    ends: Sequence[int],
    cached_tokens: int,
    uncovered: str,
) -> PromptShape:
    return PromptShape(model, tuple(chain), tuple(sections), tuple(ends), cached_tokens, uncovered)


__all__ = ["PromptShape", "RecentMessages", "compare", "shape_of"]
