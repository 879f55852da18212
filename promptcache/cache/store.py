"""``PrefixStore``: the metadata of every cache entry, its TTL, pins and the memory budget.

The store never looks inside a payload; it keeps ``payload.nbytes`` within ``capacity_bytes``.
Eviction order under pressure (spec §1.13): expired entries first, then live ones least recently
used first. Pinned entries (in use by a running request) are never evicted. Expiry is strict
(§1.7): an expired entry is never returned, even before its memory is reclaimed.

All methods are called from one thread (the service's event loop); none of them blocks.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from promptcache.core.payload import KVPayload
from promptcache.types import TTL_SECONDS, BlockHash, TenantId, Ttl

log = logging.getLogger(__name__)

EvictReason = Literal["expired", "capacity", "cleared", "rejected"]


@dataclass(slots=True, eq=False)
class Entry:
    """One cache entry: the KV state of the first ``num_tokens`` tokens under key ``key``."""

    key: BlockHash
    tenant: TenantId
    num_tokens: int
    ttl: Ttl
    created_at: float
    expires_at: float
    payload: KVPayload
    nbytes: int
    ref_cnt: int = 0
    num_hits: int = 0

    def is_live(self, now: float) -> bool:
        return now < self.expires_at


@dataclass(slots=True)
class StoreStats:
    """Cumulative counters, read by metrics."""

    num_hits: int = 0
    num_misses: int = 0
    num_commits: int = 0
    evictions: Counter[str] = field(default_factory=Counter)


class PrefixStore:
    """Entries by key, in least-recently-used order, within a byte budget."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[BlockHash, Entry] = OrderedDict()
        self.used_bytes = 0
        self.stats = StoreStats()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """A snapshot of every entry, least recently used first."""
        return list(self._entries.values())

    def get(self, key: BlockHash, now: float) -> Entry | None:
        """The live entry under ``key``, or None. Does not mutate, except to reclaim the entry
        when it has expired and is not pinned."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.is_live(now):
            return entry
        if entry.ref_cnt == 0:
            self._remove(entry, "expired")
        return None

    def touch(self, entry: Entry, t0: float) -> None:
        """A read: refresh the expiry from request start ``t0`` (never shortening it, §1.7)
        and mark the entry most recently used."""
        entry.expires_at = max(entry.expires_at, t0 + TTL_SECONDS[entry.ttl])
        entry.num_hits += 1
        self.stats.num_hits += 1
        if entry.key in self._entries:
            self._entries.move_to_end(entry.key)

    def pin(self, entry: Entry) -> None:
        """Protect ``entry`` from eviction until ``unpin``; its payload stays valid meanwhile."""
        entry.ref_cnt += 1

    def unpin(self, entry: Entry) -> None:
        if entry.ref_cnt <= 0:
            raise RuntimeError("unpin of an entry that is not pinned")
        entry.ref_cnt -= 1

    def put(
        self, key: BlockHash, payload: KVPayload, ttl: Ttl, t0: float, tenant: TenantId, now: float
    ) -> Entry | None:
        """Store a new entry expiring at ``t0 + ttl``. Returns it, the live entry already under
        ``key`` (entries are immutable), or None when no room can be made (counted as evicted)."""
        existing = self.get(key, now)
        if existing is not None:
            return existing
        stale = self._entries.get(key)
        if stale is not None:  # expired but pinned: replace the mapping, the reader keeps its ref
            self._remove(stale, "expired")
        nbytes = payload.nbytes
        if not self._make_room(nbytes, now):
            self.stats.evictions["rejected"] += 1
            log.warning("cache entry of %d bytes does not fit the budget; not stored", nbytes)
            return None
        entry = Entry(
            key, tenant, payload.num_tokens, ttl, t0, t0 + TTL_SECONDS[ttl], payload, nbytes
        )
        self._entries[key] = entry
        self.used_bytes += nbytes
        self.stats.num_commits += 1
        return entry

    def evict_expired(self, now: float) -> int:
        """Reclaim every expired, unpinned entry. Returns how many were removed."""
        expired = [e for e in self._entries.values() if not e.is_live(now) and e.ref_cnt == 0]
        for entry in expired:
            self._remove(entry, "expired")
        return len(expired)

    def clear(self) -> int:
        """Drop every unpinned entry (admin call). Returns how many were removed."""
        victims = [e for e in self._entries.values() if e.ref_cnt == 0]
        for entry in victims:
            self._remove(entry, "cleared")
        return len(victims)

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` when the byte count or pins disagree with the entries."""
        total = sum(e.nbytes for e in self._entries.values())
        if total != self.used_bytes:
            raise AssertionError(f"used_bytes={self.used_bytes} but entries hold {total}")
        if self.used_bytes > self.capacity_bytes:
            raise AssertionError(f"used_bytes={self.used_bytes} > capacity={self.capacity_bytes}")
        for key, entry in self._entries.items():
            if key != entry.key or entry.ref_cnt < 0:
                raise AssertionError(f"entry {entry.key.hex()[:12]} is inconsistent")

    def _make_room(self, nbytes: int, now: float) -> bool:
        if nbytes > self.capacity_bytes:
            return False
        if self.used_bytes + nbytes <= self.capacity_bytes:
            return True
        self.evict_expired(now)
        for entry in list(self._entries.values()):  # least recently used first
            if self.used_bytes + nbytes <= self.capacity_bytes:
                break
            if entry.ref_cnt == 0:
                # A live entry goes before its TTL: this breaks the minimum-lifetime promise.
                log.warning(
                    "evicting live cache entry (%d tokens, %.0f s left) under memory pressure",
                    entry.num_tokens,
                    entry.expires_at - now,
                )
                self._remove(entry, "capacity")
        return self.used_bytes + nbytes <= self.capacity_bytes

    def _remove(self, entry: Entry, reason: EvictReason) -> None:
        del self._entries[entry.key]
        self.used_bytes -= entry.nbytes
        self.stats.evictions[reason] += 1


__all__ = ["Entry", "EvictReason", "PrefixStore", "StoreStats"]
