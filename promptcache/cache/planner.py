"""The lookup and write plan of spec §1.6, and the usage it implies (§0, §3.6).

Given the prompt's block offsets and keys and the validated breakpoints, the planner probes the
store with a 20-block lookback per breakpoint, takes the deepest hit ``A``, and writes every
remaining breakpoint beyond it::

    blocks:   b0 b1 b2 ... b15 ... b34 b35
    entry:              ^h15 (written earlier)
    bp on b34 probes h34, h33, ..., h15  -> hit, A = offset(b15)
    bp on b35 probes h35, ..., h16       -> no hit

Given an ``Explain``, it also says why each breakpoint that was not read missed (``CacheMiss``,
the reasons of docs/architecture.md), from the store's tombstones and the tenant's prompt
history (``cache/misses.py``), and then adds this prompt to that history.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass

from promptcache.cache.entry import Entry
from promptcache.cache.misses import PromptHistory, explain_from_history
from promptcache.cache.policy import Breakpoint, ModelCachePolicy
from promptcache.cache.store import PrefixStore
from promptcache.core.response import CacheMiss, CacheUsage
from promptcache.types import BlockHash, Section, TenantId, TierName, Ttl

LOOKBACK_BLOCKS = 20


@dataclass(frozen=True, slots=True)
class CacheSpan:
    """A breakpoint that will be written: its key, offset and TTL class."""

    key: BlockHash
    offset: int
    ttl: Ttl


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What one request reads and writes. ``hit`` is pinned until the service unpins it.

    ``wait_for`` names an in-flight key deeper than any live hit: the request must wait for it
    and plan again (single flight, §1.11); such a plan pins and refreshes nothing.
    """

    hit: Entry | None
    writes: tuple[CacheSpan, ...]
    usage: CacheUsage
    wait_for: BlockHash | None = None
    misses: tuple[CacheMiss, ...] = ()
    read_tier: TierName | None = None

    @property
    def read_tokens(self) -> int:
        return self.usage.read_tokens


@dataclass(frozen=True, slots=True)
class Explain:
    """What explaining misses needs beyond the keys: who asks, under which model, the prompt's
    model-neutral key chain and each block's section, and the history to compare with."""

    tenant: TenantId
    model: str
    chain: Sequence[BlockHash]
    sections: Sequence[Section]
    history: PromptHistory


def eligible_breakpoints(
    breakpoints: Sequence[Breakpoint], block_ends: Sequence[int], policy: ModelCachePolicy
) -> list[Breakpoint]:
    """Breakpoints that may read or write: within the model's min/max, tools allowed (§1.8)."""
    kept = []
    for bp in breakpoints:
        offset = block_ends[bp.block_index]
        if offset < policy.min_cacheable_tokens or offset <= 0:
            continue
        if policy.max_cacheable_tokens is not None and offset > policy.max_cacheable_tokens:
            continue
        if bp.is_tool and not policy.tool_cache_points:
            continue
        kept.append(bp)
    return kept


@dataclass(frozen=True, slots=True)
class Reach:
    """What a plan would find now, without planning (``reach``): the tokens of the deepest live
    hit (``read``), the keys a shared tier could still answer deeper than it (``probe``), and
    each eligible breakpoint's key and offset (``breakpoints``), from which the keys a plan
    writes follow (``writes``)."""

    read: int
    probe: tuple[BlockHash, ...]
    breakpoints: tuple[tuple[BlockHash, int], ...]

    def writes(self, read: int) -> list[BlockHash]:
        """The keys a plan reading ``read`` tokens writes (§1.6 step 5), shallowest first."""
        ordered = sorted(self.breakpoints, key=lambda b: b[1])
        return [key for key, offset in ordered if offset > read]


def reach(
    *,
    keys: Sequence[BlockHash],
    block_ends: Sequence[int],
    breakpoints: Sequence[Breakpoint],
    policy: ModelCachePolicy,
    store: PrefixStore,
    now: float,
    pending: Container[BlockHash] = (),
) -> Reach:
    """The probe of ``plan`` without its effects (nothing refreshed, pinned or counted): for
    the lookup in a shared tier before planning. Each breakpoint's window is walked as ``plan``
    walks it; the keys above its first live or ``pending`` key are those a lower tier could
    answer, and only those deeper than the deepest live hit are worth asking for."""
    candidates = eligible_breakpoints(breakpoints, block_ends, policy)
    read = 0
    probe: dict[BlockHash, int] = {}
    for bp in candidates:
        for index in range(bp.block_index, max(-1, bp.block_index - LOOKBACK_BLOCKS), -1):
            entry = store.get(keys[index], now)
            if entry is not None:
                read = max(read, entry.num_tokens)
                break
            if keys[index] in pending:
                break
            probe.setdefault(keys[index], block_ends[index])
    return Reach(
        read,
        tuple(key for key, end in probe.items() if end > read),
        tuple((keys[bp.block_index], block_ends[bp.block_index]) for bp in candidates),
    )


