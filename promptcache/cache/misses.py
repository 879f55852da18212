"""Why a breakpoint was not read: tombstones of removed entries and a short prompt history.

Both are bounded and hold metadata only (keys, tenants, times), never prompt text:

- ``Tombstones``: the last ``limit`` keys removed from the store, with why (expired, capacity,
  tenant share, ...), from which tier and when, so a miss can say ``expired 312 s ago`` or
  ``evicted from host (capacity)`` rather than ``never_written``;
- ``PromptHistory``: per tenant, the model-neutral key chains of its latest prompts, so a miss
  can name the first block that changed since (``prefix_changed``) or that the prompt is the
  same but the model is not (``model_changed``).

Keys are namespaced by tenant (``hashing.py``), so a key that exists only for another tenant is
never found here: it is ``never_written``, and nothing of that tenant shows.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from promptcache.core.response import CacheMiss
from promptcache.types import BlockHash, Section, TenantId, TierName

TOMBSTONES = 4096
PROMPTS_PER_TENANT = 16
TENANTS = 1024


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A removed entry: its tenant, why it went (``EvictReason``), from where and when it
    expired (its TTL end, for ``expired``'s age)."""

    tenant: TenantId
    reason: str
    tier: TierName
    expired_at: float


class Tombstones:
    """The last ``limit`` removed keys; a key written again loses its tombstone."""

    def __init__(self, limit: int = TOMBSTONES) -> None:
        self.limit = limit
        self._stones: OrderedDict[BlockHash, Tombstone] = OrderedDict()

    def __len__(self) -> int:
        return len(self._stones)

    def add(self, key: BlockHash, stone: Tombstone) -> None:
        self._stones[key] = stone
        self._stones.move_to_end(key)
        while len(self._stones) > self.limit:
            self._stones.popitem(last=False)

    def get(self, key: BlockHash) -> Tombstone | None:
        return self._stones.get(key)

    def discard(self, key: BlockHash) -> None:
        self._stones.pop(key, None)


@dataclass(frozen=True, slots=True)
class _Prompt:
    model: str
    chain: tuple[BlockHash, ...]


class PromptHistory:
    """Per tenant, the model-neutral key chains (``hashing.block_hashes`` under a namespace
    without model) of its last ``per_tenant`` prompts; at most ``tenants`` tenants, least
    recently seen dropped first."""

    def __init__(self, per_tenant: int = PROMPTS_PER_TENANT, tenants: int = TENANTS) -> None:
        self.per_tenant = per_tenant
        self.tenants = tenants
        self._prompts: OrderedDict[TenantId, deque[_Prompt]] = OrderedDict()

    def remember(self, tenant: TenantId, model: str, chain: Sequence[BlockHash]) -> None:
        """Record a prompt's chain (up to its deepest breakpoint); a prefix of one already
        recorded adds nothing."""
        if not chain:
            return
        prompts = self._prompts.setdefault(tenant, deque(maxlen=self.per_tenant))
        self._prompts.move_to_end(tenant)
        new = _Prompt(model, tuple(chain))
        for old in list(prompts):
            if old.model == model and old.chain[: len(new.chain)] == new.chain:
                return
            if old.model == model and new.chain[: len(old.chain)] == old.chain:
                prompts.remove(old)  # the new one extends it
        prompts.append(new)
        while len(self._prompts) > self.tenants:
            self._prompts.popitem(last=False)

    def nearest(self, tenant: TenantId, chain: Sequence[BlockHash]) -> tuple[str, int] | None:
        """The model and matched block count of the tenant's recorded prompt sharing the
        longest prefix with ``chain`` (ties: the latest), or None when none shares a block."""
        best: tuple[str, int] | None = None
        for prompt in self._prompts.get(tenant, ()):
            matched = 0
            for mine, theirs in zip(chain, prompt.chain, strict=False):
                if mine != theirs:
                    break
                matched += 1
            if matched and (best is None or matched >= best[1]):
                best = (prompt.model, matched)
        return best


def explain_from_history(
    *,
    tenant: TenantId,
    model: str,
    chain: Sequence[BlockHash],
    block: int,
    tokens: int,
    sections: Sequence[Section],
    history: PromptHistory,
) -> CacheMiss | None:
    """``model_changed`` (an earlier prompt of the tenant matches through ``block`` under another
    model) or ``prefix_changed`` (it matches fewer blocks: the first differing one is named),
    from ``chain`` (this prompt's model-neutral keys); None when no earlier prompt shares one."""
    found = history.nearest(tenant, chain[: block + 1])
    if found is None:
        return None
    other_model, matched = found
    if matched > block:
        if other_model != model:
            return CacheMiss("model_changed", block, tokens)
        return None
    return CacheMiss(
        "prefix_changed",
        block,
        tokens,
        matched_blocks=matched,
        first_diff=matched,
        section=sections[matched],
    )


__all__ = [
    "PROMPTS_PER_TENANT",
    "TENANTS",
    "TOMBSTONES",
    "PromptHistory",
    "Tombstone",
    "Tombstones",
    "explain_from_history",
]
