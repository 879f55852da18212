"""``PrefixStore``: every cache entry's metadata, its TTL and pins, and where its bytes live.

The store keeps one index of entries; each entry sits in exactly one tier of its ``TierStack``
(``cache/tiers.py``). The store never looks inside a payload. Policy, per tier (spec §1.13):

- room is made in a tier by reclaiming its expired, unpinned entries first, then demoting its
  least recently used unpinned entries one tier down; the last tier drops them (``capacity``);
- with a tenant share ``F`` (``tenant_share``, set when credentials are configured), a tenant
  holding more than ``F`` of a tier's budget (counting the entry being placed) is over its share:
  its entries move first (``tenant_share``), and a tenant over its share never moves the entries
  of one within it; an entry that cannot get room otherwise goes to a lower tier or is refused
  (``tenant_share``). A tenant alone in a tier may fill it (spec §1.13);
- a new entry starts in the top tier, or the first tier below it that can hold it;
- a hit in a lower tier is promoted to the top when the engine has read it (``promote``); a file
  that turns out corrupt or truncated is a miss and is removed (``discard``);
- pinned entries (in use by a running request) never move and are never dropped;
- expiry is strict (§1.7): an expired entry is never returned, even before its bytes go.

All methods run on one thread (the service's event loop). Moves call the engine's codec there;
only ``TierStack.loader`` functions (reads for a hit) are meant for a worker thread.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from promptcache.cache.entry import Entry
from promptcache.cache.misses import Tombstone, Tombstones
from promptcache.cache.tiers import (
    DiskRecord,
    Tier,
    TierStack,
    disk_part,
    entry_from_metadata,
    entry_metadata,
    key_of,
    unique_parts,
)
from promptcache.core.payload import CorruptPayload, KVPayload
from promptcache.types import TTL_SECONDS, BlockHash, TenantId, TierName, Ttl

log = logging.getLogger(__name__)

EvictReason = Literal["expired", "capacity", "tenant_share", "cleared", "rejected", "corrupt"]
MoveReason = Literal["capacity", "tenant_share", "shutdown", "hit"]


@dataclass(slots=True)
class StoreStats:
    """Cumulative counters, read by metrics. Moves and drops are keyed ``(tier, reason)``, where
    the tier is the one the entry left."""

    num_hits: int = 0
    num_misses: int = 0
    num_commits: int = 0
    evictions: Counter[tuple[TierName, EvictReason]] = field(default_factory=Counter)
    demotions: Counter[tuple[TierName, MoveReason]] = field(default_factory=Counter)
    promotions: Counter[tuple[TierName, MoveReason]] = field(default_factory=Counter)


class PrefixStore:
    """Entries by key, least recently used first, spread over the tiers of a ``TierStack``.

    ``PrefixStore(capacity_bytes)`` is a single host-memory tier, as in tests. ``tenant_share``
    (0 < F <= 1, or None for plain LRU) is the share of each tier's budget a tenant may hold
    when others need room.
    """

    def __init__(
        self,
        capacity_bytes: int | None = None,
        *,
        tiers: TierStack | None = None,
        tenant_share: float | None = None,
    ) -> None:
        if tenant_share is not None and not 0 < tenant_share <= 1:
            raise ValueError(f"tenant_share must be in (0, 1], got {tenant_share}")
        self.tenant_share = tenant_share
        if tiers is None:
            if capacity_bytes is None:
                raise ValueError("give capacity_bytes or tiers")
            tiers = TierStack([Tier("host", capacity_bytes)])
        self.tiers = tiers
        self._entries: OrderedDict[BlockHash, Entry] = OrderedDict()
        self.stats = StoreStats()
        self.tombstones = Tombstones()
        """Removed keys, so a miss can say expired or evicted (``cache/misses.py``)."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_bytes(self) -> int:
        """Bytes held, summed over the tiers."""
        return sum(t.used_bytes for t in self.tiers)

    @property
    def capacity_bytes(self) -> int:
        return sum(t.capacity_bytes for t in self.tiers)

    def entries(self) -> list[Entry]:
        """A snapshot of every entry, least recently used first."""
        return list(self._entries.values())

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: BlockHash, now: float) -> Entry | None:
        """The live entry under ``key`` in any tier, or None. Does not mutate, except to reclaim
        the entry when it has expired and is not pinned."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.is_live(now):
            return entry
        if entry.ref_cnt == 0:
            self._remove(entry, "expired")
        return None

    def peek(self, key: BlockHash) -> Entry | None:
        """The entry under ``key``, live or not; never mutates (for explaining misses)."""
        return self._entries.get(key)

    def touch(self, entry: Entry, t0: float) -> None:
        """A read: refresh the expiry from request start ``t0`` (never shortening it, §1.7)
        and mark the entry most recently used."""
        entry.expires_at = max(entry.expires_at, t0 + TTL_SECONDS[entry.ttl])
        entry.num_hits += 1
        self.stats.num_hits += 1
        if self._entries.get(entry.key) is entry:
            self._entries.move_to_end(entry.key)
            self._tier_of(entry).touch(entry)

    def pin(self, entry: Entry) -> None:
        """Protect ``entry`` from moves and eviction until ``unpin``; its payload (or file) stays
        valid meanwhile."""
        entry.ref_cnt += 1

    def unpin(self, entry: Entry) -> None:
        if entry.ref_cnt <= 0:
            raise RuntimeError("unpin of an entry that is not pinned")
        entry.ref_cnt -= 1

    def is_resident(self, entry: Entry) -> bool:
        """Whether the engine can use ``entry.payload`` as it is (it is in the top tier)."""
        return entry.tier == self.tiers.top.name and entry.payload is not None

    # -- writes and moves --------------------------------------------------------------------

    def put(
        self, key: BlockHash, payload: KVPayload, ttl: Ttl, t0: float, tenant: TenantId, now: float
    ) -> Entry | None:
        """Store a new entry expiring at ``t0 + ttl`` from ``payload`` (in the top tier's memory).

        Returns it, the live entry already under ``key`` (entries are immutable), or None when no
        tier can make room (counted as ``rejected``).
        """
        existing = self.get(key, now)
        if existing is not None:
            return existing
        stale = self._entries.get(key)
        if stale is not None:  # expired but pinned: replace the mapping, the reader keeps its ref
            self._remove(stale, "expired")
        entry = Entry(key, tenant, payload.num_tokens, ttl, t0, t0 + TTL_SECONDS[ttl])
        top = self.tiers.top
        if not self._place(entry, payload, top.name, 0, now):
            parts = unique_parts(payload.parts)
            if self._over_share(top, tenant, tenant, top.added_bytes(parts)):
                self.tombstones.add(
                    key, Tombstone(tenant, "tenant_share", top.name, entry.expires_at)
                )
                self.stats.evictions[top.name, "tenant_share"] += 1
                log.info(
                    "cache entry of %d bytes not stored: its tenant is over its share of %s",
                    payload.nbytes,
                    top.name,
                )
                return None
            self.tombstones.add(key, Tombstone(tenant, "rejected", top.name, entry.expires_at))
            self.stats.evictions[top.name, "rejected"] += 1
            log.warning("cache entry of %d bytes fits no tier; not stored", payload.nbytes)
            return None
        self._entries[key] = entry
        self.tombstones.discard(key)
        self.stats.num_commits += 1
        return entry

    def promote(self, entry: Entry, payload: KVPayload, now: float) -> bool:
        """Move ``entry`` to the top tier, holding ``payload`` (its bytes as ``TierStack.loader``
        read them), when room can be made there. Returns whether it is in the top tier now; when
        not, it stays where it was and the caller may still use ``payload`` this once."""
        if self._entries.get(entry.key) is not entry or entry.tier is None:
            return False
        top = self.tiers.top
        source = self._tier_of(entry)
        if source is top:
            return True
        parts = unique_parts(payload.parts)
        if top.added_bytes(parts) > top.capacity_bytes or not self._make_room(
            top, parts, entry.tenant, now
        ):
            return False
        if entry not in source:  # moved while room was made (only possible when not pinned)
            return False
        self._leave(entry, source)
        top.add(entry, parts)
        entry.payload = payload
        self.stats.promotions[source.name, "hit"] += 1
        return True

    def demote(self, entry: Entry, now: float, reason: MoveReason = "capacity") -> bool:
        """Move an unpinned ``entry`` down a tier (dropping it from the last). Returns whether it
        moved down: False when it is pinned, gone or was dropped."""
        if self._entries.get(entry.key) is not entry or entry.ref_cnt > 0:
            return False
        return self._demote(entry, self._tier_of(entry), now, reason)

    def discard(self, entry: Entry, reason: EvictReason = "corrupt") -> bool:
        """Remove ``entry`` whatever its pins (its bytes proved unusable). False when it was
        already gone or replaced."""
        if self._entries.get(entry.key) is not entry:
            return False
        self._remove(entry, reason)
        return True

    def evict_expired(self, now: float) -> int:
        """Reclaim every expired, unpinned entry in every tier. Returns how many went."""
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

    # -- persistence -------------------------------------------------------------------------

    def persist(self, now: float) -> int:
        """Write every live, unpinned memory entry to the disk tier, least recently used first so
        the most recent win when the disk is full (shutdown). Returns how many moved."""
        disk = self.tiers.disk
        if disk is None or self.tiers.codec is None:
            return 0
        start = self.tiers.tiers.index(disk)
        moved = 0
        for entry in self.entries():
            if entry.tier in (None, "disk") or entry.ref_cnt > 0 or not entry.is_live(now):
                continue
            source, payload, parts = self._tier_of(entry), entry.payload, entry.parts
            assert payload is not None
            self._leave(entry, source)
            if self._place(entry, payload, source.name, start, now):
                self.stats.demotions[source.name, "shutdown"] += 1
                moved += 1
            else:  # no room on disk: it stays (room in its tier is unchanged)
                source.add(entry, parts)
                entry.payload = payload
        return moved

    def restore(self, records: Sequence[DiskRecord], now: float) -> int:
        """Index the files ``DiskTier.scan`` found. Expired, corrupt and surplus files are deleted
        (TTLs are wall-clock: what expired while the server was down is gone). Returns how many
        entries the disk tier holds now (the newest win when they do not all fit)."""
        disk, codec = self.tiers.disk, self.tiers.codec
        if disk is None or codec is None:
            return 0
        for record in records:
            key = key_of(record.path, codec.suffix)
            if key is None:
                continue  # not a name we write: leave foreign files alone
            reason: EvictReason | None = None
            entry: Entry | None = None
            if record.metadata is None:
                reason = "corrupt"
            else:
                try:
                    entry = entry_from_metadata(record.metadata, key)
                except CorruptPayload:
                    reason = "corrupt"
            parts = ((disk_part(key), record.size),)
            known = self._entries.get(key)
            if known is not None:
                if known.tier != "disk":  # a newer copy was written while scanning
                    disk.delete(key, codec.suffix)
                continue  # otherwise this very file is indexed already (a second start)
            if entry is not None and not entry.is_live(now):
                reason = "expired"
            elif entry is not None and not self._make_room(disk, parts, entry.tenant, now):
                reason = "capacity"
            if reason is not None or entry is None:
                reason = reason or "corrupt"
                log.info("dropping cache file %s (%s)", record.path.name, reason)
                disk.delete(key, codec.suffix)
                self.stats.evictions["disk", reason] += 1
                continue
            disk.add(entry, parts)
            self._entries[key] = entry
        return len(disk)

    # -- checks ------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` when tiers, bytes, pins or files disagree with the index."""
        resident: dict[BlockHash, Entry] = {}
        for tier in self.tiers:
            tier.check_integrity()
            for entry in tier.entries():
                if entry.key in resident:
                    raise AssertionError(f"entry {entry.key.hex()[:12]} is in two tiers")
                resident[entry.key] = entry
                if (entry.payload is None) != tier.is_disk:
                    raise AssertionError(f"entry {entry.key.hex()[:12]} has the wrong form")
                if tier.is_disk and not self.tiers.path(entry.key).is_file():
                    raise AssertionError(f"entry {entry.key.hex()[:12]} lost its file")
        if resident.keys() != self._entries.keys() or any(
            resident[k] is not e for k, e in self._entries.items()
        ):
            raise AssertionError("the index and the tiers hold different entries")
        for entry in self._entries.values():
            if entry.ref_cnt < 0:
                raise AssertionError(f"entry {entry.key.hex()[:12]} has ref_cnt {entry.ref_cnt}")

    # -- internals ---------------------------------------------------------------------------

    def _tier_of(self, entry: Entry) -> Tier:
        assert entry.tier is not None
        return self.tiers.tier(entry.tier)

    def _place(
        self, entry: Entry, payload: KVPayload, origin: TierName, start: int, now: float
    ) -> bool:
        """Make ``entry`` resident in the first tier from index ``start`` down that can hold it.
        ``payload`` is in the memory of tier ``origin``."""
        for tier in self.tiers.tiers[start:]:
            if tier.is_disk:
                return self._place_on_disk(entry, payload, tier, now)
            if tier.name != origin and self.tiers.codec is None:
                continue
            parts = unique_parts(payload.parts)
            if tier.added_bytes(parts) > tier.capacity_bytes:
                continue
            if not self._make_room(tier, parts, entry.tenant, now):
                continue
            try:
                moved = payload if tier.name == origin else self.tiers.to_memory(payload, tier)
            except Exception:  # e.g. out of memory on the way: try the next tier
                log.exception("copying a cache entry to %s failed", tier.name)
                continue
            tier.add(entry, moved.parts)
            entry.payload = moved
            return True
        return False

    def _place_on_disk(self, entry: Entry, payload: KVPayload, disk: Tier, now: float) -> bool:
        codec = self.tiers.codec
        if codec is None or payload.nbytes > disk.capacity_bytes:
            return False
        path = self.tiers.path(entry.key)
        try:
            codec.save(payload, path, entry_metadata(entry))
            size = path.stat().st_size
        except OSError as exc:
            log.warning("writing cache entry to %s failed: %s", path, exc)
            return False
        parts = ((disk_part(entry.key), size),)
        if size > disk.capacity_bytes or not self._make_room(disk, parts, entry.tenant, now):
            path.unlink(missing_ok=True)
            return False
        disk.add(entry, parts)
        entry.payload = None
        return True

    def _make_room(
        self, tier: Tier, parts: tuple[tuple[int, int], ...], tenant: TenantId, now: float
    ) -> bool:
        """Free ``tier`` until ``parts`` (of an entry of ``tenant``) fit: expired entries first,
        then unpinned ones move down a tier (or go, from the last), least recently used first,
        those of tenants over their share before any other."""
        if tier.fits(parts):
            return True
        for entry in tier.entries():
            if entry.ref_cnt == 0 and not entry.is_live(now):
                self._remove(entry, "expired")
        while not tier.fits(parts):
            choice = self._victim(tier, parts, tenant)
            if choice is None:
                return False
            victim, reason = choice
            self._demote(victim, tier, now, reason)
        return True

    def _victim(
        self, tier: Tier, parts: tuple[tuple[int, int], ...], tenant: TenantId
    ) -> tuple[Entry, MoveReason] | None:
        """The next entry to leave ``tier`` to make room for ``parts`` of ``tenant``, or None.

        Without a share, or with one tenant alone in the tier, that is plain LRU. Otherwise the
        least recently used entry of a tenant over its share goes first; an entry of a tenant
        within its share goes only when ``tenant`` itself stays within its share. A flood by one
        tenant thus pushes out its own entries, never its neighbours' (spec §1.13).
        """
        movable = [e for e in tier.entries() if e.ref_cnt == 0]  # least recently used first
        if not movable:
            return None
        if self.tenant_share is None or tier.tenants() <= {tenant}:
            return movable[0], "capacity"
        added = tier.added_bytes(parts)
        over = {t for t in tier.tenants() | {tenant} if self._over_share(tier, t, tenant, added)}
        for entry in movable:
            if entry.tenant in over:
                return entry, "tenant_share"
        if tenant in over:
            return None
        return movable[0], "capacity"

    def _over_share(self, tier: Tier, tenant: TenantId, placing: TenantId, added: int) -> bool:
        """Whether ``tenant`` holds more than its share of ``tier`` once the ``added`` bytes of
        an entry of ``placing`` are counted. Never without a share, nor for a tenant alone in the
        tier (``placing`` counts as present: its arrival is what makes the others share)."""
        if self.tenant_share is None or tier.tenants() | {placing} <= {tenant}:
            return False
        extra = added if placing == tenant else 0
        return tier.tenant_bytes(tenant) + extra > self.tenant_share * tier.capacity_bytes

    def _demote(self, entry: Entry, source: Tier, now: float, reason: MoveReason) -> bool:
        payload = entry.payload
        self._leave(entry, source)
        below = self.tiers.below(source)
        if below is not None and payload is not None:
            start = self.tiers.tiers.index(below)
            if self._place(entry, payload, source.name, start, now):
                self.stats.demotions[source.name, reason] += 1
                log.debug("demoted a cache entry from %s to %s", source.name, entry.tier)
                return True
        if entry.is_live(now):
            # A live entry goes before its TTL: this breaks the minimum-lifetime promise.
            log.warning(
                "evicting live cache entry (%d tokens, %.0f s left) from %s under pressure",
                entry.num_tokens,
                entry.expires_at - now,
                source.name,
            )
        del self._entries[entry.key]
        entry.payload = None
        cause: EvictReason = "tenant_share" if reason == "tenant_share" else "capacity"
        self.tombstones.add(
            entry.key, Tombstone(entry.tenant, cause, source.name, entry.expires_at)
        )
        self.stats.evictions[source.name, cause] += 1
        return False

    def _leave(self, entry: Entry, tier: Tier) -> None:
        """Take ``entry`` out of ``tier`` (deleting its file there), keeping it in the index."""
        tier.remove(entry)
        if tier.is_disk and self.tiers.codec is not None:
            self.tiers.path(entry.key).unlink(missing_ok=True)
        entry.tier = None
        entry.parts = ()

    def _remove(self, entry: Entry, reason: EvictReason) -> None:
        tier = self._tier_of(entry)
        self._leave(entry, tier)
        del self._entries[entry.key]
        entry.payload = None
        self.tombstones.add(entry.key, Tombstone(entry.tenant, reason, tier.name, entry.expires_at))
        self.stats.evictions[tier.name, reason] += 1


__all__ = ["Entry", "EvictReason", "MoveReason", "PrefixStore", "StoreStats"]