def plan(
    *,
    keys: Sequence[BlockHash],
    block_ends: Sequence[int],
    num_tokens: int,
    breakpoints: Sequence[Breakpoint],
    policy: ModelCachePolicy,
    store: PrefixStore,
    t0: float,
    now: float,
    pending: Container[BlockHash] = (),
    explain: Explain | None = None,
) -> CachePlan:
    """Probe, refresh and pin (spec §1.6 steps 2-5). Mutates the store: every live entry found
    is refreshed from ``t0``, and the deepest one is pinned for the caller.

    A probe that meets a ``pending`` key (being written by another request) stops there; when
    such a key lies deeper than every live hit, the plan only says to wait for it.
    """
    candidates = eligible_breakpoints(breakpoints, block_ends, policy)
    hits: list[Entry] = []
    waits: list[tuple[int, BlockHash]] = []
    for bp in candidates:
        for index in range(bp.block_index, max(-1, bp.block_index - LOOKBACK_BLOCKS), -1):
            entry = store.get(keys[index], now)
            if entry is not None:
                hits.append(entry)
                break
            if keys[index] in pending:
                waits.append((block_ends[index], keys[index]))
                break
    deepest = max((e.num_tokens for e in hits), default=0)
    wait = max(waits, default=None)
    if wait is not None and wait[0] > deepest:
        return CachePlan(None, (), CacheUsage(num_tokens), wait_for=wait[1])
    for entry in {id(e): e for e in hits}.values():
        store.touch(entry, t0)
    hit = max(hits, key=lambda e: e.num_tokens, default=None)
    if hit is not None:
        store.pin(hit)
    else:
        store.stats.num_misses += 1
    read = hit.num_tokens if hit is not None else 0
    writes: dict[BlockHash, CacheSpan] = {}
    for bp in candidates:
        offset = block_ends[bp.block_index]
        if offset > read:
            ttl: Ttl = bp.ttl if policy.ttl_1h else "5m"
            writes[keys[bp.block_index]] = CacheSpan(keys[bp.block_index], offset, ttl)
    spans = tuple(sorted(writes.values(), key=lambda s: s.offset))
    # B: end of the last 1h write, C: end of the last write (§3.6); 1h writes precede 5m ones.
    last_1h = max((s.offset for s in spans if s.ttl == "1h"), default=read)
    last = max((s.offset for s in spans), default=read)
    usage = CacheUsage(
        prompt_tokens=num_tokens,
        read_tokens=read,
        written_tokens={"1h": last_1h - read, "5m": last - last_1h},
    )
    misses: tuple[CacheMiss, ...] = ()
    if explain is not None:
        misses = _explain(
            keys, block_ends, breakpoints, candidates, read, policy, store, now, explain
        )
        if candidates:
            deepest_bp = max(bp.block_index for bp in candidates)
            explain.history.remember(explain.tenant, explain.model, explain.chain[: deepest_bp + 1])
    tier = hit.tier if hit is not None else None
    return CachePlan(hit, spans, usage, misses=misses, read_tier=tier)


def _explain(
    keys: Sequence[BlockHash],
    block_ends: Sequence[int],
    breakpoints: Sequence[Breakpoint],
    candidates: Sequence[Breakpoint],
    read: int,
    policy: ModelCachePolicy,
    store: PrefixStore,
    now: float,
    explain: Explain,
) -> tuple[CacheMiss, ...]:
    """A ``CacheMiss`` for every breakpoint not read. The most specific reason wins: too short,
    then the key's own fate (expired, evicted), then a live entry too far back, then the
    tenant's history (another model, a changed block), else ``never_written``."""
    misses: list[CacheMiss] = []
    for bp in breakpoints:
        index = bp.block_index
        offset = block_ends[index]
        if bp not in candidates:
            if offset < policy.min_cacheable_tokens:
                misses.append(CacheMiss("below_minimum", index, offset))
            continue
        if offset <= read:
            continue
        misses.append(_why(keys, block_ends, index, offset, read, store, now, explain))
    return tuple(misses)


def _why(
    keys: Sequence[BlockHash],
    block_ends: Sequence[int],
    index: int,
    offset: int,
    read: int,
    store: PrefixStore,
    now: float,
    explain: Explain,
) -> CacheMiss:
    key = keys[index]
    entry = store.peek(key)
    if entry is not None and not entry.is_live(now):  # expired, still pinned by a reader
        return CacheMiss("expired", index, offset, age_s=now - entry.expires_at)
    stone = store.tombstones.get(key)
    if stone is not None and stone.tenant == explain.tenant:
        if stone.reason == "expired":
            return CacheMiss("expired", index, offset, age_s=max(0.0, now - stone.expired_at))
        return CacheMiss("evicted", index, offset, tier=stone.tier, cause=stone.reason)
    for earlier in range(index - LOOKBACK_BLOCKS, -1, -1):
        found = store.peek(keys[earlier])
        if found is not None and found.is_live(now) and block_ends[earlier] > read:
            return CacheMiss("outside_lookback", index, offset, found=earlier)
    changed = explain_from_history(
        tenant=explain.tenant,
        model=explain.model,
        chain=explain.chain,
        block=index,
        tokens=offset,
        sections=explain.sections,
        history=explain.history,
    )
    return changed or CacheMiss("never_written", index, offset)


__all__ = [
    "LOOKBACK_BLOCKS",
    "CachePlan",
    "CacheSpan",
    "Explain",
    "Reach",
    "eligible_breakpoints",
    "plan",
    "reach",
]
